"""What a training run writes: metrics and samples as JSON lines, TensorBoard, optional wandb, progress, curves.

Layout under ``run_dir``::

    metrics.jsonl    one JSON object per PPO iteration: {"iteration": 7, "score_mean": ..., "kl": ..., ...}
    samples.jsonl    one JSON object per sampled completion: {"iteration": 7, "prompt": ..., "response": ..., ...}
    tensorboard/     tensorboardX event files (scalars per metric, a markdown table of samples)
    curves.png       score / KL / KL coefficient / entropy against iteration, written by ``RunLogger.close``

Conventions:

- Non-finite floats (NaN, +-inf) are written as JSON ``null``: the file stays strict JSON that any reader
  (``json``, pandas, jq, DuckDB) accepts, and pandas reads ``null`` back as NaN. ``read_metrics`` turns ``null``
  back into ``float("nan")``; the distinction between NaN and +-inf is given up for that portability (TensorBoard
  and wandb still receive the raw value).
- Every line is flushed as it is written, so a killed run loses nothing it had already logged. A line cut short
  by the kill is dropped on the next read or resume.
- Exact resume: ``RunLogger(..., resume_from_iteration=k)`` with ``k > 0`` rewrites ``metrics.jsonl`` and
  ``samples.jsonl`` atomically (``ppojax.io.atomic``) keeping only lines with ``iteration <= k``, and starts
  TensorBoard with ``purge_step=k + 1`` so its own stale points are hidden too. After any stop and resume each
  iteration appears exactly once. For this to hold, the runner logs an iteration's metrics *before* saving its
  checkpoint. ``k = 0`` (the default) is a fresh run: nothing an earlier run left in the same directory is kept
  (with a warning), so a runner may count iterations from 0 or from 1. What a resume cannot repair is reported
  in one warning: iterations up to ``k`` whose metrics line is missing (a line torn or damaged in the middle of
  the file), and repeated ones (two jobs that once wrote the same directory; the last line of each is kept).
- Only the main process writes: with ``is_main_process=False`` every method is a no-op and nothing is created.

Only the standard library is imported with this module (no jax, no numpy): tensorboardX, tqdm, matplotlib and wandb
are imported when used, and the optional ones (tensorboardX, matplotlib, wandb) degrade to a warning when missing.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Optional

__all__ = [
    "CONSOLE_KEYS",
    "RunLogger",
    "format_console_line",
    "plot_curves",
    "write_curves",
    "read_metrics",
    "read_samples",
]

_log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"
TENSORBOARD_DIR = "tensorboard"
CURVES_FILE = "curves.png"

# (label shown, metric key) for the console line and the progress bar, in display order.
CONSOLE_KEYS: tuple[tuple[str, str], ...] = (
    ("score", "score_mean"),
    ("kl", "kl"),
    ("kl_coef", "kl_coef"),
    ("entropy", "entropy"),
    ("eval acc", "eval/accuracy"),
    ("eval score", "eval/score_mean"),
)

# (panel title, metric key) for ``plot_curves``; the score panel also gets a rolling mean.
_PANELS: tuple[tuple[str, str], ...] = (
    ("score", "score_mean"),
    ("KL", "kl"),
    ("KL coefficient", "kl_coef"),
    ("entropy", "entropy"),
)


# ---------------------------------------------------------------------------------------------------------------
# JSON lines
# ---------------------------------------------------------------------------------------------------------------


def _to_json_value(value: Any) -> Any:
    """Plain-JSON form of a value: non-finite floats -> None, numpy scalars/arrays -> Python, containers recursed."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _to_json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_json_value(v) for v in value]
    if hasattr(value, "tolist"):  # numpy scalar or host array (duck-typed: no numpy import needed)
        return _to_json_value(value.tolist())
    if hasattr(value, "__float__"):
        return _to_json_value(float(value))
    return str(value)


def _dumps(record: Mapping[str, Any]) -> str:
    # allow_nan=False: a non-finite that slipped past _to_json_value fails loudly instead of writing invalid JSON.
    return json.dumps(_to_json_value(record), allow_nan=False, ensure_ascii=False)


