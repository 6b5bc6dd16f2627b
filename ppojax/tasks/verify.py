"""Verifiers: read the answer back out of a response and compare it with a row's target.

The reward ``exact_answer`` (registered for ``reward.kind``) scores

    r = 1[answer(response) == target] + format_reward * 1[answer(response) exists]

where ``answer`` is one of the extractors below. Numbers compare as numbers (``"1,000"``, ``"1000.0"`` and
``"1000"`` are equal); anything else compares as stripped text, case-insensitively.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Callable, Optional, Sequence

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_HASH = re.compile(r"####\s*(.+)")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def last_number(text: str) -> Optional[str]:
    """The last number written in ``text`` (``-?digits`` with optional thousands commas and decimals), or None."""
    found = _NUMBER.findall(text or "")
    return found[-1].rstrip(",") if found else None


def after_hash(text: str) -> Optional[str]:
    """GSM8K's answer convention: the number after the last ``####``, or None."""
    found = _HASH.findall(text or "")
    return last_number(found[-1]) if found else None


def boxed(text: str) -> Optional[str]:
    """The contents of the last ``\\boxed{...}`` (MATH's convention), or None."""
    found = _BOXED.findall(text or "")
    return found[-1].strip() if found else None


def last_word(text: str) -> Optional[str]:
    """The last word of ``text`` without punctuation, or None."""
    words = re.findall(r"[\w'-]+", text or "")
    return words[-1] if words else None


EXTRACTORS: dict[str, Callable[[str], Optional[str]]] = {
    "last_number": last_number, "after_hash": after_hash, "boxed": boxed, "last_word": last_word}
"""The answer extractors ``exact_answer`` takes by name (``reward.kwargs.extract``)."""


def _as_number(text: str) -> Optional[Decimal]:
    try:
        return Decimal(text.replace(",", "").strip())
    except (InvalidOperation, AttributeError):
        return None


def same_answer(answer: Optional[str], target: str) -> bool:
    """``answer == target``: as numbers when both read as numbers, else as stripped, case-folded text."""
    if answer is None:
        return False
    a, t = _as_number(answer), _as_number(str(target))
    if a is not None and t is not None:
        return a == t
    return answer.strip().casefold() == str(target).strip().casefold()


def extractor(extract: str) -> Callable[[str], Optional[str]]:
    """The extractor named ``extract``; ValueError naming ``reward.kwargs.extract`` otherwise."""
    if extract not in EXTRACTORS:
        raise ValueError(f"reward.kwargs.extract={extract!r}: unknown answer extractor (one of "
                         f"{', '.join(sorted(EXTRACTORS))})")
    return EXTRACTORS[extract]


def is_correct(response: str, target: str, extract: str = "last_number") -> bool:
    """Whether the answer ``extract`` reads from ``response`` equals ``target``."""
    return same_answer(extractor(extract)(response), target)


def exact_answer(responses: Sequence[str], targets: Sequence[str], *, extract: str = "last_number",
                 format_reward: float = 0.0) -> list[float]:
    """``1[answer == target] + format_reward * 1[an answer was found]`` per response (the module docstring)."""
    read = extractor(extract)
    out = []
    for response, target in zip(responses, targets, strict=True):
        answer = read(response)
        out.append(float(same_answer(answer, target)) + (float(format_reward) if answer is not None else 0.0))
    return out


def _register() -> None:
    from ppojax.rl.rewards import register_reward

    register_reward("exact_answer", host=True)(exact_answer)


_register()

__all__ = ["EXTRACTORS", "after_hash", "boxed", "exact_answer", "extractor", "is_correct", "last_number",
           "last_word", "same_answer"]
