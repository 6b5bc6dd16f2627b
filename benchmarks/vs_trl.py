"""The same PPO-RLHF job in ppojax and in TRL's PPO (``trl.experimental.ppo``), on the CPU.

Both sides start from the same random GPT-2 weights (a seeded ``transformers.GPT2LMHeadModel``, ``save_pretrained``,
read back with ``ppojax.load_pretrained``), sample with GPT-2's real tokenizer and a distinct pad token
(``ppojax.load_tokenizer``: ``<|pad|>``, id 50257), at temperature 0.7 with no top-k/top-p and no EOS stop, so every
response is exactly ``response`` tokens long. The prompts are consecutive ``query``-token windows of the shipped
prompt file (``configs/prompts/sentiment.txt``), so no prompt is padded.

Models on each side: actor, frozen reference (a copy of the actor), critic (the actor's trunk + a zero scalar head,
a separate model), and a reward model of the same shape: the same random trunk + a seeded random scalar head
(``N(0, 1/(n_embd+1))``, no bias). TRL gets it as a ``GPT2ForSequenceClassification(num_labels=1)``, ppojax as
``rewards.reward_model`` (trunk + head kernel = the torch ``score.weight``): same weights, same last-token read-out.
Hyperparameters matched: lr 1e-5, Adam eps 1e-5, no grad-norm clipping (TRL's PPO loop does not clip), fixed KL
coefficient 0.05 (k1), vf_coef 0.1, clip 0.2/0.2, gamma 1, lambda 0.95, advantage whitening.

Timing: each side runs in its own subprocess (so peak RSS is its own), after measuring a large fp32 matmul in its
framework (the machine's achievable peak). Per-iteration wall time is the median over iterations after the first;
the first iteration (ppojax: XLA compilation; TRL: lazy init) is reported separately.
- ppojax: ``rollout`` (generation + actor/ref log-probs + critic values), scoring (the reward model, jitted) and
  ``update`` (epochs x minibatches), each followed by ``block_until_ready``. Generation alone is timed afterwards
  with ``ppojax.generate`` on the same shapes (the rollout's sampling), so rollout - generation = forwards.
- TRL: ``PPOTrainer.train()`` with a callback at each step end (iteration time); its module-level
  ``batch_generation`` (generation), and its ``forward``/``get_reward`` calls made under no_grad (ref log-probs,
  values, reward) are wrapped with timers; update = iteration - generation - scoring (includes GAE/whitening, small).

FLOPs: one job-defined count, the same for both sides (model FLOPs of the algorithm, not of either implementation):
forward of a sequence of S tokens = L * (24 d^2 S + 2 d S (S + 1)) (matmuls + causal attention QK^T/AV) plus the
vocabulary projection 2 d V only where a response log-prob is needed; generation = forward over S - 1 positions (KV
cache) + R projections; rollout = reference (with projection) + critic + reward forwards; training = 3 x forward of
actor (with projection) and critic per episode per epoch. ppojax additionally recomputes the actor's log-probs in
the rollout and TRL projects all S positions onto the vocabulary; neither is counted.

    python benchmarks/vs_trl.py --job b --iterations 6          # job (b); --job a / both
    python benchmarks/vs_trl.py --tiny                          # smoke run, writes nothing unless --out is given
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _env

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = Path(__file__).parent / "results" / "vs_trl_cpu.json"
PROMPT_FILE = ROOT / "configs" / "prompts" / "sentiment.txt"

JOBS = {
    "a": dict(n_layer=12, n_head=12, n_embd=768, batch=16, query=64, response=24, epochs=4, minibatches=2),
    "b": dict(n_layer=4, n_head=4, n_embd=256, batch=32, query=32, response=24, epochs=4, minibatches=4),
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, batch=8, query=16, response=8, epochs=2, minibatches=1),
}
TARGETS = {"a": 2.0, "b": 3.5}  # wanted speed-up of ppojax over TRL (issue 7)
VOCAB = 50257
LR, ADAM_EPS, KL_COEF, VF_COEF, CLIP, TEMPERATURE = 1e-5, 1e-5, 0.05, 0.1, 0.2, 0.7


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--job", choices=("a", "b", "both"), default="b")
    p.add_argument("--iterations", type=int, default=None, help="PPO iterations per side (default: a 3, b 6)")
    p.add_argument("--tiny", action="store_true", help="smoke run on a tiny model; writes only if --out is given")
    p.add_argument("--out", type=Path, default=None, help=f"result JSON (default {DEFAULT_OUT}, none with --tiny)")
    p.add_argument("--sides", default="ppojax,trl", help="comma-separated subset of ppojax,trl")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu (default): TRL with use_cpu=True, fp32; cuda: TRL on the GPU (use_cpu=False, bf16 "
                        "autocast, tf32) and ppojax on jax's default backend (must be a GPU) with bf16 compute")
    p.add_argument("--table", type=Path, metavar="JSON", help="print the README table from a result JSON and exit")
    p.add_argument("--child", choices=("ppojax", "trl"), help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.out is None and not args.tiny:
        args.out = DEFAULT_OUT if args.device == "cpu" else DEFAULT_OUT.with_name(f"vs_trl_{args.device}.json")
    return args


# ----------------------------------------------------------------------------------------------------------------
# FLOPs


def job_flops(j: dict) -> dict:
    L, d, V = j["n_layer"], j["n_embd"], VOCAB
    B, P, R = j["batch"], j["query"], j["response"]
    S = P + R

    def trunk(s):
        return L * (24 * d * d * s + 2 * d * s * (s + 1))

    gen = B * (trunk(S - 1) + R * 2 * d * V)
    ref = B * (trunk(S) + R * 2 * d * V)
    value = B * (trunk(S) + R * 2 * d)
    reward = B * (trunk(S) + 2 * d)
    train = j["epochs"] * 3 * (ref + value)  # actor fwd (with projection) + critic fwd, x3 for fwd+bwd
    return {"generation": gen, "scoring": ref + value + reward, "update": train,
            "total": gen + ref + value + reward + train,
            "ppojax_extra_actor_recompute": ref, "params_per_layer_matmul": 12 * d * d}


# ----------------------------------------------------------------------------------------------------------------
# Shared setup


def build_checkpoint(j: dict, directory: str) -> None:
    """Random policy weights (seed 0) in transformers format + the reward head (seed 1) as a .npy."""
    import numpy as np
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=1024, n_embd=j["n_embd"], n_layer=j["n_layer"],
                                  n_head=j["n_head"], bos_token_id=50256, eos_token_id=50256)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(directory)
    rng = np.random.default_rng(1)
    head = (rng.standard_normal((1, j["n_embd"])) / np.sqrt(j["n_embd"] + 1)).astype(np.float32)
    np.save(os.path.join(directory, "reward_head.npy"), head)


def make_prompts(tok, n: int, length: int):
    """``n`` prompts of exactly ``length`` real tokens: consecutive windows of the prompt file's token stream."""
    import numpy as np

    text = PROMPT_FILE.read_text()
    ids = tok(text)["input_ids"]
    while len(ids) < n * length:
        ids = ids + ids
    return np.asarray(ids[: n * length], np.int64).reshape(n, length)


