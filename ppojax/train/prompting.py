"""A run's task on the host: its rows rendered (plain or through the chat template), tokenized and left-padded,
the reward it scores with, the targets by prompt, and the stop sequences. All of it is built and checked before
the model is loaded or anything compiles.

Chat rendering: a row's prompt becomes ``[system?, {"role": "user", "content": prompt}]`` (a prompt that is already
a message list is used as it is, after the optional system message) and its ids are exactly
``tokenizer.apply_chat_template(messages, add_generation_prompt=True)``: the template's own special tokens, no
extra BOS, nothing re-tokenized from text.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ppojax.io.data import PromptError, left_pad


class TaskInputError(ValueError):
    """A task, prompt or rendering problem, said in one line."""


@dataclasses.dataclass(frozen=True)
class RunTask:
    """The task of a run, tokenized: training and held-out prompts as left-padded ``[n, P]`` int32 arrays."""

    task: Any
    """The built ``ppojax.tasks.Task``."""
    train_ids: np.ndarray
    train_mask: np.ndarray
    eval_ids: np.ndarray
    eval_mask: np.ndarray
    eval_targets: tuple
    """The held-out rows' targets (None for an unverifiable task's rows)."""
    eval_prompts: tuple
    """The held-out rows' prompts as the model sees them (rendered text)."""
    targets: Optional[dict]
    """Target by prompt key (``prompt_key``), for the reward; None when the task has no targets."""

    def targets_of(self, prompt_ids: np.ndarray, prompt_mask: np.ndarray) -> list:
        """The target of each tokenized prompt ``[n, P]`` (a prompt not of this task raises KeyError)."""
        if self.targets is None:
            raise KeyError("the task has no targets")
        out = []
        for ids, mask in zip(np.asarray(prompt_ids), np.asarray(prompt_mask)):
            key = prompt_key(ids, mask)
            if key not in self.targets:
                raise KeyError("a prompt that is not one of the task's was scored against the task's targets")
            out.append(self.targets[key])
        return out


def prompt_key(ids: np.ndarray, mask: np.ndarray) -> bytes:
    """A tokenized prompt's identity: its real token ids (padding and its width ignored)."""
    return np.asarray(ids)[np.asarray(mask) > 0].astype(np.int32).tobytes()


def task_context(cfg, config_dir: Optional[Path]):
    from ppojax.tasks import TaskContext

    return TaskContext(prompts=cfg.prompts, config_dir=config_dir, seed=cfg.seed,
                       num_eval=cfg.eval.num_prompts if cfg.eval.every > 0 else 0)


def build_task(cfg, config_dir: Optional[Path]):
    """The config's task, built and checked; TaskInputError (one line) otherwise."""
    from ppojax.io.data import PromptError
    from ppojax.tasks import TaskError, build_task as build

    try:
        task = build(cfg.task.name, task_context(cfg, config_dir), cfg.task.kwargs)
    except (TaskError, PromptError) as e:
        raise TaskInputError(str(e)) from None
    if cfg.eval.every > 0 and not task.eval:
        raise TaskInputError(f"eval.every={cfg.eval.every}: the task {cfg.task.name!r} has no held-out prompts "
                             "(give it some, e.g. task.kwargs.eval_path, or set eval.every: 0)")
    return task


def reward_config(cfg, task):
    """The reward section the run scores with: the config's, or, with ``reward.kind: null``, the task's reward
    (``lexicon`` for a task without one) with the task's kwargs under the config's."""
    from ppojax.rl.rewards import check_reward_config

    r = cfg.reward
    if r.kind is not None:
        return r
    kind = task.reward or "lexicon"
    kwargs = {**dict(task.reward_kwargs), **dict(r.kwargs)} if task.reward else dict(r.kwargs)
    resolved = dataclasses.replace(r, kind=kind, kwargs=kwargs)
    try:
        check_reward_config(resolved)
    except ValueError as e:
        raise TaskInputError(f"task {cfg.task.name!r} scores with reward.kind={kind!r}: {e}") from None
    return resolved


def chat_messages(prompt, system: Optional[str]) -> list:
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
    if system is not None:
        messages = [{"role": "system", "content": system}] + [m for m in messages if m.get("role") != "system"]
    return messages


def _ids_of(encoded) -> list:
    """Token ids from what ``apply_chat_template(..., tokenize=True)`` returns (a list, or a BatchEncoding)."""
    if isinstance(encoded, dict) or hasattr(encoded, "keys"):
        encoded = encoded["input_ids"]
    return [int(t) for t in encoded]


