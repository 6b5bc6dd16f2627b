"""Masked statistics over response tokens: sums, means and variances that padding never reaches.

``mask`` is 1.0 on real tokens and 0.0 on padding. With an ``axis_name`` (inside ``jax.shard_map`` or a named
``vmap``) the sums and token counts are ``psum``-ed over that axis, so each statistic is the global batch's::

    masked_mean(x) = sum(x * mask) / max(sum(mask), 1)        (an all-padding batch gives 0, not nan)
    masked_var(x)  = masked_mean((x - masked_mean(x))^2)       (biased, numpy ddof=0)
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

__all__ = ["masked_mean", "masked_sum", "masked_var"]


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
