"""KL-coefficient control: the beta of the per-token reward ``r_t = -beta * kl_t`` (+ score at the last token).

The coefficient lives in :class:`KLState` as a float32 array, so a changing value never recompiles the step; the
configuration is a frozen (hashable) dataclass, usable as a static argument.

Adaptive control (Ziegler et al. 2019, arXiv:1909.08593, section 2.2; lm-human-preferences ``AdaptiveKLController``)::

    error = clip(KL / target - 1, -0.2, 0.2)
    beta  = beta * (1 + error * n_steps / horizon)

with ``KL`` the mean over the batch of each response's summed KL (nats per response) and ``n_steps`` the number
of episodes in the batch.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import chex
import flax.struct
import jax
import jax.numpy as jnp

__all__ = ["KLControlConfig", "KLState", "init_kl_state", "update_kl_state"]

# lm-human-preferences clips the proportional error to +-20% per update.
_ERROR_CLIP = 0.2


@dataclasses.dataclass(frozen=True, kw_only=True)
class KLControlConfig:
    """How the KL coefficient evolves. Defaults are lm-human-preferences' sentiment runs."""

    kind: Literal["fixed", "adaptive"] = "fixed"
    """``"fixed"`` keeps ``init_coef``; ``"adaptive"`` steers the KL towards ``target``."""
    init_coef: float = 0.15
    """Initial (or fixed) coefficient beta, >= 0."""
    target: float = 6.0
    """Adaptive only: target KL in nats per response, > 0."""
    horizon: float = 10000.0
    """Adaptive only: episodes over which a full proportional correction is applied, > 0."""

    def __post_init__(self):
        if self.kind not in ("fixed", "adaptive"):
            raise ValueError(f"KLControlConfig.kind must be 'fixed' or 'adaptive', got {self.kind!r}")
        if not math.isfinite(self.init_coef) or self.init_coef < 0:
            raise ValueError(f"KLControlConfig.init_coef must be finite and >= 0, got {self.init_coef!r}")
        if not math.isfinite(self.target) or self.target <= 0:
            raise ValueError(f"KLControlConfig.target must be finite and > 0, got {self.target!r}")
        if not math.isfinite(self.horizon) or self.horizon <= 0:
            raise ValueError(f"KLControlConfig.horizon must be finite and > 0, got {self.horizon!r}")


@flax.struct.dataclass
class KLState:
    """The current KL coefficient, a float32 scalar array."""

    coef: jax.Array


def init_kl_state(cfg: KLControlConfig) -> KLState:
    """Initial state: ``coef = cfg.init_coef``."""
    return KLState(coef=jnp.asarray(cfg.init_coef, jnp.float32))


def update_kl_state(cfg: KLControlConfig, state: KLState, kl: jax.Array, n_steps: jax.Array | int, *,
                    target=None, horizon=None) -> KLState:
    """One controller update after a batch (jit-safe; ``kl`` and ``n_steps`` may be traced, ``cfg`` is static).

    Args:
      cfg: the controller configuration (only ``kind`` is read when ``target`` and ``horizon`` are given).
      state: current state.
      kl: scalar, mean KL per response of the batch just collected (nats, summed over tokens).
      n_steps: number of episodes in that batch.
      target, horizon: the adaptive controller's settings as (traced) arrays; default ``cfg``'s.

    Returns:
      The new state; unchanged for ``kind == "fixed"``.
    """
    if cfg.kind == "fixed":
        return state
    target = cfg.target if target is None else target
    horizon = cfg.horizon if horizon is None else horizon
    kl = jnp.asarray(kl, jnp.float32)
    chex.assert_rank(kl, 0)
    n_steps = jnp.asarray(n_steps, jnp.float32)
    error = jnp.clip(kl / target - 1.0, -_ERROR_CLIP, _ERROR_CLIP)
    coef = state.coef * (1.0 + error * n_steps / horizon)
    return state.replace(coef=coef.astype(jnp.float32))
