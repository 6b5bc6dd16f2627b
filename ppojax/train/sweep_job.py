"""The sweep job behind ``experiments/sweep.py``: seeds x grids in one program per group, with a run directory.

    python experiments/sweep.py --config CONFIG [--seeds N | --seeds 3,7,11] [--grid a.b=v1,v2,...]...
                                [--iterations N] [--run-dir DIR] [--set a.b=value]...

The run directory (default ``runs/sweep-<config name>``) gets ``metrics.jsonl`` (one object per run and iteration:
``run``, ``seed``, every grid field under its dotted name, ``iteration`` and the iteration's metrics),
``summary.md`` (per grid point: the final score as mean +- 95% CI over seeds, KL, entropy, time), ``sweep.png``
(curves per grid point with a band over seeds), ``sweep.json`` (the specification) and ``checkpoints/`` (one
per group; rerunning the same command resumes exactly; SIGTERM saves first). Bad input is one line and exit code 2,
before anything compiles; another job holding the directory is exit 2 too.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "offline.yaml"
FINAL_WINDOW = 5  # iterations averaged into a run's final score (one iteration's score is noisy)


class SweepRunError(Exception):
    """An input problem: one line, exit code 2."""


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="sweep.py", description="Seeds x hyperparameter grids, one compiled program per "
                                "group of runs that differ only in array hyperparameters.")
    p.add_argument("--config", type=str, default=None, help="YAML config (default: configs/offline.yaml)")
    p.add_argument("--seeds", type=str, default=None, help="N (seeds 0..N-1) or a list 3,7,11 (default: the config's)")
    p.add_argument("--grid", action="append", default=[], metavar="a.b=v1,v2,...",
                   help="a field and its values; several --grid flags make a Cartesian product")
    p.add_argument("--iterations", type=int, default=None, help="iterations of every run")
    p.add_argument("--run-dir", type=str, default=None, help="where the sweep writes (default runs/sweep-<config>)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="a.b=value",
                   help="override a config field of every run (repeatable)")
    p.add_argument("--vmap-width", type=str, default="auto", metavar="auto|all|N",
                   help="runs batched per vmap on a device: all of them, N, or auto (1 on CPUs, where batching gains "
                        "little and width 1 keeps every run bit-identical to the single run; all elsewhere)")
    return p.parse_args(argv)


def _width(text: str):
    if text == "auto":
        return "auto"
    if text == "all":
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise SweepRunError(f"--vmap-width {text!r}: expected auto, all or a positive int")
    return value


def _spec(args, data) -> dict:
    return {"config": data, "seeds": args.seeds, "grid": list(args.grid)}


def _rows_upto(path: Path, last: int) -> list[dict]:
    """The metrics rows with ``iteration <= last`` (a torn last line is dropped)."""
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and row.get("iteration", last + 1) <= last:
                rows.append(row)
    return rows


def run(args: argparse.Namespace) -> int:
    from ppojax.io import configlib
    from ppojax.train import sweep as sw
    from ppojax.train.config import ExperimentConfig

    path = Path(args.config) if args.config else DEFAULT_CONFIG
    if not path.exists():
        raise SweepRunError(f"config file {path} does not exist")
    try:
        data = configlib.load_yaml(path)
        overrides = list(args.overrides) + ([f"iterations={args.iterations}"] if args.iterations is not None else [])
        data = configlib.apply_overrides(data, overrides, ExperimentConfig)
        base = configlib.from_dict(ExperimentConfig, data)
        seeds = sw.parse_seeds(args.seeds, base.seed)
        grid = sw.parse_grid(args.grid, ExperimentConfig)
        runs = sw.plan_runs(data, ExperimentConfig, seeds, grid)
        args.width = _width(args.vmap_width)
    except (configlib.ConfigError, sw.SweepError, ValueError) as e:
        raise SweepRunError(f"config {path}: {e}") from None
    run_dir = (Path(args.run_dir) if args.run_dir else REPO_ROOT / "runs" / f"sweep-{path.stem}").expanduser().resolve()

    from ppojax.io.atomic import atomic_write_json, atomic_write_text
    from ppojax.io.lock import DirectoryLock, LockError

    lock = DirectoryLock(run_dir)
    try:
        lock.acquire()
    except LockError as e:
        raise SweepRunError(str(e)) from None
    except OSError as e:
        raise SweepRunError(f"run directory {run_dir} is not writable: {e}") from None
    try:
        return _run_locked(args, path, data, base, runs, seeds, grid, run_dir, atomic_write_json, atomic_write_text)
    finally:
        lock.release()


def _run_locked(args, path, data, base, runs, seeds, grid, run_dir, atomic_write_json, atomic_write_text) -> int:
    import jax
    import numpy as np

    from ppojax.io.checkpoint import Checkpointer
    from ppojax.rl.hparams import is_array_path
    from ppojax.rl.iteration import check_metrics
    from ppojax.train import sweep as sw

    spec = _spec(args, {k: v for k, v in data.items() if k != "iterations"})
    spec_file = run_dir / "sweep.json"
    ckpt_dir = run_dir / "checkpoints"
    resuming = ckpt_dir.exists() and any(ckpt_dir.iterdir())
    if resuming:
        saved = json.loads(spec_file.read_text()) if spec_file.exists() else None
        if saved != json.loads(json.dumps(spec)):
            raise SweepRunError(f"{run_dir} holds another sweep's checkpoints (different config, seeds or grid); "
                                "rerun its own command to resume it, or pass a new --run-dir")

    groups_of = sw.group_runs(runs)
    splitting = sorted({k for k in grid if not is_array_path(k)})
    print(f"[sweep] {len(runs)} runs ({len(seeds)} seeds x {len(runs) // len(seeds)} grid points) in "
          f"{len(groups_of)} program(s)" + (f": {', '.join(splitting)} change the program, so each of their values "
                                            "compiles its own" if splitting else ""), file=sys.stderr, flush=True)
    groups = sw.build_groups(runs, path.resolve().parent, log=lambda m: print(m, file=sys.stderr, flush=True),
                             width=args.width)

    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(spec_file, spec)
    ckpts = [Checkpointer(ckpt_dir / f"group-{g}", keep=base.checkpoint.keep) for g in range(len(groups))]
    start = 0
    if resuming:
        steps = [c.latest_step() for c in ckpts]
        if any(s is None for s in steps) or len(set(steps)) != 1:
            raise SweepRunError(f"{ckpt_dir}: the groups' checkpoints disagree ({steps}); move checkpoints/ aside to "
                                "start over")
        start = steps[0]
        for group, ckpt in zip(groups, ckpts):
            _, restored, _ = ckpt.restore(_arrays(group))
            group.state = group.state.replace(**restored)
        print(f"[sweep] resuming {run_dir} from iteration {start}", file=sys.stderr, flush=True)
    metrics_file = run_dir / "metrics.jsonl"
    rows = _rows_upto(metrics_file, start)
    atomic_write_text(metrics_file, "".join(json.dumps(r) + "\n" for r in rows))

    stop = {"signal": None}

    def handler(signum, frame):
        if stop["signal"] is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop["signal"] = signum

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    from tqdm import tqdm

    total = base.iterations
    bar = tqdm(total=total, initial=start, desc="sweep", unit="it", file=sys.stderr, dynamic_ncols=True,
               mininterval=1.0)
    with metrics_file.open("a") as out:
        for it in range(start, total):
            done = it + 1
            for group in groups:
                t0 = time.time()
                per_run = group.step(it)
                seconds = time.time() - t0
                for r, m in zip(group.runs, per_run):
                    m["time_s"] = seconds
                    row = {"run": r.index, "seed": r.seed, **r.grid, "iteration": done, **m}
                    out.write(json.dumps(row) + "\n")
                    rows.append(row)
                    try:
                        check_metrics(m, done)
                    except FloatingPointError as e:
                        print(f"[sweep] run {r.index} ({r.grid}, seed {r.seed}): {e}", file=sys.stderr, flush=True)
            out.flush()
            scores = [row["score_mean"] for row in rows if row["iteration"] == done]
            bar.set_postfix(score=f"{np.mean(scores):.3f}")
            bar.update(1)
            if done % base.checkpoint.every == 0 or done == total or stop["signal"] is not None:
                for group, ckpt in zip(groups, ckpts):
                    ckpt.save(done, _arrays(group), {"iteration": done, "spec": spec})
                    ckpt.wait()
            if stop["signal"] is not None:
                print(f"\n[sweep] received signal {stop['signal']}: checkpoint saved at iteration {done}; rerun the "
                      "same command to resume", file=sys.stderr, flush=True)
                break
    bar.close()
    for c in ckpts:
        c.close()
    summary = write_summary(run_dir, runs, grid, rows, atomic_write_text)
    plot_sweep(run_dir / "sweep.png", runs, grid, rows)
    print(summary, file=sys.stderr)
    print(f"[sweep] wrote {run_dir / 'metrics.jsonl'}, {run_dir / 'summary.md'} and {run_dir / 'sweep.png'}",
          file=sys.stderr, flush=True)
    return 0


def _arrays(group):
    s = group.state
    return {"params": s.params, "opt_state": s.opt_state, "frozen": s.frozen, "reward": s.reward,
            "hparams": s.hparams, "kl": s.kl, "key": s.key, "step": s.step}


def _point_label(grid: dict, values: dict) -> str:
    return ", ".join(f"{k}={values[k]}" for k in grid) or "(no grid)"


def _by_point(runs, grid):
    points: dict = {}
    for r in runs:
        points.setdefault(tuple(repr(r.grid[k]) for k in grid), []).append(r)
    return list(points.values())


def write_summary(run_dir: Path, runs, grid: dict, rows: list[dict], write) -> str:
    """``summary.md``: per grid point, the final score (the mean of each run's last iterations, then mean +- 95%
    CI over seeds), KL and entropy likewise, and seconds per iteration of the point's program."""
    import numpy as np

    from ppojax.train.sweep import mean_ci

    by_run: dict = {}
    for row in rows:
        by_run.setdefault(row["run"], []).append(row)
    last_it = max((row["iteration"] for row in rows), default=0)
    window = min(FINAL_WINDOW, last_it)
    lines = [f"Final values: each run's mean over iterations {last_it - window + 1}-{last_it}, then mean +- 95% CI "
             "over seeds (Student's t). Time: median seconds per iteration of the point's program (all its runs "
             "together), first (compiling) iteration excluded.", "",
             "| " + " | ".join([*grid, "seeds", "score", "KL", "entropy", "s/iteration"]) + " |",
             "|" + "---|" * (len(grid) + 5)]
    for members in _by_point(runs, grid):
        finals = {k: [] for k in ("score_mean", "kl", "entropy")}
        times = []
        for r in members:
            tail = [row for row in by_run.get(r.index, []) if row["iteration"] > last_it - window]
            for k in finals:
                if tail:
                    finals[k].append(float(np.mean([row[k] for row in tail])))
            times += [row["time_s"] for row in by_run.get(r.index, []) if row["iteration"] > 1]
        cells = [str(members[0].grid[k]) for k in grid] + [str(len(members))]
        for k in finals:
            m, ci = mean_ci(finals[k]) if finals[k] else (float("nan"), 0.0)
            cells.append(f"{m:.3f} +- {ci:.3f}")
        cells.append(f"{float(np.median(times)):.2f}" if times else "n/a")
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    write(run_dir / "summary.md", text)
    return text