def matmul_peak_jax(n=2048, reps=5, dtype=None) -> float:
    import jax
    import jax.numpy as jnp

    dtype = jnp.float32 if dtype is None else dtype
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    f = jax.jit(jnp.dot)
    f(a, b).block_until_ready()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        ts.append(time.perf_counter() - t0)
    return 2 * n**3 / min(ts)


def matmul_peak_torch(n=2048, reps=5, device="cpu", dtype=None) -> float:
    import torch

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    torch.mm(a, b)
    sync()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync()
        ts.append(time.perf_counter() - t0)
    return 2 * n**3 / min(ts)


def summarize(iter_s: list, phases: dict, j: dict) -> dict:
    steady = iter_s[1:] if len(iter_s) > 1 else iter_s
    med = statistics.median(steady)
    out = {"first_iteration_s": iter_s[0], "iteration_median_s": med, "iterations_s": iter_s,
           "generated_tokens_per_s": j["batch"] * j["response"] / med}
    for name, ts in phases.items():
        st = ts[1:] if len(ts) > 1 else ts
        out[f"{name}_median_s"] = statistics.median(st) if st else None
        out[f"{name}_s"] = ts
    return out


# ----------------------------------------------------------------------------------------------------------------
# ppojax side


def ppojax_configs(j: dict, grad_accum_steps: int = 1):
    """ppojax's ``(PPOConfig, OptimizerConfig)`` for job ``j`` with the hyperparameters matched to TRL's (the module
    docstring lists them); shared by this script, ``gpu.py`` and ``profile_iteration.py``."""
    import ppojax
    from ppojax.rl.kl import KLControlConfig

    ppo = ppojax.PPOConfig(batch_size=j["batch"], minibatch_size=j["batch"] // j["minibatches"],
                           ppo_epochs=j["epochs"], response_length=j["response"], temperature=TEMPERATURE,
                           eos_token_id=None, vf_coef=VF_COEF, clip_eps=CLIP, value_clip_eps=CLIP,
                           gamma=1.0, lam=0.95, kl=KLControlConfig(kind="fixed", init_coef=KL_COEF))
    opt = ppojax.OptimizerConfig(learning_rate=LR, eps=ADAM_EPS, max_grad_norm=None,
                                 grad_accum_steps=grad_accum_steps)
    return ppo, opt


