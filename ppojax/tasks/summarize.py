"""``summarize``: documents to summarize, in the TL;DR schemas, with an optional reference summary.

Rows (a JSONL file, ``path`` or ``prompts.path``; or, when the hub is reachable, the ``datasets`` id ``dataset``):

- ``{"prompt": "SUBREDDIT: r/...\\nTITLE: ...\\nPOST: ...\\nTL;DR:", "label": "..."}``: CarperAI's
  ``openai_summarize_tldr`` (and ``trl-lib/tldr``, whose reference is ``completion``). A prompt in that frame is read
  back into its fields; any other prompt text is the document itself.
- ``{"subreddit", "title", "post", "summary"}``: the fields of OpenAI's summarize-from-feedback (``subreddit`` and
  ``title`` optional).

The reference (``label``, ``completion``, ``summary`` or ``reference``, whichever the row has) is optional; it becomes
the row's ``target``. ``format`` renders each document as

- ``tldr``: lm-human-preferences' text prompt ``SUBREDDIT: r/{subreddit}\\nTITLE: {title}\\nPOST: {post}\\nTL;DR:``
  (:data:`TLDR_FORMAT`; the lines of missing fields left out), for a base model (``prompts.chat: false``);
- ``chat``: one user message, ``instruction`` then the document (needs ``prompts.chat: true``: the tokenizer's chat
  template renders it).

The post is truncated so that the whole query fits ``prompts.max_prompt_tokens`` (the summarize-from-feedback
reproduction cuts it at the last line break that fits; here at the last line break, else the last space): measured
with ``tokenizer`` when given (give the run's ``tokenizer:``), else counted as words and punctuation marks, which is an
estimate of a BPE count for English (the prompt's own left truncation, with its warning, still guards the rest).

Responses: OpenAI's TL;DR setup (lm-human-preferences ``summarize_tldr_task``) samples at most ``response_length`` (48
or 75) tokens and truncates after the first line break (``truncate_token=198``, ``'\\n'`` in GPT-2's tokenizer, and in
SmolLM2's, whose ``'\\n\\n'`` is two of them). In ppojax that is the config's ``ppo.response_length``,
``ppo.truncate_token`` and ``ppo.truncate_after`` (``configs/tldr.yaml``); :func:`first_line` is the same cut on text.

Rewards: with ``reward: rouge_l`` (the default when every row has a reference) the host reward ``rouge_l`` scores the
response's first line against the row's reference (ROUGE-L F1 over lowercased word tokens, :func:`rouge_l_f1`);
otherwise the config's ``reward:`` section decides (a reward model trained on summary comparisons: ``reward.kind:
reward_model``). :func:`coverage_judge` is the offline pipeline's proxy judge (``experiments/rlhf_pipeline.py --task
summarize``).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Optional, Sequence

from ppojax.rl.rewards import register_reward
from ppojax.tasks.base import Row, Task, TaskContext, register_task

TLDR_FORMAT = "SUBREDDIT: r/{subreddit}\nTITLE: {title}\nPOST: {post}\nTL;DR:"
"""lm-human-preferences' TL;DR query (``ppojax.rl.preference_formats.TLDR_PROMPT``, the same frame)."""
INSTRUCTION = "Summarize the following text in one sentence."
REFERENCE_FIELDS = ("label", "completion", "summary", "reference")
"""Where a row's reference summary may be (the first one present is used)."""
_FRAME = re.compile(r"^(?:SUBREDDIT: r/(?P<subreddit>[^\n]*)\n+)?(?:TITLE: (?P<title>[^\n]*)\n+)?POST: (?P<post>.*?)"
                    r"\s*TL;DR:\s*$", re.DOTALL)
_WORD = re.compile(r"\w+|[^\w\s]")


@dataclasses.dataclass(frozen=True)
class Document:
    """One document: the post and its optional title, subreddit and reference summary."""

    post: str
    title: Optional[str] = None
    subreddit: Optional[str] = None
    reference: Optional[str] = None


# ----------------------------------------------------------------------------------------------------------------
# Reading rows


