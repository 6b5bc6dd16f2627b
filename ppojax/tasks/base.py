"""The task registry and the types a task is made of (``ppojax.tasks`` has the overview)."""


from __future__ import annotations

import dataclasses
import difflib
import inspect
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional, Union

Messages = list  # [{"role": ..., "content": ...}, ...]


class TaskError(ValueError):
    """A task that cannot be built, in one line naming the config key or the file and line."""


@dataclasses.dataclass(frozen=True)
class Row:
    """One prompt of a task: ``prompt`` (text, or a list of chat messages ``{"role", "content"}``) and the
    ``target`` a verifier checks the response against (None: nothing to check)."""

    prompt: Union[str, Messages]
    target: Optional[str] = None

    def key(self) -> str:
        """The prompt as one string, for overlap checks (messages joined with their roles)."""
        if isinstance(self.prompt, str):
            return self.prompt.strip()
        return "\n".join(f"{m.get('role')}: {str(m.get('content', '')).strip()}" for m in self.prompt)


@dataclasses.dataclass(frozen=True)
class Task:
    """A built task (see the module docstring)."""

    train: Sequence[Row]
    """Training rows (at least one)."""
    eval: Sequence[Row] = ()
    """Held-out rows; none of their prompts is a training prompt."""
    reward: Optional[str] = None
    """The registered ``reward.kind`` this task scores with, unless the config's ``reward.kind`` names another;
    None: the config's reward (default ``lexicon``)."""
    reward_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    """Defaults of ``reward.kwargs`` for ``reward`` (the config's own kwargs win)."""
    verifiable: bool = False
    """The rows have targets and the reward verifies them: evaluation reports ``accuracy`` (a response is correct
    when the task's verifier accepts it, ``correct``)."""
    correct: Optional[Callable[[str, str], bool]] = None
    """``correct(response, target) -> bool`` for a verifiable task: what ``eval/accuracy`` counts."""
    source: str = ""
    """Where the rows come from, for messages (a file, a dataset id, 'generated (seed 3)')."""


@dataclasses.dataclass(frozen=True)
class TaskContext:
    """What a task builder may read of the run besides its own ``task.kwargs``."""

    prompts: Any = None
    """The config's ``prompts:`` section (``path``, ``field``, ``dataset``, ``split``)."""
    config_dir: Optional[os.PathLike] = None
    """Where relative paths of the config are looked up first."""
    seed: int = 0
    """The run's seed."""
    num_eval: int = 0
    """How many held-out rows the run's evaluation uses (``eval.num_prompts``; 0: evaluation is off)."""


TaskBuilder = Callable[..., Task]
_TASKS: dict[str, TaskBuilder] = {}


def register_task(name: str, *, replace: bool = False) -> Callable[[TaskBuilder], TaskBuilder]:
    """Decorator: registers ``builder(ctx: TaskContext, **kwargs) -> Task`` as ``task.name: name``; returns the
    builder unchanged. ``replace`` allows replacing another builder of the same name."""
    if not isinstance(name, str) or not name or name != name.strip() or ":" in name:
        raise ValueError(f"a task name is a non-empty string without spaces or ':', got {name!r}")

    def decorator(builder: TaskBuilder) -> TaskBuilder:
        if not callable(builder):
            raise TypeError(f"register_task({name!r}) decorates a function, got {type(builder).__name__}")
        old = _TASKS.get(name)
        same = old is not None and (old is builder or (old.__module__, old.__qualname__) ==
                                    (builder.__module__, builder.__qualname__))
        if old is not None and not same and not replace:
            raise ValueError(f"a task named {name!r} is already registered (pass replace=True to replace it)")
        _TASKS[name] = builder
        return builder

    return decorator


def task_names() -> list[str]:
    """The registered task names, sorted."""
    return sorted(_TASKS)


def check_task_name(name: Any) -> None:
    """TaskError naming ``task.name`` (and the closest registered name) for a name that is not registered."""
    if isinstance(name, str) and name in _TASKS:
        return
    close = difflib.get_close_matches(name, list(_TASKS), n=1) if isinstance(name, str) else []
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise TaskError(f"task.name={name!r}: unknown task{hint} (registered: {', '.join(sorted(_TASKS))}; a module "
                    "that registers more (ppojax.register_task) is named under imports:)")


def build_task(name: str, ctx: TaskContext, kwargs: Optional[Mapping[str, Any]] = None) -> Task:
    """The task ``name`` built with ``ctx`` and ``kwargs`` and checked: rows of the right types, targets on every
    row of a verifiable task, and no evaluation prompt among the training prompts. TaskError (one line naming
    ``task.name`` / ``task.kwargs``) for anything wrong."""
    check_task_name(name)
    builder = _TASKS[name]
    kwargs = dict(kwargs or {})
    key = f"task.name={name!r}"
    try:
        params = inspect.signature(builder).parameters
    except (TypeError, ValueError):
        params = {}
    if params and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        unknown = [k for k in kwargs if k not in params or k == next(iter(params))]
        if unknown:
            known = [p for p in list(params)[1:]]
            close = difflib.get_close_matches(unknown[0], known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise TaskError(f"task.kwargs.{unknown[0]}: the task {name!r} takes no such argument{hint} (it takes: "
                            f"{', '.join(known) or 'none'})")
    try:
        task = builder(ctx, **kwargs)
    except TaskError:
        raise
    except (ValueError, TypeError, OSError, KeyError) as e:
        lines = str(e).strip().splitlines()
        what = "" if isinstance(e, ValueError) else f"{type(e).__name__}: "  # a ValueError's message says it all
        raise TaskError(f"{key}: {what}{lines[0] if lines else type(e).__name__}") from None
    return check_task(task, key)


def check_task(task: Any, key: str = "task") -> Task:
    """``task`` itself when it is a well-formed :class:`Task`; else TaskError naming ``key``."""
    if not isinstance(task, Task):
        raise TaskError(f"{key}: the builder returned {type(task).__name__}, not a ppojax.tasks.Task")
    for split in ("train", "eval"):
        rows = getattr(task, split)
        for i, row in enumerate(rows):
            if not isinstance(row, Row):
                raise TaskError(f"{key}: {split} row {i} is a {type(row).__name__}, not a ppojax.tasks.Row")
            if not is_prompt(row.prompt):
                raise TaskError(f"{key}: {split} row {i}: a prompt is a non-empty string or a list of "
                                "{'role', 'content'} messages")
            if task.verifiable and (row.target is None or not str(row.target).strip()):
                raise TaskError(f"{key}: {split} row {i} has no target, but the task is verifiable")
    if not task.train:
        raise TaskError(f"{key}: the task has no training rows")
    if task.verifiable and task.correct is None:
        raise TaskError(f"{key}: a verifiable task needs correct(response, target)")
    train_keys = {row.key() for row in task.train}
    shared = [row for row in task.eval if row.key() in train_keys]
    if shared:
        raise TaskError(f"{key}: {len(shared)} of the {len(task.eval)} evaluation prompts are also training prompts "
                        f"(first: {shared[0].key()[:60]!r}); a held-out set must not overlap the training prompts")
    return task


def is_prompt(prompt: Any) -> bool:
    """A non-empty string, or a non-empty list of ``{'role', 'content'}`` string messages."""
    if isinstance(prompt, str):
        return bool(prompt.strip())
    return (isinstance(prompt, list) and bool(prompt) and all(
        isinstance(m, Mapping) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in prompt))


__all__ = ["Row", "Task", "TaskContext", "TaskError", "build_task", "check_task", "check_task_name",
           "register_task", "task_names"]
