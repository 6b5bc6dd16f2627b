"""The PPO-RLHF iteration, one jit read top to bottom.

    sample k responses per prompt (KV-cache decode, temperature)
      -> optional truncation at a stop token
      -> recompute actor and reference log-probs (and critic values, when the estimator needs a critic) with the
         training forward path (``ppo.reuse_sampler_logprobs``: the actor's come from the sampler instead)
      -> scores (jittable reward or reward model; a host reward comes in between ``rollout`` and ``update``)
      -> penalties, per-token KL-shaped rewards, the advantage estimator (GAE, GRPO, RLOO, ... or a user's own),
         whitening
      -> ppo_epochs x minibatches of updates: nested ``lax.scan``, a fresh permutation each epoch
         (``ppo.length_buckets``: minibatches of similar lengths, each at the narrowest width that holds them)
      -> KL controller update

``ppo_iteration(state, prompt_ids, prompt_mask)`` runs all of it in one jit. ``rollout`` and ``update`` are the two
halves, also jitted, for rewards that must run on the host (text-based scorers) between them. Every hyperparameter
that a sweep or ``set_hparams`` may change is read from ``state.hparams``, so none of them recompiles.

Data parallelism is not written here: the program is the global one (jit + ``NamedSharding``, see
``ppojax.parallel``), or, inside ``shard_map``, every statistic and gradient goes through
``state.setup.collectives``, which makes them global.
"""

from __future__ import annotations

import collections
from typing import Dict, Optional

import chex
import flax.struct
import jax
import jax.numpy as jnp

from ppojax.generate.logprobs import token_logprobs
from ppojax.generate.sampling import sample
from ppojax.models import forward_hidden, lm_head, scalar_head, value_forward
from ppojax.parallel.sharding import constrain_rows
from ppojax.rl import rewards as rewards_lib
from ppojax.rl.advantages import AdvantageInputs, masked_mean, run_estimator, whiten
from ppojax.rl.config import bucket_widths
from ppojax.rl.kl import update_kl_state
from ppojax.rl.losses import LossInputs, explained_variance
from ppojax.rl.hparams import InState
from ppojax.rl.optimizer import learning_rate_at, optimizer_step, update_count
from ppojax.rl.setup import PPOSetup
from ppojax.rl.state import TrainState

Metrics = Dict[str, jax.Array]


@flax.struct.dataclass
class Rollout:
    """One batch of experience. Response arrays are ``[batch, response_length]``, prompt arrays ``[batch, P]``
    (each prompt repeated ``samples_per_prompt`` times: rows ``g*k .. g*k+k-1`` share one)."""

    prompt_ids: jax.Array
    prompt_mask: jax.Array
    tokens: jax.Array  # response tokens (pad after EOS / truncation)
    mask: jax.Array  # int32, 1 on real response tokens
    logprobs: jax.Array  # actor, tempered, recomputed with the training forward (or the sampler's)
    ref_logprobs: jax.Array  # reference, tempered
    values: Optional[jax.Array]  # critic V(s_t), the value before emitting token t; None without a critic
    entropy: Optional[jax.Array]  # per-token entropy of the tempered actor; None with reuse_sampler_logprobs
    found_stop: jax.Array  # [batch] bool: truncate token found (True when truncation is off)
    context_mask: Optional[jax.Array] = None
    """Multi-turn episodes (``ppojax.train.multiturn``): 1 on every real token of the response region, the policy's
    own turns AND the observations between them (what the models attend to); ``mask`` is then 1 on the policy's
    tokens only (what is trained on). None: the same as ``mask`` (a single-turn rollout)."""
    turn_rewards: Optional[jax.Array] = None
    """``[batch, response]`` rewards placed at the last token of the turn that earned them (per-turn credit); the
    scores passed to the update are then their sums. None: the score goes to the last real token."""


# ----------------------------------------------------------------------------------------------------------------
# Forward helpers shared by rollout and update: one code path, so the first ratio is exactly 1.


def _response_hidden(setup: PPOSetup, params, ids, mask, prompt_len: int, holes: bool = False):
    """Final hidden states ``[batch, response, width]`` of the positions that predict the response tokens.

    ``ids``/``mask`` are prompt + response; the hidden state predicting response token t sits at position P - 1 + t.
    ``holes`` (multi-turn episodes, whose response region has masked slots between turns): at the last REAL slot
    before P + t instead (:func:`predicting_slots`), which is what the sampler's KV cache conditioned on.
    """
    hidden = forward_hidden(setup.model, params, ids, mask)
    return _at_predicting(hidden, mask, prompt_len) if holes else hidden[:, prompt_len - 1:-1]


def predicting_slots(mask: jax.Array, prompt_len: int) -> jax.Array:
    """``[batch, response]`` int32: for each response slot ``P + t``, the last slot before it that holds a real
    token, ``max{s < P + t : mask[s] = 1}`` (0 if none): the position whose output predicts the token at ``P + t``.
    With no holes before any real token it is ``P - 1 + t``."""
    slots = jnp.where(mask > 0, jnp.arange(mask.shape[1], dtype=jnp.int32)[None, :], -1)
    last_real = jax.lax.cummax(slots, axis=1)  # [batch, T]: last real slot at or before s
    return jnp.maximum(last_real[:, prompt_len - 1:-1], 0)