def plot_sweep(out_png: Path, runs, grid: dict, rows: list[dict]) -> None:
    """Score and KL per iteration for each grid point: the mean over seeds and a band from the lowest to the
    highest seed."""
    import io

    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from ppojax.io.atomic import atomic_write_bytes
    from matplotlib.figure import Figure

    by_run: dict = {}
    for row in rows:
        by_run.setdefault(row["run"], {})[row["iteration"]] = row
    fig = Figure(figsize=(11, 4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    for members in _by_point(runs, grid):
        label = _point_label(grid, members[0].grid)
        its = sorted(set.intersection(*(set(by_run.get(r.index, {})) for r in members))) if members else []
        if not its:
            continue
        for ax, key in zip(axes, ("score_mean", "kl")):
            values = np.asarray([[by_run[r.index][i][key] for i in its] for r in members])
            line, = ax.plot(its, values.mean(0), label=label)
            if len(members) > 1:
                ax.fill_between(its, values.min(0), values.max(0), color=line.get_color(), alpha=0.2)
    for ax, title in zip(axes, ("score (mean over seeds; band: min-max)", "KL to the reference (nats / response)")):
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(out_png, buf.getvalue())


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except SweepRunError as e:
        print(f"sweep.py: error: {e}", file=sys.stderr)
        return 2


__all__ = ["main", "parse_args", "plot_sweep", "run", "write_summary"]
