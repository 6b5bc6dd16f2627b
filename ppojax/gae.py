"""Generalised advantage estimation and masked whitening.

All arrays are ``[batch, time]`` over response tokens; ``mask`` is 1.0 on real tokens and 0.0 on padding
(left/right padding or holes in the middle alike). Padding positions are treated as absent steps: they neither
contribute to nor interrupt the recursion.

The masked statistics take an optional ``axis_name``: inside ``jax.shard_map`` (or a named ``vmap``) the sums and
token counts are ``psum``-ed over that axis, so the statistics are those of the global batch, not of one shard.
"""

from __future__ import annotations

import numbers

import chex
import jax
import jax.numpy as jnp

__all__ = ["gae", "whiten", "masked_sum", "masked_mean", "masked_var"]


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


def _maybe_psum(x: jax.Array, axis_name) -> jax.Array:
    return x if axis_name is None else jax.lax.psum(x, axis_name)


def masked_sum(x: jax.Array, mask: jax.Array, axis_name=None) -> jax.Array:
    """``sum(x * mask)`` over all axes (and over ``axis_name`` devices); padding values never leak (even inf/nan)."""
    chex.assert_equal_shape([x, mask])
    x = jnp.asarray(x, jnp.float32)
    mask = jnp.asarray(mask, jnp.float32)
    return _maybe_psum(jnp.sum(jnp.where(mask > 0, x * mask, 0.0)), axis_name)


def _count(mask: jax.Array, axis_name) -> jax.Array:
    count = _maybe_psum(jnp.sum(jnp.asarray(mask, jnp.float32)), axis_name)
    # An all-padding batch gives 0/1 = 0 rather than nan.
    return jnp.where(count > 0, count, 1.0)


def masked_mean(x: jax.Array, mask: jax.Array, axis_name=None) -> jax.Array:
    """Mean of ``x`` over real tokens (``mask`` weights), global over ``axis_name`` if given. Scalar float32."""
    return masked_sum(x, mask, axis_name) / _count(mask, axis_name)


def masked_var(x: jax.Array, mask: jax.Array, axis_name=None, *, mean: jax.Array | None = None) -> jax.Array:
    """Biased variance ``mean((x - mean)^2)`` over real tokens (numpy ``ddof=0``; torch's ``var`` is unbiased).

    ``mean`` may be passed if already computed (it must then be the same masked mean).
    """
    if mean is None:
        mean = masked_mean(x, mask, axis_name)
    return masked_mean(jnp.square(jnp.asarray(x, jnp.float32) - mean), mask, axis_name)


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
