"""Mixed precision on the CPU: bfloat16 compute over float32 master weights and optimizer state
(``GPT2Config(dtype="bfloat16", param_dtype="float32")``, the accelerator setting of benchmarks/gpu.py) against
float32 compute, on the same rollout.

Tolerances, stated: bfloat16 keeps 8 bits of mantissa (relative rounding 2^-8 = 0.4%), and a 2-layer forward
accumulates a few such roundings, so the update's losses and log-probs agree with float32's to about 1-5% and the
parameter step it takes points the same way (cosine > 0.9). What must be exact: the parameters and the Adam moments
stay float32.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ppojax
from ppojax.rl import iteration as ppo
from ppojax.rl import rewards
from ppojax.rl.config import OptimizerConfig, PPOConfig
from ppojax.rl.kl import KLControlConfig
from ppojax.rl.state import create_train_state

VOCAB = 64
F32 = ppojax.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=64, n_layer=2, n_head=4)
BF16 = F32.replace(dtype="bfloat16", param_dtype="float32")


def share_low(tokens, mask):
    hit = ((tokens < 10) & (mask > 0)).sum(-1)
    return hit.astype(jnp.float32) / jnp.maximum(mask.sum(-1), 1).astype(jnp.float32)


def _state(model):
    params = ppojax.init_params(F32, jax.random.key(3))  # the same float32 weights for both
    cfg = PPOConfig(batch_size=16, minibatch_size=8, ppo_epochs=1, response_length=8, temperature=1.0,
                    kl=KLControlConfig(kind="fixed", init_coef=0.05))
    return create_train_state(model, params, ppo=cfg, reward=rewards.FunctionReward(share_low),
                              key=jax.random.key(0), optimizer=OptimizerConfig(learning_rate=1e-3,
                                                                               schedule="constant"),
                              total_iterations=4)


def _leaves(tree):
    return [np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)]


def test_bfloat16_update_on_a_float32_rollout_matches_float32_within_the_stated_tolerance():
    rng = np.random.default_rng(0)
    prompt_ids = jnp.asarray(rng.integers(0, VOCAB, (16, 6)), jnp.int32)
    prompt_mask = jnp.ones_like(prompt_ids)
    f32, bf16 = _state(F32), _state(BF16)
    _, batch = ppo.rollout(f32, prompt_ids, prompt_mask)  # one rollout (float32) for both updates
    scores = ppo.score_rollout(f32, batch)

    # The bfloat16 model recomputes the rollout's log-probs in its own precision, as a bf16 run would.
    _, bf16_batch = ppo.rollout(bf16, prompt_ids, prompt_mask)

    new32, m32 = ppo.update(f32, batch, scores)
    new16, m16 = ppo.update(bf16, batch, scores)
    m32, m16 = jax.device_get(m32), jax.device_get(m16)
    for key in ("loss/policy", "loss/value", "kl", "entropy"):
        a, b = float(m32[key]), float(m16[key])
        assert abs(a - b) <= 0.05 * max(abs(a), 1e-2) + 1e-3, (key, a, b)

    # Master weights and Adam moments stay float32; the step points the same way.
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(new16.params))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(new16.opt_state) if hasattr(x, "dtype")
               and jnp.issubdtype(x.dtype, jnp.floating))
    d32 = np.concatenate([b - a for a, b in zip(_leaves(f32.params), _leaves(new32.params))])
    d16 = np.concatenate([b - a for a, b in zip(_leaves(bf16.params), _leaves(new16.params))])
    cosine = d32 @ d16 / (np.linalg.norm(d32) * np.linalg.norm(d16))
    assert cosine > 0.9, cosine
    assert 0.8 < np.linalg.norm(d16) / np.linalg.norm(d32) < 1.25

    # The rollout's log-probs under bf16 compute: within bfloat16's rounding of float32's.
    real = np.asarray(batch.mask) > 0
    lp32 = np.asarray(batch.logprobs)[real]
    lp16 = np.asarray(bf16_batch.logprobs)[real]
    same = np.asarray(bf16_batch.tokens)[real] == np.asarray(batch.tokens)[real]
    assert same.mean() > 0.5  # sampling from nearly the same distribution with the same keys
    np.testing.assert_allclose(lp16[same], lp32[same], atol=0.1, rtol=0.05)


@pytest.mark.slow
def test_bfloat16_iterations_stay_finite_and_start_where_float32_does():
    """Four whole iterations each (sampling included, in each precision): every metric finite, and the first
    iteration's mean score within sampling noise of float32's (16 responses of 8 tokens)."""
    rng = np.random.default_rng(1)
    prompt_ids = jnp.asarray(rng.integers(0, VOCAB, (16, 6)), jnp.int32)
    prompt_mask = jnp.ones_like(prompt_ids)
    finals = {}
    for name, model in (("f32", F32), ("bf16", BF16)):
        state = _state(model)
        scores = []
        for _ in range(4):
            state, m = ppo.ppo_iteration(state, prompt_ids, prompt_mask)
            m = jax.device_get(m)
            assert all(np.isfinite(float(v)) for v in m.values()), name
            scores.append(float(m["score_mean"]))
        finals[name] = scores
    assert abs(finals["f32"][0] - finals["bf16"][0]) < 0.15
