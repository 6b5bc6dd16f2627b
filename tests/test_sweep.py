"""Sweeps: a vmapped run equals the single run, one compilation per group, 1 and 8 devices agree, exact resume, and
the bad inputs refused in one line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import ppojax
from ppojax.io import configlib
from ppojax.io.data import PromptLoader
from ppojax.train import run as runner
from ppojax.train import sweep as sw
from ppojax.train.build import create_state
from ppojax.train.config import ExperimentConfig

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
TOL = 2e-5


def _tiny_data(**over):
    data = configlib.load_yaml(TINY)
    return configlib.apply_overrides(data, [f"{k}={v}" for k, v in over.items()], ExperimentConfig)


def _single_run(cfg, iterations):
    """The run experiments/ppo_gpt2.py does for this config, step by step: metrics per iteration and the state."""
    tok = ppojax.load_tokenizer(cfg.tokenizer)
    _, ids, mask = runner.load_prompts(cfg, TINY.parent, tok)
    model_config, params = runner.build_model(cfg)
    reward, _ = runner.build_reward(cfg, tok, model_config, TINY.parent)
    state = create_state(cfg, model_config, params, reward)
    loader = PromptLoader(ids, mask, cfg.ppo.prompts_per_iteration, cfg.seed, cfg.prompts.shuffle)
    history = []
    for it in range(iterations):
        state, m = ppojax.train_step(state, *loader.batch(it))
        history.append({k: float(v) for k, v in m.items()})
    return history, state, loader


def test_vmapped_runs_equal_single_runs_in_samples_and_metrics():
    runs = sw.plan_runs(_tiny_data(), ExperimentConfig, [0, 5], {"ppo.clip_eps": [0.1, 0.3],
                                                               "optimizer.learning_rate": [1e-3]})
    (group,) = sw.build_groups(runs, TINY.parent)
    assert group.axes.shared_frozen and group.axes.shared_reward  # the reference and the lexicon held once
    rows = [group.step(it) for it in range(2)]
    ids, mask = group.prompts(2)
    _, batch = sw._vmapped("rollout", group.state.setup, group.axes, None, False)(group.state, ids, mask)
    for r, run in enumerate(group.runs):
        history, state, loader = _single_run(run.config, 2)
        for it in range(2):
            for k in ("score_mean", "kl", "entropy", "loss/total", "approx_kl", "grad_norm", "kl_coef"):
                np.testing.assert_allclose(rows[it][r][k], history[it][k], atol=TOL, err_msg=f"run {r} {k} it {it}")
        _, single = ppojax.rollout(state, *loader.batch(2))
        np.testing.assert_array_equal(np.asarray(batch.tokens[r]), np.asarray(single.tokens), err_msg=f"run {r}")


def test_one_compilation_per_group():
    # a response length no other test uses, so no program is already compiled
    runs = sw.plan_runs(_tiny_data(iterations=2, **{"ppo.response_length": 5}), ExperimentConfig, [0, 1],
                        {"ppo.clip_eps": [0.1, 0.2], "ppo.batch_size": [16, 32]})
    groups = sw.build_groups(runs, TINY.parent)
    assert len(groups) == 2 and sorted(g.n for g in groups) == [4, 4]
    before = ppojax.compile_count("sweep/iteration")
    for it in range(2):
        for g in groups:
            g.step(it)
    assert ppojax.compile_count("sweep/iteration") - before == 2


@pytest.mark.slow
def test_one_and_eight_devices_give_the_same_sweep(tmp_path):
    code = (
        "import os, sys, json\n"
        "os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "import jax\n"
        "from ppojax.train.sweep import sweep\n"
        "logs = []\n"
        "out = {}\n"
        "for n in (1, 8):\n"
        f"    res = sweep({str(TINY)!r}, seeds=[0, 1, 2], grid={{'ppo.clip_eps': [0.1, 0.3]}}, iterations=2,\n"
        "                devices=jax.devices()[:n], log=logs.append)\n"
        "    out[n] = {k: res.metrics[k].tolist() for k in ('score_mean', 'kl', 'loss/total', 'entropy')}\n"
        "print(json.dumps({'out': out, 'logs': logs}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    one, eight = result["out"]["1"], result["out"]["8"]
    for k in one:
        np.testing.assert_allclose(eight[k], one[k], atol=TOL, err_msg=k)
    # 6 runs on 8 devices: padded, and said so once
    assert any("padding with 2 copies" in line for line in result["logs"]), result["logs"]


def _sweep_cli(*args, timeout=900):
    return subprocess.run([sys.executable, str(REPO / "experiments" / "sweep.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_cli_resume_is_exact_and_equals_the_single_run_command(tmp_path):
    common = ["--config", TINY, "--seeds", "3,7", "--grid", "ppo.clip_eps=0.1,0.3", "--set", "checkpoint.every=2"]
    full = _sweep_cli(*common, "--iterations", 4, "--run-dir", tmp_path / "full")
    assert full.returncode == 0, full.stderr[-3000:]
    part = _sweep_cli(*common, "--iterations", 2, "--run-dir", tmp_path / "resumed")
    assert part.returncode == 0, part.stderr[-3000:]
    rest = _sweep_cli(*common, "--iterations", 4, "--run-dir", tmp_path / "resumed")
    assert rest.returncode == 0 and "resuming" in rest.stderr, rest.stderr[-3000:]
    a, b = _rows(tmp_path / "full"), _rows(tmp_path / "resumed")
    assert [(r["run"], r["iteration"]) for r in a] == [(r["run"], r["iteration"]) for r in b]
    assert sorted({(r["run"], r["iteration"]) for r in a}) == [(run, it) for run in range(4) for it in (1, 2, 3, 4)]
    for ra, rb in zip(a, b):
        for k in ("score_mean", "kl", "loss/total", "kl_coef", "ppo.clip_eps", "seed"):
            assert ra[k] == rb[k], (k, ra["run"], ra["iteration"])
    for name in ("summary.md", "sweep.png", "sweep.json"):
        assert (tmp_path / "full" / name).exists()
    assert "| ppo.clip_eps | seeds | score |" in (tmp_path / "full" / "summary.md").read_text()

    # run 3 (seed 7, clip 0.3) is what the single-run command does with those settings
    single_dir = tmp_path / "single"
    proc = subprocess.run([sys.executable, str(REPO / "experiments" / "ppo_gpt2.py"), "--config", str(TINY),
                           "--seed", "7", "--set", "ppo.clip_eps=0.3", "--iterations", "4", "--run-dir",
                           str(single_dir), "--set", "checkpoint.every=2"],
                          capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = [json.loads(line) for line in (single_dir / "metrics.jsonl").read_text().splitlines()]
    mine = [r for r in a if r["run"] == 3]
    assert mine[0]["seed"] == 7 and mine[0]["ppo.clip_eps"] == 0.3
    for s, m in zip(single, mine):
        for k in ("score_mean", "kl", "loss/total", "entropy"):
            np.testing.assert_allclose(m[k], s[k], atol=TOL, err_msg=f"{k} at iteration {s['iteration']}")


@pytest.mark.parametrize("args, message", [
    (["--grid", "ppo.clip_epss=0.1,0.2"], "did you mean 'clip_eps'"),
    (["--grid", "ppo.clip_eps=0.1,abc"], "ppo.clip_eps"),
    (["--grid", "ppo.clip_eps=0.1,,0.2"], "empty value"),
    (["--grid", "iterations=2,3"], "cannot vary"),
    (["--grid", "seed=1,2"], "use --seeds"),
    (["--seeds", "0"], "must be >= 1"),
    (["--grid", "ppo.batch_size=12"], "batch_size"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    proc = _sweep_cli("--config", TINY, "--run-dir", tmp_path / "bad", *args, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert not (tmp_path / "bad").exists()
