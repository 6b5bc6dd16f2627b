"""GAE and whitening against slow reference loops written here."""

import functools
import os
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from ppojax.rl.advantages import gae, masked_mean, masked_var, whiten

# Rows: all real; right padding; left padding; holes in the middle; one real token; no real token.
MASK = np.array(
    [
        [1, 1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 0, 0, 0],
        [0, 0, 1, 1, 1, 1, 1],
        [1, 0, 1, 1, 0, 0, 1],
        [0, 0, 0, 1, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0],
    ],
    np.float32,
)


def _random_inputs(seed, mask=MASK):
    rng = np.random.default_rng(seed)
    rewards = rng.normal(size=mask.shape).astype(np.float32)
    values = rng.normal(size=mask.shape).astype(np.float32)
    # Garbage at padding must not matter.
    rewards = np.where(mask > 0, rewards, 1e3).astype(np.float32)
    values = np.where(mask > 0, values, -1e3).astype(np.float32)
    return rewards, values


def _reference_gae(rewards, values, mask, gamma, lam):
    """Textbook GAE on each row's real steps, gathered into a dense episode; scattered back afterwards."""
    advantages = np.zeros(mask.shape, np.float64)
    for b in range(mask.shape[0]):
        steps = [t for t in range(mask.shape[1]) if mask[b, t] > 0]
        r = [float(rewards[b, t]) for t in steps]
        v = [float(values[b, t]) for t in steps] + [0.0]  # no bootstrap after the last real token
        running = 0.0
        for i in reversed(range(len(steps))):
            delta = r[i] + gamma * v[i + 1] - v[i]
            running = delta + gamma * lam * running
            advantages[b, steps[i]] = running
    returns = np.where(mask > 0, advantages + values, 0.0)
    return advantages, returns


class GaeTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters((1.0, 0.95), (0.99, 0.95), (0.9, 0.0), (1.0, 1.0), (0.5, 0.3))
    def test_matches_reference_loop(self, gamma, lam):
        rewards, values = _random_inputs(0)
        fn = self.variant(functools.partial(gae, gamma=gamma, lam=lam))
        adv, ret = fn(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(MASK))
        ref_adv, ref_ret = _reference_gae(rewards, values, MASK, gamma, lam)
        assert adv.dtype == jnp.float32 and ret.dtype == jnp.float32
        chex.assert_shape([adv, ret], MASK.shape)
        np.testing.assert_allclose(adv, ref_adv, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ret, ref_ret, rtol=1e-5, atol=1e-5)
        # Zero at padding; the empty row is all zero.
        assert np.all(np.asarray(adv)[MASK == 0] == 0) and np.all(np.asarray(ret)[MASK == 0] == 0)

    def test_closed_forms_on_a_full_row(self):
        rewards = np.array([[0.5, -1.0, 2.0, 0.25]], np.float32)
        values = np.array([[0.1, 0.2, -0.3, 0.4]], np.float32)
        mask = np.ones_like(rewards)
        # gamma = lam = 1: the advantage is the undiscounted reward-to-go minus the value (Monte Carlo).
        adv, ret = gae(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask), gamma=1.0, lam=1.0)
        reward_to_go = np.cumsum(rewards[:, ::-1], axis=1)[:, ::-1]
        np.testing.assert_allclose(adv, reward_to_go - values, rtol=1e-6)
        np.testing.assert_allclose(ret, reward_to_go, rtol=1e-6)
        # lam = 0: the one-step TD error, with V = 0 after the end.
        adv, _ = gae(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask), gamma=0.9, lam=0.0)
        next_values = np.concatenate([values[:, 1:], np.zeros((1, 1), np.float32)], axis=1)
        np.testing.assert_allclose(adv, rewards + 0.9 * next_values - values, rtol=1e-6)

    def test_hole_is_skipped(self):
        # Real tokens at 0 and 2 only: A_0 must see V_2 as its next value, whatever sits at position 1.
        rewards = np.array([[1.0, 77.0, 3.0]], np.float32)
        values = np.array([[0.5, -55.0, 2.0]], np.float32)
        mask = np.array([[1.0, 0.0, 1.0]], np.float32)
        adv, _ = gae(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask), gamma=0.9, lam=0.8)
        a2 = 3.0 - 2.0
        a0 = (1.0 + 0.9 * 2.0 - 0.5) + 0.9 * 0.8 * a2
        np.testing.assert_allclose(adv, [[a0, 0.0, a2]], rtol=1e-6)

    @parameterized.parameters(("gamma", 1.5), ("gamma", -0.1), ("lam", 1.01), ("lam", -1.0))
    def test_rejects_out_of_range(self, name, value):
        kwargs = {"gamma": 1.0, "lam": 0.95, name: value}
        x = jnp.zeros((1, 3))
        with pytest.raises(ValueError, match=name):
            gae(x, x, jnp.ones((1, 3)), **kwargs)


