"""Options that do less work (``ppo.reuse_sampler_logprobs``, ``ppo.critic='shared'``) and the fused optimizer
step, each against the default path or an independent reference, on tiny random models in fp32.

Tolerances, measured here on fp32 (CPU) and kept with a wide margin:

- ``reuse_sampler_logprobs``: the sampler's log-probs (KV-cache decode path) and the recomputed ones (full forward,
  chunked vocabulary) differ by ~5e-7 (bound 1e-5); the first minibatch's ratio is 1 within ~5e-7 (bound 1e-4;
  the default path gives exactly 1).
- ``critic='shared'``: values and updates agree with a reference written here to the precision of one Adam step
  on fp32 (1e-4 on the weights, as tests/test_ppo.py's reference update).
- ``optimizer_step``: equal to optax's ``clip_by_global_norm -> adam(w)`` chain to float rounding (rtol 1e-6).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ppojax
from ppojax.rl import iteration as ppo
from ppojax.models import init_head, scalar_head
from ppojax.rl import rewards
from ppojax.rl.kl import KLControlConfig
from ppojax.rl.config import OptimizerConfig, PPOConfig
from ppojax.rl.hparams import hparams_from_config
from ppojax.rl.optimizer import make_optimizer, optimizer_step
from ppojax.rl.roles import LoraRoles, SharedCritic
from ppojax.rl.setup import make_setup
from ppojax.rl.state import create_train_state

from _ppo_helpers import left_padded_prompts, low_token_share

VOCAB = 48
MODEL = ppojax.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=4)


def _prompts(n, seed=0):
    return left_padded_prompts(n, VOCAB, width=6, seed=seed)


def _state(seed=0, roles=None, opt_kw=None, **ppo_kw):
    cfg = dict(batch_size=16, minibatch_size=8, ppo_epochs=2, response_length=8, temperature=0.8,
               kl=KLControlConfig(kind="fixed", init_coef=0.05))
    cfg.update(ppo_kw)
    okw = dict(learning_rate=3e-3)
    okw.update(opt_kw or {})
    params = ppojax.init_params(MODEL, jax.random.key(100))
    return create_train_state(MODEL, params, ppo=PPOConfig(**cfg), reward=rewards.FunctionReward(low_token_share),
                              key=jax.random.key(seed), optimizer=OptimizerConfig(**okw), roles=roles)


def _nbytes(tree):
    return sum(x.nbytes for x in jax.tree.leaves(tree))


# ----------------------------------------------------------------------------------------------------------------
# reuse_sampler_logprobs


@pytest.mark.parametrize("kw", [
    dict(eos_token_id=3),  # EOS ends some responses early: masked positions
    dict(top_k=10, truncate_token=5, truncate_after=2),  # filtered sampling (log-probs stay unfiltered), truncation
    dict(advantage_estimator="grpo", samples_per_prompt=4),  # no critic: the rollout runs no actor forward at all
], ids=["eos", "top_k+truncate", "grpo"])
def test_sampler_logprobs_equal_the_recomputed_ones(kw):
    prompts = _prompts(16 // kw.get("samples_per_prompt", 1))
    _, default = ppo.rollout(_state(seed=2, **kw), *prompts)
    _, reused = ppo.rollout(_state(seed=2, reuse_sampler_logprobs=True, **kw), *prompts)
    np.testing.assert_array_equal(reused.tokens, default.tokens)  # the same samples
    np.testing.assert_array_equal(reused.mask, default.mask)
    diff = np.abs(np.asarray(reused.logprobs) - np.asarray(default.logprobs)).max()
    assert diff < 1e-5, diff
    assert np.all(np.asarray(reused.logprobs)[np.asarray(reused.mask) == 0] == 0)
    assert reused.entropy is None and default.entropy is not None
    if default.values is not None:
        np.testing.assert_array_equal(reused.values, default.values)


def test_reused_logprobs_keep_the_first_ratio_at_one_and_report_the_first_minibatch_entropy():
    # One minibatch: the first minibatch is the whole batch, so its entropy is the rollout's.
    kw = dict(batch_size=16, minibatch_size=16, eos_token_id=3)
    prompts = _prompts(16)
    state = _state(seed=5, **kw)
    _, default = ppo.ppo_iteration(state, *prompts)
    _, reused = ppo.ppo_iteration(_state(seed=5, reuse_sampler_logprobs=True, **kw), *prompts)
    assert float(default["first_minibatch/ratio_max"]) == 1.0  # the default path: exactly one
    assert abs(float(reused["first_minibatch/ratio_max"]) - 1.0) < 1e-4
    assert float(reused["first_minibatch/approx_kl"]) < 1e-8
    assert float(reused["first_minibatch/clipfrac"]) == 0.0
    np.testing.assert_allclose(reused["entropy"], default["entropy"], atol=1e-4)
    for k in ("score_mean", "kl", "policy_loss", "value_loss"):
        np.testing.assert_allclose(reused[k], default[k], rtol=1e-3, atol=1e-5, err_msg=k)


# ----------------------------------------------------------------------------------------------------------------
# critic='shared'


def test_shared_critic_state_holds_a_value_head_and_no_critic_copy():
    separate, shared = _state(), _state(critic="shared")
    assert isinstance(shared.setup.roles, SharedCritic) and shared.setup.shared_critic
    assert sorted(shared.params) == ["actor", "value_head"]
    jax.tree.map(np.testing.assert_array_equal, shared.params["value_head"], init_head(MODEL))  # zero head
    critic_trunk = _nbytes(separate.params["critic"]["transformer"])
    assert critic_trunk > 0.9 * _nbytes(separate.params["actor"])  # (GPT-2's critic has no LM head to drop)
    # The memory saving: the critic's trunk in the trainable params, and twice over in Adam's moments.
    assert _nbytes((shared.params, shared.frozen)) == _nbytes((separate.params, separate.frozen)) - critic_trunk
    assert _nbytes(shared.opt_state) == _nbytes(separate.opt_state) - 2 * critic_trunk
    # The critic view is the actor's trunk under the head: an ordinary scalar-head model.
    ids, mask = _prompts(4)
    v = ppojax.value_forward(MODEL, shared.critic_params, ids, mask)
    np.testing.assert_array_equal(v, np.zeros(ids.shape, np.float32))


def test_shared_critic_values_equal_a_separate_critic_with_the_same_head():
    prompts = _prompts(16)
    separate, shared = _state(seed=1), _state(seed=1, critic="shared")
    _, r_sep = ppo.rollout(separate, *prompts)
    _, r_sh = ppo.rollout(shared, *prompts)
    np.testing.assert_array_equal(r_sh.tokens, r_sep.tokens)
    np.testing.assert_array_equal(r_sh.values, r_sep.values)  # both heads start at zero
    np.testing.assert_array_equal(r_sh.logprobs, r_sep.logprobs)
    # A nonzero head: the separate critic's trunk is (still) the actor's, so the values agree.
    head = init_head(MODEL, head_init_std=0.5, key=jax.random.key(7))
    separate = separate.replace(params={**separate.params, "critic": {**separate.params["critic"], "head": head}})
    shared = shared.replace(params={**shared.params, "value_head": head})
    _, r_sep = ppo.rollout(separate, *prompts)
    _, r_sh = ppo.rollout(shared, *prompts)
    assert np.abs(np.asarray(r_sep.values)).max() > 0.1
    np.testing.assert_allclose(r_sh.values, r_sep.values, atol=1e-6)


def _np_gae(rewards_, values, mask, gamma, lam):
    """GAE by a slow loop over each row's real tokens."""
    B, T = rewards_.shape
    adv = np.zeros((B, T))
    for b in range(B):
        running, next_v = 0.0, 0.0
        for t in reversed([t for t in range(T) if mask[b, t]]):
            delta = rewards_[b, t] + gamma * next_v - values[b, t]
            running = delta + gamma * lam * running
            adv[b, t] = running
            next_v = values[b, t]
    return adv, (adv + values) * mask


