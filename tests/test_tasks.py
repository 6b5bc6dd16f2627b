"""Tasks: the registry, the built-in tasks (arithmetic, gsm8k, file, sentiment) and the verifier, each checked
against values computed independently here (Python's own arithmetic, the GSM8K convention read by hand)."""

from __future__ import annotations

import json
import random
import re

import pytest

from ppojax.tasks import Row, Task, TaskContext, TaskError, build_task, check_task, task_names
from ppojax.tasks import verify


def ctx(num_eval=0, **prompts):
    from ppojax.train.config import PromptsConfig

    return TaskContext(prompts=PromptsConfig(**prompts) if prompts else PromptsConfig(), num_eval=num_eval)


# ----------------------------------------------------------------------------------------------------------------
# The verifier


@pytest.mark.parametrize("text, expected", [
    ("The answer is 12.", "12"), ("5 - 8 = -3", "-3"), ("no digits here", None), ("1,000 apples", "1,000"),
    ("it is 3.5 or 4", "4"), ("7 + 1 = 8. So the answer is 8", "8"), ("x=-12,", "-12"),
])
def test_last_number(text, expected):
    assert verify.last_number(text) == expected


@pytest.mark.parametrize("answer, target, same", [
    ("1,000", "1000", True), ("1000.0", "1000", True), ("-3", "-3", True), ("3", "-3", False), (None, "3", False),
    ("Paris", "paris", True), ("12", "12.5", False),
])
def test_same_answer(answer, target, same):
    assert verify.same_answer(answer, target) is same


def test_exact_answer_reward_and_format_bonus():
    responses = ["The answer is 7.", "It is seven.", "3 + 4 = 8"]
    assert verify.exact_answer(responses, ["7", "7", "7"]) == [1.0, 0.0, 0.0]
    assert verify.exact_answer(responses, ["7", "7", "7"], format_reward=0.1) == [1.1, 0.0, 0.1]
    assert verify.exact_answer(["#### 18", "so 18 #### 17"], ["18", "18"], extract="after_hash") == [1.0, 0.0]
    with pytest.raises(ValueError, match="reward.kwargs.extract='nope'"):
        verify.exact_answer(["1"], ["1"], extract="nope")


# ----------------------------------------------------------------------------------------------------------------
# arithmetic


def test_arithmetic_targets_are_the_values_of_the_expressions():
    task = build_task("arithmetic", ctx(num_eval=50), {"digits": 2, "operators": "+-*", "operands": 3})
    for row in [*task.train[:200], *task.eval]:
        expression = re.fullmatch(r"What is (.*)\?", row.prompt).group(1)
        a, op1, b, op2, c = expression.split()
        value = {"+": lambda x, y: x + y, "-": lambda x, y: x - y, "*": lambda x, y: x * y}
        # Precedence by hand: * binds first.
        if op2 == "*" and op1 != "*":
            expected = value[op1](int(a), int(b) * int(c))
        else:
            expected = value[op2](value[op1](int(a), int(b)), int(c))
        assert int(row.target) == expected, row
        assert all(10 <= int(n) <= 99 for n in (a, b, c))


def test_arithmetic_held_out_never_overlaps_and_is_deterministic():
    a = build_task("arithmetic", ctx(num_eval=60), {})
    b = build_task("arithmetic", ctx(num_eval=60), {})
    assert [r.prompt for r in a.train] == [r.prompt for r in b.train]
    assert [r.prompt for r in a.eval] == [r.prompt for r in b.eval]
    assert not {r.prompt for r in a.train} & {r.prompt for r in a.eval}
    assert len({r.prompt for r in a.eval}) == 60
    # Single-digit + and - have 200 problems: the held-out 60 leave 140 to train on.
    assert len(a.train) == 140
    other = build_task("arithmetic", ctx(num_eval=60), {"seed": 1})
    assert [r.prompt for r in other.eval] != [r.prompt for r in a.eval]
    # A longer held-out set extends the shorter one (the same stream).
    longer = build_task("arithmetic", ctx(num_eval=80), {})
    assert [r.prompt for r in longer.eval[:60]] == [r.prompt for r in a.eval]


def test_arithmetic_allow_negative_and_template():
    task = build_task("arithmetic", ctx(num_eval=20), {"operators": "-", "allow_negative": False,
                                                       "template": "Compute {expression}."})
    assert all(int(r.target) >= 0 for r in [*task.train, *task.eval])
    assert all(r.prompt.startswith("Compute ") and r.prompt.endswith(".") for r in task.train)


@pytest.mark.parametrize("kwargs, message", [
    ({"digits": 0}, "task.kwargs.digits"), ({"operators": "/"}, "task.kwargs.operators"),
    ({"operands": 1}, "task.kwargs.operands"), ({"template": "no slot"}, "task.kwargs.template"),
    ({"num_train": 500}, "num_train"), ({"digitz": 2}, "did you mean 'digits'"),
])
def test_arithmetic_bad_kwargs_are_one_line(kwargs, message):
    with pytest.raises(TaskError, match=re.escape(message)) as e:
        build_task("arithmetic", ctx(num_eval=20), kwargs)
    assert "\n" not in str(e.value)


def test_unknown_task_names_the_closest():
    with pytest.raises(TaskError, match="did you mean 'arithmetic'"):
        build_task("arithmetik", ctx(), {})
    assert {"arithmetic", "file", "gsm8k", "sentiment"} <= set(task_names())


# ----------------------------------------------------------------------------------------------------------------
# gsm8k and file tasks on fixtures written here, in the GSM8K schema

