"""Scores for finished responses, and how they become per-token rewards.

Conventions (shared with the sampler and the PPO iteration):

- ``tokens  # [batch, time] int32``: the sampled response tokens only (no query).
- ``mask    # [batch, time]``: 1 on real response tokens, up to and including EOS, 0 after. Any of bool, int
  or float; functions here treat ``mask > 0`` as "real".
- ``scores  # [batch] float32``: one number per finished response.

There are two kinds of reward:

1. A *jittable reward* is any callable ``reward_fn(tokens, mask) -> scores`` built from JAX ops. It runs inside
   the jitted PPO iteration. A reward that carries arrays (a lexicon table, reward-model params) should be a
   pytree with a ``__call__`` (like :class:`LexiconReward`) and be passed into the jitted step as an argument, so
   its arrays are inputs rather than constants baked into the compiled program. The trainer checks the output's
   shape and dtype once, at trace time, with :func:`check_scores` (or :func:`check_reward_fn` before the first
   step), and reports :func:`nonfinite_count` as a metric that the host checks each iteration.
2. A *host reward* is a Python function ``host_fn(tokens: np.ndarray, mask: np.ndarray) -> np.ndarray [batch]
   float32`` (for example :func:`vader_text_reward` through :func:`host_reward_from_text`). It costs a
   device -> host -> device round trip per iteration and runs *between* the rollout step and the update step.

A config names its reward by ``reward.kind``, a name in the reward registry: :func:`register_reward` registers a
plain jittable function or a host function on decoded text, :func:`register_reward_builder` a builder that needs
the run's context (tokenizer, model config, config directory), and :func:`build_reward` is the one entry point
that turns a ``RewardConfig`` into a reward. Built-in names: ``lexicon``, ``vader``, ``reward_model``,
``function`` (``reward.function: 'module:fn'``, jittable) and ``host_function`` (the same, on decoded text).

Shaping (lm-human-preferences, Ziegler et al. 2019, https://arxiv.org/abs/1909.08593; TRL PPO):
:func:`shape_rewards` turns scores into per-token rewards ``r_t = -beta * kl_t + [t == last] * score``;
:func:`truncate_after_stop`, :func:`penalize_missing` and :func:`missing_eos_penalty` are the response
post-processing of lm-human-preferences and TRL.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib.util
import inspect
import numbers
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from ppojax.rl.losses import kl_estimate


__all__ = [
    "HEAD_FILE",
    "load_reward_model",
    "save_reward_model",
    "RewardFn",
    "HostRewardFn",
    "check_scores",
    "check_reward_fn",
    "nonfinite_count",
    "vader_lexicon",
    "lexicon_valence_table",
    "LexiconReward",
    "lexicon_reward",
    "vader_text_reward",
    "host_reward_from_text",
    "last_token_index",
    "shape_rewards",
    "truncate_after_stop",
    "penalize_missing",
    "missing_eos_penalty",
    "FunctionReward",
    "RewardModel",
    "LoraRewardModel",
    "lora_reward_model",
    "reward_model",
    "RewardContext",
    "BuiltReward",
    "RewardBuilder",
    "register_reward",
    "register_reward_builder",
    "reward_names",
    "check_reward_config",
    "reward_label",
    "build_reward",
]

RewardFn = Callable[[jax.Array, jax.Array], jax.Array]
"""Jittable reward: ``(tokens [B, T] int32, mask [B, T]) -> scores [B] float32``."""

HostRewardFn = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""Host reward: ``(tokens [B, T] np.int32, mask [B, T] np) -> scores [B] np.float32``."""

KLEstimator = Literal["k1", "k2", "k3"]

# VADER rates words on a -4 (extremely negative) .. +4 (extremely positive) scale
# (Hutto & Gilbert 2014, vader_lexicon.txt); dividing by 4 puts a token's valence in [-1, 1].
_VADER_SCALE = 4.0

# Word-start markers of byte-level BPE (GPT-2: 'Ġ' stands for a space) and SentencePiece ('▁').
_SPACE_MARKERS = ("Ġ", "▁")


# --------------------------------------------------------------------------------------------------------------
# The reward protocol: checks
# --------------------------------------------------------------------------------------------------------------


def _reward_name(where: Any) -> str:
    if where is None:
        return "reward"
    if isinstance(where, str):
        return where
    return getattr(where, "__qualname__", None) or getattr(where, "__name__", None) or type(where).__name__


def check_scores(scores: Any, batch_size: int, *, where: Any = None) -> None:
    """Raises if ``scores`` is not ``[batch_size] float32``.

    Looks only at ``.shape`` and ``.dtype``, so it works on concrete arrays, tracers and
    ``jax.ShapeDtypeStruct`` alike: call it at trace time (when the trainer first traces the step) and it costs
    nothing at run time. NaNs are a run-time property; see :func:`nonfinite_count`.

    Args:
      scores: the reward's output.
      batch_size: the number of responses scored.
      where: the reward (a name, or the function itself) to name in the error.

    Raises:
      TypeError: ``scores`` has no shape/dtype, or its dtype is not float32.
      ValueError: its shape is not ``(batch_size,)``.
    """
    name = _reward_name(where)
    shape = getattr(scores, "shape", None)
    dtype = getattr(scores, "dtype", None)
    if shape is None or dtype is None:
        raise TypeError(
            f"reward {name!r} must return an array of shape ({batch_size},) float32, got {type(scores).__name__}"
        )
    if tuple(shape) != (batch_size,):
        hint = " (squeeze the trailing axis)" if tuple(shape) == (batch_size, 1) else ""
        raise ValueError(
            f"reward {name!r} must return scores of shape [batch] = ({batch_size},), got {tuple(shape)}{hint}"
        )
    if np.dtype(dtype) != np.float32:
        raise TypeError(
            f"reward {name!r} must return float32 scores, got {np.dtype(dtype)} (cast with .astype(jnp.float32))"
        )


def check_reward_fn(reward_fn: RewardFn, batch_size: int, response_length: int, *, mask_dtype=jnp.int32) -> None:
    """Traces ``reward_fn`` abstractly (``jax.eval_shape``, no FLOPs) and checks its output with
    :func:`check_scores`. Call it once before the first PPO iteration to fail early with the reward's name."""
    tokens = jax.ShapeDtypeStruct((batch_size, response_length), jnp.int32)
    mask = jax.ShapeDtypeStruct((batch_size, response_length), mask_dtype)
    out = jax.eval_shape(reward_fn, tokens, mask)
    check_scores(out, batch_size, where=reward_fn)


def nonfinite_count(scores: jax.Array) -> jax.Array:
    """Number of NaN/inf entries in ``scores`` (int32 scalar; jittable). The trainer reports it as a metric and
    the host raises when it is not 0, naming the reward."""
    return jnp.sum(~jnp.isfinite(scores), dtype=jnp.int32)


