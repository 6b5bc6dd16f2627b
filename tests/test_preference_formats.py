"""Preference data in the ecosystem's formats (TRL, Anthropic HH-RLHF, OpenAI summarize-from-feedback): fixtures
written here in each schema, parsed rows against expectations written by hand, file:line errors for malformed rows,
chat-message prompts through the chat template, and train_reward.py end to end on each format."""

import copy
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from ppojax.rl import preference_formats, preferences
from ppojax.rl.preferences import Comparison, PreferenceError

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "experiments"))


def _write(tmp_path, rows, name):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _msg(role, content):
    return {"role": role, "content": content}


# ---------------------------------------------------------------------------------------------------------------
# Fixtures in each schema, with the comparisons they must give (written by hand)

TRL_TEXT = [
    {"prompt": "The movie was", "chosen": " a joy.", "rejected": " dull."},
    {"prompt": "Q: 2+2?\nA:", "chosen": " 4", "rejected": " 5", "score_chosen": 9.0},  # extra keys are ignored
]
TRL_TEXT_EXPECTED = [
    Comparison("The movie was", (" a joy.", " dull."), 0),
    Comparison("Q: 2+2?\nA:", (" 4", " 5"), 0),
]

TRL_CHAT = [
    {"prompt": [_msg("system", "Be brief."), _msg("user", "Capital of France?")],
     "chosen": [_msg("assistant", "Paris.")], "rejected": [_msg("assistant", "Lyon, I think.")]},
    {"prompt": [_msg("user", "Hi"), _msg("assistant", "Hello! How can I help?"), _msg("user", "A color?")],
     "chosen": [_msg("assistant", "Blue.")], "rejected": [_msg("assistant", "No.")]},
]
TRL_CHAT_EXPECTED = [
    Comparison((_msg("system", "Be brief."), _msg("user", "Capital of France?")), ("Paris.", "Lyon, I think."), 0),
    Comparison((_msg("user", "Hi"), _msg("assistant", "Hello! How can I help?"), _msg("user", "A color?")),
               ("Blue.", "No."), 0),
]

# TRL's implicit prompt: whole conversations; the shared messages are the prompt. The second diverges one turn
# early, so its responses carry the turns after the assistant's first as "role: content" lines.
TRL_IMPLICIT_CHAT = [
    {"chosen": [_msg("user", "Name a fruit"), _msg("assistant", "Apple"), _msg("user", "Another"),
                _msg("assistant", "Pear")],
     "rejected": [_msg("user", "Name a fruit"), _msg("assistant", "Apple"), _msg("user", "Another"),
                  _msg("assistant", "Carrot")]},
    {"chosen": [_msg("user", "Hi"), _msg("assistant", "Hello"), _msg("user", "Bye"), _msg("assistant", "Bye!")],
     "rejected": [_msg("user", "Hi"), _msg("assistant", "Go away"), _msg("user", "Bye"), _msg("assistant", "Ok")]},
]
TRL_IMPLICIT_CHAT_EXPECTED = [
    Comparison((_msg("user", "Name a fruit"), _msg("assistant", "Apple"), _msg("user", "Another")),
               ("Pear", "Carrot"), 0),
    Comparison((_msg("user", "Hi"),), ("Hello\nuser: Bye\nassistant: Bye!", "Go away\nuser: Bye\nassistant: Ok"), 0),
]

TRL_IMPLICIT_TEXT = [
    {"chosen": "The cat sat on the mat", "rejected": "The catfish swam"},  # cut at a word boundary, not "The cat"
    {"chosen": "Q: why?\nA: because", "rejected": "Q: why?\nA: no idea"},
]
TRL_IMPLICIT_TEXT_EXPECTED = [
    Comparison("The", (" cat sat on the mat", " catfish swam"), 0),
    Comparison("Q: why?\nA:", (" because", " no idea"), 0),
]