def test_shared_critic_update_matches_a_one_trunk_reference():
    """One update (1 epoch, 1 minibatch) of policy + 0.1 x value loss, where V is a head on the actor's trunk: the
    gradient reaches the trunk through both heads."""
    state = _state(seed=11, critic="shared", batch_size=8, minibatch_size=8, ppo_epochs=1, eos_token_id=3,
                   kl=KLControlConfig(kind="fixed", init_coef=0.1), opt_kw=dict(max_grad_norm=None))
    head = init_head(MODEL, head_init_std=0.5, key=jax.random.key(3))  # nonzero: the value loss moves the trunk
    state = state.replace(params={**state.params, "value_head": head})
    prompts = _prompts(8)
    s, batch = ppo.rollout(state, *prompts)
    scores = np.asarray(low_token_share(batch.tokens, batch.mask), np.float64)
    new_state, _ = ppo.update(s, batch, scores)

    P = prompts[0].shape[1]
    ids = jnp.asarray(np.concatenate([np.asarray(prompts[0]), np.asarray(batch.tokens)], 1))
    mask_full = jnp.asarray(np.concatenate([np.asarray(prompts[1]), np.asarray(batch.mask)], 1))
    resp_mask = np.asarray(batch.mask).astype(np.float64)
    tokens = jnp.asarray(batch.tokens)

    def heads(params):  # one trunk, two heads
        h = ppojax.forward_hidden(MODEL, params["actor"], ids, mask_full)[:, P - 1:-1]
        logits = ppojax.unembed(MODEL, params["actor"], h) / 0.8
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), tokens[..., None], -1)[..., 0]
        return logp, scalar_head({"head": params["value_head"]}, h)

    real = resp_mask > 0
    old_logp, old_v = (np.where(real, np.asarray(x, np.float64), 0.0) for x in heads(state.params))
    ref_logp, _ = heads({"actor": state.ref_params, "value_head": head})
    ref_logp = np.where(real, np.asarray(ref_logp, np.float64), 0.0)
    np.testing.assert_allclose(batch.logprobs, old_logp, atol=1e-5)
    np.testing.assert_allclose(batch.values, old_v, atol=1e-5)
    r = -0.1 * (old_logp - ref_logp) * resp_mask
    for b in range(8):
        r[b, np.nonzero(resp_mask[b])[0].max()] += scores[b]
    adv, ret = _np_gae(r, old_v, resp_mask, 1.0, 0.95)
    n = resp_mask.sum()
    mu = (adv * resp_mask).sum() / n
    adv = (adv - mu) / np.sqrt((((adv - mu) ** 2) * resp_mask).sum() / n + 1e-8) * resp_mask

    def ref_loss(params):
        logp, v = heads(params)
        m = jnp.asarray(resp_mask, jnp.float32)
        ratio = jnp.exp(jnp.where(m > 0, logp - jnp.asarray(old_logp, jnp.float32), 0.0))
        a = jnp.asarray(adv, jnp.float32)
        pg = jnp.maximum(-a * ratio, -a * jnp.clip(ratio, 0.8, 1.2))
        ov, R = jnp.asarray(old_v, jnp.float32), jnp.asarray(ret, jnp.float32)
        vc = ov + jnp.clip(v - ov, -0.2, 0.2)
        vl = 0.5 * jnp.maximum((v - R) ** 2, (vc - R) ** 2)
        return jnp.where(m > 0, pg + 0.1 * vl, 0.0).sum() / n

    grads = jax.grad(ref_loss)(state.params)
    tx = optax.adam(3e-3, eps=1e-5)
    updates, _ = tx.update(grads, tx.init(state.params), state.params)
    expected = optax.apply_updates(state.params, updates)
    diffs = jax.tree.map(lambda x, y: float(np.abs(np.asarray(x) - np.asarray(y)).max()), new_state.params, expected)
    assert max(jax.tree.leaves(diffs)) < 1e-4, diffs
    # The value loss alone moves the trunk (its gradient through the head is not zero).
    value_only = jax.grad(lambda p: 0.1 * jnp.where(jnp.asarray(real), (heads(p)[1] - jnp.asarray(ret)) ** 2,
                                                    0.0).sum())(state.params)
    assert float(optax.global_norm(value_only["actor"]["transformer"])) > 0


