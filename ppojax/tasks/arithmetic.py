"""``arithmetic``: seeded integer problems with a verifier that reads the last number of the response.

Problem ``i`` of a stream is a pure function of ``(seed, stream, i)``: operands are drawn uniformly with the given
number of digits, operators from the given set, and the prompt is ``template`` with the expression filled in
(``{expression}``; the default asks "What is 3 + 4?"). The training stream and the evaluation stream use different
seeds, and any evaluation problem whose expression also occurs among the training problems is skipped, so the two
sets never overlap. The target is the exact integer value (Python's precedence: ``2 + 3 * 4 = 14``).

Reward (``exact_answer``): 1 when the last number of the response equals the value, else 0, plus ``format_reward``
(default 0) when the response contains a number at all.
"""

from __future__ import annotations

import random
from typing import Optional

from ppojax.tasks.base import Row, Task, TaskContext, register_task
from ppojax.tasks.verify import is_correct

DEFAULT_TEMPLATE = "What is {expression}?"
_TRAIN_STREAM, _EVAL_STREAM = 0, 1


def problem(rng: random.Random, *, digits: int, operators: str, operands: int,
            allow_negative: bool, min_operand: Optional[int] = None) -> tuple[str, int]:
    """One problem ``(expression, value)`` drawn from ``rng``."""
    low = (0 if digits == 1 else 10 ** (digits - 1)) if min_operand is None else min_operand
    high = 10 ** digits - 1
    while True:
        numbers = [rng.randint(low, high) for _ in range(operands)]
        ops = [rng.choice(operators) for _ in range(operands - 1)]
        expression = str(numbers[0]) + "".join(f" {op} {n}" for op, n in zip(ops, numbers[1:]))
        value = eval(expression, {"__builtins__": {}})  # built from ints and + - * only
        if allow_negative or value >= 0:
            return expression, int(value)


def problems(seed: int, stream: int, n: Optional[int], exclude=frozenset(), **settings) -> list[tuple[str, int]]:
    """Up to ``n`` distinct problems of one stream of ``seed``, none of whose expressions is in ``exclude`` (a pure
    function of its arguments). ``n=None``: as many as the settings allow, up to 5000. Raises ValueError when
    fewer than ``n`` exist."""
    rng = random.Random(f"ppojax-arithmetic-{seed}-{stream}")
    want = 5000 if n is None else n
    seen, out, misses = set(exclude), [], 0
    while len(out) < want:
        expression, value = problem(rng, **settings)
        if expression in seen:
            misses += 1
            if misses > 20 * want + 2000:  # the space is exhausted
                if n is None:
                    break
                raise ValueError(f"only {len(out)} distinct problems are left at these settings, {n} were asked for")
            continue
        seen.add(expression)
        out.append((expression, value))
    return out


@register_task("arithmetic")
def arithmetic(ctx: TaskContext, *, digits: int = 1, operators: str = "+-", operands: int = 2,
               allow_negative: bool = True, num_train: Optional[int] = None, num_eval: Optional[int] = None,
               template: str = DEFAULT_TEMPLATE, format_reward: float = 0.0, seed: int = 0,
               min_operand: Optional[int] = None) -> Task:
    """Integer arithmetic (the module docstring).

    Args:
      digits: digits per operand (1: 0-9, 2: 10-99, ...).
      operators: the operators drawn from, a string of ``+``, ``-`` and ``*``.
      operands: numbers per problem (2: ``a + b``).
      allow_negative: keep problems whose value is negative (else they are redrawn).
      num_train: training problems (distinct; None: every problem the settings allow that is not held out, up to
        5000).
      num_eval: held-out problems (default: the run's ``eval.num_prompts``, at least 1).
      template: the prompt, with ``{expression}`` where the problem goes.
      format_reward: added to the reward of a response that contains a number at all.
      min_operand: the smallest operand (default 0 for one digit, else the smallest number of ``digits`` digits).
        1 closes a loophole of the last-number verifier: a response that only restates ``0 + 5`` ends with the
        right number.
      seed: the problems' seed, independent of the run's seed: runs of different seeds train and are judged on the
        same problems.
    """
    if not isinstance(digits, int) or not 1 <= digits <= 9:
        raise ValueError(f"task.kwargs.digits must be an int from 1 to 9, got {digits!r}")
    if not isinstance(operators, str) or not operators or set(operators) - set("+-*"):
        raise ValueError(f"task.kwargs.operators must be a string of '+', '-' and '*', got {operators!r}")
    if not isinstance(operands, int) or operands < 2:
        raise ValueError(f"task.kwargs.operands must be an int >= 2, got {operands!r}")
    if num_train is not None and (not isinstance(num_train, int) or num_train < 1):
        raise ValueError(f"task.kwargs.num_train must be an int >= 1, got {num_train!r}")
    if "{expression}" not in template:
        raise ValueError(f"task.kwargs.template must contain {{expression}}, got {template!r}")
    n_eval = num_eval if num_eval is not None else max(ctx.num_eval, 1)
    if not isinstance(n_eval, int) or n_eval < 1:
        raise ValueError(f"task.kwargs.num_eval must be an int >= 1, got {num_eval!r}")
    if min_operand is not None and (isinstance(min_operand, bool) or not isinstance(min_operand, int) or
                                    not 0 <= min_operand < 10 ** digits - 1):
        raise ValueError(f"task.kwargs.min_operand must be an int from 0 to {10 ** digits - 2}, got {min_operand!r}")
    settings = dict(digits=digits, operators=operators, operands=operands, allow_negative=allow_negative,
                    min_operand=min_operand)
    try:  # held-out problems first, from their own stream; training problems exclude them
        held_out = problems(seed, _EVAL_STREAM, n_eval, **settings)
        train = problems(seed, _TRAIN_STREAM, num_train, exclude={e for e, _ in held_out}, **settings)
    except ValueError as e:
        raise ValueError(f"{e}: lower task.kwargs.num_train or eval.num_prompts, or raise task.kwargs.digits"
                         ) from None
    if not train:
        raise ValueError("the held-out problems use up every problem at these settings: lower eval.num_prompts or "
                         "raise task.kwargs.digits")
    render = lambda e: template.format(expression=e)  # noqa: E731
    return Task(train=[Row(render(e), str(v)) for e, v in train],
                eval=[Row(render(e), str(v)) for e, v in held_out],
                reward="exact_answer", reward_kwargs={"extract": "last_number", "format_reward": format_reward},
                verifiable=True, correct=is_correct, source=f"generated (seed {seed}, {digits}-digit, {operators})")