def _at_predicting(x, mask, prompt_len: int):
    """``x [batch, T, ...]`` read at :func:`predicting_slots`: ``[batch, response, ...]``."""
    idx = predicting_slots(mask, prompt_len)
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def _head_logprobs(setup: PPOSetup, params, hidden, ids, mask, prompt_len: int, temperature, recompute: bool = False):
    """Log-prob of each response token and the entropy of the tempered distribution, ``[batch, response]``, from
    the response positions' hidden states: only they meet the vocabulary, in chunks (``token_logprobs``: no
    ``[batch, response, vocab]`` logits in memory)."""
    model = setup.model
    tokens = jnp.where(mask[:, prompt_len:] > 0, ids[:, prompt_len:], 0)  # pad ids may lie outside the vocabulary
    out = token_logprobs(hidden, lm_head(model, params), tokens, temperature=temperature,
                         chunk_size=setup.ppo.vocab_chunk_size, recompute=recompute, compute_dtype=model.compute_dtype)
    return out.logprobs, out.entropy


def _response_logprobs(setup: PPOSetup, params, ids, mask, prompt_len: int, temperature, recompute: bool = False,
                       holes: bool = False):
    """``_head_logprobs`` of the model's own forward: a policy's (the reference's) log-probs and entropies."""
    hidden = _response_hidden(setup, params, ids, mask, prompt_len, holes)
    return _head_logprobs(setup, params, hidden, ids, mask, prompt_len, temperature, recompute)


def _policy_and_values(setup: PPOSetup, actor, critic, ids, mask, prompt_len: int, temperature, *,
                       logprobs: bool = True, recompute: bool = False, holes: bool = False):
    """The actor's ``(logprobs, entropy)`` and the critic's values ``V(s_t)`` of every response position,
    ``[batch, response]`` each: what the rollout stores and what every update recomputes, through this one code path
    (so the first minibatch's ratio is exactly 1).

    ``actor``/``critic`` are the role views' params (``critic`` None without a critic). A separate critic runs its
    own trunk; a shared one (``setup.shared_critic``) reads the actor's hidden states, ``V(s_t) =
    scalar_head(value_head, h_t)``: one trunk forward for both heads. ``logprobs=False`` (the rollout with
    ``ppo.reuse_sampler_logprobs``) skips the vocabulary, and the actor's trunk too unless a shared critic needs
    it; what is not computed is None. ``holes``: the response region has masked slots between real tokens (a
    multi-turn episode): each token is predicted from the last real slot before it.
    """
    logp = entropy = values = hidden = None
    if logprobs or setup.shared_critic:
        hidden = _response_hidden(setup, actor, ids, mask, prompt_len, holes)  # [batch, resp, width]
    if logprobs:
        logp, entropy = _head_logprobs(setup, actor, hidden, ids, mask, prompt_len, temperature, recompute)
    if critic is not None:
        if setup.shared_critic:
            values = scalar_head(critic, hidden)
        else:
            values = value_forward(setup.model, critic, ids, mask)
            values = _at_predicting(values, mask, prompt_len) if holes else values[:, prompt_len - 1:-1]
    return logp, entropy, values


def _concat(prompt_ids, prompt_mask, tokens, mask):
    return (jnp.concatenate([prompt_ids, tokens], axis=1),
            jnp.concatenate([prompt_mask.astype(jnp.int32), mask.astype(jnp.int32)], axis=1))


