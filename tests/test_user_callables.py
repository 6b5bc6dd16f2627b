"""User callables of every kind -- an advantage estimator, a policy loss, a loss term, a reward -- named in a config
as 'module:function' (or a module under imports: that registers one): a module that is missing, has a syntax error
or raises on import, or a function of the wrong signature, is one line naming the config key, exit code 2 before
anything compiles, and no run directory left. And a host reward that raises, hangs past reward.timeout_s or
outlives a signal is one HostCallError line."""

import signal
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "configs" / "tiny.yaml"

# Right signatures (the tests' own), then a wrong one per kind: what the iteration passes does not fit.
GOOD = {
    "estimator": "def {name}(inputs):\n    return inputs.scores[:, None] * inputs.mask, None\n",
    "loss": "def {name}(inputs, *, clip_eps, clip_eps_high, dual_clip):\n"
            "    return (inputs.logprobs * inputs.mask).sum() / inputs.n_tokens, {{'policy_loss': 0.0}}\n",
    "term": "def {name}(inputs):\n    return (inputs.logprobs * inputs.mask).sum() / inputs.n_tokens, {{}}\n",
    "reward": "import jax.numpy as jnp\n\ndef {name}(tokens, mask):\n"
              "    return jnp.zeros(tokens.shape[0], jnp.float32)\n",
}
WRONG = {
    "estimator": "def {name}(inputs, baseline):\n    return inputs.mask, None\n",
    "loss": "def {name}(inputs):\n    return inputs.mask.sum(), {{}}\n",
    "term": "def {name}(inputs, scale):\n    return scale * inputs.mask.sum(), {{}}\n",
    "reward": "def {name}(tokens):\n    return tokens\n",
}
BROKEN = {"syntax": "def broken(:\n", "raises": "raise RuntimeError('boom at import')\n"}
EXPECT = {  # what the one line says after the key
    "missing": "ModuleNotFoundError: No module named",
    "syntax": "SyntaxError: invalid syntax",
    "raises": "RuntimeError: boom at import",
    "signature": "TypeError: ",
}
KEYS = {"estimator": "ppo.advantage_estimator", "loss": "ppo.policy_loss", "term": "ppo.extra_loss_terms[0].fn",
        "reward": "reward.function"}


def _flags(kind, spec):
    return {"estimator": ["--set", f"ppo.advantage_estimator={spec}"],
            "loss": ["--set", f"ppo.policy_loss={spec}"],
            "term": ["--set", "ppo.extra_loss_terms=[{name: mine, fn: '%s'}]" % spec],
            "reward": ["--set", "reward.kind=function", "--set", f"reward.function={spec}"]}[kind]


def _module(tmp_path, monkeypatch, kind, mode):
    """A module written for this case (a name never imported before), on sys.path; its 'module:function' spec."""
    name = f"user_{kind}_{mode}_{uuid.uuid4().hex[:8]}"
    fn = f"my_{kind}"
    if mode != "missing":
        source = WRONG[kind] if mode == "signature" else BROKEN[mode]
        (tmp_path / f"{name}.py").write_text(source.format(name=fn))
    monkeypatch.syspath_prepend(str(tmp_path))
    return f"{name}:{fn}"


def _one_line(err):
    lines = [line for line in err.splitlines() if line.startswith(("ppo_gpt2.py: error:", "sweep.py: error:"))]
    assert len(lines) == 1, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    return lines[0]


@pytest.mark.parametrize("mode", ["missing", "syntax", "raises", "signature"])
@pytest.mark.parametrize("kind", ["estimator", "loss", "term", "reward"])
def test_bad_user_callable_is_one_line_naming_its_key(tmp_path, monkeypatch, capsys, kind, mode):
    from ppojax import cli

    spec = _module(tmp_path, monkeypatch, kind, mode)
    run_dir = tmp_path / "run"
    code = cli.main(["--config", str(TINY), "--run-dir", str(run_dir), "--iterations", "1", *_flags(kind, spec)])
    line = _one_line(capsys.readouterr().err)
    assert code == 2, line
    assert line.startswith(f"ppo_gpt2.py: error: {KEYS[kind]}={spec!r}") or f": {KEYS[kind]}={spec!r}: " in line
    assert EXPECT[mode] in line, line
    if mode != "signature":
        assert f"cannot import module {spec.split(':')[0]!r}" in line, line
    assert not run_dir.exists()  # nothing written: no config.yaml, metrics or TensorBoard file