def parse_document(obj: Any, where: str) -> Document:
    """A :class:`Document` of one row in either schema (the module docstring); ValueError naming ``where``."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: a row must be a JSON object, got {type(obj).__name__}")
    reference = None
    for name in REFERENCE_FIELDS:
        if name in obj and obj[name] is not None:
            if not isinstance(obj[name], str) or not obj[name].strip():
                raise ValueError(f"{where}: the reference summary {name!r} must be a non-empty string")
            reference = obj[name].strip()
            break
    if "post" in obj:
        fields = {}
        for name in ("post", "title", "subreddit"):
            value = obj.get(name)
            if name != "post" and value is None:
                continue
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{where}: {name!r} must be a non-empty string")
            fields[name] = value.strip()
        return Document(reference=reference, **fields)
    if "prompt" in obj:
        prompt = obj["prompt"]
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{where}: 'prompt' must be a non-empty string (the post, or the TL;DR query)")
        m = _FRAME.match(prompt.strip())
        if m:
            return Document(post=m["post"].strip(), title=m["title"], subreddit=m["subreddit"], reference=reference)
        return Document(post=prompt.strip(), reference=reference)
    keys = ", ".join(sorted(obj)) or "none"
    raise ValueError(f"{where}: a summarize row needs 'prompt' (with an optional 'label') or 'post' (with optional "
                     f"'title', 'subreddit', 'summary'); it has {keys}")


def read_documents(path: Path) -> list[Document]:
    """The documents of a JSONL file; one ValueError naming ``file:line`` for a bad row."""
    from ppojax.io.data import jsonl_file_objects

    docs = [parse_document(obj, where) for where, obj in jsonl_file_objects(path, "summarize rows", "document file")]
    if not docs:
        raise ValueError(f"document file {path} holds no rows")
    return docs


def hub_documents(dataset: str, split: str, limit: Optional[int]) -> list[Document]:
    """Rows of a hub dataset, failing within seconds when the hub cannot be reached (``ppojax.io.hub``)."""
    hint = ("to work offline, give task.kwargs.path: a JSONL file of {prompt, label} or {subreddit, title, post, "
            "summary} rows")
    from ppojax.io.hub import hub_dataset_rows

    return [parse_document(row, where) for where, row in hub_dataset_rows(dataset, split, limit, hint)]


# ----------------------------------------------------------------------------------------------------------------
# Rendering


def count_tokens_estimate(text: str) -> int:
    """Words and punctuation marks: an estimate of a BPE tokenizer's count on English text."""
    return len(_WORD.findall(text))


def _cut(post: str, fits) -> str:
    """The longest prefix of ``post`` ending at a line break (else a space) for which ``fits(prefix)``."""
    if fits(post):
        return post
    lo, hi = 0, len(post)
    while lo < hi:  # the longest character prefix that fits: fits() is monotone in the prefix length
        mid = (lo + hi + 1) // 2
        if fits(post[:mid]):
            lo = mid
        else:
            hi = mid - 1
    prefix = post[:lo]
    at = prefix.rfind("\n")
    if at > 0:
        return prefix[:at].rstrip()
    if post[lo:lo + 1].isspace():  # the prefix already ends between words
        return prefix.rstrip()
    at = prefix.rfind(" ")
    return prefix[:at].rstrip() if at > 0 else prefix.rstrip()


def render(doc: Document, fmt: str, instruction: str, post: Optional[str] = None):
    """The prompt of ``doc``: TL;DR text (``tldr``) or one user message (``chat``)."""
    post = doc.post if post is None else post
    if fmt == "tldr":
        lines = []
        if doc.subreddit is not None:
            lines.append(f"SUBREDDIT: r/{doc.subreddit}")
        if doc.title is not None:
            lines.append(f"TITLE: {doc.title}")
        return "\n".join(lines + [f"POST: {post}", "TL;DR:"])
    body = post if doc.title is None else f"{doc.title}\n\n{post}"
    return [{"role": "user", "content": f"{instruction}\n\n{body}" if instruction else body}]