# --------------------------------------------------------------------------------------------------------------
# Lexicon sentiment reward (jittable; the offline default)
# --------------------------------------------------------------------------------------------------------------


def _vader_data_path(filename: str) -> str:
    spec = importlib.util.find_spec("vaderSentiment")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the VADER lexicon needs the `vaderSentiment` package: pip install vaderSentiment")
    return os.path.join(list(spec.submodule_search_locations)[0], filename)


def vader_lexicon() -> dict[str, float]:
    """VADER's word -> mean valence (in [-4, 4]) from the ``vaderSentiment`` package's ``vader_lexicon.txt``.

    Each line is ``word \\t mean \\t std \\t [ten ratings]``. Parsed as VADER itself does (a later duplicate
    wins), but tolerant of the file's CRLF line ends.
    """
    lexicon: dict[str, float] = {}
    with open(_vader_data_path("vader_lexicon.txt"), encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            word, mean = line.split("\t")[:2]
            lexicon[word] = float(mean)
    return lexicon


def _normalise_token(token: str) -> str:
    for marker in _SPACE_MARKERS:
        token = token.replace(marker, " ")
    return token.strip().lower()


def lexicon_valence_table(
    tokenizer: Any, lexicon: Mapping[str, float] | None = None, *, vocab_size: int | None = None
) -> np.ndarray:
    """Per-token valence ``table[id] = lexicon[word(id)] / 4``, a ``[vocab_size]`` float32 array.

    ``word(id)`` is the token's string (``tokenizer.convert_ids_to_tokens``) with the word-start marker
    (GPT-2's 'Ġ', SentencePiece's '▁') and surrounding whitespace stripped, lowercased, as VADER lowercases
    words. Tokens missing from the lexicon, special tokens, and ids ``>= len(tokenizer)`` (a ``vocab_size``
    padded past the tokenizer, e.g. for a pad id) get 0.

    With GPT-2's vocabulary and VADER's lexicon about 3.9% of the ids are positive and 3.9% negative
    (RLHF-FACTS), dense enough for a randomly initialised policy to find reward.

    Args:
      tokenizer: a Hugging Face tokenizer (needs ``len()``, ``convert_ids_to_tokens`` and ``all_special_ids``).
      lexicon: word -> valence in [-4, 4]; default :func:`vader_lexicon`.
      vocab_size: length of the table (the model's vocabulary); default ``len(tokenizer)``. It may be smaller than
        the tokenizer only by the pad token added past the model's vocabulary (ppojax's ``<|pad|>``).
    """
    if lexicon is None:
        lexicon = vader_lexicon()
    n_tokens = len(tokenizer)
    if vocab_size is None:
        vocab_size = n_tokens
    if vocab_size < n_tokens:
        # Only ppojax's pad token may lie past the model's vocabulary: the model never has to produce it.
        beyond = [i for i in range(vocab_size, n_tokens) if i != getattr(tokenizer, "pad_token_id", None)]
        if beyond:
            raise ValueError(
                f"vocab_size={vocab_size} is smaller than the tokenizer's {n_tokens} tokens, and ids {beyond[:5]} are "
                "tokens the model cannot produce; use a model whose vocabulary covers the tokenizer"
            )
        n_tokens = vocab_size
    table = np.zeros((vocab_size,), np.float32)
    token_strings = tokenizer.convert_ids_to_tokens(list(range(n_tokens)))
    for token_id, token in enumerate(token_strings):
        if token is None:
            continue
        valence = lexicon.get(_normalise_token(token))
        if valence is not None:
            table[token_id] = valence / _VADER_SCALE
    for special_id in getattr(tokenizer, "all_special_ids", ()):
        if 0 <= special_id < vocab_size:
            table[special_id] = 0.0
    return table


@struct.dataclass
class LexiconReward:
    """Jittable reward: the masked mean (or sum) of per-token valences over the response.

        mean:  score_b = sum_t m_bt * table[x_bt] / max(sum_t m_bt, 1)
        sum:   score_b = sum_t m_bt * table[x_bt]

    A pytree: ``table`` is a leaf, so the reward can be passed into a jitted step as an argument (or closed over:
    a fixed table baked in as a constant is fine too). Ids outside the table score 0. An empty response
    scores 0.
    """

    table: jax.Array  # [vocab] float32
    reduce: str = struct.field(pytree_node=False, default="mean")

    # Identity equality and hash (the generated ones would compare/hash the table array), so that an instance
    # can itself be jitted, ``jax.jit(reward)``, which keys its cache on the callable.
    def __eq__(self, other: object) -> bool:
        return self is other

    def __hash__(self) -> int:
        return id(self)

    def __call__(self, tokens: jax.Array, mask: jax.Array) -> jax.Array:
        chex.assert_rank([tokens, mask], 2)
        chex.assert_equal_shape([tokens, mask])
        real = mask > 0
        valence = jnp.take(self.table, tokens, mode="fill", fill_value=0.0)  # [batch, time]
        total = jnp.sum(jnp.where(real, valence, 0.0), axis=-1, dtype=jnp.float32)  # [batch]
        if self.reduce == "sum":
            return total
        if self.reduce == "mean":
            count = jnp.sum(real, axis=-1, dtype=jnp.float32)
            return total / jnp.maximum(count, 1.0)
        raise ValueError(f"LexiconReward.reduce must be 'mean' or 'sum', got {self.reduce!r}")


def lexicon_reward(table: Any, *, reduce: Literal["mean", "sum"] = "mean") -> LexiconReward:
    """Builds the lexicon sentiment reward from a ``[vocab]`` valence table (:func:`lexicon_valence_table`)."""
    if reduce not in ("mean", "sum"):
        raise ValueError(f"reduce must be 'mean' or 'sum', got {reduce!r}")
    table = jnp.asarray(table, jnp.float32)
    chex.assert_rank(table, 1)
    return LexiconReward(table=table, reduce=reduce)


# --------------------------------------------------------------------------------------------------------------
# Host rewards on decoded text
# --------------------------------------------------------------------------------------------------------------
#
# Cost: a host reward pulls the response tokens off the device, decodes them, scores them in Python and puts the
# scores back: one device -> host -> device round trip per iteration, between the rollout step and the update
# step, which also serialises the two. Measured on this project's 2-core CPU: VADER's polarity_scores takes
# ~65 us per 18-word text; decode + VADER take ~60-100 us per 24-token GPT-2 response (random tokens vs English),
# so ~30-50 ms for a 512-response batch: small next to a PPO iteration, but it grows with the batch and holds
# the accelerator idle while it runs.


def vader_text_reward() -> Callable[[Sequence[str]], np.ndarray]:
    """Host text scorer: VADER's ``compound`` polarity in [-1, 1] per text, as ``[n]`` float32.

    Wrap it with :func:`host_reward_from_text` to score token batches.
    """
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()

    def vader_compound(texts: Sequence[str]) -> np.ndarray:
        return np.asarray([analyzer.polarity_scores(text)["compound"] for text in texts], np.float32)

    return vader_compound


def _validate_host_scores(scores: Any, n: int, name: str) -> np.ndarray:
    try:
        array = np.asarray(scores)
    except Exception as e:  # a ragged list, or something numpy cannot hold
        raise TypeError(f"host reward {name!r} returned {type(scores).__name__}, not an array of {n} numbers") from e
    if array.dtype.kind == "O":  # e.g. a list holding None, which astype(float) would silently turn into NaN
        odd = [type(x).__name__ for x in array.ravel() if not isinstance(x, (numbers.Real, np.number))]
        if odd:
            raise TypeError(f"host reward {name!r} returned non-numeric values ({', '.join(sorted(set(odd)))})")
        array = array.astype(np.float64)
    if array.dtype.kind not in "fiu":
        raise TypeError(f"host reward {name!r} must return numbers, got dtype {array.dtype}")
    if array.shape != (n,):
        raise ValueError(f"host reward {name!r} must return {n} scores (one per response), got shape {array.shape}")
    bad = np.flatnonzero(~np.isfinite(array))
    if bad.size:
        raise ValueError(
            f"host reward {name!r} returned {bad.size} non-finite scores, at responses {bad[:8].tolist()}"
        )
    return array.astype(np.float32)


def _decode(tokenizer: Any, ids: np.ndarray, mask: np.ndarray) -> list[str]:
    """Each row's real tokens (``mask > 0``) as text, without special tokens."""
    return tokenizer.batch_decode([row[keep > 0].tolist() for row, keep in zip(ids, mask)], skip_special_tokens=True)


def _wants(fn: Callable, name: str) -> bool:
    """Whether a text scorer has a parameter called ``name`` (``prompts``, ``targets``)."""
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a builtin without a signature
        return False


def _wants_prompts(fn: Callable) -> bool:
    """Whether a text scorer takes the prompts: it has a parameter named ``prompts``."""
    return _wants(fn, "prompts")


TargetsOf = Callable[[np.ndarray, np.ndarray], list]
"""``targets_of(prompt_ids [n, P], prompt_mask [n, P]) -> [n]`` targets (a task's answers) of tokenized prompts."""


def host_reward_from_text(text_fn: Callable[..., Any], tokenizer: Any, *, name: str | None = None,
                          targets_of: TargetsOf | None = None) -> HostRewardFn:
    """Adapts a text scorer ``text_fn(texts) -> [n] numbers`` into a host reward on ``(tokens, mask)``.

    Each response is decoded from its real tokens only (``mask > 0``) with ``skip_special_tokens=True`` (so EOS
    is not part of the text). The scorer's output is checked (numeric, length n, finite) and returned as
    ``[n]`` float32; a bad output raises TypeError/ValueError naming the reward (``name``, default the scorer's).

    A scorer with a parameter named ``prompts`` also gets the decoded prompts, ``text_fn(texts, prompts=[...])``:
    the host reward then has ``uses_prompts = True`` and must be called as ``host_reward(tokens, mask,
    prompts=(prompt_ids, prompt_mask))``, with the left-padded prompt ids ``[batch, P]`` of each response (or
    ``[batch / k, P]``, one row per group of ``k`` consecutive responses, as the iteration repeats them).

    A scorer with a parameter named ``targets`` gets each response's target (the answer a task's row holds, looked
    up from its prompt by ``targets_of``, e.g. a verifier ``fn(responses, targets)``); it is called with the prompts
    too (``uses_prompts``), and ``targets_of`` must be given.
    """
    name = name or _reward_name(text_fn)
    uses_targets = _wants(text_fn, "targets")
    if uses_targets and targets_of is None:
        raise ValueError(f"reward {name!r} scores against targets (a parameter named `targets`), but the run's task "
                         "has none: use a task whose rows carry answers (task.name: arithmetic, gsm8k, or file with "
                         "task.kwargs.target_field)")
    uses_prompts = _wants_prompts(text_fn) or uses_targets

    def host_reward(tokens: Any, mask: Any, *, prompts: tuple[Any, Any] | None = None) -> np.ndarray:
        tokens = np.asarray(tokens)
        mask = np.asarray(mask)
        if tokens.ndim != 2 or tokens.shape != mask.shape:
            raise ValueError(f"tokens and mask must both be [batch, time], got {tokens.shape} and {mask.shape}")
        texts = _decode(tokenizer, tokens, mask)
        if not uses_prompts:
            return _validate_host_scores(text_fn(texts), len(texts), name)
        if prompts is None:
            raise TypeError(f"host reward {name!r} scores with the prompts: call it as "
                            "host_reward(tokens, mask, prompts=(prompt_ids, prompt_mask))")
        prompt_ids, prompt_mask = (np.asarray(x) for x in prompts)
        n, rows = len(texts), prompt_ids.shape[0] if prompt_ids.ndim == 2 else 0
        if prompt_ids.ndim != 2 or prompt_ids.shape != prompt_mask.shape or not rows or n % rows:
            raise ValueError(f"host reward {name!r}: prompts must be ids and mask of shape [batch, P] (or one row per "
                             f"group of responses) for {n} responses, got {prompt_ids.shape} and {prompt_mask.shape}")
        k = n // rows  # rows g*k .. g*k+k-1 share prompt g (``samples_per_prompt``)
        extra = {}
        if _wants_prompts(text_fn):
            extra["prompts"] = [text for text in _decode(tokenizer, prompt_ids, prompt_mask) for _ in range(k)]
        if uses_targets:
            extra["targets"] = [t for t in targets_of(prompt_ids, prompt_mask) for _ in range(k)]
        return _validate_host_scores(text_fn(texts, **extra), n, name)

    host_reward.__name__ = host_reward.__qualname__ = f"host_reward_from_text({name})"
    host_reward.uses_prompts = uses_prompts
    return host_reward


# --------------------------------------------------------------------------------------------------------------
# Shaping: pure jittable functions
# --------------------------------------------------------------------------------------------------------------


def last_token_index(mask: jax.Array) -> jax.Array:
    """Index of the last real token of each row: ``max{t : m_bt > 0}``, or 0 for a row with no real token.

    ``mask  # [batch, time]`` -> ``[batch]`` int32. Does not assume the mask is a prefix.
    """
    chex.assert_rank(mask, 2)
    positions = jnp.arange(mask.shape[-1], dtype=jnp.int32)
    return jnp.max(jnp.where(mask > 0, positions, 0), axis=-1)


def shape_rewards(
    scores: jax.Array,
    logprobs: jax.Array,
    ref_logprobs: jax.Array,
    mask: jax.Array,
    kl_coef: jax.Array,
    *,
    kl_estimator: KLEstimator = "k1",
) -> tuple[jax.Array, jax.Array]:
    """Per-token rewards: a KL penalty on every real token, plus the score on the last real token.

        kl_bt = m_bt * k(logp_bt, logp_ref_bt)                 (k1 = logp - logp_ref by default)
        r_bt  = -beta * kl_bt + [t == last_b] * score_b

    as in lm-human-preferences (``rewards = -kl_coef * kl; rewards[:, -1] += scores``, with fixed-length
    responses) and TRL PPO (score at the last real token). Padding gets reward 0 and kl 0, set with ``where``
    so garbage log-probs on padding cannot leak NaN. A row with no real token gets all zeros (its score is
    dropped): samplers emit at least one token, so this only arises for fully masked rows.

    Args:
      scores: ``[batch]`` sequence-level scores.
      logprobs: ``[batch, time]`` log-probs of the sampled tokens under the policy (temperature-scaled).
      ref_logprobs: ``[batch, time]`` the same under the frozen reference model.
      mask: ``[batch, time]`` real response tokens.
      kl_coef: scalar beta, an array from the train state (a Python float recompiles when it changes).
      kl_estimator: "k1", "k2" or "k3".

    Returns:
      ``(rewards, kl)``, both ``[batch, time]`` float32; ``kl.sum(-1)`` is each response's KL estimate, the
      quantity an adaptive KL controller tracks.
    """
    chex.assert_rank([scores, logprobs, ref_logprobs, mask], [1, 2, 2, 2])
    chex.assert_equal_shape([logprobs, ref_logprobs, mask])
    chex.assert_equal_shape_prefix([scores, mask], 1)
    kl_coef = jnp.asarray(kl_coef, jnp.float32)
    chex.assert_rank(kl_coef, 0)
    real = mask > 0
    kl = kl_estimate(logprobs.astype(jnp.float32), ref_logprobs.astype(jnp.float32), kl_estimator)
    kl = jnp.where(real, kl, 0.0)  # [batch, time]
    last = last_token_index(mask)  # [batch]
    at_last = jnp.arange(mask.shape[-1])[None, :] == last[:, None]  # [batch, time]
    score_t = jnp.where(at_last & real, scores.astype(jnp.float32)[:, None], 0.0)
    rewards = -kl_coef * kl + score_t
    return rewards, kl


def truncate_after_stop(
    tokens: jax.Array, mask: jax.Array, *, stop_token: int, min_length: int, pad_token_id: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Cuts each response after the first ``stop_token`` at response position ``>= min_length`` (0-based).

    lm-human-preferences (``truncate_token=13`` ('.'), ``truncate_after=16``): the stop token itself is kept;
    positions after it become ``pad_token_id`` with mask 0. Only real tokens count as stops. A response without
    a qualifying stop is left unchanged and has ``found = False`` (lm-human-preferences then sets its score to
    -1: :func:`penalize_missing`).

    Returns:
      ``(tokens, mask, found)``: ``[batch, time]`` with the input dtypes, and ``[batch]`` bool.
    """
    chex.assert_rank([tokens, mask], 2)
    chex.assert_equal_shape([tokens, mask])
    positions = jnp.arange(tokens.shape[-1])[None, :]  # [1, time]
    is_stop = (tokens == stop_token) & (positions >= min_length) & (mask > 0)  # [batch, time]
    found = jnp.any(is_stop, axis=-1)  # [batch]
    first_stop = jnp.argmax(is_stop, axis=-1)  # [batch]; 0 where not found, but then `found` gates it
    cut = found[:, None] & (positions > first_stop[:, None])  # [batch, time]
    tokens = jnp.where(cut, jnp.asarray(pad_token_id, tokens.dtype), tokens)
    mask = jnp.where(cut, jnp.zeros((), mask.dtype), mask)
    return tokens, mask, found


def penalize_missing(scores: jax.Array, found: jax.Array, penalty: float | jax.Array) -> jax.Array:
    """REPLACES the score of responses without a stop token: ``where(found, score, penalty)``.

    lm-human-preferences sets the score to -1 (``penalty=-1.0``) when :func:`truncate_after_stop` found no stop.
    """
    chex.assert_rank([scores, found], 1)
    chex.assert_equal_shape([scores, found])
    return jnp.where(found, scores, jnp.asarray(penalty, scores.dtype))


def missing_eos_penalty(
    scores: jax.Array, tokens: jax.Array, mask: jax.Array, eos_token_id: int, penalty: float | jax.Array
) -> jax.Array:
    """SUBTRACTS ``penalty`` from the score of responses with no EOS among their real tokens.

        score_b - penalty * [no t with m_bt > 0 and x_bt == eos]

    TRL's ``missing_eos_penalty`` (a positive number; ``scores[~contain_eos_token] -= missing_eos_penalty``),
    which pushes the policy to finish its responses within the length budget.
    """
    chex.assert_rank([scores, tokens, mask], [1, 2, 2])
    chex.assert_equal_shape([tokens, mask])
    has_eos = jnp.any((tokens == eos_token_id) & (mask > 0), axis=-1)
    return jnp.where(has_eos, scores, scores - jnp.asarray(penalty, scores.dtype))


# --------------------------------------------------------------------------------------------------------------
# Rewards as pytrees the jitted iteration takes as an argument
# --------------------------------------------------------------------------------------------------------------


@struct.dataclass
class FunctionReward:
    """A plain jittable function ``(tokens, mask) -> scores [batch]`` wrapped as a pytree (the function is static).

    ``FunctionReward(my_fn)`` or, from a config, ``FunctionReward.from_spec("package.module:function")``.
    """

    fn: Callable = struct.field(pytree_node=False)

    def __call__(self, tokens: jax.Array, mask: jax.Array) -> jax.Array:
        return self.fn(tokens, mask)

    @classmethod
    def from_spec(cls, spec: str) -> "FunctionReward":
        from ppojax.registry import resolve_callable  # the same 'module:function' resolution as loss terms

        if not isinstance(spec, str) or ":" not in spec:
            raise ValueError(f"a reward function is named 'package.module:function', got {spec!r}")
        return cls(resolve_callable(spec, what="reward"))


@struct.dataclass
class RewardModel:
    """A learned reward: GPT-2 trunk + scalar head read at the last real token, normalised with gain and bias.

        score_b = gain * head(h_b[last_b]) + bias

    It scores the whole sequence (prompt + response), so the iteration passes it both (``uses_prompt``). Gain and
    bias make scores on reference-policy samples mean 0 / std 1 (lm-human-preferences): see :func:`normalize`.
    """

    params: Any
    gain: jax.Array
    bias: jax.Array
    config: Any = struct.field(pytree_node=False)
    uses_prompt = True

    def raw(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
        """Unnormalised head output at each row's last real token, ``[batch]``."""
        from ppojax.models import value_forward

        values = value_forward(self.config, self.params, ids, mask)  # [batch, time]
        last = last_token_index(mask)
        return jnp.take_along_axis(values, last[:, None], axis=-1)[:, 0].astype(jnp.float32)

    def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
        return self.gain * self.raw(ids, mask) + self.bias

    def normalize(self, ids: jax.Array, mask: jax.Array) -> "RewardModel":
        """Set gain and bias so that the scores of these (reference-policy) samples have mean 0 and std 1."""
        raw = self.raw(ids, mask)
        std = jnp.maximum(jnp.std(raw), 1e-8)
        gain = 1.0 / std
        return self.replace(gain=gain, bias=-jnp.mean(raw) * gain)


@struct.dataclass
class LoraRewardModel:
    """A learned reward as a LoRA adapter over a shared frozen base: the base's trunk with its own adapters
    (``W' = W + alpha/r · A B``, ``ppojax.models.lora``) and a scalar head, read at the last real token.

        score_b = gain * head(h_b[last_b]) + bias,     h = trunk of merge(base, adapters)

    ``params`` holds only ``{'adapters': ..., 'head': {'kernel', 'bias'}}``: in a PPO state the reward costs its
    adapters and head, not a second copy of the base. The base comes in at scoring time: the PPO iteration calls
    :meth:`with_base` with the run's frozen reference (``uses_base``), which is the shared base under
    ``LoraRoles`` and the initial policy under full fine-tuning, so the reward model must have been trained on that
    same base (``reward_training.create_reward_train_state(..., lora=spec)`` on the policy's initial weights).
    """

    params: Any
    gain: jax.Array
    bias: jax.Array
    config: Any = struct.field(pytree_node=False)
    lora: Any = struct.field(pytree_node=False)
    """The adapters' ``LoraSpec`` (rank, alpha, targets)."""
    uses_prompt = True
    uses_base = True

    def with_base(self, base_params: Any) -> RewardModel:
        """The :class:`RewardModel` of ``base_params`` merged with these adapters (jittable: inside a jit the merged
        kernels are transient values, not stored)."""
        merged = self.lora.merge(base_params, self.params["adapters"])
        return RewardModel(params={"transformer": merged["transformer"], "head": self.params["head"]},
                           gain=self.gain, bias=self.bias, config=self.config)

    def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
        raise TypeError("a LoraRewardModel holds only its adapters and head: score with rm.with_base(base)(ids, mask) "
                        "(the PPO iteration passes the run's frozen base itself)")

    def normalize(self, base_params: Any, ids: jax.Array, mask: jax.Array) -> "LoraRewardModel":
        """Gain and bias that give these (reference-policy) samples scores of mean 0 and std 1
        (:meth:`RewardModel.normalize`)."""
        normed = self.with_base(base_params).normalize(ids, mask)
        return self.replace(gain=normed.gain, bias=normed.bias)


def lora_reward_model(config: Any, lora: Any, params: Any, *, gain: float = 1.0,
                      bias: float = 0.0) -> LoraRewardModel:
    """A :class:`LoraRewardModel` from ``{'adapters': ..., 'head': ...}`` and the adapters' ``LoraSpec``."""
    if not isinstance(params, dict) or set(params) != {"adapters", "head"}:
        raise ValueError("lora_reward_model: params must be {'adapters': LoRA adapters, 'head': scalar head}")
    return LoraRewardModel(params=params, gain=jnp.asarray(gain, jnp.float32), bias=jnp.asarray(bias, jnp.float32),
                           config=config, lora=lora)


def reward_model(config: Any, params: Any, *, gain: float = 1.0, bias: float = 0.0) -> RewardModel:
    """A :class:`RewardModel` from scalar-head params (``ppojax.init_value_params(..., head_init_std=...)``)."""
    if not isinstance(params, dict) or "head" not in params or "transformer" not in params:
        raise ValueError("reward_model: params must be scalar-head GPT-2 params ({'transformer': ..., 'head': ...})")
    return RewardModel(params=params, gain=jnp.asarray(gain, jnp.float32), bias=jnp.asarray(bias, jnp.float32),
                       config=config)


# --------------------------------------------------------------------------------------------------------------
# The reward registry: ``reward.kind`` names a builder
# --------------------------------------------------------------------------------------------------------------
#
# A config names its reward by ``reward.kind``; the one builder registered under that name turns the config (and
# the run's tokenizer, model config and config directory) into a jittable reward or a host reward. Nothing outside
# the registry branches on the name: the built-ins below register exactly as a user module does.


@dataclasses.dataclass(frozen=True)
class RewardContext:
    """What a reward builder may need of the run besides its config."""

    tokenizer: Any = None
    """The run's Hugging Face tokenizer (decodes responses for host rewards, maps ids to words for the lexicon)."""
    model_config: Any = None
    """The policy's model config (``vocab_size``, ...)."""
    config_dir: os.PathLike | str | None = None
    """Directory of the config file: relative paths in the reward config are looked up there first."""
    targets_of: TargetsOf | None = None
    """The run's task's answers by tokenized prompt (None: its rows have no targets); a host text reward with a
    ``targets`` parameter is handed them."""


@dataclasses.dataclass(frozen=True)
class BuiltReward:
    """A builder's result: exactly one of a jittable reward (a pytree called as ``reward(tokens, mask)`` inside the
    jitted iteration) and a host reward (:data:`HostRewardFn`, called between rollout and update)."""

    reward: Any = None
    host_reward: HostRewardFn | None = None

    def __post_init__(self):
        if (self.reward is None) == (self.host_reward is None):
            raise ValueError("a reward builder returns exactly one of reward= (jittable) and host_reward= (host)")


RewardBuilder = Callable[[Any, RewardContext], BuiltReward]
"""``builder(reward_cfg: RewardConfig, ctx: RewardContext) -> BuiltReward``; raises ValueError naming the config key
(``reward.function='...': ...``) for a config it cannot build."""

RewardCheck = Callable[[Any], None]
"""``check(reward_cfg)``: raises ValueError for a config the builder cannot take; runs when the config is built."""

RewardLabel = Callable[[Any], str]
"""``label(reward_cfg) -> str``: the config key an error about this reward names, e.g. ``reward.function='m:f'``."""


@dataclasses.dataclass(frozen=True)
class _Entry:
    builder: RewardBuilder
    check: RewardCheck | None
    label: RewardLabel | None


_REWARDS: dict[str, _Entry] = {}


def _same_definition(a: Callable, b: Callable) -> bool:
    """The same function defined again (a module imported twice, or reloaded)."""
    key = lambda f: (getattr(f, "__module__", None), getattr(f, "__qualname__", None))  # noqa: E731
    return a is b or (key(a) == key(b) and key(a)[1] is not None)


def register_reward_builder(name: str, builder: RewardBuilder, *, check: RewardCheck | None = None,
                            label: RewardLabel | None = None, replace: bool = False) -> RewardBuilder:
    """Registers ``builder`` as ``reward.kind: name`` (the low-level form: the builder gets the run's context).

    Args:
      name: the registry name a config's ``reward.kind`` gives.
      builder: ``builder(reward_cfg, ctx) -> BuiltReward``.
      check: optional ``check(reward_cfg)`` run when the config is built (before any model or tokenizer is
        loaded), e.g. that a required field is set; raises ValueError.
      label: optional ``label(reward_cfg) -> str``, the config key that errors about the built reward name
        (:func:`reward_label`); default ``reward.kind='name'``.
      replace: allow replacing a different builder under the same name.

    Returns ``builder``. Raises ValueError for a bad name or one taken by another builder.
    """
    if not isinstance(name, str) or not name or name != name.strip() or ":" in name:
        raise ValueError(f"a reward name is a non-empty string without spaces or ':', got {name!r}")
    if not callable(builder) or any(f is not None and not callable(f) for f in (check, label)):
        raise TypeError(f"reward {name!r}: the builder, the check and the label must be callable")
    old = _REWARDS.get(name)
    if old is not None and not replace and not _same_definition(old.builder, builder):
        raise ValueError(f"a reward named {name!r} is already registered (pass replace=True to replace it)")
    _REWARDS[name] = _Entry(builder, check, label)
    return builder


def register_reward(name: str, *, host: bool = False, replace: bool = False) -> Callable[[Callable], Callable]:
    """Decorator: registers a plain function as ``reward.kind: name``; returns the function unchanged.

    ``host=False`` (jittable): ``fn(tokens, mask, **kwargs) -> scores [batch] float32`` of JAX ops, run inside the
    jitted iteration (wrapped as a :class:`FunctionReward`).

    ``host=True``: ``fn(responses: list[str], **kwargs) -> [batch] numbers``, or ``fn(responses, prompts,
    **kwargs)`` with a parameter named ``prompts`` to get the decoded prompts too (as a keyword), run on the host
    between rollout and update (:func:`host_reward_from_text`). Its output is checked at each call.

    ``kwargs`` are the config's ``reward.kwargs``, bound when the reward is built::

        @ppojax.register_reward("keyword", host=True)
        def keyword(responses, *, word="great"):
            return [float(word in r) for r in responses]

        # reward: {kind: keyword, kwargs: {word: wonderful}}
    """

    def decorator(fn: Callable) -> Callable:
        if not callable(fn):
            raise TypeError(f"register_reward({name!r}) decorates a function, got {type(fn).__name__}")
        _check_arity(fn, host=host, where=f"register_reward({name!r})")
        if host:
            builder = lambda cfg, ctx: _host_text_reward(fn, cfg, ctx, name=name, key=f"reward.kind={name!r}")  # noqa: E731
        else:
            builder = lambda cfg, ctx: _jittable_reward(fn, cfg, key=f"reward.kind={name!r}")  # noqa: E731
        builder.__module__, builder.__qualname__ = fn.__module__, f"register_reward({fn.__qualname__})"
        register_reward_builder(name, builder, replace=replace)
        return fn

    return decorator


def reward_names() -> list[str]:
    """The registered reward names, sorted."""
    return sorted(_REWARDS)


def _entry(kind: Any) -> _Entry:
    entry = _REWARDS.get(kind) if isinstance(kind, str) else None
    if entry is None:
        close = difflib.get_close_matches(kind, list(_REWARDS), n=1) if isinstance(kind, str) else []
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"reward.kind={kind!r}: unknown reward{hint} (registered: {', '.join(reward_names())}; "
                         "a module that registers more is named under imports:)")
    return entry


def check_reward_config(reward_cfg: Any) -> None:
    """Raises ValueError (one line naming the key) when ``reward_cfg.kind`` is not registered or its builder's
    check refuses the config. ``RewardConfig`` calls it on construction."""
    entry = _entry(reward_cfg.kind)
    if entry.check is not None:
        entry.check(reward_cfg)


def reward_label(reward_cfg: Any) -> str:
    """The config key that names this reward in an error about it (a failed trace, a bad output): e.g.
    ``reward.function='pkg.mod:fn'`` for ``kind: function``, ``reward.kind='name'`` by default."""
    entry = _entry(reward_cfg.kind)
    return entry.label(reward_cfg) if entry.label is not None else f"reward.kind={reward_cfg.kind!r}"


def build_reward(reward_cfg: Any, *, tokenizer: Any, model_config: Any, config_dir: os.PathLike | str | None,
                 targets_of: TargetsOf | None = None) -> tuple[Any, HostRewardFn | None]:
    """``(jittable reward pytree or None, host reward or None)`` for a ``RewardConfig``: exactly one is set.

    Looks up ``reward_cfg.kind`` in the registry and calls its builder with a :class:`RewardContext`. Every failure
    to build (an unknown kind, a spec that does not resolve, a user function of the wrong signature, a missing
    reward model) is a ValueError with one line naming the config key. A jittable reward's output shape and dtype
    are checked separately, by tracing it on the rollout's shapes (the runner's ``check_reward``); a host reward's
    output is checked at each call.
    """
    entry = _entry(reward_cfg.kind)
    built = entry.builder(reward_cfg, RewardContext(tokenizer=tokenizer, model_config=model_config,
                                                    config_dir=config_dir, targets_of=targets_of))
    if not isinstance(built, BuiltReward):
        raise ValueError(f"reward.kind={reward_cfg.kind!r}: its builder returned {type(built).__name__}, "
                         "not a BuiltReward")
    host = built.host_reward
    if host is not None:  # what the loop's host call names in an error, and how long it waits for it
        host = _labelled_host_reward(host, reward_label(reward_cfg), getattr(reward_cfg, "timeout_s", None))
    return built.reward, host


def _labelled_host_reward(host: HostRewardFn, label: str, timeout_s: float | None) -> HostRewardFn:
    """``host`` with the attributes ``ppojax.train.loop.score_on_host`` reads: ``label`` (the reward's config key),
    ``timeout_s`` and ``timeout_key`` (``reward.timeout_s``); ``uses_prompts`` is kept."""

    @functools.wraps(host)
    def labelled(tokens: Any, mask: Any, **kwargs: Any) -> np.ndarray:
        return host(tokens, mask, **kwargs)

    labelled.uses_prompts = getattr(host, "uses_prompts", False)
    labelled.label, labelled.timeout_s, labelled.timeout_key = label, timeout_s or None, "reward.timeout_s"
    return labelled


# Binding user functions and their kwargs.


def _kwargs(cfg: Any) -> dict[str, Any]:
    return dict(getattr(cfg, "kwargs", None) or {})


def _describe(fn: Callable) -> str:
    try:
        return f"{_reward_name(fn)}{inspect.signature(fn)}"
    except (TypeError, ValueError):
        return _reward_name(fn)


def _check_call(fn: Callable, args: tuple, kwargs: dict[str, Any], *, key: str, how: str) -> None:
    """One ValueError naming ``key`` when ``fn`` cannot be called as ``how`` (``args`` and ``kwargs`` bound)."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # no signature to check (a builtin): the call will tell
    try:
        signature.bind(*args, **kwargs)
    except TypeError as e:
        raise ValueError(f"{key}: {_describe(fn)} cannot be called as {how}: {e}") from None


def _check_arity(fn: Callable, *, host: bool, where: str) -> None:
    """At registration: ``fn`` takes the reward's positional arguments (its required keyword-only ones come from
    ``reward.kwargs`` when it is built)."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    required = {p.name: None for p in signature.parameters.values()
                if p.kind is p.KEYWORD_ONLY and p.default is p.empty}
    if host:
        how = "fn(responses)"
        args: tuple = ([""],)
        for extra in ("prompts", "targets"):
            if extra in signature.parameters:
                required[extra] = [""]
                how = f"{how[:-1]}, {extra}={extra})"
    else:
        how, args = "fn(tokens, mask)", (None, None)
    try:
        signature.bind(*args, **required)
    except TypeError as e:
        raise ValueError(f"{where}: {_describe(fn)} cannot be called as {how}: {e}") from None


