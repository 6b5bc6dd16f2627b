"""Advantage estimators (GAE, GRPO, Dr. GRPO, RLOO, REINFORCE++), masked whitening, and the estimator registry.

All arrays are ``[batch, time]`` over response tokens; ``mask`` is 1.0 on real tokens and 0.0 on padding
(left/right padding or holes in the middle alike). Padding positions are treated as absent steps: they neither
contribute to nor interrupt the recursion.

The masked statistics take an optional ``axis_name``: inside ``jax.shard_map`` (or a named ``vmap``) the sums and
token counts are ``psum``-ed over that axis, so the statistics are those of the global batch, not of one shard.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import numbers
from collections.abc import Mapping
from typing import Callable, Optional

import chex
import flax.struct
import jax
import jax.numpy as jnp

from ppojax.registry import resolve_callable
from ppojax.rl.hparams import declare_hparams
from ppojax.rl.stats import masked_mean, masked_sum, masked_var

__all__ = [
    "AdvantageInputs",
    "Estimator",
    "discounted_returns",
    "estimators",
    "gae",
    "get_estimator",
    "grpo",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "register_estimator",
    "reinforce_pp",
    "rloo",
    "run_estimator",
    "whiten",
]


def _check_unit_interval(name: str, value) -> None:
    # Traced or array values cannot be checked here; Python numbers (the config's) can.
    if isinstance(value, numbers.Real) and not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")


def gae(
    rewards: jax.Array,
    values: jax.Array,
    mask: jax.Array,
    *,
    gamma: float,
    lam: float,
) -> tuple[jax.Array, jax.Array]:
    r"""Generalised advantage estimates and value targets (Schulman et al. 2016, arXiv:1506.02438).

    Over the real (``mask == 1``) steps of each row, in order::

        delta_t = r_t + gamma * V_{t+1} - V_t
        A_t     = delta_t + gamma * lam * A_{t+1}
        R_t     = A_t + V_t                       # the value target ("returns")

    where ``t+1`` is the next *real* step of the same row, and ``V = A = 0`` after the last real step (the
    episode ends with the response; there is no bootstrap). Masked steps are skipped: the reverse scan carries the
    running advantage and the next value through them unchanged, and their rewards and values are ignored.

    Args:
      rewards: ``[batch, time]`` per-token rewards.
      values: ``[batch, time]`` critic values ``V_t`` of the states before each token.
      mask: ``[batch, time]``, 1.0 on real tokens, 0.0 on padding.
      gamma: discount in [0, 1].
      lam: GAE lambda in [0, 1].

    Returns:
      ``(advantages, returns)``, float32 ``[batch, time]``, both 0 at masked positions.
    """
    _check_unit_interval("gamma", gamma)
    _check_unit_interval("lam", lam)
    chex.assert_rank([rewards, values, mask], 2)
    chex.assert_equal_shape([rewards, values, mask])

    rewards = rewards.astype(jnp.float32)
    values = values.astype(jnp.float32)
    real = mask > 0  # [batch, time] bool
    gamma = jnp.asarray(gamma, jnp.float32)
    lam = jnp.asarray(lam, jnp.float32)

    def step(carry, xs):
        value_tp1, adv_tp1 = carry  # [batch] each: next real step's value and advantage (0 past the end)
        r_t, v_t, real_t = xs  # [batch] each
        delta_t = r_t + gamma * value_tp1 - v_t
        adv_t = delta_t + gamma * lam * adv_tp1
        # A padding step is absent: pass the carry through unchanged.
        carry = (jnp.where(real_t, v_t, value_tp1), jnp.where(real_t, adv_t, adv_tp1))
        return carry, jnp.where(real_t, adv_t, 0.0)

    batch = rewards.shape[0]
    init = (jnp.zeros((batch,), jnp.float32), jnp.zeros((batch,), jnp.float32))
    # Scan over time (leading axis after the transpose), last step first.
    _, advantages_tb = jax.lax.scan(step, init, (rewards.T, values.T, real.T), reverse=True)
    advantages = advantages_tb.T  # [batch, time]
    returns = jnp.where(real, advantages + values, 0.0)
    return advantages, returns


def whiten(
    x: jax.Array,
    mask: jax.Array,
    shift_mean: bool = True,
    *,
    eps: float = 1e-8,
    axis_name=None,
) -> jax.Array:
    """Normalise ``x`` to zero mean and unit (biased) variance over its real tokens.

    ``y = (x - mean) / sqrt(var + eps)``; with ``shift_mean=False`` the mean is added back, so only the scale
    changes (lm-human-preferences whitens rewards this way; advantages are shifted and scaled). Statistics use
    real tokens only; the result is 0 at padding. With ``axis_name`` the statistics are global over that axis.
    """
    chex.assert_equal_shape([x, mask])
    x = jnp.asarray(x, jnp.float32)
    mean = masked_mean(x, mask, axis_name)
    var = masked_var(x, mask, axis_name, mean=mean)
    y = (x - mean) * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        y = y + mean
    return jnp.where(mask > 0, y, 0.0)


# ----------------------------------------------------------------------------------------------------------------
# Estimators beside GAE. Rows g*k .. g*k+k-1 of a batch answer the same prompt (k = group_size). Each returns
# [batch, time]: the sequence's advantage on every real token and 0 on padding.


def _group_scores(scores: jax.Array, group_size: int) -> jax.Array:
    """``scores [batch]`` as ``[batch / k, k]`` groups (float32), checking that ``k`` divides the batch."""
    chex.assert_rank(scores, 1)
    if not isinstance(group_size, int) or group_size < 2:
        raise ValueError(f"group_size must be an int >= 2 (k samples per prompt), got {group_size!r}")
    if scores.shape[0] % group_size:
        raise ValueError(f"group_size={group_size} does not divide the batch of {scores.shape[0]}")
    return scores.astype(jnp.float32).reshape(-1, group_size)


def _broadcast_to_tokens(per_sequence: jax.Array, mask: jax.Array) -> jax.Array:
    chex.assert_rank(mask, 2)
    chex.assert_equal_shape_prefix([per_sequence, mask], 1)
    return jnp.where(mask > 0, per_sequence.astype(jnp.float32)[:, None], 0.0)


def grpo(scores: jax.Array, mask: jax.Array, *, group_size: int, scale_by_std: bool = True,
         eps: float = 1e-6) -> jax.Array:
    r"""Group-relative advantages (GRPO, Shao et al. 2024, arXiv:2402.03300)::

        A_i = (s_i - mean_g) / (std_g + eps)        std with Bessel's correction (ddof=1), as TRL and verl
        A_i = s_i - mean_g                          scale_by_std=False: Dr. GRPO (Liu et al. 2025, arXiv:2503.20783)

    over the ``k = group_size`` responses of the same prompt (rows ``g*k .. g*k+k-1``), broadcast to every real
    token of the response. ``scores [batch]``, ``mask [batch, time]`` -> ``[batch, time]`` float32.
    """
    s = _group_scores(scores, group_size)  # [groups, k]
    centred = s - s.mean(axis=1, keepdims=True)
    if scale_by_std:
        std = jnp.sqrt(jnp.sum(jnp.square(centred), axis=1, keepdims=True) / (group_size - 1))
        centred = centred / (std + eps)
    return _broadcast_to_tokens(centred.reshape(-1), mask)


def rloo(scores: jax.Array, mask: jax.Array, *, group_size: int) -> jax.Array:
    r"""REINFORCE leave-one-out (Ahmadian et al. 2024, arXiv:2402.14740)::

        A_i = s_i - mean_{j != i} s_j = k / (k - 1) * (s_i - mean_g)

    over the ``k = group_size`` responses of the same prompt, broadcast to every real token.
    """
    s = _group_scores(scores, group_size)
    k = group_size
    baseline = (s.sum(axis=1, keepdims=True) - s) / (k - 1)
    return _broadcast_to_tokens((s - baseline).reshape(-1), mask)


def discounted_returns(rewards: jax.Array, mask: jax.Array, *, gamma) -> jax.Array:
    r"""Returns-to-go over the real tokens of each row: ``G_t = r_t + gamma * G_{t+1}`` (``t+1`` the next real
    token; 0 after the last), a reverse scan that passes padding through unchanged. ``[batch, time]`` float32, 0 on
    padding. It is :func:`gae` with ``V = 0`` and ``lam = 1``."""
    zeros = jnp.zeros_like(rewards, jnp.float32)
    returns, _ = gae(rewards, zeros, mask, gamma=gamma, lam=1.0)
    return returns


def reinforce_pp(rewards: jax.Array, mask: jax.Array, *, gamma=1.0, axis_name=None) -> jax.Array:
    r"""REINFORCE++ (Hu 2025, arXiv:2501.03262): discounted returns-to-go of the per-token rewards (the score on the
    last token plus ``-beta * KL_t`` on every token), whitened over the real tokens of the whole batch::

        G_t = r_t + gamma * G_{t+1};     A_t = (G_t - mean(G)) / sqrt(var(G) + 1e-8)

    with the biased variance over real tokens (:func:`whiten`; global over ``axis_name``). No critic, no groups.
    """
    return whiten(discounted_returns(rewards, mask, gamma=gamma), mask, shift_mean=True, axis_name=axis_name)


# ----------------------------------------------------------------------------------------------------------------
# The estimator registry: every estimator behind one signature, so a user's own plugs in the same way.


@flax.struct.dataclass(kw_only=True)
class AdvantageInputs:
    """What an estimator may read. Arrays are ``[batch, time]`` over response tokens unless noted; rows
    ``g*k .. g*k+k-1`` answer the same prompt (``k = group_size``)."""

    scores: jax.Array
    """``[batch]`` sequence scores, after the truncation / EOS penalties (the KL is not in them)."""
    rewards: jax.Array
    """Per-token rewards: the score on the last real token plus ``-beta * kl_t`` on every real token."""
    kl: jax.Array
    """Per-token KL estimate to the reference (the reward's estimator), 0 on padding."""
    mask: jax.Array
    """1 on real response tokens."""
    values: Optional[jax.Array]
    """The critic's ``V(s_t)``; None when the estimator needs no critic."""
    gamma: jax.Array
    """Discount (a float32 array from the state's hyperparameters)."""
    lam: jax.Array
    """GAE lambda (array)."""
    hparams: dict = flax.struct.field(default_factory=dict)
    """The hyperparameters the run's estimator and policy loss declared at registration, ``{name: float32 array}``
    (``ppo.hparams``, else the declared defaults): ``register_estimator("mine", hparams={"lam_critic": 0.95})``
    reads ``inputs.hparams["lam_critic"]``."""
    group_size: int = flax.struct.field(pytree_node=False, default=1)
    """k, the responses sampled per prompt (``ppo.samples_per_prompt``)."""
    axis_name: Optional[str] = flax.struct.field(pytree_node=False, default=None)
    """Mesh axis of the batch inside ``shard_map`` (None: the program is the global one); batch statistics reduce
    over it. A group is never split over it."""


EstimatorFn = Callable[[AdvantageInputs], "tuple[jax.Array, Optional[jax.Array]]"]


@dataclasses.dataclass(frozen=True)
class Estimator:
    """A registered advantage estimator: ``fn(inputs: AdvantageInputs) -> (advantages, returns or None)``, both
    ``[batch, time]``. ``returns`` are the critic's targets; an estimator without a critic returns None."""

    name: str
    fn: EstimatorFn
    needs_critic: bool = False
    """The rollout computes values and the state holds a critic only when this is True."""
    needs_groups: bool = False
    """True: refuses ``samples_per_prompt = 1`` (a group of one has no baseline)."""
    whiten_advantages: bool = False
    """Default of ``ppo.whiten_advantages`` (None) for this estimator."""
    hparams: dict = dataclasses.field(default_factory=dict, compare=False)
    """The array hyperparameters it declares, ``{name: default}`` (``ppo.hparams.<name>``; read from
    ``AdvantageInputs.hparams``)."""


_ESTIMATORS: dict[str, Estimator] = {}


def register_estimator(name: str, fn: Optional[EstimatorFn] = None, *, needs_critic: bool = False,
                       needs_groups: bool = False, whiten_advantages: bool = False, replace: bool = False,
                       hparams: Optional[Mapping[str, float]] = None):
    """Register ``fn`` as the advantage estimator ``name`` (``ppo.advantage_estimator: name``). Usable as a
    decorator: ``@register_estimator("mine", needs_critic=False)``.

    ``hparams={"lam_critic": 0.95}`` declares float hyperparameters of its own, with their defaults: each becomes an
    array of the train state (``ppo.hparams.lam_critic`` in a config; ``set_hparams(state, lam_critic=0.9)`` and
    sweeps change it without recompiling), read as ``inputs.hparams["lam_critic"]``. Names are global across
    registrations (``ppojax.rl.hparams.declare_hparams``)."""

    def register(f):
        if not callable(f):
            raise TypeError(f"estimator {name!r} must be callable, got {type(f).__name__}")
        if name in _ESTIMATORS and not replace and _ESTIMATORS[name].fn is not f:
            raise ValueError(f"an advantage estimator named {name!r} is already registered (pass replace=True)")
        declared = declare_hparams(f"advantage estimator {name!r}", hparams)
        _ESTIMATORS[name] = Estimator(name, f, needs_critic, needs_groups, whiten_advantages, hparams=declared)
        f.estimator = _ESTIMATORS[name]
        return f

    return register if fn is None else register(fn)


def estimators() -> dict[str, Estimator]:
    """The registered estimators by name."""
    return dict(_ESTIMATORS)


def get_estimator(spec: str) -> Estimator:
    """The estimator named ``spec``: a registered name, or ``'package.module:function'`` (a function registered
    with :func:`register_estimator`, or a plain ``fn(inputs) -> (advantages, returns)``, then critic-free)."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"ppo.advantage_estimator must be a name or 'package.module:function', got {spec!r}")
    if ":" not in spec:
        if spec not in _ESTIMATORS:
            close = difflib.get_close_matches(spec, list(_ESTIMATORS), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown advantage estimator {spec!r} (registered: {', '.join(sorted(_ESTIMATORS))})"
                             f"{hint}")
        return _ESTIMATORS[spec]
    fn = resolve_callable(spec, what="advantage estimator", key="ppo.advantage_estimator")
    registered = getattr(fn, "estimator", None)
    if isinstance(registered, Estimator):
        return registered
    return Estimator(spec, fn)


def run_estimator(estimator: Estimator, inputs: AdvantageInputs):
    """Call ``estimator`` and check its output: ``(advantages, returns or None)`` of shape ``[batch, time]``
    (checked on shapes only, so it runs at trace time, and under ``jax.eval_shape`` before compiling)."""
    out = estimator.fn(inputs)
    if not (isinstance(out, tuple) and len(out) == 2):
        raise TypeError(f"advantage estimator {estimator.name!r} must return (advantages, returns or None), got "
                        f"{type(out).__name__}")
    adv, ret = out
    shape = tuple(inputs.mask.shape)
    for what, x in (("advantages", adv), ("returns", ret)):
        if x is None and what == "returns":
            if estimator.needs_critic:
                raise ValueError(f"advantage estimator {estimator.name!r} needs a critic but returned no returns")
            continue
        if tuple(getattr(x, "shape", ())) != shape:
            raise ValueError(f"advantage estimator {estimator.name!r} returned {what} of shape "
                             f"{tuple(getattr(x, 'shape', ()))}; expected [batch, time] = {shape}")
    return adv.astype(jnp.float32), None if ret is None else ret.astype(jnp.float32)


@functools.partial(register_estimator, "gae", needs_critic=True, whiten_advantages=True)
def _gae_estimator(inputs: AdvantageInputs):
    """PPO's estimator: GAE over the per-token rewards and the critic's values."""
    return gae(inputs.rewards, inputs.values, inputs.mask, gamma=inputs.gamma, lam=inputs.lam)


@functools.partial(register_estimator, "grpo", needs_groups=True)
def _grpo_estimator(inputs: AdvantageInputs):
    """GRPO: scores standardised within each prompt's group."""
    return grpo(inputs.scores, inputs.mask, group_size=inputs.group_size), None


@functools.partial(register_estimator, "dr_grpo", needs_groups=True)
def _dr_grpo_estimator(inputs: AdvantageInputs):
    """Dr. GRPO: scores centred within each prompt's group, no std division."""
    return grpo(inputs.scores, inputs.mask, group_size=inputs.group_size, scale_by_std=False), None


@functools.partial(register_estimator, "rloo", needs_groups=True)
def _rloo_estimator(inputs: AdvantageInputs):
    """RLOO: each score minus the mean of the other responses to its prompt."""
    return rloo(inputs.scores, inputs.mask, group_size=inputs.group_size), None


@functools.partial(register_estimator, "reinforce_pp")
def _reinforce_pp_estimator(inputs: AdvantageInputs):
    """REINFORCE++: whitened returns-to-go of the KL-shaped per-token rewards."""
    return reinforce_pp(inputs.rewards, inputs.mask, gamma=inputs.gamma, axis_name=inputs.axis_name), None