def fit_prompt(doc: Document, fmt: str, instruction: str, max_tokens: int, count) -> Any:
    """The prompt of ``doc`` with its post cut so that ``count(prompt) <= max_tokens``; ValueError when even an
    empty post does not fit."""
    fits = lambda post: count(render(doc, fmt, instruction, post)) <= max_tokens  # noqa: E731
    if not fits(""):
        raise ValueError(f"the summarize frame alone is longer than prompts.max_prompt_tokens={max_tokens}; raise it")
    return render(doc, fmt, instruction, _cut(doc.post, fits))


def _counter(tokenizer: Optional[str], fmt: str, chat: bool, system: Optional[str]):
    if tokenizer is None:
        def estimate(prompt) -> int:
            text = prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)
            return count_tokens_estimate(text) + (16 if not isinstance(prompt, str) else 0)  # ~ a template's tokens
        return estimate
    from ppojax.io.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer)

    def count(prompt) -> int:  # the run's rendering (ppojax.train.prompting.encode), without importing the trainer
        if not chat:
            return len(tok(prompt, add_special_tokens=False)["input_ids"])
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
        if system is not None:
            messages = [{"role": "system", "content": system}] + [m for m in messages if m.get("role") != "system"]
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return len(ids["input_ids"] if hasattr(ids, "keys") else ids)

    return count


# ----------------------------------------------------------------------------------------------------------------
# Responses and scores


def first_line(text: str) -> str:
    """A response cut after its first line break (the break dropped), as ``ppo.truncate_token`` on ``'\\n'`` does."""
    return text.split("\n", 1)[0].strip()


def words(text: str) -> list[str]:
    """Lowercased word tokens (letters and digits)."""
    return re.findall(r"[a-z0-9]+", text.lower())


