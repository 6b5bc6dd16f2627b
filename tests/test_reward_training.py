"""Reward-model training: the loss against its formula, learning a known preference, normalisation, the export
format (save/load round trip, the PPO runner's loader) and train_reward.py's errors."""

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ppojax
from ppojax.rl import preferences, reward_training, rewards

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "experiments"))

V = 64  # a small synthetic vocabulary
MODEL = ppojax.GPT2Config(vocab_size=V, n_positions=16, n_embd=32, n_layer=1, n_head=2)


def _log_softmax(x):
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


@pytest.mark.parametrize("k", [2, 4])
def test_loss_matches_the_softmax_cross_entropy_formula(k):
    rng = np.random.default_rng(k)
    scores = rng.normal(size=(7, k)).astype(np.float32) * 3
    choice = rng.integers(0, k, 7)
    loss, metrics = reward_training.preference_loss(jnp.asarray(scores), jnp.asarray(choice))
    expected = -np.mean(_log_softmax(scores.astype(np.float64))[np.arange(7), choice])
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["accuracy"]), np.mean(scores.argmax(1) == choice), atol=1e-6)
    if k == 2:  # Bradley-Terry: -log sigmoid(s_chosen - s_other)
        diff = scores[np.arange(7), choice] - scores[np.arange(7), 1 - choice]
        np.testing.assert_allclose(float(loss), np.mean(np.log1p(np.exp(-diff.astype(np.float64)))), rtol=1e-5)
    # Parts normalised by the global count add up to the whole (micro-batches, devices); zero weights drop rows.
    a, _ = reward_training.preference_loss(jnp.asarray(scores[:3]), jnp.asarray(choice[:3]), n_total=7.0)
    b, _ = reward_training.preference_loss(jnp.asarray(scores[3:]), jnp.asarray(choice[3:]), n_total=7.0)
    np.testing.assert_allclose(float(a + b), expected, rtol=1e-5)
    w = np.array([1, 1, 1, 0, 0, 0, 0], np.float32)
    part, _ = reward_training.preference_loss(jnp.asarray(scores), jnp.asarray(choice), jnp.asarray(w))
    np.testing.assert_allclose(float(part), float(a) * 7 / 3, rtol=1e-5)


def test_a_tie_is_not_counted_as_correct():
    _, m = reward_training.preference_loss(jnp.zeros((3, 4)), jnp.array([0, 1, 2]))
    assert float(m["accuracy"]) == 0.0


def _synthetic(n, k, rng, valence):
    """Comparisons over the synthetic vocabulary, labeled by the mean valence of the response (true score)."""
    q, r = 4, 6
    tokens = rng.integers(0, V, (n, k, r))
    lengths = rng.integers(3, r + 1, (n, k))  # ragged responses: the score must be read at the last real token
    mask = (np.arange(r) < lengths[..., None]).astype(np.int32)
    tokens = np.where(mask > 0, tokens, V)  # pad id = vocab size, outside the embedding
    true = (valence[np.minimum(tokens, V - 1)] * mask).sum(-1) / mask.sum(-1)
    choice = preferences.choose(true, temperature=0.0, rng=rng)
    q_len = rng.integers(1, q + 1, n)
    q_mask = (np.arange(q) >= q - q_len[:, None]).astype(np.int32)  # left-padded
    q_ids = np.where(q_mask > 0, rng.integers(0, V, (n, q)), V)
    return preferences.PreferenceBatch(query_ids=q_ids.astype(np.int32), query_mask=q_mask,
                                       tokens=tokens.astype(np.int32), mask=mask, choice=choice)


