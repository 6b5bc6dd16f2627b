"""The Run API and the one loop: ``ppojax.train.build_run`` gives what the command line gives, ``Run.train`` drives
``ppojax.train.loop.train``, whose callbacks, custom steps, phase timing, non-finite stop and signal handling are
checked here against what a run must do."""

import json
import os
import signal
import threading
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "configs" / "tiny.yaml"


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _metrics(run_dir):
    return [{k: v for k, v in json.loads(line).items() if k != "time_s"}
            for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_build_run_trains_like_the_command_line_and_resumes_exactly(tmp_path):
    from ppojax import cli
    from ppojax.train import build_run

    assert cli.main(["--config", str(TINY), "--run-dir", str(tmp_path / "cli"), "--iterations", "3"]) == 0
    with build_run(TINY, tmp_path / "api", overrides=["iterations=2"]) as run:
        assert run.start == 0 and not run.resuming
        assert run.train().exit_code == 0
    # The same directory, a longer run: resumed from its checkpoint, not started over.
    with build_run(TINY, tmp_path / "api", overrides=["iterations=3"]) as run:
        assert run.resuming and run.start == 2
        seen = []
        outcome = run.train(callbacks=[lambda it: seen.append((it.done, it.total, sorted(it.metrics)))])
    assert outcome.exit_code == 0 and outcome.done == 3 and outcome.stop_reason is None
    assert [s[:2] for s in seen] == [(3, 3)] and "score_mean" in seen[0][2]
    assert _metrics(tmp_path / "api") == _metrics(tmp_path / "cli")
    assert (tmp_path / "api" / "export" / "config.json").is_file()
    assert not (tmp_path / "api" / "ppojax.lock").exists()  # released by the context manager


def test_build_run_without_a_directory_writes_nothing_and_times_phases(tmp_path, monkeypatch):
    from ppojax.train import build_run

    monkeypatch.chdir(tmp_path)
    run = build_run(TINY, overrides=["iterations=2", "logging.tensorboard=false"])
    assert run.run_dir is None and run.checkpointer is None and run.lock is None
    rows = []
    outcome = run.train(timing=True, callbacks=[lambda it: rows.append(dict(it.metrics))])
    assert outcome.exit_code == 0 and len(rows) == 2
    for m in rows:
        phases = m["time/rollout_s"] + m["time/score_s"] + m["time/update_s"]
        assert 0 < phases <= m["time_s"] + 1e-6
    assert list(tmp_path.iterdir()) == []


def test_build_run_refuses_bad_input_in_one_line_and_leaves_no_directory(tmp_path):
    from ppojax.train import RunError, build_run

    with pytest.raises(RunError, match=r"ppo\.minibatch_sise.*did you mean 'minibatch_size'"):
        build_run(TINY, tmp_path / "a", overrides=["ppo.minibatch_sise=8"])
    with pytest.raises(RunError, match="does not exist"):
        build_run(tmp_path / "nope.yaml", tmp_path / "b")
    with pytest.raises(RunError, match="prompt file .*missing.txt does not exist"):
        build_run(TINY, tmp_path / "c", overrides=[f"prompts.path={tmp_path / 'missing.txt'}"])
    assert not any(tmp_path.iterdir())


def test_a_callback_stops_the_loop_and_a_non_finite_metric_stops_it_with_the_reason():
    from ppojax.train import loop

    def step(state, it):
        return state + 1, {"score_mean": 0.5, "loss/total": float("inf") if it == 3 else 1.0}, None

    calls = []
    result = loop.train(0, iterations=10, step=step, callbacks=[lambda it: calls.append(it.done) or it.done == 2])
    assert (result.done, result.stop_reason, result.state) == (2, "callback", 2) and calls == [1, 2]

    seen = []
    result = loop.train(0, iterations=10, step=step, callbacks=[lambda it: seen.append((it.done, it.last, it.error))])
    assert result.stop_reason == "non-finite" and result.done == 4 and "loss/total is inf at iteration 4" in result.error
    assert [s[:2] for s in seen] == [(1, False), (2, False), (3, False), (4, True)] and seen[3][2] == result.error
    assert loop.train(0, iterations=5, step=step, check=None).done == 5  # no check: runs on


def test_the_loop_finishes_the_iteration_on_sigterm_and_restores_the_handlers():
    from ppojax.train import loop

    before = signal.getsignal(signal.SIGTERM)
    saved = []

    def step(state, it):
        if it == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives mid-iteration: the iteration still completes
        return state + 1, {"x": 1.0}, None

    def on_iteration(it):
        if it.last:
            saved.append((it.done, it.signal))

    result = loop.train(0, iterations=10, step=step, callbacks=[on_iteration], handle_signals=True)
    assert result.stop_reason == "signal" and result.signal == signal.SIGTERM and result.done == 2
    assert saved == [(2, signal.SIGTERM)]
    assert signal.getsignal(signal.SIGTERM) is before


def test_the_loop_off_the_main_thread_leaves_signals_alone():
    from ppojax.train import loop

    out = {}

    def body():
        out["result"] = loop.train(0, iterations=3, step=lambda s, it: (s + 1, {}, None), handle_signals=True)

    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert out["result"].done == 3 and out["result"].state == 3


def test_default_step_equals_train_step_on_the_same_prompts():
    """The loop's default step is train_step on prompts.batch(it): the same samples and metrics as calling
    train_step by hand (a slow loop written here)."""
    import jax

    from ppojax.train import build_run, loop

    run = build_run(TINY, overrides=["iterations=2"])
    state0 = run.state
    by_hand, state = [], state0
    for it in range(2):
        state, m = loop.train_step(state, *run.prompt_loader().batch(it))
        by_hand.append(loop.metrics_to_host(m))
    rows = []
    result = loop.train(state0, run.prompt_loader(), iterations=2, donate=False,
                        callbacks=[lambda it: rows.append({k: v for k, v in it.metrics.items() if k != "time_s"})])
    assert rows == by_hand
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(result.state.params)):
        np.testing.assert_array_equal(jax.device_get(a), jax.device_get(b))