def _bind(fn: Callable, kwargs: dict[str, Any]) -> Callable:
    """``fn`` with ``kwargs`` bound, keeping its name (errors and metrics name the user's function)."""
    if not kwargs:
        return fn

    @functools.wraps(fn)
    def bound(*args, **more):
        return fn(*args, **kwargs, **more)

    return bound


def _jittable_reward(fn: Callable, cfg: Any, *, key: str) -> BuiltReward:
    kwargs = _kwargs(cfg)
    if kwargs:  # the arity itself is checked by tracing on the rollout's shapes (check_reward), which names them
        try:
            inspect.signature(fn).bind_partial(**kwargs)
        except TypeError as e:
            raise ValueError(f"{key}: reward.kwargs {sorted(kwargs)} do not fit {_describe(fn)}: {e}") from None
        except ValueError:
            pass
    return BuiltReward(reward=FunctionReward(_bind(fn, kwargs)))


def _host_text_reward(fn: Callable, cfg: Any, ctx: RewardContext, *, name: str, key: str) -> BuiltReward:
    if ctx.tokenizer is None:
        raise ValueError(f"{key}: a host text reward needs the run's tokenizer to decode the responses")
    kwargs = _kwargs(cfg)
    extra = {p: [""] for p in ("prompts", "targets") if _wants(fn, p)}
    _check_call(fn, ([""],), {**extra, **kwargs}, key=key,
                how=f"fn(responses{''.join(f', {k}={k}' for k in extra)}{''.join(f', {k}=...' for k in kwargs)})")
    if "targets" in extra and ctx.targets_of is None:
        raise ValueError(f"{key}: the reward scores against targets (a parameter named `targets`), but the run's "
                         "task has none: use a task whose rows carry answers (task.name: arithmetic, gsm8k, or file "
                         "with task.kwargs.target_field)")
    return BuiltReward(host_reward=host_reward_from_text(_bind(fn, kwargs), ctx.tokenizer, name=name,
                                                         targets_of=ctx.targets_of))


