"""Reward-model training on preference comparisons, normalisation, and the reward-model directory format.

The model (lm-human-preferences, Ziegler et al. 2019, https://arxiv.org/abs/1909.08593): a GPT-2 trunk initialised
from the language model plus a scalar head (init std ``1 / sqrt(width + 1)``), read at the last real token of
query + response: ``r(x, y) = head(h_last)``, scored by :class:`ppojax.rewards.RewardModel` exactly as PPO scores.

The loss (:func:`preference_loss`) is the softmax cross-entropy of the labeler's choice among the k responses, the
Plackett-Luce / Bradley-Terry likelihood of a Boltzmann-rational labeler.

One epoch is one jit: a fresh permutation (split from the state's key), then a ``lax.scan`` of Adam updates over
minibatches of comparisons (the last partial minibatch is dropped; a different one each epoch).

Data parallelism: with ``axis_name`` set and the step run inside ``shard_map`` over that mesh axis, each device's
loss is its comparisons' summed NLL divided by the GLOBAL comparison count, so the global gradient is the ``psum``
of the per-device gradients, and the metrics (sums over the global count) are ``psum``-ed too.

After training, :func:`normalize_reward_model` sets the gain and bias so that scores of reference-policy samples have
mean 0 and std 1 (lm-human-preferences normalises on 256 samples).

Directory format (:func:`save_reward_model` / :func:`load_reward_model`; ``reward.reward_model_path`` of the PPO
runner)::

    config.json          the model's config (transformers)
    model.safetensors    the trunk (ppojax.save_pretrained; the head is not in it)
    reward_head.json     {"kernel": [width floats], "bias": float, "gain": float, "bias_norm": float}
                         score = gain * (h_last . kernel + bias) + bias_norm

A LoRA reward model (``LoraRewardModel``: adapters over the policy's frozen base) has ``adapter_config.json`` and
``adapter_model.safetensors`` (PEFT's format, ``ppojax.models.lora.save_adapter``) in place of ``model.safetensors``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Optional

import chex
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ppojax.models import Params, init_value_params, ModelConfig
from ppojax.models.lora import LoraSpec
from ppojax.rl.preferences import PreferenceBatch
from ppojax.rl.rewards import LoraRewardModel, lora_reward_model, reward_model
# The reward-model directory's format lives in rewards.py (a run's `reward_model` reward reads it); re-exported
# here, where reward models are trained and saved.
from ppojax.rl.rewards import load_reward_model, save_reward_model  # noqa: F401

__all__ = [
    "RewardTrainConfig",
    "RewardTrainState",
    "comparison_scores",
    "create_reward_train_state",
    "evaluate",
    "fit",
    "load_reward_model",
    "normalize_reward_model",
    "preference_loss",
    "reward_params",
    "save_reward_model",
    "train_epoch",
    "trained_reward_model",
]


@dataclasses.dataclass(frozen=True, kw_only=True)
class RewardTrainConfig:
    """Reward-model training hyperparameters."""

    epochs: int = 1
    """Passes over the training comparisons (lm-human-preferences trains its reward model for 1 epoch)."""
    batch_size: int = 32
    """Comparisons per Adam update."""
    learning_rate: float = 5e-5
    """Adam learning rate (lm-human-preferences: 5e-5 for GPT-2 124M; tiny random models want ~1e-3)."""
    max_grad_norm: Optional[float] = 1.0
    """Clip the global gradient norm to this; None disables clipping."""
    head_init_std: Optional[float] = None
    """Std of the head's initial weights; None means ``1 / sqrt(n_embd + 1)`` (lm-human-preferences)."""

    def __post_init__(self):
        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise ValueError(f"epochs must be a positive int, got {self.epochs!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {self.batch_size!r}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"learning_rate must be a finite number > 0, got {self.learning_rate!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {self.max_grad_norm!r}")
        if self.head_init_std is not None and not self.head_init_std >= 0:
            raise ValueError(f"head_init_std must be >= 0 or None, got {self.head_init_std!r}")


@dataclasses.dataclass(frozen=True, eq=False)
class _Setup:
    """The static part of a training run (identity-hashed: one setup, one compilation)."""

    model: ModelConfig
    tx: optax.GradientTransformation
    axis_name: Optional[str] = None
    lora: Optional[LoraSpec] = None
    """LoRA's rank, alpha and targets when only adapters and the head train (``params = {'adapters', 'head'}``)."""


@flax.struct.dataclass
class RewardTrainState:
    """Everything an update reads and writes. ``params`` (what the optimizer sees) are scalar-head params
    (``init_value_params``), or with LoRA ``{'adapters': ..., 'head': ...}`` over the frozen ``base``."""

    params: Params
    opt_state: optax.OptState
    key: jax.Array
    """Split every epoch for that epoch's permutation."""
    step: jax.Array
    """int32: optimizer updates done."""
    base: Optional[Params]
    """LoRA: the frozen base LM params the adapters apply to (never updated); None when every weight trains."""
    setup: _Setup = flax.struct.field(pytree_node=False)


def create_reward_train_state(config: ModelConfig, lm_params: Params, cfg: RewardTrainConfig, *, key: jax.Array,
                              axis_name: Optional[str] = None, lora: Optional[LoraSpec] = None) -> RewardTrainState:
    """A fresh state: the LM's trunk plus a random scalar head (std ``cfg.head_init_std`` or ``1/sqrt(d+1)``).

    With ``lora`` (a ``ppojax.models.lora.LoraSpec``: rank, alpha, targets) the trunk is ``lm_params`` frozen (held
    as is, not copied) plus fresh adapters, and the optimizer covers only the adapters and the head; the trained
    model is a :class:`ppojax.rewards.LoraRewardModel` that a PPO run on the same base scores with
    (:func:`trained_reward_model`)."""
    head_key, key = jax.random.split(key)
    std = cfg.head_init_std if cfg.head_init_std is not None else 1.0 / math.sqrt(config.width + 1)
    params = init_value_params(config, lm_params, head_init_std=std, key=head_key)
    base = None
    if lora is not None:
        lora = LoraSpec(lora.rank, lora.alpha, lora.targets)  # a role view works too: keep the spec alone
        adapters = lora.init_adapters(config, lm_params, jax.random.fold_in(head_key, 1))
        params, base = {"adapters": adapters, "head": params["head"]}, lm_params
    parts = [optax.clip_by_global_norm(cfg.max_grad_norm)] if cfg.max_grad_norm is not None else []
    tx = optax.chain(*parts, optax.adam(cfg.learning_rate))
    return RewardTrainState(params=params, opt_state=tx.init(params), key=key, step=jnp.zeros((), jnp.int32),
                            base=base, setup=_Setup(model=config, tx=tx, axis_name=axis_name, lora=lora))


def _model_params(lora: Optional[LoraSpec], params: Params, base: Optional[Params]) -> Params:
    """The scalar-head params the model functions take: ``params`` itself, or with LoRA the base's trunk merged with
    the adapters (``W + alpha/r · A B``) under the trained head."""
    if lora is None:
        return params
    return {"transformer": lora.merge(base, params["adapters"])["transformer"], "head": params["head"]}


def reward_params(state: RewardTrainState) -> Params:
    """The scalar-head params of the model being trained (merged with its adapters under LoRA): what
    :func:`evaluate` and :func:`comparison_scores` take, and what ``save_reward_model`` writes."""
    return _model_params(state.setup.lora, state.params, state.base)


def trained_reward_model(state: RewardTrainState, *, gain: float = 1.0, bias: float = 0.0):
    """The reward model of a training state: a :class:`RewardModel`, or under LoRA a
    :class:`ppojax.rewards.LoraRewardModel` holding only adapters and head (its base comes from the PPO state)."""
    config = state.setup.model
    if state.setup.lora is None:
        return reward_model(config, state.params, gain=gain, bias=bias)
    return lora_reward_model(config, state.setup.lora, state.params, gain=gain, bias=bias)


# ----------------------------------------------------------------------------------------------------------------
# The loss


def preference_loss(scores: jax.Array, choice: jax.Array, weights: Optional[jax.Array] = None, *,
                    n_total: Optional[jax.Array] = None) -> tuple[jax.Array, dict]:
    """Softmax cross-entropy of the chosen response among k (Plackett-Luce; Bradley-Terry for k = 2).

        nll_i = logsumexp_j s_ij - s_i,c_i   = -log softmax(s_i)_c_i
        loss  = sum_i w_i * nll_i / N,       N = n_total, or sum_i w_i

    For k = 2 ``nll = -log sigmoid(s_chosen - s_other)``: Bradley & Terry (1952); the k-way form is
    lm-human-preferences' best-of-4 loss (Ziegler et al. 2019, eq. 1). ``weights`` (0/1) drop padded rows;
    ``n_total`` is the global count when a batch is split over micro-batches or devices, so the per-part losses
    add up to the global mean.

    Args:
      scores: ``[n, k]`` reward-model scores of each comparison's responses.
      choice: ``[n]`` int, index of the preferred response.
      weights: ``[n]`` optional per-comparison weights (default 1).
      n_total: optional scalar normaliser (default ``sum(weights)``).

    Returns:
      ``(loss, metrics)``; metrics ``loss``, ``accuracy`` (the chosen response scored strictly highest) and
      ``margin`` (chosen score minus the mean of the others) are weighted sums over N, like the loss.
    """
    chex.assert_rank([scores, choice], [2, 1])
    chex.assert_equal_shape_prefix([scores, choice], 1)
    scores = scores.astype(jnp.float32)
    n, k = scores.shape
    weights = jnp.ones((n,), jnp.float32) if weights is None else weights.astype(jnp.float32)
    chex.assert_shape(weights, (n,))
    if n_total is None:
        n_total = jnp.maximum(jnp.sum(weights), 1.0)
    chosen = jnp.take_along_axis(scores, choice[:, None].astype(jnp.int32), axis=1)[:, 0]  # [n]
    nll = jax.nn.logsumexp(scores, axis=1) - chosen  # [n]
    # Strictly highest: a tie (e.g. a constant reward model) does not count as correct.
    others_max = jnp.max(jnp.where(jax.nn.one_hot(choice, k, dtype=bool), -jnp.inf, scores), axis=1)
    correct = (chosen > others_max).astype(jnp.float32)
    margin = chosen - (jnp.sum(scores, axis=1) - chosen) / (k - 1)
    loss = jnp.sum(weights * nll) / n_total
    metrics = {"loss": loss, "accuracy": jnp.sum(weights * correct) / n_total,
               "margin": jnp.sum(weights * margin) / n_total}
    return loss, metrics


@functools.partial(jax.jit, static_argnums=0)
def comparison_scores(config: ModelConfig, params: Params, batch: PreferenceBatch) -> jax.Array:
    """Raw reward-model scores ``[n, k]``: each response appended to its left-padded query, read at the last real
    token by :meth:`RewardModel.raw` (the path PPO scores with)."""
    n, k, r = batch.tokens.shape
    q = batch.query_ids.shape[1]
    query_ids = jnp.broadcast_to(batch.query_ids[:, None, :], (n, k, q))
    query_mask = jnp.broadcast_to(batch.query_mask[:, None, :], (n, k, q))
    ids = jnp.concatenate([query_ids, batch.tokens], axis=-1).reshape(n * k, q + r)  # [n * k, Q + R]
    mask = jnp.concatenate([query_mask, batch.mask], axis=-1).reshape(n * k, q + r)
    rm = reward_model(config, params)
    return rm.raw(ids, mask).reshape(n, k)


def _loss_fn(params, base, setup: _Setup, batch: PreferenceBatch, weights, n_total):
    scores = comparison_scores(setup.model, _model_params(setup.lora, params, base), batch)
    return preference_loss(scores, batch.choice, weights, n_total=n_total)


def _global_count(weights, axis_name):
    n = jnp.sum(weights.astype(jnp.float32))
    if axis_name is not None:
        n = jax.lax.psum(n, axis_name)
    return jnp.maximum(n, 1.0)


def _update(state: RewardTrainState, batch: PreferenceBatch, weights) -> tuple[RewardTrainState, dict]:
    setup = state.setup
    n_total = _global_count(weights, setup.axis_name)
    (_, metrics), grads = jax.value_and_grad(_loss_fn, has_aux=True)(state.params, state.base, setup, batch, weights,
                                                                      n_total)
    if setup.axis_name is not None:
        # Each device's loss is its share of the global mean (local sum / global count): the global gradient and
        # metrics are SUMS over devices.
        grads = jax.lax.psum(grads, setup.axis_name)
        metrics = jax.lax.psum(metrics, setup.axis_name)
    updates, opt_state = setup.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics["grad_norm"] = optax.global_norm(grads)
    return state.replace(params=params, opt_state=opt_state, step=state.step + 1), metrics


@functools.partial(jax.jit, static_argnames=("batch_size",))
def train_epoch(state: RewardTrainState, data: PreferenceBatch, *, batch_size: int) -> tuple[RewardTrainState,
                                                                                              dict]:
    """One pass over ``data``: a fresh permutation, then ``n // batch_size`` updates in a ``lax.scan``.

    Returns the new state and the metrics averaged over the epoch's updates (scalars).
    """
    n = data.n
    n_mb = n // batch_size
    if n_mb < 1:
        raise ValueError(f"{n} training comparisons are fewer than one minibatch of {batch_size}")
    key, perm_key = jax.random.split(state.key)
    perm = jax.random.permutation(perm_key, n)[:n_mb * batch_size].reshape(n_mb, batch_size)

    # The frozen base (LoRA) is a read-only input of the scan, not loop state.
    base = state.base

    def minibatch(st, idx):
        st, metrics = _update(st.replace(base=base), data.take(idx), jnp.ones((batch_size,), jnp.float32))
        return st.replace(base=None), metrics

    state, metrics = jax.lax.scan(minibatch, state.replace(key=key, base=None), perm)  # metrics: [n_mb] each
    return state.replace(base=base), jax.tree.map(jnp.mean, metrics)


@functools.partial(jax.jit, static_argnames=("config", "batch_size"))
def _evaluate(config: ModelConfig, params: Params, data: PreferenceBatch, weights, *, batch_size: int):
    n_total = jnp.maximum(jnp.sum(weights), 1.0)
    chunks = data.n // batch_size
    split = jax.tree.map(lambda x: x.reshape(chunks, batch_size, *x.shape[1:]), (data, weights))

    def part(xs):
        batch, w = xs
        return preference_loss(comparison_scores(config, params, batch), batch.choice, w, n_total=n_total)[1]

    return jax.tree.map(jnp.sum, jax.lax.map(part, split))  # parts are shares of the global mean: they add up


def evaluate(config: ModelConfig, params: Params, data: PreferenceBatch, *, batch_size: int = 64) -> dict:
    """Loss, accuracy and margin on ``data`` (e.g. the held-out split), as Python floats.

    The comparisons go through in chunks of ``batch_size``; the last is padded with zero-weight rows.
    """
    n = data.n
    batch_size = max(1, min(batch_size, n))
    padded = -(-n // batch_size) * batch_size
    index = np.concatenate([np.arange(n), np.zeros(padded - n, np.int64)])
    weights = (np.arange(padded) < n).astype(np.float32)
    metrics = _evaluate(config, params, jax.tree.map(jnp.asarray, data.take(index)), jnp.asarray(weights),
                        batch_size=batch_size)
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


# ----------------------------------------------------------------------------------------------------------------
# Normalisation


def normalize_reward_model(rm, query_ids, query_mask, tokens, mask, *, base: Optional[Params] = None):
    """Sets gain and bias so that the scores of these calibration samples have mean 0 and std 1.

    ``query_ids``/``query_mask`` ``[n, Q]`` left-padded, ``tokens``/``mask`` ``[n, R]`` responses: samples of the
    reference policy (lm-human-preferences), laid out as a PPO rollout, so the statistics are those PPO starts from.
    A :class:`ppojax.rewards.LoraRewardModel` needs the ``base`` its adapters apply to.
    """
    chex.assert_rank([query_ids, query_mask, tokens, mask], 2)
    ids = jnp.concatenate([jnp.asarray(query_ids), jnp.asarray(tokens)], axis=1)
    full_mask = jnp.concatenate([jnp.asarray(query_mask), jnp.asarray(mask)], axis=1).astype(jnp.int32)
    if isinstance(rm, LoraRewardModel):
        if base is None:
            raise ValueError("normalize_reward_model: a LoRA reward model needs the base its adapters apply to (base=)")
        return rm.normalize(base, ids, full_mask)
    return rm.normalize(ids, full_mask)


# ----------------------------------------------------------------------------------------------------------------
# A training run (host loop)


def fit(state: RewardTrainState, train: PreferenceBatch, cfg: RewardTrainConfig, *,
        val: Optional[PreferenceBatch] = None, start_epoch: int = 0,
        on_epoch: Optional[Callable[[int, RewardTrainState, dict], None]] = None) -> tuple[RewardTrainState,
                                                                                            list[dict]]:
    """Epochs ``start_epoch + 1 .. cfg.epochs`` of :func:`train_epoch`, evaluating on ``val`` after each.

    ``on_epoch(epoch, state, metrics)`` runs after each epoch (checkpointing, logging). Returns the final state and
    one metrics dict per epoch (``train/...``, ``val/...``).
    """
    batch_size = min(cfg.batch_size, train.n)
    data = jax.tree.map(jnp.asarray, train)
    history = []
    for epoch in range(start_epoch + 1, cfg.epochs + 1):
        state, metrics = train_epoch(state, data, batch_size=batch_size)
        row = {"epoch": epoch, **{f"train/{k}": float(v) for k, v in jax.device_get(metrics).items()}}
        if val is not None:
            row.update({f"val/{k}": v for k, v in evaluate(state.setup.model, reward_params(state), val).items()})
        history.append(row)
        if on_epoch is not None:
            on_epoch(epoch, state, row)
    return state, history