def _reference_whiten(x, mask, shift_mean, eps=1e-8):
    real = x[mask > 0].astype(np.float64)
    mean, var = real.mean(), real.var()  # numpy var is biased (ddof=0)
    y = (x - mean) / np.sqrt(var + eps)
    if not shift_mean:
        y = y + mean
    return np.where(mask > 0, y, 0.0)


class WhitenTest(chex.TestCase):
    def setUp(self):
        super().setUp()
        rng = np.random.default_rng(1)
        self.x = (3.0 + 2.5 * rng.normal(size=MASK.shape)).astype(np.float32)
        self.x[MASK == 0] = np.nan  # padding must never leak into the statistics

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(True, False)
    def test_matches_reference(self, shift_mean):
        y = self.variant(functools.partial(whiten, shift_mean=shift_mean))(jnp.asarray(self.x), jnp.asarray(MASK))
        np.testing.assert_allclose(y, _reference_whiten(self.x, MASK, shift_mean), rtol=1e-5, atol=1e-5)
        y = np.asarray(y)
        assert np.all(y[MASK == 0] == 0)
        real = y[MASK > 0]
        np.testing.assert_allclose(real.std(), 1.0, rtol=1e-4)
        expected_mean = 0.0 if shift_mean else self.x[MASK > 0].mean()
        np.testing.assert_allclose(real.mean(), expected_mean, atol=1e-5)

    def test_masked_moments(self):
        real = self.x[MASK > 0]
        np.testing.assert_allclose(masked_mean(jnp.asarray(self.x), jnp.asarray(MASK)), real.mean(), rtol=1e-6)
        np.testing.assert_allclose(masked_var(jnp.asarray(self.x), jnp.asarray(MASK)), np.var(real), rtol=1e-5)
        assert float(masked_mean(jnp.ones((2, 2)), jnp.zeros((2, 2)))) == 0.0  # no real token: 0, not nan

    def test_axis_name_gives_global_statistics(self):
        # Four "devices", each holding a different number of real tokens, via a named vmap.
        x = np.nan_to_num(self.x[:4], nan=5.0)
        mask = MASK[:4]
        sharded = jax.vmap(functools.partial(whiten, axis_name="data"), axis_name="data")(
            jnp.asarray(x[:, None]), jnp.asarray(mask[:, None])
        )
        np.testing.assert_allclose(sharded[:, 0], _reference_whiten(x, mask, True), rtol=1e-5, atol=1e-5)
        # Without the axis the statistics are per shard, which differs.
        local = jax.vmap(whiten)(jnp.asarray(x[:, None]), jnp.asarray(mask[:, None]))
        assert not np.allclose(local[:, 0], sharded[:, 0], atol=1e-3)
        var = jax.vmap(functools.partial(masked_var, axis_name="data"), axis_name="data")(
            jnp.asarray(x[:, None]), jnp.asarray(mask[:, None])
        )
        np.testing.assert_allclose(var, np.full(4, np.var(x[mask > 0])), rtol=1e-5)


def test_whiten_under_shard_map_on_two_cpu_devices():
    """Runs in a subprocess so the forced device count does not affect the rest of the session."""
    script = textwrap.dedent(
        """
        import functools, jax, jax.numpy as jnp, numpy as np
        from jax.sharding import PartitionSpec as P
        from ppojax.rl.advantages import whiten
        assert jax.device_count() == 2
        rng = np.random.default_rng(0)
        x = rng.normal(size=(4, 6)).astype(np.float32)
        mask = (rng.uniform(size=(4, 6)) < 0.6).astype(np.float32)
        mask[0] = 1.0
        mesh = jax.make_mesh((2,), ("data",))
        fn = jax.shard_map(functools.partial(whiten, axis_name="data"), mesh=mesh,
                           in_specs=(P("data"), P("data")), out_specs=P("data"))
        shard = functools.partial(jax.device_put, device=jax.NamedSharding(mesh, P("data")))
        sharded = jax.jit(fn)(shard(x), shard(mask))
        np.testing.assert_allclose(sharded, whiten(x, mask), rtol=1e-5, atol=1e-5)
        print("OK")
        """
    )
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]
