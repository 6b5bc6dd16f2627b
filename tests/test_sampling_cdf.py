"""``categorical_inverse_cdf``: the one-uniform-per-row sampler, against an exact float64 numpy softmax / inverse CDF."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

import ppojax
from ppojax.generate.sampling import _CDF_BLOCK, _inverse_cdf, categorical_inverse_cdf

NEG = np.finfo(np.float32).min
U_MAX = float(np.nextafter(np.float32(1.0), np.float32(0.0)))  # the largest float32 below 1


def _softmax64(z):
    z = np.asarray(z, np.float64)
    p = np.where(np.isfinite(z) & (z > NEG), np.exp(z - z.max()), 0.0)
    return p / p.sum()


_icdf = jax.jit(_inverse_cdf)
_sample = jax.jit(categorical_inverse_cdf)


@jax.jit
def _draw_many(keys, row):
    # vmapped over keys with the row shared: the row is never tiled len(keys) times.
    return jax.vmap(lambda k: categorical_inverse_cdf(k[None], row[None])[0])(keys)


@jax.jit
def _quantiles(u, row):
    return jax.vmap(lambda q: _inverse_cdf(q[None], row[None])[0])(u)


def _draws(logits_row, n, seed=0):
    """``n`` draws from one logits row, each with its own key."""
    keys = jax.random.split(jax.random.key(seed), n)
    return np.asarray(_draw_many(keys, jnp.asarray(logits_row, jnp.float32)))


def _assert_matches(tokens, probs, alpha=1e-4):
    """No zero-probability token, and a chi-square fit (categories with expected count < 5 pooled into one)."""
    n = len(tokens)
    counts = np.bincount(tokens, minlength=len(probs))
    assert len(counts) == len(probs), "token id out of range"
    assert counts[probs == 0].sum() == 0, f"sampled zero-probability tokens {np.unique(tokens[probs[tokens] == 0])}"
    expected = n * probs
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    if exp[-1] < 5:  # fold a tiny pooled bucket into the smallest big one
        k = np.argmin(exp[:-1])
        obs[k] += obs[-1]
        exp[k] += exp[-1]
        obs, exp = obs[:-1], exp[:-1]
    assert len(exp) >= 2
    chi2 = float(((obs - exp) ** 2 / exp).sum())
    bound = stats.chi2.ppf(1 - alpha, len(exp) - 1)
    assert chi2 < bound, (chi2, bound)


def _reference_inverse_cdf(u, probs):
    """Exact (float64) inverse CDF: the first token whose cumulative probability exceeds ``u``."""
    return np.searchsorted(np.cumsum(probs), u, side="right")


@pytest.mark.parametrize("vocab", [7, 100, 1000, 50257])
def test_matches_softmax_chi_square(vocab):
    # None of these is a multiple of the block; 7 and 100 are smaller than one block.
    assert vocab % _CDF_BLOCK
    rng = np.random.RandomState(vocab)
    z = (rng.randn(vocab) * (2.0 if vocab < 1000 else 3.0)).astype(np.float32)
    z[-1] = z.max() + 1.0  # substantial mass on the last token, which sits in the padded tail block
    _assert_matches(_draws(z, 20000, seed=vocab), _softmax64(z))


def test_batched_rows_match_their_own_softmax():
    rng = np.random.RandomState(1)
    rows, n = 3, 8000
    z = (rng.randn(rows, 300) * 2).astype(np.float32)
    keys = jax.random.split(jax.random.key(7), rows * n)
    tokens = np.asarray(_sample(keys, jnp.asarray(np.repeat(z, n, 0)))).reshape(rows, n)
    assert tokens.dtype == np.int32
    for r in range(rows):
        _assert_matches(tokens[r], _softmax64(z[r]))


@pytest.mark.parametrize("vocab", [5, 256, 1000, 50257])
def test_all_mass_on_the_first_or_last_token(vocab):
    u = np.array([0.0, 1e-7, 0.25, 0.5, 0.999, U_MAX], np.float32)
    rows, targets = [], []
    for target in (0, vocab - 1):
        for fill in (-np.inf, NEG):
            z = np.full(vocab, fill, np.float32)
            z[target] = -3.0
            rows.append(z)
            targets.append(target)
    z = jnp.asarray(np.repeat(np.stack(rows), len(u), 0))
    expected = np.repeat(targets, len(u))
    np.testing.assert_array_equal(np.asarray(_icdf(jnp.asarray(np.tile(u, len(rows))), z)), expected)
    keys = jax.random.split(jax.random.key(vocab), len(expected))
    np.testing.assert_array_equal(np.asarray(_sample(keys, z)), expected)


def test_mass_only_in_the_padded_tail_block():
    vocab = 1000  # blocks of 256: the last one holds 768..999 and 24 padding entries
    tail = slice(990, 1000)
    z = np.full(vocab, -np.inf, np.float32)
    z[tail] = np.random.RandomState(3).randn(10).astype(np.float32)
    probs = _softmax64(z)
    tokens = _draws(z, 20000, seed=3)
    assert ((tokens >= 990) & (tokens < 1000)).all()
    _assert_matches(tokens, probs)
    u = np.linspace(0, 1, 401, dtype=np.float32)[:-1]
    u = np.append(u, U_MAX)
    out = np.asarray(_icdf(jnp.asarray(u), jnp.asarray(np.tile(z, (len(u), 1)))))
    assert ((out >= 990) & (out < 1000)).all()
    assert out[0] == 990 and out[-1] == 999


def test_filtered_tokens_are_never_sampled_top_k_3():
    rng = np.random.RandomState(5)
    vocab, n = 1000, 20000
    # Near-ties around the cut, and the kept tokens spread over different blocks (one in the padded tail block).
    z = (rng.randn(vocab) * 0.01).astype(np.float32)
    kept = np.array([17, 400, 999])
    z[kept] = [0.5, 0.3, 0.4]
    filtered = np.asarray(ppojax.filter_logits(jnp.asarray(z), top_k=3))
    assert (filtered > NEG).sum() == 3
    probs = _softmax64(filtered)
    np.testing.assert_array_equal(np.flatnonzero(probs), kept)
    tokens = _draws(filtered, n, seed=11)
    assert set(np.unique(tokens)) <= set(kept.tolist())
    _assert_matches(tokens, probs)
    # Edge quantiles too: the first and the last kept token, never a filtered neighbour.
    out = np.asarray(_icdf(jnp.asarray([0.0, U_MAX]), jnp.asarray(np.tile(filtered, (2, 1)))))
    np.testing.assert_array_equal(out, [17, 999])


def test_filtered_tokens_are_never_sampled_top_p():
    rng = np.random.RandomState(6)
    z = (rng.randn(2, 50257) * 4).astype(np.float32)
    filtered = np.asarray(ppojax.filter_logits(jnp.asarray(z), top_p=0.3))
    for r in range(2):
        probs = _softmax64(filtered[r])
        assert 1 < (probs > 0).sum() < 1000
        _assert_matches(_draws(filtered[r], 20000, seed=r), probs)


def test_row_does_not_depend_on_its_batch_companions():
    rng = np.random.RandomState(8)
    z = jnp.asarray((rng.randn(6, 700) * 2).astype(np.float32))
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(4), i))(jnp.arange(6))
    batch = np.asarray(_sample(keys, z))
    for b in range(6):
        alone = np.asarray(_sample(keys[b:b + 1], z[b:b + 1]))
        assert alone[0] == batch[b]
    # Replacing the other rows (here with a point mass elsewhere) does not move row 2's token either.
    other = z.at[jnp.array([0, 1, 3, 4, 5])].set(jnp.where(jnp.arange(700) == 3, 0.0, -jnp.inf))
    assert int(_sample(keys, other)[2]) == batch[2]
    assert len(set(batch.tolist())) > 1  # different keys give different draws


def test_inverse_cdf_agrees_with_float64_reference():
    """Direct: away from the CDF's jump points the token is exactly the float64 inverse CDF's."""
    rng = np.random.RandomState(9)
    for vocab in [50, 1000, 50257]:
        z = (rng.randn(vocab) * 2).astype(np.float32)
        z[rng.rand(vocab) < 0.3] = NEG  # some filtered entries
        probs = _softmax64(z)
        u = np.sort(rng.rand(2000).astype(np.float32))
        out = np.asarray(_quantiles(jnp.asarray(u), jnp.asarray(z)))
        ref = _reference_inverse_cdf(u.astype(np.float64), probs)
        cdf = np.cumsum(probs)
        jumps = np.concatenate([[0.0], cdf[probs > 0]])
        at = np.clip(np.searchsorted(jumps, u), 1, len(jumps) - 1)
        near_jump = np.minimum(np.abs(u - jumps[at - 1]), np.abs(u - jumps[at])) < 2e-6
        assert (out[~near_jump] == ref[~near_jump]).all(), np.flatnonzero((out != ref) & ~near_jump)[:10]
        assert (probs[out] > 0).all()
        assert near_jump.mean() < 0.1  # most quantiles are checked exactly


def test_edge_uniforms_return_positive_probability_tokens():
    rng = np.random.RandomState(10)
    # Exactly representable masses: the jump points of u are 0, 1/4, 2/4, 3/4.
    vocab = 1000
    z = np.full(vocab, NEG, np.float32)
    kept = [5, 300, 700, 995]
    z[kept] = 0.0
    u = jnp.asarray([0.0, 0.25, 0.5, 0.75, U_MAX], jnp.float32)
    out = np.asarray(_icdf(u, jnp.asarray(np.tile(z, (5, 1)))))
    np.testing.assert_array_equal(out, [5, 300, 700, 995, 995])
    # A dominant token followed by many tiny ones, then filtered and padded entries: u * total rounds up to total.
    for vocab in [513, 50257]:
        z = np.full(vocab, -np.inf, np.float32)
        z[0] = 30.0
        z[1:vocab - 40] = rng.randn(vocab - 41).astype(np.float32) - 30.0
        z[vocab - 40:vocab - 20] = NEG
        probs = _softmax64(z)
        last_kept = np.flatnonzero(probs)[-1]
        out = np.asarray(_icdf(jnp.asarray([0.0, U_MAX]), jnp.asarray(np.tile(z, (2, 1)))))
        assert out[0] == 0
        assert probs[out[1]] > 0 and out[1] <= last_kept


def test_no_finite_logit_returns_an_in_range_token():
    z = jnp.full((2, 300), -jnp.inf)
    out = np.asarray(_icdf(jnp.asarray([0.0, 0.5]), z))
    np.testing.assert_array_equal(out, 0)


@pytest.mark.parametrize("vocab", [1000, 50257])
def test_quantiles_at_block_boundaries_skip_filtered_block_edges(vocab):
    """u within a few ulps of every block boundary of the CDF, with each block's first and last entries filtered.

    Rounding puts ``t`` a hair below the mass before its block, or past the block's own cumsum: a sampler that took
    "the first entry whose cumsum exceeds the residual" without the ``e > 0`` condition returns a filtered token here.
    """
    rng = np.random.RandomState(vocab)
    z = (rng.randn(vocab) * 3).astype(np.float32)
    n_blocks = -(-vocab // _CDF_BLOCK)
    for b in range(n_blocks):
        z[b * _CDF_BLOCK:b * _CDF_BLOCK + 10] = NEG
        z[b * _CDF_BLOCK + _CDF_BLOCK - 5:(b + 1) * _CDF_BLOCK] = -np.inf
    probs = _softmax64(z)
    block_mass = np.pad(probs, (0, n_blocks * _CDF_BLOCK - vocab)).reshape(n_blocks, _CDF_BLOCK).sum(1)
    u = []
    for c in np.cumsum(block_mass)[:-1].astype(np.float32):
        lo = hi = c
        u.append(c)
        for _ in range(8):
            lo, hi = np.nextafter(lo, np.float32(0)), np.nextafter(hi, np.float32(1))
            u += [lo, hi]
    u = np.minimum(np.array(u, np.float32), U_MAX)
    out = np.asarray(_quantiles(jnp.asarray(u), jnp.asarray(z)))
    assert (probs[out] > 0).all(), np.unique(out[probs[out] == 0])
