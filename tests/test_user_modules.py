"""Parts written in user modules outside the package, selected from YAML through ``imports:``: a host text reward
(``tests/extensions/text_rewards.py``: ``vowel_share``) and a GAE-style estimator with hyperparameters of its own
(``tests/extensions/scaled_gae.py``: ``reward_scale``, ``lam_critic``). A run trains with both, a sweep over the
estimator's own hyperparameter runs in one compiled program and equals the single runs, and a run resumes
exactly."""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
PROMPTS = REPO / "configs" / "prompts" / "sentiment.txt"
KEYS = ("score_mean", "kl", "loss/total", "entropy")


@pytest.fixture
def config(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # the modules are found from the working directory, as from a checkout
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    data["imports"] = ["tests.extensions.text_rewards", "tests.extensions.scaled_gae"]
    data["prompts"]["path"] = str(PROMPTS)
    data["reward"] = {"kind": "vowel_share", "kwargs": {"vowels": "aeiouy"}}
    data["ppo"].update(advantage_estimator="scaled_gae", hparams={"reward_scale": 2.0})
    data["logging"] = {"tensorboard": False, "samples_every": 0}
    path = tmp_path / "user.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_run_from_yaml_uses_the_user_reward_and_estimator_and_resumes_exactly(config, tmp_path):
    from ppojax import cli
    from ppojax.train import build_run

    run = build_run(config, overrides=["iterations=1"])
    assert run.state.setup.estimator.name == "scaled_gae" and run.reward is None and run.host_reward is not None
    assert float(run.state.hparams.declared["reward_scale"]) == 2.0
    assert float(run.state.hparams.declared["lam_critic"]) == 1.0  # the declared default
    # The host reward is the user's function on the decoded responses (a loop written here).
    tokens = run.tokenizer(["the cat and the dog", "a dog"], return_tensors="np", padding="max_length",
                           max_length=8)
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    texts = [run.tokenizer.decode(i[m > 0], skip_special_tokens=True) for i, m in zip(ids, mask)]
    expected = [sum(c in "aeiouy" for c in t.lower() if c.isalpha()) / sum(c.isalpha() for c in t) for t in texts]
    np.testing.assert_allclose(run.host_reward(ids, mask), expected, rtol=1e-6)

    straight, parts = tmp_path / "straight", tmp_path / "parts"
    assert cli.main(["--config", str(config), "--run-dir", str(straight), "--iterations", "3"]) == 0
    assert cli.main(["--config", str(config), "--run-dir", str(parts), "--iterations", "2"]) == 0
    assert cli.main(["--config", str(config), "--run-dir", str(parts), "--iterations", "3"]) == 0
    a, b = _rows(straight / "metrics.jsonl"), _rows(parts / "metrics.jsonl")
    assert [r["iteration"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b):
        assert {k: ra[k] for k in KEYS} == {k: rb[k] for k in KEYS}
    saved = yaml.safe_load((straight / "config.yaml").read_text())
    assert saved["imports"] == ["tests.extensions.text_rewards", "tests.extensions.scaled_gae"]


def test_a_sweep_over_the_estimators_own_hyperparameter_is_one_program_equal_to_the_single_runs(config, tmp_path,
                                                                                                   capsys):
    from ppojax.train import build_run, loop
    from ppojax.train.sweep_job import run_sweep

    grid = ["ppo.hparams.reward_scale=0.5,4.0"]
    assert run_sweep(config, seeds="1", grid=grid, run_dir=tmp_path / "sweep", overrides=["iterations=2"]) == 0
    assert "2 runs (1 seeds x 2 grid points) in 1 program(s)" in capsys.readouterr().err
    rows = _rows(tmp_path / "sweep" / "metrics.jsonl")
    by_run = {r: [row for row in rows if row["run"] == r] for r in (0, 1)}
    assert [row["ppo.hparams.reward_scale"] for row in (by_run[0][0], by_run[1][0])] == [0.5, 4.0]
    # The hyperparameter reaches the estimator: the two runs' losses differ from the first update on.
    assert by_run[0][0]["loss/total"] != by_run[1][0]["loss/total"]
    # Each run is the single run with that value (width 1 on a CPU: bit-identical programs).
    for r, scale in ((0, 0.5), (1, 4.0)):
        single = build_run(config, overrides=["iterations=2", f"ppo.hparams.reward_scale={scale}"])
        mine = []
        loop.train(single.state, single.prompt_loader(), iterations=2, host_reward=single.host_reward,
                   callbacks=[lambda it: mine.append(it.metrics)])
        for s, m in zip(mine, by_run[r]):
            for k in KEYS:
                np.testing.assert_allclose(m[k], s[k], rtol=1e-6, atol=1e-6, err_msg=f"run {r} {k}")


def test_an_undeclared_hyperparameter_is_one_line(config, tmp_path, capsys):
    from ppojax import cli

    code = cli.main(["--config", str(config), "--run-dir", str(tmp_path / "bad"), "--set",
                     "ppo.hparams.reward_scal=1.0"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "UserWarning" not in line]
    assert code == 2 and len(err) == 1 and "reward_scale" in err[0], err
    assert not (tmp_path / "bad").exists()
