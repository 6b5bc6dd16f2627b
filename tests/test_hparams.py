"""Hyperparameters as arrays: changing any of them between iterations recompiles nothing, and each one takes effect.

Compilations are counted with ``ppojax.compile_count`` (traces of the library's jitted phases) and, independently,
with a counter inside the reward (Python runs once per trace, never per call).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ppojax
from ppojax.rl.hparams import HPARAM_PATHS, InState
from ppojax.rl.setup import make_setup

VOCAB = 40
MODEL = ppojax.GPT2Config(vocab_size=VOCAB, n_positions=24, n_embd=16, n_layer=1, n_head=2)
TRACES = []


def share_below_8(tokens, mask):
    TRACES.append(1)
    hit = ((tokens < 8) & (mask > 0)).sum(-1)
    return hit.astype(jnp.float32) / jnp.maximum(mask.sum(-1), 1).astype(jnp.float32)


def double_logprob(inputs, *, scale=1.0):
    """A user term: its weight is an array hyperparameter too."""
    return -scale * jnp.sum(inputs.logprobs * inputs.mask) / inputs.n_tokens, {"double_logprob": inputs.n_tokens}


def _configs(**ppo_kw):
    kw = dict(batch_size=8, minibatch_size=8, ppo_epochs=1, response_length=4, temperature=1.0, top_p=0.9,
              dual_clip=3.0, clip_eps_high=0.3, eos_token_id=3, missing_eos_penalty=0.5,
              truncate_token=5, missing_truncate_penalty=-1.0,
              kl=ppojax.KLControlConfig(kind="adaptive", init_coef=0.1, target=2.0, horizon=100.0),
              extra_loss_terms=(ppojax.ExtraLossTerm(name="double", fn="tests.test_hparams:double_logprob",
                                                     weight=0.01),))
    kw.update(ppo_kw)
    opt = ppojax.OptimizerConfig(name="adamw", learning_rate=1e-3, schedule="linear", weight_decay=0.01,
                                 max_grad_norm=1.0)
    return ppojax.PPOConfig(**kw), opt


def _state(seed=0, **ppo_kw):
    ppo, opt = _configs(**ppo_kw)
    params = ppojax.init_params(MODEL, jax.random.key(1))
    return ppojax.create_train_state(MODEL, params, ppo=ppo, reward=ppojax.FunctionReward(share_below_8),
                                     key=jax.random.key(seed), optimizer=opt, total_iterations=20)


def _prompts():
    ids = np.random.RandomState(0).randint(0, VOCAB, (8, 5)).astype(np.int32)
    return jnp.asarray(ids), jnp.ones_like(jnp.asarray(ids))


NEW_VALUES = {
    "learning_rate": 3e-3, "b1": 0.8, "b2": 0.99, "eps": 1e-6, "weight_decay": 0.1, "max_grad_norm": 0.5,
    "temperature": 0.7, "top_p": 0.8, "gamma": 0.9, "lam": 0.8, "clip_eps": 0.1, "clip_eps_high": 0.25,
    "dual_clip": 2.0, "value_clip_eps": 0.4, "vf_coef": 0.5, "entropy_coef": 0.01, "kl_loss_coef": 0.02,
    "missing_truncate_penalty": -2.0, "missing_eos_penalty": 1.0, "kl_target": 4.0, "kl_horizon": 50.0,
}


def test_every_array_hyperparameter_changes_without_recompiling():
    assert set(NEW_VALUES) == set(HPARAM_PATHS.values())  # the test covers every field
    TRACES.clear()
    state = _state()
    prompts = _prompts()
    before = ppojax.compile_count("iteration")
    state, first = ppojax.ppo_iteration(state, *prompts)
    for name, value in NEW_VALUES.items():
        state = ppojax.set_hparams(state, **{name: value})
        state, _ = ppojax.ppo_iteration(state, *prompts)
    state = ppojax.set_hparams(state, term_weights={"double": 0.5})
    state = ppojax.set_hparams(state, **{"ppo.clip_eps": 0.15, "optimizer.learning_rate": 1e-4})
    state, last = ppojax.ppo_iteration(state, *prompts)
    assert ppojax.compile_count("iteration") - before == 1
    assert len(TRACES) == 1
    assert float(state.hparams.clip_eps) == pytest.approx(0.15)
    assert float(state.hparams.term_weights["double"]) == 0.5


def test_configs_that_differ_only_in_array_values_share_one_setup():
    a, opt = _configs(clip_eps=0.2, gamma=1.0)
    b, _ = _configs(clip_eps=0.3, gamma=0.9, kl=ppojax.KLControlConfig(kind="adaptive", init_coef=0.5, target=3.0,
                                                                      horizon=10.0))
    assert make_setup(MODEL, a, opt, 20) is make_setup(MODEL, b, opt, 20)
    c, _ = _configs(batch_size=16)  # a shape: another program
    assert make_setup(MODEL, c, opt, 20) is not make_setup(MODEL, a, opt, 20)
    d, _ = _configs(dual_clip=None)  # switching a term off changes the code
    assert make_setup(MODEL, d, opt, 20) is not make_setup(MODEL, a, opt, 20)


def test_static_setup_refuses_to_be_read_for_an_array_value():
    setup = _state().setup
    assert isinstance(setup.ppo.clip_eps, InState)
    with pytest.raises(TypeError, match="state.hparams"):
        float(setup.ppo.clip_eps)
    with pytest.raises(TypeError, match="state.hparams"):
        _ = setup.optimizer.learning_rate * 2


def test_changed_values_take_effect():
    prompts = _prompts()
    base = _state(seed=3)
    # learning rate 0: the parameters do not move.
    frozen = ppojax.set_hparams(base, learning_rate=0.0)
    after, _ = ppojax.ppo_iteration(frozen, *prompts)
    for x, y in zip(jax.tree.leaves(base.params), jax.tree.leaves(after.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # a different temperature samples differently from the same key, and is what the log-probs are tempered with.
    _, r1 = ppojax.rollout(base, *prompts)
    _, r2 = ppojax.rollout(ppojax.set_hparams(base, temperature=0.3), *prompts)
    assert not np.array_equal(np.asarray(r1.logprobs), np.asarray(r2.logprobs))
    # the KL controller's target steers the coefficient: below the KL it grows, above it shrinks (the first
    # iteration samples from the reference itself, KL 0: the second one tells them apart).
    coefs = []
    for target in (1e-6, 1e3):
        s = ppojax.set_hparams(base, kl_target=target)
        for _ in range(2):
            s, m = ppojax.ppo_iteration(s, *prompts)
        assert float(m["kl"]) > 1e-6
        coefs.append(float(s.kl.coef))
    assert coefs[0] > coefs[1]
    # a user term's weight is an array: its weighted loss follows it.
    _, m = ppojax.ppo_iteration(ppojax.set_hparams(base, term_weights={"double": 2.0}), *prompts)
    _, m0 = ppojax.ppo_iteration(base, *prompts)
    assert float(m["loss/double"]) == pytest.approx(200.0 * float(m0["loss/double"]), rel=1e-5)


def test_switched_off_hyperparameter_cannot_be_switched_on():
    state = _state(dual_clip=None)
    with pytest.raises(ValueError, match="ppo.dual_clip is off"):
        ppojax.set_hparams(state, dual_clip=3.0)
    with pytest.raises(KeyError, match="did you mean 'clip_eps'"):
        ppojax.set_hparams(state, clip_epss=0.1)
    with pytest.raises(KeyError, match="no loss terms"):
        ppojax.set_hparams(state, term_weights={"nope": 1.0})
