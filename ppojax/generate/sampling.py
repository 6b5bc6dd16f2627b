"""Token sampling: one jit, a prefill over the (left-padded) prompt, then a ``lax.while_loop`` decode over a KV cache.

The loop stops early once every row has emitted EOS. Randomness is per example: the key of row ``b`` at step ``i``
is ``fold_in(fold_in(key, example_id[b]), i)``, so a row's sample does not depend on which other rows share its
batch or device (``example_ids`` default to ``arange(batch)``; a data-parallel shard passes global indices).
Each step draws one uniform per row and inverts the CDF of the filtered softmax (``categorical_inverse_cdf``).
"""

from __future__ import annotations

import functools
from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp

from ppojax.models import Params, init_cache, next_token_logits, ModelConfig


@flax.struct.dataclass
class SampleOutput:
    """Sampled responses.

    ``tokens``: ``[batch, max_new_tokens]`` int32; positions after the first EOS hold ``pad_token_id``.
    ``mask``: ``[batch, max_new_tokens]`` int32, 1 up to and including the first EOS, 0 after.
    ``logprobs``: ``[batch, max_new_tokens]`` float32, ``log softmax(logits / temperature)`` at the sampled token
    (the unfiltered tempered distribution, i.e. what PPO recomputes; plain logits when temperature is 0); 0 where
    ``mask`` is 0.
    ``lengths``: ``[batch]`` int32, ``mask.sum(-1)``.
    """

    tokens: jax.Array
    mask: jax.Array
    logprobs: jax.Array
    lengths: jax.Array


def filter_logits(logits: jax.Array, *, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """Top-k then nucleus (top-p, Holtzman et al. 2020) filtering: dropped entries become ``-inf``.

    top-k keeps the ``k`` largest logits (ties at the k-th value kept); top-p keeps the smallest prefix of the sorted
    distribution whose mass reaches ``top_p`` (the most likely token always survives). ``logits [..., vocab]``.
    ``top_p`` may be a (traced) array, e.g. the train state's; a Python 1.0 skips the filter.
    """
    neg_inf = jnp.finfo(logits.dtype).min
    if top_k and top_k < logits.shape[-1]:
        kth = _kth_largest(logits, top_k)
        logits = jnp.where(logits < kth, neg_inf, logits)
    if _top_p_on(top_p):
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep = mass_before < top_p
        threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, neg_inf, logits)
    return logits


def _top_p_on(top_p) -> bool:
    """Whether the nucleus filter runs: always for an array, for a number only below 1."""
    return not (isinstance(top_p, (int, float)) and top_p >= 1.0)


def _kth_largest(x: jax.Array, k: int, iterations: int = 48) -> jax.Array:
    """The k-th largest value of each row, ``[..., 1]``, by bisection on the value.

    Invariant: ``count(x >= lo) >= k > count(x >= hi)``. After enough halvings ``[lo, hi)`` holds one distinct value,
    the k-th largest, read back exactly as ``min(x[x >= lo])``. Each step is one compare-and-count pass over the
    vocabulary: on a CPU about 10x cheaper than ``lax.top_k``, which sorts 50,257 logits per row.
    """
    x = x.astype(jnp.float32)
    lo = jnp.min(x, axis=-1, keepdims=True)
    hi = jnp.max(x, axis=-1, keepdims=True) + 1.0

    def halve(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) / 2
        enough = jnp.sum(x >= mid, axis=-1, keepdims=True) >= k
        return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid)

    lo, _ = jax.lax.fori_loop(0, iterations, halve, (lo, hi))
    return jnp.min(jnp.where(x >= lo, x, jnp.inf), axis=-1, keepdims=True)


_CDF_BLOCK = 256  # vocabulary block of the two-level inverse CDF: 50,257 -> 197 block sums, then one 256-wide block


