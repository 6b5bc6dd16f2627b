"""``ppo.length_buckets``: each minibatch runs at the narrowest width that holds its longest response. At equal
minibatches the update must equal the full-width one (loss, gradients, params, optimizer state, metrics) up to float
rounding, and the state's RNG key must be used exactly as with the option off (resume stays exact).

The references are the padded update itself: with one minibatch per epoch (where the minibatch is the whole batch
whatever the permutation) against ``length_buckets=0``, and with several minibatches against ``length_buckets=1``
(the same length-grouped minibatches, all at the full width)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ppojax
from ppojax.io import configlib
from ppojax.rl import iteration as ppo
from ppojax.rl import rewards
from ppojax.rl.config import OptimizerConfig, PPOConfig
from ppojax.rl.kl import KLControlConfig
from ppojax.rl.state import create_train_state

from _ppo_helpers import left_padded_prompts, low_token_share

VOCAB = 48
MODEL = ppojax.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=4)
RESPONSE = 16


def _prompts(n, seed=0):
    return left_padded_prompts(n, VOCAB, width=5, seed=seed)


def _state(opt_kw=None, **ppo_kw):
    cfg = dict(batch_size=16, minibatch_size=8, ppo_epochs=2, response_length=RESPONSE, temperature=0.9,
               kl=KLControlConfig(kind="fixed", init_coef=0.05))
    cfg.update(ppo_kw)
    params = ppojax.init_params(MODEL, jax.random.key(100))
    return create_train_state(MODEL, params, ppo=PPOConfig(**cfg), reward=rewards.FunctionReward(low_token_share),
                              key=jax.random.key(7), optimizer=OptimizerConfig(learning_rate=3e-3, **(opt_kw or {})))


def _spread_rollout(state, ends):
    """A real rollout of ``state`` whose row i is cut after ``ends[i]`` tokens (padding after, as EOS leaves it):
    the model is causal, so the kept positions' log-probs and values stay those of the cut response."""
    k = state.setup.ppo.samples_per_prompt
    state, r = ppo.rollout(state, *_prompts(len(ends) // k))
    keep = (jnp.arange(r.tokens.shape[1])[None, :] < jnp.asarray(ends)[:, None]) & (r.mask > 0)
    zero = lambda x: None if x is None else jnp.where(keep, x, 0.0)
    r = r.replace(tokens=jnp.where(keep, r.tokens, state.setup.pad_token_id), mask=keep.astype(jnp.int32),
                  logprobs=zero(r.logprobs), ref_logprobs=zero(r.ref_logprobs), values=zero(r.values),
                  entropy=zero(r.entropy))
    return state, r


def _ends(n, seed=0):
    """Half the rows end in the first quarter of the budget, the other half at 3/4 of it or later."""
    rng = np.random.RandomState(seed)
    short = rng.randint(1, RESPONSE // 4 + 1, n // 2)
    long = rng.randint(3 * RESPONSE // 4, RESPONSE + 1, n - n // 2)
    ends = np.concatenate([short, long])
    rng.shuffle(ends)
    return ends


def _assert_states_close(a, b, rtol=2e-5, atol=2e-6):
    for x, y in zip(jax.tree.leaves((a.params, a.opt_state)), jax.tree.leaves((b.params, b.opt_state))):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)
    assert (jax.random.key_data(a.key) == jax.random.key_data(b.key)).all()
    assert int(a.step) == int(b.step)


def _assert_metrics_close(ma, mb, rtol=2e-4, atol=2e-6):
    assert ma.keys() == mb.keys()
    for name in ma:
        np.testing.assert_allclose(np.asarray(ma[name]), np.asarray(mb[name]), rtol=rtol, atol=atol, err_msg=name)


def test_bucket_widths_and_config():
    assert PPOConfig(response_length=16, length_buckets=4).bucket_widths == (4, 8, 12, 16)
    assert PPOConfig(response_length=10, length_buckets=3).bucket_widths == (4, 7, 10)
    assert PPOConfig(response_length=16).bucket_widths == ()
    for bad in (-1, 17, 1.5, True):
        with pytest.raises(ValueError, match="length_buckets"):
            PPOConfig(response_length=16, length_buckets=bad)
    cfg = configlib.load_config(PPOConfig, overrides=["length_buckets=3", "minibatch_size=8", "batch_size=16"])
    assert cfg.length_buckets == 3


def test_length_sorted_minibatches_group_lengths_and_keep_whole_groups():
    widths = jnp.asarray(_ends(32, seed=3))
    key = jax.random.key(0)
    rows = np.asarray(ppo.minibatch_rows(key, 16, 2, 4, widths))
    assert sorted(rows.ravel().tolist()) == list(range(32))
    assert ((rows[:, ::2] // 2) == (rows[:, 1::2] // 2)).all()  # the two samples of a prompt stay together
    longest = np.asarray(widths).reshape(16, 2).max(-1)
    by_mb = sorted(longest[rows[:, ::2] // 2].max(-1).tolist())
    assert by_mb == sorted(np.sort(longest).reshape(4, 4).max(-1).tolist())  # minibatches = runs of sorted lengths
    # off: today's permutation, drawn from the same key
    plain = np.asarray(ppo.minibatch_rows(key, 16, 2, 4))
    groups = np.asarray(jax.random.permutation(key, 16))
    assert (plain == (groups[:, None] * 2 + np.arange(2)).reshape(4, 8)).all()


@pytest.mark.parametrize("kw", [
    dict(),
    dict(loss_aggregation="seq-mean-token-sum-norm", opt_kw=dict(grad_accum_steps=2)),
    pytest.param(dict(advantage_estimator="grpo", samples_per_prompt=4, policy_loss="gspo"), marks=pytest.mark.slow),
], ids=["gae", "sum-norm+accum", "grpo+gspo"])
def test_one_minibatch_update_equals_the_padded_update(kw):
    """One minibatch per epoch holds every row whatever the order: bucketed (trimmed to the batch's longest
    response, 3/4 of the budget) against today's padded update, option off."""
    opt_kw = kw.pop("opt_kw", None)
    padded = _state(opt_kw, minibatch_size=16, **kw)
    bucketed = _state(opt_kw, minibatch_size=16, length_buckets=4, **kw)
    ends = np.minimum(_ends(16), 3 * RESPONSE // 4)
    _, r = _spread_rollout(padded, ends)
    assert int(ppo.response_widths(r.mask).max()) <= 12  # the bucketed update runs at width 12, not 16
    scores = ppo.score_rollout(padded, r)
    sa, ma = ppo.update(padded, r, scores)
    sb, mb = ppo.update(bucketed, r, scores)
    _assert_states_close(sa, sb)
    _assert_metrics_close(ma, mb)
    assert float(ma["first_minibatch/ratio_max"]) == pytest.approx(1.0, abs=1e-6)


def test_bucketed_update_equals_full_width_update_of_the_same_minibatches():
    """Four minibatches per epoch, length-grouped: at width 4 (the short half) and 16 (the long half) against the
    same minibatches all at width 16 (length_buckets=1). The key the state carries on is the padded update's."""
    full = _state(minibatch_size=8, batch_size=32, length_buckets=1)
    bucketed = _state(minibatch_size=8, batch_size=32, length_buckets=4)
    off = _state(minibatch_size=8, batch_size=32)
    _, r = _spread_rollout(full, _ends(32))
    scores = ppo.score_rollout(full, r)
    sa, ma = ppo.update(full, r, scores)
    sb, mb = ppo.update(bucketed, r, scores)
    _assert_states_close(sa, sb)
    _assert_metrics_close(ma, mb)
    so, _ = ppo.update(off, r, scores)
    assert (jax.random.key_data(so.key) == jax.random.key_data(sb.key)).all()  # resume: the same key stream


@pytest.mark.slow
def test_bucketed_iteration_equals_full_width_iteration():
    """Whole iterations (sampling with stop tokens, so rows end at very different lengths): two of them, bucketed
    against full width over the same length-grouped minibatches, one compilation each."""
    stops = tuple((t,) for t in range(3, 9))  # 6 of 48 tokens end a response: most end early, at spread lengths
    kw = dict(batch_size=16, minibatch_size=8, stop_token_ids=stops)
    full, bucketed = _state(length_buckets=1, **kw), _state(length_buckets=4, **kw)
    prompts = _prompts(16)
    _, r = ppo.rollout(full, *prompts)
    widths = np.asarray(ppo.response_widths(r.mask))
    assert widths.min() <= 4 and widths.max() > 8, widths  # the spread the buckets exist for
    before = ppo.compile_count("iteration")
    for _ in range(2):
        full, ma = ppo.ppo_iteration(full, *prompts)
        bucketed, mb = ppo.ppo_iteration(bucketed, *prompts)
        _assert_states_close(full, bucketed, rtol=1e-4, atol=1e-5)
        _assert_metrics_close(ma, mb, rtol=1e-3, atol=1e-5)
    assert ppo.compile_count("iteration") - before == 2  # one per setup