def _no_kwargs(cfg: Any) -> None:
    if _kwargs(cfg):
        raise ValueError(f"reward.kwargs: reward {cfg.kind!r} takes no kwargs, got {sorted(_kwargs(cfg))}")


def _resolve_function(cfg: Any, what: str) -> Callable:
    from ppojax.registry import resolve_callable  # the same 'module:function' resolution as loss terms

    spec = cfg.function
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(f"reward.function={spec!r}: a {what} is named 'package.module:function'")
    return resolve_callable(spec, what=what, key="reward.function")  # one line naming the key


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _needs_function(cfg: Any) -> None:
    if not cfg.function:
        raise ValueError(f"reward.kind={cfg.kind!r} needs reward.function = 'package.module:function'")


# The built-in rewards.


def _build_lexicon(cfg: Any, ctx: RewardContext) -> BuiltReward:
    _no_kwargs(cfg)
    if ctx.tokenizer is None or ctx.model_config is None:
        raise ValueError("reward.kind='lexicon' needs the run's tokenizer and model config")
    try:
        table = lexicon_valence_table(ctx.tokenizer, vocab_size=ctx.model_config.vocab_size)
    except ImportError as e:
        raise ValueError(f"reward.kind='lexicon': {_first_line(e)}") from None
    return BuiltReward(reward=lexicon_reward(table, reduce=cfg.lexicon_reduce))


