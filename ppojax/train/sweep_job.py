"""A sweep with a run directory (``experiments/sweep.py``, whose flags ``ppojax.cli`` parses): seeds x grids in
one program per group, driven by the one training loop (``ppojax.train.loop.train``) with a step that advances
every group.

    run_sweep("configs/offline.yaml", seeds="4", grid=["ppo.clip_eps=0.1,0.2,0.3"], run_dir="runs/clip")

The run directory gets ``metrics.jsonl`` (one object per run and iteration:
``run``, ``seed``, every grid field under its dotted name, ``iteration`` and the iteration's metrics),
``summary.md`` (per grid point: the final score as mean +- 95% CI over seeds, KL, entropy, time), ``sweep.png``
(curves per grid point with a band over seeds), ``sweep.json`` (the specification) and ``checkpoints/`` (one
per group; rerunning the same command resumes exactly; SIGTERM saves first). Bad input is one line and exit code 2,
before anything compiles; another job holding the directory is exit 2 too.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

FINAL_WINDOW = 5  # iterations averaged into a run's final score (one iteration's score is noisy)


class SweepRunError(Exception):
    """An input problem: one line, exit code 2."""


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


def _spec(seeds, grid, data) -> dict:
    return {"config": data, "seeds": seeds, "grid": list(grid)}


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


def run_sweep(config, *, seeds: Optional[str] = None, grid: Sequence[str] = (), run_dir, overrides: Sequence[str] = (),
              imports: Sequence[str] = (), vmap_width: str = "auto") -> int:
    """Run (or resume) the sweep of ``config`` (a YAML path) over ``seeds`` (``'N'`` or ``'3,7,11'``; None: the
    config's seed) and ``grid`` (``'a.b=v1,v2'`` specs) in ``run_dir``; 0 when done or stopped by a signal after
    saving. ``SweepRunError`` (one line) for a bad input, before anything compiles."""
    from ppojax.io import configlib
    from ppojax.train import sweep as sw
    from ppojax.train.config import ExperimentConfig
    from ppojax.train.run import RunError, check_user_callables, resolve_config

    path = Path(config)
    if not path.exists():
        raise SweepRunError(f"config file {path} does not exist")
    try:
        base, _ = resolve_config(path, overrides=overrides, imports=imports)
        check_user_callables(base)  # every 'module:function' resolves (one line naming its key)
        data = configlib.to_dict(base)
        seed_list = sw.parse_seeds(seeds, base.seed)
        grid_values = sw.parse_grid(grid, ExperimentConfig)
        runs = sw.plan_runs(data, ExperimentConfig, seed_list, grid_values)
        width = _width(vmap_width)
    except RunError as e:
        raise SweepRunError(str(e)) from None
    except (configlib.ConfigError, sw.SweepError, ValueError) as e:
        raise SweepRunError(f"config {path}: {e}") from None
    run_dir = Path(run_dir).expanduser().resolve()

    from ppojax.io.lock import DirectoryLock, LockError

    lock = DirectoryLock(run_dir)
    try:
        lock.acquire()
    except LockError as e:
        raise SweepRunError(str(e)) from None
    except OSError as e:
        raise SweepRunError(f"run directory {run_dir} is not writable: {e}") from None
    try:
        return _run_locked(path, data, base, runs, seeds, grid, grid_values, run_dir, width)
    finally:
        lock.release(remove_created=True)  # a sweep refused before writing leaves no directory behind


def _run_locked(path: Path, data: dict, base, runs, seeds, grid: Sequence[str], grid_values: dict, run_dir: Path,
                width) -> int:
    import numpy as np

    from ppojax.io.atomic import atomic_write_json, atomic_write_text
    from ppojax.io.checkpoint import Checkpointer
    from ppojax.rl.hparams import is_array_path
    from ppojax.rl.iteration import check_metrics
    from ppojax.train import loop
    from ppojax.train import sweep as sw
    from ppojax.train.run import checkpoint_arrays
    from ppojax.train.run import RunError

    spec = _spec(seeds, grid, {k: v for k, v in data.items() if k != "iterations"})
    spec_file = run_dir / "sweep.json"
    ckpt_dir = run_dir / "checkpoints"
    resuming = ckpt_dir.exists() and any(ckpt_dir.iterdir())
    if resuming:
        saved = json.loads(spec_file.read_text()) if spec_file.exists() else None
        if saved != json.loads(json.dumps(spec)):
            raise SweepRunError(f"{run_dir} holds another sweep's checkpoints (different config, seeds or grid); "
                                "rerun its own command to resume it, or pass a new --run-dir")

    groups_of = sw.group_runs(runs)
    n_seeds = len({r.seed for r in runs})
    splitting = sorted({k for k in grid_values if not is_array_path(k)})
    _say(f"{len(runs)} runs ({n_seeds} seeds x {len(runs) // n_seeds} grid points) "
         f"in {len(groups_of)} program(s)" + (f": {', '.join(splitting)} change the program, so each of "
                                                            "their values compiles its own" if splitting else ""))
    try:
        groups = sw.build_groups(runs, path.resolve().parent, log=lambda m: print(m, file=sys.stderr, flush=True),
                                 width=width)
        for group in groups:  # each program traced once on one run's shapes (nothing compiles), as a run does
            _check_group(group)
    except RunError as e:
        raise SweepRunError(str(e)) from None

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
            _, restored, _ = ckpt.restore(checkpoint_arrays(group.state))
            group.state = group.state.replace(**restored)
        _say(f"resuming {run_dir} from iteration {start}")
    metrics_file = run_dir / "metrics.jsonl"
    rows = _rows_upto(metrics_file, start)
    atomic_write_text(metrics_file, "".join(json.dumps(r) + "\n" for r in rows))
    total = base.iterations

    def step(groups, it):
        """Iteration ``it`` of every group: one metrics row per run (with the group's program time)."""
        done, rows_now = it + 1, []
        for group in groups:
            t0 = time.time()
            per_run = group.step(it)
            seconds = time.time() - t0
            for r, m in zip(group.runs, per_run):
                m["time_s"] = seconds
                rows_now.append({"run": r.index, "seed": r.seed, **r.grid, "iteration": done, **m})
        return groups, rows_now, None

    def check(rows_now, done):
        # One run going non-finite does not stop the others: it is reported and its rows are kept.
        for row in rows_now:
            try:
                check_metrics(row, done)
            except FloatingPointError as e:
                _say(f"run {row['run']} (seed {row['seed']}): {e}")
        return None

    out = metrics_file.open("a")
    progress = _Progress(total, start)
    saved, failed = [start], []

    def record(it) -> bool:
        try:
            for row in it.metrics:
                out.write(json.dumps(row) + "\n")
                rows.append(row)
            out.flush()
            progress.update(it.done, float(np.mean([row["score_mean"] for row in it.metrics])))
            if it.done % base.checkpoint.every == 0 or it.last:
                written = []
                try:
                    for g, (group, ckpt) in enumerate(zip(it.state, ckpts)):
                        ckpt.save(it.done, checkpoint_arrays(group.state), {"iteration": it.done, "spec": spec})
                        ckpt.wait()
                        written.append(g)
                except OSError:  # the groups resume from one step: drop this step of the groups that have it
                    for g in written:
                        shutil.rmtree(ckpt_dir / f"group-{g}" / str(it.done), ignore_errors=True)
                    raise
                saved.append(it.done)
        except OSError as e:  # a full disk, a file-size limit: one line (CheckpointWriteError names the checkpoint)
            from ppojax.io.atomic import write_error_reason
            from ppojax.io.checkpoint import CheckpointWriteError

            failed.append(str(e) if isinstance(e, CheckpointWriteError) else
                          f"could not write {e.filename or run_dir}: {write_error_reason(e)}")
            _say(f"error: {failed[0]}. " + (f"The last checkpoint (iteration {saved[-1]}) is kept in {ckpt_dir}: "
                                            "rerun the same command to resume" if saved[-1] else
                                            "No checkpoint was saved yet: a rerun starts over"))
            return True
        if it.stopping:
            _say(f"received signal {it.signal}: checkpoint saved at iteration {it.done}; rerun the same command to "
                 "resume")
        return False

    try:
        result = loop.train(groups, iterations=total, start=start, step=step, callbacks=[record], check=check,
                            handle_signals=True)
    finally:
        out.close()
        for c in ckpts:
            c.close()
    if failed:
        return 1
    if result.stop_reason == "signal":
        return 0
    if result.stop_reason == "host-call":  # a reward raised, hung past reward.timeout_s or outlived a signal
        _say(f"error: {result.error}. The last checkpoint kept is in {ckpt_dir}: rerun the same command to resume")
        return 1
    summary = write_summary(run_dir, runs, grid_values, rows, atomic_write_text)
    plot_sweep(run_dir / "sweep.png", runs, grid_values, rows)
    print(summary, file=sys.stderr)
    _say(f"wrote {run_dir / 'metrics.jsonl'}, {run_dir / 'summary.md'} and {run_dir / 'sweep.png'}")
    return 0


def _check_group(group) -> None:
    """The user callables of a group's first run, and its iteration traced on one run's shapes
    (``ppojax.train.run.check_user_callables``): ``RunError`` naming the config key at fault."""
    import jax

    from ppojax.train.run import check_user_callables

    one = {field: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), getattr(group.state, field))
           for field, axis in group.axes.field_axes().items() if axis == 0}
    ids, _ = group.loaders[0].batch(0)
    check_user_callables(group.runs[0].config, group.state.replace(**one), ids,
                         host_reward=group.host_reward is not None or group.episode_steps is not None)


def _say(message: str) -> None:
    print(f"[sweep] {message}", file=sys.stderr, flush=True)


class _Progress:
    """One line per iteration on stderr (no carriage returns: logs stay readable when redirected)."""

    def __init__(self, total: int, start: int):
        self.total, self.t0, self.start = total, time.time(), start

    def update(self, done: int, score: float) -> None:
        rate = (time.time() - self.t0) / max(done - self.start, 1)
        _say(f"iteration {done}/{self.total}: mean score {score:.3f} ({rate:.1f} s/iteration)")


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


__all__ = ["SweepRunError", "plot_sweep", "run_sweep", "write_summary"]