@pytest.mark.parametrize("mode", ["missing", "syntax", "raises"])
def test_bad_module_under_imports_is_one_line(tmp_path, monkeypatch, capsys, mode):
    from ppojax import cli

    spec = _module(tmp_path, monkeypatch, "reward", mode)
    module = spec.split(":")[0]
    run_dir = tmp_path / "run"
    code = cli.main(["--config", str(TINY), "--run-dir", str(run_dir), "--import", module])
    line = _one_line(capsys.readouterr().err)
    assert code == 2 and f"module {module!r} could not be imported" in line and EXPECT[mode] in line, line
    assert not run_dir.exists()


def test_good_callables_of_every_kind_pass_the_check(tmp_path, monkeypatch):
    """The check refuses only what is wrong: right signatures of all four kinds together build a run."""
    from ppojax.train.callables import user_callables
    from ppojax.train import build_run

    name = f"user_good_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text("\n".join(GOOD[k].format(name=f"my_{k}") for k in GOOD))
    monkeypatch.syspath_prepend(str(tmp_path))
    flags = [f for k in GOOD for f in _flags(k, f"{name}:my_{k}")]
    overrides = [flags[i + 1] for i in range(0, len(flags), 2)]
    run = build_run(TINY, overrides=overrides)
    assert set(user_callables(run.config)) == set(KEYS.values())


@pytest.mark.parametrize("kind,mode", [("estimator", "raises"), ("term", "signature")])
def test_sweep_gives_the_same_one_line(tmp_path, monkeypatch, capsys, kind, mode):
    from ppojax import cli

    spec = _module(tmp_path, monkeypatch, kind, mode)
    run_dir = tmp_path / "sweep"
    code = cli.sweep_main(["--config", str(TINY), "--run-dir", str(run_dir), "--iterations", "1",
                           *_flags(kind, spec)])
    line = _one_line(capsys.readouterr().err)
    assert code == 2 and f"{KEYS[kind]}={spec!r}" in line and EXPECT[mode] in line, line
    assert not run_dir.exists()


# ----------------------------------------------------------------------------------------------------------------
# Host calls: a reward that raises, hangs or outlives a signal


def _reward(fn, label="reward.kind='test'", timeout_s=None):
    def host_reward(tokens, mask):
        return fn(tokens)

    host_reward.label, host_reward.timeout_s, host_reward.timeout_key = label, timeout_s, "reward.timeout_s"
    return host_reward


def _score(host_reward):
    from ppojax.train.loop import score_on_host

    tokens = np.ones((2, 3), np.int32)
    return score_on_host(host_reward, tokens, tokens, tokens, tokens)


def test_host_reward_result_comes_back():
    np.testing.assert_array_equal(_score(_reward(lambda t: np.array([1.0, 2.0]))), [1.0, 2.0])


def test_host_reward_that_raises_is_one_line():
    from ppojax.train.loop import HostCallError

    def broken(tokens):
        raise ValueError("the scorer broke\nand a second line")

    with pytest.raises(HostCallError) as e:
        _score(_reward(broken))
    assert e.value.line(3) == "reward.kind='test' failed at iteration 3: ValueError: the scorer broke"


def test_host_reward_past_its_timeout_is_abandoned():
    from ppojax.train.loop import HostCallError

    release = threading.Event()
    t0 = time.monotonic()
    with pytest.raises(HostCallError) as e:
        _score(_reward(lambda t: release.wait(60), timeout_s=0.3))
    release.set()
    assert time.monotonic() - t0 < 5
    assert e.value.line(2) == ("reward.kind='test' timed out at iteration 2: no result after 0.3 s "
                               "(reward.timeout_s)")