def run_ppojax(j: dict, ckpt: str, iterations: int, device: str = "cpu") -> dict:
    import numpy as np
    import jax
    import jax.numpy as jnp

    import ppojax

    if device == "cuda" and jax.default_backend() != "gpu":
        raise RuntimeError(f"--device cuda: jax's default backend is {jax.default_backend()!r}, not 'gpu' "
                           "(install jax[cuda12] on a machine with an NVIDIA GPU)")
    # On the GPU: bf16 compute with f32 params (as TRL's bf16 autocast), against a bf16 matmul peak.
    peak = matmul_peak_jax() if device == "cpu" else matmul_peak_jax(8192, dtype=jnp.bfloat16)
    tok = ppojax.load_tokenizer("gpt2")
    config, params = ppojax.load_pretrained(ckpt)
    if device == "cuda":
        config = config.replace(dtype="bfloat16")
    head = np.load(os.path.join(ckpt, "reward_head.npy"))  # [1, d], torch score.weight
    rm_params = ppojax.init_value_params(config, params)
    rm_params = {"transformer": rm_params["transformer"],
                 "head": {"kernel": jnp.asarray(head.T), "bias": jnp.zeros((1,), jnp.float32)}}
    reward = ppojax.rewards.reward_model(config, rm_params)
    ppo, opt = ppojax_configs(j)
    assert ppo.pad_token_id is None and tok.pad_token_id == config.vocab_size  # distinct pad = 50257
    state = ppojax.create_train_state(config, params, ppo=ppo, reward=reward, key=jax.random.key(0), optimizer=opt,
                                      total_iterations=iterations)
    prompts = make_prompts(tok, j["batch"] * iterations, j["query"]).astype(np.int32)

    iter_s, phases = [], {"rollout": [], "scoring": [], "update": []}
    for it in range(iterations):
        p = jnp.asarray(prompts[it * j["batch"]:(it + 1) * j["batch"]])
        m = jnp.ones_like(p)
        t0 = time.perf_counter()
        state, r = ppojax.rollout(state, p, m)
        jax.block_until_ready(r)
        t1 = time.perf_counter()
        scores = ppojax.score_rollout(state, r)
        jax.block_until_ready(scores)
        t2 = time.perf_counter()
        state, metrics = ppojax.update(state, r, scores, donate=True)  # in place, as the runner does
        jax.block_until_ready((state, metrics))
        t3 = time.perf_counter()
        assert int(r.mask.sum()) == j["batch"] * j["response"], "ppojax stopped early"
        phases["rollout"].append(t1 - t0)
        phases["scoring"].append(t2 - t1)
        phases["update"].append(t3 - t2)
        iter_s.append(t3 - t0)
        print(f"[ppojax] iteration {it}: {t3 - t0:.2f} s (rollout {t1 - t0:.2f}, score {t2 - t1:.2f}, "
              f"update {t3 - t2:.2f}); score {float(metrics['score_mean']):.3f} kl {float(metrics['kl']):.3f}",
              flush=True)

    # Generation alone: the rollout's sampling on the same shapes (not part of the timed iterations).
    p, m = jnp.asarray(prompts[: j["batch"]]), jnp.ones((j["batch"], j["query"]), jnp.int32)
    gen = lambda k: jax.block_until_ready(ppojax.generate(config, state.actor_params, p, m, jax.random.key(k),
                                                          max_new_tokens=j["response"], temperature=TEMPERATURE))
    gen(0)
    gts = []
    for k in range(3):
        t0 = time.perf_counter()
        gen(k + 1)
        gts.append(time.perf_counter() - t0)
    out = summarize(iter_s, phases, j)
    out["generation_median_s"] = statistics.median(gts)
    out["rollout_forwards_median_s"] = out["rollout_median_s"] - out["generation_median_s"]
    out["matmul_peak_flops"] = peak
    out["devices"] = [str(d) for d in jax.devices()]
    if device != "cpu":
        stats = jax.devices()[0].memory_stats() or {}
        out.update(device=device, device_kind=jax.devices()[0].device_kind,
                   precision="bf16 compute, f32 params; matmul peak: bf16 8192^3",
                   peak_device_mib=stats["peak_bytes_in_use"] / 2**20 if "peak_bytes_in_use" in stats else None)
    return out


