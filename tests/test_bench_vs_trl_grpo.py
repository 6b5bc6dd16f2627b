"""benchmarks/vs_trl_grpo.py: its arguments, the job's matched settings, the prompt order both sides train on, the
verifier TRL scores with, the summary and ratio maths, the ``grpo:`` line and the README rows of the committed
result. Fast: runs are faked, nothing is timed or trained (the slow smoke test runs both sides once)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RESULT = REPO / "benchmarks" / "results" / "vs_trl_grpo_cpu.json"


@pytest.fixture(scope="module")
def g(load_benchmark):
    return load_benchmark("vs_trl_grpo")


def test_arguments(g):
    a = g.parse_args([])
    assert (a.iterations, a.repeats, a.job, a.out) == (4, 4, "default", g.DEFAULT_OUT)
    t = g.parse_args(["--tiny"])
    assert (t.iterations, t.repeats, t.job, t.out) == (1, 1, "tiny", None)
    assert g.parse_args(["--table", "x.json"]).out is None
    assert g.parse_args(["--repeats", "2", "--iterations", "3", "--out", "o.json"]).repeats == 2
    with pytest.raises(SystemExit):
        g.parse_args(["--repeats", "0"])


def test_the_ppojax_overrides_make_the_matched_job(g):
    from ppojax.train.run import resolve_config

    job = g.JOBS["default"]
    cfg, _ = resolve_config(g.CONFIG, overrides=g.ppojax_overrides(job, 3, 4, "x.gguf"))
    p, o = cfg.ppo, cfg.optimizer
    assert (cfg.seed, cfg.iterations, cfg.model.name_or_path, cfg.tokenizer) == (3, 4, "x.gguf", "x.gguf")
    assert (p.advantage_estimator, p.samples_per_prompt, p.batch_size, p.minibatch_size, p.ppo_epochs) == \
        ("grpo", 8, 64, 16, 1)
    assert (p.response_length, p.temperature, p.kl_loss_coef, p.kl.kind, p.kl.init_coef, p.clip_eps) == \
        (24, 1.0, 0.05, "fixed", 0.0, 0.2)
    assert p.loss_aggregation == "token-mean" and p.top_k == 0 and p.top_p == 1.0
    assert (o.learning_rate, o.eps, o.max_grad_norm, o.schedule, o.weight_decay) == (1e-3, 1e-5, 1.0, "constant", 0)
    assert (cfg.lora.rank, cfg.lora.alpha) == (8, 16)
    assert cfg.lora.targets == "q_proj,k_proj,v_proj,o_proj"
    assert cfg.task.name == "arithmetic" and cfg.prompts.chat


def test_the_prompt_schedule_is_the_loaders_order(g):
    a = g.prompt_schedule(g.JOBS["default"], 0, 3)
    assert [len(it) for it in a] == [8, 8, 8]
    assert all(re.fullmatch(r"What is \d [+-] \d\?", r["prompt"]) for it in a for r in it)
    assert all(int(r["target"]) == eval(r["prompt"][8:-1]) for it in a for r in it)
    assert a != g.prompt_schedule(g.JOBS["default"], 1, 3)  # the seed orders them


def test_trl_scores_with_ppojaxs_verifier(g):
    from ppojax.tasks.verify import exact_answer

    standalone = g.load_verifier()
    responses = ["7 - 3 = 4.", "The answer is 14", "2 - 7 is -5.", "no number", "1,000", "it is 4 or 5"]
    targets = ["4", "14", "-5", "3", "1000", "4"]
    assert standalone.exact_answer(responses, targets) == exact_answer(responses, targets) == \
        [1.0, 1.0, 1.0, 0.0, 1.0, 0.0]
    assert "jax" not in standalone.__dict__


def _fake_runs(iters: dict, rss: dict, rewards: dict):
    runs = []
    for r in range(len(iters["ppojax"])):
        for side in ("ppojax", "trl"):
            runs.append({"repeat": r, "variant": side, "iteration_median_s": iters[side][r],
                         "first_iteration_s": 2 * iters[side][r], "peak_rss_mib": rss[side][r],
                         "reward_mean": rewards[side][r], "other_processes_cores": 0.1,
                         "prompt_ids": [[1, 2, r]], "update_median_s": 1.0})
    return {"order": [["ppojax", "trl"], ["trl", "ppojax"]][:len(iters["ppojax"])], "runs": runs, "probes": [],
            "busy": {"busy": False}}


def test_summary_ratio_line_and_rows(g):
    run = _fake_runs({"ppojax": [10.0, 12.0], "trl": [30.0, 24.0]}, {"ppojax": [1000, 1200], "trl": [1500, 1500]},
                     {"ppojax": [[0.1, 0.3], [0.2, 0.4]], "trl": [[0.0, 0.2], [0.2, 0.2]]})
    res = g.summarize_runs(g.JOBS["default"], 2, run)
    q = res["ratio"]
    assert q["of_medians"] == pytest.approx(27.0 / 11.0) and q["paired"] == pytest.approx([3.0, 2.0])
    assert (q["min"], q["max"]) == (2.0, 3.0)
    assert res["rss_ratio"] == pytest.approx(1100 / 1500)
    assert res["sides"]["ppojax"]["reward"]["mean"] == pytest.approx([0.15, 0.35])
    assert res["sides"]["trl"]["reward"]["rounds"] == [[0.0, 0.2], [0.2, 0.2]]
    assert res["prompt_mismatch_rounds"] == [] and all("prompt_ids" not in r for r in res["runs"])
    assert g.grpo_line(q["of_medians"]) == "grpo: ppojax 2.5x TRL"
    assert g.grpo_line(2.449) == "grpo: ppojax 2.4x TRL"
    res.update(versions={"trl": "1.12.0"}, machine={"cpu_model": "cpu", "cores": 2, "ram_gib": 1.0}, date="d")
    row = g.readme_row(res)
    assert row.startswith("| **GRPO job**") and row.count(" | ") == 4
    assert "11.00 s/iteration (IQR 10.50-11.50), 1100 MiB" in row and "TRL 1.12.0 GRPO 27.00" in row
    assert "**2.45x**, rounds 2.00-3.00 (>= 2)" in row
    one = g.summarize_runs(g.JOBS["default"], 2, _fake_runs({"ppojax": [10.0], "trl": [30.0]}, {"ppojax": [900],
                                                         "trl": [1000]}, {"ppojax": [[0.1]], "trl": [[0.2]]}))
    one.update(versions={"trl": "1.12.0"})
    assert "| 10.00 s/iteration, 900 MiB | TRL 1.12.0 GRPO 30.00, 1000 MiB | **3.00x**, 1 round (>= 2) |" in \
        g.readme_row(one)
    table = g.markdown_table(res)
    assert "| ppojax | 11.00 | 10.50-11.50 | 10.00-12.00 | 22.00 |" in table
    assert "- trl: 0.100 0.200 (0.00 0.20; 0.20 0.20)" in table


def test_a_round_with_other_prompts_is_reported(g):
    run = _fake_runs({"ppojax": [1.0], "trl": [2.0]}, {"ppojax": [1], "trl": [1]},
                     {"ppojax": [[0.0]], "trl": [[0.0]]})
    run["runs"][1]["prompt_ids"] = [[9]]
    assert g.summarize_runs(g.JOBS["default"], 1, run)["prompt_mismatch_rounds"] == [0]


def test_the_ppojax_set_overrides_are_recorded_and_read_back(g):
    """A result records ``--ppojax-set`` as given (``hyperparameters.ppojax_set``) and ``ppojax_extra`` reads that
    list, not the tail of ``ppojax_overrides``; every row and command built from a result shows them."""
    job = g.JOBS["default"]
    sets = ["ppo.reuse_sampler_logprobs=true", "model.remat=none"]
    hp = g.hyperparameters(job, 3, sets)
    assert hp["ppojax_set"] == sets and hp["ppojax_overrides"] == g.ppojax_overrides(job, 0, 3, "<gguf>",
                                                                                     tuple(sets))[1:]
    assert g.hyperparameters(job, 3)["ppojax_set"] == []
    res = {"job": job, "iterations": 3, "repeats": 2, "hyperparameters": hp}
    assert g.ppojax_extra(res) == sets
    assert g.reproduce(res).endswith(" --ppojax-set ppo.reuse_sampler_logprobs=true --ppojax-set model.remat=none")
    # The recorded list wins over slicing: a job whose own overrides grew would shift the slice, not this.
    res["hyperparameters"] = {**hp, "ppojax_overrides": ["extra.own=1", *hp["ppojax_overrides"]]}
    assert g.ppojax_extra(res) == sets
    assert g.ppojax_extra({**res, "hyperparameters": {**hp, "ppojax_set": []}}) == []


def test_a_result_without_ppojax_set_falls_back_to_the_overrides_tail(g):
    """Results written before ``ppojax_set`` (the committed ones): the overrides after the job's own."""
    job = g.JOBS["default"]
    old = {k: v for k, v in g.hyperparameters(job, 3, ["ppo.reuse_sampler_logprobs=true"]).items()
           if k != "ppojax_set"}
    assert g.ppojax_extra({"job": job, "iterations": 3, "hyperparameters": old}) == ["ppo.reuse_sampler_logprobs=true"]
    plain = {k: v for k, v in g.hyperparameters(job, 3).items() if k != "ppojax_set"}
    assert g.ppojax_extra({"job": job, "iterations": 3, "hyperparameters": plain}) == []
    assert g.ppojax_extra({"job": job, "iterations": 3}) == []
    committed = {"vs_trl_grpo_cpu.json": [], "vs_trl_grpo_reuse_cpu.json": ["ppo.reuse_sampler_logprobs=true"]}
    for name, sets in committed.items():
        res = json.loads((RESULT.parent / name).read_text())
        assert "ppojax_set" not in res["hyperparameters"] and g.ppojax_extra(res) == sets