def test_signal_abandons_a_stuck_host_reward(monkeypatch):
    """SIGTERM while the reward hangs: the main thread, waiting in short slices, gives up after the grace period."""
    from ppojax.train import loop

    monkeypatch.setattr(loop, "SIGNAL_GRACE_S", 0.2)
    release = threading.Event()
    stop = loop.StopSignal()
    t0 = time.monotonic()
    with stop.installed(), pytest.raises(loop.HostCallError) as e:
        threading.Timer(0.2, lambda: signal.raise_signal(signal.SIGTERM)).start()
        _score(_reward(lambda t: release.wait(60)))
    release.set()
    assert time.monotonic() - t0 < 5 and stop.signal == signal.SIGTERM
    assert "was abandoned" in e.value.line() and "SIGTERM" in e.value.line()


def test_reward_timeout_is_a_config_field():
    from ppojax.train.config import RewardConfig

    assert RewardConfig().timeout_s == 600
    assert RewardConfig(timeout_s=None).timeout_s is None
    with pytest.raises(ValueError, match="reward.timeout_s"):
        RewardConfig(timeout_s=-1)


def test_a_registered_user_estimator_of_the_wrong_signature_is_one_line(tmp_path, monkeypatch, capsys):
    """Named by its registered name (the module under imports:), not 'module:function': the same check."""
    from ppojax import cli

    name = f"user_registered_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(
        "import ppojax\n\n\n@ppojax.register_estimator('wrong_" + name + "')\n"
        "def wrong_estimator(inputs, baseline):\n    return inputs.mask, None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    run_dir = tmp_path / "run"
    code = cli.main(["--config", str(TINY), "--run-dir", str(run_dir), "--import", name,
                     "--set", f"ppo.advantage_estimator=wrong_{name}"])
    line = _one_line(capsys.readouterr().err)
    assert code == 2 and f"ppo.advantage_estimator='wrong_{name}' fails when the iteration is traced" in line, line
    assert "wrong_estimator() missing 1 required positional argument: 'baseline'" in line, line
    assert not run_dir.exists()


RAISING_REWARDS = '''
import jax
import jax.numpy as jnp
import numpy as np

import ppojax


@ppojax.register_reward("{name}_host", host=True)
def host_raises(responses):
    raise ValueError("the scorer broke\\nsecond line")


def _callback(tokens):
    raise ValueError("the callback broke\\nsecond line")


@ppojax.register_reward("{name}_jit")
def callback_raises(tokens, mask):
    return jax.pure_callback(_callback, jax.ShapeDtypeStruct((tokens.shape[0],), jnp.float32), tokens)
'''


@pytest.mark.slow
@pytest.mark.parametrize("where", ["host", "jit"])
def test_a_reward_that_raises_at_run_time_is_one_line_and_exit_1(tmp_path, monkeypatch, capsys, where):
    """Inside the host reward or a jittable reward's callback: one line naming the reward and the iteration, exit
    code 1, no checkpoint written past the last good one (none here), the lock released."""
    from ppojax import cli

    name = f"user_raising_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(RAISING_REWARDS.replace("{name}", name))
    monkeypatch.syspath_prepend(str(tmp_path))
    run_dir = tmp_path / "run"
    code = cli.main(["--config", str(TINY), "--run-dir", str(run_dir), "--import", name,
                     "--set", f"reward.kind={name}_{where}"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error" in line.lower()]
    assert code == 1 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    what = "the scorer broke" if where == "host" else "the callback broke"
    assert lines[0] == (f"[ppojax] error: reward.kind='{name}_{where}' failed at iteration 1: ValueError: {what}. "
                        "No checkpoint was saved yet: a rerun starts over."), lines[0]
    assert not (run_dir / "ppojax.lock").exists() and not (run_dir / "checkpoints" / "1").exists()