def test_learns_a_known_preference_well_above_chance():
    rng = np.random.default_rng(0)
    valence = rng.normal(size=V).astype(np.float32)
    data = _synthetic(640, 2, rng, valence)
    train, val = preferences.split_preferences(data, 0.2, seed=0)
    cfg = reward_training.RewardTrainConfig(epochs=6, batch_size=32, learning_rate=3e-3)
    lm = ppojax.init_params(MODEL, jax.random.key(0))
    state = reward_training.create_reward_train_state(MODEL, lm, cfg, key=jax.random.key(1))
    before = reward_training.evaluate(MODEL, state.params, val)
    compiled = reward_training.train_epoch._cache_size()
    state, history = reward_training.fit(state, train, cfg, val=val)
    assert reward_training.train_epoch._cache_size() == compiled + 1  # one compilation for all 6 epochs
    after = history[-1]
    assert int(state.step) == 6 * (train.n // 32)
    assert before["accuracy"] < 0.65
    assert after["val/accuracy"] > 0.8, history  # chance is 0.5
    assert after["val/loss"] < before["loss"] - 0.2


def test_normalize_gives_mean_0_std_1_on_the_calibration_set():
    lm = ppojax.init_params(MODEL, jax.random.key(0))
    params = ppojax.init_value_params(MODEL, lm, head_init_std=1 / np.sqrt(33), key=jax.random.key(2))
    rm = rewards.reward_model(MODEL, params)
    data = _synthetic(24, 2, np.random.default_rng(1), np.zeros(V, np.float32))
    q_ids, q_mask = data.query_ids, data.query_mask
    tokens, mask = data.tokens[:, 0], data.mask[:, 0]
    normed = reward_training.normalize_reward_model(rm, q_ids, q_mask, tokens, mask)
    s = np.asarray(normed(np.concatenate([q_ids, tokens], 1), np.concatenate([q_mask, mask], 1)))
    assert abs(s.mean()) < 1e-5 and abs(s.std() - 1) < 1e-4
    raw = np.asarray(rm.raw(np.concatenate([q_ids, tokens], 1), np.concatenate([q_mask, mask], 1)))
    assert raw.std() > 1e-3 and abs(raw.mean()) > 1e-4  # the normalisation had work to do


def test_save_load_round_trip_gives_identical_scores(tmp_path):
    from ppojax.train import run as runner

    lm = ppojax.init_params(MODEL, jax.random.key(0))
    params = ppojax.init_value_params(MODEL, lm, head_init_std=0.3, key=jax.random.key(3))
    rm = rewards.reward_model(MODEL, params, gain=1.7, bias=-0.3)
    data = _synthetic(8, 2, np.random.default_rng(2), np.zeros(V, np.float32))
    ids = np.concatenate([data.query_ids, data.tokens[:, 1]], 1)
    mask = np.concatenate([data.query_mask, data.mask[:, 1]], 1)
    (tmp_path / "rm" / "checkpoints").mkdir(parents=True)  # other files in the directory survive a save
    out = reward_training.save_reward_model(tmp_path / "rm", rm)
    assert {"config.json", "model.safetensors", "reward_head.json", "checkpoints"} <= {p.name for p in out.iterdir()}
    for loaded in (reward_training.load_reward_model(out), runner.load_reward_model(out)):
        np.testing.assert_array_equal(np.asarray(loaded(ids, mask)), np.asarray(rm(ids, mask)))
    # The trunk is a plain transformers GPT-2 checkpoint (head dropped).
    config, trunk = ppojax.load_pretrained(out)
    assert config.n_embd == 32 and "head" not in trunk

    head = json.loads((out / "reward_head.json").read_text())
    assert head["gain"] == pytest.approx(1.7) and head["bias_norm"] == pytest.approx(-0.3)
    head["kernel"] = head["kernel"][:-1]
    (out / "reward_head.json").write_text(json.dumps(head))
    with pytest.raises(ValueError, match="list of 32 finite numbers"):
        reward_training.load_reward_model(out)
    (out / "reward_head.json").unlink()
    with pytest.raises(ValueError, match="not a reward model directory"):
        runner.load_reward_model(out)


def _labels(tmp_path, rows, name="labels.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_train_reward_cli_errors_are_one_line_exit_2(tmp_path, capsys):
    import train_reward

    base = ["--init", "random", "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--n-positions", "32",
            "--out", str(tmp_path / "rm"), "--query-length", "8", "--response-length", "8"]
    good = {"query": "The movie was", "responses": [" fine", " bad"], "choice": 0}
    cases = [
        (["--data", str(tmp_path / "missing.jsonl")], "does not exist"),
        (["--data", str(_labels(tmp_path, [good, dict(good, choice=None)], "unlabeled.jsonl"))],
         "unlabeled.jsonl:2: 'choice' is null"),
        (["--data", str(_labels(tmp_path, [good] * 4)), "--val-fraction", "1.5"], "--val-fraction"),
        (["--data", str(_labels(tmp_path, [good] * 4)), "--query-length", "30"], "context of 32"),
        (["--data", str(_labels(tmp_path, [good] * 4)), "--init", "/nonexistent/model"], "does not exist"),
        (["--data", str(_labels(tmp_path, [good] * 4)), "--lora-rank", "-1"], "--lora-rank must be >= 0"),
        (["--data", str(_labels(tmp_path, [good] * 4)), "--lora-rank", "2", "--lora-targets", "c_attn,q_proj"],
         "LoRA targets ['q_proj'] match no projection"),
        (["--data", str(_labels(tmp_path, [good] * 4)), "--lora-rank", "64"], "LoRA rank 64 is larger"),
    ]
    for extra, words in cases:
        capsys.readouterr()
        assert train_reward.main(base + extra) == 2, extra
        err = capsys.readouterr().err.strip()
        assert err.startswith("train_reward.py: error:") and words in err and "\n" not in err, err
        assert not (tmp_path / "rm").exists()  # a failed start leaves no output directory behind


@pytest.mark.slow
def test_train_reward_cli_trains_exports_and_resumes(tmp_path, capsys):
    import train_reward

    rng = np.random.default_rng(0)
    words = [" good", " great", " bad", " awful", " the", " table"]
    rows = []
    for i in range(48):
        a, b = rng.choice(len(words), 2, replace=False)
        rows.append({"query": f"Item {i} was", "responses": [words[a], words[b]], "choice": 0})
    data = _labels(tmp_path, rows)
    out = tmp_path / "rm"
    argv = ["--data", str(data), "--init", "random", "--n-layer", "1", "--n-head", "2", "--n-embd", "32",
            "--n-positions", "32", "--out", str(out), "--query-length", "8", "--response-length", "4",
            "--batch-size", "16", "--lr", "1e-3", "--normalize", "dataset", "--normalize-samples", "32"]
    assert train_reward.main(argv + ["--epochs", "1"]) == 0
    assert train_reward.main(argv + ["--epochs", "2"]) == 0
    assert "resuming" in capsys.readouterr().err
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [l["epoch"] for l in lines] == [1, 2]
    report = json.loads((out / "train_report.json").read_text())
    assert report["train_comparisons"] + report["val_comparisons"] == 48 and report["val_accuracy"] is not None
    rm = reward_training.load_reward_model(out)
    assert rm.config.n_embd == 32 and report["normalization"]["kind"] == "dataset"
    # A different setting in the same directory is refused, not silently mixed.
    assert train_reward.main(argv + ["--epochs", "3", "--lr", "2e-3"]) == 2


def test_train_reward_refuses_an_out_directory_another_job_holds(tmp_path, capsys):
    import dataclasses
    import subprocess

    import train_reward
    from ppojax.io.atomic import atomic_write_json
    from ppojax.io.lock import LockHolder

    out = tmp_path / "rm"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        record = dict(dataclasses.asdict(LockHolder.of_this_process()), pid=holder.pid, process_start=None)
        atomic_write_json(out / "ppojax.lock", record)
        data = _labels(tmp_path, [{"query": "The movie was", "responses": [" fine", " bad"], "choice": 0}] * 4)
        assert train_reward.main(["--data", str(data), "--init", "random", "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert "is in use by another job" in err and f"PID {holder.pid}" in err and "\n" not in err, err
        assert sorted(p.name for p in out.iterdir()) == ["ppojax.lock"]
    finally:
        holder.kill()
        holder.wait()
