"""Preference data as text: the :class:`Comparison` row, and the formats it is read from (ppojax's own and the
ecosystem's). ``ppojax.rl.preferences`` re-exports the row and the error, and tokenizes and labels the rows.

Each format is a plain function ``parse(obj, where) -> Comparison`` in :data:`PARSERS`, keyed by its name; every new
format gives pairs (k = 2) with ``choice`` the index of the chosen response. ``where`` (``file:line``) starts every
:class:`PreferenceError` message.

- ``ppojax``: ppojax's own JSONL (``query``, ``responses``, ``choice``; ``ppojax.rl.preferences``).
- ``trl``: TRL's preference schema (https://huggingface.co/docs/trl/dataset_formats#preference).
  ``prompt``, ``chosen``, ``rejected`` as strings (the responses are ``chosen`` and ``rejected``, choice 0), or as
  lists of chat messages ``{"role", "content"}`` ("conversational": ``prompt`` is the messages before the answer,
  ``chosen``/``rejected`` the assistant turn(s)). The implicit-prompt form has only ``chosen``/``rejected``, each the
  full text or conversation: the longest shared prefix is split off as the prompt (messages: whole messages; text:
  backed off to the last whitespace, so no word is cut and the responses start with it, where TRL's
  ``extract_prompt`` cuts at the first differing character).
- ``hh``: Anthropic HH-RLHF (https://huggingface.co/datasets/Anthropic/hh-rlhf): ``chosen`` and ``rejected`` are full
  dialogues ``"\\n\\nHuman: ...\\n\\nAssistant: ..."``; the prompt is their shared prefix up to and including the
  last ``"\\n\\nAssistant:"`` both share, the responses the two remainders.
- ``tldr``: OpenAI summarize-from-feedback comparisons (https://github.com/openai/summarize-from-feedback):
  ``info`` ``{"post", "title", "subreddit", ...}``, ``summaries`` ``[{"text"}, {"text"}]``, ``choice`` (0 or 1).
  The prompt is lm-human-preferences' TL;DR format ``"SUBREDDIT: r/{subreddit}\\nTITLE: {title}\\nPOST:
  {post}\\nTL;DR:"``; the responses are the summaries' text with one leading space. Rows of news articles
  (``info.article``, no ``post``) are refused.

A prompt given as messages stays messages in the :class:`Comparison` (``query``: a tuple of ``{"role", "content"}``
dicts) and becomes token ids only with the tokenizer (``ppojax.rl.preferences.tokenize_preferences``: the chat
template with the generation prompt, or ``role: content`` lines without one). A response given as messages becomes
its text: the assistant message's content; further turns after it follow as ``"\\n{role}: {content}"`` lines.

``auto`` detects the format from the first row's keys (:func:`detect_format`): ``query``/``responses`` is ppojax,
``info``/``summaries`` is tldr, ``prompt``/``chosen``/``rejected`` is trl, and ``chosen``/``rejected`` alone is hh when
``chosen`` is text holding ``"\\n\\nAssistant:"``, trl (implicit prompt) otherwise.

Sources (:func:`load_preferences`): a JSONL file, or ``hf:NAME[:SPLIT]`` (split ``train`` by default), a Hugging Face
dataset through the optional ``datasets`` package when the hub is reachable (errors name ``hf:NAME:SPLIT row N``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional

__all__ = ["Comparison", "FORMATS", "PARSERS", "PreferenceError", "detect_format", "load_preferences", "parse_rows"]

_FIELDS = ("query", "responses", "choice")
HH_ASSISTANT = "\n\nAssistant:"
TLDR_PROMPT = "SUBREDDIT: r/{subreddit}\nTITLE: {title}\nPOST: {post}\nTL;DR:"
"""lm-human-preferences' TL;DR query format (``tldr`` dataset in its ``datasets.py``)."""


class PreferenceError(ValueError):
    """A preference file or row that cannot be used; the message names ``file:line`` and the fix."""


@dataclasses.dataclass(frozen=True)
class Comparison:
    """One row of a preference file, as text."""

    query: str | tuple[Mapping[str, str], ...]
    """The prompt: text, or chat messages ``{"role", "content"}`` (rendered by the tokenizer's chat template)."""
    responses: tuple[str, ...]
    choice: Optional[int] = None
    """Index of the preferred response, or None while unlabeled."""
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    """Other keys of the row (kept when written back)."""

    @property
    def k(self) -> int:
        return len(self.responses)

    def to_json(self) -> dict:
        query = self.query if isinstance(self.query, str) else [dict(m) for m in self.query]
        return {"query": query, "responses": list(self.responses), "choice": self.choice, **self.extra}


