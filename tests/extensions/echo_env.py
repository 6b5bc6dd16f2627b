"""User environments for the tests, registered from a module named under `imports:`.

``echo_turns``: the user echoes "again" until ``turns`` assistant turns are played; each turn earns the share of its
characters that are digits (any policy can be scored). ``faulty``: breaks its contract on purpose, after ``after``
step() calls in this process (the run's pre-training check makes a few): ``mode`` 'raise', 'hang' or 'bad_type'.
"""

import time

import ppojax


@ppojax.register_env("echo_turns")
class EchoTurns:
    observation_role = "user"

    def __init__(self, *, turns: int = 2):
        self.turns, self.played = turns, 0

    def reset(self, row, seed):
        return f"{row.prompt} (seed {seed % 100})"

    def step(self, text):
        self.played += 1
        reward = sum(c.isdigit() for c in text) / max(len(text), 1)
        return (None if self.played >= self.turns else "again"), reward, self.played >= self.turns


class Faulty:
    calls = 0

    def __init__(self, *, mode: str = "raise", after: int = 0):
        self.mode, self.after = mode, after

    def reset(self, row, seed):
        return "say something"

    def step(self, text):
        Faulty.calls += 1
        if Faulty.calls > self.after:
            if self.mode == "raise":
                raise RuntimeError("the sandbox crashed")
            if self.mode == "hang":
                time.sleep(3600)
            if self.mode == "bad_type":
                return ["not", "a", "tuple"]
        return None, 0.0, True


ppojax.register_env("faulty")(Faulty)
