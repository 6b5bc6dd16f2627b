"""Interleaved repeats of benchmark variants, each in a fresh process: run order, medians and spreads, paired
ratios, and the busy-machine gate on writing results.

A variant is one command (a side of ``vs_trl.py``: ppojax, TRL, ppojax at another git revision, ppojax with an
option or under XLA flags). Repeat ``r`` runs every variant once, in the order rotated by ``r`` (two variants: A B,
B A, A B, ...), so each goes first equally often over an even number of repeats and a slow drift of the machine's
speed (another job starting, thermal state) does not favour one of them. Before each repeat, the load of OTHER
processes is probed (``_env.other_load_probe``); each run also reports the load others put on the machine while it
ran. Any of them above ``_env.BUSY_OTHER_CORES`` marks the whole measurement busy: :func:`write_result` then
refuses to write the result file unless forced, and the file records the busyness either way.

Statistics (per variant, over its repeats): median, min, max, quartiles (``statistics.quantiles``, inclusive
method), IQR, and the relative range ``(max - min) / median``. The ratio of a variant X to the baseline B is
``median(X) / median(B)`` with the range of the paired ratios ``X_r / B_r`` of the same repeat (the two ran minutes
apart, under the same conditions).
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Callable, Optional, Sequence

import _env


@dataclasses.dataclass(frozen=True)
class Variant:
    """One command to time: ``argv`` run in ``cwd`` with ``env`` added to this process's environment."""

    name: str
    argv: tuple
    env: dict = dataclasses.field(default_factory=dict)
    cwd: Optional[str] = None


def schedule(names: Sequence[str], repeats: int) -> list[list[str]]:
    """The run order of each repeat: the variants rotated by the repeat's index."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    names = list(names)
    if len(set(names)) != len(names) or not names:
        raise ValueError(f"variant names must be distinct and not empty: {names}")
    return [names[r % len(names):] + names[:r % len(names)] for r in range(repeats)]


def spread(values: Sequence[float]) -> dict:
    """Median, min, max, quartiles, IQR and (max - min) / median of ``values``."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("spread of no values")
    med = statistics.median(values)
    q1, q3 = (statistics.quantiles(values, n=4, method="inclusive")[i] for i in (0, 2)) if len(values) > 1 \
        else (values[0], values[0])
    return {"n": len(values), "median": med, "min": min(values), "max": max(values), "q1": q1, "q3": q3,
            "iqr": q3 - q1, "rel_range": (max(values) - min(values)) / med if med else None, "values": values}


def paired_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> dict:
    """``median(numerator) / median(denominator)``, and the min / median / max of the per-repeat ratios."""
    if len(numerator) != len(denominator) or not numerator:
        raise ValueError(f"paired ratios need the same number of repeats on both sides, got {len(numerator)} and "
                         f"{len(denominator)}")
    paired = [float(a) / float(b) for a, b in zip(numerator, denominator)]
    return {"of_medians": statistics.median(numerator) / statistics.median(denominator), "paired": paired,
            "min": min(paired), "median_of_paired": statistics.median(paired), "max": max(paired)}


def run_interleaved(variants: Sequence[Variant], repeats: int, run_one: Callable[[Variant, int], dict], *,
                    probe: Optional[Callable[[], float]] = None, wait_quiet_s: float = 0.0,
                    threshold: float = _env.BUSY_OTHER_CORES, log=print) -> dict:
    """Run ``run_one(variant, repeat) -> dict`` for every variant in every repeat, in :func:`schedule`'s order,
    probing the other processes' load before each repeat (waiting up to ``wait_quiet_s`` for a quiet probe) and
    after the last (``probe``: ``_env.other_load_probe`` by default). ``run_one``'s dict should hold
    ``other_processes_cores`` (the others' load during the run).

    Returns ``{"order", "runs": [{"repeat", "position", "variant", ...run_one's dict}], "probes": [...], "busy"}``.
    """
    probe = probe or _env.other_load_probe
    by_name = {v.name: v for v in variants}
    order = schedule([v.name for v in variants], repeats)
    runs, probes = [], []
    for r, names in enumerate(order):
        values = _env.wait_until_quiet(wait_quiet_s, probe=probe, threshold=threshold)
        probes.append({"before_repeat": r, "other_cores": values})
        log(f"-- repeat {r + 1}/{repeats}: {' -> '.join(names)} (other processes: {values[-1]:.2f} cores)")
        for position, name in enumerate(names):
            out = run_one(by_name[name], r)
            runs.append({"repeat": r, "position": position, "variant": name, **out})
    probes.append({"after_last_repeat": True, "other_cores": [probe()]})
    return {"order": order, "runs": runs, "probes": probes, "busy": busyness(probes, runs, threshold)}


def busyness(probes: list, runs: list, threshold: float = _env.BUSY_OTHER_CORES) -> dict:
    """Whether other processes loaded the machine: the last value of each probe (after any waiting) and each run's
    own measurement, against ``threshold`` cores."""
    probe_max = max((p["other_cores"][-1] for p in probes), default=0.0)
    run_max = max((r.get("other_processes_cores") or 0.0 for r in runs), default=0.0)
    return {"busy": probe_max > threshold or run_max > threshold, "threshold_cores": threshold,
            "max_other_cores_between_runs": probe_max, "max_other_cores_during_runs": run_max}


def values_of(runs: list, variant: str, key: str) -> list:
    """``key`` of ``variant``'s runs, in repeat order."""
    return [r[key] for r in sorted(runs, key=lambda r: r["repeat"]) if r["variant"] == variant]


def write_result(path: Optional[os.PathLike], result: dict, *, force: bool, stream=None) -> Optional[Path]:
    """Write ``result`` (which records ``busy``) to ``path`` unless the measurement was busy and not ``force``d;
    a refused result goes to a temporary file instead, so nothing measured is lost. Returns the path written to
    ``path``, or None."""
    busy = result["busy"]["busy"]
    result["forced"] = bool(force and busy)
    if path is None:
        return None
    if busy and not force:
        fd, tmp = tempfile.mkstemp(prefix="busy_", suffix=".json")
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(result, indent=2) + "\n")
        b = result["busy"]
        print(f"NOT WRITTEN: {path}: other processes used up to {b['max_other_cores_during_runs']:.2f} cores "
              f"during the runs and {b['max_other_cores_between_runs']:.2f} between them (threshold "
              f"{b['threshold_cores']}): the timings are not trustworthy. Rerun on a quiet machine (or pass --force "
              f"to write them flagged busy). The result is in {tmp}.", file=stream or sys.stderr)
        return None
    return _env.write_json(path, result)
