"""Multi-turn episodes (ppojax.train.multiturn): token-in/token-out rollouts against independent references.

- the log-probs recorded while sampling the turns (from the KV cache, continued turn after turn) equal one forward
  pass over the whole episode, computed here by a plain per-row loop over the REAL tokens only (no holes, no
  cache): the reference does not share the library's slot layout;
- an environment that ends every episode after its first turn reproduces the single-turn rollout (tokens, log-probs,
  advantages);
- observation spans are context: replacing values and rewards there by random numbers changes no advantage or
  return at the policy's tokens (GAE, REINFORCE++, GRPO, RLOO);
- the observation tokens are exactly the environment's text as rendered, and the policy's are what it sampled.
"""

from __future__ import annotations

import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ppojax
from ppojax.models import GPT2Config, forward, init_params
from ppojax.rl import rewards
from ppojax.rl.advantages import AdvantageInputs, get_estimator, run_estimator
from ppojax.rl.config import PPOConfig
from ppojax.rl.iteration import rollout as single_rollout, update
from ppojax.rl.state import create_train_state
from ppojax.tasks import Row
from ppojax.train import multiturn

V = 48
MODEL = GPT2Config(vocab_size=V, n_positions=128, n_embd=32, n_layer=2, n_head=2)


class IntTokenizer:
    """Text is space-separated token ids: an exact, reversible tokenizer for a random model."""

    pad_token_id = V

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(str(int(i)) for i in ids)

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [int(w) % V for w in text.split()]}


class Echo:
    """Answers each turn with 1-5 seeded tokens; ends after ``turns`` turns; reward = the turn's index + 1."""

    observation_role = "user"

    def __init__(self, turns: int = 3):
        self.turns, self.t, self.rng = turns, 0, None

    def reset(self, row, seed):
        self.rng = random.Random(seed)
        return row.prompt

    def step(self, text):
        self.t += 1
        if self.t >= self.turns:
            return None, float(self.t), True
        return " ".join(str(self.rng.randrange(V)) for _ in range(self.rng.randint(1, 5))), float(self.t), False


ppojax.register_env("test_echo", replace=True)(Echo)


def _state(**ppo):
    cfg = dict(batch_size=8, minibatch_size=8, response_length=40, samples_per_prompt=2, temperature=1.0,
               advantage_estimator="grpo", eos_token_id=None, pad_token_id=V)
    cfg.update(ppo)
    params = init_params(MODEL, jax.random.key(1))
    return create_train_state(MODEL, params, ppo=PPOConfig(**cfg), reward=None, key=jax.random.key(7))


def _settings(turns=3, **kw):
    base = dict(name="test_echo", kwargs={"turns": turns}, max_turns=turns, timeout_s=10.0, turn_tokens=6,
                observation_tokens=6, credit="turn", prompt_len=6, budget=40, chat=False, system=None, seed=0)
    base.update(kw)
    return multiturn.EpisodeSettings(**base)


def _rows(n=8):
    rng = random.Random(3)
    return [Row(" ".join(str(rng.randrange(V)) for _ in range(rng.randint(2, 6)))) for _ in range(n)]


