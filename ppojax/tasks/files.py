"""Tasks whose rows come from a prompt file or a dataset: ``file`` (with an optional answer field) and
``sentiment`` (the default run: the ``prompts:`` file, scored by the ``reward:`` section).

Rows come from ``prompts.path`` (a ``.txt`` file, one prompt per line, or ``.jsonl`` with ``prompts.field``) or
``prompts.dataset``. The held-out rows come from ``eval_path`` (a file of the same kind) when given; otherwise,
when the run evaluates (``eval.num_prompts > 0``), ``eval.num_prompts`` distinct prompts are split off after a
shuffle seeded by ``split_seed``, and the training rows are the rest (every copy of a held-out prompt leaves the
training rows). Without evaluation, every row trains, exactly as before tasks existed.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Optional

from ppojax.tasks.base import Row, Task, TaskContext, is_prompt, register_task
from ppojax.tasks.verify import is_correct


def read_rows(path: Path, field: str, target_field: Optional[str] = None,
              target_extract: Optional[str] = None) -> list[Row]:
    """Rows of a ``.txt`` (one prompt per line; no targets) or ``.jsonl`` file. ``field`` holds the prompt (a
    string, or a list of chat messages); ``target_field`` the answer (its number after ``####`` when
    ``target_extract='after_hash'``). One ValueError naming the file and line for a malformed row."""
    from ppojax.io.data import jsonl_rows, read_text_file

    text = read_text_file(path, "prompt file", "a .txt or .jsonl file")
    if path.suffix != ".jsonl":
        if target_field:
            raise ValueError(f"{path}: a target field needs a .jsonl file (task.kwargs.target_field="
                             f"{target_field!r})")
        rows = [Row(line) for line in text.splitlines() if line.strip()]
    else:
        rows = []
        for n, obj in jsonl_rows(path, text, field):
            prompt = obj[field]
            if not is_prompt(prompt):
                raise ValueError(f"{path}:{n}: field {field!r} must be a non-empty string or a list of "
                                 "{'role', 'content'} messages")
            target = None
            if target_field:
                if target_field not in obj:
                    raise ValueError(f"{path}:{n}: the answer field {target_field!r} is missing "
                                     "(task.kwargs.target_field)")
                target = _target(obj[target_field], target_extract, f"{path}:{n}")
            rows.append(Row(prompt, target))
    if not rows:
        raise ValueError(f"prompt file {path} holds no prompts (empty, or only blank lines)")
    return rows


def _target(value, extract: Optional[str], where: str) -> str:
    from ppojax.tasks.verify import extractor

    if isinstance(value, bool) or not isinstance(value, (str, int, float)) or not str(value).strip():
        raise ValueError(f"{where}: the answer must be a non-empty string or a number, got {value!r}")
    if extract is None:
        return str(value).strip()
    answer = extractor(extract)(str(value))
    if answer is None:
        raise ValueError(f"{where}: no answer could be read from {str(value)[-60:]!r} ({extract})")
    return answer


def dataset_rows(dataset: str, split: str, field: str, target_field: Optional[str] = None,
                 target_extract: Optional[str] = None) -> list[Row]:
    """Rows of a Hugging Face dataset (needs ``datasets`` and the hub)."""
    from ppojax.io.data import load_dataset_columns, load_dataset_prompts

    if not target_field:
        return [Row(p) for p in load_dataset_prompts(dataset, split, field)]
    prompts, targets = load_dataset_columns(dataset, split, [field, target_field])
    return [Row(str(p), _target(t, target_extract, f"{dataset} row {i}"))
            for i, (p, t) in enumerate(zip(prompts, targets)) if str(p).strip()]


def source_rows(ctx: TaskContext, target_field: Optional[str] = None,
                target_extract: Optional[str] = None) -> tuple[list[Row], str]:
    """The rows of the config's ``prompts:`` source, and its name."""
    from ppojax.io.data import resolve_path

    p = ctx.prompts
    if p is None or (not p.path and not p.dataset):
        raise ValueError("prompts.path is not set: give a .txt or .jsonl prompt file (or prompts.dataset)")
    if p.dataset:
        return dataset_rows(p.dataset, p.split, p.field, target_field, target_extract), p.dataset
    path = resolve_path(p.path, ctx.config_dir)
    return read_rows(path, p.field, target_field, target_extract), str(path)


def split_rows(ctx: TaskContext, rows: list[Row], eval_path: Optional[str], field: str,
               target_field: Optional[str], target_extract: Optional[str], split_seed: int):
    """``(train, eval)``: ``eval_path``'s rows held out, else ``ctx.num_eval`` distinct prompts split off."""
    from ppojax.io.data import resolve_path

    if eval_path:
        held = read_rows(resolve_path(eval_path, ctx.config_dir), field, target_field, target_extract)
        return rows, held
    if ctx.num_eval <= 0:
        return rows, []
    keys = sorted({row.key() for row in rows})
    if len(keys) <= ctx.num_eval:
        raise ValueError(f"the prompt source has {len(keys)} distinct prompts: too few to hold out eval.num_prompts="
                         f"{ctx.num_eval} and still train; lower eval.num_prompts or give task.kwargs.eval_path")
    random.Random(f"ppojax-split-{split_seed}").shuffle(keys)
    held_keys = set(keys[:ctx.num_eval])
    first = {}
    for row in rows:
        if row.key() in held_keys:
            first.setdefault(row.key(), row)
    return [row for row in rows if row.key() not in held_keys], [first[k] for k in keys[:ctx.num_eval]]


@register_task("file")
def file_task(ctx: TaskContext, *, target_field: Optional[str] = None, target_extract: Optional[str] = None,
              extract: str = "last_number", eval_path: Optional[str] = None, split_seed: int = 0) -> Task:
    """Prompts from ``prompts.path`` / ``prompts.dataset``; with ``target_field``, a verifiable task scored by
    ``exact_answer`` (its answer read from the response by ``extract``).

    Args:
      target_field: the JSONL field (dataset column) holding each prompt's answer; None: no answers (score with
        the ``reward:`` section).
      target_extract: read the target out of that field with this extractor (``after_hash`` for GSM8K-style
        solutions); None: the field is the answer.
      extract: how the verifier reads the response's answer (``last_number``, ``after_hash``, ``boxed``,
        ``last_word``).
      eval_path: a file of held-out prompts (same format); None: split ``eval.num_prompts`` off the source.
      split_seed: the seed of that split.
    """
    from ppojax.tasks.verify import extractor

    extractor(extract)
    if target_extract is not None:
        extractor(target_extract)
    rows, source = source_rows(ctx, target_field, target_extract)
    train, held = split_rows(ctx, rows, eval_path, ctx.prompts.field, target_field, target_extract, split_seed)
    verifiable = target_field is not None
    return Task(train=train, eval=held, verifiable=verifiable, source=source,
                reward="exact_answer" if verifiable else None,
                reward_kwargs={"extract": extract} if verifiable else {},
                correct=(lambda response, target: is_correct(response, target, extract)) if verifiable else None)


@register_task("sentiment")
def sentiment(ctx: TaskContext, *, eval_path: Optional[str] = None, split_seed: int = 0) -> Task:
    """The default run as a task: continue the ``prompts:`` file, scored by the ``reward:`` section (VADER's
    lexicon by default). Evaluation, when on, reports ``eval/score_mean`` on held-out prompts (``eval_path``, or
    ``eval.num_prompts`` split off the file)."""
    rows, source = source_rows(ctx)
    train, held = split_rows(ctx, rows, eval_path, ctx.prompts.field, None, None, split_seed)
    return Task(train=train, eval=held, source=source)
