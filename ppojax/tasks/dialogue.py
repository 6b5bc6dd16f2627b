"""``dialogue``: single- and multi-turn conversations that end with a user turn, answered through the chat template.

Rows (a JSONL file, ``path`` or ``prompts.path``; or, when the hub is reachable, the ``datasets`` id ``dataset``):

- ``{"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}, ..., {"role": "user", ...}]}``: the
  conversation so far (a ``system`` message first is allowed). A list that ends with an assistant turn has that turn
  removed (it is the answer, not the prompt), as a ``chosen`` conversation of TRL's schema would.
- ``{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...\\n\\nHuman: ...\\n\\nAssistant: ..."}`` (Anthropic HH-RLHF's
  full-text form; ``rejected`` is ignored, a ``prompt``/``text``/``dialogue`` string field is read the same way):
  split into messages at the ``Human:`` / ``Assistant:`` markers, the last Assistant turn removed.

The rows need ``prompts.chat: true`` (the tokenizer's chat template renders them, with the generation prompt). There
is no default reward: the config names one (HH-RLHF's setting is a reward model trained on dialogue preferences,
``reward.kind: reward_model``; ``experiments/train_reward.py --format hh`` trains one). :func:`helpfulness_judge`
is the offline pipeline's proxy judge (``experiments/rlhf_pipeline.py --task dialogue``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional

from ppojax.tasks.base import Row, Task, TaskContext, register_task
from ppojax.tasks.summarize import content_words, keywords, words

HH_TURN = re.compile(r"\n\n(Human|Assistant):[ \t]?")
ROLES = {"Human": "user", "Assistant": "assistant"}
TEXT_FIELDS = ("chosen", "prompt", "text", "dialogue")
"""Fields of a row that may hold an HH-RLHF full-text dialogue (the first one present is read)."""


def split_hh(text: str, where: str) -> list[dict]:
    """An HH-RLHF dialogue string as messages (``Human`` -> user, ``Assistant`` -> assistant), the last assistant
    turn removed; ValueError naming ``where`` when it is not one."""
    if not text.startswith("\n\n"):
        text = "\n\n" + text.lstrip("\n")
    parts = HH_TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise ValueError(f"{where}: an HH-RLHF dialogue is '\\n\\nHuman: ...\\n\\nAssistant: ...' turns; this text "
                         f"starts {text.strip()[:40]!r}")
    messages = [{"role": ROLES[parts[i]], "content": parts[i + 1].strip()} for i in range(1, len(parts), 2)]
    if messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    return check_messages(messages, where)


def check_messages(messages: Any, where: str) -> list[dict]:
    """A conversation that ends with a user turn, the last assistant turn dropped; ValueError naming ``where``."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"{where}: message {i} must be an object with string 'role' and 'content'")
        if m["role"] not in ("system", "user", "assistant"):
            raise ValueError(f"{where}: message {i} has role {m['role']!r}; use system, user or assistant")
        if m["role"] == "system" and i:
            raise ValueError(f"{where}: message {i} is a system message; only the first message may be one")
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] == "assistant":
        out = out[:-1]
    if not out or out[-1]["role"] != "user" or not out[-1]["content"].strip():
        raise ValueError(f"{where}: the conversation must end with a non-empty user turn (the one to answer)")
    return out


