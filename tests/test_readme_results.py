"""The README's learning figures are the committed results': each number a README sentence states is recomputed here
from the JSON under docs/results/ (written by experiments/seed_summary.py from the runs), and each sample row the
README shows is one of those runs' samples. A README edited without its runs, or runs without the README, fails."""

import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"


def _seed_summary():
    """``experiments/seed_summary.py`` imported as a module (``experiments/`` is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("seed_summary", REPO / "experiments" / "seed_summary.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _flat(text: str) -> str:
    return re.sub(r"\s+", " ", text)


def _range(stat: dict, fmt: str) -> str:
    return f"{stat['mean']:{fmt}} ({stat['min']:{fmt}}-{stat['max']:{fmt}})"


def _table_rows(section: str) -> list[tuple[str, str, float]]:
    rows = []
    for line in section.splitlines():
        if not line.startswith("|"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0] not in ("prompt", "---") and not set(cells[0]) <= {"-", " "}:
            rows.append((cells[0], cells[1], float(cells[2])))
    return rows


def _section(text: str, title: str) -> str:
    start = text.index(title)
    end = text.find("\n## ", start + len(title))
    return text[start:end if end > 0 else len(text)]


def test_the_default_runs_numbers_and_samples_are_the_committed_results():
    result = json.loads((REPO / "docs" / "results" / "smollm2_sentiment.json").read_text())
    assert len(result["runs"]) >= 3 and result["iterations"] == 30
    section = _section(README.read_text(), "## What the default shows")
    flat = _flat(section)
    s = result["summary"]
    assert f"{len(result['runs'])} seeds" in flat
    assert f"goes from {_range(s['first_score'], '.2f')} at the first iteration" in flat
    assert f"to {_range(s['final_score'], '.2f')} over the last {result['final_window']} iterations" in flat
    assert f"at most {s['max_kl']['mean']:.1f} nats per response ({s['max_kl']['min']:.1f}-{s['max_kl']['max']:.1f})" \
        in flat
    # Every sample row shown is a row the seed-0 run logged, with its score.
    seed0 = next(r for r in result["runs"] if r["seed"] == 0)
    logged = {(x["prompt"].strip(), x["response"].strip().replace("\n", " ")): x["score"] for x in seed0["samples"]}
    rows = _table_rows(section)
    assert len(rows) >= 4
    for prompt, response, score in rows:
        key = (prompt, response)
        assert key in logged, f"README sample not among seed 0's logged samples: {prompt} | {response}"
        assert round(logged[key], 2) == pytest.approx(score, abs=0.005)


def test_the_summary_is_what_the_runs_say():
    """The summary in the JSON is recomputed from the per-iteration scores it stores (a loop written here)."""
    result = json.loads((REPO / "docs" / "results" / "smollm2_sentiment.json").read_text())
    w = result["final_window"]
    finals = [sum(r["score"][-w:]) / w for r in result["runs"]]
    assert result["summary"]["final_score"]["mean"] == pytest.approx(sum(finals) / len(finals))
    assert result["summary"]["max_kl"]["max"] == pytest.approx(max(max(r["kl"]) for r in result["runs"]))
    assert result["summary"]["first_score"]["min"] == pytest.approx(min(r["score"][0] for r in result["runs"]))


def test_the_offline_tasks_numbers_are_the_committed_results():
    result = json.loads((REPO / "docs" / "results" / "offline.json").read_text())
    assert len(result["runs"]) >= 3 and result["iterations"] == 60
    flat = _flat(_section(README.read_text(), "### The tiny offline task"))
    s = result["summary"]
    assert f"{len(result['runs'])} seeds" in flat
    assert f"climbs from {_range(s['first_score'], '.2f')} at the first iteration" in flat
    assert f"to {_range(s['final_score'], '.2f')} over the last {result['final_window']} iterations" in flat
    assert f"reaches {_range(s['max_kl'], '.1f')} nats" in flat


def test_the_arithmetic_runs_numbers_and_samples_are_the_committed_results():
    """The held-out accuracy before and after (mean and range over seeds) is the committed summary's, the
    summary is what the runs' eval rows say, and evaluate.py on the base and on each export (committed beside it)
    gave the same numbers as the runs' first and last eval rows."""
    result = json.loads((REPO / "docs" / "results" / "smollm2_arithmetic.json").read_text())
    assert len(result["runs"]) >= 3
    section = _flat(_section(README.read_text(), "## Verifiable rewards"))
    s = result["summary"]
    assert f"{len(result['runs'])} seeds" in section
    assert f"from {s['base_eval']['mean']:.2f} before training to {_range(s['final_eval'], '.2f')} after " \
           f"{result['iterations']} iterations" in section
    assert f"largest KL to the base {_range(s['max_kl'], '.1f')} nats" in section
    for run in result["runs"]:
        accuracy = run["eval"]["accuracy"]
        assert run["base_eval"] == accuracy[0] and run["final_eval"] == accuracy[-1]
        assert run["eval"]["iteration"][0] == 0 and run["eval"]["iteration"][-1] == result["iterations"]
    assert s["final_eval"]["mean"] == pytest.approx(sum(r["final_eval"] for r in result["runs"]) / len(result["runs"]))
    evaluated = result["evaluate"]
    assert evaluated["base"]["accuracy"] == pytest.approx(s["base_eval"]["mean"])
    for run in result["runs"]:
        assert evaluated[f"seed{run['seed']}"]["accuracy"] == pytest.approx(run["final_eval"], abs=0.02)
    # The README's samples are greedy answers evaluate.py wrote, with their verdicts: | question | base | seed 0 |.
    base = {x["prompt_text"]: x for x in evaluated["base"]["items"]}
    trained = {x["prompt_text"]: x for x in evaluated["seed0"]["items"]}
    rows = []
    for line in _section(README.read_text(), "## Verifiable rewards").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) == 3 and cells[0].startswith("What is"):
            rows.append(cells)
    assert len(rows) >= 4
    for question, before, after in rows:
        for cell, items in ((before, base), (after, trained)):
            item = items[question]
            mark = "✓" if item["correct"] else "✗"
            assert cell == f"{' '.join(item['response'].split())} {mark}", (question, cell)


