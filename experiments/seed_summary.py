#!/usr/bin/env python
"""Summarise runs of one config over seeds: the numbers and the figure a README states come from here.

    python experiments/seed_summary.py /tmp/seeds/seed0 /tmp/seeds/seed1 /tmp/seeds/seed2 \\
        --out docs/results/smollm2_sentiment.json --plot docs/smollm2_curves.png
    python experiments/seed_summary.py --pipeline runs/sum0 runs/sum1 runs/sum2 --out docs/results/pipeline_summarize.json

Reads each run directory's ``metrics.jsonl`` (and ``config.yaml`` for its seed), writes a JSON with every run's
per-iteration score and KL and the summary a README quotes -- for each of the first score, the final score (the
mean over the last ``--final-window`` iterations, one iteration's score being noisy) and the largest KL: the mean
over seeds and the range (min, max) -- and a plot of the score and KL curves (mean over seeds, min-max band).
``tests/test_readme_results.py`` checks that the README's sentences match the committed JSON.

``--pipeline``: the arguments are ``experiments/rlhf_pipeline.py --task NAME`` output directories (their
``report.json`` and ``ppo/metrics.jsonl``; a JSON this mode wrote before may stand for its runs). Per seed: the
reward model's held-out best-of-k and pair accuracy, the judge's held-out score before and after PPO (with its
standard error), the KL and the wall time; the summary is the mean and range over seeds of each.

``--pipeline --row SUMMARY.json`` prints the README's table rows of such a summary, one per seed (no ``--out``);
the README's rows are these lines, and ``tests/test_readme_results.py`` checks them through the same function::

    python experiments/seed_summary.py --pipeline --row docs/results/pipeline_summarize.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence


def _runs_of(run_dir: Path) -> list[tuple[str, Optional[int], list[dict]]]:
    """``(name, seed, rows by iteration)`` of a run directory (``experiments/ppo_gpt2.py``), or of every run of a
    sweep directory (``experiments/sweep.py``: one ``metrics.jsonl`` whose rows carry ``run`` and ``seed``)."""
    import yaml

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    if (run_dir / "sweep.json").exists():
        by_run: dict = {}
        for row in rows:
            by_run.setdefault(row["run"], []).append(row)
        return [(f"{run_dir.name}/run{r}", runs[0]["seed"], sorted(runs, key=lambda x: x["iteration"]))
                for r, runs in sorted(by_run.items())]
    config = run_dir / "config.yaml"
    seed = yaml.safe_load(config.read_text()).get("seed") if config.exists() else None
    return [(run_dir.name, seed, sorted(rows, key=lambda x: x["iteration"]))]


def _samples(run_dir: Path) -> list[dict]:
    """The sample rows of the first and the last iteration a run logged (``samples.jsonl``), for README tables."""
    path = run_dir / "samples.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        return []
    ends = {min(r["iteration"] for r in rows), max(r["iteration"] for r in rows)}
    return [r for r in rows if r["iteration"] in ends]


def _evaluation(record: dict) -> dict:
    """What a README quotes of an ``experiments/evaluate.py`` record: its numbers, settings and items, each item's
    prompt also as the user's question alone (``prompt_text``: the chat template's wrapping removed)."""
    keep = {k: v for k, v in record.items() if k != "items"}
    items = []
    for item in record["items"]:
        text = item["prompt"]
        if "<|im_start|>user\n" in text:  # ChatML: the last user turn
            text = text.rsplit("<|im_start|>user\n", 1)[1].split("<|im_end|>", 1)[0]
        items.append({**item, "prompt_text": text.strip()})
    return {**keep, "items": items}


def _range_of(stat_: dict, fmt: str) -> str:
    """``mean (min-max)`` of a :func:`stat`, each number formatted with ``fmt``."""
    return f"{stat_['mean']:{fmt}} ({stat_['min']:{fmt}}-{stat_['max']:{fmt}})"


def stat(values: Sequence[float]) -> dict:
    """Mean and range (min, max) over seeds."""
    return {"mean": sum(values) / len(values), "min": min(values), "max": max(values), "n": len(values)}


def summarize(run_dirs: Sequence[Path], final_window: int = 5) -> dict:
    runs = []
    samples = {d.name: _samples(d) for d in run_dirs}
    for name, seed, all_rows in (run for d in run_dirs for run in _runs_of(d)):
        rows = [r for r in all_rows if "score_mean" in r]  # training iterations (an eval-only row has none)
        if not rows:
            raise SystemExit(f"seed_summary.py: error: {name}/metrics.jsonl has no rows")
        score = [r["score_mean"] for r in rows]
        kl = [r["kl"] for r in rows]
        window = score[-final_window:]
        run = {"run": name, "seed": seed, "iterations": len(rows), "score": score, "kl": kl,
               "time_s": [r.get("time_s") for r in rows], "first_score": score[0],
               "final_score": sum(window) / len(window), "max_kl": max(kl), "final_kl": kl[-1],
               "samples": samples.get(name, [])}
        evals = [r for r in all_rows if "eval/score_mean" in r]
        if evals:  # held-out evaluation rows (``eval:``): iteration 0 is the base policy
            run["eval"] = {"iteration": [r["iteration"] for r in evals],
                           **{key: [r.get(f"eval/{key}") for r in evals]
                              for key in ("accuracy", "score_mean", "response_length", "ended", "success", "turns")
                              if any(f"eval/{key}" in r for r in evals)}}
            main = "accuracy" if "accuracy" in run["eval"] else "score_mean"
            run["eval_metric"] = main
            run["base_eval"], run["final_eval"] = run["eval"][main][0], run["eval"][main][-1]
            run["eval_gain"] = run["final_eval"] - run["base_eval"]
        runs.append(run)
    lengths = {r["iterations"] for r in runs}
    if len(lengths) != 1:
        raise SystemExit(f"seed_summary.py: error: the runs have different lengths {sorted(lengths)}")
    keys = ["first_score", "final_score", "max_kl", "final_kl"]
    if all("eval" in r for r in runs):
        keys += ["base_eval", "final_eval", "eval_gain"]
    return {
        "final_window": final_window,
        "iterations": lengths.pop(),
        "seeds": [r["seed"] for r in runs],
        "summary": {k: stat([r[k] for r in runs]) for k in keys},
        "runs": runs,
    }


PIPELINE_KEYS = ("rm_val_accuracy", "rm_pair_accuracy", "judge_before", "judge_after", "judge_gain", "rm_score_before",
                 "rm_score_after", "final_kl", "max_kl", "words_before", "words_after", "wall_min")
OPTIONAL_PIPELINE_KEYS = ("rm_judge_pairs_before", "rm_judge_pairs_after")
"""Summarised when every run has them: the reward model's agreement with the judge on pairs of the evaluation's
samples of held-out rows, from the initial policy and from the trained one (``rlhf_pipeline.pair_agreement``)."""


def _pipeline_run(report: dict, per_iteration: list, name: str) -> dict:
    before, after = report["before"], report["after"]
    run = {"run": name, "seed": report["seed"], "task": report.get("task"),
           "rm_val_accuracy": report["rm_val_accuracy"], "rm_chance": report["rm_chance"],
           "rm_val_comparisons": report["rm_val_pair_accuracy"]["comparisons"],
           "rm_pair_accuracy": report["rm_val_pair_accuracy"]["accuracy"],
           "rm_pairs": report["rm_val_pair_accuracy"]["pairs"],
           "judge_before": before["true_score"]["mean"], "judge_before_se": before["true_score"]["stderr"],
           "judge_after": after["true_score"]["mean"], "judge_after_se": after["true_score"]["stderr"],
           "judge_gain": after["true_score"]["mean"] - before["true_score"]["mean"],
           "rm_score_before": before["rm_score"]["mean"], "rm_score_after": after["rm_score"]["mean"],
           "final_kl": report["ppo_final_kl"], "max_kl": report.get("ppo_max_kl", max(r["kl"] for r in per_iteration)),
           "words_before": before["words"]["mean"], "words_after": after["words"]["mean"],
           "wall_min": report["timings_s"]["total_s"] / 60, "timings_s": report["timings_s"],
           "per_iteration": per_iteration, "report": report}
    for when, record in (("before", before), ("after", after)):  # reports since the held-out pair agreement
        if "rm_judge_pairs" in record:
            run[f"rm_judge_pairs_{when}"] = record["rm_judge_pairs"]["accuracy"]
    return run


def summarize_pipelines(paths: Sequence[Path]) -> dict:
    """The ``--pipeline`` summary (module docstring) of pipeline output directories or earlier summaries."""
    runs = []
    for path in paths:
        if path.is_dir():
            report = json.loads((path / "report.json").read_text())
            metrics = [json.loads(line) for line in (path / "ppo" / "metrics.jsonl").read_text().splitlines()
                       if line.strip()]
            per_iteration = [{k: m.get(k) for k in ("iteration", "score_mean", "kl", "response_length", "time_s")}
                             for m in metrics if "score_mean" in m]
            runs.append(_pipeline_run(report, per_iteration, path.name))
        else:  # an earlier summary: its runs as they were
            old = json.loads(path.read_text())
            runs += old["runs"] if "runs" in old else [_pipeline_run(old["report"], old["per_iteration"], path.stem)]
    tasks = {r["task"] for r in runs}
    if len(tasks) != 1:
        raise SystemExit(f"seed_summary.py: error: the pipeline runs are of different tasks {sorted(map(str, tasks))}")
    return {"task": tasks.pop(), "seeds": [r["seed"] for r in runs],
            "summary": {k: stat([r[k] for r in runs]) for k in PIPELINE_KEYS + OPTIONAL_PIPELINE_KEYS
                        if all(r.get(k) is not None for r in runs)}, "runs": runs}


def write_summary(out: Path, result: dict) -> Path:
    """Write a summary JSON to ``out`` atomically (a reader sees the old file or the new one), creating missing
    parent folders: the one write path of both modes."""
    from ppojax.io.atomic import atomic_write_json

    out.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_json(out, result, indent=1)


PIPELINE_ROW_KEYS = ("task", "seed", "rm_val_accuracy", "rm_val_comparisons", "rm_pair_accuracy", "rm_pairs",
                     "judge_before", "judge_before_se", "judge_after", "judge_after_se", "rm_score_before",
                     "rm_score_after", "final_kl", "max_kl", "words_before", "words_after", "wall_min")


def pipeline_row(run: dict) -> str:
    """One seed's README table row: task | seed | RM best-of-k accuracy (right/comparisons) | pair accuracy (of
    pairs) | judge before -> after (± s.e.) | RM score before -> after | KL final (max) | words | wall minutes."""
    n = run["rm_val_comparisons"]
    return (f"| {run['task']} | {run['seed']} | {run['rm_val_accuracy']:.2f} ({round(run['rm_val_accuracy'] * n)}/{n})"
            f" | {run['rm_pair_accuracy']:.2f} (of {run['rm_pairs']}) | {run['judge_before']:.3f} ± "
            f"{run['judge_before_se']:.3f} -> {run['judge_after']:.3f} ± {run['judge_after_se']:.3f} | "
            f"{run['rm_score_before']:+.2f} -> {run['rm_score_after']:+.2f} | {run['final_kl']:.1f} "
            f"({run['max_kl']:.1f}) | {run['words_before']:.1f} -> {run['words_after']:.1f} | "
            f"{run['wall_min']:.0f} min |")


def pipeline_rows(summary: dict) -> list[str]:
    """The README table rows of a ``--pipeline`` summary, one per run in its order (:func:`pipeline_row`).

    Raises ``ValueError`` (one line) when ``summary`` is not such a summary: no ``runs``, or a run without one of
    ``PIPELINE_ROW_KEYS``."""
    runs = summary.get("runs") if isinstance(summary, dict) else None
    if not isinstance(runs, list) or not runs or not all(isinstance(r, dict) for r in runs):
        raise ValueError("not a seed_summary.py --pipeline summary (no list of runs)")
    for i, run in enumerate(runs):
        missing = [k for k in PIPELINE_ROW_KEYS if k not in run]
        if missing:
            raise ValueError(f"not a seed_summary.py --pipeline summary (run {i} has no {', '.join(missing)})")
    return [pipeline_row(run) for run in runs]


def plot(result: dict, out: Path, title: str) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from ppojax.io.atomic import atomic_write_bytes

    evaluated = all("eval" in r for r in result["runs"])
    fig, axes = plt.subplots(1, 3 if evaluated else 2, figsize=(15 if evaluated else 10, 3.6))
    its = np.arange(1, result["iterations"] + 1)
    if evaluated:
        main = result["runs"][0]["eval_metric"]
        at = np.asarray(result["runs"][0]["eval"]["iteration"])
        values = np.asarray([r["eval"][main] for r in result["runs"]], np.float64)
        axes[2].fill_between(at, values.min(0), values.max(0), alpha=0.25, color="C2")
        axes[2].plot(at, values.mean(0), marker="o", color="C2", label="mean over seeds")
        axes[2].set_xlabel("iteration")
        axes[2].set_ylabel(f"held-out {main} (greedy)" if main == "accuracy" else f"held-out {main}")
        axes[2].grid(alpha=0.3)
    for ax, key, label in ((axes[0], "score", "score (mean over the batch)"), (axes[1], "kl", "KL (nats / response)")):
        values = np.asarray([r[key] for r in result["runs"]], np.float64)
        ax.fill_between(its, values.min(0), values.max(0), alpha=0.25, label=f"min-max over {len(values)} seeds")
        ax.plot(its, values.mean(0), label="mean over seeds")
        ax.set_xlabel("iteration")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(out, buf.getvalue())


def _print_rows(path: Path) -> int:
    """``--pipeline --row``: print ``pipeline_rows`` of the summary at ``path``; a bad input is one stderr line, 2."""
    try:
        text = path.read_text()
        try:
            summary = json.loads(text)
        except ValueError as e:
            raise ValueError(f"not JSON ({e})") from e
        rows = pipeline_rows(summary)
    except (OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError too
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
        print(f"seed_summary.py: error: --row {path}: {reason}", file=sys.stderr)
        return 2
    print("\n".join(rows))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="seed_summary.py", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dirs", nargs="+", type=Path,
                   help="run directories of one config, one per seed, or a sweep directory over seeds")
    p.add_argument("--out", type=Path, default=None, help="the summary JSON to write (required but with --row)")
    p.add_argument("--plot", type=Path, default=None, help="also plot score and KL (mean, min-max band)")
    p.add_argument("--title", default="", help="the plot's title")
    p.add_argument("--final-window", type=int, default=5, help="iterations averaged into a run's final score")
    p.add_argument("--command", default="", help="the command that produced the runs, recorded in the JSON")
    p.add_argument("--evaluate", action="append", default=[], metavar="NAME=FILE.json",
                   help="an experiments/evaluate.py output to record under `evaluate.NAME` (its accuracy, score "
                        "and items), e.g. base=runs/eval/base.json (repeatable)")
    p.add_argument("--pipeline", action="store_true",
                   help="the arguments are rlhf_pipeline.py --task output directories (see the module docstring)")
    p.add_argument("--row", action="store_true",
                   help="with --pipeline: print the README table rows of the one summary JSON given, write nothing")
    args = p.parse_args(argv)
    if args.row:
        if not args.pipeline or len(args.run_dirs) != 1 or args.out is not None:
            p.error("--row takes --pipeline and one summary JSON, and no --out")
        return _print_rows(args.run_dirs[0])
    if args.out is None:
        p.error("the following arguments are required: --out")
    if args.pipeline:
        for d in args.run_dirs:
            if not ((d / "report.json").is_file() or d.suffix == ".json" and d.is_file()):
                print(f"seed_summary.py: error: {d} has no report.json (is it an rlhf_pipeline.py --out?)",
                      file=sys.stderr)
                return 2
        result = summarize_pipelines(args.run_dirs)
        result["command"] = args.command
        write_summary(args.out, result)
        s = result["summary"]
        print(f"[seed_summary] {result['task']}, seeds {result['seeds']}: RM held-out best-of-k "
              f"{_range_of(s['rm_val_accuracy'], '.2f')}, pairs {_range_of(s['rm_pair_accuracy'], '.2f')}; judge "
              f"{_range_of(s['judge_before'], '.3f')} -> {_range_of(s['judge_after'], '.3f')}; max KL "
              f"{_range_of(s['max_kl'], '.1f')}; {_range_of(s['wall_min'], '.0f')} min; wrote {args.out}",
              file=sys.stderr)
        return 0
    for d in args.run_dirs:
        if not (d / "metrics.jsonl").is_file():
            print(f"seed_summary.py: error: {d} has no metrics.jsonl (is it a run directory?)", file=sys.stderr)
            return 2
    result = summarize(args.run_dirs, args.final_window)
    result["command"] = args.command
    if args.evaluate:
        result["evaluate"] = {}
        for spec in args.evaluate:
            name, _, path = spec.partition("=")
            if not name or not path or not Path(path).is_file():
                print(f"seed_summary.py: error: --evaluate {spec!r}: expected NAME=FILE.json of an existing file",
                      file=sys.stderr)
                return 2
            result["evaluate"][name] = _evaluation(json.loads(Path(path).read_text()))
    write_summary(args.out, result)
    if args.plot is not None:
        plot(result, args.plot, args.title)
    s = result["summary"]
    print(f"[seed_summary] {len(result['runs'])} seeds: first score {_range_of(s['first_score'], '.2f')}, final "
          f"score {_range_of(s['final_score'], '.2f')}, largest KL {_range_of(s['max_kl'], '.1f')}" + (
              f", held-out {result['runs'][0]['eval_metric']} {s['base_eval']['mean']:.3f} -> "
              f"{_range_of(s['final_eval'], '.3f')}" if "base_eval" in s else "") + f"; wrote {args.out}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(main())
