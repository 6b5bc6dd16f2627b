"""Token log-probabilities and entropies through a tied LM head, without materialising ``[tokens, vocab]`` logits.

PPO needs, at every response position ``n``, the log-probability of the sampled token and the entropy of the
tempered distribution over the vocabulary::

    z_n      = h_n W^T / T                                   (logits, [V]; W the [V, d] embedding, T the temperature)
    lse_n    = log sum_j exp(z_nj)
    logp_n   = z_n[tok_n] - lse_n
    H_n      = lse_n - E_p[z_n] = lse_n - sum_j p_nj z_nj    (p_n = softmax(z_n))

Computed naively, ``z`` is a ``[tokens, V]`` f32 array (38 MB for 192 tokens of GPT-2) that is written, then read
back by every step of the log-softmax and of its backward pass; on a CPU those passes cost more than the matmul
itself. :func:`token_logprobs` instead walks the vocabulary in chunks of ``chunk_size`` rows of ``W`` with an online
log-sum-exp (running max ``m``, ``s = sum exp(z - m)``, ``t = sum exp(z - m) z``, rescaled by ``exp(m - m')`` when
the max grows), so a chunk's logits stay in cache.

Its gradient is a ``custom_vjp`` over the same chunks. With cotangents ``a_n`` (of ``logp_n``) and ``b_n`` (of
``H_n``)::

    dL/dz_nj = a_n [j = tok_n] - p_nj (a_n + b_n (z_nj - E_p[z_n]))
    dL/dh_n  = sum_j dL/dz_nj W_j / T            dL/dW_j = sum_n dL/dz_nj h_n / T

The backward pass reads each chunk's logits back from the forward pass (written once, read once: the fast choice,
``[tokens, V]`` f32 of memory) or, with ``recompute=True``, recomputes them (one more vocabulary matmul, as fused
cross-entropy kernels do; memory ``O(tokens x chunk)``). The ``[j = tok_n]`` term is a gather and a scatter-add of
single rows of ``W``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["TokenLogProbs", "token_logprobs", "DEFAULT_CHUNK_SIZE"]

DEFAULT_CHUNK_SIZE = 4096
"""Vocabulary rows per chunk: GPT-2's 50,257 rows take 13 chunks (12 full, one of 1105)."""


class TokenLogProbs(NamedTuple):
    logprobs: jax.Array  # [...] f32: log p(token)
    entropy: jax.Array  # [...] f32: entropy of the tempered distribution


def token_logprobs(hidden: jax.Array, embedding: jax.Array, tokens: jax.Array, *, temperature: float = 1.0,
                   chunk_size: int = DEFAULT_CHUNK_SIZE, recompute: bool = False,
                   compute_dtype=None) -> TokenLogProbs:
    """``log softmax(hidden @ embedding.T / temperature)[tokens]`` and the entropy, by vocabulary chunks.

    Args:
      hidden: ``[..., d]`` final hidden states (after ``ln_f``).
      embedding: ``[V, d]`` the tied LM head (GPT-2's ``wte``).
      tokens: ``[...]`` integer ids in ``[0, V)`` (map pads to a valid id first; their values are ignored by callers).
      temperature: divides the logits (> 0): a Python float, or a scalar array such as the train state's (it is not
        differentiated).
      chunk_size: vocabulary rows per chunk; ``>= V`` means one chunk.
      recompute: under differentiation, recompute each chunk's logits in the backward pass (memory
        ``O(tokens x chunk)``, one more vocabulary matmul) instead of keeping them from the forward pass (``[tokens,
        V]`` f32, written once and read once: the faster choice unless memory is short).
      compute_dtype: dtype of the matmul inputs (accumulation is always f32); default ``hidden``'s dtype.
    Returns:
      ``TokenLogProbs(logprobs, entropy)``, both ``[...]`` float32. Differentiable in ``hidden`` and ``embedding``.
    """
    if hidden.shape[:-1] != tokens.shape:
        raise ValueError(f"hidden {hidden.shape} must be tokens {tokens.shape} + [width]")
    if hidden.shape[-1] != embedding.shape[-1]:
        raise ValueError(f"hidden width {hidden.shape[-1]} differs from the embedding's {embedding.shape}")
    if isinstance(temperature, (int, float)) and not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    lead = tokens.shape
    dtype = jnp.dtype(hidden.dtype if compute_dtype is None else compute_dtype)
    h = hidden.reshape(-1, hidden.shape[-1])
    with jax.named_scope("token_logprobs"):  # names its ops in profiles (benchmarks/profile_iteration.py)
        logp, entropy = _token_logprobs(min(chunk_size, embedding.shape[0]), dtype, bool(recompute),
                                        jnp.asarray(temperature, jnp.float32), h, embedding,
                                        tokens.reshape(-1).astype(jnp.int32))
    return TokenLogProbs(logp.reshape(lead), entropy.reshape(lead))


def _chunks(vocab: int, chunk: int):
    """Static ``(start, size)`` of the full chunks (as a count) and of the tail chunk (size may be 0)."""
    n_full = vocab // chunk
    return n_full, n_full * chunk, vocab - n_full * chunk