def _check_iteration(iteration: Any) -> int:
    if isinstance(iteration, bool):
        raise TypeError(f"iteration must be an int, got {iteration!r}")
    try:
        return int(iteration.__index__())
    except AttributeError:
        raise TypeError(f"iteration must be an int, got {type(iteration).__name__} {iteration!r}") from None


def _parse_lines(text: str) -> tuple[list[tuple[str, dict]], int]:
    """Parse JSON lines into ``(raw_line, record)`` pairs; returns them and the count of lines dropped.

    A line is dropped when it is not a JSON object with an integer ``iteration`` -- in practice the last line of a
    run killed mid-write. A final line without its newline but otherwise complete is kept.
    """
    kept, dropped = [], 0
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if not isinstance(record, dict) or isinstance(record.get("iteration"), bool) \
                or not isinstance(record.get("iteration"), int):
            dropped += 1
            continue
        kept.append((line, record))
    return kept, dropped


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    records, dropped = _parse_lines(path.read_text(encoding="utf-8"))
    if dropped:
        _log.info("%s: skipped %d unreadable line(s) (a run killed mid-write)", path, dropped)
    return [record for _, record in records]


def _truncate_jsonl(path: Path, last_iteration: int, *, one_per_iteration: bool = False) -> list[int]:
    """Keep only well-formed lines with ``iteration <= last_iteration`` (all dropped when it is negative); with
    ``one_per_iteration`` (metrics), also only the last line of each iteration, in iteration order. Returns the
    iterations kept.

    The file is rewritten (atomically) only when that changes its bytes, which includes adding a missing final
    newline so the next append starts on its own line.
    """
    if not path.exists():
        return []
    original = path.read_text(encoding="utf-8")
    records, n_bad = _parse_lines(original)
    kept = [(line, r["iteration"]) for line, r in records if r["iteration"] <= last_iteration]
    n_past = len(records) - len(kept)
    n_repeated = 0
    if one_per_iteration:
        last_of = {it: line for line, it in kept}
        n_repeated = len(kept) - len(last_of)
        kept = [(last_of[it], it) for it in sorted(last_of)] if n_repeated else kept
    new_text = "".join(line + "\n" for line, _ in kept)
    if new_text != original:
        start = f"resuming after iteration {last_iteration}" if last_iteration >= 0 else "fresh run"
        # A warning like every other of ppojax's (one "[ppojax] UserWarning: ..." line under the command lines).
        warnings.warn(f"{path}: {start}: dropped {n_past} earlier line(s) past that point, {n_repeated} repeated "
                      f"and {n_bad} unreadable line(s)", stacklevel=2)
        from ppojax.io.atomic import atomic_write_text  # here: importing ppojax.io imports jax

        atomic_write_text(path, new_text)
    return [it for _, it in kept]


def _report_gaps(path: Path, iterations: list[int], last_iteration: int) -> None:
    """One warning naming the iterations up to ``last_iteration`` that ``path`` has no line for."""
    seen = set(iterations)
    first = min(seen | {1})
    missing = [it for it in range(first, last_iteration + 1) if it not in seen]
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        warnings.warn(f"{path} has no metrics for iteration(s) {shown} of 1..{last_iteration} (lost lines: torn, "
                      "damaged or deleted); the resumed run logs the later ones, those stay missing", stacklevel=3)


def read_metrics(run_dir_or_file: str | os.PathLike) -> list[dict]:
    """The records of ``metrics.jsonl``, in file order, with ``null`` metrics read back as ``float("nan")``.

    Accepts the run directory or the file itself. A line cut short by a killed writer is skipped; a missing file
    gives ``[]``.
    """
    path = Path(run_dir_or_file)
    if path.is_dir():
        path = path / METRICS_FILE
    records = _read_jsonl(path)
    return [{k: (math.nan if v is None else v) for k, v in r.items()} for r in records]


def read_samples(run_dir_or_file: str | os.PathLike) -> list[dict]:
    """The records of ``samples.jsonl`` (one per sampled completion, each with its ``iteration``), as written."""
    path = Path(run_dir_or_file)
    if path.is_dir():
        path = path / SAMPLES_FILE
    return _read_jsonl(path)


# ---------------------------------------------------------------------------------------------------------------
# Console
# ---------------------------------------------------------------------------------------------------------------


