"""experiments/ppo_gpt2.py end to end on the tiny config: files, resume, SIGTERM, export and bad inputs."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "experiments" / "ppo_gpt2.py"
TINY = REPO / "configs" / "tiny.yaml"
REQUIRED = {"iteration", "score_mean", "kl", "kl_coef", "entropy", "time_s"}


def _run(*args, check=True, timeout=600):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stderr[-3000:]}")
    return proc


def _metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def _comparable(m):
    return {k: v for k, v in m.items() if k != "time_s"}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The tiny config run uninterrupted for 4 iterations."""
    run_dir = tmp_path_factory.mktemp("straight")
    _run("--config", TINY, "--run-dir", run_dir, "--iterations", 4)
    return run_dir


def test_run_writes_everything(straight):
    names = {p.name for p in straight.iterdir()}
    assert {"metrics.jsonl", "samples.jsonl", "config.yaml", "checkpoints", "curves.png", "export",
            "tensorboard"} <= names
    metrics = _metrics(straight)
    assert [m["iteration"] for m in metrics] == [1, 2, 3, 4]
    for m in metrics:
        assert REQUIRED <= set(m), REQUIRED - set(m)
        assert all(v is None or np.isfinite(v) for v in m.values())
    samples = [json.loads(line) for line in (straight / "samples.jsonl").read_text().splitlines()]
    assert samples and {"prompt", "response", "score"} <= set(samples[0])
    from matplotlib.image import imread

    assert imread(straight / "curves.png").shape[0] > 200
    assert any((straight / "tensorboard").iterdir())


def test_exported_policy_loads_in_transformers_with_same_logits(straight):
    import jax.numpy as jnp
    import torch
    import transformers

    import ppojax

    model = transformers.GPT2LMHeadModel.from_pretrained(straight / "export").eval()
    config, params = ppojax.load_pretrained(straight / "export")
    ids = np.array([[464, 3807, 373, 845, 922], [50257, 50257, 40, 588, 340]])
    mask = (ids != 50257).astype(np.int64)
    pos = np.maximum(mask.cumsum(-1) - 1, 0)
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(np.where(mask > 0, ids, 0)), attention_mask=torch.tensor(mask),
                    position_ids=torch.tensor(pos)).logits.numpy()
    ours = np.asarray(ppojax.forward(config, params, jnp.asarray(ids), jnp.asarray(mask)))
    np.testing.assert_allclose(ours[mask > 0], ref[mask > 0], atol=1e-4)
    tok = transformers.AutoTokenizer.from_pretrained(straight / "export")
    assert tok("Hello world")["input_ids"] == [15496, 995]


def test_export_of_the_final_checkpoint_equals_the_final_export(straight):
    from safetensors.numpy import load_file

    _run("--config", TINY, "--run-dir", straight, "--iterations", 4, "--export-checkpoint", 4)
    a = load_file(str(straight / "export" / "model.safetensors"))
    b = load_file(str(straight / "export-4" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_resume_gives_identical_metrics(straight, tmp_path):
    run_dir = tmp_path / "resumed"
    _run("--config", TINY, "--run-dir", run_dir, "--iterations", 2)
    assert [m["iteration"] for m in _metrics(run_dir)] == [1, 2]
    proc = _run("--config", TINY, "--run-dir", run_dir, "--iterations", 4)
    assert "resuming" in proc.stderr
    resumed, reference = _metrics(run_dir), _metrics(straight)
    assert [m["iteration"] for m in resumed] == [1, 2, 3, 4]
    for a, b in zip(resumed, reference):
        assert _comparable(a) == _comparable(b), a["iteration"]


def test_sigterm_saves_and_the_run_resumes(tmp_path):
    run_dir = tmp_path / "preempted"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, str(SCRIPT), "--config", str(TINY), "--run-dir", str(run_dir), "--iterations", "200",
           "--set", "checkpoint.every=1000"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    metrics_file = run_dir / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics_file.exists() and metrics_file.read_text().count("\n") >= 2):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert "checkpoint saved" in err
    steps = [int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(steps) == 1
    stopped_at = steps[0]
    assert 2 <= stopped_at < 200
    assert not (run_dir / "export").exists()  # an interrupted run does not export
    _run("--config", TINY, "--run-dir", run_dir, "--iterations", stopped_at + 2, "--set", "checkpoint.every=1000")
    assert [m["iteration"] for m in _metrics(run_dir)] == list(range(1, stopped_at + 3))


def _fails_with(capsys_args, match, run_dir):
    proc = _run(*capsys_args, "--run-dir", run_dir, check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(lines) == 1 and match in lines[0], proc.stderr[-2000:]
    assert not (Path(run_dir) / "checkpoints").exists()  # failed before any compilation or checkpointing


def test_bad_config_key_suggests_the_field(tmp_path):
    _fails_with(["--config", TINY, "--set", "ppo.lerning_rate=1"], "ppo.lerning_rate", tmp_path / "r")
    _fails_with(["--config", TINY, "--set", "ppo.batch_size=12"], "minibatch_size", tmp_path / "r")
    _fails_with(["--config", TINY, "--set", "optimizer.learning_rate=fast"], "optimizer.learning_rate",
                tmp_path / "r")
    _fails_with(["--config", tmp_path / "nope.yaml"], "does not exist", tmp_path / "r")


def test_bad_prompt_files(tmp_path):
    _fails_with(["--config", TINY, "--set", f"prompts.path={tmp_path / 'missing.txt'}"], "does not exist",
                tmp_path / "a")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    _fails_with(["--config", TINY, "--set", f"prompts.path={empty}"], "no prompts", tmp_path / "b")
    long = tmp_path / "long.txt"
    long.write_text("word " * 40 + "\n")
    _fails_with(["--config", TINY, "--set", f"prompts.path={long}", "--set", "prompts.truncate=error"],
                "more than prompts.max_prompt_tokens", tmp_path / "c")
    _fails_with(["--config", TINY, "--set", "prompts.max_prompt_tokens=60"], "exceeds the model's context",
                tmp_path / "d")


def test_unwritable_run_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    proc = _run("--config", TINY, "--run-dir", blocker / "run", check=False, timeout=120)
    assert proc.returncode == 2 and "not writable" in proc.stderr


def test_resume_with_a_different_config_is_refused(straight):
    proc = _run("--config", TINY, "--run-dir", straight, "--set", "ppo.temperature=0.5", check=False, timeout=120)
    assert proc.returncode == 2 and "different config" in proc.stderr and "temperature" in proc.stderr