def _build_vader(cfg: Any, ctx: RewardContext) -> BuiltReward:
    _no_kwargs(cfg)
    if ctx.tokenizer is None:
        raise ValueError("reward.kind='vader' needs the run's tokenizer to decode the responses")
    try:
        text_fn = vader_text_reward()
    except ImportError as e:
        raise ValueError(f"reward.kind='vader': {_first_line(e)}") from None
    return BuiltReward(host_reward=host_reward_from_text(text_fn, ctx.tokenizer, name="vader"))


def _build_reward_model(cfg: Any, ctx: RewardContext) -> BuiltReward:
    from ppojax.io.data import resolve_path

    _no_kwargs(cfg)
    config_dir = None if ctx.config_dir is None else Path(ctx.config_dir)
    try:
        return BuiltReward(reward=load_reward_model(resolve_path(cfg.reward_model_path, config_dir)))
    except (OSError, ValueError) as e:
        raise ValueError(f"reward.reward_model_path={cfg.reward_model_path!r}: {_first_line(e)}") from None


def _check_reward_model(cfg: Any) -> None:
    if not cfg.reward_model_path:
        raise ValueError("reward.kind='reward_model' needs reward.reward_model_path")


def _build_function(cfg: Any, ctx: RewardContext) -> BuiltReward:
    return _jittable_reward(_resolve_function(cfg, "reward"), cfg, key=f"reward.function={cfg.function!r}")