def _span(stat: dict, fmt: str) -> str:
    return f"{stat['mean']:{fmt}} ({stat['min']:{fmt}} to {stat['max']:{fmt}})"


def test_the_multi_turn_tiny_dialogue_numbers_are_the_committed_results():
    result = json.loads((REPO / "docs" / "results" / "tiny_dialogue.json").read_text())
    assert len(result["runs"]) == 3 and result["iterations"] == 60
    flat = _flat(_section(README.read_text(), "## Multi-turn episodes"))
    s = result["summary"]
    first = _span(s["first_score"], ".2f")
    assert f"goes from {first} at the first iteration" in flat
    assert f"to {_span(s['final_score'], '.2f')} over the last {result['final_window']} iterations" in flat
    finals = [r["eval"]["score_mean"][-1] for r in result["runs"]]
    bases = {r["eval"]["score_mean"][0] for r in result["runs"]}
    held = {"mean": sum(finals) / len(finals), "min": min(finals), "max": max(finals)}
    assert bases == {0.0} and f"score 0.00 before training and {_span(held, '.2f')} after" in flat
    assert all(set(r["eval"]["turns"]) == {3.0} for r in result["runs"])
    assert f"at most {s['max_kl']['mean']:.0f} ({s['max_kl']['min']:.0f} to {s['max_kl']['max']:.0f}) nats" in flat
    logged = [t["content"] for x in result["runs"][0]["samples"] for t in x.get("turns", [])
              if t["role"] == "assistant"]
    assert "languages receptions TSA like win win win win" in [" ".join(t.split()) for t in logged]


def test_the_smollm2_guess_numbers_are_the_committed_run():
    result = json.loads((REPO / "docs" / "results" / "smollm2_guess.json").read_text())
    (run,) = result["runs"]
    flat = _flat(_section(README.read_text(), "## Multi-turn episodes"))
    success = run["eval"]["success"]
    assert success[0] == 0.0 and f"to {success[-1]:.2f} at iterations 4, 8 and 12" in flat
    assert run["eval"]["iteration"] == [0, 4, 8, 12] and len(set(success[1:])) == 1
    assert f"most {result['summary']['max_kl']['mean']:.1f} nats per episode" in flat
    assert f"{result['iterations']} iterations" in flat