def categorical_inverse_cdf(key_per_row: jax.Array, logits: jax.Array, *, block: int = _CDF_BLOCK) -> jax.Array:
    """One draw per row from ``softmax(logits)`` by inverse-CDF sampling: ONE uniform per row.

    ``key_per_row [batch]`` keys, ``logits [batch, vocab]`` -> tokens ``[batch]`` int32. Row ``b`` uses only
    ``key_per_row[b]`` and ``logits[b]``, so its token does not depend on the other rows. ``jax.random.categorical``
    (Gumbel-max) needs ``vocab`` uniforms per row instead, which dominates a CPU decode step at GPT-2's 50,257.

    With ``u_b = uniform(key_per_row[b])`` in ``[0, 1)`` the token is ``_inverse_cdf(u, logits)``; see there for the
    formula. Entries at ``-inf`` or ``finfo.min`` (what ``filter_logits`` writes) have probability 0 and are never
    returned, whatever the rounding.
    """
    return _inverse_cdf(_row_uniforms(key_per_row), logits, block=block)


def _row_uniforms(key_per_row):
    """One float32 uniform in ``[0, 1)`` per key: ``[batch]``."""
    return jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(key_per_row)


def _inverse_cdf(u: jax.Array, logits: jax.Array, *, block: int = _CDF_BLOCK) -> jax.Array:
    """The token ``[batch]`` int32 at quantile ``u [batch]`` (in ``[0, 1)``) of ``softmax(logits [batch, vocab])``.

    Two levels, so no cumulative sum runs over the whole vocabulary. Per row, with ``B = block``:

        e_v = exp(z_v - max z)                         (0 for z_v = -inf / finfo.min, and on the padding of the
                                                        vocabulary up to a multiple of B)
        S_j = sum_{v in block j} e_v,   C_j = S_0 + ... + S_j,   t = u * C_last
        j*  = min{ j : C_j > t and S_j > 0 }           (none: the last j with S_j > 0)
        r   = t - (C_j* - S_j*),   c_i = e_{j*B} + ... + e_{j*B+i}
        i*  = min{ i : c_i > r and e_{j*B+i} > 0 }     (none: the last i with e_{j*B+i} > 0)
        token = j* B + i*

    In exact arithmetic ``C`` is nondecreasing and ``j*`` is the number of blocks with ``C_j <= t``, so
    ``P(token = v) = e_v / sum e = softmax(z)_v``; the ``S_j > 0`` / ``e > 0`` conditions and the fallbacks change
    nothing there but guarantee that a zero-probability token is never returned under float rounding (``u * C``
    rounding up to ``C``, a block sum disagreeing with its within-block cumsum, ...). A row with no finite logit
    returns 0.
    """
    tokens, _, _ = _inverse_cdf_with_mass(u, logits, block=block)
    return tokens