def encode(tokenizer, prompt, *, chat: bool, system: Optional[str], where: str) -> list:
    """One prompt's token ids: plain text tokenized without special tokens, or the chat template's rendering."""
    if chat:
        try:
            return _ids_of(tokenizer.apply_chat_template(chat_messages(prompt, system), add_generation_prompt=True,
                                                         tokenize=True))
        except ImportError as e:  # transformers renders templates with jinja2, an optional dependency of its own
            raise TaskInputError(f"prompts.chat: rendering the chat template needs jinja2, which is not installed "
                                 f"(pip install 'jinja2>=3.1'; ppojax's install requires it): {e}") from None
        except Exception as e:  # noqa: BLE001 -- a template error (e.g. a role it refuses) is the user's input
            raise TaskInputError(f"{where}: the chat template cannot render it ({type(e).__name__}: "
                                 f"{str(e).strip()[:160]})") from None
    if not isinstance(prompt, str):
        raise TaskInputError(f"{where}: a prompt given as chat messages needs prompts.chat: true")
    return tokenizer(prompt, add_special_tokens=False)["input_ids"]


def check_chat(cfg, tokenizer) -> None:
    if cfg.prompts.chat and not getattr(tokenizer, "chat_template", None):
        raise TaskInputError(f"prompts.chat: true, but the tokenizer {cfg.tokenizer!r} has no chat template (a "
                             "base model's): set prompts.chat: false, or use an instruct model's tokenizer")


def tokenize_rows(cfg, tokenizer, rows, what: str):
    p = cfg.prompts
    encoded = [encode(tokenizer, row.prompt, chat=p.chat, system=p.system, where=f"{what}: prompt {i + 1}")
               for i, row in enumerate(rows)]
    texts = [row.key() for row in rows]
    try:
        return left_pad(encoded, tokenizer.pad_token_id, p.max_prompt_tokens, p.truncate, what, texts)
    except PromptError as e:
        raise TaskInputError(str(e)) from None


def tokenize_task(cfg, tokenizer, task) -> RunTask:
    """The task's rows as token arrays, with the target table (checked: one target per distinct prompt)."""
    check_chat(cfg, tokenizer)
    source = task.source or f"task {cfg.task.name!r}"
    train_ids, train_mask = tokenize_rows(cfg, tokenizer, task.train, source)
    if task.eval:
        eval_ids, eval_mask = tokenize_rows(cfg, tokenizer, task.eval, f"{source} (held out)")
    else:
        eval_ids = np.zeros((0, cfg.prompts.max_prompt_tokens), np.int32)
        eval_mask = np.zeros_like(eval_ids)
    targets = None
    if any(row.target is not None for row in (*task.train, *task.eval)):
        targets = {}
        for rows, ids, mask in ((task.train, train_ids, train_mask), (task.eval, eval_ids, eval_mask)):
            for row, i, m in zip(rows, ids, mask):
                key = prompt_key(i, m)
                if targets.setdefault(key, row.target) != row.target:
                    raise TaskInputError(f"{source}: the prompt {row.key()[:60]!r} appears with two answers "
                                         f"({targets[key]!r} and {row.target!r}) after tokenization")
    train_keys = {prompt_key(i, m) for i, m in zip(train_ids, train_mask)}
    overlap = [row for row, i, m in zip(task.eval, eval_ids, eval_mask) if prompt_key(i, m) in train_keys]
    if overlap:
        raise TaskInputError(f"{source}: {len(overlap)} held-out prompts are training prompts once tokenized "
                             f"(first: {overlap[0].key()[:60]!r}, e.g. cut to prompts.max_prompt_tokens); raise "
                             "max_prompt_tokens or change the held-out set")
    eval_prompts = tuple(tokenizer.decode(i[m > 0], skip_special_tokens=False) for i, m in zip(eval_ids, eval_mask))
    return RunTask(task=task, train_ids=train_ids, train_mask=train_mask, eval_ids=eval_ids, eval_mask=eval_mask,
                   eval_targets=tuple(row.target for row in task.eval), eval_prompts=eval_prompts, targets=targets)


def stop_token_ids(cfg, tokenizer) -> tuple:
    """``prompts.stop`` strings as token sequences (their tokenization), appended to ``ppo.stop_token_ids``."""
    sequences = list(cfg.ppo.stop_token_ids)
    for text in cfg.prompts.stop:
        ids = tuple(int(t) for t in tokenizer(text, add_special_tokens=False)["input_ids"])
        if not ids:
            raise TaskInputError(f"prompts.stop: {text!r} tokenizes to nothing")
        if ids not in sequences:
            sequences.append(ids)
    return tuple(sequences)


__all__ = ["RunTask", "TaskInputError", "build_task", "chat_messages", "encode", "prompt_key", "reward_config",
           "stop_token_ids", "tokenize_task"]
