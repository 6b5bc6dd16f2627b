"""Sweep throughput: R runs in one program (``ppojax.train.sweep``) against the same R runs one after another.

    python benchmarks/sweep.py                                   # tiny and offline configs, R in 1, 4, 16 (CPU)
    python benchmarks/sweep.py --configs tiny --runs 1,4 --iterations 3 --out /tmp/sweep.json

For each config and R, both sides run the same R runs (seeds 0..R-1) for ``--iterations`` iterations, alternating
(sweep, sequential, sweep, sequential... over ``--repeats``), in this process:

- **sweep**: the runs stacked in one group (``build_groups``), one compiled program, every iteration advancing all R.
- **sequential**: run after run through ``ppojax.train.loop.train``, each preceded by ``jax.clear_caches()`` so that it
  compiles its program anew, as R separate processes would (their Python start-up is not counted, which favours
  the sequential side).

Reported per side: the wall time with compilation (the whole thing) and without (iterations after each program's
first), and throughput in run-iterations per second; the ratio sweep / sequential of both, median over repeats with
the range. Memory: the peak resident size of a child process running the sweep at R and at 1, whose difference per
run gives the largest R that fits in the machine's RAM (an extrapolation, labelled as such). Results go to
``benchmarks/results/sweep_<device>.json`` with the machine and versions; a busy machine (other processes' CPU time,
``_env.OtherLoad``) is recorded and refuses the write unless ``--force``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import _env  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CONFIGS = {"tiny": REPO / "configs" / "tiny.yaml", "offline": REPO / "configs" / "offline.yaml"}
BUSY_CORES = 0.25  # other processes keeping more than this many cores busy make the timings untrustworthy


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="tiny,offline", help="comma-separated: tiny, offline")
    p.add_argument("--runs", default="1,4,16", help="comma-separated R values")
    p.add_argument("--iterations", type=int, default=4, help="iterations per run (the first one compiles)")
    p.add_argument("--repeats", type=int, default=2, help="alternating repeats of both sides")
    p.add_argument("--out", default=None, help="output JSON (default benchmarks/results/sweep_<device>.json)")
    p.add_argument("--force", action="store_true", help="write results even if the machine was busy")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory child processes")
    p.add_argument("--memory-only", action="store_true",
                   help="re-measure only the memory of --configs at the largest of --runs, into the existing --out")
    p.add_argument("--memory-child", nargs=2, metavar=("CONFIG", "R"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _data(config_path: Path, iterations: int) -> dict:
    from ppojax.io import configlib

    data = configlib.load_yaml(config_path)
    data["iterations"] = iterations
    data.setdefault("logging", {})["samples_every"] = 0
    return data


def time_sweep(config_path: Path, R: int, iterations: int, *, width="auto") -> dict:
    """Wall time of R runs stacked in one program: total, and the iterations after the first (compiled).

    ``width``: runs per vmap on a device (``build_groups``): 'auto' is the device's default (1 on a CPU, all R on
    an accelerator); None vmaps all R anywhere (``gpu.py --dry-run`` runs the GPU's program on a CPU)."""
    import jax

    from ppojax.train import loop
    from ppojax.train import sweep as sw
    from ppojax.train.config import ExperimentConfig

    jax.clear_caches()
    t0 = time.perf_counter()
    runs = sw.plan_runs(_data(config_path, iterations), ExperimentConfig, list(range(R)), {})
    (group,) = sw.build_groups(runs, config_path.parent, log=lambda m: None, width=width)
    t_built = time.perf_counter()
    steps = []

    def step(group, it):
        group.step(it)  # pulls the metrics to the host: the iteration is finished
        return group, {}, None  # the loop adds the iteration's wall time

    # The library's loop with the sweep's step over the one group (as ppojax.train.sweep_job does over its groups).
    loop.train(group, step=step, iterations=iterations, check=None,
               callbacks=[lambda info: steps.append(info.metrics["time_s"])])
    total = time.perf_counter() - t0
    return {"total_s": total, "build_s": t_built - t0, "steps_s": steps, "steady_s": sum(steps[1:]),
            **state_bytes(group)}


def state_bytes(group) -> dict:
    """Exact bytes of the group's state: those held per run (the fields with a run axis, divided by the number of
    stacked runs) and those held once for all runs (a shared reference policy and reward model)."""
    import jax

    stacked = group.n + group.pad
    per_run = shared = 0
    for name, axis in group.axes.field_axes().items():
        nbytes = sum(x.nbytes for x in jax.tree.leaves(getattr(group.state, name)))
        if axis is None:
            shared += nbytes
        else:
            per_run += nbytes // stacked
    return {"state_bytes_per_run": per_run, "state_bytes_shared": shared}


def time_sequential(config_path: Path, R: int, iterations: int) -> dict:
    """The same R runs one after another, each compiling its own program."""
    import jax

    from ppojax.io.data import PromptLoader
    from ppojax.io.tokenizer import load_tokenizer
    from ppojax.train import loop
    from ppojax.train import run as runner
    from ppojax.train import sweep as sw
    from ppojax.train.build import create_state
    from ppojax.train.config import ExperimentConfig

    runs = sw.plan_runs(_data(config_path, iterations), ExperimentConfig, list(range(R)), {})
    t0 = time.perf_counter()
    steady = 0.0
    per_run = []
    for run in runs:
        jax.clear_caches()
        t_run = time.perf_counter()
        cfg = run.config
        tok = load_tokenizer(cfg.tokenizer)
        _, ids, mask = runner.load_prompts(cfg, config_path.parent, tok)
        model_config, params = runner.build_model(cfg)
        reward, host_reward = runner.build_reward(cfg, tok, model_config, config_path.parent)
        state = create_state(cfg, model_config, params, reward)
        loader = PromptLoader(ids, mask, cfg.ppo.prompts_per_iteration, cfg.seed, cfg.prompts.shuffle)
        times = []
        loop.train(state, loader, iterations=iterations, host_reward=host_reward, donate=True, check=None,
                   callbacks=[lambda info: times.append(info.metrics["time_s"])])  # metrics pulled to the host
        steady += sum(times[1:])
        per_run.append(time.perf_counter() - t_run)
    return {"total_s": time.perf_counter() - t0, "steady_s": steady, "per_run_s": per_run}


def _median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def summarise(R: int, iterations: int, sweeps: list[dict], seqs: list[dict]) -> dict:
    """Medians and ranges of both sides and of their paired ratios (sequential time / sweep time = the sweep's
    throughput gain), with and without compilation."""
    out = {"R": R, "iterations": iterations, "sweep": sweeps, "sequential": seqs}
    for key, label in (("total_s", "compile_included"), ("steady_s", "compile_excluded")):
        ratios = [q[key] / s[key] for s, q in zip(sweeps, seqs) if s[key] > 0]
        out[label] = {
            "sweep_s_median": _median([s[key] for s in sweeps]),
            "sequential_s_median": _median([q[key] for q in seqs]),
            "speedup_median": _median(ratios) if ratios else None,
            "speedup_range": [min(ratios), max(ratios)] if ratios else None,
            "sweep_run_iterations_per_s": (R * (iterations - (key == "steady_s"))) / _median([s[key] for s in sweeps])
            if _median([s[key] for s in sweeps]) > 0 else None,
        }
    return out


def memory_child(config: str, R: int) -> None:
    """In a child process: build and run 2 iterations of the sweep, print the peak RSS in bytes."""
    import resource

    res = time_sweep(CONFIGS[config], R, 2)
    print(json.dumps({"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "state_bytes_per_run": res["state_bytes_per_run"],
                      "state_bytes_shared": res["state_bytes_shared"]}))


def peak_memory(config: str, R: int) -> int:
    proc = subprocess.run([sys.executable, __file__, "--memory-child", config, str(R)], capture_output=True,
                          text=True, cwd=REPO, timeout=3600)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def memory_limit_bytes() -> float:
    """The RAM this process may use: the cgroup's limit when there is one (a container's 24 GiB), else the host's."""
    try:
        text = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if text != "max":
            return float(text)
    except OSError:
        pass
    return (_env.machine_info().get("ram_gib") or 0) * 2**30


def largest_r(child_1: dict, child_r: dict, R: int, ram_bytes: float) -> dict:
    """The largest R whose state fits beside the measured peak at R: ``peak(R) + (R' - R) * per_run <= RAM``, with
    ``per_run`` the larger of the exact per-run state bytes and the per-run growth of peak RSS from 1 to R (the
    growth is below the RSS's resolution for tiny models, whose peak is the process's libraries and compiler)."""
    mem_1, mem_r = child_1["peak_rss_bytes"], child_r["peak_rss_bytes"]
    growth = (mem_r - mem_1) / max(R - 1, 1)
    per_run = max(child_r["state_bytes_per_run"], growth, 1)
    return {"peak_rss_bytes_R1": mem_1, f"peak_rss_bytes_R{R}": mem_r, "peak_rss_growth_per_run_bytes": growth,
            "state_bytes_per_run": child_r["state_bytes_per_run"], "state_bytes_shared": child_r["state_bytes_shared"],
            "largest_R_that_fits": int(R + (ram_bytes - mem_r) // per_run),
            "method": f"peak RSS measured at R=1 and R={R}; beyond R={R}, each run adds max(its exact state bytes, "
                      "the measured RSS growth per run): an estimate, not run at that R (with --vmap-width 1, the "
                      "CPU default, activations do not grow with R)"}


def memory_only(args) -> int:
    """Replace the memory entries of an existing result (its timings untouched), recording when and how busy."""
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / "sweep_cpu.json"
    results = json.loads(out.read_text())
    r_max = max(int(r) for r in args.runs.split(","))
    load = _env.OtherLoad()
    for name in (c.strip() for c in args.configs.split(",") if c.strip()):
        results["configs"][name]["memory"] = {**largest_r(peak_memory(name, 1), peak_memory(name, r_max), r_max,
                                                          memory_limit_bytes()), "measured": _env.now_utc()}
    results["memory_other_processes_cores"] = load.cores()
    _env.write_json(out, results)
    print(json.dumps({n: c["memory"] for n, c in results["configs"].items()}, indent=1))
    print(f"wrote {out}")
    return 0


def main(argv=None):
    args = parse_args(argv)
    if args.memory_child:
        return memory_child(args.memory_child[0], int(args.memory_child[1]))
    if args.memory_only:
        return memory_only(args)
    import jax

    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    Rs = [int(r) for r in args.runs.split(",")]
    device = jax.devices()[0]
    results = {"benchmark": "sweep", "machine": _env.machine_info(), "versions": _env.versions(),
               "date": _env.now_utc(), "device": device.device_kind, "iterations": args.iterations,
               "repeats": args.repeats, "configs": {}}
    load = _env.OtherLoad()
    for name in configs:
        results["configs"][name] = {"runs": []}
        for R in Rs:
            sweeps, seqs = [], []
            for rep in range(args.repeats):  # alternate the sides: a slow spell hits both
                sweeps.append(time_sweep(CONFIGS[name], R, args.iterations))
                seqs.append(time_sequential(CONFIGS[name], R, args.iterations))
                print(f"[{name} R={R} repeat {rep}] sweep {sweeps[-1]['total_s']:.1f} s, sequential "
                      f"{seqs[-1]['total_s']:.1f} s", flush=True)
            results["configs"][name]["runs"].append(summarise(R, args.iterations, sweeps, seqs))
        if not args.no_memory and len(Rs) > 1:
            r_max = max(Rs)
            results["configs"][name]["memory"] = largest_r(peak_memory(name, 1), peak_memory(name, r_max), r_max,
                                                           memory_limit_bytes())
    other = load.cores()
    results["other_processes_cores"] = other
    results["busy"] = other > BUSY_CORES
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / (
        f"sweep_{'cpu' if device.platform == 'cpu' else device.device_kind.replace(' ', '_').lower()}.json")
    print(json.dumps({k: v for k, v in results.items() if k != "configs"}, indent=1))
    for name, res in results["configs"].items():
        for row in res["runs"]:
            ci, ce = row["compile_included"], row["compile_excluded"]
            print(f"{name} R={row['R']}: speedup {ci['speedup_median']:.2f}x with compilation "
                  f"(range {ci['speedup_range'][0]:.2f}-{ci['speedup_range'][1]:.2f}), "
                  f"{ce['speedup_median']:.2f}x without")
    if results["busy"] and not args.force:
        print(f"not writing {out}: other processes kept {other} cores busy (pass --force to write anyway)",
              file=sys.stderr)
        return 1
    _env.write_json(out, results)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
