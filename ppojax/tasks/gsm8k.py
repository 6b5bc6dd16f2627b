"""``gsm8k``: grade-school math word problems in the GSM8K schema.

Each row has ``question`` and ``answer``, the answer's worked solution ending in ``#### N``; the target is ``N``
(commas dropped). The verifier reads the last number of the response (``extract``), so a response that ends with
"... so she has 18 apples." or "#### 18" is correct. Rows come from a JSONL file (``path``, or ``prompts.path``)
or, when the hub is reachable, the ``datasets`` id ``openai/gsm8k`` (config ``main``): train split for training,
test split for evaluation. ``instruction`` is appended to each question (the prompt is ``question + instruction``).
"""

from __future__ import annotations

from typing import Optional

from ppojax.tasks.base import Row, Task, TaskContext, register_task
from ppojax.tasks.files import read_rows, split_rows
from ppojax.tasks.verify import is_correct

INSTRUCTION = "\nGive the final answer as a number after ####."


def _hub_rows(dataset: str, split: str, limit: Optional[int]) -> list[Row]:
    try:
        from datasets import load_dataset
    except ImportError:
        raise ValueError("gsm8k from the hub needs the `datasets` package (pip install datasets), or give "
                         "task.kwargs.path: a JSONL file of {question, answer} rows") from None
    try:
        ds = load_dataset(dataset, "main", split=split)
    except Exception as e:
        raise ValueError(f"could not load {dataset!r} split {split!r} ({type(e).__name__}: {e}); offline, give "
                         "task.kwargs.path: a JSONL file of {question, answer} rows") from None
    from ppojax.tasks.verify import after_hash

    rows = [Row(q, after_hash(a)) for q, a in zip(ds["question"], ds["answer"])]
    return rows[:limit] if limit else rows


@register_task("gsm8k")
def gsm8k(ctx: TaskContext, *, path: Optional[str] = None, eval_path: Optional[str] = None,
          dataset: str = "openai/gsm8k", instruction: str = INSTRUCTION, extract: str = "last_number",
          split_seed: int = 0, limit: Optional[int] = None) -> Task:
    """GSM8K (the module docstring).

    Args:
      path: a JSONL file of ``{"question": ..., "answer": "... #### N"}`` rows (default ``prompts.path``; neither:
        ``dataset`` from the hub).
      eval_path: held-out rows in the same schema; None: ``eval.num_prompts`` split off ``path`` (from the hub:
        the test split).
      dataset: the hub dataset id (config ``main``).
      instruction: appended to every question.
      extract: how the verifier reads the response's answer.
      split_seed: the seed of the held-out split.
      limit: use only the first this many training rows.
    """
    from ppojax.io.data import resolve_path

    path = path or (ctx.prompts.path if ctx.prompts is not None else None)
    if path:
        rows = read_rows(resolve_path(path, ctx.config_dir), "question", "answer", "after_hash")
        rows = rows[:limit] if limit else rows
        train, held = split_rows(ctx, rows, eval_path, "question", "answer", "after_hash", split_seed)
        source = str(path)
    else:
        train = _hub_rows(dataset, "train", limit)
        held = (read_rows(resolve_path(eval_path, ctx.config_dir), "question", "answer", "after_hash")
                if eval_path else _hub_rows(dataset, "test", ctx.num_eval or None))
        source = dataset
    add = lambda rows: [Row(r.prompt + instruction, r.target) for r in rows]  # noqa: E731
    return Task(train=add(train), eval=add(held), reward="exact_answer", reward_kwargs={"extract": extract},
                verifiable=True, correct=lambda response, target: is_correct(response, target, extract),
                source=source)
