"""``guess``: a guessing game. The environment holds a number, the model guesses, the environment answers
"higher" or "lower"; fewer turns score more.

The number is drawn uniformly from ``low .. high`` by the episode's seed (the row's prompt is not used: any task's
rows serve as episode slots, e.g. ``arithmetic``'s). A guess is the last integer of the turn. Rewards: a correct
guess at turn ``t`` (1-based) ends the episode with ``1 - turn_penalty * (t - 1)`` (at least 0); a turn without a
number gets ``"Answer with a number between low and high."`` and ``invalid_reward``; reaching ``env.max_turns``
without the number scores 0. Binary search needs at most ``floor(log2(high - low + 1)) + 1`` turns (5 for
1..16).
"""

from __future__ import annotations

import random
import re

from ppojax.envs.base import register_env

NUMBER = re.compile(r"-?\d+")


@register_env("guess")
class GuessingGame:
    """One game (the module docstring)."""

    observation_role = "user"

    def __init__(self, *, low: int = 1, high: int = 16, turn_penalty: float = 0.1, invalid_reward: float = 0.0):
        if not (isinstance(low, int) and isinstance(high, int) and low < high):
            raise ValueError(f"env.kwargs: low < high are integers, got low={low!r}, high={high!r}")
        self.low, self.high = low, high
        self.turn_penalty, self.invalid_reward = float(turn_penalty), float(invalid_reward)
        self.number = None
        self.turns = 0
        self.success = False

    def reset(self, row, seed: int):
        self.number = random.Random(f"ppojax-guess-{seed}").randint(self.low, self.high)
        return (f"Let's play a game. I picked a whole number from {self.low} to {self.high}. Guess it: reply with "
                "just a number, and I will say higher or lower.")

    def step(self, text: str):
        self.turns += 1
        numbers = NUMBER.findall(text)
        if not numbers:
            return f"Answer with a number between {self.low} and {self.high}.", self.invalid_reward, False
        guess = int(numbers[-1])
        if guess == self.number:
            self.success = True
            return None, max(0.0, 1.0 - self.turn_penalty * (self.turns - 1)), True
        return ("Higher." if guess < self.number else "Lower."), 0.0, False
