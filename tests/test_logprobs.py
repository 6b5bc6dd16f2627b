"""token_logprobs (chunked vocabulary, custom VJP) against the naive log-softmax and its autodiff gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ppojax import token_logprobs


def _naive(h, W, tok, T):
    z = jnp.einsum("...d,vd->...v", h, W, precision="highest") / T
    lp = jax.nn.log_softmax(z, axis=-1)
    logp = jnp.take_along_axis(lp, tok[..., None], axis=-1)[..., 0]
    return logp, -jnp.sum(jnp.exp(lp) * lp, axis=-1)


def _problem(n=(3, 5), d=16, V=1000, seed=0):
    k = jax.random.split(jax.random.key(seed), 3)
    h = jax.random.normal(k[0], (*n, d))
    W = jax.random.normal(k[1], (V, d)) * 0.5
    tok = jax.random.randint(k[2], n, 0, V)
    return h, W, tok


@pytest.mark.parametrize("chunk", [1000, 4096, 256, 300, 7])  # one chunk, chunk > V, exact split, with a tail, tiny
@pytest.mark.parametrize("T", [1.0, 0.7])
def test_values_match_naive(chunk, T):
    h, W, tok = _problem()
    logp, ent = token_logprobs(h, W, tok, temperature=T, chunk_size=chunk)
    ref_logp, ref_ent = _naive(h, W, tok, T)
    assert logp.shape == ent.shape == tok.shape and logp.dtype == jnp.float32
    np.testing.assert_allclose(logp, ref_logp, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ent, ref_ent, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("chunk", [1000, 300])
def test_gradient_matches_autodiff_of_naive(recompute, chunk):
    h, W, tok = _problem()
    wa = jax.random.normal(jax.random.key(7), tok.shape)  # arbitrary cotangents for log-prob and entropy
    wb = jax.random.normal(jax.random.key(8), tok.shape)

    def loss(fn):
        return lambda h, W: jnp.sum(wa * fn(h, W)[0]) + jnp.sum(wb * fn(h, W)[1])

    ours = jax.grad(loss(lambda h, W: token_logprobs(h, W, tok, temperature=0.7, chunk_size=chunk,
                                                     recompute=recompute)), argnums=(0, 1))(h, W)
    ref = jax.grad(loss(lambda h, W: _naive(h, W, tok, 0.7)), argnums=(0, 1))(h, W)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.abs(b).max()))


def test_repeated_tokens_accumulate_in_the_embedding_gradient():
    """The sampled-token term is a scatter-ADD: rows sharing a token must all land in that token's row."""
    h, W, _ = _problem(n=(6,), V=50)
    tok = jnp.array([3, 3, 3, 7, 7, 49])
    g = jax.grad(lambda W: token_logprobs(h, W, tok, chunk_size=16)[0].sum())(W)
    g_ref = jax.grad(lambda W: _naive(h, W, tok, 1.0)[0].sum())(W)
    np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-6)


def test_extreme_logits_stay_finite():
    """A huge logit in a late chunk (the running max jumps) and a flat row: the online log-sum-exp must rescale."""
    d, V = 4, 900
    W = jnp.zeros((V, d)).at[850].set(jnp.array([100.0, 0, 0, 0]))
    h = jnp.array([[1.0, 0, 0, 0], [0, 1.0, 0, 0]])
    tok = jnp.array([850, 3])
    logp, ent = token_logprobs(h, W, tok, chunk_size=128)
    ref_logp, ref_ent = _naive(h, W, tok, 1.0)
    np.testing.assert_allclose(logp, ref_logp, atol=1e-5)
    np.testing.assert_allclose(ent, ref_ent, atol=1e-4)
    np.testing.assert_allclose(ent[1], np.log(V), rtol=1e-6)  # the flat row: uniform over V


def test_bfloat16_compute_close_to_f32():
    h, W, tok = _problem()
    lp32, _ = token_logprobs(h, W, tok, chunk_size=300)
    lp16, _ = token_logprobs(h, W, tok, chunk_size=300, compute_dtype=jnp.bfloat16)
    assert lp16.dtype == jnp.float32
    np.testing.assert_allclose(lp16, lp32, atol=0.1)


def test_jit_and_bad_inputs():
    h, W, tok = _problem()
    f = jax.jit(lambda h, W, t: token_logprobs(h, W, t, chunk_size=300))
    np.testing.assert_allclose(f(h, W, tok)[0], _naive(h, W, tok, 1.0)[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="tokens"):
        token_logprobs(h, W, tok[:, :2])
    with pytest.raises(ValueError, match="width"):
        token_logprobs(h[..., :8], W, tok)
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(h, W, tok, temperature=0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        token_logprobs(h, W, tok, chunk_size=0)