def test_resolve_built_stops_chat_models_at_their_end_of_turn_and_records_the_model():
    import dataclasses
    import types

    from ppojax.models import GPT2Config, LlamaConfig
    from ppojax.train.config import ExperimentConfig, ModelConfig
    from ppojax.train.run import resolve_built

    chat = types.SimpleNamespace(chat_template="{{ messages }}", eos_token_id=2, eos_token="<|im_end|>")
    plain = types.SimpleNamespace(chat_template=None, eos_token_id=50256, eos_token="<|endoftext|>")
    llama = LlamaConfig(vocab_size=100, max_position_embeddings=64, hidden_size=48, num_hidden_layers=3,
                        num_attention_heads=6, num_key_value_heads=2, intermediate_size=96)
    pretrained = ExperimentConfig(model=ModelConfig(name_or_path="some/checkpoint"))
    said = []
    cfg = resolve_built(pretrained, chat, llama, log=said.append)
    assert cfg.ppo.eos_token_id == 2 and len(said) == 1 and "<|im_end|>" in said[0]
    assert (cfg.model.family, cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd, cfg.model.n_positions,
            cfg.model.vocab_size, cfg.model.num_key_value_heads, cfg.model.intermediate_size) == (
        "llama", 3, 6, 48, 64, 100, 2, 96)
    # Resolving is idempotent (a resumed run compares equal configs) and leaves set values alone.
    assert resolve_built(cfg, chat, llama) == cfg
    never = dataclasses.replace(pretrained, ppo=dataclasses.replace(pretrained.ppo, eos_token_id=-1))
    assert resolve_built(never, chat, llama).ppo.eos_token_id == -1
    # A tokenizer without a chat template keeps lm-human-preferences' fixed-length responses.
    gpt2 = GPT2Config(vocab_size=50257, n_positions=64, n_embd=32, n_layer=1, n_head=2)
    assert resolve_built(pretrained, plain, gpt2).ppo.eos_token_id is None
    # A random init's model section is already the model built: unchanged.
    random = ExperimentConfig()
    assert resolve_built(random, plain, random.model.random_init_config()) == random