def _inverse_cdf_with_mass(u, logits, *, block=_CDF_BLOCK):
    """``_inverse_cdf`` plus the row max ``m [batch]`` and total ``sum_v exp(z_v - m) [batch]`` it computed."""
    logits = logits.astype(jnp.float32)
    batch, vocab = logits.shape
    n_blocks = -(-vocab // block)
    m = jnp.max(logits, axis=-1)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    # Pad the logits (not e) with -inf: exp(-inf - m) = 0. The padded copy costs one pass; summing a ragged tail
    # block separately instead measured no faster on CPU.
    padded = jnp.pad(logits, ((0, 0), (0, n_blocks * block - vocab)), constant_values=-jnp.inf)
    blocks = padded.reshape(batch, n_blocks, block)
    block_sums = jnp.sum(jnp.exp(blocks - m[:, None, None]), axis=-1)  # S [batch, n_blocks]
    cum = jnp.cumsum(block_sums, axis=-1)  # C
    total = cum[:, -1]
    target = u.astype(jnp.float32) * total  # t

    j = _first_above_or_last_positive(cum, target, block_sums)
    chosen = jnp.take_along_axis(blocks, j[:, None, None], axis=1)[:, 0]  # [batch, block] logits
    e = jnp.exp(chosen - m[:, None])
    before = jnp.take_along_axis(cum - block_sums, j[:, None], axis=-1)[:, 0]  # C_j* - S_j*
    i = _first_above_or_last_positive(jnp.cumsum(e, axis=-1), target - before, e)
    return (j * block + i).astype(jnp.int32), m, total


def _first_above_or_last_positive(cum, target, weights):
    """Per row, ``min{ i : cum_i > target and weights_i > 0 }``, else the last ``i`` with ``weights_i > 0`` (else 0)."""
    hit = (cum > target[:, None]) & (weights > 0)
    idx = jnp.arange(weights.shape[-1], dtype=jnp.int32)
    last_positive = jnp.max(jnp.where(weights > 0, idx, 0), axis=-1)
    return jnp.where(jnp.any(hit, axis=-1), jnp.argmax(hit, axis=-1).astype(jnp.int32), last_positive)


def _logprob_at(z, tokens, max_z=None, total=None):
    """``log_softmax(z)[tokens] = z[tokens] - logsumexp(z)``, without materialising another ``[batch, vocab]`` array.

    ``max_z`` and ``total = sum exp(z - max_z)`` can be passed in when already computed.
    """
    if total is None:
        max_z = jax.lax.stop_gradient(jnp.max(z, axis=-1))
        total = jnp.sum(jnp.exp(z - max_z[:, None]), axis=-1)
    chosen = jnp.take_along_axis(z, tokens[:, None], axis=-1)[:, 0]
    return chosen - max_z - jnp.log(total)


def _sample_step(logits, row_keys, step, *, temperature, top_k, top_p):
    """Next token ``[batch]`` and its log-prob under the tempered, unfiltered distribution. ``temperature`` and
    ``top_p`` may be traced arrays (the PPO state's hyperparameters); a Python temperature of 0 means greedy."""
    logits = logits.astype(jnp.float32)
    if isinstance(temperature, (int, float)) and temperature == 0.0:
        tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return tokens, _logprob_at(logits, tokens)
    scaled = logits / temperature
    step_keys = jax.vmap(jax.random.fold_in, (0, None))(row_keys, step)
    u = _row_uniforms(step_keys)
    unfiltered = (not top_k or top_k >= logits.shape[-1]) and not _top_p_on(top_p)
    if unfiltered:
        # The sampler's max and exp-sum over the (unfiltered) tempered logits are logsumexp's: share them.
        tokens, max_z, total = _inverse_cdf_with_mass(u, scaled)
        return tokens, _logprob_at(scaled, tokens, max_z, total)
    tokens = _inverse_cdf(u, filter_logits(scaled, top_k=top_k, top_p=top_p))
    return tokens, _logprob_at(scaled, tokens)


@flax.struct.dataclass
class _DecodeState:
    step: jax.Array  # int32: index of the token to sample next
    last_tokens: jax.Array  # [batch] int32: the token sampled at step - 1
    cache: object
    tokens: jax.Array  # [batch, n]
    logprobs: jax.Array  # [batch, n]
    mask: jax.Array  # [batch, n]
    done: jax.Array  # [batch] bool: EOS already emitted


def _ends_stop(tokens, step, stop_sequences) -> jax.Array:
    """``[batch]`` bool: the tokens written so far (``tokens[:, :step + 1]``) end with one of ``stop_sequences``.

    For a sequence ``q`` of length ``L``: ``step + 1 >= L`` and ``tokens[:, step - L + 1 : step + 1] == q``."""
    hit = jnp.zeros((tokens.shape[0],), bool)
    for q in stop_sequences:
        n = len(q)
        start = jnp.maximum(step - n + 1, 0)
        window = jax.lax.dynamic_slice_in_dim(tokens, start, n, axis=1)
        hit = hit | ((step + 1 >= n) & jnp.all(window == jnp.asarray(q, jnp.int32), axis=-1))
    return hit


def sample(config: ModelConfig, params: Params, prompt_ids, prompt_mask, key, *, max_new_tokens: int,
           temperature: float, top_k: int, top_p: float, eos_token_id: Optional[int], pad_token_id: int,
           example_ids=None, stop_sequences: tuple = ()) -> SampleOutput:
    """The traceable body of ``generate`` (no validation, no jit): call it inside other jitted code.

    ``temperature`` and ``top_p`` may be traced arrays (a Python ``top_p`` of 1 compiles no nucleus filter; an
    array always filters). ``example_ids [batch]`` seed each row's randomness. ``stop_sequences``: token-id tuples
    that end a row like EOS does (the row ends after the sequence's last token)."""
    batch, prompt_len = prompt_ids.shape
    cache = init_cache(config, batch, prompt_len + max_new_tokens)
    out, _, _ = decode(config, params, cache, prompt_ids, prompt_mask, row_keys(key, batch, example_ids),
                       max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                       eos_token_id=eos_token_id, pad_token_id=pad_token_id, stop_sequences=stop_sequences)
    return out


def row_keys(key, batch: int, example_ids=None) -> jax.Array:
    """``[batch]`` keys, ``fold_in(key, example_ids[b])`` (default ``example_ids = arange(batch)``): the randomness
    of row ``b``, whatever other rows share its batch or device."""
    if example_ids is None:
        example_ids = jnp.arange(batch)
    return jax.vmap(jax.random.fold_in, (None, 0))(key, example_ids)


def decode(config: ModelConfig, params: Params, cache, new_ids, new_mask, keys, *, max_new_tokens: int,
           temperature, top_k: int, top_p, eos_token_id: Optional[int], pad_token_id: int,
           stop_sequences: tuple = (), finished=None):
    """Append ``new_ids [batch, C]`` (``new_mask``: 1 on real tokens; holes allowed) to ``cache`` at its index,
    then sample up to ``max_new_tokens`` tokens per row: ``(SampleOutput, cache, steps)``.

    The prefill of a prompt is the first call on an empty cache; a multi-turn episode calls it again with the
    observation that follows a turn (``ppojax.train.multiturn``), so no earlier token is ever re-encoded. Token
    ``j`` of a row is drawn from ``keys[b]`` folded with ``j``. Slots: after the call, sampled token ``j`` belongs
    to slot ``index0 + C + j``; tokens ``0 .. steps - 2`` are in the cache (real up to and including a row's EOS),
    the last sampled column (``steps - 1``) is not yet: a continuation passes it as the first column of its chunk.
    ``finished [batch]`` bool: rows that sample nothing (all pad, mask 0).
    """
    batch = new_ids.shape[0]
    n = max_new_tokens
    if finished is None:
        finished = jnp.zeros((batch,), bool)
    step_fn = functools.partial(_sample_step, row_keys=keys, temperature=temperature, top_k=top_k, top_p=top_p)
    # Left padding (or a chunk whose last column is real): the last column is every live row's last real token.
    logits, cache = next_token_logits(config, params, new_ids, new_mask, cache)
    first, first_logp = step_fn(logits, step=0)
    first = jnp.where(finished, pad_token_id, first)
    is_eos = finished | ((first == eos_token_id) if eos_token_id is not None else jnp.zeros_like(first, bool))
    tokens0 = jnp.full((batch, n), pad_token_id, jnp.int32).at[:, 0].set(first)
    if stop_sequences:
        is_eos = is_eos | _ends_stop(tokens0, 0, stop_sequences)
    state = _DecodeState(
        step=jnp.ones((), jnp.int32),
        last_tokens=first,
        cache=cache,
        tokens=tokens0,
        logprobs=jnp.zeros((batch, n), jnp.float32).at[:, 0].set(jnp.where(finished, 0.0, first_logp)),
        mask=jnp.zeros((batch, n), jnp.int32).at[:, 0].set((~finished).astype(jnp.int32)),
        done=is_eos,
    )

    def cond(s: _DecodeState):
        return (s.step < n) & ~jnp.all(s.done)

    def body(s: _DecodeState):
        # The token fed is real iff it is a response token (a row's EOS included, so that a continuation finds it
        # in the cache); after that a row feeds masked tokens: never attended to, their outputs discarded.
        live = jax.lax.dynamic_index_in_dim(s.mask, s.step - 1, axis=1)  # [batch, 1]
        logits, cache = next_token_logits(config, params, s.last_tokens[:, None], live, s.cache)
        tok, logp = step_fn(logits, step=s.step)
        tok = jnp.where(s.done, pad_token_id, tok)
        logp = jnp.where(s.done, 0.0, logp)
        write = lambda buf, col: jax.lax.dynamic_update_slice(buf, col[:, None].astype(buf.dtype), (0, s.step))
        done = s.done | ((tok == eos_token_id) if eos_token_id is not None else False)
        tokens = write(s.tokens, tok)
        if stop_sequences:
            done = done | (~s.done & _ends_stop(tokens, s.step, stop_sequences))
        return _DecodeState(
            step=s.step + 1,
            last_tokens=tok,
            cache=cache,
            tokens=tokens,
            logprobs=write(s.logprobs, logp),
            mask=write(s.mask, (~s.done).astype(jnp.int32)),
            done=done,
        )

    state = jax.lax.while_loop(cond, body, state)
    out = SampleOutput(tokens=state.tokens, mask=state.mask, logprobs=state.logprobs,
                       lengths=state.mask.sum(-1).astype(jnp.int32))
    return out, state.cache, state.step


_sample_jit = jax.jit(
    sample,
    static_argnames=("config", "max_new_tokens", "temperature", "top_k", "top_p", "eos_token_id", "pad_token_id",
                     "stop_sequences"),
)


def check_sampling_args(config: ModelConfig, prompt_shape, *, max_new_tokens, temperature, top_k, top_p,
                        eos_token_id=None, pad_token_id=None) -> None:
    """Raise one clear ValueError for a bad sampling setting (before anything compiles)."""
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if not isinstance(temperature, (int, float)) or temperature != temperature or temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 means greedy), got {temperature!r}")
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0 disables it), got {top_k!r}")
    if not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (1 disables it), got {top_p!r}")
    for name, value in (("eos_token_id", eos_token_id), ("pad_token_id", pad_token_id)):
        if value is not None and (not isinstance(value, int) or value < 0):
            raise ValueError(f"{name} must be a non-negative int or None, got {value!r}")
    if len(prompt_shape) != 2:
        raise ValueError(f"prompt_ids must be [batch, prompt_len], got shape {tuple(prompt_shape)}")
    total = prompt_shape[1] + max_new_tokens
    if total > config.max_positions:
        raise ValueError(
            f"prompt of {prompt_shape[1]} tokens + {max_new_tokens} new tokens = {total} exceeds the model's context of"
            f" {config.max_positions} positions; truncate the prompts or lower max_new_tokens"
        )