def _chunked(fn, chunk: int, *arrays):
    """``fn`` over row chunks of ``arrays`` with ``lax.map``: bounds the memory of [rows, time, vocab] logits."""
    rows = arrays[0].shape[0]
    if chunk >= rows:
        return fn(*arrays)
    split = [a.reshape(rows // chunk, chunk, *a.shape[1:]) for a in arrays]
    out = jax.lax.map(lambda xs: fn(*xs), tuple(split))
    return jax.tree.map(lambda x: x.reshape(rows, *x.shape[2:]), out)


def sampling_top_p(setup: PPOSetup, hp):
    """The nucleus mass to sample with: the state's array when the setup filters, else the 1.0 that compiles none."""
    return hp.top_p if isinstance(setup.ppo.top_p, InState) else 1.0


def _constrain(setup: PPOSetup, tree, leading: int = 0):
    """Under a ``(data, fsdp)`` mesh, keep the rows of every array split over the devices (not inside shard_map)."""
    return constrain_rows(tree, leading) if setup.axis_name is None else tree


# ----------------------------------------------------------------------------------------------------------------
# Phase 1: rollout


def _rollout(state: TrainState, prompt_ids, prompt_mask):
    setup: PPOSetup = state.setup
    cfg, hp, coll = setup.ppo, state.hparams, setup.collectives
    chex.assert_rank([prompt_ids, prompt_mask], 2)
    k = cfg.samples_per_prompt
    if k > 1:  # rows g*k .. g*k+k-1 answer prompt g, each with its own randomness (its own row index)
        prompt_ids, prompt_mask = jnp.repeat(prompt_ids, k, axis=0), jnp.repeat(prompt_mask, k, axis=0)
    key, sample_key = jax.random.split(state.key)
    batch, prompt_len = prompt_ids.shape
    # Global row index: a row's sample does not depend on the device count.
    example_ids = jnp.arange(batch) + coll.device_index() * batch
    actor = setup.roles.actor(state.params, state.frozen)

    out = sample(setup.model, actor, prompt_ids, prompt_mask, sample_key, max_new_tokens=cfg.response_length,
                 temperature=hp.temperature, top_k=cfg.top_k, top_p=sampling_top_p(setup, hp),
                 eos_token_id=cfg.eos_token_id, pad_token_id=setup.pad_token_id, example_ids=example_ids,
                 stop_sequences=cfg.stop_token_ids)
    tokens, mask = out.tokens, out.mask
    found = jnp.ones((batch,), bool)
    if cfg.truncate_token is not None:
        tokens, mask, found = rewards_lib.truncate_after_stop(
            tokens, mask, stop_token=cfg.truncate_token, min_length=cfg.truncate_after,
            pad_token_id=setup.pad_token_id)

    return state.replace(key=key), _forwards(state, prompt_ids, prompt_mask, tokens, mask, out.logprobs, found)


def _forwards(state: TrainState, prompt_ids, prompt_mask, tokens, mask, sampler_logprobs, found,
              context_mask=None, turn_rewards=None) -> Rollout:
    """The rollout's forward passes over sampled responses: the actor's log-probs and entropies, the critic's
    values, the reference's log-probs (row chunks of ``ppo.rollout_chunk_size``). ``context_mask`` (a multi-turn
    episode): the models attend over it, ``mask`` marks the policy's tokens (see :class:`Rollout`)."""
    setup: PPOSetup = state.setup
    cfg, hp = setup.ppo, state.hparams
    batch, prompt_len = prompt_ids.shape
    holes = context_mask is not None
    ids, full_mask = _concat(prompt_ids, prompt_mask, tokens, context_mask if holes else mask)
    chunk = min(cfg.rollout_chunk_size or cfg.minibatch_size, batch)
    while batch % chunk:  # a local (per-device) batch smaller than the configured chunk
        chunk -= 1
    actor = setup.roles.actor(state.params, state.frozen)
    critic = setup.roles.critic(state.params, state.frozen) if setup.has_critic else None
    reuse = cfg.reuse_sampler_logprobs
    logp = entropy = values = None
    if not reuse or critic is not None:
        logp, entropy, values = _chunked(
            lambda i, m: _policy_and_values(setup, actor, critic, i, m, prompt_len, hp.temperature,
                                            logprobs=not reuse, holes=holes), chunk, ids, full_mask)
    if reuse:  # the sampler's log-prob of each sampled token: tempered, unfiltered (see PPOConfig)
        logp = sampler_logprobs
    reference = setup.roles.reference(state.params, state.frozen)
    ref_logp, _ = _chunked(lambda i, m: _response_logprobs(setup, reference, i, m, prompt_len, hp.temperature,
                                                           holes=holes), chunk, ids, full_mask)
    real = mask > 0
    masked = lambda x: None if x is None else jnp.where(real, x, 0.0)
    rollout = Rollout(
        prompt_ids=prompt_ids, prompt_mask=prompt_mask.astype(jnp.int32), tokens=tokens, mask=mask.astype(jnp.int32),
        logprobs=masked(logp), ref_logprobs=masked(ref_logp), values=masked(values), entropy=masked(entropy),
        found_stop=found, context_mask=None if context_mask is None else context_mask.astype(jnp.int32),
        turn_rewards=None if turn_rewards is None else jnp.where(real, turn_rewards.astype(jnp.float32), 0.0),
    )
    return _constrain(setup, rollout)


def _episode_rollout(state: TrainState, prompt_ids, prompt_mask, tokens, mask, context_mask, sampler_logprobs,
                     turn_rewards):
    """The rollout of sampled multi-turn episodes (``ppojax.train.multiturn``): prompts ``[batch, P]`` (already one
    row per episode), the response region's tokens, policy mask, context mask, the sampler's log-probs and the
    per-turn rewards, all ``[batch, R]``. The state is unchanged (the turns drew their keys already)."""
    found = jnp.ones((prompt_ids.shape[0],), bool)
    return state, _forwards(state, prompt_ids, prompt_mask, tokens, mask, sampler_logprobs, found, context_mask,
                            turn_rewards)


def compute_scores(state: TrainState, rollout: Rollout) -> jax.Array:
    """Scores ``[batch]`` from the state's jittable reward: response-only rewards get ``(tokens, mask)``; reward
    models (``reward.uses_prompt``) get the prompt + response sequence. A reward model that holds only adapters over
    the run's frozen base (``reward.uses_base``: ``LoraRewardModel``) is handed the reference params here, so the
    base is never copied into ``state.reward``."""
    reward = state.reward
    if reward is None:
        raise ValueError("this state has no jittable reward (reward=None: a host reward); score the rollout on the "
                         "host and call ppojax.update(state, rollout, scores)")
    if getattr(reward, "uses_base", False):
        reward = reward.with_base(state.setup.roles.reference(state.params, state.frozen))
    if getattr(reward, "uses_prompt", False):
        ids, mask = _concat(rollout.prompt_ids, rollout.prompt_mask, rollout.tokens, _attended(rollout))
        scores = reward(ids, mask)
    else:
        scores = reward(rollout.tokens, rollout.mask)
    rewards_lib.check_scores(scores, rollout.tokens.shape[0], where=reward)
    return scores


# ----------------------------------------------------------------------------------------------------------------
# Phase 2: update


def _attended(rollout: Rollout):
    """The response region's attention mask: the context mask of a multi-turn episode, else the response mask."""
    return rollout.mask if rollout.context_mask is None else rollout.context_mask


def _loss(params, state: TrainState, mb: Rollout, advantages, returns, n_tokens, n_seqs, response_length: int):
    """The combined loss on one (micro)batch: forward actor and critic (one trunk when shared), then the terms.
    ``response_length``: the rollout's full width (``mb`` may be trimmed to fewer response positions)."""
    setup = state.setup
    ids, mask = _concat(mb.prompt_ids, mb.prompt_mask, mb.tokens, _attended(mb))
    P = mb.prompt_ids.shape[1]
    actor = setup.roles.actor(params, state.frozen)
    critic = setup.roles.critic(params, state.frozen) if setup.has_critic else None
    logp, entropy, values = _policy_and_values(setup, actor, critic, ids, mask, P, state.hparams.temperature,
                                               recompute=setup.ppo.recompute_logits,
                                               holes=mb.context_mask is not None)
    inputs = LossInputs.create(
        mask=mb.mask, n_tokens=n_tokens, n_seqs=n_seqs, logprobs=logp, old_logprobs=mb.logprobs,
        ref_logprobs=mb.ref_logprobs, entropy=entropy, values=values, old_values=mb.values, advantages=advantages,
        returns=returns, tokens=mb.tokens, aggregation=setup.ppo.loss_aggregation, response_length=response_length)
    return setup.loss_fn(inputs, state.hparams)


def _minibatch_update(state: TrainState, mb: Rollout, advantages, returns, response_length: Optional[int] = None):
    """One optimizer update on a minibatch (optionally in micro-batches whose gradients are summed).
    ``response_length``: the rollout's full width when ``mb`` is trimmed (None: ``mb``'s own)."""
    setup = state.setup
    if response_length is None:
        response_length = mb.tokens.shape[1]
    coll = setup.collectives
    # Masked means divide by the minibatch's global token (sequence) count: exact across micro-batches and devices.
    n_tokens = jnp.maximum(coll.sum(jnp.sum(mb.mask).astype(jnp.float32)), 1.0)
    n_seqs = coll.sum(jnp.float32(mb.mask.shape[0]))
    grad_fn = jax.value_and_grad(_loss, has_aux=True)
    params = coll.local_gradients(state.params)
    accum = setup.optimizer.grad_accum_steps
    if accum == 1:
        (_, metrics), grads = grad_fn(params, state, mb, advantages, returns, n_tokens, n_seqs, response_length)
    else:
        rows = mb.tokens.shape[0]
        if rows % accum:
            raise ValueError(f"optimizer.grad_accum_steps={accum} must divide the per-device minibatch of {rows}")
        split = lambda x: x.reshape(accum, rows // accum, *x.shape[1:])
        micro = jax.tree.map(split, (mb, advantages, returns))
        micro = _constrain(setup, micro, leading=1)  # each micro-batch split over the devices, not one per device

        def body(acc, xs):
            (_, m), g = grad_fn(params, state, *xs, n_tokens, n_seqs, response_length)
            if acc is None:
                return (g, m), None
            acc_g, acc_m = acc
            # Term metrics are sums over tokens / n_tokens, so micro-batches add up; maxima take the max.
            m = {k: jnp.maximum(acc_m[k], v) if k.endswith("_max") else acc_m[k] + v for k, v in m.items()}
            return (jax.tree.map(jnp.add, acc_g, g), m), None

        first = jax.tree.map(lambda x: x[0], micro)
        rest = jax.tree.map(lambda x: x[1:], micro)
        init, _ = body(None, first)
        (grads, metrics), _ = jax.lax.scan(body, init, rest)
    grads = coll.gradients(grads)
    metrics = {k: (coll.max(v) if k.endswith("_max") else coll.sum(v)) for k, v in metrics.items()}
    hp = state.hparams
    lr = learning_rate_at(setup, hp, update_count(state.opt_state))
    params, opt_state, metrics["grad_norm"] = optimizer_step(setup, hp, lr, grads, state.opt_state, state.params)
    return state.replace(params=params, opt_state=opt_state), metrics


def _penalized(setup: PPOSetup, hp, scores, rollout: Rollout):
    """lm-human-preferences' missing-stop score and TRL's missing-EOS penalty, when the setup has them."""
    cfg = setup.ppo
    if cfg.missing_truncate_penalty is not None:
        scores = rewards_lib.penalize_missing(scores, rollout.found_stop, hp.missing_truncate_penalty)
    if cfg.missing_eos_penalty is not None:
        scores = rewards_lib.missing_eos_penalty(scores, rollout.tokens, rollout.mask, cfg.eos_token_id,
                                                 hp.missing_eos_penalty)
    return scores


def response_widths(mask: jax.Array) -> jax.Array:
    """``[batch]`` int32: each response's width, its last real position + 1 (0 for an empty response)."""
    chex.assert_rank(mask, 2)
    return jnp.max(jnp.where(mask > 0, jnp.arange(1, mask.shape[1] + 1), 0), axis=1).astype(jnp.int32)


def minibatch_rows(epoch_key, n_groups: int, k: int, n_minibatches: int, row_widths=None) -> jax.Array:
    """The rows of each minibatch of one epoch, ``[n_minibatches, n_groups * k / n_minibatches]``: a random
    permutation of the ``n_groups`` prompt groups (``k`` rows each, kept together) cut into equal minibatches.

    ``row_widths`` (``ppo.length_buckets``; ``[n_groups * k]``, from :func:`response_widths`): the permuted groups
    are stably sorted by their longest row before the cut, so that each minibatch holds responses of similar length
    (ties keep the random order), and the minibatches are then taken in a random order drawn from
    ``fold_in(epoch_key, 1)``: the same ``epoch_key`` as without, so the caller's RNG key use does not change.
    """
    groups = jax.random.permutation(epoch_key, n_groups)
    if row_widths is not None:
        longest = row_widths.reshape(n_groups, k).max(-1)
        groups = groups[jnp.argsort(longest[groups], stable=True)]
    rows = (groups[:, None] * k + jnp.arange(k)).reshape(n_minibatches, -1)
    if row_widths is not None:
        rows = rows[jax.random.permutation(jax.random.fold_in(epoch_key, 1), n_minibatches)]
    return rows


def _trim(mb: Rollout, advantages, returns, *, width: int):
    """The minibatch's first ``width`` response positions (the prompt whole). The model is causal, so the kept
    positions' log-probs and values do not change, and every dropped one is padding (masked out of every loss)."""
    cut = lambda x: None if x is None else x[:, :width]
    if width == mb.tokens.shape[1]:
        return mb, advantages, returns
    mb = mb.replace(tokens=cut(mb.tokens), mask=cut(mb.mask), logprobs=cut(mb.logprobs),
                    ref_logprobs=cut(mb.ref_logprobs), values=cut(mb.values), entropy=cut(mb.entropy),
                    context_mask=cut(mb.context_mask), turn_rewards=cut(mb.turn_rewards))
    return mb, cut(advantages), cut(returns)


def _update(state: TrainState, rollout: Rollout, scores: jax.Array):
    setup = state.setup
    cfg, hp, coll = setup.ppo, state.hparams, setup.collectives
    axis = setup.axis_name
    scores = scores.astype(jnp.float32)
    chex.assert_shape(scores, (rollout.tokens.shape[0],))
    raw_scores = scores
    n_nonfinite = coll.sum(rewards_lib.nonfinite_count(scores))
    scores = _penalized(setup, hp, scores, rollout)

    # Per-token rewards: -beta * kl_t, plus the score on the last real token. Per-turn credit (a multi-turn
    # rollout's turn_rewards, whose sums are the scores): each turn's reward at its last token, and only what the
    # penalties changed at the last token.
    mask = rollout.mask
    placed = scores if rollout.turn_rewards is None else scores - raw_scores
    rewards, kl = rewards_lib.shape_rewards(placed, rollout.logprobs, rollout.ref_logprobs, mask,
                                            state.kl.coef, kl_estimator=cfg.kl_estimator)
    if rollout.turn_rewards is not None:
        rewards = rewards + jnp.where(mask > 0, rollout.turn_rewards, 0.0)
    if cfg.whiten_rewards:
        rewards = whiten(rewards, mask, shift_mean=False, axis_name=axis)
    advantages, returns = run_estimator(setup.estimator, AdvantageInputs(
        scores=scores, rewards=rewards, kl=kl, mask=mask, values=rollout.values, gamma=hp.gamma, lam=hp.lam,
        hparams=hp.declared, group_size=cfg.samples_per_prompt, axis_name=axis))
    if setup.whiten_advantages:
        advantages = whiten(advantages, mask, shift_mean=True, axis_name=axis)

    # epochs x minibatches: nested scans, a fresh permutation per epoch (split from the state's key). The
    # permutation is of the GLOBAL batch's prompt groups, so the minibatches are the same whatever the device count,
    # and each holds whole groups.
    batch = rollout.tokens.shape[0]
    n_dev = coll.device_count()
    n_mb, k = cfg.num_minibatches, cfg.samples_per_prompt
    if (batch * n_dev) % n_mb or (batch * n_dev // n_mb) % n_dev:
        raise ValueError(f"the batch of {batch * n_dev} does not split into {n_mb} minibatches over {n_dev} devices")
    mb_size = batch * n_dev // n_mb  # global
    key, shuffle_key = jax.random.split(state.key)
    # shard_map: gather the (small, next to the model) rollout once so that each device can take its slice of every
    # global minibatch.
    data = coll.gather_rows((rollout, advantages, returns))

    # ppo.length_buckets: the static widths a minibatch may run at, and each row's width (of the global batch, so
    # every device picks the same branch of the switch below).
    full_width = rollout.tokens.shape[1]
    widths = bucket_widths(full_width, cfg.length_buckets)
    row_widths = response_widths(data[0].mask) if widths else None  # [global batch]

    # The scans carry only what the updates change (params, optimizer state): the frozen params, the reward model
    # and the hyperparameters are read-only inputs, not loop state that XLA would have to copy through every step.
    def epoch(carry, epoch_key):
        perm = minibatch_rows(epoch_key, batch * n_dev // k, k, n_mb, row_widths)  # [n_mb, mb_size], global rows
        # the narrowest width that holds each minibatch's longest response (0 when off: one branch, full width)
        branch = (jnp.zeros((n_mb,), jnp.int32) if not widths else
                  jnp.searchsorted(jnp.asarray(widths), row_widths[perm].max(-1)).astype(jnp.int32))
        if axis is not None:  # this device's slice of each global minibatch
            local = mb_size // n_dev
            perm = jax.lax.dynamic_slice_in_dim(perm, coll.device_index() * local, local, axis=1)

        def at_width(width):
            def run(c, mb):
                s, metrics = _minibatch_update(state.replace(params=c[0], opt_state=c[1]),
                                               *_trim(*mb, width=width), response_length=full_width)
                return (s.params, s.opt_state), metrics
            return run

        def minibatch(c, xs):
            idx, b = xs
            mb = _constrain(setup, jax.tree.map(lambda x: jnp.take(x, idx, axis=0), data))
            if not widths:
                return at_width(full_width)(c, mb)
            return jax.lax.switch(b, [at_width(w) for w in widths], c, mb)

        return jax.lax.scan(minibatch, carry, (perm, branch))

    state = state.replace(key=key)
    epoch_keys = jax.random.split(shuffle_key, cfg.ppo_epochs)
    train = lambda carry: jax.lax.scan(epoch, carry, epoch_keys)  # stats: [epochs, n_mb]

    def skip(carry):  # the update's metrics are NaN: not computed
        stats_shape = jax.eval_shape(train, carry)[1]
        return carry, jax.tree.map(lambda x: jnp.full(x.shape, jnp.nan, x.dtype), stats_shape)

    # A non-finite score would poison every update: skip it and keep the old params and optimizer state, so the
    # last good state stays usable (decided before the loop, so no select over the whole state afterwards).
    (params, opt_state), stats = jax.lax.cond(n_nonfinite == 0, train, skip, (state.params, state.opt_state))
    new_state = state.replace(params=params, opt_state=opt_state)

    # KL controller on the mean KL per response (nats, summed over tokens), n_steps = episodes in the batch.
    mean_kl = coll.mean(kl.sum(-1).mean())
    new_kl = update_kl_state(cfg.kl, state.kl, mean_kl, batch * n_dev, target=hp.kl_target, horizon=hp.kl_horizon)
    new_state = new_state.replace(kl=new_kl, step=state.step + 1)

    real = mask > 0
    lengths = mask.sum(-1).astype(jnp.float32)
    score_mean = coll.mean(raw_scores.mean())
    metrics = {
        "score_mean": score_mean,
        "score_std": jnp.sqrt(coll.mean(jnp.square(raw_scores - score_mean).mean())),
        "score_penalized_mean": coll.mean(scores.mean()),
        "reward": coll.mean(jnp.where(real, rewards, 0.0).sum(-1).mean()),
        "kl": mean_kl,
        "kl_coef": state.kl.coef,
        # reuse_sampler_logprobs: no actor forward in the rollout; the update's first minibatch is the rollout policy
        "entropy": (stats["entropy"][0, 0] if rollout.entropy is None
                    else masked_mean(rollout.entropy, mask, axis_name=axis)),
        "response_length": coll.mean(lengths.mean()),
        "advantage_mean": masked_mean(advantages, mask, axis_name=axis),
        "truncate_found": coll.mean(rollout.found_stop.astype(jnp.float32).mean()),
        "nonfinite_scores": n_nonfinite,
        "learning_rate": learning_rate_at(setup, hp, update_count(state.opt_state)),
    }
    if rollout.values is not None:
        metrics["value_mean"] = masked_mean(rollout.values, mask, axis_name=axis)
        metrics["explained_variance"] = explained_variance(rollout.values, returns, mask, axis_name=axis)
    for k_, v in stats.items():  # averaged over epochs x minibatches; a name the rollout already uses gets a prefix
        metrics[f"update/{k_}" if k_ in metrics else k_] = v.max() if k_.endswith("_max") else v.mean()
    # The first minibatch of the first epoch sees the rollout policy itself: its ratio must be exactly 1.
    for k_ in ("approx_kl", "clipfrac", "ratio_max"):
        if k_ in stats:
            metrics[f"first_minibatch/{k_}"] = stats[k_][0, 0]
    return new_state, metrics


# ----------------------------------------------------------------------------------------------------------------
# The phases as functions of the state, and their jitted entry points


def _iteration(state: TrainState, prompt_ids, prompt_mask):
    state, rollout = _rollout(state, prompt_ids, prompt_mask)
    scores = compute_scores(state, rollout)
    return _update(state, rollout, scores)


PHASES = {"iteration": _iteration, "rollout": _rollout, "update": _update, "episode": _episode_rollout}
"""The traceable phases, ``fn(state, *args) -> (state, out)``: what ``ppojax.train.mesh_step`` jits over a mesh and
``ppojax.train.sweep`` vmaps over runs."""

ROLLOUT_CHANGES = ("key",)
UPDATE_CHANGES = ("params", "opt_state", "kl", "key", "step")
CHANGES = {"iteration": UPDATE_CHANGES, "rollout": ROLLOUT_CHANGES, "update": UPDATE_CHANGES, "episode": ()}
"""The state fields each phase changes; the others are read-only inputs of its jit."""
STATE_FIELDS = ("params", "opt_state", "frozen", "reward", "hparams", "kl", "key", "step")

_TRACES: collections.Counter = collections.Counter()


def compile_count(phase: Optional[str] = None) -> int:
    """How many times the library's jitted phases were traced (each trace is one XLA compilation): for one phase
    (``'iteration'``, ``'rollout'``, ``'update'``, or a mesh / sweep variant such as ``'mesh/iteration'``), or all
    of them. Compare it before and after a change to see whether the change recompiled."""
    if phase is None:
        return sum(_TRACES.values())
    return _TRACES[phase]


def jit_state_fn(fn, changes: tuple, *, donate: bool = False, out_shardings=None, name: str = "phase",
                 transform=None):
    """``jax.jit`` of ``fn(state, *args) -> (state, out)`` where only the ``changes`` fields of the state cross the
    jit boundary on the way out.

    A jitted function that returned the whole state would make XLA write a fresh copy of every array it passes
    through unchanged (the reference policy and the reward model on every update; everything, optimizer state
    included, on every rollout). The returned callable instead takes ``(state, *args)``, sends the state in as its
    changing and read-only fields, and rebuilds it with the new ``changes`` around the unchanged arrays.

    ``donate=True`` donates the changing fields' input buffers, so XLA updates the parameters and optimizer state in
    place: the state passed in must not be used afterwards. ``out_shardings``: a ``state_shardings``-like dict for
    the ``changes`` and the sharding of ``out``, for jit over a mesh. ``transform(inner) -> inner'`` wraps the
    traced function before jit (``jax.vmap`` over a run axis, ``jax.shard_map``); ``name`` counts its traces in
    :func:`compile_count`.
    """
    frozen_names = tuple(f for f in STATE_FIELDS if f not in changes)

    def inner(setup, changing, frozen, *args):
        _TRACES[name] += 1  # runs once per trace, never per call
        state = TrainState(setup=setup, **changing, **frozen)
        new, out = fn(state, *args)
        return {k: getattr(new, k) for k in changes}, out

    traced = inner if transform is None else transform(inner)
    jitted = jax.jit(traced, static_argnums=0, donate_argnums=(1,) if donate else (),
                     **({} if out_shardings is None else {"out_shardings": out_shardings}))

    def call(state: TrainState, *args):
        changing = {k: getattr(state, k) for k in changes}
        frozen = {k: getattr(state, k) for k in frozen_names}
        if donate:
            changing = _distinct_buffers(changing, frozen)
        new, out = jitted(state.setup, changing, frozen, *args)
        return state.replace(**new), out

    def eval_shape(state: TrainState, *args):
        """Trace without compiling or running (the trace is reused by the first call): shapes of ``out``."""
        changing = {k: getattr(state, k) for k in changes}
        frozen = {k: getattr(state, k) for k in frozen_names}
        return jitted.eval_shape(state.setup, changing, frozen, *args)[1]

    call.eval_shape = eval_shape
    return call


def _distinct_buffers(donated, others):
    """Copy the donated arrays whose device buffers another input also uses (the critic starts as the actor's trunk;
    a reward model may share it; ``device_put`` may wrap one buffer in two arrays): XLA cannot donate one buffer
    twice, nor one that another argument reads."""

    def buffers(x):
        try:
            return {s.data.unsafe_buffer_pointer() for s in x.addressable_shards}
        except Exception:  # not a plain device array (e.g. a PRNG key on some backends): compare by identity
            return {("id", id(x))}

    seen = set()
    for x in jax.tree.leaves(others):
        if isinstance(x, jax.Array):
            seen |= buffers(x)

    def own(x):
        if not isinstance(x, jax.Array):
            return x
        b = buffers(x)
        if b & seen:
            x = jnp.copy(x)
            b = buffers(x)
        seen.update(b)
        return x

    return jax.tree.map(own, donated)


_JITTED = {
    (phase, donate): jit_state_fn(PHASES[phase], CHANGES[phase], donate=donate, name=phase)
    for phase, donate in (("iteration", False), ("iteration", True), ("rollout", False), ("update", False),
                          ("update", True), ("episode", False))
}


def ppo_iteration(state: TrainState, prompt_ids, prompt_mask, *, donate: bool = False):
    """One PPO iteration in one jit: ``(state, prompts [batch / k, P]) -> (state, metrics)``.

    Prompts are left-padded token ids with their mask: ``ppo.batch_size / ppo.samples_per_prompt`` of them (or the
    per-device share inside ``shard_map``); each is answered ``samples_per_prompt`` times. Metrics are scalar
    arrays; pull them once per iteration. ``donate=True`` updates the parameters and optimizer state in place (half
    the memory of the update; the state passed in is consumed and must not be used again).
    """
    return _JITTED["iteration", bool(donate)](state, prompt_ids, prompt_mask)


score_rollout = jax.jit(compute_scores)
"""``compute_scores`` jitted: the scores of a rollout under the state's jittable reward."""


def rollout(state: TrainState, prompt_ids, prompt_mask):
    """The first half of an iteration: ``(state, prompts) -> (state, Rollout)``, jitted. Only the RNG key of the
    returned state is new."""
    return _JITTED["rollout", False](state, prompt_ids, prompt_mask)


def update(state: TrainState, rollout_batch: Rollout, scores, *, donate: bool = False):
    """The second half: ``(state, rollout, scores [batch]) -> (state, metrics)``, jitted. Use it with host rewards:
    ``state, r = rollout(state, p, m); scores = host_fn(np.asarray(r.tokens), np.asarray(r.mask)); update(...)``.
    ``donate`` as in ``ppo_iteration``."""
    return _JITTED["update", bool(donate)](state, rollout_batch, jnp.asarray(scores, jnp.float32))


def episode_rollout(state: TrainState, prompt_ids, prompt_mask, tokens, mask, context_mask, sampler_logprobs,
                    turn_rewards) -> Rollout:
    """The :class:`Rollout` of played multi-turn episodes (``ppojax.train.multiturn``), jitted: the actor's,
    reference's and critic's forward passes over each whole episode. Arrays as ``_episode_rollout``'s."""
    return _JITTED["episode", False](state, prompt_ids, prompt_mask, tokens, mask, context_mask, sampler_logprobs,
                                     turn_rewards)[1]


def check_iteration(state: TrainState, prompt_ids, prompt_mask, *, host_reward: bool = False) -> None:
    """Trace the iteration on these prompts' shapes without compiling it, so every trace-time contract fails now,
    with its own message: the reward's output (``[batch]`` float32), a user estimator's or loss term's shapes, the
    model's context length. ``prompt_ids``/``prompt_mask`` may be ``jax.ShapeDtypeStruct``s. ``host_reward``: the
    scores come from the host (check the rollout and the update). The first real call reuses the trace."""
    if not host_reward:
        _JITTED["iteration", False].eval_shape(state, prompt_ids, prompt_mask)
        return
    batch = _JITTED["rollout", False].eval_shape(state, prompt_ids, prompt_mask)
    scores = jax.ShapeDtypeStruct((batch.tokens.shape[0],), jnp.float32)
    _JITTED["update", False].eval_shape(state, batch, scores)


def check_metrics(metrics: Metrics, iteration: Optional[int] = None) -> None:
    """Raise ``FloatingPointError`` naming what went non-finite (scores or a loss) in an iteration's metrics."""
    import math

    where = f" at iteration {iteration}" if iteration is not None else ""
    n_bad = int(metrics.get("nonfinite_scores", 0))
    if n_bad:
        raise FloatingPointError(
            f"the reward returned {n_bad} non-finite scores{where}; the update was skipped and the params kept. "
            "Check the reward function for NaN/inf (e.g. a division by a zero length)."
        )
    for name in ("loss/total", "policy_loss", "value_loss", "kl", "grad_norm"):
        if name in metrics and not math.isfinite(float(metrics[name])):
            raise FloatingPointError(f"{name} is {float(metrics[name])}{where}: training diverged")