@pytest.mark.parametrize("task", ["summarize", "dialogue"])
def test_the_pipeline_tasks_numbers_and_samples_are_the_committed_runs(task):
    """``rlhf_pipeline.py --task summarize|dialogue``: each seed's table row is its report's numbers, the summary
    is recomputed from the runs here, and every sample the README shows is one of the runs' samples."""
    result = json.loads((REPO / "docs" / "results" / f"pipeline_{task}.json").read_text())
    readme = README.read_text()
    section = _section(readme, "### Summaries and dialogue")
    for run in result["runs"]:
        report = run["report"]
        assert run["judge_after"] == report["after"]["true_score"]["mean"] and run["seed"] == report["seed"]
    # The rows `seed_summary.py --pipeline --row` prints: each one a whole line of the README's table.
    lines = section.splitlines()
    for row in _seed_summary().pipeline_rows(result):
        assert row in lines, row
    for key in ("judge_before", "judge_after", "rm_pair_accuracy", "max_kl"):
        values = [r[key] for r in result["runs"]]
        assert result["summary"][key]["mean"] == pytest.approx(sum(values) / len(values))
        assert (result["summary"][key]["min"], result["summary"][key]["max"]) == (min(values), max(values))
    s = result["summary"]
    paragraph = {"summarize": "Summaries: ", "dialogue": "Dialogue: "}[task]
    flat = _flat(section[section.index(paragraph):])  # the task's own paragraph onwards
    assert f"best of 4 in {_range(s['rm_val_accuracy'], '.2f')} of" in flat
    assert f"orders {_range(s['rm_pair_accuracy'], '.2f')} of the held-out pairs" in flat
    assert f"from {_range(s['judge_before'], '.3f')} to {_range(s['judge_after'], '.3f')}" in flat
    assert f"at most {_range(s['max_kl'], '.1f')} nats" in flat
    if task == "dialogue":  # the reward model against the judge on the evaluation's held-out questions
        assert all(r["judge_gain"] > 0 for r in result["runs"])
        assert f"it orders {_range(s['rm_judge_pairs_before'], '.2f')} as the judge does" in flat
        assert f"it orders {_range(s['rm_judge_pairs_after'], '.2f')} of the pairs as the judge does" in flat
        old = json.loads((REPO / "docs" / "results" / "pipeline_dialogue_128.json").read_text())["summary"]
        assert f"ordered only {_range(old['rm_pair_accuracy'], '.2f')} of the held-out pairs" in flat
        assert f"score either way: {_range(old['judge_before'], '.3f')} -> {_range(old['judge_after'], '.3f')}" \
            in flat
    examples = [(b["response"], a["response"], b["judge"], a["judge"]) for r in result["runs"]
                for b, a in zip(r["report"]["before"]["examples"], r["report"]["after"]["examples"])]
    table = section[section.index("| question (held out)" if task == "dialogue" else "| document (held out"):]
    shown = [line for line in table.split("\n\n")[0].splitlines()[2:]]
    assert shown, "the README shows no samples"
    clean = lambda text: " ".join(text.split())
    for line in shown:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        before, judge_b, after, judge_a = cells[1], float(cells[2]), cells[3], float(cells[4])
        assert any(clean(b).startswith(clean(before).rstrip(".")[:60]) and clean(a).startswith(clean(after)[:60])
                   and round(jb, 2) == judge_b and round(ja, 2) == judge_a for b, a, jb, ja in examples), line


def _fake_runs(root: Path) -> list[Path]:
    """Three run directories of six training iterations each, with held-out eval rows at iterations 0 and 3."""
    dirs = []
    for seed in range(3):
        run = root / f"run{seed}"
        run.mkdir(parents=True)
        rows = []
        for i in range(6):
            rows.append({"iteration": i, "score_mean": 0.1 * i + 0.07 * seed, "kl": 0.3 * i + 0.11 * seed})
            if i % 3 == 0:
                rows.append({"iteration": i, "eval/score_mean": 0.2 * i + 0.01 * seed})
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        dirs.append(run)
    return dirs


