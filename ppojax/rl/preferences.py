"""Preference data: comparisons of k responses to one query, stored as JSONL text and tokenized on load.

File format (UTF-8 JSONL, one comparison per line; blank lines are skipped)::

    {"query": "The movie was", "responses": [" a joy.", " dull.", " long.", " fine."], "choice": 0}

- ``query``: str, the prompt the responses continue (stored untruncated; cut to the query length on load), or a
  list of chat messages ``{"role", "content"}``, rendered on load through the tokenizer's chat template with the
  generation prompt (``role: content`` lines, then ``assistant:``, for a tokenizer without one).
- ``responses``: a list of ``k >= 2`` non-empty strings. ``k`` is the same on every line of a file (pairs: k = 2;
  lm-human-preferences asked labelers to pick the best of 4).
- ``choice``: the index of the preferred response in ``0 .. k-1``, or ``null`` for a row not labeled yet (what
  ``experiments/sample_for_labels.py`` writes). Training refuses unlabeled rows.
- Any other key (e.g. ``"scores"``, the synthetic labeler's scores) is kept on a round trip and ignored by training.

A response's text is what the policy emitted, EOS included as its text (``<|endoftext|>``), which tokenizes back to
the EOS id. Loading re-tokenizes the text, which for byte-level BPE is not always the sampled token sequence (a
decode/encode round trip may merge tokens differently): the reward model is trained on the canonical tokenization
and scores the policy's raw tokens during PPO, as it would after a human labeled text.

Tokenized layout (:class:`PreferenceBatch`), the same conventions as the PPO rollout: the query is left-padded to
``query_length`` (a longer query keeps its last tokens, as ``ppojax.data.tokenize_prompts`` does), each response is
right-padded to ``response_length`` (a longer one keeps its first tokens), pads are ``tokenizer.pad_token_id``
(distinct from EOS) with mask 0.

Other formats (TRL's preference schema, Anthropic HH-RLHF, OpenAI's summarize-from-feedback) are read into the
same rows by ``ppojax.rl.preference_formats`` (``read_preferences(..., format=...)``).

Every problem in a file raises one :class:`PreferenceError` naming ``file:line``: not JSON, not an object, a missing
or mistyped field, fewer than 2 responses, an empty response, a ``k`` different from the file's first row, a choice
out of range, or (when training) an unlabeled row.

Synthetic labels (:func:`label_comparisons`): a scoring function stands in for the labeler, choosing with
Boltzmann-rational noise ``choice = argmax_j (s_j / T + g_j)``, ``g_j ~ Gumbel(0, 1)``, i.e. ``P(j) = softmax(s / T)_j``
(T = 0: the best response, ties broken at random). Scorers (:func:`text_scorer`): ``vader`` (VADER's compound
polarity of the response text, in [-1, 1]) and ``lexicon`` (the mean VADER-lexicon valence of the response's
tokens, ``ppojax.rewards.lexicon_valence_table``, denser on gibberish).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from ppojax.io.atomic import atomic_write_text
from ppojax.rl.preference_formats import Comparison, PreferenceError, load_preferences, messages_text

__all__ = [
    "Comparison",
    "PreferenceBatch",
    "PreferenceError",
    "choose",
    "label_comparisons",
    "parse_labeler",
    "read_preferences",
    "sample_comparisons",
    "split_preferences",
    "text_scorer",
    "tokenize_preferences",
    "write_preferences",
]

LABELERS = ("vader", "lexicon")


# ----------------------------------------------------------------------------------------------------------------
# Reading and writing text


def read_preferences(path: str | os.PathLike, *, require_choice: bool = True,
                     format: str = "ppojax") -> list[Comparison]:
    """Reads and validates a preference file (see the module docstring). Raises :class:`PreferenceError`.

    Args:
      path: the JSONL file, or ``hf:NAME[:SPLIT]`` (a hub dataset; ``ppojax.rl.preference_formats``).
      require_choice: refuse rows whose ``choice`` is null (training needs labels; labeling does not).
      format: ``ppojax`` (this module's format), ``trl``, ``hh``, ``tldr`` or ``auto`` (detected from the first row;
        ``preference_formats.load_preferences`` also returns the detected name).
    """
    rows, _ = load_preferences(path, format=format, require_choice=require_choice)
    return rows


def write_preferences(path: str | os.PathLike, rows: Iterable[Comparison]) -> Path:
    """Writes rows as JSONL, atomically (a temporary sibling renamed into place)."""
    lines = [json.dumps(row.to_json(), ensure_ascii=False) for row in rows]
    return atomic_write_text(path, "\n".join(lines) + "\n")


# ----------------------------------------------------------------------------------------------------------------
# Tokenized comparisons


@flax.struct.dataclass
class PreferenceBatch:
    """Tokenized comparisons (all int32). ``n`` comparisons of ``k`` responses.

    ``query_ids``/``query_mask``: ``[n, query_length]``, left-padded.
    ``tokens``/``mask``: ``[n, k, response_length]``, right-padded; mask 1 on real tokens (EOS included).
    ``choice``: ``[n]``, the preferred response, -1 where unlabeled.
    """

    query_ids: jax.Array
    query_mask: jax.Array
    tokens: jax.Array
    mask: jax.Array
    choice: jax.Array

    @property
    def n(self) -> int:
        return self.choice.shape[0]

    @property
    def k(self) -> int:
        return self.tokens.shape[1]

    def take(self, index) -> "PreferenceBatch":
        """The comparisons at ``index`` (rows of every field)."""
        return jax.tree.map(lambda x: x[index], self)


def tokenize_preferences(tokenizer: Any, rows: Sequence[Comparison], *, query_length: int, response_length: int,
                         source: str = "preferences") -> PreferenceBatch:
    """Tokenizes comparisons into numpy arrays (host side; see :class:`PreferenceBatch` for the layout).

    A query given as chat messages is rendered by the tokenizer's chat template with the generation prompt (its ids
    exactly ``apply_chat_template(messages, add_generation_prompt=True)``), or, for a tokenizer without a template,
    as ``role: content`` lines then ``assistant:``; a text query is tokenized without special tokens.

    Queries longer than ``query_length`` keep their last tokens, responses longer than ``response_length`` their
    first (one warning says how many were cut). A response that tokenizes to nothing raises.
    """
    if not rows:
        raise PreferenceError(f"{source}: no comparisons to tokenize")
    if query_length < 1 or response_length < 1:
        raise ValueError(f"query_length and response_length must be >= 1, got {query_length}, {response_length}")
    k = rows[0].k
    if any(row.k != k for row in rows):
        raise PreferenceError(f"{source}: comparisons with different k; every comparison must have {k} responses")
    pad = tokenizer.pad_token_id
    if pad is None:
        raise ValueError("the tokenizer has no pad token; load it with ppojax.load_tokenizer")
    n = len(rows)
    query_ids = np.full((n, query_length), pad, np.int32)
    query_mask = np.zeros((n, query_length), np.int32)
    tokens = np.full((n, k, response_length), pad, np.int32)
    mask = np.zeros((n, k, response_length), np.int32)
    encoded_queries = _encode_queries(tokenizer, rows, source)
    encoded_responses = tokenizer([r for row in rows for r in row.responses], add_special_tokens=False)["input_ids"]
    cut_queries = cut_responses = 0
    for i, row in enumerate(rows):
        q = encoded_queries[i]
        if len(q) > query_length:
            q, cut_queries = q[-query_length:], cut_queries + 1
        if q:
            query_ids[i, query_length - len(q):] = q
            query_mask[i, query_length - len(q):] = 1
        for j in range(k):
            r = encoded_responses[i * k + j]
            if not r:
                raise PreferenceError(f"{source}: comparison {i + 1}, response {j} tokenizes to nothing")
            if len(r) > response_length:
                r, cut_responses = r[:response_length], cut_responses + 1
            tokens[i, j, :len(r)] = r
            mask[i, j, :len(r)] = 1
    if cut_queries or cut_responses:
        warnings.warn(
            f"{source}: {cut_queries} of {n} queries longer than {query_length} tokens kept their last tokens, and "
            f"{cut_responses} of {n * k} responses longer than {response_length} tokens kept their first",
            stacklevel=2,
        )
    choice = np.asarray([-1 if row.choice is None else row.choice for row in rows], np.int32)
    return PreferenceBatch(query_ids=query_ids, query_mask=query_mask, tokens=tokens, mask=mask, choice=choice)


def _encode_queries(tokenizer: Any, rows: Sequence[Comparison], source: str) -> list[list[int]]:
    chat = [i for i, row in enumerate(rows) if not isinstance(row.query, str)]
    template = bool(getattr(tokenizer, "chat_template", None))
    texts = [row.query if isinstance(row.query, str) else messages_text(row.query) for row in rows]
    if template:  # the template's rows are encoded on their own below; keep the batch call to the text ones
        texts = [t if isinstance(row.query, str) else "" for t, row in zip(texts, rows)]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    if template:
        for i in chat:
            try:
                ids = tokenizer.apply_chat_template([dict(m) for m in rows[i].query], add_generation_prompt=True,
                                                    tokenize=True)
            except Exception as e:  # noqa: BLE001 -- a template error (e.g. a role it refuses) is the data's
                raise PreferenceError(f"{source}: comparison {i + 1}: the chat template cannot render its prompt "
                                      f"({type(e).__name__}: {str(e).strip()[:160]})") from None
            if hasattr(ids, "keys"):  # a BatchEncoding (transformers >= 5 returns one)
                ids = ids["input_ids"]
            encoded[i] = [int(t) for t in ids]
    return encoded


def split_preferences(batch: PreferenceBatch, val_fraction: float, seed: int) -> tuple[PreferenceBatch,
                                                                                       Optional[PreferenceBatch]]:
    """A seeded random split into ``(train, validation)``; ``validation`` is None when ``val_fraction`` is 0.

    ``round(n * val_fraction)`` comparisons (at least 1 when the fraction is positive) go to validation; the same
    ``(n, val_fraction, seed)`` always gives the same split.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    n = batch.n
    n_val = 0 if val_fraction == 0 else max(1, int(round(n * val_fraction)))
    if n - n_val < 1:
        raise PreferenceError(f"{n} comparisons leave none for training with val_fraction={val_fraction}")
    order = np.random.default_rng(seed).permutation(n)
    train = batch.take(np.sort(order[n_val:]))
    return train, (batch.take(np.sort(order[:n_val])) if n_val else None)