# ----------------------------------------------------------------------------------------------------------------
# TRL side


def run_trl(j: dict, ckpt: str, iterations: int, device: str = "cpu") -> dict:
    if device == "cuda":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")  # ppojax (the tokenizer) imports jax: keep it off the GPU
        os.environ["ACCELERATE_MIXED_PRECISION"] = "bf16"  # PPOTrainer builds its own Accelerator(), which reads this
    import numpy as np
    import torch
    import transformers
    from datasets import Dataset
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as pt

    import ppojax

    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"--device cuda: torch {torch.__version__} sees no CUDA device")
    peak = matmul_peak_torch() if device == "cpu" else matmul_peak_torch(8192, device="cuda", dtype=torch.bfloat16)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)  # CUDA kernels run asynchronously
    tok = ppojax.load_tokenizer("gpt2")  # GPT2TokenizerFast from the BPE files, pad <|pad|> = 50257, left padding
    policy = transformers.GPT2LMHeadModel.from_pretrained(ckpt)
    ref = transformers.GPT2LMHeadModel.from_pretrained(ckpt)
    for m in (policy, ref):
        m.generation_config.eos_token_id = None  # no EOS stop: every response is `response` tokens
        m.generation_config.pad_token_id = tok.pad_token_id
    value = transformers.GPT2ForSequenceClassification.from_pretrained(ckpt, num_labels=1)
    rm = transformers.GPT2ForSequenceClassification.from_pretrained(ckpt, num_labels=1)
    head = torch.from_numpy(np.load(os.path.join(ckpt, "reward_head.npy")))
    with torch.no_grad():
        value.score.weight.zero_()  # ppojax's critic head starts at zero
        rm.score.weight.copy_(head)
    for m in (value, rm):
        m.config.pad_token_id = tok.pad_token_id

    prompts = make_prompts(tok, j["batch"] * iterations, j["query"])
    ds = Dataset.from_dict({"input_ids": prompts.tolist()})
    tmp = tempfile.mkdtemp()
    cfg = PPOConfig(
        output_dir=tmp, use_cpu=device == "cpu", bf16=device == "cuda", report_to="none", save_strategy="no",
        logging_steps=1000,
        # TRL 1.12: rollout batch = per_device_train_batch_size x gradient_accumulation_steps; each of the
        # num_mini_batches minibatches (batch / num_mini_batches episodes) is one optimizer step.
        per_device_train_batch_size=j["batch"], gradient_accumulation_steps=1,
        num_mini_batches=j["minibatches"], total_episodes=j["batch"] * iterations, num_ppo_epochs=j["epochs"],
        response_length=j["response"], temperature=TEMPERATURE, stop_token=None, missing_eos_penalty=None,
        local_rollout_forward_batch_size=j["batch"], num_sample_generations=0, learning_rate=LR,
        adam_epsilon=ADAM_EPS, kl_coef=KL_COEF, kl_estimator="k1", vf_coef=VF_COEF, cliprange=CLIP,
        cliprange_value=CLIP, gamma=1.0, lam=0.95, seed=0, dataloader_drop_last=True,
        **({"tf32": True} if device == "cuda" else {}),
    )

    timers = {"generation": 0.0, "scoring": 0.0}

    def timed(fn, name=None):
        def wrapper(*a, **k):
            key = name or ("scoring" if not torch.is_grad_enabled() else None)
            if key:
                sync()
            t0 = time.perf_counter()
            out = fn(*a, **k)
            if key:
                sync()
                timers[key] += time.perf_counter() - t0
            return out
        return wrapper

    pt.batch_generation = timed(pt.batch_generation, "generation")
    pt.forward = timed(pt.forward)
    pt.get_reward = timed(pt.get_reward)

    marks = []
    phases = {"generation": [], "scoring": [], "update": []}

    class Clock(transformers.TrainerCallback):
        def on_train_begin(self, *a, **k):
            marks.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            sync()
            now = time.perf_counter()
            it = now - marks[-1]
            marks.append(now)
            phases["generation"].append(timers["generation"])
            phases["scoring"].append(timers["scoring"])
            phases["update"].append(it - timers["generation"] - timers["scoring"])
            print(f"[trl] iteration {len(marks) - 2}: {it:.2f} s (generation {timers['generation']:.2f}, "
                  f"score {timers['scoring']:.2f}, update {phases['update'][-1]:.2f})", flush=True)
            timers["generation"] = timers["scoring"] = 0.0

    trainer = PPOTrainer(args=cfg, processing_class=tok, model=policy, ref_model=ref, reward_model=rm,
                         train_dataset=ds, value_model=value, eval_dataset=None, callbacks=[Clock()])
    trainer.train()
    iter_s = [b - a for a, b in zip(marks, marks[1:])]
    assert len(iter_s) == iterations, (len(iter_s), iterations)
    out = summarize(iter_s, phases, j)
    out["matmul_peak_flops"] = peak
    out["num_threads"] = torch.get_num_threads()
    if device != "cpu":
        out.update(device=device, device_name=torch.cuda.get_device_name(),
                   mixed_precision=str(trainer.accelerator.mixed_precision),
                   tf32=bool(torch.backends.cuda.matmul.allow_tf32),
                   precision="bf16 autocast (accelerate) on the prepared policy+value wrapper, i.e. the training "
                             "forward; generation and the no-grad ref/value/reward forwards call the unwrapped "
                             "modules (fp32 with tf32 matmuls); matmul peak: bf16 8192^3",
                   peak_device_mib=torch.cuda.max_memory_allocated() / 2**20)
    out["phase_note"] = ("generation = batch_generation; scoring = ref forward + value and reward get_reward under "
                         "no_grad; update = iteration - both (includes rewards/GAE/whitening, small)")
    return out


