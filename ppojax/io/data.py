"""Prompt data: load, validate and tokenize once on the host, then serve left-padded batches in a seeded order.

The order is a pure function of ``(seed, iteration)``: pass ``p`` reshuffles with ``fold(seed, p)``, and iteration
``i`` takes rows ``[i * batch, (i + 1) * batch)`` of the concatenated passes. A resumed run therefore sees exactly
the batches an uninterrupted run would, with nothing to save but the iteration number.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np


class PromptError(ValueError):
    """A prompt source that cannot be used; the message names the file, the line and the fix."""


def read_text_file(path: Path, what: str, expected: str, error: type = ValueError) -> str:
    """The UTF-8 text of a data file, or one ``error`` naming ``what`` it is and what is wrong with it."""
    if not path.exists():
        raise error(f"{what} {path} does not exist")
    if path.is_dir():
        raise error(f"{what} {path} is a directory; expected {expected}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{what} {path} is not UTF-8 text ({e.reason})") from None


def jsonl_file_objects(path: Path, rows: str, what: str) -> list:
    """``[(where, object)]`` of each non-blank line of a ``.jsonl`` file (``where`` is ``file:line``), the file read
    as ``what``; ValueError, one line, for another suffix, an unreadable file or a line that is not JSON. ``rows``
    names what the lines are (for the suffix message), ``what`` the file (for the read errors)."""
    if path.suffix != ".jsonl":
        raise ValueError(f"{path}: {rows} are a .jsonl file (one object per line)")
    text = read_text_file(path, what, "a .jsonl file")
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append((f"{path}:{n}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    return out


def jsonl_rows(path: Path, text: str, field: str):
    """``(line number, object)`` of each non-blank line of a JSONL file's ``text``; PromptError naming the file and
    line for a line that is not a JSON object holding ``field`` (``prompts.field``)."""
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise PromptError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict) or field not in obj:
            raise PromptError(f"{path}:{n}: expected an object with a {field!r} field (prompts.field)")
        yield n, obj


def read_prompts(path: str | Path, field: str = "prompt") -> List[str]:
    """Prompts from a text file (one per line, blank lines skipped) or a JSONL file (``field`` of each object)."""
    path = Path(path)
    text = read_text_file(path, "prompt file", "a .txt or .jsonl file", PromptError)
    prompts: List[str] = []
    if path.suffix == ".jsonl":
        for n, obj in jsonl_rows(path, text, field):
            if not isinstance(obj[field], str) or not obj[field].strip():
                raise PromptError(f"{path}:{n}: field {field!r} must be a non-empty string")
            prompts.append(obj[field])
    else:
        prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise PromptError(f"prompt file {path} holds no prompts (empty, or only blank lines)")
    return prompts


def load_dataset_columns(dataset: str, split: str, columns: Sequence[str]) -> List[list]:
    """The named columns of a Hugging Face dataset split (optional dependency ``datasets``; needs the hub or its
    cache); PromptError for a missing package, an unloadable dataset or a missing column."""
    try:
        from datasets import load_dataset
    except ImportError:
        raise PromptError("prompts.dataset needs the `datasets` package: pip install datasets") from None
    try:
        ds = load_dataset(dataset, split=split)
    except Exception as e:
        raise PromptError(f"could not load dataset {dataset!r} split {split!r}: {type(e).__name__}: {e}") from e
    for name in columns:
        if name not in ds.column_names:
            raise PromptError(f"dataset {dataset!r} has no column {name!r}; columns: {ds.column_names}")
    return [list(ds[name]) for name in columns]


def load_dataset_prompts(dataset: str, split: str, field: str) -> List[str]:
    """Prompts from a Hugging Face dataset (optional dependency ``datasets``)."""
    (column,) = load_dataset_columns(dataset, split, [field])
    return [str(x) for x in column if str(x).strip()]


def tokenize_prompts(tokenizer, prompts: Sequence[str], max_tokens: int, truncate: str = "left",
                     source: str = "prompts") -> Tuple[np.ndarray, np.ndarray]:
    """Left-padded ``(ids, mask)`` int32 arrays ``[n, max_tokens]``; too-long prompts keep their last tokens (with
    one warning giving their count) or raise (``truncate='error'``), naming the prompt."""
    rows = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in prompts]
    return left_pad(rows, tokenizer.pad_token_id, max_tokens, truncate, source, prompts)


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, max_tokens: int, truncate: str, source: str,
             texts: Sequence[str]) -> Tuple[np.ndarray, np.ndarray]:
    """Token-id rows as left-padded ``(ids, mask)`` int32 ``[n, max_tokens]``: a longer row keeps its last tokens
    (one warning for all of them) or raises PromptError (``truncate='error'``) naming the prompt ``texts[i]``."""
    ids = np.full((len(rows), max_tokens), pad_id, np.int32)
    mask = np.zeros((len(rows), max_tokens), np.int32)
    cut = 0
    for i, toks in enumerate(rows):
        if not toks:
            raise PromptError(f"{source}: prompt {i + 1} tokenizes to nothing: {texts[i]!r}")
        if len(toks) > max_tokens:
            if truncate == "error":
                raise PromptError(
                    f"{source}: prompt {i + 1} has {len(toks)} tokens, more than prompts.max_prompt_tokens="
                    f"{max_tokens}: {str(texts[i])[:60]!r}...; shorten it, raise max_prompt_tokens, or set "
                    "prompts.truncate=left"
                )
            toks = toks[-max_tokens:]
            cut += 1
        ids[i, max_tokens - len(toks):] = toks
        mask[i, max_tokens - len(toks):] = 1
    if cut:
        warnings.warn(f"{source}: {cut} of {len(rows)} prompts are longer than {max_tokens} tokens; each keeps "
                      f"its last {max_tokens} (raise the limit, or refuse them with prompts.truncate=error)",
                      stacklevel=3)
    return ids, mask


class PromptLoader:
    """Serves ``[batch, max_tokens]`` batches as a pure function of the iteration (see the module docstring).

    ``process_index``/``process_count`` give each process of a multi-host run its own contiguous slice of every
    global batch.
    """

    def __init__(self, ids: np.ndarray, mask: np.ndarray, batch_size: int, seed: int, shuffle: bool = True,
                 process_index: int = 0, process_count: int = 1):
        if batch_size % process_count:
            raise ValueError(f"batch_size={batch_size} does not split over {process_count} processes")
        self.ids, self.mask = ids, mask
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.process_index, self.process_count = process_index, process_count

    def __len__(self) -> int:
        return self.ids.shape[0]

    def _order(self, epoch: int) -> np.ndarray:
        n = len(self)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, epoch]).permutation(n)

    def indices(self, iteration: int) -> np.ndarray:
        """Global row indices of the batch of ``iteration`` (all processes)."""
        n = len(self)
        start = iteration * self.batch_size
        out = np.empty(self.batch_size, np.int64)
        for j in range(self.batch_size):
            epoch, pos = divmod(start + j, n)
            if j == 0 or pos == 0:
                order = self._order(epoch)
            out[j] = order[pos]
        return out

    def batch(self, iteration: int) -> Tuple[np.ndarray, np.ndarray]:
        """This process's share ``(ids, mask)`` of the global batch of ``iteration``."""
        idx = self.indices(iteration)
        share = self.batch_size // self.process_count
        idx = idx[self.process_index * share:(self.process_index + 1) * share]
        return self.ids[idx], self.mask[idx]


def resolve_path(path: str, config_dir: Optional[Path]) -> Path:
    """A relative path is looked up next to the config file first, then in the working directory."""
    p = Path(path).expanduser()
    if p.is_absolute():
        return p
    if config_dir is not None and (config_dir / p).exists():
        return config_dir / p
    return p
