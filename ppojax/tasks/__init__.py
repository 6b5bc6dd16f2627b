"""Tasks: what a run trains on and how it is judged, registered by name and selected by the config's ``task:``.

A task bundles

- the training rows (prompts, each with an optional ``target``: the answer a verifier checks),
- the held-out evaluation rows, which never share a prompt with the training rows,
- the reward it scores with by default (a registered ``reward.kind``, e.g. ``exact_answer`` for a verifier; None:
  the config's ``reward:`` section decides, as for ``sentiment``), and
- whether it is verifiable (its eval reports ``accuracy``: the fraction of responses whose answer the verifier
  accepts).

How a prompt is rendered (plain text, or through the tokenizer's chat template with ``prompts.chat``) is the
config's choice, not the task's: the same task runs on a base model and on an instruct model.

A task is a function ``builder(ctx: TaskContext, **kwargs) -> Task``, registered with :func:`register_task`; the
config's ``task.kwargs`` are its keyword arguments. A user task is one module named under ``imports:``::

    import ppojax

    @ppojax.register_task("capitals")
    def capitals(ctx, *, n_eval=20):
        rows = [ppojax.tasks.Row(f"What is the capital of {c}?", target=cap) for c, cap in TABLE]
        return ppojax.tasks.Task(train=rows[n_eval:], eval=rows[:n_eval], reward="exact_answer",
                                 reward_kwargs={"extract": "last_word"}, verifiable=True)

The built-ins: ``sentiment`` (the prompt file of ``prompts:``, scored by ``reward:``), ``arithmetic`` (seeded
integer problems, ``ppojax.tasks.arithmetic``), ``gsm8k`` (the GSM8K schema, ``ppojax.tasks.gsm8k``), ``file``
(any prompt file or dataset, with an optional answer field), ``summarize`` (documents in the TL;DR schemas,
``ppojax.tasks.summarize``) and ``dialogue`` (conversations ending with a user turn, HH-RLHF's text or a
``messages`` list, ``ppojax.tasks.dialogue``).
"""

from ppojax.tasks.base import (Row, Task, TaskContext, TaskError, build_task, check_task, check_task_name,
                               register_task, task_names)
from ppojax.tasks import arithmetic, dialogue, files, gsm8k, summarize, verify  # noqa: E402,F401  (each registers itself)

__all__ = ["Row", "Task", "TaskContext", "TaskError", "build_task", "check_task", "check_task_name",
           "register_task", "task_names"]
