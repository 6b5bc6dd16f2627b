"""KL-coefficient controller against a hand loop, and recompile checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ppojax.rl.kl import KLControlConfig, KLState, init_kl_state, update_kl_state


def test_init():
    state = init_kl_state(KLControlConfig(kind="adaptive", init_coef=0.2))
    assert isinstance(state, KLState)
    assert state.coef.dtype == jnp.float32 and state.coef.shape == ()
    np.testing.assert_allclose(state.coef, 0.2)


def test_fixed_never_changes():
    cfg = KLControlConfig(kind="fixed", init_coef=0.05)
    state = init_kl_state(cfg)
    for kl in (0.0, 3.0, 100.0):
        state = update_kl_state(cfg, state, jnp.float32(kl), 512)
    np.testing.assert_allclose(state.coef, 0.05)


def test_adaptive_matches_hand_loop_under_jit():
    cfg = KLControlConfig(kind="adaptive", init_coef=0.15, target=6.0, horizon=10000.0)
    update = jax.jit(update_kl_state, static_argnums=0)
    state = init_kl_state(cfg)
    beta = 0.15
    # KLs below, near and far above the target (the error is clipped to +-0.2), and varying batch sizes.
    schedule = [(1.0, 512), (5.5, 512), (6.0, 256), (7.0, 64), (40.0, 512), (0.0, 1000), (6.6, 512)]
    for kl, n in schedule:
        error = min(max(kl / 6.0 - 1.0, -0.2), 0.2)
        beta = beta * (1.0 + error * n / 10000.0)
        state = update(cfg, state, jnp.float32(kl), jnp.int32(n))
        np.testing.assert_allclose(state.coef, beta, rtol=1e-6)
    assert state.coef.dtype == jnp.float32
    # Direction: KL above target raises the coefficient, below lowers it.
    assert float(update(cfg, state, jnp.float32(12.0), 512).coef) > float(state.coef)
    assert float(update(cfg, state, jnp.float32(1.0), 512).coef) < float(state.coef)


def test_changing_coefficient_does_not_retrace():
    cfg = KLControlConfig(kind="adaptive")
    traces = {"step": 0, "update": 0}

    def penalised_rewards(state, kl_t):  # what a trainer does with the coefficient
        traces["step"] += 1
        return -state.coef * kl_t

    def counted_update(state, kl, n):
        traces["update"] += 1
        return update_kl_state(cfg, state, kl, n)

    step, update = jax.jit(penalised_rewards), jax.jit(counted_update)
    state = init_kl_state(cfg)
    kl_t = jnp.ones((2, 3))
    seen = set()
    for kl in (1.0, 20.0, 3.0, 9.0):
        np.testing.assert_allclose(step(state, kl_t), -float(state.coef) * np.ones((2, 3)), rtol=1e-6)
        seen.add(float(state.coef))
        state = update(state, jnp.float32(kl), jnp.int32(512))
    assert len(seen) == 4  # the coefficient did change
    assert traces == {"step": 1, "update": 1}


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"kind": "pid"}, "kind"),
        ({"init_coef": -0.1}, "init_coef"),
        ({"init_coef": float("inf")}, "init_coef"),
        ({"target": 0.0}, "target"),
        ({"target": -1.0}, "target"),
        ({"horizon": 0}, "horizon"),
    ],
)
def test_config_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        KLControlConfig(**kwargs)


def test_config_is_frozen_and_hashable():
    cfg = KLControlConfig(kind="adaptive")
    hash(cfg)
    with pytest.raises(Exception):
        cfg.init_coef = 1.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        KLControlConfig("adaptive")  # keyword-only