# ----------------------------------------------------------------------------------------------------------------
# Sampling comparisons from a policy


def sample_comparisons(config, params, tokenizer, queries: Sequence[str], *, k: int, query_length: int,
                       response_length: int, key: jax.Array, temperature: float = 1.0, top_k: int = 0,
                       top_p: float = 1.0, eos_token_id: Optional[int] = None,
                       batch_size: int = 64) -> list[Comparison]:
    """``k`` responses to each query from the policy (``ppojax.generate``), unlabeled.

    Queries are left-padded to ``query_length`` (longer ones keep their last tokens, as in PPO). Rows go through the
    sampler in fixed batches of ``batch_size`` (the last one padded by repetition, so it compiles once); each row's
    randomness is seeded by its global index, so the samples do not depend on ``batch_size``. Response text keeps
    special tokens (an emitted EOS reads ``<|endoftext|>``) and drops the padding after it.
    """
    from ppojax.io.data import tokenize_prompts
    from ppojax.generate.sampling import generate

    if k < 2:
        raise ValueError(f"k must be >= 2 responses per query, got {k}")
    q_ids, q_mask = tokenize_prompts(tokenizer, list(queries), query_length, "left", "queries")
    q_ids, q_mask = np.repeat(q_ids, k, axis=0), np.repeat(q_mask, k, axis=0)  # [n * k, Q]: query i, sample j
    rows = q_ids.shape[0]
    batch_size = min(batch_size, rows)
    texts: list[str] = []
    for start in range(0, rows, batch_size):
        index = np.arange(start, start + batch_size)
        index = np.where(index < rows, index, index % rows)  # pad the last batch by repetition
        out = generate(config, params, q_ids[index], q_mask[index], key, max_new_tokens=response_length,
                       temperature=temperature, top_k=top_k, top_p=top_p, eos_token_id=eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, example_ids=jnp.asarray(index, jnp.int32))
        tokens, mask = jax.device_get((out.tokens, out.mask))
        keep = min(batch_size, rows - start)
        texts += tokenizer.batch_decode([t[m > 0].tolist() for t, m in zip(tokens[:keep], mask[:keep])],
                                        skip_special_tokens=False)
    return [Comparison(query=q, responses=tuple(texts[i * k:(i + 1) * k]), choice=None)
            for i, q in enumerate(queries)]


