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

Shaping (lm-human-preferences, Ziegler et al. 2019, https://arxiv.org/abs/1909.08593; TRL PPO):
:func:`shape_rewards` turns scores into per-token rewards ``r_t = -beta * kl_t + [t == last] * score``;
:func:`truncate_after_stop`, :func:`penalize_missing` and :func:`missing_eos_penalty` are the response
post-processing of lm-human-preferences and TRL.
"""

from __future__ import annotations

import importlib.util
import numbers
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from ppojax.rl.losses import kl_estimate

__all__ = [
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


def host_reward_from_text(text_fn: Callable[[list[str]], Any], tokenizer: Any) -> HostRewardFn:
    """Adapts a text scorer ``text_fn(texts) -> [n] numbers`` into a host reward on ``(tokens, mask)``.

    Each response is decoded from its real tokens only (``mask > 0``) with ``skip_special_tokens=True`` (so EOS
    is not part of the text). The scorer's output is checked (numeric, length n, finite) and returned as
    ``[n]`` float32; a bad output raises TypeError/ValueError naming the scorer.
    """
    name = _reward_name(text_fn)

    def host_reward(tokens: Any, mask: Any) -> np.ndarray:
        tokens = np.asarray(tokens)
        mask = np.asarray(mask)
        if tokens.ndim != 2 or tokens.shape != mask.shape:
            raise ValueError(f"tokens and mask must both be [batch, time], got {tokens.shape} and {mask.shape}")
        responses = [row[keep > 0].tolist() for row, keep in zip(tokens, mask)]
        texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
        return _validate_host_scores(text_fn(texts), len(texts), name)

    host_reward.__name__ = host_reward.__qualname__ = f"host_reward_from_text({name})"
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