def _build_host_function(cfg: Any, ctx: RewardContext) -> BuiltReward:
    fn = _resolve_function(cfg, "host reward")
    return _host_text_reward(fn, cfg, ctx, name=cfg.function, key=f"reward.function={cfg.function!r}")


register_reward_builder("lexicon", _build_lexicon)
register_reward_builder("vader", _build_vader)
register_reward_builder("reward_model", _build_reward_model, check=_check_reward_model,
                        label=lambda cfg: f"reward.reward_model_path={cfg.reward_model_path!r}")
register_reward_builder("function", _build_function, check=_needs_function,
                        label=lambda cfg: f"reward.function={cfg.function!r}")
register_reward_builder("host_function", _build_host_function, check=_needs_function,
                        label=lambda cfg: f"reward.function={cfg.function!r}")


# ----------------------------------------------------------------------------------------------------------------
# The reward-model directory: what experiments/train_reward.py writes and a run's `reward_model` reward reads
# (here, beside the reward models it builds, so that loading one needs nothing from reward training).

HEAD_FILE = "reward_head.json"
_HEAD_FORMAT = "ppojax-reward-head/1"


def _adapter_files() -> tuple:
    from ppojax.models import lora as lora_lib

    return (lora_lib.ADAPTER_CONFIG_FILE, lora_lib.ADAPTER_WEIGHTS_FILE)



