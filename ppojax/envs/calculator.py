"""``calculator``: a calculator tool for the ``arithmetic`` task (and any task whose rows have numeric targets).

The first observation is the row's question followed by the tool's instructions. In a turn the model may call the
tool by writing an expression between tags, ``<calc>23 * 7</calc>``; the environment answers with a tool turn
holding the result, ``161`` (role ``tool``). A turn without a call is the final answer: it is checked with the
``exact_answer`` verifier (the last number of the text against the row's target) and ends the episode with reward
1 (correct) or 0. A malformed call (anything but integers, ``+ - * / ( )`` and spaces, or more than 64 characters)
gets ``"error: ..."`` back and no reward. Reaching ``env.max_turns`` without a final answer scores 0.

Rewards (``answer_reward`` for a correct answer, ``call_reward`` for each well-formed call, default 0) are placed
at the end of the turn that earned them (``env.credit: turn``).
"""

from __future__ import annotations

import ast
import operator
import re
from typing import Optional

from ppojax.envs.base import register_env
from ppojax.tasks.verify import is_correct

CALL = re.compile(r"<calc>(.*?)</calc>", re.DOTALL)
INSTRUCTIONS = ("You may use a calculator: write <calc>expression</calc> (for example <calc>12 * 7</calc>) and "
                "you will get the result. When you know the answer, reply with just the number.")
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.USub: operator.neg, ast.UAdd: operator.pos}


def evaluate(expression: str) -> str:
    """The value of an integer expression over ``+ - * /`` and parentheses, as text (an exact integer when it is
    one); ValueError for anything else (no names, calls or powers are ever evaluated)."""
    if len(expression) > 64:
        raise ValueError("the expression is longer than 64 characters")
    tree = ast.parse(expression.strip(), mode="eval")

    def value(node):
        if isinstance(node, ast.Expression):
            return value(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Div) and right == 0:
                raise ValueError("division by zero")
            return _OPS[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](value(node.operand))
        raise ValueError("only integers, + - * / and parentheses are allowed")

    result = value(tree)
    if isinstance(result, float):
        return str(int(result)) if result.is_integer() else f"{result:.6g}"
    return str(result)


@register_env("calculator")
class Calculator:
    """One calculator episode (the module docstring)."""

    observation_role = "tool"

    def __init__(self, *, answer_reward: float = 1.0, call_reward: float = 0.0, instructions: str = INSTRUCTIONS):
        self.answer_reward, self.call_reward, self.instructions = float(answer_reward), float(call_reward), instructions
        self.target: Optional[str] = None
        self.success = False
        self.calls = 0

    def reset(self, row, seed: int):
        if row.target is None:
            raise ValueError("the calculator environment needs rows with a target (a task such as arithmetic)")
        self.target = str(row.target)
        question = row.prompt if isinstance(row.prompt, str) else row.prompt[-1]["content"]
        return f"{question}\n{self.instructions}"

    def step(self, text: str):
        call = CALL.search(text)
        if call is None:  # the final answer
            self.success = is_correct(text, self.target, extract="last_number")
            return None, self.answer_reward if self.success else 0.0, True
        self.calls += 1
        try:
            return evaluate(call.group(1)), self.call_reward, False
        except (ValueError, SyntaxError, RecursionError) as e:
            return f"error: {str(e).splitlines()[0] if str(e) else 'not an expression'}", 0.0, False