def _chunk_logits(h, Wc, temperature, dtype):
    """Tempered logits ``[n, size]`` of one chunk ``Wc = W[start:start + size]``."""
    z = jnp.einsum("nd,vd->nv", h.astype(dtype), Wc.astype(dtype), preferred_element_type=jnp.float32)
    return z / temperature


def _forward(temperature, chunk, dtype, h, W, tokens, keep_logits: bool):
    """One pass over the vocabulary: ``(logp, entropy, lse, mean_z, logits)`` per row; ``logits`` (the chunks'
    ``z``: ``[n_full, n, chunk]`` and the tail ``[n, tail]``) only with ``keep_logits``, else None."""
    n = h.shape[0]
    n_full, tail_start, tail = _chunks(W.shape[0], chunk)

    def accumulate(carry, z):
        m, s, t = carry
        m_new = jnp.maximum(m, jnp.max(z, axis=-1))
        scale = jnp.exp(m - m_new)
        e = jnp.exp(z - m_new[:, None])
        return m_new, s * scale + jnp.sum(e, axis=-1), t * scale + jnp.sum(e * z, axis=-1)

    def body(carry, i):
        z = _chunk_logits(h, jax.lax.dynamic_slice_in_dim(W, i * chunk, chunk, axis=0), temperature, dtype)
        return accumulate(carry, z), (z if keep_logits else None)

    init = (jnp.full((n,), -jnp.inf, jnp.float32), jnp.zeros((n,), jnp.float32), jnp.zeros((n,), jnp.float32))
    carry, z_full = jax.lax.scan(body, init, jnp.arange(n_full))
    z_tail = None
    if tail:
        z_tail = _chunk_logits(h, W[tail_start:], temperature, dtype)
        carry = accumulate(carry, z_tail)
    m, s, t = carry
    lse = m + jnp.log(s)
    mean_z = t / s
    chosen = jnp.einsum("nd,nd->n", h.astype(dtype), W[tokens].astype(dtype),
                        preferred_element_type=jnp.float32) / temperature
    logits = (z_full, z_tail) if keep_logits else None
    return chosen - lse, lse - mean_z, lse, mean_z, logits


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _token_logprobs(chunk, dtype, recompute, temperature, h, W, tokens):
    logp, entropy, _, _, _ = _forward(temperature, chunk, dtype, h, W, tokens, keep_logits=False)
    return logp, entropy


def _fwd(chunk, dtype, recompute, temperature, h, W, tokens):
    logp, entropy, lse, mean_z, logits = _forward(temperature, chunk, dtype, h, W, tokens,
                                                  keep_logits=not recompute)
    return (logp, entropy), (temperature, h, W, tokens, lse, mean_z, logits)


def _bwd(chunk, dtype, recompute, residuals, cotangents):
    with jax.named_scope("token_logprobs_bwd"):
        temperature = residuals[0]
        dh, dW = _bwd_body(temperature, chunk, dtype, residuals[1:], cotangents)
        # The temperature is a hyperparameter, not a parameter: no gradient flows to it.
        return jnp.zeros_like(temperature), dh, dW, None


def _bwd_body(temperature, chunk, dtype, residuals, cotangents):
    h, W, tokens, lse, mean_z, logits = residuals
    a, b = cotangents  # d loss / d logp, d loss / d entropy: [n]
    n_full, tail_start, tail = _chunks(W.shape[0], chunk)
    inv_t = 1.0 / temperature

    def chunk_grads(start, size, z, dh, dW):
        Wc = jax.lax.dynamic_slice_in_dim(W, start, size, axis=0)
        if z is None:  # recompute=True: the forward pass kept no logits
            z = _chunk_logits(h, Wc, temperature, dtype)
        p = jnp.exp(z - lse[:, None])
        g = -p * (a[:, None] + b[:, None] * (z - mean_z[:, None])) * inv_t  # dense part of dL/d(h W^T)
        g = g.astype(dtype)
        dh = dh + jnp.einsum("nv,vd->nd", g, Wc.astype(dtype), preferred_element_type=jnp.float32)
        dWc = jnp.einsum("nv,nd->vd", g, h.astype(dtype), preferred_element_type=jnp.float32)
        return dh, jax.lax.dynamic_update_slice_in_dim(dW, dWc.astype(dW.dtype), start, axis=0)

    z_full, z_tail = logits if logits is not None else (None, None)
    dh = jnp.zeros(h.shape, jnp.float32)
    dW = jnp.zeros(W.shape, jnp.float32)

    def body(carry, xs):
        i, z = xs
        return chunk_grads(i * chunk, chunk, z, *carry), None

    (dh, dW), _ = jax.lax.scan(body, (dh, dW), (jnp.arange(n_full), z_full))
    if tail:
        dh, dW = chunk_grads(tail_start, tail, z_tail, dh, dW)
    # The sampled token's term: a_n [j = tok_n].
    a_t = (a * inv_t)[:, None]
    dh = dh + a_t * W[tokens].astype(jnp.float32)
    dW = dW.at[tokens].add(a_t * h.astype(jnp.float32))
    return dh.astype(h.dtype), dW.astype(W.dtype)


_token_logprobs.defvjp(_fwd, _bwd)
