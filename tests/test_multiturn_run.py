"""Multi-turn runs end to end on a tiny random model: a user environment from `imports:` trains from YAML with
LoRA, logs env metrics and per-turn samples, evaluates held-out episodes, resumes exactly; a broken environment is
one line (exit 2 before training, exit 1 during it with the last good checkpoint kept)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def env_import():
    sys.path.insert(0, str(ROOT / "tests" / "extensions"))
    yield "echo_env"
    sys.path.remove(str(ROOT / "tests" / "extensions"))


def _config(tmp_path, **changes):
    data = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    data.pop("prompts")
    data.update({"task": {"name": "arithmetic", "kwargs": {"num_train": 30}},
                 "prompts": {"max_prompt_tokens": 24},
                 "env": {"name": "echo_turns", "kwargs": {"turns": 2}, "max_turns": 3, "turn_tokens": 5,
                         "observation_tokens": 4},
                 "imports": ["echo_env"], "iterations": 3})
    data["ppo"].update({"response_length": 20, "samples_per_prompt": 2, "advantage_estimator": "grpo",
                        "ppo_epochs": 1})
    data["logging"].update({"tensorboard": False, "samples_every": 1})
    data["checkpoint"]["every"] = 1
    for dotted, value in changes.items():
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _main(*argv):
    from ppojax.cli import main

    return main([str(a) for a in argv])


def _rows(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_user_env_trains_from_yaml_with_lora_evaluates_and_resumes_exactly(tmp_path, env_import):
    config = _config(tmp_path, **{"lora.rank": 4, "lora.targets": "c_attn", "eval.every": 2,
                                  "eval.num_prompts": 4})
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert _main("--config", config, "--run-dir", whole) == 0
    rows = _rows(whole)
    train = [r for r in rows if "env/turns" in r]
    assert [r["iteration"] for r in train] == [1, 2, 3]
    for r in train:
        assert r["env/turns"] == 2.0 and r["env/truncated"] == 0.0 and r["env/observation_tokens"] > 0
    evals = [r for r in rows if "eval/success" in r]
    assert [r["iteration"] for r in evals] == [0, 2, 3] and all(r["eval/turns"] == 2.0 for r in evals)
    samples = [json.loads(line) for line in (whole / "samples.jsonl").read_text().splitlines()]
    assert [t["role"] for t in samples[0]["turns"]] == ["assistant", "user", "assistant"]
    assert samples[0]["turns"][1]["content"] == "again" and "(seed " in samples[0]["prompt"]
    assert (whole / "export-adapter").is_dir()

    from ppojax.cli import evaluate_main  # experiments/evaluate.py plays the held-out episodes of the export

    out = tmp_path / "eval.json"
    assert evaluate_main(["--model", str(whole / "export"), "--task", "arithmetic", "--config",
                          str(whole / "config.yaml"), "--out", str(out), "--import", env_import]) == 0
    record = json.loads(out.read_text())
    assert record["num"] == 4 and record["turns"] == 2.0 and record["env"]["name"] == "echo_turns"
    assert record["score_mean"] == pytest.approx(evals[-1]["eval/score_mean"], abs=0.05)
    assert [t["role"] for t in record["items"][0]["turns"]] == ["assistant", "user", "assistant"]

    from ppojax.train import build_run

    with build_run(str(config), parts) as run:  # stopped after 2 of 3 iterations, then resumed
        assert run.train(callbacks=[lambda it: it.done == 2]).done == 2
    assert _main("--config", config, "--run-dir", parts) == 0
    strip = lambda rs: [{k: v for k, v in r.items() if not k.startswith("time")} for r in rs]  # noqa: E731
    assert strip(_rows(parts)) == strip(rows)


@pytest.mark.parametrize("changes, message", [
    ({"env.name": "echo_turn"}, "env.name='echo_turn': unknown environment; did you mean 'echo_turns'?"),
    ({"env.kwargs": {"turn": 2}}, "env.kwargs.turn: the environment 'echo_turns' takes no such argument; did you "
                                  "mean 'turns'?"),
    ({"env.name": "faulty", "env.kwargs": {"mode": "bad_type"}},
     "env 'faulty' episode 0 (seed "),
    ({"env.name": "faulty", "env.kwargs": {"mode": "raise"}}, "RuntimeError: the sandbox crashed"),
    ({"env.turn_tokens": 50}, "env.turn_tokens=50 exceeds ppo.response_length=20"),
    ({"reward.kind": "lexicon"}, "reward.kind cannot be combined with env.name='echo_turns'"),
    ({"prompts.max_prompt_tokens": 4}, "reset()'s observation is"),
])
def test_a_bad_environment_is_one_line_exit_2_before_training(tmp_path, env_import, capsys, changes, message):
    import echo_env

    echo_env.Faulty.calls = 0
    config = _config(tmp_path, **changes)
    assert _main("--config", config, "--run-dir", tmp_path / "run") == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error" in line]
    assert len(lines) == 1 and message in lines[0], err
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("mode, message", [("raise", "failed at iteration 3: RuntimeError: the sandbox crashed"),
                                           ("hang", "timed out at iteration 3: no result after 1 s (env.timeout_s)"),
                                           ("bad_type", "step() returned list")])
def test_an_environment_that_breaks_during_training_stops_with_exit_1_keeping_the_checkpoint(
        tmp_path, env_import, capsys, mode, message):
    import echo_env

    echo_env.Faulty.calls = 0
    # the check before training makes 4 calls; each iteration plays 16 one-turn episodes: iteration 3 breaks
    config = _config(tmp_path, **{"env.name": "faulty", "env.kwargs": {"mode": mode, "after": 4 + 2 * 16},
                                  "env.timeout_s": 1, "env.max_turns": 1})
    run_dir = tmp_path / "run"
    assert _main("--config", config, "--run-dir", run_dir) == 1
    err = capsys.readouterr().err
    assert "env 'faulty' episode" in err and message in err, err
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()) == ["1", "2"]


@pytest.mark.slow
def test_episodes_on_8_devices_equal_one_device(tmp_path, env_import):
    """Data parallelism: the same run on 1 CPU device and on a data=8 mesh (each in its own process, with its own
    XLA device count) plays the same episodes and makes the same updates."""
    import os
    import subprocess

    config = _config(tmp_path, **{"iterations": 2})
    rows = {}
    for n in (1, 8):
        env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}", "JAX_PLATFORMS": "cpu",
               "PYTHONPATH": os.pathsep.join([str(ROOT / "tests" / "extensions"), str(ROOT)])}
        out = subprocess.run([sys.executable, str(ROOT / "experiments" / "ppo_gpt2.py"), "--config", str(config),
                              "--run-dir", str(tmp_path / f"d{n}"), "--mesh", f"data={n}"],
                             env=env, capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, out.stderr[-2000:]
        rows[n] = _rows(tmp_path / f"d{n}")
    for one, eight in zip(rows[1], rows[8]):
        for k, v in one.items():
            if k.startswith("env/") or k in ("response_length", "score_mean"):
                assert eight[k] == v, k  # the same tokens, so the same episodes
            elif not k.startswith("time") and isinstance(v, float):
                assert eight[k] == pytest.approx(v, rel=1e-4, abs=1e-5), k
    s1 = (tmp_path / "d1" / "samples.jsonl").read_text()
    assert s1 == (tmp_path / "d8" / "samples.jsonl").read_text()


@pytest.mark.slow
def test_a_sweep_over_seeds_of_an_env_config_equals_the_single_runs(tmp_path, env_import):
    """experiments/sweep.py on a multi-turn config: each run plays its own episodes (one run after another inside
    the group) and logs what the single run of its seed logs."""
    from ppojax.cli import sweep_main

    config = _config(tmp_path, **{"iterations": 2, "seed": 1})
    assert sweep_main(["--config", str(config), "--seeds", "0,1", "--run-dir", str(tmp_path / "sweep")]) == 0
    swept = [json.loads(line) for line in (tmp_path / "sweep" / "metrics.jsonl").read_text().splitlines()]
    assert _main("--config", config, "--run-dir", tmp_path / "single") == 0  # seed 1 alone
    single = [r for r in _rows(tmp_path / "single") if "env/turns" in r]
    mine = [r for r in swept if r["seed"] == 1]
    assert [r["iteration"] for r in mine] == [1, 2]
    for a, b in zip(mine, single):
        for k, v in b.items():
            if not k.startswith("time") and k != "iteration":
                assert a[k] == pytest.approx(v, rel=1e-6, abs=1e-7), k
    other = [r for r in swept if r["seed"] == 0]
    assert [r["kl"] for r in other] != [r["kl"] for r in mine]  # seed 0 played other episodes