@pytest.mark.parametrize("mode", ["seeds", "pipeline"])
def test_seed_summary_writes_into_a_missing_folder(tmp_path, capsys, mode):
    """Both modes write through one path that creates the output's missing parent folders."""
    seed_summary = _seed_summary()
    out = tmp_path / "not" / "yet" / "summary.json"
    if mode == "seeds":
        args = [*map(str, _fake_runs(tmp_path / "runs")), "--out", str(out)]
    else:
        args = ["--pipeline", str(REPO / "docs" / "results" / "pipeline_dialogue.json"), "--out", str(out)]
    assert seed_summary.main(args) == 0
    result = json.loads(out.read_text())
    assert len(result["runs"]) == 3 and result["command"] == ""
    if mode == "seeds":
        # The printed summary, ranges formatted by _range_of, is the one it was before: mean (min-max).
        assert capsys.readouterr().err == (
            "[seed_summary] 3 seeds: first score 0.07 (0.00-0.14), final score 0.37 (0.30-0.44), largest KL 1.6 "
            f"(1.5-1.7), held-out score_mean 0.010 -> 0.610 (0.600-0.620); wrote {out}\n")


@pytest.mark.parametrize("task", ["summarize", "dialogue"])
def test_seed_summary_row_prints_the_readme_rows(capsys, task):
    """``--pipeline --row SUMMARY.json`` prints whole lines of the README's table, one per seed, and writes nothing."""
    summary = REPO / "docs" / "results" / f"pipeline_{task}.json"
    assert _seed_summary().main(["--pipeline", "--row", str(summary)]) == 0
    out = capsys.readouterr().out.splitlines()
    readme = README.read_text().splitlines()
    assert len(out) == len(json.loads(summary.read_text())["runs"]) == 3
    assert all(line in readme and line.startswith(f"| {task} | ") for line in out), out


def test_seed_summary_row_is_the_documented_command():
    """The command the module docstring gives, run as a script from the repository root."""
    import subprocess
    import sys

    command = ["experiments/seed_summary.py", "--pipeline", "--row", "docs/results/pipeline_summarize.json"]
    assert " ".join(command) in _seed_summary().__doc__
    proc = subprocess.run([sys.executable, *command], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [line for line in README.read_text().splitlines()
                                        if line.startswith("| summarize | ")]


@pytest.mark.parametrize("case", ["missing", "not_json", "not_pipeline", "no_pipeline_flag", "two_inputs"])
def test_seed_summary_row_rejects_a_bad_input_with_one_line(tmp_path, capsys, case):
    """A bad ``--row`` input: one ``error:`` line on stderr naming the problem, nothing on stdout, exit 2."""
    good = str(REPO / "docs" / "results" / "pipeline_dialogue.json")
    (tmp_path / "text.json").write_text("| a table |\n")
    (tmp_path / "seeds.json").write_text(json.dumps({"runs": [{"run": "seed0", "seed": 0, "score": [0.1]}]}))
    args, reason = {
        "missing": (["--pipeline", "--row", str(tmp_path / "none.json")], "No such file or directory"),
        "not_json": (["--pipeline", "--row", str(tmp_path / "text.json")], "not JSON"),
        "not_pipeline": (["--pipeline", "--row", str(tmp_path / "seeds.json")],
                         "not a seed_summary.py --pipeline summary (run 0 has no task, rm_val_accuracy"),
        "no_pipeline_flag": (["--row", good], "--row takes --pipeline and one summary JSON"),
        "two_inputs": (["--pipeline", "--row", good, good], "--row takes --pipeline and one summary JSON"),
    }[case]
    seed_summary = _seed_summary()
    try:
        code = seed_summary.main(args)
    except SystemExit as e:  # argparse's usage errors exit 2 after its usage line
        code = e.code
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    errors = [line for line in captured.err.splitlines() if "error:" in line]
    assert len(errors) == 1 and reason in errors[0], captured.err