def _messages(value: Any, name: str, where: str) -> tuple[dict, ...]:
    """A chat message list as a tuple of plain ``{"role", "content"}`` dicts, or PreferenceError."""
    out = []
    for i, m in enumerate(value):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise PreferenceError(f"{where}: {name!r} message {i} must be an object with string 'role' and "
                                  "'content'")
        out.append({"role": m["role"], "content": m["content"]})
    return tuple(out)


def _check_row(obj: Any, where: str, require_choice: bool) -> Comparison:
    """A ppojax-format row as a :class:`Comparison` (k consistency across a file: :func:`parse_rows`)."""
    if not isinstance(obj, dict):
        raise PreferenceError(f"{where}: expected a JSON object with {list(_FIELDS)}, got {type(obj).__name__}")
    missing = [f for f in _FIELDS if f not in obj]
    if missing:
        hint = " (use null for a row not labeled yet)" if missing == ["choice"] else ""
        raise PreferenceError(f"{where}: missing field{'s' if len(missing) > 1 else ''} "
                              f"{', '.join(map(repr, missing))}{hint}")
    query, responses, choice = obj["query"], obj["responses"], obj["choice"]
    if isinstance(query, (list, tuple)):
        query = _messages(query, "query", where)
        if not query:
            raise PreferenceError(f"{where}: 'query' has no messages")
    elif not isinstance(query, str):
        raise PreferenceError(f"{where}: 'query' must be a string or a list of chat messages, got "
                              f"{type(query).__name__}")
    if not isinstance(responses, list) or not all(isinstance(r, str) for r in responses):
        raise PreferenceError(f"{where}: 'responses' must be a list of strings")
    if len(responses) < 2:
        raise PreferenceError(f"{where}: 'responses' has {len(responses)} response(s); a comparison needs k >= 2")
    empty = [i for i, r in enumerate(responses) if not r.strip()]
    if empty:
        raise PreferenceError(f"{where}: response {empty[0]} is empty; every response needs text to be compared")
    if choice is None:
        if require_choice:
            raise PreferenceError(
                f"{where}: 'choice' is null (unlabeled); label every row before training (by hand, or with "
                "sample_for_labels.py --label-with vader)"
            )
    elif isinstance(choice, bool) or not isinstance(choice, int):
        raise PreferenceError(f"{where}: 'choice' must be an integer index or null, got {json.dumps(choice)}")
    elif not 0 <= choice < len(responses):
        raise PreferenceError(
            f"{where}: choice {choice} is out of range for {len(responses)} responses (0..{len(responses) - 1})"
        )
    extra = {key: value for key, value in obj.items() if key not in _FIELDS}
    return Comparison(query=query, responses=tuple(responses), choice=choice, extra=extra)


def _require(obj: Any, keys: tuple[str, ...], where: str, fmt: str) -> None:
    if not isinstance(obj, dict):
        raise PreferenceError(f"{where}: expected a JSON object ({fmt} format), got {type(obj).__name__}")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise PreferenceError(f"{where}: missing field{'s' if len(missing) > 1 else ''} "
                              f"{', '.join(map(repr, missing))} ({fmt} format)")


def _response_text(messages: tuple[dict, ...], name: str, where: str) -> str:
    """The text of a response given as messages: the assistant's content, later turns as ``\\n{role}: {content}``."""
    if not messages:
        raise PreferenceError(f"{where}: {name!r} has no messages; a response needs an assistant turn")
    if messages[0]["role"] != "assistant":
        raise PreferenceError(f"{where}: {name!r} starts with a {messages[0]['role']!r} message; the response must "
                              "start with the assistant's turn")
    return messages[0]["content"] + "".join(f"\n{m['role']}: {m['content']}" for m in messages[1:])


def _pair(query, chosen: str, rejected: str, where: str) -> Comparison:
    """The pair as a ppojax comparison (chosen first), through ppojax's own row checks (empty responses...)."""
    return _check_row({"query": query, "responses": [chosen, rejected], "choice": 0}, where, True)


