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
from ppojax.tasks.summarize import content_words, words

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


GENERIC = ("python", "mean", "means", "explain", "briefly", "use")
"""Words of the demo's question templates that are not the question's subject (``helpfulness_judge``'s key terms
leave them out)."""
MARKUP = re.compile(r"\n|```|\*\*|^\s*#|^\s*[-*+] |^\s*\d+\. ", re.M)
"""A line break, a code fence, bold, a heading or a list item: the answer has turned into a block or a list."""
OPENERS = ("i'm sorry", "i am sorry", "sorry", "i apologise", "i apologize", "as an ai", "i can't", "i cannot",
           "sure", "absolutely", "certainly", "of course", "great question", "yes", "here's", "here is", "one of",
           "well,", "hello", "hi")
"""Openings that apologise, refuse or fill before answering: the answer's first words, lowercased, are one of these
(a whole word: "Surely" is not "sure")."""
OPENING = re.compile(r"(?:" + "|".join(map(re.escape, OPENERS)) + r")(?!\w)")
SENTENCE_END = re.compile(r"[.!?](?=\s|$)")


def _same_word(a: str, b: str) -> bool:
    """The same word up to a plural ``s`` (``slicings`` / ``slicing``, ``identifier`` / ``identifiers``)."""
    return a.rstrip("s") == b.rstrip("s")


def helpfulness_terms(response: str, messages: list, *, generic: tuple = GENERIC, early: int = 10,
                      budget: int = 24) -> dict:
    """The terms of :func:`helpfulness_judge`, each in [0, 1] (see its docstring)."""
    question = messages[-1]["content"] if messages else ""
    key = [w for w in content_words(question) if w not in generic]
    head = words(response)[:early]
    end = SENTENCE_END.search(response)
    first = len(words(response[: end.end()])) if end else budget
    return {"key_terms_early": sum(any(_same_word(a, k) for a in head) for k in key) / len(key) if key else 0.0,
            "sentence_ends": float(end is not None),
            "short_first_sentence": 1.0 - min(first, budget) / budget if end else 0.0,
            "markup": float(MARKUP.search(response) is not None),
            "filler_opening": float(OPENING.match(response.strip().lower()) is not None)}


def helpfulness_judge(response: str, messages: list, *, generic: tuple = GENERIC, early: int = 10,
                      budget: int = 24) -> float:
    """The offline pipeline's proxy judge of a short answer to the conversation's last user turn:

        score = 0.5 * |K & words(answer)[:early]| / |K|       (names what was asked, at once)
                + 0.5 * [a sentence ends (. ! ?) in the answer]       (says one complete thing)
                + 0.5 * (1 - min(w1, budget) / budget)                (... briefly; 0 without a sentence end)
                - 0.5 * [a line break, code fence, bold, heading or list item]   (plain prose, not a cut-off block)
                - 0.5 * [it opens with an apology, refusal or filler: OPENERS]   (answers at once)

    where K are the question's content words (no stopwords, 3+ letters) less the templates' ``generic`` words
    ("python", "mean", "explain", ...), a word matching up to a plural "s", and w1 the words of the answer's first
    sentence. Range [-1, 1.5]. What it rewards: an answer that names the question's subject in its first words and
    says something about it in one short, complete, plain sentence, without "I'm sorry" or "Sure!" first: what a
    concise assistant (the demo's system message) answering in ~24 tokens should do. Why it is a proxy: it reads
    only the surface. Any short sentence that names the subject scores as an answer ("Break is a keyword." beats a
    correct answer that needs 20 words), a sentence that names nothing still earns up to 1.0 of the 1.5 (GRPO
    against a reward model of these labels found it: "Can you explain truth in Python briefly?" -> "Python can be
    incredibly insightful. In a lot of ways.", 0.90), it never checks a fact, and a code example, which may be the
    most helpful answer to "How do I use X?", costs 0.5. These surface properties are chosen because they vary among an
    instruct model's samples for one question and a reward model can see them; the previous judge (overlap with
    the topic's pydoc page, which the reward model never sees) was not learnable from ~100 comparisons.
    """
    t = helpfulness_terms(response, messages, generic=generic, early=early, budget=budget)
    return 0.5 * (t["key_terms_early"] + t["sentence_ends"] + t["short_first_sentence"] - t["markup"]
                  - t["filler_opening"])


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