def test_shared_critic_and_reused_logprobs_run_together_and_learn():
    state = _state(critic="shared", reuse_sampler_logprobs=True, batch_size=32, ppo_epochs=4,
                   kl=KLControlConfig(kind="fixed", init_coef=0.0), opt_kw=dict(learning_rate=1e-2))
    prompts = _prompts(32)
    scores = []
    for _ in range(12):
        state, m = ppo.ppo_iteration(state, *prompts)
        ppojax.check_metrics(m)
        scores.append(float(m["score_mean"]))
    assert np.mean(scores[-3:]) > np.mean(scores[:3]) + 0.15, scores
    assert float(np.abs(np.asarray(state.params["value_head"]["kernel"])).max()) > 0  # the head trains


@pytest.mark.parametrize("make, match", [
    (lambda: _state(critic="shared", advantage_estimator="grpo", samples_per_prompt=4), "uses no critic"),
    (lambda: _state(critic="shared", roles=LoraRoles(rank=2, alpha=4.0, targets=("c_attn",))),
     "full fine-tuning only"),
    (lambda: _state(roles=SharedCritic()), "set ppo.critic='shared'"),
    (lambda: _state(critic="both"), "ppo.critic must be"),
    (lambda: _state(reuse_sampler_logprobs=1), "reuse_sampler_logprobs must be"),
], ids=["no-critic-estimator", "lora", "roles-without-config", "bad-name", "not-bool"])
def test_combinations_that_make_no_sense_are_refused(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_shared_critic_refuses_given_critic_params():
    params = ppojax.init_params(MODEL, jax.random.key(0))
    with pytest.raises(ValueError, match="critic_params cannot be given"):
        create_train_state(MODEL, params, ppo=PPOConfig(batch_size=8, critic="shared"), reward=None,
                           key=jax.random.key(0), critic_params=ppojax.init_value_params(MODEL, params))


# ----------------------------------------------------------------------------------------------------------------
# The fused optimizer step


@pytest.mark.parametrize("name", ["adam", "adamw"])
@pytest.mark.parametrize("max_grad_norm", [None, 0.5, 1e3], ids=["no-clip", "clipped", "clip-not-triggered"])
def test_optimizer_step_equals_the_optax_chain(name, max_grad_norm):
    opt = OptimizerConfig(name=name, learning_rate=1e-2, weight_decay=0.1 if name == "adamw" else 0.0,
                          max_grad_norm=max_grad_norm)
    cfg = PPOConfig(batch_size=8)
    setup = make_setup(MODEL, cfg, opt, 1)
    hp = hparams_from_config(cfg, opt)
    keys = iter(jax.random.split(jax.random.key(0), 16))
    params = {"actor": {"w": jax.random.normal(next(keys), (7, 5)), "b": jax.random.normal(next(keys), (5,))},
              "value_head": {"kernel": jax.random.normal(next(keys), (5, 1))}}
    tx = make_optimizer(setup, hp, hp.learning_rate)
    ref_p, ref_s = params, tx.init(params)
    p, s = params, tx.init(params)
    step = jax.jit(lambda p, s, g: optimizer_step(setup, hp, hp.learning_rate, g, s, p))
    for _ in range(3):
        g = jax.tree.map(lambda x: jax.random.normal(next(keys), x.shape), params)
        updates, ref_s = tx.update(g, ref_s, ref_p)
        ref_p = optax.apply_updates(ref_p, updates)
        p, s, norm = step(p, s, g)
        np.testing.assert_allclose(norm, optax.global_norm(g), rtol=1e-6)
    assert jax.tree.structure(s) == jax.tree.structure(ref_s)
    for a, b in zip(jax.tree.leaves((p, s)), jax.tree.leaves((ref_p, ref_s))):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