def rouge_l_f1(candidate: str, reference: str) -> float:
    """ROUGE-L F1 (Lin 2004) over lowercased word tokens: with L = LCS(c, r),
    ``P = L / |c|``, ``R = L / |r|``, ``F = 2 P R / (P + R)`` (0 when either is empty). The LCS is the
    O(|c| |r|) dynamic program, one row at a time."""
    c, r = words(candidate), words(reference)
    if not c or not r:
        return 0.0
    prev = [0] * (len(r) + 1)
    for a in c:
        cur = [0]
        for j, b in enumerate(r):
            cur.append(prev[j] + 1 if a == b else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, rec = lcs / len(c), lcs / len(r)
    return 2 * p * rec / (p + rec)


@register_reward("rouge_l", host=True)
def rouge_l(responses: Sequence[str], targets: Sequence[Optional[str]], *, first_line_only: bool = True) -> list:
    """ROUGE-L F1 of each response (its first line, as TL;DR truncation keeps) against its row's reference summary
    (the task's ``target``); a row without a reference raises."""
    out = []
    for response, target in zip(responses, targets):
        if target is None:
            raise ValueError("reward 'rouge_l' needs a reference summary on every row (a 'label', 'completion' or "
                             "'summary' field)")
        out.append(rouge_l_f1(first_line(response) if first_line_only else response, target))
    return out


STOPWORDS = frozenset("""a an the and or but if then else of to in on at by for with from as is are was were be been
being it its this that these those there their they them he she his her we you your our i me my not no nor so than too very
can will would should could may might must do does did done have has had having which who whom whose what when where
why how all any both each few more most other some such only own same just also into over under about after before
between through during above below up down out off again further once here s t""".split())


def content_words(text: str) -> list[str]:
    """The distinct words of ``text`` that are not stopwords and have at least 3 characters, in order."""
    seen: dict[str, None] = {}
    for w in words(text):
        if len(w) >= 3 and w not in STOPWORDS:
            seen.setdefault(w, None)
    return list(seen)


def keywords(text: str, n: int) -> list[str]:
    """The ``n`` most frequent content words of ``text`` (ties in order of first appearance)."""
    counts: dict[str, int] = {}
    for w in words(text):
        if len(w) >= 3 and w not in STOPWORDS:
            counts[w] = counts.get(w, 0) + 1
    return sorted(counts, key=lambda w: -counts[w])[:n]


def coverage_judge(summary: str, document: str, *, max_words: int = 20, length_penalty: float = 0.05) -> float:
    """The offline pipeline's proxy judge of a summary (its first line):

        score = |content(summary) & content(document)| / |content(document)|
                - length_penalty * max(0, n_words(summary) - max_words)

    What it rewards: mentioning the document's content words (coverage, a recall), in at most ``max_words`` words.
    Why it is a proxy: it cannot tell a sentence that states the document's point from a list of its keywords, or a
    copied clause from a summary; it ignores fluency, faithfulness of what is said about the words, and grammar.
    """
    summary = first_line(summary)
    doc_words = content_words(document)
    if not doc_words:
        return 0.0
    covered = set(content_words(summary)) & set(doc_words)
    n = len(words(summary))
    return len(covered) / len(doc_words) - length_penalty * max(0, n - max_words)


# ----------------------------------------------------------------------------------------------------------------
# The task


@register_task("summarize")
def summarize(ctx: TaskContext, *, path: Optional[str] = None, eval_path: Optional[str] = None,
              dataset: str = "CarperAI/openai_summarize_tldr", split: str = "train", eval_split: str = "valid",
              format: str = "tldr", instruction: str = INSTRUCTION, tokenizer: Optional[str] = None,
              split_seed: int = 0, limit: Optional[int] = None) -> Task:
    """Documents to summarize (the module docstring).

    Args:
      path: a JSONL file of rows in either schema (default ``prompts.path``; neither: ``dataset`` from the hub).
      eval_path: held-out rows in the same schemas; None: ``eval.num_prompts`` split off ``path`` (from the hub:
        ``eval_split``).
      dataset: the hub dataset id (``CarperAI/openai_summarize_tldr``: ``prompt``/``label``; ``trl-lib/tldr``:
        ``prompt``/``completion``).
      split, eval_split: its training and held-out splits (CarperAI's: train, valid, test; trl-lib's: train,
        validation, test).
      format: ``tldr`` (lm-human-preferences' text frame) or ``chat`` (one user message; ``prompts.chat: true``).
      instruction: the chat format's request, put before the document.
      tokenizer: measures the query when cutting the post to ``prompts.max_prompt_tokens`` (the run's
        ``tokenizer:``); None: an estimate (words and punctuation marks).
      split_seed: the seed of the held-out split.
      limit: use only the first this many training rows.
    """
    from ppojax.io.data import resolve_path
    from ppojax.tasks.files import split_rows

    if format not in ("tldr", "chat"):
        raise ValueError(f"task.kwargs.format must be 'tldr' or 'chat', got {format!r}")
    chat = bool(ctx.prompts is not None and ctx.prompts.chat)
    if format == "chat" and not chat:
        raise ValueError("task.kwargs.format='chat' renders a chat message: set prompts.chat: true too")
    path = path or (ctx.prompts.path if ctx.prompts is not None else None)
    if path:
        docs = read_documents(resolve_path(path, ctx.config_dir))
        docs = docs[:limit] if limit else docs
        held_docs = read_documents(resolve_path(eval_path, ctx.config_dir)) if eval_path else None
        source = str(path)
    else:
        docs = hub_documents(dataset, split, limit)
        held_docs = (read_documents(resolve_path(eval_path, ctx.config_dir)) if eval_path else
                     hub_documents(dataset, eval_split, ctx.num_eval or None) if ctx.num_eval else [])
        source = dataset
    max_tokens = ctx.prompts.max_prompt_tokens if ctx.prompts is not None else 512
    count = _counter(tokenizer, format, chat, ctx.prompts.system if ctx.prompts is not None else None)
    rows = lambda ds: [Row(fit_prompt(d, format, instruction, max_tokens, count), d.reference)  # noqa: E731
                       for d in ds]
    if held_docs is None:
        train, held = split_rows(ctx, rows(docs), None, "prompt", None, None, split_seed)
    else:
        train, held = rows(docs), rows(held_docs)
    referenced = all(r.target is not None for r in (*train, *held))
    return Task(train=train, eval=held, reward="rouge_l" if referenced else None, source=source)