def _fmt_number(x: float) -> str:
    """Three significant digits, trailing zeros kept (0.150 reads as a coefficient, 0.15 as a rounded guess)."""
    if not math.isfinite(x):
        return str(x)  # nan, inf, -inf
    s = f"{x:#.3g}"
    return s[:-1] if s.endswith(".") else s


def _fmt_seconds(s: float) -> str:
    return f"{s:.1f}" if s >= 1.0 else f"{s:.2g}"


def format_console_line(
    iteration: int,
    total: int | None,
    metrics: Mapping[str, float],
    sec_per_it: float | None = None,
    keys: Sequence[tuple[str, str]] = CONSOLE_KEYS,
) -> str:
    """One compact progress line for logs that are not a terminal (CI, ``nohup``, cluster job output).

    >>> format_console_line(10, 200, {"score_mean": 0.123, "kl": 1.23, "kl_coef": 0.15, "entropy": 3.21}, 1.4)
    'it 10/200 | score 0.123 | kl 1.23 | kl_coef 0.150 | entropy 3.21 | 1.4 s/it'

    Metrics missing from ``metrics`` are left out; ``keys`` holds ``(label, metric key)`` pairs in display order.
    """
    parts = [f"it {iteration}/{total}" if total is not None else f"it {iteration}"]
    for label, key in keys:
        if key in metrics:
            parts.append(f"{label} {_fmt_number(float(metrics[key]))}")
    if sec_per_it is not None:
        parts.append(f"{_fmt_seconds(sec_per_it)} s/it")
    return " | ".join(parts)


# ---------------------------------------------------------------------------------------------------------------
# Curves
# ---------------------------------------------------------------------------------------------------------------


_EVAL_PANEL_KEYS = ("eval/accuracy", "eval/score_mean")
"""The held-out metric plotted in curves.png's third column: accuracy for a verifiable task, else the mean score."""