def save_reward_model(path: str | os.PathLike, rm) -> Path:
    """Writes ``config.json``, ``model.safetensors`` (the trunk) and ``reward_head.json`` into ``path``; for a
    :class:`ppojax.rewards.LoraRewardModel`, the adapter in PEFT's format (``adapter_config.json`` +
    ``adapter_model.safetensors``) instead of the trunk: the directory then holds no copy of the base.

    Other files in ``path`` (checkpoints, logs, a tokenizer) are left alone, but the other kind's weights are removed.
    ``reward_head.json`` is removed first and written last (atomically), so an interrupted save leaves a directory
    that :func:`load_reward_model` refuses rather than a trunk paired with another model's head.
    """
    import json
    import math
    import shutil
    import tempfile

    from ppojax.io.atomic import atomic_write_json
    from ppojax.io.hub import save_pretrained
    from ppojax.models import family_of
    from ppojax.models import lora as lora_lib

    path = Path(path).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    params = jax.device_get(rm.params)
    is_lora = isinstance(rm, LoraRewardModel)
    kernel = np.asarray(params["head"]["kernel"], np.float32).reshape(-1)
    head = {
        "format": _HEAD_FORMAT,
        "score": "gain * (h_last . kernel + bias) + bias_norm, h_last = final hidden state at the last real token",
        "kernel": [float(x) for x in kernel],
        "bias": float(np.asarray(params["head"]["bias"], np.float32).reshape(-1)[0]),
        "gain": float(np.asarray(rm.gain, np.float32)),
        "bias_norm": float(np.asarray(rm.bias, np.float32)),
    }
    if not all(math.isfinite(v) for v in head["kernel"] + [head["bias"], head["gain"], head["bias_norm"]]):
        raise ValueError("save_reward_model: the head, gain or bias is not finite")
    (path / HEAD_FILE).unlink(missing_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.trunk-", dir=path.parent))
    try:
        if is_lora:
            written = lora_lib.save_adapter(tmp / "trunk", rm.config, params["adapters"], rm.lora)
            (written / "config.json").write_text(json.dumps(family_of(rm.config).hf.config_to_hf(rm.config),
                                                            indent=2) + "\n")
            names, stale = ("config.json",) + _adapter_files(), ("model.safetensors",)
        else:
            written = save_pretrained(tmp / "trunk", rm.config, params)
            names, stale = ("config.json", "model.safetensors"), _adapter_files()
        for name in stale:
            (path / name).unlink(missing_ok=True)
        for name in names:
            os.replace(written / name, path / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    atomic_write_json(path / HEAD_FILE, head, indent=1)
    return path


def _head_number(head: dict, name: str, source: Path, default: float | None = None) -> float:
    import json
    import math

    value = head.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{source}: {name!r} must be a finite number, got {json.dumps(value)}")
    return float(value)


def load_reward_model(path: str | os.PathLike, **config_overrides):
    """A :class:`RewardModel` from a directory written by :func:`save_reward_model`, or a
    :class:`ppojax.rewards.LoraRewardModel` when it holds a LoRA adapter (``adapter_config.json``): its base is the
    PPO run's frozen base, given at scoring time.

    ``config_overrides`` set numerics (``dtype="bfloat16"``...). Raises ``ValueError`` (or ``FileNotFoundError``)
    with one line naming the file and what is wrong.
    """
    import json
    import math

    from ppojax.io.hub import load_pretrained, read_hf_config
    from ppojax.models import family_for_model_type
    from ppojax.models import lora as lora_lib

    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"reward model directory {path} does not exist")
    if not path.is_dir():
        raise ValueError(f"{path} is a file; a reward model is a directory written by experiments/train_reward.py")
    head_file = path / HEAD_FILE
    if not head_file.exists():
        raise ValueError(f"{path} is not a reward model directory (no {HEAD_FILE}); write one with "
                         "experiments/train_reward.py")
    try:
        head = json.loads(head_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{head_file}: not valid JSON ({e.msg})") from None
    if not isinstance(head, dict) or "kernel" not in head or "bias" not in head:
        raise ValueError(f"{head_file}: expected an object with 'kernel', 'bias', 'gain' and 'bias_norm'")
    adapter = (path / lora_lib.ADAPTER_CONFIG_FILE).exists()
    if adapter:
        hf_config, source = read_hf_config(path), str(path / "config.json")
        family = family_for_model_type(hf_config.get("model_type"), source)
        config = family.hf.config_from_hf(hf_config, source=source, **config_overrides)
        spec, adapters = lora_lib.load_adapter(path, config)
    else:
        config, params = load_pretrained(path, **config_overrides)
    kernel = head["kernel"]
    if (not isinstance(kernel, list) or len(kernel) != config.width
            or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in kernel)):
        raise ValueError(f"{head_file}: 'kernel' must be a list of {config.width} finite numbers (the model's width)")
    dtype = config.storage_dtype
    head_params = {"kernel": jnp.asarray(kernel, jnp.float32).reshape(-1, 1).astype(dtype),
                   "bias": jnp.asarray([_head_number(head, "bias", head_file)], jnp.float32).astype(dtype)}
    gain, bias = _head_number(head, "gain", head_file, 1.0), _head_number(head, "bias_norm", head_file, 0.0)
    if adapter:
        return lora_reward_model(config, spec, {"adapters": adapters, "head": head_params}, gain=gain, bias=bias)
    return reward_model(config, {"transformer": params["transformer"], "head": head_params}, gain=gain, bias=bias)