def generate(config: ModelConfig, params: Params, prompt_ids, prompt_mask, key, *, max_new_tokens: int,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, eos_token_id: Optional[int] = None,
             pad_token_id: Optional[int] = None, example_ids=None, stop_sequences=()) -> SampleOutput:
    """Sample ``max_new_tokens`` continuations of left-padded prompts in one jit.

    Args:
      prompt_ids, prompt_mask: ``[batch, prompt_len]``, left-padded (every row's last column is a real token).
      key: a ``jax.random`` key; the same key gives the same output.
      temperature: softmax temperature; 0 means greedy.
      top_k: keep the k most likely tokens (0: all). top_p: nucleus mass in (0, 1] (1: all).
      eos_token_id: stop a row after this token (None: always ``max_new_tokens`` tokens).
      pad_token_id: fills positions after EOS; defaults to ``config.vocab_size`` (the id ppojax's tokenizer gives its
        pad token for GPT-2, distinct from EOS).
      example_ids: ``[batch]`` global example indices that seed each row's randomness (default ``arange(batch)``).
      stop_sequences: token-id sequences that also end a row (after their last token).
    Returns:
      ``SampleOutput(tokens, mask, logprobs, lengths)``.
    """
    import numpy as np

    prompt_shape = tuple(np.shape(prompt_ids))
    check_sampling_args(config, prompt_shape, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                        top_p=top_p, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    if tuple(np.shape(prompt_mask)) != prompt_shape:
        raise ValueError(f"prompt_mask shape {tuple(np.shape(prompt_mask))} differs from prompt_ids {prompt_shape}")
    prompt_mask = jnp.asarray(prompt_mask, jnp.int32)
    if prompt_shape[1] and not bool(jnp.all(prompt_mask[:, -1] > 0)):
        raise ValueError(
            "prompts must be left-padded: the last column of prompt_mask must be 1 in every row (pad on the left, "
            "e.g. tokenizer.padding_side = 'left')"
        )
    if not jnp.issubdtype(jnp.asarray(prompt_ids).dtype, jnp.integer):
        raise TypeError(f"prompt_ids must be integer token ids, got {jnp.asarray(prompt_ids).dtype}")
    pad = config.vocab_size if pad_token_id is None else pad_token_id
    return _sample_jit(config, params, jnp.asarray(prompt_ids, jnp.int32), prompt_mask, key,
                       max_new_tokens=max_new_tokens, temperature=float(temperature), top_k=int(top_k),
                       top_p=float(top_p), eos_token_id=eos_token_id, pad_token_id=pad, example_ids=example_ids,
                       stop_sequences=tuple(tuple(int(t) for t in q) for q in stop_sequences))
