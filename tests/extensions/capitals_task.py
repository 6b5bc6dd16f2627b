"""A user task for the tests: a prompt generator, its own verifier (a registered host reward) and a held-out set,
registered from a module named under `imports:`."""

import ppojax
from ppojax.tasks import Row, Task

PAIRS = [(f"country{i}", f"city{i}") for i in range(40)]


def says_capital(response: str, target: str) -> bool:
    return target in response.split()


@ppojax.register_reward("says_capital", host=True)
def says_capital_reward(responses, targets):
    return [float(says_capital(r, t)) for r, t in zip(responses, targets)]


@ppojax.register_task("capitals")
def capitals(ctx, *, n_eval: int = 8):
    rows = [Row(f"The capital of {country} is", target=city) for country, city in PAIRS]
    return Task(train=rows[n_eval:], eval=rows[:n_eval], reward="says_capital", verifiable=True,
                correct=says_capital, source="tests.extensions.capitals_task")


@ppojax.register_task("leaky")
def leaky(ctx):
    rows = [Row(f"The capital of {country} is", target=city) for country, city in PAIRS]
    return Task(train=rows, eval=rows[:3], reward="says_capital", verifiable=True, correct=says_capital)
