"""Extension points: a toy estimator, loss term, reward and model family, each defined in a module outside the
package (tests/extensions/), plug in through the public registration and run an iteration. docs/extending.md
walks through the same four files."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ppojax
from tests.extensions import bag_lm, baseline_estimator, length_term, token_reward

GPT = ppojax.GPT2Config(vocab_size=32, n_positions=24, n_embd=16, n_layer=1, n_head=2)
BAG = bag_lm.BagLMConfig(vocab_size=32, width=16, max_positions=24)


def _prompts(batch, vocab=32, seed=0):
    rng = np.random.RandomState(seed)
    ids = rng.randint(0, vocab, (batch, 5)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[::2, :2] = 0  # left padding
    return jnp.asarray(ids), jnp.asarray(mask)


def _state(model, params, reward=token_reward.share_of_token_three, **ppo_kw):
    kw = dict(batch_size=8, minibatch_size=8, ppo_epochs=2, response_length=6, temperature=1.0,
              kl=ppojax.KLControlConfig(kind="fixed", init_coef=0.01))
    kw.update(ppo_kw)
    return ppojax.create_train_state(model, params, ppo=ppojax.PPOConfig(**kw),
                                     reward=ppojax.FunctionReward(reward), key=jax.random.key(0),
                                     optimizer=ppojax.OptimizerConfig(learning_rate=3e-3))


def test_estimator_registered_by_name_and_by_path_runs_critic_free():
    params = ppojax.init_params(GPT, jax.random.key(1))
    for spec in ("mean_baseline", "tests.extensions.baseline_estimator:mean_baseline"):
        state = _state(GPT, params, advantage_estimator=spec)
        assert set(state.params) == {"actor"}  # needs_critic=False: no critic, no critic moments
        state, m = ppojax.ppo_iteration(state, *_prompts(8))
        assert np.isfinite(float(m["loss/total"])) and "value_loss" not in m
    # The registered function computes what its docstring says, against a loop written here.
    scores = jnp.asarray([1.0, 2.0, 6.0, 3.0])
    mask = jnp.asarray([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 0, 0]])
    inputs = ppojax.AdvantageInputs(scores=scores, rewards=jnp.zeros((4, 3)), kl=jnp.zeros((4, 3)), mask=mask,
                                    values=None, gamma=jnp.float32(1), lam=jnp.float32(1))
    adv, ret = baseline_estimator.mean_baseline(inputs)
    want = np.zeros((4, 3))
    for i in range(4):
        for t in range(3):
            want[i, t] = (float(scores[i]) - 3.0) if mask[i, t] else 0.0
    np.testing.assert_allclose(adv, want)
    assert ret is None


def test_loss_term_from_a_module_path_enters_the_total():
    params = ppojax.init_params(GPT, jax.random.key(1))
    term = ppojax.ExtraLossTerm(name="late", fn="tests.extensions.length_term:late_token_penalty", weight=0.5,
                                kwargs={"after": 3})
    _, m = ppojax.ppo_iteration(_state(GPT, params, extra_loss_terms=(term,)), *_prompts(8))
    assert float(m["loss/late"]) == pytest.approx(0.5 * float(m["late_logprob"]), rel=1e-6)


def test_reward_from_a_module_path_scores_the_rollout():
    reward = ppojax.FunctionReward.from_spec("tests.extensions.token_reward:share_of_token_three")
    params = ppojax.init_params(GPT, jax.random.key(1))
    state = _state(GPT, params)
    state = state.replace(reward=reward)
    _, batch = ppojax.rollout(state, *_prompts(8))
    got = np.asarray(ppojax.score_rollout(state, batch))
    tokens, mask = np.asarray(batch.tokens), np.asarray(batch.mask)
    want = [((tokens[i] == 3) & (mask[i] > 0)).sum() / max(mask[i].sum(), 1) for i in range(8)]
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_model_family_registered_outside_the_package():
    assert ppojax.models.family_of(BAG).name == "bag_lm"
    params = ppojax.init_params(BAG, jax.random.key(2))
    ids, mask = _prompts(4)
    # The cache path (prefill + one decode step per token) computes what the full forward computes.
    full = ppojax.forward(BAG, params, ids, mask)
    cache = ppojax.init_cache(BAG, 4, ids.shape[1])
    prefill, cache = ppojax.forward_with_cache(BAG, params, ids[:, :3], mask[:, :3], cache)
    steps = [prefill]
    for t in range(3, ids.shape[1]):
        logits, cache = ppojax.forward_with_cache(BAG, params, ids[:, t:t + 1], mask[:, t:t + 1], cache)
        steps.append(logits)
    real = np.asarray(mask) > 0
    np.testing.assert_allclose(np.asarray(jnp.concatenate(steps, axis=1))[real], np.asarray(full)[real], atol=1e-5)
    # generate and a whole PPO iteration (critic: the bag trunk with a value head) run through the interface.
    out = ppojax.generate(BAG, params, ids, mask, jax.random.key(0), max_new_tokens=4)
    assert out.tokens.shape == (4, 4)
    state, m = ppojax.ppo_iteration(_state(BAG, params), *_prompts(8))
    assert float(m["first_minibatch/approx_kl"]) < 1e-10  # rollout and update share one forward path
    assert np.isfinite(float(m["value_loss"]))