HH = [
    {"chosen": "\n\nHuman: What is a good name for a cat?\n\nAssistant: Whiskers is a classic.",
     "rejected": "\n\nHuman: What is a good name for a cat?\n\nAssistant: Cats do not need names."},
    {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello! What can I do?\n\nHuman: Tell me a joke."
               "\n\nAssistant: Why did the chicken cross the road? To get to the other side.",
     "rejected": "\n\nHuman: Hi\n\nAssistant: Hello! What can I do?\n\nHuman: Tell me a joke."
                 "\n\nAssistant: No."},
    # The two share an Assistant turn's first words: the prompt still ends at the last shared "Assistant:".
    {"chosen": "\n\nHuman: Is it raining?\n\nAssistant: I am not sure, check a forecast.",
     "rejected": "\n\nHuman: Is it raining?\n\nAssistant: I am a language model."},
    # They differ from an earlier assistant turn on: the later turns belong to the responses.
    {"chosen": "\n\nHuman: Help me\n\nAssistant: Sure.\n\nHuman: Thanks\n\nAssistant: Welcome.",
     "rejected": "\n\nHuman: Help me\n\nAssistant: No.\n\nHuman: Thanks\n\nAssistant: Whatever."},
]
HH_EXPECTED = [
    Comparison("\n\nHuman: What is a good name for a cat?\n\nAssistant:",
               (" Whiskers is a classic.", " Cats do not need names."), 0),
    Comparison("\n\nHuman: Hi\n\nAssistant: Hello! What can I do?\n\nHuman: Tell me a joke.\n\nAssistant:",
               (" Why did the chicken cross the road? To get to the other side.", " No."), 0),
    Comparison("\n\nHuman: Is it raining?\n\nAssistant:",
               (" I am not sure, check a forecast.", " I am a language model."), 0),
    Comparison("\n\nHuman: Help me\n\nAssistant:",
               (" Sure.\n\nHuman: Thanks\n\nAssistant: Welcome.", " No.\n\nHuman: Thanks\n\nAssistant: Whatever."), 0),
]


def _tldr(post, title, sub, a, b, choice):
    return {"info": {"id": "t3_x", "post": post, "title": title, "subreddit": sub, "site": None, "article": None},
            "summaries": [{"text": a, "policy": "ref", "note": None}, {"text": b, "policy": "sup", "note": None}],
            "choice": choice, "worker": "w1", "batch": "b0", "split": "train"}


TLDR = [
    _tldr("My landlord raised the rent by 40%.", "Rent went up", "personalfinance", " Rent up 40%, what now?",
          "landlord bad", 1),
    _tldr("I (25F) forgot my friend's birthday.", "Forgot a birthday", "relationships", "Forgot it, feel awful.",
          " I forgot my friend's birthday.", 0),
]
TLDR_EXPECTED = [
    Comparison("SUBREDDIT: r/personalfinance\nTITLE: Rent went up\nPOST: My landlord raised the rent by 40%.\nTL;DR:",
               (" Rent up 40%, what now?", " landlord bad"), 1),
    Comparison("SUBREDDIT: r/relationships\nTITLE: Forgot a birthday\nPOST: I (25F) forgot my friend's birthday."
               "\nTL;DR:", (" Forgot it, feel awful.", " I forgot my friend's birthday."), 0),
]

