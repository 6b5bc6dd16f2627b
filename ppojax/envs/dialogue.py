"""``scripted_user``: a dialogue whose user is a script. After each assistant turn the next scripted user message
follows, until the script ends.

The script comes from the row: a prompt that is a list of messages with several user turns plays them one at a time
(the first observation is the conversation up to and including the first user message; each later user message
follows the assistant's reply); a plain prompt is the first message, and ``followups`` (a list of strings) are the
user's later messages. The episode ends after the last scripted message has been answered.

Reward per assistant turn (placed at the end of that turn): ``reward_fn(reply, messages) -> float`` when given
(``'package.module:function'``: for example a reward model's scorer); else a documented PROXY of a helpful reply:
the share of the user message's content words (letters, 4+ characters) that the reply uses, times a length factor
(1 for 3..``max_words`` words, 0 for an empty reply, decaying past ``max_words``). It rewards staying on the user's
topic and being brief; it cannot tell a correct reply from one that repeats the question, which is how a policy
games it.
"""

from __future__ import annotations

import re
from typing import Optional, Sequence

from ppojax.envs.base import register_env
from ppojax.registry import resolve_callable

WORD = re.compile(r"[A-Za-z]{4,}")


def topic_reward(reply: str, user: str, *, max_words: int = 60) -> float:
    """The proxy (module docstring): ``|content words of user used in reply| / |content words of user|`` times
    ``min(1, words / 3)`` and ``min(1, max_words / words)``."""
    asked = {w.lower() for w in WORD.findall(user)}
    words = reply.split()
    if not words:
        return 0.0
    used = {w.lower() for w in WORD.findall(reply)}
    coverage = len(asked & used) / len(asked) if asked else 1.0
    return coverage * min(1.0, len(words) / 3) * min(1.0, max_words / len(words))


def positive_reply(reply: str, messages=None) -> float:
    """A dense reward for tiny-model demonstrations (``reward_fn: ppojax.envs.dialogue:positive_reply``): the mean
    VADER valence of the reply's words, ``sum_w valence(w) / (4 * n_words)`` (unknown words 0; VADER's valences lie
    in [-4, 4], so the reward lies in [-1, 1]). The text counterpart of the default run's lexicon reward."""
    from ppojax.rl.rewards import vader_lexicon

    table = _lexicon(vader_lexicon)
    words = [w.strip(".,!?;:'\"()").lower() for w in reply.split()]
    return sum(table.get(w, 0.0) for w in words) / (4.0 * len(words)) if words else 0.0


_LEXICON: dict = {}


def _lexicon(load) -> dict:
    if not _LEXICON:
        _LEXICON.update(load())
    return _LEXICON


@register_env("scripted_user")
class ScriptedUser:
    """One scripted conversation (the module docstring)."""

    observation_role = "user"

    def __init__(self, *, followups: Sequence[str] = (), reward_fn: Optional[str] = None, max_words: int = 60):
        self.followups = [str(f) for f in followups]
        self.reward_fn = resolve_callable(reward_fn, what="dialogue reward", key="env.kwargs.reward_fn") \
            if reward_fn else None
        self.max_words = int(max_words)
        self.messages: list = []
        self.script: list = []
        self.total = 0.0

    def reset(self, row, seed: int):
        if isinstance(row.prompt, str):
            first, self.script = [{"role": "user", "content": row.prompt}], list(self.followups)
        else:
            users = [i for i, m in enumerate(row.prompt) if m["role"] == "user"]
            if not users:
                raise ValueError("a scripted_user row's messages need at least one user message")
            first = [dict(m) for m in row.prompt[:users[0] + 1]]
            self.script = [m["content"] for m in row.prompt[users[0] + 1:] if m["role"] == "user"]
            self.script += list(self.followups)
        self.messages = first
        return row.prompt if isinstance(row.prompt, str) else first

    def step(self, text: str):
        user = self.messages[-1]["content"]
        self.messages = self.messages + [{"role": "assistant", "content": text}]
        reward = (float(self.reward_fn(text, list(self.messages))) if self.reward_fn is not None
                  else topic_reward(text, user, max_words=self.max_words))
        self.total += reward
        if not self.script:
            return None, reward, True
        nxt = self.script.pop(0)
        self.messages = self.messages + [{"role": "user", "content": nxt}]
        return nxt, reward, False

    @property
    def success(self) -> bool:
        """Every reply scored above 0.5 on average."""
        replies = sum(1 for m in self.messages if m["role"] == "assistant")
        return replies > 0 and self.total / replies > 0.5
