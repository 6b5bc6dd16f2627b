"""Decode throughput: ``ppojax.generate`` against transformers' PyTorch ``GPT2LMHeadModel.generate`` on the CPU.

Both sample from the same random GPT-2 weights (built in torch, saved with ``save_pretrained``, read back with
``ppojax.load_pretrained``), at temperature 1 with no top-k/top-p filtering and no EOS stop, so both produce exactly
``--new-tokens`` tokens per row. Torch decodes with its KV cache (``use_cache=True``).

Timing: one warm-up call each (for ppojax this is the XLA compile, reported on its own), then ``--reps`` calls of
each, interleaved (jax, torch, jax, torch, ...) so that a change in machine load hits both sides alike; the median is
reported. The prefill/decode split comes from a second pair of runs with one new token: ``prefill ~= t(1)`` and
``decode step ~= (t(n) - t(1)) / (n - 1)``.

    python benchmarks/decode.py                 # GPT-2 small shape, writes benchmarks/results/decode_cpu.json
    python benchmarks/decode.py --tiny          # smoke run on a tiny model, writes nothing unless --out is given
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import _env

DEFAULT_OUT = Path(__file__).parent / "results" / "decode_cpu.json"

GPT2_SMALL = dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12)
TINY = dict(vocab_size=1000, n_positions=128, n_embd=64, n_layer=2, n_head=4)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--reps", type=int, default=5, help="timed calls per side (median reported); at least 5")
    p.add_argument("--tiny", action="store_true", help="smoke run on a tiny model; writes only if --out is given")
    p.add_argument("--single-thread", action="store_true",
                   help="one thread on each side (torch.set_num_threads(1), XLA without its Eigen pool): less "
                        "sensitive to a shared machine than the default; writes only if --out is given")
    p.add_argument("--out", type=Path, default=None, help=f"result JSON (default {DEFAULT_OUT}, none with --tiny)")
    p.add_argument("--table", type=Path, metavar="JSON",
                   help="print the README's markdown table from a result JSON and exit (runs nothing)")
    args = p.parse_args(argv)
    if args.reps < 5:
        p.error("--reps must be at least 5")
    if args.new_tokens < 2:
        p.error("--new-tokens must be at least 2 (the prefill/decode split needs a decode step)")
    if args.out is None and not (args.tiny or args.single_thread):
        args.out = DEFAULT_OUT
    return args


def build_models(shape: dict, tmp: str):
    """A random torch GPT-2 and the same weights as a ppojax ``(config, params)``."""
    import torch
    import transformers

    import ppojax

    torch.manual_seed(0)
    hf_config = transformers.GPT2Config(
        **{"vocab_size": shape["vocab_size"], "n_positions": shape["n_positions"], "n_embd": shape["n_embd"],
           "n_layer": shape["n_layer"], "n_head": shape["n_head"]},
        bos_token_id=shape["vocab_size"] - 1, eos_token_id=shape["vocab_size"] - 1,  # GPT-2's 50256 in the full vocab
    )
    model = transformers.GPT2LMHeadModel(hf_config).eval()
    model.save_pretrained(tmp)
    config, params = ppojax.load_pretrained(tmp)
    # No EOS stop on the torch side either: both sides must generate exactly the requested number of tokens.
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model, config, params


def time_call(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    if args.table is not None:
        print(markdown_table(json.loads(args.table.read_text())))
        return None
    started = _env.now_utc()
    load_before = _env.load_sample()
    _env.warn_if_busy(load_before)
    others = _env.OtherLoad()

    if args.single_thread:  # read by XLA when jax initialises its backend, so set before the import
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"
                                   " intra_op_parallelism_threads=1").strip()
    import jax
    import torch

    import ppojax

    if args.single_thread:
        torch.set_num_threads(1)

    shape = TINY if args.tiny else GPT2_SMALL
    b, p, n = args.batch, args.prompt_len, args.new_tokens
    with tempfile.TemporaryDirectory() as tmp:
        model, config, params = build_models(shape, tmp)

    rng = np.random.default_rng(0)
    prompt_np = rng.integers(0, shape["vocab_size"], size=(b, p), dtype=np.int32)  # full-length: no padding
    mask_np = np.ones((b, p), np.int32)
    prompt_jax, mask_jax = jax.numpy.asarray(prompt_np), jax.numpy.asarray(mask_np)
    prompt_pt, mask_pt = torch.from_numpy(prompt_np.astype(np.int64)), torch.from_numpy(mask_np.astype(np.int64))
    base_key = jax.random.key(0)
    rep = iter(range(1_000_000))

    def run_jax(new_tokens):
        # A fresh key per call (a traced argument: no recompile), as a training loop would pass.
        out = ppojax.generate(config, params, prompt_jax, mask_jax, jax.random.fold_in(base_key, next(rep)),
                              max_new_tokens=new_tokens, temperature=1.0)
        jax.block_until_ready(out)
        return out

    def run_torch(new_tokens):
        with torch.inference_mode():
            return model.generate(input_ids=prompt_pt, attention_mask=mask_pt, do_sample=True, temperature=1.0,
                                  top_k=0, top_p=1.0, max_new_tokens=new_tokens, use_cache=True)

    # Warm-up. The first ppojax call per shape traces and compiles; the torch warm-up pays lazy init.
    t_compile = {k: time_call(lambda: run_jax(k)) for k in (n, 1)}
    out = run_jax(n)
    assert out.tokens.shape == (b, n) and int(out.lengths.min()) == n, "ppojax stopped early"
    t_torch_warm = time_call(lambda: run_torch(n))
    assert run_torch(n).shape == (b, p + n), "torch stopped early"
    run_torch(1)

    times = {("jax", k): [] for k in (n, 1)} | {("torch", k): [] for k in (n, 1)}
    for _ in range(args.reps):
        for k in (n, 1):
            times["jax", k].append(time_call(lambda: run_jax(k)))
            times["torch", k].append(time_call(lambda: run_torch(k)))
    med = {key: statistics.median(v) for key, v in times.items()}
    record = _env.run_record(load_before, others.cores())

    def side(name, extra):
        total, prefill = med[name, n], med[name, 1]
        return {
            "tokens_per_s": b * n / total,
            "median_s": total,
            "time_per_step_ms": 1e3 * total / n,
            "prefill_ms": 1e3 * prefill,
            "decode_step_ms": 1e3 * (total - prefill) / (n - 1),
            "decode_tokens_per_s": b * (n - 1) / (total - prefill),
            "min_s": min(times[name, n]),
            "times_s": times[name, n],
            "times_1_token_s": times[name, 1],
            **extra,
        }

    jax_res = side("jax", {
        "first_call_s": t_compile[n],
        "compile_s": t_compile[n] - med["jax", n],  # first call minus a warm call: trace + lower + compile
        "first_call_1_token_s": t_compile[1],
        "devices": [str(d) for d in jax.devices()],
    })
    torch_res = side("torch", {"first_call_s": t_torch_warm, "num_threads": torch.get_num_threads()})
    result = {
        "benchmark": "decode",
        "date": started,
        "tiny": args.tiny,
        "model": shape,
        "batch": b,
        "prompt_len": p,
        "new_tokens": n,
        "reps": args.reps,
        "threads": "single" if args.single_thread else "default",
        "sampling": {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "eos": None},
        "method": "median of interleaved calls after one warm-up; prefill_ms = median of 1-new-token calls; "
                  "decode_step_ms = (median(n) - median(1)) / (n - 1); compile_s = first call - median call",
        "ppojax": jax_res,
        "torch": torch_res,
        "ratio_tokens_per_s_ppojax_over_torch": jax_res["tokens_per_s"] / torch_res["tokens_per_s"],
        **record,
    }
    print_summary(result)
    if args.out is not None:
        print(f"wrote {_env.write_json(args.out, result)}")
    return result


def print_summary(r: dict) -> None:
    m = r["model"]
    print(f"decode: GPT-2 {m['n_layer']}L/{m['n_embd']}d/vocab {m['vocab_size']}, batch {r['batch']}, "
          f"prompt {r['prompt_len']}, {r['new_tokens']} new tokens, median of {r['reps']}")
    print(f"machine: {r['machine']['cpu_model']}, {r['machine']['cores']} cores; "
          f"load {r['load_before']['load_1min']} before, {r['load_after']['load_1min']} after (itself included); "
          f"other processes kept {r.get('other_processes_cores', 'n/a')} cores busy during the run")
    print(f"{'':8}{'tok/s':>9}{'median s':>10}{'min s':>8}{'ms/step':>9}{'prefill ms':>12}{'decode ms/step':>16}"
          f"{'first call s':>14}")
    for name in ("ppojax", "torch"):
        s = r[name]
        print(f"{name:8}{s['tokens_per_s']:9.1f}{s['median_s']:10.2f}{s['min_s']:8.2f}{s['time_per_step_ms']:9.2f}"
              f"{s['prefill_ms']:12.2f}{s['decode_step_ms']:16.2f}{s['first_call_s']:14.2f}")
    print(f"ppojax / torch tokens/s: {r['ratio_tokens_per_s_ppojax_over_torch']:.2f}; "
          f"ppojax compile ~{r['ppojax']['compile_s']:.2f} s; torch threads {r['torch']['num_threads']}")
    if not r["trustworthy"]:
        print("WARNING: the machine was busy (load before, or other processes during the run); rerun when quiet.")


def markdown_table(r: dict) -> str:
    m, mach, t = r["model"], r["machine"], r["torch"]
    lines = [
        f"{mach['cpu_model']}, {mach['cores']} cores, {mach['ram_gib']} GiB; {r['date']}; "
        f"GPT-2 {m['n_layer']}L/{m['n_embd']}d, batch {r['batch']}, prompt {r['prompt_len']}, "
        f"{r['new_tokens']} new tokens, median of {r['reps']}; torch threads {t['num_threads']}; "
        f"1-min load {r['load_before']['load_1min']} before / {r['load_after']['load_1min']} after"
        + ("" if r["trustworthy"] else " (**busy machine: not trustworthy**)"),
        "",
        "| | tokens/s | ms/step | prefill ms | decode ms/step | first call s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in ("ppojax", "torch"):
        s = r[name]
        lines.append(f"| {name} | {s['tokens_per_s']:.1f} | {s['time_per_step_ms']:.1f} | {s['prefill_ms']:.0f} | "
                     f"{s['decode_step_ms']:.1f} | {s['first_call_s']:.1f} |")
    lines += ["", f"ppojax / torch tokens/s: **{r['ratio_tokens_per_s_ppojax_over_torch']:.2f}**; "
                  f"ppojax compile ~{r['ppojax']['compile_s']:.1f} s."]
    return "\n".join(lines)


if __name__ == "__main__":
    main(sys.argv[1:])