CASES = {
    "trl_text": (TRL_TEXT, TRL_TEXT_EXPECTED, "trl"),
    "trl_chat": (TRL_CHAT, TRL_CHAT_EXPECTED, "trl"),
    "trl_implicit_chat": (TRL_IMPLICIT_CHAT, TRL_IMPLICIT_CHAT_EXPECTED, "trl"),
    "trl_implicit_text": (TRL_IMPLICIT_TEXT, TRL_IMPLICIT_TEXT_EXPECTED, "trl"),
    "hh": (HH, HH_EXPECTED, "hh"),
    "tldr": (TLDR, TLDR_EXPECTED, "tldr"),
    "ppojax": ([c.to_json() for c in TRL_TEXT_EXPECTED], TRL_TEXT_EXPECTED, "ppojax"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_format_parses_to_the_expected_comparisons(tmp_path, name):
    rows, expected, fmt = CASES[name]
    path = _write(tmp_path, rows, f"{name}.jsonl")
    got, detected = preference_formats.load_preferences(path)  # auto
    assert detected == fmt
    assert got == expected
    # Naming the format gives the same rows, and read_preferences (the pipeline's reader) takes the same argument.
    assert preference_formats.load_preferences(path, format=fmt) == (expected, fmt)
    assert preferences.read_preferences(path, format="auto") == expected


def test_implicit_text_without_the_hh_marker_is_detected_as_trl_and_hh_text_as_hh():
    assert preference_formats.detect_format(TRL_IMPLICIT_TEXT[0], "f:1") == "trl"
    assert preference_formats.detect_format(HH[0], "f:1") == "hh"
    with pytest.raises(PreferenceError, match=r"f:1: cannot tell the preference format from the keys \['a', 'b'\]"):
        preference_formats.detect_format({"a": 1, "b": 2}, "f:1")


def test_chat_rows_round_trip_through_ppojax_format(tmp_path):
    path = preferences.write_preferences(tmp_path / "chat.jsonl", TRL_CHAT_EXPECTED)
    assert preferences.read_preferences(path) == TRL_CHAT_EXPECTED
    assert json.loads(path.read_text().splitlines()[0])["query"][1] == {"role": "user",
                                                                        "content": "Capital of France?"}


# ---------------------------------------------------------------------------------------------------------------
# Malformed rows: one error naming file:line and what is wrong

GOOD_TRL = TRL_TEXT[0]
BAD = {  # (format, rows, bad line, words)
    "trl_missing_key": ("auto", [GOOD_TRL, {"prompt": "x", "chosen": " a"}], 2, "missing field 'rejected'"),
    "trl_structure_mismatch": ("auto", [GOOD_TRL, {"prompt": "x", "chosen": [_msg("assistant", "a")],
                                                   "rejected": " b"}],
                               2, "must all be strings or all lists of chat messages"),
    "trl_chat_chosen_not_assistant": ("trl", [{"prompt": [_msg("user", "x")], "chosen": [_msg("user", "a")],
                                               "rejected": [_msg("assistant", "b")]}],
                                      1, "'chosen' starts with a 'user' message"),
    "trl_bad_message": ("trl", [{"prompt": [{"role": "user"}], "chosen": [_msg("assistant", "a")],
                                 "rejected": [_msg("assistant", "b")]}], 1, "'prompt' message 0 must be an object"),
    "trl_implicit_nothing_shared": ("trl", [{"chosen": [_msg("user", "a")], "rejected": [_msg("user", "b")]}],
                                    1, "share no first message"),
    "trl_empty_response": ("trl", [GOOD_TRL, dict(GOOD_TRL, rejected=" ")], 2, "response 1 is empty"),
    "hh_missing_key": ("auto", [HH[0], {"chosen": HH[0]["chosen"]}], 2, "missing field 'rejected'"),
    "hh_no_shared_assistant": ("hh", [HH[0], {"chosen": "\n\nHuman: a\n\nAssistant: b",
                                              "rejected": "\n\nHuman: c\n\nAssistant: d"}],
                               2, "share no prefix ending in '\\n\\nAssistant:'"),
    "hh_identical_to_the_end": ("hh", [{"chosen": "\n\nHuman: a\n\nAssistant:",
                                        "rejected": "\n\nHuman: a\n\nAssistant:"}], 1, "response 0 is empty"),
    "hh_not_text": ("hh", [{"chosen": ["x"], "rejected": "y"}], 1, "must be dialogue strings"),
    "tldr_missing_key": ("auto", [TLDR[0], {k: v for k, v in TLDR[1].items() if k != "choice"}], 2,
                         "missing field 'choice'"),
    "tldr_three_summaries": ("auto", [TLDR[0], dict(TLDR[1], summaries=TLDR[1]["summaries"] * 2)], 2,
                             "'summaries' must be a list of 2 summaries, got 4"),
    "tldr_one_summary": ("tldr", [dict(TLDR[1], summaries=TLDR[1]["summaries"][:1])], 1, "got 1"),
    "tldr_choice_out_of_range": ("auto", [TLDR[0], TLDR[1], dict(TLDR[0], choice=2)], 3,
                                 "choice 2 is out of range for 2 responses"),
    "tldr_choice_missing_label": ("tldr", [dict(TLDR[0], choice=None)], 1, "'choice' is null"),
    "tldr_news_article": ("tldr", [dict(TLDR[0], info={"article": "News.", "site": "cnn", "post": None})], 1,
                          "a news-article row"),
    "not_json": ("auto", [GOOD_TRL, '{"prompt": "x"'], 2, "not valid JSON"),
    "unknown_keys": ("auto", [{"text": "x"}], 1, "cannot tell the preference format"),
    "format_changes_midway": ("auto", [GOOD_TRL, HH[0]], 2, "missing field 'prompt'"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_malformed_rows_name_file_and_line(tmp_path, name):
    fmt, rows, line, words = BAD[name]
    path = _write(tmp_path, rows, "bad.jsonl")
    with pytest.raises(PreferenceError) as e:
        preference_formats.load_preferences(path, format=fmt)
    message = str(e.value)
    assert message.startswith(f"{path}:{line}: ") and words in message and "\n" not in message, message


def test_hub_data_fails_in_one_line_without_datasets_or_without_the_hub(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(PreferenceError, match=r"hf:Anthropic/hh-rlhf: .*needs the `datasets` package"):
        preference_formats.load_preferences("hf:Anthropic/hh-rlhf")
    monkeypatch.delitem(sys.modules, "datasets")
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PreferenceError, match=r"hf:Anthropic/hh-rlhf:test: the Hugging Face hub is unreachable"):
        preference_formats.load_preferences("hf:Anthropic/hh-rlhf:test")


# ---------------------------------------------------------------------------------------------------------------
# Chat-message prompts become the ids the reward model sees


@pytest.fixture(scope="module")
def tok():
    import ppojax

    return ppojax.load_tokenizer("gpt2")


TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


def test_chat_prompts_are_rendered_by_the_template_or_as_role_lines(tok):
    rows = [TRL_CHAT_EXPECTED[0], TRL_TEXT_EXPECTED[0]]
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731

    def real_query(batch, i):
        return batch.query_ids[i][batch.query_mask[i] > 0].tolist()

    # No template (GPT-2): "role: content" lines, then "assistant:".
    plain = preferences.tokenize_preferences(tok, rows, query_length=32, response_length=8)
    assert real_query(plain, 0) == ids("system: Be brief.\nuser: Capital of France?\nassistant:")
    assert real_query(plain, 1) == ids("The movie was")
    assert plain.tokens[0, 0][plain.mask[0, 0] > 0].tolist() == ids("Paris.")

    # A template: its rendering of the messages with the generation prompt (expected text written by hand).
    templated = copy.deepcopy(tok)
    templated.chat_template = TEMPLATE
    chat = preferences.tokenize_preferences(templated, rows, query_length=32, response_length=8)
    assert real_query(chat, 0) == ids("<system>Be brief.\n<user>Capital of France?\n<assistant>")
    assert real_query(chat, 1) == ids("The movie was")  # text queries keep the plain path
    np.testing.assert_array_equal(chat.tokens, plain.tokens)


@pytest.mark.slow  # loading SmolLM2's tokenizer from its GGUF file takes ~10 s
def test_chat_prompts_through_a_real_instruct_template():
    import ppojax

    try:
        smol = ppojax.load_tokenizer("HuggingFaceTB/SmolLM2-135M-Instruct")
    except (OSError, ValueError) as e:
        pytest.skip(f"SmolLM2's tokenizer is not available here: {e}")
    batch = preferences.tokenize_preferences(smol, [TRL_CHAT_EXPECTED[0]], query_length=64, response_length=8)
    # SmolLM2's ChatML template, written out by hand: its own system message replaced by the row's.
    text = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nCapital of France?<|im_end|>\n"
            "<|im_start|>assistant\n")
    expected = smol(text, add_special_tokens=False)["input_ids"]
    assert batch.query_ids[0][batch.query_mask[0] > 0].tolist() == expected
    assert expected.count(smol.convert_tokens_to_ids("<|im_start|>")) == 3  # special tokens, not their letters


# ---------------------------------------------------------------------------------------------------------------
# train_reward.py on each format

TINY = ["--init", "random", "--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--n-positions", "48",
        "--query-length", "40", "--response-length", "8", "--batch-size", "8", "--lr", "1e-3", "--epochs", "1",
        "--normalize", "dataset", "--normalize-samples", "8", "--val-fraction", "0.25", "--seed", "3"]


def _many(rows, n=16):
    """``n`` rows cycled from the fixture (enough for a train/held-out split)."""
    return [rows[i % len(rows)] for i in range(n)]


@pytest.mark.slow  # about 10 s a format on 2 busy cores (model build, compile, checkpoint); ~1 min for the four
@pytest.mark.parametrize("name,fmt", [("trl_text", "trl"), ("trl_chat", "trl"), ("hh", "hh"), ("tldr", "tldr")])
def test_train_reward_runs_on_each_format_and_reports_the_split(tmp_path, capsys, name, fmt):
    import train_reward

    data = _write(tmp_path, _many(CASES[name][0]), f"{name}.jsonl")
    out = tmp_path / "rm"
    assert train_reward.main(["--data", str(data), "--out", str(out)] + TINY) == 0
    assert f"format {fmt} (detected)" in capsys.readouterr().err
    report = json.loads((out / "train_report.json").read_text())
    assert report["format"] == fmt and report["k"] == 2 and report["seed"] == 3
    assert report["val_fraction"] == 0.25 and report["val_comparisons"] == 4 and report["train_comparisons"] == 12
    assert 0.0 <= report["val_accuracy"] <= 1.0


@pytest.mark.parametrize("name,rows,words", [
    ("trl", [GOOD_TRL, {"prompt": "x", "chosen": " a"}], "bad.jsonl:2: missing field 'rejected'"),
    ("hh", [HH[0], {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: c\n\nAssistant: d"}],
     "bad.jsonl:2: 'chosen' and 'rejected' share no prefix"),
    ("tldr", [TLDR[0], dict(TLDR[1], choice=5)], "bad.jsonl:2: choice 5 is out of range"),
])
def test_train_reward_malformed_row_is_one_line_exit_2_nothing_written(tmp_path, capsys, name, rows, words):
    import train_reward

    data = _write(tmp_path, rows, "bad.jsonl")
    out = tmp_path / "rm"
    assert train_reward.main(["--data", str(data), "--out", str(out)] + TINY) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("train_reward.py: error:") and words in err and "\n" not in err, err
    assert not out.exists()