# ----------------------------------------------------------------------------------------------------------------
# Synthetic labels


def choose(scores: np.ndarray, *, temperature: float, rng: np.random.Generator) -> np.ndarray:
    """Boltzmann-rational choices ``[n]`` from scores ``[n, k]``: ``argmax_j (s_j / T + g_j)``, ``g ~ Gumbel(0, 1)``.

    The Gumbel-max trick makes ``P(choice = j) = softmax(s / T)_j``, the Bradley-Terry / Plackett-Luce labeler the
    reward model's loss assumes. ``T = 0`` picks the best response, breaking ties uniformly at random (a constant
    tie-break would label "response 0" whenever the scorer sees no difference).
    """
    scores = np.asarray(scores, np.float64)
    if scores.ndim != 2 or scores.shape[1] < 2:
        raise ValueError(f"scores must be [n, k >= 2], got shape {scores.shape}")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores must be finite")
    if temperature < 0 or not math.isfinite(temperature):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if temperature == 0:
        best = scores == scores.max(axis=1, keepdims=True)
        return np.argmax(np.where(best, rng.random(scores.shape), -1.0), axis=1).astype(np.int32)
    return np.argmax(scores / temperature + rng.gumbel(size=scores.shape), axis=1).astype(np.int32)


def parse_labeler(spec: str) -> tuple[str, float]:
    """``'vader'`` / ``'lexicon'``, optionally with a noise temperature: ``'vader:0.1'`` -> ``('vader', 0.1)``."""
    name, _, temp = spec.partition(":")
    if name not in LABELERS:
        raise ValueError(f"unknown labeler {name!r}; use one of {', '.join(LABELERS)}, optionally ':T' (noise)")
    try:
        temperature = float(temp) if temp else 0.0
    except ValueError:
        raise ValueError(f"labeler {spec!r}: the noise temperature after ':' must be a number") from None
    if temperature < 0 or not math.isfinite(temperature):
        raise ValueError(f"labeler {spec!r}: the noise temperature must be >= 0")
    return name, temperature