def _shared_prefix(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def parse_ppojax(obj: Any, where: str) -> Comparison:
    return _check_row(obj, where, False)


def parse_trl(obj: Any, where: str) -> Comparison:
    _require(obj, ("chosen", "rejected"), where, "trl")
    chosen, rejected = obj["chosen"], obj["rejected"]
    prompt = obj.get("prompt")
    kinds = {type(v).__name__ for v in ((chosen, rejected) if prompt is None else (prompt, chosen, rejected))}
    if not kinds <= {"str", "list"} or len(kinds) != 1:
        names = ("chosen", "rejected") if prompt is None else ("prompt", "chosen", "rejected")
        got = ", ".join(f"{n}: {type(obj[n]).__name__}" for n in names)
        raise PreferenceError(f"{where}: {'/'.join(names)} must all be strings or all lists of chat messages, got "
                              f"{got} (trl format)")
    if isinstance(chosen, str):
        if prompt is not None:
            return _pair(prompt, chosen, rejected, where)
        # Implicit prompt, text: cut at the start of the last whitespace run inside the shared prefix, so no word
        # is cut in two and both responses start with that whitespace (as a continuation's text does).
        shared = _shared_prefix(chosen, rejected)
        n = max((i for i in range(1, shared) if chosen[i].isspace() and not chosen[i - 1].isspace()), default=0)
        if n == 0:
            raise PreferenceError(f"{where}: 'chosen' and 'rejected' share no words to split off as the prompt "
                                  "(trl format without 'prompt')")
        return _pair(chosen[:n], chosen[n:], rejected[n:], where)
    chosen_m, rejected_m = _messages(chosen, "chosen", where), _messages(rejected, "rejected", where)
    if prompt is not None:
        prompt_m = _messages(prompt, "prompt", where)
    else:  # implicit prompt: the shared whole messages
        n = _shared_prefix(chosen_m, rejected_m)
        if n == 0:
            raise PreferenceError(f"{where}: 'chosen' and 'rejected' share no first message to split off as the "
                                  "prompt (trl format without 'prompt')")
        prompt_m, chosen_m, rejected_m = chosen_m[:n], chosen_m[n:], rejected_m[n:]
    if not prompt_m:
        raise PreferenceError(f"{where}: 'prompt' has no messages (trl format)")
    return _pair(prompt_m, _response_text(chosen_m, "chosen", where), _response_text(rejected_m, "rejected", where),
                 where)


def parse_hh(obj: Any, where: str) -> Comparison:
    _require(obj, ("chosen", "rejected"), where, "hh")
    chosen, rejected = obj["chosen"], obj["rejected"]
    if not isinstance(chosen, str) or not isinstance(rejected, str):
        raise PreferenceError(f"{where}: 'chosen' and 'rejected' must be dialogue strings (hh format), got "
                              f"{type(chosen).__name__}, {type(rejected).__name__}")
    shared = _shared_prefix(chosen, rejected)
    at = chosen.rfind(HH_ASSISTANT, 0, shared)  # the marker must lie wholly inside the shared prefix
    if at < 0:
        raise PreferenceError(f"{where}: 'chosen' and 'rejected' share no prefix ending in {HH_ASSISTANT!r}; an "
                              "hh row is one dialogue with two different last assistant turns")
    end = at + len(HH_ASSISTANT)
    return _pair(chosen[:end], chosen[end:], rejected[end:], where)


def parse_tldr(obj: Any, where: str) -> Comparison:
    _require(obj, ("info", "summaries", "choice"), where, "tldr")
    info, summaries, choice = obj["info"], obj["summaries"], obj["choice"]
    if not isinstance(info, dict):
        raise PreferenceError(f"{where}: 'info' must be an object with 'post', 'title', 'subreddit' (tldr format)")
    bad = [k for k in ("post", "title", "subreddit") if not isinstance(info.get(k), str)]
    if bad:
        hint = " (a news-article row: only Reddit TL;DR posts are supported)" if info.get("article") else ""
        raise PreferenceError(f"{where}: 'info' needs string field{'s' if len(bad) > 1 else ''} "
                              f"{', '.join(map(repr, bad))}{hint}")
    if not isinstance(summaries, list) or len(summaries) != 2:
        n = len(summaries) if isinstance(summaries, list) else type(summaries).__name__
        raise PreferenceError(f"{where}: 'summaries' must be a list of 2 summaries, got {n} (tldr format)")
    texts = []
    for i, s in enumerate(summaries):
        if not (isinstance(s, dict) and isinstance(s.get("text"), str)):
            raise PreferenceError(f"{where}: summary {i} must be an object with a string 'text' (tldr format)")
        texts.append(" " + s["text"].lstrip(" "))
    query = TLDR_PROMPT.format(subreddit=info["subreddit"], title=info["title"], post=info["post"])
    return _check_row({"query": query, "responses": texts, "choice": choice}, where, False)


PARSERS: dict[str, Callable[[Any, str], Comparison]] = {
    "ppojax": parse_ppojax, "trl": parse_trl, "hh": parse_hh, "tldr": parse_tldr}
FORMATS = ("auto",) + tuple(PARSERS)


def detect_format(obj: Any, where: str) -> str:
    """The format of a row from its keys (see the module docstring); PreferenceError when none fits."""
    if not isinstance(obj, dict):
        raise PreferenceError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    keys = set(obj)
    if {"query", "responses"} <= keys:
        return "ppojax"
    if {"info", "summaries"} <= keys:
        return "tldr"
    if {"chosen", "rejected"} <= keys:
        if "prompt" not in keys and isinstance(obj["chosen"], str) and HH_ASSISTANT in obj["chosen"]:
            return "hh"
        return "trl"
    raise PreferenceError(f"{where}: cannot tell the preference format from the keys {sorted(keys)}; expected "
                          "ppojax (query, responses, choice), trl (prompt, chosen, rejected), hh (chosen, rejected) "
                          "or tldr (info, summaries, choice); or pass --format")


def parse_rows(rows: Iterable[tuple[str, str, Any]], fmt: str, *, require_choice: bool = True,
               source: str = "preferences") -> tuple[list[Comparison], str]:
    """``(comparisons, format)`` from ``(where, label, object)`` rows (``where``: ``file:line``, which starts each
    error; ``label``: ``line N``, which names the first row to another); ``fmt='auto'`` detects the format from the
    first row."""
    if fmt not in FORMATS:
        raise PreferenceError(f"unknown preference format {fmt!r}; use one of {', '.join(FORMATS)}")
    out: list[Comparison] = []
    k_expected, first, explicit = None, None, None
    for where, label, obj in rows:
        if fmt == "auto":
            fmt = detect_format(obj, where)
        if fmt == "trl" and isinstance(obj, dict):
            # Whether rows carry a 'prompt' is a property of the file (a column), fixed by its first row: a row
            # without one in a file with prompts is a mistake (another format mixed in), not an implicit prompt.
            explicit = ("prompt" in obj) if explicit is None else explicit
            if explicit and "prompt" not in obj:
                raise PreferenceError(f"{where}: missing field 'prompt' ({first or 'the first row'} has one; trl "
                                      "format)")
        row = PARSERS[fmt](obj, where)
        if row.choice is None and require_choice:
            _check_row(row.to_json(), where, True)  # ppojax's message for an unlabeled row
        if k_expected is None:
            k_expected, first = row.k, label
        elif row.k != k_expected:
            raise PreferenceError(f"{where}: {row.k} responses, but {first} has {k_expected}; every comparison in "
                                  "a file must have the same k")
        out.append(row)
    if not out:
        raise PreferenceError(f"preference data {source} holds no comparisons (empty, or only blank lines)")
    return out, fmt


def _jsonl_rows(path: Path) -> Iterator[tuple[str, str, Any]]:
    from ppojax.io.data import read_text_file

    text = read_text_file(path, "preference file", "a .jsonl file", PreferenceError)
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield f"{path}:{n}", f"line {n}", json.loads(line)
        except json.JSONDecodeError as e:
            raise PreferenceError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None


def _hub_rows(spec: str) -> Iterator[tuple[str, str, Any]]:
    """Rows of ``hf:NAME[:SPLIT]`` from the hub (``datasets``), checked reachable first so offline fails fast."""
    name, _, split = spec.removeprefix("hf:").partition(":")
    split = split or "train"
    if not name:
        raise PreferenceError(f"--data {spec!r}: expected hf:NAME[:SPLIT], e.g. hf:Anthropic/hh-rlhf:test")
    try:
        from datasets import load_dataset
    except ImportError:
        raise PreferenceError(f"--data {spec}: reading a hub dataset needs the `datasets` package (pip install "
                              "datasets); or pass a JSONL file") from None
    from ppojax.io.hub import hub_reachable

    if not hub_reachable():
        raise PreferenceError(f"--data {spec}: the Hugging Face hub is unreachable (or HF_HUB_OFFLINE=1); to work "
                              "offline, export the split to JSONL on a machine with access "
                              "(datasets' Dataset.to_json) and pass the file")
    try:
        ds = load_dataset(name, split=split)
    except Exception as e:  # noqa: BLE001 -- any loader failure is the user's input, said in one line
        raise PreferenceError(f"--data {spec}: could not load dataset {name!r} split {split!r}: "
                              f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
                              ) from None
    for i, row in enumerate(ds, 1):
        yield f"hf:{name}:{split} row {i}", f"row {i}", dict(row)


def load_preferences(source: str | os.PathLike, *, format: str = "auto",
                     require_choice: bool = True) -> tuple[list[Comparison], str]:
    """``(comparisons, format)`` from a JSONL file or ``hf:NAME[:SPLIT]``; ``format`` is a name in
    :data:`FORMATS` (``auto``: detected from the first row, and the detected name returned)."""
    text = str(source)
    rows = _hub_rows(text) if text.startswith("hf:") else _jsonl_rows(Path(source))
    return parse_rows(rows, format, require_choice=require_choice, source=text)


def messages_text(messages: Iterable[Mapping[str, str]], generation_prompt: bool = True) -> str:
    """Messages as ``role: content`` lines (a tokenizer without a chat template), then ``assistant:``."""
    lines = [f"{m['role']}: {m['content']}" for m in messages]
    return "\n".join(lines + (["assistant:"] if generation_prompt else []))