def parse_dialogue(obj: Any, where: str) -> list[dict]:
    """The prompt messages of one row in either schema (the module docstring)."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: a row must be a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        return check_messages(obj["messages"], where)
    for name in TEXT_FIELDS:
        if name in obj:
            if isinstance(obj[name], list):
                return check_messages(obj[name], where)
            if not isinstance(obj[name], str):
                raise ValueError(f"{where}: {name!r} must be an HH-RLHF dialogue string or a list of messages")
            return split_hh(obj[name], where)
    keys = ", ".join(sorted(obj)) or "none"
    raise ValueError(f"{where}: a dialogue row needs 'messages' (a list ending with a user turn) or 'chosen' (an "
                     f"HH-RLHF dialogue); it has {keys}")


def read_dialogues(path: Path) -> list[list[dict]]:
    from ppojax.io.data import jsonl_file_objects

    out = [parse_dialogue(obj, where) for where, obj in jsonl_file_objects(path, "dialogue rows", "dialogue file")]
    if not out:
        raise ValueError(f"dialogue file {path} holds no rows")
    return out


def hub_dialogues(dataset: str, split: str, limit: Optional[int]) -> list[list[dict]]:
    """Rows of a hub dataset, failing within seconds when the hub cannot be reached (``ppojax.io.hub``)."""
    hint = ("to work offline, give task.kwargs.path: a JSONL file of {messages: [...]} or HH-RLHF {chosen: "
            "'\\n\\nHuman: ...'} rows")
    from ppojax.io.hub import hub_dataset_rows

    return [parse_dialogue(row, where) for where, row in hub_dataset_rows(dataset, split, limit, hint)]


POLITE = ("please", "thank", "thanks", "glad", "happy to", "hope this helps", "sure", "certainly", "of course",
          "great question", "you're welcome")


def helpfulness_judge(response: str, messages: list, *, reference: str = "", n_keywords: int = 20,
                      enough: int = 5, min_words: int = 8, max_words: int = 30) -> float:
    """The offline pipeline's proxy judge of an answer to the conversation's last user turn:

        score = |content(response) & content(question)| / |content(question)|         (answers what was asked)
                + 0.5 * min(1, |content(response) & K| / enough)                      (says something on topic)
                + 0.25 * [a politeness phrase of POLITE appears]                        (politeness lexicon)
                - 0.05 * (words below min_words or above max_words)                   (length band)

    where K are the ``n_keywords`` most frequent content words of ``reference`` (a text on the question's topic;
    none: that term is 0). What it rewards: an answer that talks about what was asked, uses the topic's vocabulary,
    is polite, and is brief. Why it is a proxy: repeating the question's words scores as answering it and naming
    the topic's words as knowing it, whether or not the answer is right; one "Sure," earns the politeness bonus; a
    short answer is not a complete one; and it never checks a fact.
    """
    question = messages[-1]["content"] if messages else ""
    asked = content_words(question)
    said = set(content_words(response))
    score = len(said & set(asked)) / len(asked) if asked else 0.0
    topic = set(keywords(reference, n_keywords)) if reference else set()
    if topic:
        score += 0.5 * min(1.0, len(said & topic) / enough)
    text = " ".join(words(response))
    score += 0.25 * any(re.search(rf"\b{re.escape(p)}", text) for p in POLITE)
    n = len(words(response))
    return score - 0.05 * (max(0, min_words - n) + max(0, n - max_words))


@register_task("dialogue")
def dialogue(ctx: TaskContext, *, path: Optional[str] = None, eval_path: Optional[str] = None,
             dataset: str = "Anthropic/hh-rlhf", split: str = "train", eval_split: str = "test",
             split_seed: int = 0, limit: Optional[int] = None) -> Task:
    """Conversations to answer (the module docstring).

    Args:
      path: a JSONL file of rows in either schema (default ``prompts.path``; neither: ``dataset`` from the hub).
      eval_path: held-out rows in the same schemas; None: ``eval.num_prompts`` split off ``path`` (from the hub:
        ``eval_split``).
      dataset: the hub dataset id (``Anthropic/hh-rlhf``: ``chosen``/``rejected`` dialogues).
      split, eval_split: its training and held-out splits.
      split_seed: the seed of the held-out split.
      limit: use only the first this many training rows.
    """
    from ppojax.io.data import resolve_path
    from ppojax.tasks.files import split_rows

    if ctx.prompts is not None and not ctx.prompts.chat:
        raise ValueError("the dialogue task's prompts are chat messages: set prompts.chat: true")
    path = path or (ctx.prompts.path if ctx.prompts is not None else None)
    if path:
        rows = [Row(m) for m in read_dialogues(resolve_path(path, ctx.config_dir))]
        rows = rows[:limit] if limit else rows
        if eval_path:
            train, held = rows, [Row(m) for m in read_dialogues(resolve_path(eval_path, ctx.config_dir))]
        else:
            train, held = split_rows(ctx, rows, None, "messages", None, None, split_seed)
        source = str(path)
    else:
        train = [Row(m) for m in hub_dialogues(dataset, split, limit)]
        held = ([Row(m) for m in read_dialogues(resolve_path(eval_path, ctx.config_dir))] if eval_path else
                [Row(m) for m in hub_dialogues(dataset, eval_split, ctx.num_eval or None)] if ctx.num_eval else [])
        source = dataset
    return Task(train=train, eval=held, source=source)