def _play(state, settings, rows=None, key=jax.random.key(5), **kw):
    rows = rows or _rows()
    renderer = multiturn.Renderer(IntTokenizer(), chat=False, system=None, eos_token_id=state.setup.ppo.eos_token_id)
    seeds = [multiturn.episode_seed(0, 0, i // 2) for i in range(len(rows))]
    return multiturn.run_episodes(state, rows, seeds, settings, renderer, key, **kw)


def _reference_logprobs(params, ep, b, P, temperature=1.0):
    """log p(token) of the row's policy tokens by a forward over its REAL tokens alone (prompt, turns,
    observations, in order, holes dropped): the plain causal-LM reading of the episode."""
    real_p = ep.prompt_ids[b][ep.prompt_mask[b] > 0]
    ctx = np.flatnonzero(ep.context_mask[b])
    seq = np.concatenate([real_p, ep.tokens[b][ctx]]).astype(np.int32)
    logits = forward(MODEL, params, jnp.asarray(seq[None]), jnp.ones((1, len(seq)), jnp.int32))[0]
    logp = jax.nn.log_softmax(logits / temperature, axis=-1)
    out = {}
    for j, slot in enumerate(ctx):
        if ep.mask[b, slot]:
            pos = len(real_p) + j  # the token's index in seq; predicted by pos - 1
            out[slot] = float(logp[pos - 1, seq[pos]])
    return out


def test_sampled_logprobs_equal_one_forward_pass_over_the_episode():
    state = _state()
    ep = _play(state, _settings())
    assert (ep.turns == 3).all() and not ep.truncated.any()
    # holes exist (rows finish turns at different lengths only with EOS; observations are left-padded in chunks)
    assert (ep.context_mask.sum(-1) < ep.context_mask.shape[1]).all()
    actor = state.params["actor"] if isinstance(state.params, dict) and "actor" in state.params else None
    actor = state.setup.roles.actor(state.params, state.frozen)
    for b in range(len(ep.turns)):
        ref = _reference_logprobs(actor, ep, b, 6)
        assert len(ref) == ep.mask[b].sum() > 6
        got = np.array([ep.logprobs[b, s] for s in ref])
        np.testing.assert_allclose(got, np.array(list(ref.values())), atol=2e-5)
    # ...and the library's own forward over the holed episode (what the update recomputes) agrees too
    rollout = multiturn.episode_rollout(state, ep)
    m = ep.mask > 0
    np.testing.assert_allclose(np.asarray(rollout.logprobs)[m], ep.logprobs[m], atol=2e-5)
    np.testing.assert_allclose(np.asarray(rollout.ref_logprobs)[m], ep.logprobs[m], atol=2e-5)


def test_observation_tokens_are_the_rendered_text_and_turns_are_what_was_sampled():
    state = _state()
    ep = _play(state, _settings())
    tok = IntTokenizer()
    for b in range(len(ep.turns)):
        roles = [r for r, _ in ep.transcripts[b]]
        assert roles == ["user", "assistant", "user", "assistant", "user", "assistant"]
        obs_slots = np.flatnonzero((ep.context_mask[b] > 0) & (ep.mask[b] == 0))
        obs_text = " ".join(text for role, text in ep.transcripts[b][2::2])
        assert tok.decode(ep.tokens[b][obs_slots]) == obs_text
        pol = ep.tokens[b][ep.mask[b] > 0]
        assert tok.decode(pol) == " ".join(t for r, t in ep.transcripts[b][1::2])
        # per-turn rewards 1, 2, 3 at the last token of each turn
        assert sorted(ep.turn_rewards[b][ep.turn_rewards[b] != 0].tolist()) == [1.0, 2.0, 3.0]
        assert ep.scores[b] == 6.0


def test_one_turn_episode_equals_the_single_turn_rollout():
    state = _state(response_length=10)
    rows = _rows()
    k = state.setup.ppo.samples_per_prompt
    prompts = rows[::k]
    ids = np.full((len(prompts), 6), V, np.int32)
    mask = np.zeros_like(ids)
    for i, r in enumerate(prompts):
        t = IntTokenizer()(r.prompt)["input_ids"]
        ids[i, 6 - len(t):], mask[i, 6 - len(t):] = t, 1
    rows = [r for r in prompts for _ in range(k)]
    after, ref = single_rollout(state, jnp.asarray(ids), jnp.asarray(mask))
    _, turn_key = jax.random.split(state.key)
    ep = _play(state, _settings(turns=1, turn_tokens=10, budget=10), rows=rows, key=turn_key)
    got = multiturn.episode_rollout(state, ep)
    np.testing.assert_array_equal(ep.tokens, np.asarray(ref.tokens))
    np.testing.assert_array_equal(ep.mask, np.asarray(ref.mask))
    np.testing.assert_allclose(np.asarray(got.logprobs), np.asarray(ref.logprobs), atol=1e-6)
    np.testing.assert_allclose(np.asarray(got.ref_logprobs), np.asarray(ref.ref_logprobs), atol=1e-6)
    _, m_single = update(after, ref, ep.scores)
    _, m_multi = update(after, got, ep.scores)
    for name in ("advantage_mean", "reward", "kl", "policy_loss", "score_mean"):
        if name in m_single:
            np.testing.assert_allclose(float(m_multi[name]), float(m_single[name]), rtol=1e-5, atol=1e-6,
                                       err_msg=name)


@pytest.mark.parametrize("name", ["gae", "reinforce_pp", "grpo", "rloo"])
def test_observation_spans_do_not_change_advantages_at_policy_tokens(name):
    rng = np.random.default_rng(0)
    B, T = 4, 24
    mask = np.zeros((B, T), np.float32)
    for b in range(B):  # turns of the policy separated by observation spans (and holes)
        for lo, hi in ((0, 5), (9, 13), (17, 20 + b)):
            mask[b, lo:hi] = 1
    scores = rng.normal(size=B).astype(np.float32)
    logp, ref = rng.normal(size=(B, T)) * 0.1, rng.normal(size=(B, T)) * 0.1
    values = rng.normal(size=(B, T)).astype(np.float32)

    def run(values, noise):
        r, kl = rewards.shape_rewards(jnp.asarray(scores), jnp.asarray(logp), jnp.asarray(ref), jnp.asarray(mask),
                                      0.1)
        r = r + jnp.where(mask > 0, 0.0, noise)  # rewards at observation positions: anything
        inputs = AdvantageInputs(scores=jnp.asarray(scores), rewards=r, kl=kl, mask=jnp.asarray(mask),
                                 values=jnp.asarray(values), gamma=jnp.float32(0.99), lam=jnp.float32(0.9),
                                 group_size=2)
        return run_estimator(get_estimator(name), inputs)

    adv0, ret0 = run(values, 0.0)
    obs = mask == 0
    values2 = np.where(obs, rng.normal(size=(B, T)) * 100, values).astype(np.float32)
    adv1, ret1 = run(values2, jnp.asarray(rng.normal(size=(B, T)) * 100, jnp.float32))
    m = mask > 0
    np.testing.assert_allclose(np.asarray(adv1)[m], np.asarray(adv0)[m], rtol=1e-5, atol=1e-5)
    if ret0 is not None:
        np.testing.assert_allclose(np.asarray(ret1)[m], np.asarray(ret0)[m], rtol=1e-5, atol=1e-5)


def test_gae_across_turns_discounts_over_policy_tokens_only():
    """Against a slow loop: GAE over the policy's tokens with the observation spans removed."""
    rng = np.random.default_rng(1)
    T = 16
    mask = np.zeros((1, T), np.float32)
    mask[0, [0, 1, 2, 6, 7, 11, 12, 13]] = 1
    r = rng.normal(size=(1, T)).astype(np.float32)
    v = rng.normal(size=(1, T)).astype(np.float32)
    gamma, lam = 0.9, 0.8
    adv, _ = ppojax.gae(jnp.asarray(r), jnp.asarray(v), jnp.asarray(mask), gamma=gamma, lam=lam)
    idx = np.flatnonzero(mask[0])
    rr, vv = r[0, idx], v[0, idx]
    want, a = np.zeros(len(idx)), 0.0
    for j in reversed(range(len(idx))):
        nv = vv[j + 1] if j + 1 < len(idx) else 0.0
        a = rr[j] + gamma * nv - vv[j] + gamma * lam * a
        want[j] = a
    np.testing.assert_allclose(np.asarray(adv)[0, idx], want, rtol=1e-5, atol=1e-6)
