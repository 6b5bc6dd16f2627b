"""GRPO, Dr. GRPO, RLOO and REINFORCE++ against slow loops written here from the papers' formulas, and the
estimator registry's contract."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ppojax
from ppojax import advantages

RNG = np.random.default_rng(0)
K = 4
SCORES = RNG.normal(size=12).astype(np.float32)
MASK = (RNG.uniform(size=(12, 7)) > 0.3).astype(np.int32)
MASK[:, 0] = 1
MASK[5] = 0  # a row with no real token gets 0 everywhere


def _loop_group_stats(scores, k):
    means, stds = [], []
    for g in range(len(scores) // k):
        s = [float(x) for x in scores[g * k:(g + 1) * k]]
        m = sum(s) / k
        means += [m] * k
        stds += [math.sqrt(sum((x - m) ** 2 for x in s) / (k - 1))] * k  # Bessel's correction
    return means, stds


def _on_tokens(per_seq, mask):
    out = np.zeros(mask.shape)
    for i in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            out[i, t] = per_seq[i] if mask[i, t] else 0.0
    return out


def test_grpo_standardises_within_each_group():
    means, stds = _loop_group_stats(SCORES, K)
    want = _on_tokens([(s - m) / (sd + 1e-6) for s, m, sd in zip(SCORES, means, stds)], MASK)
    np.testing.assert_allclose(advantages.grpo(SCORES, MASK, group_size=K), want, rtol=1e-5, atol=1e-6)
    want_eps = _on_tokens([(s - m) / (sd + 0.5) for s, m, sd in zip(SCORES, means, stds)], MASK)
    np.testing.assert_allclose(advantages.grpo(SCORES, MASK, group_size=K, eps=0.5), want_eps, rtol=1e-5, atol=1e-6)


def test_dr_grpo_only_centres():
    means, _ = _loop_group_stats(SCORES, K)
    want = _on_tokens([s - m for s, m in zip(SCORES, means)], MASK)
    np.testing.assert_allclose(advantages.grpo(SCORES, MASK, group_size=K, scale_by_std=False), want, atol=1e-6)


def test_rloo_leaves_one_out():
    want = []
    for i, s in enumerate(SCORES):
        g = i // K
        others = [float(SCORES[j]) for j in range(g * K, (g + 1) * K) if j != i]
        want.append(float(s) - sum(others) / len(others))
    np.testing.assert_allclose(advantages.rloo(SCORES, MASK, group_size=K), _on_tokens(want, MASK), atol=1e-6)
    # the identity A_i = k/(k-1) (s_i - mean_g)
    means, _ = _loop_group_stats(SCORES, K)
    np.testing.assert_allclose(advantages.rloo(SCORES, MASK, group_size=K),
                               _on_tokens([K / (K - 1) * (s - m) for s, m in zip(SCORES, means)], MASK), atol=1e-5)


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_reinforce_pp_whitens_discounted_returns_over_real_tokens(gamma):
    rewards = RNG.normal(size=MASK.shape).astype(np.float32)
    rewards[MASK == 0] = 1e6  # padding must not leak
    returns = np.zeros(MASK.shape)
    for i in range(MASK.shape[0]):
        g = 0.0
        for t in reversed(range(MASK.shape[1])):
            if MASK[i, t]:
                g = rewards[i, t] + gamma * g
                returns[i, t] = g
    real = returns[MASK > 0]
    mean, var = real.mean(), ((real - real.mean()) ** 2).mean()  # biased variance, as ppojax.whiten
    want = np.where(MASK > 0, (returns - mean) / np.sqrt(var + 1e-8), 0.0)
    np.testing.assert_allclose(advantages.reinforce_pp(rewards, MASK, gamma=gamma), want, rtol=1e-4, atol=1e-5)


def test_group_estimators_refuse_a_group_that_does_not_divide():
    with pytest.raises(ValueError, match="does not divide"):
        advantages.grpo(SCORES[:10], MASK[:10], group_size=K)
    with pytest.raises(ValueError, match=">= 2"):
        advantages.rloo(SCORES, MASK, group_size=1)


def test_registry_names_and_errors():
    assert {"gae", "grpo", "dr_grpo", "rloo", "reinforce_pp"} <= set(advantages.estimators())
    assert advantages.get_estimator("gae").needs_critic and not advantages.get_estimator("grpo").needs_critic
    with pytest.raises(ValueError, match="did you mean 'grpo'"):
        advantages.get_estimator("gpro")
    with pytest.raises(ImportError, match="advantage estimator"):
        advantages.get_estimator("no_such_module_xyz:fn")


def test_estimator_output_is_checked_before_compiling():
    def wrong_shape(inputs):
        return inputs.scores, None  # [batch], not [batch, time]

    def not_a_pair(inputs):
        return inputs.rewards

    model = ppojax.GPT2Config(vocab_size=16, n_positions=16, n_embd=8, n_layer=1, n_head=2)
    params = ppojax.init_params(model, jax.random.key(0))
    reward = ppojax.FunctionReward(lambda t, m: jnp.zeros(t.shape[0], jnp.float32))
    for fn, message in ((wrong_shape, "expected \\[batch, time\\]"), (not_a_pair, "must return \\(advantages")):
        advantages.register_estimator(fn.__name__, fn, replace=True)
        ppo = ppojax.PPOConfig(batch_size=8, minibatch_size=8, response_length=3, advantage_estimator=fn.__name__)
        state = ppojax.create_train_state(model, params, ppo=ppo, reward=reward, key=jax.random.key(0))
        with pytest.raises((ValueError, TypeError), match=message):
            ppojax.ppo_iteration(state, jnp.zeros((8, 2), jnp.int32), jnp.ones((8, 2), jnp.int32))