GSM8K_ROWS = [
    {"question": "Tom has 3 apples and buys 4 more. How many apples does he have?",
     "answer": "He has 3 + 4 = <<3+4=7>>7 apples.\n#### 7"},
    {"question": "A box holds 12 eggs. How many eggs are in 3 boxes?", "answer": "12 * 3 = <<12*3=36>>36\n#### 36"},
    {"question": "Sara had 1,250 dollars and spent 250. How much is left?",
     "answer": "1,250 - 250 = 1,000\n#### 1,000"},
    {"question": "A train goes 60 km per hour for 2 hours. How far does it go?", "answer": "60 * 2 = 120\n#### 120"},
    {"question": "There are 9 birds and 4 fly away. How many remain?", "answer": "9 - 4 = 5\n#### 5"},
]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_gsm8k_reads_the_number_after_hashes(tmp_path):
    path = _write_jsonl(tmp_path / "gsm8k.jsonl", GSM8K_ROWS)
    task = build_task("gsm8k", ctx(num_eval=2), {"path": str(path)})
    rows = {r.prompt.split("\n")[0]: r.target for r in [*task.train, *task.eval]}
    assert rows == {r["question"]: r["answer"].split("####")[-1].strip() for r in GSM8K_ROWS}
    assert len(task.eval) == 2 and len(task.train) == 3 and task.verifiable
    assert not {r.prompt for r in task.train} & {r.prompt for r in task.eval}
    assert all(r.prompt.endswith(verify_instruction()) for r in task.train)
    # The verifier reads the last number of a response; "1,000" equals the target "1,000" and "1000".
    assert task.correct("so she has 1000 dollars left", "1,000")
    assert task.correct("#### 36", "36") and not task.correct("36 eggs, not 35", "36")


def verify_instruction():
    from ppojax.tasks.gsm8k import INSTRUCTION

    return INSTRUCTION


def test_gsm8k_row_without_answer_names_the_line(tmp_path):
    rows = [dict(r) for r in GSM8K_ROWS]
    del rows[3]["answer"]
    path = _write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(TaskError, match=re.escape(f"{path}:4: the answer field 'answer' is missing")):
        build_task("gsm8k", ctx(num_eval=1), {"path": str(path)})
    rows[3]["answer"] = "no final marker"
    _write_jsonl(path, rows)
    with pytest.raises(TaskError, match=re.escape(f"{path}:4: no answer could be read")):
        build_task("gsm8k", ctx(num_eval=1), {"path": str(path)})


def test_file_task_with_answers_and_held_out_file(tmp_path):
    train = _write_jsonl(tmp_path / "train.jsonl", [{"q": f"Say {i}", "a": i} for i in range(10)])
    held = _write_jsonl(tmp_path / "held.jsonl", [{"q": f"Say {i}", "a": i} for i in range(10, 13)])
    task = build_task("file", ctx(path=str(train), field="q"), {"target_field": "a", "eval_path": str(held)})
    assert [r.target for r in task.train] == [str(i) for i in range(10)]
    assert [r.prompt for r in task.eval] == ["Say 10", "Say 11", "Say 12"]
    assert task.reward == "exact_answer" and task.verifiable
    overlap = _write_jsonl(tmp_path / "overlap.jsonl", [{"q": "Say 3", "a": 3}])
    with pytest.raises(TaskError, match="overlap the training prompts"):
        build_task("file", ctx(path=str(train), field="q"), {"target_field": "a", "eval_path": str(overlap)})


def test_sentiment_task_is_the_prompt_file_unchanged_without_eval(tmp_path):
    from ppojax.io.data import read_prompts

    path = tmp_path / "p.txt"
    path.write_text("one\ntwo\n\nthree\none\n")
    task = build_task("sentiment", ctx(path=str(path)), {})
    assert [r.prompt for r in task.train] == read_prompts(path) and not task.eval and task.reward is None
    held = build_task("sentiment", ctx(num_eval=1, path=str(path)), {})
    (held_key,) = [r.prompt for r in held.eval]
    assert held_key not in [r.prompt for r in held.train]  # every copy of a held-out prompt leaves training
    assert len(held.train) == 4 - (2 if held_key == "one" else 1)


def test_check_task_refuses_malformed_tasks():
    good = Row("a prompt", "1")
    with pytest.raises(TaskError, match="no target, but the task is verifiable"):
        check_task(Task(train=[Row("x")], verifiable=True, correct=lambda r, t: True))
    with pytest.raises(TaskError, match="not a ppojax.tasks.Row"):
        check_task(Task(train=["x"]))
    with pytest.raises(TaskError, match="no training rows"):
        check_task(Task(train=[]))
    with pytest.raises(TaskError, match="needs correct"):
        check_task(Task(train=[good], verifiable=True))
    messages = Row([{"role": "user", "content": "hi"}])
    assert check_task(Task(train=[messages])).train == [messages]
    with pytest.raises(TaskError, match="a prompt is a non-empty string"):
        check_task(Task(train=[Row([{"role": "user"}])]))


def test_arithmetic_streams_match_an_independent_draw():
    """The held-out stream is Python's random.Random seeded by name: redraw it here by the documented rule."""
    task = build_task("arithmetic", ctx(num_eval=5), {"digits": 1, "operators": "+", "seed": 3})
    rng = random.Random("ppojax-arithmetic-3-1")
    expected = []
    while len(expected) < 5:
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        rng.choice("+")
        text = f"What is {a} + {b}?"
        if text not in expected:
            expected.append(text)
    assert [r.prompt for r in task.eval] == expected