@pytest.mark.parametrize("name", ["vs_trl_grpo_cpu.json", "vs_trl_grpo_reuse_cpu.json"])
def test_committed_result_and_the_readme_rows(g, name):
    res = json.loads((RESULT.parent / name).read_text())
    assert res["benchmark"] == "vs_trl_grpo" and not res["tiny"] and res["prompt_mismatch_rounds"] == []
    assert res["versions"]["trl"] == "1.12.0" and res["machine"]["cores"] >= 1
    for side in ("ppojax", "trl"):
        s = res["sides"][side]
        assert s["iteration_s"]["n"] == res["repeats"] == len(s["reward"]["rounds"])
        assert all(len(c) == res["iterations"] for c in s["reward"]["rounds"])
    q = res["ratio"]
    assert q["of_medians"] == pytest.approx(res["sides"]["trl"]["iteration_s"]["median"]
                                            / res["sides"]["ppojax"]["iteration_s"]["median"])
    readme = (REPO / "README.md").read_text()
    assert g.readme_row(res) in readme.splitlines()
    bench_readme = (REPO / "benchmarks" / "README.md").read_text()
    assert g.markdown_table(res) in bench_readme
    assert g.grpo_line(q["of_medians"]) in bench_readme


@pytest.mark.slow
def test_both_sides_run_one_tiny_iteration(tmp_path):
    out = tmp_path / "grpo.json"
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "vs_trl_grpo.py"), "--tiny", "--force", "--out",
                        str(out)], capture_output=True, text=True, cwd=REPO, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    assert re.search(r"^grpo: ppojax \d+\.\dx TRL$", r.stdout, re.M), r.stdout[-2000:]
    res = json.loads(out.read_text())
    assert res["prompt_mismatch_rounds"] == []
    for side in ("ppojax", "trl"):
        s = res["sides"][side]
        assert s["iteration_s"]["median"] > 0 and s["peak_rss_mib"]["median"] > 0
        assert len(s["reward"]["rounds"][0]) == 1
    runs = {r["variant"]: r for r in res["runs"]}
    assert runs["ppojax"]["eos_token_id"] == runs["trl"]["eos_token_id"]  # both end at <|im_end|>