def text_scorer(name: str, tokenizer: Any = None, *, vocab_size: Optional[int] = None) -> Callable[[Sequence[str]],
                                                                                                    np.ndarray]:
    """A scorer ``texts -> [n] float32``: the synthetic labeler's preference, and the pipeline's "true" score.

    ``vader``: VADER's compound polarity of the text, in [-1, 1].
    ``lexicon``: the mean per-token VADER-lexicon valence (``lexicon_valence_table``, in [-1, 1]) over the text's
    tokens under ``tokenizer``, the same quantity as ``ppojax.rewards.LexiconReward`` on those tokens; ids at or
    beyond ``vocab_size`` (the pad) count 0.
    """
    from ppojax.rl import rewards

    if name == "vader":
        return rewards.vader_text_reward()
    if name == "lexicon":
        if tokenizer is None:
            raise ValueError("the lexicon scorer needs the tokenizer")
        table = rewards.lexicon_valence_table(tokenizer, vocab_size=vocab_size)

        def lexicon_mean(texts: Sequence[str]) -> np.ndarray:
            encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
            out = np.zeros((len(encoded),), np.float32)
            for i, ids in enumerate(encoded):
                ids = np.asarray(ids, np.int64)
                if ids.size:
                    out[i] = np.where(ids < table.shape[0], table[np.minimum(ids, table.shape[0] - 1)], 0.0).mean()
            return out

        return lexicon_mean
    raise ValueError(f"unknown scorer {name!r}; use one of {', '.join(LABELERS)}")


def label_comparisons(rows: Sequence[Comparison], scorer: Callable[[Sequence[str]], np.ndarray], *,
                      temperature: float = 0.0, seed: int = 0) -> list[Comparison]:
    """Fills every row's ``choice`` from ``scorer`` on its responses (:func:`choose`), and records the scores in the
    row's ``"scores"`` field (for audits; training ignores it)."""
    if not rows:
        return []
    k = rows[0].k
    if any(row.k != k for row in rows):
        raise PreferenceError("comparisons with different k cannot be labeled together")
    flat = scorer([r for row in rows for r in row.responses])
    scores = np.asarray(flat, np.float32).reshape(len(rows), k)
    choices = choose(scores, temperature=temperature, rng=np.random.default_rng(seed))
    return [dataclasses.replace(row, choice=int(c), extra={**row.extra, "scores": [float(s) for s in sc]})
            for row, c, sc in zip(rows, choices, scores)]
