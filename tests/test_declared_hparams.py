"""Hyperparameters declared at registration: an estimator or a policy loss written outside the package
(tests/extensions/scaled_gae.py, scaled_policy_loss.py) declares float hyperparameters of its own, and each one is
an array of the train state (set from ``ppo.hparams``, changed by ``set_hparams``, swept) with no edit to the core."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ppojax
from ppojax.io import configlib
from ppojax.rl.hparams import is_array_path
from ppojax.rl.setup import make_setup
from ppojax.train.config import ExperimentConfig
from tests.extensions import scaled_gae, scaled_policy_loss  # noqa: F401  (registers them)

VOCAB = 40
MODEL = ppojax.GPT2Config(vocab_size=VOCAB, n_positions=24, n_embd=16, n_layer=1, n_head=2)


def share_below_8(tokens, mask):
    hit = ((tokens < 8) & (mask > 0)).sum(-1)
    return hit.astype(jnp.float32) / jnp.maximum(mask.sum(-1), 1).astype(jnp.float32)


def _ppo(**kw):
    base = dict(batch_size=8, minibatch_size=8, ppo_epochs=1, response_length=4, temperature=1.0,
                advantage_estimator="scaled_gae", policy_loss="scaled_ppo",
                kl=ppojax.KLControlConfig(kind="fixed", init_coef=0.05))
    base.update(kw)
    return ppojax.PPOConfig(**base)


def _state(ppo):
    params = ppojax.init_params(MODEL, jax.random.key(1))
    return ppojax.create_train_state(MODEL, params, ppo=ppo, reward=ppojax.FunctionReward(share_below_8),
                                     key=jax.random.key(0), optimizer=ppojax.OptimizerConfig(learning_rate=1e-3))


def _prompts():
    ids = np.random.RandomState(0).randint(0, VOCAB, (8, 5)).astype(np.int32)
    return jnp.asarray(ids), jnp.ones_like(jnp.asarray(ids))


def test_declared_hyperparameters_are_arrays_that_take_effect_without_recompiling():
    state = _state(_ppo(hparams={"lam_critic": 0.9}))
    assert {k: float(v) for k, v in state.hparams.declared.items()} == pytest.approx(
        {"lam_critic": 0.9, "policy_scale": 1.0, "reward_scale": 1.0})  # set, default, default
    prompts = _prompts()
    before = ppojax.compile_count("iteration")
    _, base = ppojax.ppo_iteration(state, *prompts)
    tripled = ppojax.set_hparams(state, reward_scale=3.0, **{"ppo.hparams.policy_scale": 0.5})
    _, scaled = ppojax.ppo_iteration(tripled, *prompts)
    assert ppojax.compile_count("iteration") - before == 1
    # The same rollout (same key), the critic's values 0 at the start, no whitening: GAE is linear in the rewards.
    assert float(base["advantage_mean"]) != 0.0
    np.testing.assert_allclose(float(scaled["advantage_mean"]), 3.0 * float(base["advantage_mean"]), rtol=1e-4)
    assert float(base["policy_scale"]) == 1.0 and float(scaled["policy_scale"]) == 0.5  # the loss's keyword


def test_config_value_reaches_the_estimator_and_runs_share_one_setup():
    states = [_state(_ppo(hparams={"reward_scale": c})) for c in (1.0, 2.0)]
    assert states[0].setup is states[1].setup  # one setup, one program
    assert make_setup(MODEL, _ppo(), ppojax.OptimizerConfig(), 1) is make_setup(
        MODEL, _ppo(hparams={"lam_critic": 0.5}), ppojax.OptimizerConfig(), 1)
    _, m1 = ppojax.ppo_iteration(states[0], *_prompts())
    _, m2 = ppojax.ppo_iteration(states[1], *_prompts())
    np.testing.assert_allclose(float(m2["advantage_mean"]), 2.0 * float(m1["advantage_mean"]), rtol=1e-4)


def test_unknown_names_fail_in_one_line_naming_the_closest():
    with pytest.raises(ValueError, match=r"ppo\.hparams\.reward_scal .*did you mean 'reward_scale'") as info:
        _ppo(hparams={"reward_scal": 2.0})
    assert "\n" not in str(info.value) and "scaled_gae" in str(info.value)
    with pytest.raises(ValueError, match="declares none"):
        _ppo(advantage_estimator="gae", policy_loss="ppo", hparams={"reward_scale": 2.0})
    with pytest.raises(ValueError, match="finite number"):
        _ppo(hparams={"reward_scale": float("nan")})
    state = _state(_ppo())
    with pytest.raises(KeyError, match="did you mean 'reward_scale'"):
        ppojax.set_hparams(state, **{"ppo.hparams.reward_scal": 2.0})
    with pytest.raises(KeyError, match="did you mean 'reward_scale'"):
        ppojax.set_hparams(state, reward_scal=2.0)


def test_declarations_that_clash_are_refused_at_registration():
    fn = lambda inputs: (inputs.rewards, None)
    with pytest.raises(ValueError, match="'reward_scale' = 2.0.*declared it = 1.0"):
        ppojax.register_estimator("clashing", fn, hparams={"reward_scale": 2.0})
    with pytest.raises(ValueError, match="shadow the built-in"):
        ppojax.register_estimator("shadowing", fn, hparams={"lam": 0.5})
    with pytest.raises(ValueError, match="already declared|declared it"):
        ppojax.register_policy_loss("clashing_loss", lambda inputs, **kw: (0.0, {}), hparams={"lam_critic": 0.5})
    assert "clashing" not in ppojax.advantages.estimators()
    ppojax.register_estimator("agreeing", fn, hparams={"reward_scale": 1.0})  # the same default: one name


def test_array_paths_and_configs(tmp_path):
    assert is_array_path("ppo.hparams.reward_scale") and is_array_path("ppo.clip_eps")
    assert is_array_path("ppo.extra_loss_terms.length.weight") and not is_array_path("ppo.batch_size")
    path = tmp_path / "run.yaml"
    path.write_text("ppo:\n  advantage_estimator: tests.extensions.scaled_gae:scaled_gae\n  hparams: {lam_critic: 0.9}\n")
    cfg = configlib.load_config(ExperimentConfig, path)
    assert cfg.ppo.hparams == {"lam_critic": 0.9}
    assert cfg.ppo.declared_hparams == {"lam_critic": 0.9, "reward_scale": 1.0}
    cfg = configlib.load_config(ExperimentConfig, path, ["ppo.hparams.reward_scale=0.8"])
    assert cfg.ppo.hparams == {"lam_critic": 0.9, "reward_scale": 0.8}
    with pytest.raises(ValueError, match="did you mean 'lam_critic'"):
        configlib.load_config(ExperimentConfig, path, ["ppo.hparams.lam_critc=0.8"])