def _rolling_mean(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over the last ``window`` finite values' slots (NaNs skipped, so one bad batch leaves no hole)."""
    out, total, count = [], 0.0, 0
    for i, v in enumerate(values):
        if math.isfinite(v):
            total, count = total + v, count + 1
        if i >= window:
            old = values[i - window]
            if math.isfinite(old):
                total, count = total - old, count - 1
        out.append(total / count if count else math.nan)
    return out


def plot_curves(
    run_dir_or_metrics: str | os.PathLike | Iterable[Mapping[str, Any]],
    out_png: str | os.PathLike,
    *,
    title: str | None = None,
    window: int | None = None,
):
    """Write a 2x2 PNG of score (with a rolling mean), KL, KL coefficient and entropy against iteration.

    ``run_dir_or_metrics`` is a run directory (its ``metrics.jsonl`` is read) or the records themselves. ``window``
    is the rolling-mean length for the score; by default about a twentieth of the run (at least 1). The title is
    the run directory's name unless given. A panel whose metric was never logged says so instead of failing.

    Draws with the Agg canvas on a bare ``Figure`` (no pyplot): nothing global changes, so this is safe inside a
    notebook or an interactive session with another backend. The PNG is written atomically; returns the Figure.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if isinstance(run_dir_or_metrics, (str, os.PathLike)):
        run_dir = Path(run_dir_or_metrics)
        records = read_metrics(run_dir)
        title = run_dir.resolve().name if title is None else title
    else:
        records = [{k: (math.nan if v is None else v) for k, v in r.items()} for r in run_dir_or_metrics]
    if window is None:
        window = max(1, len(records) // 20)

    evaluated = [key for key in _EVAL_PANEL_KEYS if any(key in r for r in records)]
    fig = Figure(figsize=(16 if evaluated else 11, 7), layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.subplots(2, 3 if evaluated else 2, sharex=True)
    axes = list(grid[:, :2].ravel())
    for ax in grid[-1]:  # the x axis is shared: label the bottom row only
        ax.set_xlabel("iteration")
    if evaluated:  # held-out evaluation (``eval/...`` rows): its own column, one point per evaluation
        for ax, key in zip(grid[:, 2], (evaluated[0], "eval/response_length")):
            points = [(r["iteration"], float(r[key])) for r in records if key in r]
            ax.set_title(f"held-out {key.removeprefix('eval/').replace('_', ' ')}")
            ax.grid(True, alpha=0.3)
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", lw=1.5, color="C2")
            ax.set_ylabel(key)
    for ax, (panel, key) in zip(axes, _PANELS):
        points = [(r["iteration"], float(r[key])) for r in records if key in r]
        ax.set_title(panel)
        ax.grid(True, alpha=0.3)
        if not points:
            ax.text(0.5, 0.5, f"no '{key}' logged", ha="center", va="center", transform=ax.transAxes)
            continue
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        if key == "score_mean":
            ax.plot(xs, ys, color="C0", alpha=0.35, lw=1, label=key)
            stds = [float(r["score_std"]) for r in records if key in r and "score_std" in r]
            if len(stds) == len(ys):
                ax.fill_between(xs, [y - s for y, s in zip(ys, stds)], [y + s for y, s in zip(ys, stds)],
                                color="C0", alpha=0.1, lw=0, label="+-1 std")
            ax.plot(xs, _rolling_mean(ys, window), color="C0", lw=2, label=f"rolling mean ({window})")
            ax.legend(loc="best", fontsize="small")
        else:
            ax.plot(xs, ys, lw=1.5)
        ax.set_ylabel(key)
    if title:
        fig.suptitle(title)

    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    from ppojax.io.atomic import atomic_write_bytes

    atomic_write_bytes(out, buf.getvalue())
    return fig


# ---------------------------------------------------------------------------------------------------------------
# The run logger
# ---------------------------------------------------------------------------------------------------------------


def write_curves(run_dir: str | os.PathLike, out_png: str | os.PathLike | None = None) -> Optional[Path]:
    """``run_dir/curves.png`` (or ``out_png``) from the run directory's ``metrics.jsonl`` (``plot_curves``); the path
    written, or None when there is nothing to plot (no metrics) or matplotlib is missing (with a warning). Used by
    ``RunLogger.close`` and by a rerun of a finished run whose curves were never written (killed at the end)."""
    run_dir = Path(run_dir)
    metrics = run_dir / METRICS_FILE
    if not metrics.exists() or metrics.stat().st_size == 0:
        return None
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        warnings.warn("matplotlib is not installed; no curves.png written.", RuntimeWarning, stacklevel=2)
        return None
    out = run_dir / CURVES_FILE if out_png is None else Path(out_png)
    plot_curves(run_dir, out)
    return out


def _not_nan_notice(record: logging.LogRecord) -> bool:
    return "NaN or Inf found in input tensor" not in record.getMessage()


def _quiet_tensorboardx() -> None:
    """tensorboardX warns on every non-finite scalar (each metric, each iteration, once a run diverges): the NaN is
    already in ``metrics.jsonl`` (as null) and reported by the runner, so drop that one notice."""
    log = logging.getLogger("tensorboardX.x2num")
    if _not_nan_notice not in log.filters:
        log.addFilter(_not_nan_notice)


def _markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    def cell(v: Any) -> str:
        s = _fmt_number(float(v)) if isinstance(v, float) else str(v)
        return s.replace("\\", "\\\\").replace("|", "\\|").replace("\n", "<br>")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


class RunLogger:
    """Everything one training run writes, under ``run_dir``. Call ``log_metrics`` once per PPO iteration.

    Args:
      run_dir: directory of the run; created if missing (by the main process only).
      is_main_process: when False (every process but one in a multi-host run), all methods are no-ops.
      tensorboard: write tensorboardX event files under ``run_dir/tensorboard`` (warns and skips if missing).
      wandb: keyword arguments for ``wandb.init`` (``project``, ``name``, ``config``, ``resume``, ...); ``None``
        disables wandb. If given but the package is not installed: one warning, and the run goes on without it.
      progress_total: the planned number of iterations, shown as ``it 10/200`` and the progress bar's total.
      resume_from_iteration: the checkpoint iteration this run resumes from (0 = fresh run). Log lines with a
        larger iteration (all lines, for a fresh run) are dropped from ``metrics.jsonl`` and ``samples.jsonl``.
      console: ``"auto"`` (a tqdm bar if ``stream`` is a terminal, else plain lines), ``"tqdm"``, ``"lines"`` or
        ``"off"``.
      console_every: in ``"lines"`` mode, print a line when ``iteration % console_every == 0`` and at the end.
      stream: where the console output goes; ``sys.stderr`` by default.
      curves: write ``run_dir/curves.png`` on ``close`` (``plot`` can also be called at any time).
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        *,
        is_main_process: bool = True,
        tensorboard: bool = True,
        wandb: Mapping[str, Any] | None = None,
        progress_total: int | None = None,
        resume_from_iteration: int = 0,
        console: Literal["auto", "tqdm", "lines", "off"] = "auto",
        console_every: int = 10,
        stream: Any = None,
        curves: bool = True,
    ):
        resume_from_iteration = _check_iteration(resume_from_iteration)
        if resume_from_iteration < 0:
            raise ValueError(f"resume_from_iteration must be >= 0, got {resume_from_iteration}")
        if console not in ("auto", "tqdm", "lines", "off"):
            raise ValueError(f"console must be 'auto', 'tqdm', 'lines' or 'off', got {console!r}")
        if console_every < 1:
            raise ValueError(f"console_every must be >= 1, got {console_every}")
        if progress_total is not None and progress_total < 0:
            raise ValueError(f"progress_total must be >= 0 or None, got {progress_total}")

        self.run_dir = Path(run_dir)
        self.is_main_process = bool(is_main_process)
        self.progress_total = progress_total
        self.resume_from_iteration = resume_from_iteration
        self._curves = bool(curves)
        self._closed = False
        self._metrics_file = self._samples_file = None
        self._tb = self._wandb = self._bar = None
        self.console = "off"
        if not self.is_main_process:
            return

        self.run_dir.mkdir(parents=True, exist_ok=True)
        # A fresh run (k = 0) keeps nothing, so that iteration 0 may be logged; a resumed one keeps 1..k.
        self._last_iteration = resume_from_iteration if resume_from_iteration > 0 else -1
        logged = _truncate_jsonl(self.metrics_path, self._last_iteration, one_per_iteration=True)
        _truncate_jsonl(self.samples_path, self._last_iteration)
        if resume_from_iteration > 0:
            _report_gaps(self.metrics_path, logged, resume_from_iteration)
        self._metrics_file = open(self.metrics_path, "a", encoding="utf-8")

        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                warnings.warn("tensorboard=True but tensorboardX is not installed (pip install tensorboardX); "
                              "logging without TensorBoard.", RuntimeWarning, stacklevel=2)
            else:
                _quiet_tensorboardx()
                # purge_step hides events an earlier run wrote for the iterations this one will redo. The suffix
                # keeps the file names of two writers started within one second distinct and in start order
                # (tensorboardX names files by the second and would overwrite).
                self._tb = SummaryWriter(logdir=str(self.run_dir / TENSORBOARD_DIR),
                                         purge_step=self._last_iteration + 1,
                                         filename_suffix=f".{time.time_ns()}")

        if wandb is not None:
            try:
                import wandb as wandb_module
            except ImportError:
                warnings.warn("wandb logging was requested but the wandb package is not installed; "
                              "continuing without wandb (metrics still go to metrics.jsonl and TensorBoard).",
                              RuntimeWarning, stacklevel=2)
            else:
                self._wandb = wandb_module
                self._wandb.init(**{"dir": str(self.run_dir), **dict(wandb)})

        self._stream = sys.stderr if stream is None else stream
        if console == "auto":
            isatty = getattr(self._stream, "isatty", None)
            console = "tqdm" if isatty is not None and isatty() else "lines"
        self.console = console
        self._console_every = console_every
        self._tick_time, self._tick_iteration = time.perf_counter(), resume_from_iteration
        if console == "tqdm":
            from tqdm import tqdm

            self._bar = tqdm(total=progress_total, initial=resume_from_iteration, file=self._stream,
                             unit="it", dynamic_ncols=True, desc="ppo")

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / METRICS_FILE

    @property
    def samples_path(self) -> Path:
        return self.run_dir / SAMPLES_FILE

    @property
    def curves_path(self) -> Path:
        return self.run_dir / CURVES_FILE

    def _active(self) -> bool:
        return self.is_main_process and not self._closed

    def log_metrics(self, iteration: int, metrics: Mapping[str, float]) -> None:
        """Log one iteration's host-side scalar metrics everywhere. Iterations must strictly increase."""
        if not self._active():
            return
        iteration = _check_iteration(iteration)
        if iteration <= self._last_iteration:
            raise ValueError(f"iteration {iteration} was already logged or precedes the resume point "
                             f"(last logged: {self._last_iteration}); each iteration is logged once")
        if "iteration" in metrics:
            raise ValueError("'iteration' is reserved for the step; pass it as the first argument")
        values = {}
        for key, value in metrics.items():
            try:
                values[str(key)] = float(value)
            except (TypeError, ValueError):
                raise TypeError(f"metric {key!r} must be a host scalar, got {type(value).__name__}") from None

        self._metrics_file.write(_dumps({"iteration": iteration, **values}) + "\n")
        self._metrics_file.flush()
        self._last_iteration = iteration

        if self._tb is not None:
            for key, value in values.items():
                self._tb.add_scalar(key, value, iteration)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(values, step=iteration)
        self._update_console(iteration, values)

    def _update_console(self, iteration: int, values: Mapping[str, float]) -> None:
        if self._bar is not None:
            self._bar.set_postfix({label: _fmt_number(values[key]) for label, key in CONSOLE_KEYS[:2]
                                   if key in values}, refresh=False)
            self._bar.update(iteration - self._bar.n)
        elif self.console == "lines":
            if iteration % self._console_every and iteration != self.progress_total:
                return
            now = time.perf_counter()
            sec_per_it = (now - self._tick_time) / max(iteration - self._tick_iteration, 1)
            if "time_s" not in values and iteration == 0:  # the base policy's evaluation, before iteration 1
                print(format_console_line(0, self.progress_total, values, None).replace("it 0/", "eval before it 1/"),
                      file=self._stream, flush=True)
                self._tick_time = now
                return
            if "time_s" in values and iteration - self._tick_iteration <= 1:
                # The iteration's own time, as metrics.jsonl records it (the wall time between two lines also
                # counts sample tables and checkpoints).
                sec_per_it = float(values["time_s"])
            self._tick_time, self._tick_iteration = now, iteration
            print(format_console_line(iteration, self.progress_total, values, sec_per_it), file=self._stream,
                  flush=True)

    def log_samples(self, iteration: int, rows: Sequence[Mapping[str, Any]]) -> None:
        """Log sampled completions (dicts with at least ``prompt``, ``response``, ``score``; extra keys are kept)."""
        if not self._active() or not rows:
            return
        iteration = _check_iteration(iteration)
        if self._samples_file is None:
            self._samples_file = open(self.samples_path, "a", encoding="utf-8")
        for row in rows:
            self._samples_file.write(_dumps({"iteration": iteration, **{k: v for k, v in row.items()
                                                                        if k != "iteration"}}) + "\n")
        self._samples_file.flush()

        columns = [c for c in dict.fromkeys(["prompt", "response", "score", *(k for r in rows for k in r)])
                   if c != "iteration"]
        plain = [_to_json_value(dict(r)) for r in rows]
        if self._tb is not None:
            self._tb.add_text("samples", _markdown_table(plain, columns), iteration)
            self._tb.flush()
        if self._wandb is not None:
            table = self._wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in plain])
            self._wandb.log({"samples": table}, step=iteration)

    def plot(self, out_png: str | os.PathLike | None = None):
        """Write the curves of everything logged so far (``run_dir/curves.png`` by default); returns the Figure.

        Returns None, with a warning, if matplotlib is not installed or nothing was logged yet.
        """
        if not self.is_main_process:
            return None
        if not self.metrics_path.exists() or self.metrics_path.stat().st_size == 0:
            return None
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            warnings.warn("matplotlib is not installed; no curves.png written.", RuntimeWarning, stacklevel=2)
            return None
        return plot_curves(self.run_dir, self.curves_path if out_png is None else out_png)

    def close(self, *, curves: bool = True) -> None:
        """Close files, TensorBoard, wandb and the progress bar, then write ``curves.png`` (unless ``curves`` is
        False: a job that lost its run directory to another must not write there). Safe to call twice."""
        if not self._active():
            return
        self._closed = True
        try:
            for f in (self._metrics_file, self._samples_file):
                if f is not None:
                    f.close()
            if self._bar is not None:
                self._bar.close()
            if self._tb is not None:
                self._tb.close()
            if self._wandb is not None:
                self._wandb.finish()
        finally:
            if self._curves and curves:
                self.plot()

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
