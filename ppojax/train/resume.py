"""Resume safety: one-line messages for a checkpoint that cannot resume this run, saying first when LoRA is why.

A checkpoint saved by a full fine-tune does not fit a LoRA state (adapters over a frozen base) and the other way
round; neither do adapters of another rank or on other modules. :func:`describe_mismatch` reads that from a
``CheckpointMismatchError``'s key paths; :func:`describe_config_change` from the two runs' LoRA settings alone, before
any state is built.
"""

from __future__ import annotations

import re
from typing import Any, Optional, Sequence

from ppojax.rl.roles import is_lora

# Key paths as CheckpointMismatchError lists them: ".frozen['base']..." (a TrainState) or "['frozen']['base']..." (a
# dict of its fields, as the runner saves). Only a LoRA state has adapters and frozen['base']; only a full fine-tune
# has the actor's trunk and frozen['ref'].
_LORA_ONLY = re.compile(r"\['lora_[ab]'\]|frozen(?:'\])?\['base'\]")
_FULL_ONLY = re.compile(r"\['actor'\]\['transformer'\]|frozen(?:'\])?\['ref'\]")
_ACTOR_ADAPTER = re.compile(r"\['actor'\]\['([^']+)'\]\['lora_[ab]'\]")
_RANKS = re.compile(r"\['lora_a'\]: checkpoint \w+\[(?:\d+, )*(\d+)\], target \w+\[(?:\d+, )*(\d+)\]")


def describe_mismatch(error: BaseException, target: Any) -> str:
    """The message for a checkpoint that does not fit its restore target, saying first when LoRA is the cause.

    ``error``: the ``CheckpointMismatchError`` of ``Checkpointer.restore`` (it lists the key paths only in the
    checkpoint, only in the target, and those whose shape differs); ``target``: the train state restored into (or its
    role view). The paths only in the checkpoint tell its kind: adapters and ``frozen['base']`` exist only in a LoRA
    state, the actor's trunk and ``frozen['ref']`` only in a full fine-tune. Returns ``str(error)`` unchanged when
    LoRA is not the cause. A runner::

        except CheckpointMismatchError as e:
            raise CheckpointMismatchError(resume.describe_mismatch(e, state)) from e
    """
    text = str(error)
    only_target = only_saved = differ = ""
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("in the target but not the checkpoint:"):
            only_target = line
        elif line.startswith("in the checkpoint but not the target:"):
            only_saved = line
        elif line.startswith("shape/dtype differs:"):
            differ = line
    target_lora = is_lora(getattr(getattr(target, "setup", None), "roles", target))
    saved_lora = not _FULL_ONLY.search(only_saved) if target_lora else bool(_LORA_ONLY.search(only_saved))
    if target_lora and not saved_lora:
        head = _FULL_INTO_LORA
    elif saved_lora and not target_lora:
        head = _LORA_INTO_FULL
    elif target_lora:
        ranks = _RANKS.search(differ)
        in_target, in_saved = set(_ACTOR_ADAPTER.findall(only_target)), set(_ACTOR_ADAPTER.findall(only_saved))
        if ranks:
            head = _other_rank(ranks.group(1), ranks.group(2))
        elif in_target or in_saved:
            head = _other_targets(in_saved, in_target)
        else:
            return text
    else:
        return text
    return f"{head}.\n{text}"


_FULL_INTO_LORA = ("this checkpoint was saved by a full fine-tuning run (no LoRA adapters), but this run uses LoRA "
                   "(lora.rank > 0): resume it with lora.rank: 0, or start the LoRA run in a new run directory")
_LORA_INTO_FULL = ("this checkpoint was saved by a LoRA run (adapters over a frozen base), but this run fine-tunes "
                   "every weight (lora.rank: 0): resume it with the run's lora settings, or start a new run directory")


def _other_rank(saved, now) -> str:
    return f"this checkpoint's LoRA adapters have rank {saved}, this run's rank {now}: resume with the checkpoint's " \
           "lora.rank"


def _other_targets(saved: set, now: set) -> str:
    return (f"this checkpoint's LoRA adapters are on other modules than this run's lora.targets (only in the "
            f"checkpoint: {sorted(saved - now) or 'none'}; only in this run: {sorted(now - saved) or 'none'}): "
            "resume with the checkpoint's lora.targets")


def describe_config_change(saved: tuple[int, Sequence[str]], now: tuple[int, Sequence[str]]) -> Optional[str]:
    """The sentence :func:`describe_mismatch` would lead with, from the two runs' LoRA settings alone, so that a job
    can refuse a resume before building any state. ``saved``/``now``: ``(rank, targets)`` of the checkpoint's run and
    of this one, rank 0 for full fine-tuning, targets resolved (``roles_from_config(...).targets``: an empty config
    list means all of the family's). None when the adapters' shapes agree (an ``alpha`` change alone is a plain
    config change)."""
    (saved_rank, saved_targets), (rank, targets) = saved, now
    if rank and not saved_rank:
        return _FULL_INTO_LORA
    if saved_rank and not rank:
        return _LORA_INTO_FULL
    if saved_rank != rank:
        return _other_rank(saved_rank, rank)
    if rank and set(saved_targets) != set(targets):
        return _other_targets(set(saved_targets), set(targets))
    return None
