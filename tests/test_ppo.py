"""The PPO iteration end to end on tiny random models, against references written here."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ppojax
from ppojax.rl import iteration as ppo
from ppojax.rl import rewards
from ppojax.rl.kl import KLControlConfig
from ppojax.rl.config import ExtraLossTerm, OptimizerConfig, PPOConfig
from ppojax.rl.state import create_train_state

VOCAB = 48
MODEL = ppojax.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=4)
TARGET = 8  # the dense reward pays for tokens < TARGET


def low_token_share(tokens, mask):
    """Dense jittable reward: share of response tokens below TARGET (a random policy gets ~8/48)."""
    hit = ((tokens < TARGET) & (mask > 0)).sum(-1)
    return hit.astype(jnp.float32) / jnp.maximum(mask.sum(-1), 1).astype(jnp.float32)


def _prompts(batch, seed=0):
    rng = np.random.RandomState(seed)
    ids = rng.randint(0, VOCAB, (batch, 6)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[::3, :2] = 0  # some left padding
    ids[mask == 0] = VOCAB  # the pad id sits outside the vocabulary
    return jnp.asarray(ids), jnp.asarray(mask)


def _state(seed=0, reward=None, ppo_kw=None, opt_kw=None, iterations=10, extra_loss_terms=()):
    cfg = dict(batch_size=16, minibatch_size=8, ppo_epochs=2, response_length=8, temperature=1.0,
               kl=KLControlConfig(kind="fixed", init_coef=0.05))
    cfg.update(ppo_kw or {})
    okw = dict(learning_rate=3e-3, schedule="constant")
    okw.update(opt_kw or {})
    params = ppojax.init_params(MODEL, jax.random.key(100))
    return create_train_state(MODEL, params, ppo=PPOConfig(**cfg), reward=reward or rewards.FunctionReward(low_token_share),
                              key=jax.random.key(seed), optimizer=OptimizerConfig(**okw), total_iterations=iterations,
                              extra_loss_terms=extra_loss_terms)


def _run(state, n, prompts=None):
    prompts = prompts or _prompts(state.setup.ppo.batch_size)
    history = []
    for _ in range(n):
        state, metrics = ppo.ppo_iteration(state, *prompts)
        history.append(jax.device_get(metrics))
    return state, history


def test_first_minibatch_ratio_is_exactly_one():
    _, history = _run(_state(), 2)
    for m in history:
        # Same forward path for rollout and update: 1 up to float reduction order (often bit-exact).
        assert m["first_minibatch/approx_kl"] < 1e-12
        assert m["first_minibatch/clipfrac"] == 0.0
        assert abs(m["first_minibatch/ratio_max"] - 1.0) < 1e-5
    assert history[-1]["approx_kl"] > 0  # later minibatches do move the policy


def test_no_recompilation_across_iterations_with_changing_kl_coef():
    traces = []

    def counting_reward(tokens, mask):
        traces.append(1)  # runs once per trace, never per call
        return low_token_share(tokens, mask)

    state = _state(reward=rewards.FunctionReward(counting_reward),
                   ppo_kw=dict(kl=KLControlConfig(kind="adaptive", init_coef=0.2, target=0.5, horizon=50)))
    state, history = _run(state, 4)
    coefs = [float(m["kl_coef"]) for m in history]
    assert len(set(coefs)) == 4, coefs  # the coefficient changed every iteration
    assert len(traces) == 1


def test_same_seed_same_metrics_different_seed_different():
    _, a = _run(_state(seed=3), 2)
    _, b = _run(_state(seed=3), 2)
    _, c = _run(_state(seed=4), 2)
    for ma, mb in zip(a, b):
        assert ma.keys() == mb.keys()
        for k in ma:
            np.testing.assert_array_equal(ma[k], mb[k], err_msg=k)
    assert a[-1]["score_mean"] != c[-1]["score_mean"] or a[-1]["policy_loss"] != c[-1]["policy_loss"]


def test_learns_dense_reward():
    state = _state(ppo_kw=dict(batch_size=32, ppo_epochs=4, kl=KLControlConfig(kind="fixed", init_coef=0.0)),
                   opt_kw=dict(learning_rate=1e-2))
    _, history = _run(state, 25)
    scores = [m["score_mean"] for m in history]
    start, end = np.mean(scores[:3]), np.mean(scores[-3:])
    assert start < 0.3, scores
    assert end > start + 0.25, scores


@pytest.mark.slow
def test_user_loss_term_pushes_its_token():
    """A one-function loss term that rewards emitting token 5 raises its frequency; without it nothing does."""
    zero = rewards.FunctionReward(lambda tokens, mask: jnp.zeros(tokens.shape[0], jnp.float32))
    term = ppojax.losses.LossTerm("likes5", favour_token_five, weight=5.0)

    def final_share(extra):
        state = _state(reward=zero, opt_kw=dict(learning_rate=1e-2), extra_loss_terms=extra)
        state, _ = _run(state, 12)
        _, batch = ppo.rollout(state, *_prompts(16, seed=1))
        return float(((batch.tokens == 5) & (batch.mask > 0)).mean())

    with_term, without = final_share((term,)), final_share(())
    assert with_term > 0.3 and without < 0.1, (with_term, without)


def favour_token_five(inputs):
    hit = (inputs.tokens == 5) & (inputs.mask > 0)
    loss = -jnp.sum(jnp.where(hit, inputs.logprobs, 0.0)) / inputs.n_tokens
    return loss, {"token5_logprob": loss}


def test_loss_term_named_in_config():
    cfg_term = ExtraLossTerm(name="likes5", fn="tests.test_ppo:favour_token_five", weight=0.5)
    state = _state(ppo_kw=dict(extra_loss_terms=(cfg_term,)))
    _, history = _run(state, 1)
    assert "loss/likes5" in history[0] and np.isclose(history[0]["loss/likes5"], 0.5 * history[0]["token5_logprob"])
    with pytest.raises((ImportError, AttributeError, ValueError)):
        _state(ppo_kw=dict(extra_loss_terms=(ExtraLossTerm(name="x", fn="tests.test_ppo:nope"),)))


def test_host_reward_path_equals_jitted_reward():
    """rollout -> host scores -> update gives the same as the one-jit iteration with the same reward."""
    prompts = _prompts(16)
    a, ma = ppo.ppo_iteration(_state(seed=7), *prompts)
    s = _state(seed=7)
    s, batch = ppo.rollout(s, *prompts)
    host_scores = np.asarray(low_token_share(np.asarray(batch.tokens), np.asarray(batch.mask)))
    b, mb = ppo.update(s, batch, host_scores)
    for k in ma:
        np.testing.assert_allclose(mb[k], ma[k], rtol=1e-5, atol=1e-6, err_msg=k)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), a.params, b.params)


def test_grad_accumulation_matches_full_minibatch():
    a, ma = _run(_state(seed=2), 1)
    b, mb = _run(_state(seed=2, opt_kw=dict(grad_accum_steps=2)), 1)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=2e-5), a.params, b.params)
    np.testing.assert_allclose(ma[0]["policy_loss"], mb[0]["policy_loss"], rtol=1e-4, atol=1e-6)


def test_nan_scores_stop_cleanly_and_keep_params():
    nan_reward = rewards.FunctionReward(lambda t, m: jnp.full(t.shape[0], jnp.nan, jnp.float32))
    state = _state(reward=nan_reward)
    new, metrics = ppo.ppo_iteration(state, *_prompts(16))
    assert int(metrics["nonfinite_scores"]) == 16
    jax.tree.map(np.testing.assert_array_equal, state.params, new.params)
    jax.tree.map(np.testing.assert_array_equal, state.opt_state, new.opt_state)
    assert np.isnan(float(metrics["policy_loss"]))  # the update did not run: its metrics are not numbers
    with pytest.raises(FloatingPointError, match="non-finite scores"):
        ppo.check_metrics(jax.device_get(metrics))


@pytest.mark.parametrize("bad", [lambda t, m: jnp.zeros((t.shape[0], 1), jnp.float32),
                                 lambda t, m: jnp.zeros((t.shape[0] + 1,), jnp.float32),
                                 lambda t, m: jnp.zeros((t.shape[0],), jnp.int32)])
def test_reward_with_wrong_shape_or_dtype_is_refused(bad):
    state = _state(reward=rewards.FunctionReward(bad))
    with pytest.raises((ValueError, TypeError), match="reward|score"):
        ppo.ppo_iteration(state, *_prompts(16))


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(batch_size=20, minibatch_size=8), "minibatch_size"),
        (dict(batch_size=16, minibatch_size=4), "minibatch_size"),
        (dict(vf_coef=-0.1), "vf_coef"),
        (dict(vocab_chunk_size=0), "vocab_chunk_size"),
        (dict(entropy_coef=-1.0), "entropy_coef"),
        (dict(gamma=1.5), "gamma"),
        (dict(lam=-0.1), "lam"),
        (dict(clip_eps=0.0), "clip_eps"),
        (dict(temperature=0.0), "temperature"),
    ],
)
def test_invalid_hyperparameters_name_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        PPOConfig(**kw)
    with pytest.raises(ValueError, match="init_coef"):
        KLControlConfig(init_coef=-1.0)


# ----------------------------------------------------------------------------------------------------------------
# One update against a reference written out in numpy + jax.grad here.


def _np_gae(rewards_, values, mask, gamma, lam):
    B, T = rewards_.shape
    adv = np.zeros((B, T))
    for b in range(B):
        real = [t for t in range(T) if mask[b, t]]
        running, next_v = 0.0, 0.0
        for t in reversed(real):
            delta = rewards_[b, t] + gamma * next_v - values[b, t]
            running = delta + gamma * lam * running
            adv[b, t] = running
            next_v = values[b, t]
    return adv, (adv + values) * mask


def test_single_update_matches_reference_implementation():
    cfg_kw = dict(batch_size=8, minibatch_size=8, ppo_epochs=1, temperature=0.8, eos_token_id=3,
                  kl=KLControlConfig(kind="fixed", init_coef=0.1))
    state = _state(seed=11, ppo_kw=cfg_kw, opt_kw=dict(max_grad_norm=None))
    prompts = _prompts(8)
    s, batch = ppo.rollout(state, *prompts)
    scores = np.asarray(low_token_share(batch.tokens, batch.mask), np.float64)
    new_state, _ = ppo.update(s, batch, scores)

    # --- reference ---
    P = prompts[0].shape[1]
    ids = np.concatenate([np.asarray(prompts[0]), np.asarray(batch.tokens)], 1)
    mask_full = np.concatenate([np.asarray(prompts[1]), np.asarray(batch.mask)], 1)
    resp_mask = np.asarray(batch.mask).astype(np.float64)
    tokens = np.asarray(batch.tokens)

    def logp_of(params):
        logits = ppojax.forward(MODEL, params, jnp.asarray(ids), jnp.asarray(mask_full))[:, P - 1:-1] / 0.8
        return jnp.take_along_axis(jax.nn.log_softmax(logits, -1), jnp.asarray(tokens)[..., None], -1)[..., 0]

    def values_of(critic):
        return ppojax.value_forward(MODEL, critic, jnp.asarray(ids), jnp.asarray(mask_full))[:, P - 1:-1]

    real = resp_mask > 0  # pad ids after EOS lie outside the vocabulary: their log-probs are garbage
    old_logp = np.where(real, np.asarray(logp_of(state.params["actor"]), np.float64), 0.0)
    ref_logp = np.where(real, np.asarray(logp_of(state.ref_params), np.float64), 0.0)
    old_v = np.where(real, np.asarray(values_of(state.params["critic"]), np.float64), 0.0)
    kl = (old_logp - ref_logp) * resp_mask
    r = -0.1 * kl
    for b in range(8):
        last = np.nonzero(resp_mask[b])[0].max()
        r[b, last] += scores[b]
    adv, ret = _np_gae(r, old_v, resp_mask, 1.0, 0.95)
    n = resp_mask.sum()
    mu = (adv * resp_mask).sum() / n
    var = (((adv - mu) ** 2) * resp_mask).sum() / n
    adv = (adv - mu) / np.sqrt(var + 1e-8) * resp_mask

    def ref_loss(params):
        m = jnp.asarray(resp_mask, jnp.float32)
        ratio = jnp.exp(jnp.where(m > 0, logp_of(params["actor"]) - jnp.asarray(old_logp, jnp.float32), 0.0))
        a = jnp.asarray(adv, jnp.float32)
        pg = jnp.maximum(-a * ratio, -a * jnp.clip(ratio, 0.8, 1.2))
        v = values_of(params["critic"])
        ov, R = jnp.asarray(old_v, jnp.float32), jnp.asarray(ret, jnp.float32)
        vc = ov + jnp.clip(v - ov, -0.2, 0.2)
        vl = 0.5 * jnp.maximum((v - R) ** 2, (vc - R) ** 2)
        return jnp.where(m > 0, pg + 0.1 * vl, 0.0).sum() / n

    grads = jax.grad(ref_loss)(state.params)
    tx = optax.adam(3e-3, eps=1e-5)
    updates, _ = tx.update(grads, tx.init(state.params), state.params)
    expected = optax.apply_updates(state.params, updates)
    # The rollout's stored quantities agree with the reference ones...
    np.testing.assert_allclose(np.asarray(batch.logprobs), old_logp, atol=1e-5)
    np.testing.assert_allclose(np.asarray(batch.values), old_v, atol=1e-6)
    # ...and the updated parameters agree (Adam's first step moves each weight by ~lr * sign(grad)).
    diffs = jax.tree.map(lambda x, y: float(np.abs(np.asarray(x) - np.asarray(y)).max()), new_state.params, expected)
    assert max(jax.tree.leaves(diffs)) < 1e-4, diffs
    moved = jax.tree.map(lambda x, y: float(np.abs(np.asarray(x) - np.asarray(y)).max()), new_state.params,
                         state.params)
    assert max(jax.tree.leaves(moved)) > 1e-3


def test_reward_model_scores_last_token_and_normalizes():
    params = ppojax.init_params(MODEL, jax.random.key(0))
    rm_params = ppojax.init_value_params(MODEL, params, head_init_std=1 / np.sqrt(33), key=jax.random.key(1))
    rm = rewards.reward_model(MODEL, rm_params)
    ids, mask = _prompts(12, seed=5)
    values = np.asarray(ppojax.value_forward(MODEL, rm_params, ids, mask))
    np.testing.assert_allclose(np.asarray(rm(ids, mask)), values[:, -1], atol=1e-6)  # last column is real
    normed = rm.normalize(ids, mask)
    s = np.asarray(normed(ids, mask))
    assert abs(s.mean()) < 1e-5 and abs(s.std() - 1) < 1e-4
    # Inside the iteration the reward model sees prompt + response.
    state = _state(reward=normed)
    _, m = ppo.ppo_iteration(state, *_prompts(16))
    assert np.isfinite(m["score_mean"])


def test_donated_iteration_equals_plain_and_consumes_only_the_changing_state():
    """donate=True updates params and optimizer state in place: same numbers as without donation; the reference and
    the reward model are not donated (they stay readable), and the actor/critic trunk shared at creation is fine."""
    prompts = _prompts(16)
    plain, m_plain = ppo.ppo_iteration(_state(seed=3), *prompts)
    state = _state(seed=3)
    donated, m_donated = ppo.ppo_iteration(state, *prompts, donate=True)
    jax.tree.map(np.testing.assert_array_equal, plain.params, donated.params)
    jax.tree.map(np.testing.assert_array_equal, plain.opt_state, donated.opt_state)
    for k in m_plain:
        np.testing.assert_array_equal(m_plain[k], m_donated[k], err_msg=k)
    assert all(x.is_deleted() for x in jax.tree.leaves(state.opt_state) if isinstance(x, jax.Array) and x.size > 1)
    assert not any(x.is_deleted() for x in jax.tree.leaves(state.ref_params))
    again, _ = ppo.ppo_iteration(donated, *prompts, donate=True)  # the returned state feeds the next donation
    assert np.isfinite(float(jax.tree.leaves(again.params)[0].sum()))


def test_rollout_and_update_pass_unchanged_arrays_through_without_copies():
    """Only the fields a phase changes leave its jit: the rollout returns the very same parameter buffers, the
    update the same reference and reward arrays (no per-iteration copy of the state)."""
    state = _state(seed=4)
    after_rollout, batch = ppo.rollout(state, *_prompts(16))
    for a, b in zip(jax.tree.leaves((state.params, state.opt_state)), jax.tree.leaves((after_rollout.params,
                                                                                       after_rollout.opt_state))):
        assert a is b
    after_update, _ = ppo.update(after_rollout, batch, jnp.zeros(16))
    for a, b in zip(jax.tree.leaves((state.ref_params, state.reward)),
                    jax.tree.leaves((after_update.ref_params, after_update.reward))):
        assert a is b
    assert int(after_update.step) == 1