def child_main(args) -> None:
    j = JOBS["tiny" if args.tiny else args.job]
    others = _env.OtherLoad()
    t0 = time.time()
    fn = run_ppojax if args.child == "ppojax" else run_trl
    res = fn(j, args.ckpt, args.iterations, **({} if args.device == "cpu" else {"device": args.device}))
    res["wall_s"] = time.time() - t0
    res["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB
    res["other_processes_cores"] = others.cores()
    Path(args.child_out).write_text(json.dumps(res))


# ----------------------------------------------------------------------------------------------------------------
# Parent: one subprocess per side per job


def run_job(name: str, args) -> dict:
    j = JOBS["tiny" if args.tiny else name]
    iterations = args.iterations or (2 if args.tiny else {"a": 3, "b": 6}[name])
    flops = job_flops(j)
    res = {"job": name, "shape": j, "iterations": iterations, "flops_per_iteration": flops}
    with tempfile.TemporaryDirectory() as tmp:
        build_checkpoint(j, tmp)
        for side in args.sides.split(","):
            out = os.path.join(tmp, f"{side}.json")
            cmd = [sys.executable, __file__, "--child", side, "--job", name, "--iterations", str(iterations),
                   "--ckpt", tmp, "--child-out", out] + (["--tiny"] if args.tiny else []) \
                + (["--device", args.device] if args.device != "cpu" else [])
            print(f"== job {name}: {side} ({iterations} iterations)", flush=True)
            subprocess.run(cmd, check=True)
            r = json.loads(Path(out).read_text())
            r["achieved_flops"] = flops["total"] / r["iteration_median_s"]
            r["fraction_of_matmul_peak"] = r["achieved_flops"] / r["matmul_peak_flops"]
            r["trustworthy"] = r["other_processes_cores"] < 0.25
            res[side] = r
    if "ppojax" in res and "trl" in res:
        res["speedup_ppojax_over_trl"] = res["trl"]["iteration_median_s"] / res["ppojax"]["iteration_median_s"]
        res["ratio_ppojax_over_trl"] = {
            "iteration_time": res["ppojax"]["iteration_median_s"] / res["trl"]["iteration_median_s"],
            "tokens_per_s": res["ppojax"]["generated_tokens_per_s"] / res["trl"]["generated_tokens_per_s"],
            "peak_rss": res["ppojax"]["peak_rss_mib"] / res["trl"]["peak_rss_mib"],
            "update_time": res["ppojax"]["update_median_s"] / res["trl"]["update_median_s"],
        }
        res["target_speedup"] = TARGETS.get(name)
        res["trustworthy"] = res["ppojax"]["trustworthy"] and res["trl"]["trustworthy"]
    return res


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        return child_main(args)
    if args.table is not None:
        print(markdown_table(json.loads(args.table.read_text())))
        return None
    started = _env.now_utc()
    load_before = _env.load_sample()
    _env.warn_if_busy(load_before)
    names = ["b", "a"] if args.job == "both" else [args.job]
    if args.tiny:
        names = names[:1]
    result = {"benchmark": "vs_trl", "date": started, "tiny": args.tiny, "jobs": {},
              "machine": _env.machine_info(), "versions": _env.versions(_env.DEFAULT_PACKAGES + ("trl", "accelerate")),
              "load_before": load_before,
              "method": __doc__.split("\n\n", 1)[1].split("    python")[0].strip()}
    if args.out is not None and args.out.exists():  # keep the other job's results when running one job
        try:
            old = json.loads(args.out.read_text())
            result["jobs"].update({k: v for k, v in old.get("jobs", {}).items() if k not in names})
        except (json.JSONDecodeError, OSError):
            pass
    for name in names:
        result["jobs"][name] = run_job(name, args)
        print_summary(result["jobs"][name])
        result["load_after"] = _env.load_sample()
        if args.out is not None:
            print(f"wrote {_env.write_json(args.out, result)}")
    return result


def print_summary(r: dict) -> None:
    for side in ("ppojax", "trl"):
        if side in r:
            s = r[side]
            print(f"{r['job']} {side:7} median {s['iteration_median_s']:.2f} s/it, first {s['first_iteration_s']:.2f} s,"
                  f" {s['generated_tokens_per_s']:.1f} tok/s, {s['achieved_flops'] / 1e9:.1f} GFLOP/s "
                  f"({100 * s['fraction_of_matmul_peak']:.0f}% of matmul peak {s['matmul_peak_flops'] / 1e9:.0f}), "
                  f"RSS {s['peak_rss_mib']:.0f} MiB, others {s['other_processes_cores']} cores")
    if "speedup_ppojax_over_trl" in r:
        print(f"{r['job']}: ppojax {r['speedup_ppojax_over_trl']:.2f}x faster than TRL (target {r['target_speedup']})"
              + ("" if r["trustworthy"] else " -- NOT TRUSTWORTHY (busy machine)"))


def markdown_table(res: dict) -> str:
    m = res["machine"]
    lines = [f"{m['cpu_model']}, {m['cores']} cores, {m['ram_gib']} GiB; {res['date']}; "
             f"trl {res['versions'].get('trl')}, torch {res['versions'].get('torch')}, jax {res['versions'].get('jax')}",
             "",
             "| job | side | s/iteration (median) | first iteration s | generation s | scoring s | update s | "
             "tokens/s | GFLOP/s (% matmul peak) | peak RSS MiB | other load (cores) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name in ("b", "a"):
        r = res["jobs"].get(name)
        if not r:
            continue
        for side in ("ppojax", "trl"):
            s = r.get(side)
            if not s:
                continue
            gen = s.get("generation_median_s")
            score = s.get("scoring_median_s")
            if side == "ppojax":
                score_txt = f"{s['rollout_forwards_median_s']:.2f} + {score:.2f}"
            else:
                score_txt = f"{score:.2f}"
            lines.append(
                f"| {name} | {side} | {s['iteration_median_s']:.2f} | {s['first_iteration_s']:.1f} | {gen:.2f} | "
                f"{score_txt} | {s['update_median_s']:.2f} | {s['generated_tokens_per_s']:.1f} | "
                f"{s['achieved_flops'] / 1e9:.1f} ({100 * s['fraction_of_matmul_peak']:.0f}%) | "
                f"{s['peak_rss_mib']:.0f} | {s['other_processes_cores']:.2f}"
                + ("" if s["trustworthy"] else " (busy)") + " |")
    lines.append("")
    for name in ("b", "a"):
        r = res["jobs"].get(name)
        if r and "speedup_ppojax_over_trl" in r:
            q = r["ratio_ppojax_over_trl"]
            lines.append(f"- job ({name}), {r['iterations']} iterations: ppojax/TRL time per iteration "
                         f"**{q['iteration_time']:.2f}** (speed-up {r['speedup_ppojax_over_trl']:.2f}x, target "
                         f">= {r['target_speedup']}x), tokens/s {q['tokens_per_s']:.2f}, peak RSS {q['peak_rss']:.2f}, "
                         f"update time {q['update_time']:.2f}"
                         + ("" if r["trustworthy"] else "; **busy machine: not trustworthy**") + ".")
    return "\n".join(lines)


if __name__ == "__main__":
    main(sys.argv[1:])
