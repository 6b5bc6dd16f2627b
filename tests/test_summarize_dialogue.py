"""The ``summarize`` and ``dialogue`` tasks: rows in each schema (fixtures written here into tmp_path), rendering,
post and response truncation, the ROUGE-L reward against a slow reference written here, one-line errors for
malformed rows and an unreachable hub; and (slow) the offline pipeline's ``--task summarize`` / ``--task dialogue``
on a tiny random policy."""

from __future__ import annotations

import itertools
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ppojax.tasks import TaskContext, TaskError, build_task
from ppojax.tasks import dialogue as dlg
from ppojax.tasks import summarize as summ

REPO = Path(__file__).resolve().parent.parent

POST = ("I moved to a new city last month for a job. The job is fine, but I do not know anyone here and I spend\n"
        "every weekend alone in my apartment. How do people make friends as adults?")


def ctx(num_eval=0, **prompts):
    from ppojax.train.config import PromptsConfig

    return TaskContext(prompts=PromptsConfig(**prompts), num_eval=num_eval)


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def frame(subreddit, title, post):
    return f"SUBREDDIT: r/{subreddit}\nTITLE: {title}\nPOST: {post}\nTL;DR:"


# ----------------------------------------------------------------------------------------------------------------
# summarize: schemas and rendering


@pytest.mark.parametrize("schema", ["carper", "trl", "fields", "plain"])
def test_summarize_reads_each_schema_into_the_tldr_frame(tmp_path, schema):
    row = {"carper": {"prompt": frame("relationships", "Lonely in a new city", POST), "label": "no friends yet"},
           "trl": {"prompt": frame("relationships", "Lonely in a new city", POST), "completion": " no friends yet"},
           "fields": {"subreddit": "relationships", "title": "Lonely in a new city", "post": POST,
                      "summary": "no friends yet"},
           "plain": {"prompt": POST}}[schema]
    path = write_jsonl(tmp_path / "docs.jsonl", [row])
    task = build_task("summarize", ctx(max_prompt_tokens=512), {"path": str(path)})
    (only,) = task.train
    if schema == "plain":  # no frame in the text: the text is the post, and there is no reference
        assert only.prompt == f"POST: {POST}\nTL;DR:" and only.target is None and task.reward is None
    else:
        assert only.prompt == frame("relationships", "Lonely in a new city", POST)
        assert only.target == "no friends yet" and task.reward == "rouge_l"


def test_summarize_chat_format_is_one_user_message_and_needs_prompts_chat(tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", [{"title": "Lonely", "post": POST}])
    task = build_task("summarize", ctx(chat=True, max_prompt_tokens=512), {"path": str(path), "format": "chat"})
    assert task.train[0].prompt == [{"role": "user", "content": f"{summ.INSTRUCTION}\n\nLonely\n\n{POST}"}]
    with pytest.raises(TaskError) as e:
        build_task("summarize", ctx(max_prompt_tokens=512), {"path": str(path), "format": "chat"})
    assert "prompts.chat: true" in str(e.value) and "\n" not in str(e.value)


def test_summarize_holds_out_eval_rows(tmp_path):
    rows = [{"post": f"Post number {i} about topic {i}.", "summary": f"topic {i}"} for i in range(30)]
    path = write_jsonl(tmp_path / "docs.jsonl", rows)
    task = build_task("summarize", ctx(num_eval=5), {"path": str(path)})
    assert len(task.train) == 25 and len(task.eval) == 5
    assert not {r.key() for r in task.eval} & {r.key() for r in task.train}


def test_post_is_cut_to_fit_the_query_with_gpt2s_tokenizer(tmp_path):
    """The whole query fits prompts.max_prompt_tokens in the named tokenizer, the post is cut at a line break or a
    space, and it is the longest such cut that fits."""
    import ppojax

    tok = ppojax.load_tokenizer("gpt2")
    n = lambda text: len(tok(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    long_post = " ".join(f"word{i}" for i in range(300))
    path = write_jsonl(tmp_path / "docs.jsonl", [{"subreddit": "test", "title": "A title", "post": long_post},
                                                 {"subreddit": "test", "title": "Short", "post": POST}])
    task = build_task("summarize", ctx(max_prompt_tokens=100), {"path": str(path), "tokenizer": "gpt2"})
    cut, kept = task.train
    assert n(cut.prompt) <= 100 and cut.prompt.endswith("\nTL;DR:")
    post = cut.prompt.split("POST: ", 1)[1].removesuffix("\nTL;DR:")
    assert long_post.startswith(post) and long_post[len(post)] == " "  # cut between words
    next_word = long_post[len(post):].split()[0]
    assert n(summ.render(summ.parse_document({"subreddit": "test", "title": "A title", "post": "x"}, "t"), "tldr",
                         "", post + " " + next_word)) > 100  # one more word would not fit
    assert kept.prompt == frame("test", "Short", POST)  # a post that fits is left whole


def test_post_cut_prefers_the_last_line_break():
    doc = summ.Document(post="first line here\nsecond line is long and goes on and on and on")
    count = summ.count_tokens_estimate
    budget = count(summ.render(doc, "tldr", "", "first line here second")) + 1
    prompt = summ.fit_prompt(doc, "tldr", "", budget, count)
    assert prompt == "POST: first line here\nTL;DR:"
    with pytest.raises(ValueError, match="max_prompt_tokens=2"):
        summ.fit_prompt(doc, "tldr", "", 2, count)


# ----------------------------------------------------------------------------------------------------------------
# summarize: responses, truncation and rewards


def test_tldr_config_truncates_after_the_first_line_break_with_the_rollouts_truncation():
    """configs/tldr.yaml reuses lm-human-preferences' truncation (ppo.truncate_token) on '\\n', and the rollout's
    truncate_after_stop then leaves the summary's first line, as first_line does on text."""
    import jax.numpy as jnp

    import ppojax
    from ppojax.io import configlib
    from ppojax.rl.rewards import truncate_after_stop

    cfg = configlib.load_yaml(REPO / "configs" / "tldr.yaml")
    token = cfg["ppo"]["truncate_token"]
    tok = ppojax.load_tokenizer("gpt2")
    assert tok.decode([token]) == "\n"
    text = " He misses his friends.\nEDIT: thanks all"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    tokens, mask, found = truncate_after_stop(jnp.asarray([ids]), jnp.ones((1, len(ids)), jnp.int32),
                                              stop_token=token, min_length=cfg["ppo"]["truncate_after"],
                                              pad_token_id=tok.pad_token_id)
    kept = [int(t) for t, m in zip(tokens[0], mask[0]) if m]
    assert bool(found[0]) and tok.decode(kept) == " He misses his friends.\n"
    assert summ.first_line(text) == "He misses his friends." == summ.first_line(tok.decode(kept))


def _lcs_slow(a, b):
    """The longest common subsequence by brute force: the longest subsequence of ``a`` that is one of ``b``."""
    def is_subsequence(s, t):
        it = iter(t)
        return all(x in it for x in s)

    for size in range(min(len(a), len(b)), 0, -1):
        if any(is_subsequence(s, b) for s in itertools.combinations(a, size)):
            return size
    return 0


def test_rouge_l_f1_matches_a_brute_force_reference():
    rng = random.Random(0)
    vocab = ["the", "cat", "sat", "on", "mat", "a", "dog"]
    for _ in range(200):
        c = [rng.choice(vocab) for _ in range(rng.randint(0, 9))]
        r = [rng.choice(vocab) for _ in range(rng.randint(0, 9))]
        lcs = _lcs_slow(c, r)
        expected = 0.0 if not lcs else 2 * (lcs / len(c)) * (lcs / len(r)) / (lcs / len(c) + lcs / len(r))
        assert summ.rouge_l_f1(" ".join(c), " ".join(r)) == pytest.approx(expected, abs=1e-12), (c, r)
    assert summ.rouge_l_f1("The Cat, sat!", "the cat sat") == 1.0  # lowercased words, punctuation ignored


def test_rouge_l_reward_scores_the_first_line_against_the_target():
    scores = summ.rouge_l(["cat sat on the mat\nand then more words", "dog"], ["the cat sat on the mat", "cat"])
    assert scores[0] == pytest.approx(2 * 1.0 * (5 / 6) / (1.0 + 5 / 6)) and scores[1] == 0.0
    with pytest.raises(ValueError, match="reference summary"):
        summ.rouge_l(["x"], [None])


def test_rouge_l_is_a_registered_host_reward_that_reads_targets():
    from ppojax.rl.rewards import host_reward_from_text, reward_names

    assert "rouge_l" in reward_names()
    with pytest.raises(ValueError, match="targets"):
        host_reward_from_text(summ.rouge_l, tokenizer=None, targets_of=None)


def test_coverage_judge_rewards_content_words_and_penalises_length():
    doc = "The assert statement inserts debugging assertions into a program."
    assert summ.content_words(doc) == ["assert", "statement", "inserts", "debugging", "assertions", "program"]
    assert summ.coverage_judge("assert statement debugging", doc) == pytest.approx(3 / 6)
    assert summ.coverage_judge("nothing relevant", doc) == 0.0
    long = "assert statement debugging " + " ".join(["word"] * 27)  # 30 words: 10 past the 20 allowed
    assert summ.coverage_judge(long, doc) == pytest.approx(3 / 6 - 0.05 * 10)
    assert summ.coverage_judge("assert\nstatement debugging program", doc) == pytest.approx(1 / 6)  # first line


# ----------------------------------------------------------------------------------------------------------------
# dialogue


HH = ("\n\nHuman: What is a list comprehension?\n\nAssistant: A compact way to build a list.\n\nHuman: Can you show "
      "one?\n\nAssistant: Sure: [x * x for x in range(3)].")


def test_dialogue_reads_hh_text_and_messages(tmp_path):
    rows = [{"chosen": HH, "rejected": HH.replace("Sure", "No")},
            {"messages": [{"role": "user", "content": "Hi, what is PEP 8?"}]},
            {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"},
                          {"role": "assistant", "content": "Hi!"}, {"role": "user", "content": "What is a tuple?"},
                          {"role": "assistant", "content": "An immutable sequence."}]}]
    path = write_jsonl(tmp_path / "dialogues.jsonl", rows)
    task = build_task("dialogue", ctx(chat=True), {"path": str(path)})
    hh, single, multi = (r.prompt for r in task.train)
    assert hh == [{"role": "user", "content": "What is a list comprehension?"},
                  {"role": "assistant", "content": "A compact way to build a list."},
                  {"role": "user", "content": "Can you show one?"}]
    assert single == [{"role": "user", "content": "Hi, what is PEP 8?"}]
    assert multi[-1] == {"role": "user", "content": "What is a tuple?"} and len(multi) == 4  # answer removed
    assert task.reward is None and all(r.target is None for r in task.train)


def test_dialogue_renders_through_the_chat_template():
    """The rows' ids are the template's own rendering of the whole conversation with the generation prompt."""
    import ppojax
    from ppojax.train.prompting import encode

    tok = ppojax.load_tokenizer("gpt2")
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    messages = dlg.split_hh(HH, "test")
    ids = encode(tok, messages, chat=True, system=None, where="test")
    expected = ("<user>What is a list comprehension?\n<assistant>A compact way to build a list.\n"
                "<user>Can you show one?\n<assistant>")
    assert tok.decode(ids) == expected


ASKED = [{"role": "user", "content": "I am learning Python."},
         {"role": "assistant", "content": "Great! What would you like to know?"},
         {"role": "user", "content": "What does the assert statement mean in Python?"}]
PLAIN = "The assert statement checks a condition."  # 6 words, one sentence, both key terms in its first words


def test_helpfulness_judge_key_terms_are_the_questions_subject():
    assert summ.content_words(ASKED[-1]["content"]) == ["assert", "statement", "mean", "python"]
    terms = dlg.helpfulness_terms(PLAIN, ASKED)  # key terms: assert, statement ("mean", "python" are generic)
    assert terms == {"key_terms_early": 1.0, "sentence_ends": 1.0, "short_first_sentence": 1 - 6 / 24,
                     "markup": 0.0, "filler_opening": 0.0}
    assert dlg.helpfulness_judge(PLAIN, ASKED) == pytest.approx(0.5 * (1 + 1 + 18 / 24))
    # one of the two key terms, matched up to a plural s; 3 words in the sentence
    assert dlg.helpfulness_judge("Asserts are checks.", ASKED) == pytest.approx(0.5 * (1 / 2 + 1 + 21 / 24))
    # the key terms only after the first 10 words: 0 for them; a first sentence of 16 words
    late = "It checks a condition and raises an error when it is false, like the assert statement."
    assert dlg.helpfulness_terms(late, ASKED)["key_terms_early"] == 0.0
    assert dlg.helpfulness_judge(late, ASKED) == pytest.approx(0.5 * (0 + 1 + 8 / 24))
    edge = "It checks a condition and then raises an error: assert statement."  # "assert" is word 10, "statement" 11
    assert dlg.helpfulness_terms(edge, ASKED)["key_terms_early"] == 0.5
    assert dlg.helpfulness_judge("It checks a condition.", ASKED[-1:]) == pytest.approx(0.5 * (1 + 20 / 24))
    # no generic-free content words in the question: the term is 0, not a division by zero
    assert dlg.helpfulness_judge(PLAIN, [{"role": "user", "content": "What does Python mean?"}]) == \
        pytest.approx(0.5 * (1 + 18 / 24))


def test_helpfulness_judge_sentence_brevity_markup_and_openers():
    # no sentence end ("3.0" is not one): neither sentence term
    assert dlg.helpfulness_judge("The assert statement was added in Python 3.0 and", ASKED) == pytest.approx(0.5)
    # a first sentence past the 24-word budget ends too late to earn brevity, but it ends
    long = "The assert statement " + " ".join(["checks"] * 27) + "."
    assert dlg.helpfulness_judge(long, ASKED) == pytest.approx(0.5 * (1 + 1 + 0))
    # markup: a line break, a code fence, bold, a list item each cost 0.5
    for text in (PLAIN + "\nFor example", PLAIN + " ```python", "The **assert** statement checks a condition.",
                 "The assert statement:\n- checks a condition."):
        assert dlg.helpfulness_terms(text, ASKED)["markup"] == 1.0, text
    assert dlg.helpfulness_judge(PLAIN + "\nFor example", ASKED) == pytest.approx(0.5 * (1 + 1 + 18 / 24 - 1))
    assert dlg.helpfulness_terms("In Python, `assert` checks a condition.", ASKED)["markup"] == 0.0  # inline code
    # an apology or filler opening costs 0.5, and its "Sure!" is the first sentence (1 word)
    assert dlg.helpfulness_judge("Sure! " + PLAIN, ASKED) == pytest.approx(0.5 * (1 + 1 + 23 / 24 - 1))
    sorry = "I'm sorry, but the assert statement checks a condition."  # 10 words
    assert dlg.helpfulness_judge(sorry, ASKED) == pytest.approx(0.5 * (1 + 1 + 14 / 24 - 1))
    assert dlg.helpfulness_terms("Surely the assert statement checks.", ASKED)["filler_opening"] == 0.0  # a word
    assert dlg.helpfulness_terms("Hi! The assert statement checks.", ASKED)["filler_opening"] == 1.0
    assert dlg.helpfulness_judge("", ASKED) == 0.0


def test_pipeline_dialogue_judge_reads_the_response_without_special_tokens():
    sys.path.insert(0, str(REPO / "experiments"))
    import rlhf_pipeline
    from ppojax.tasks.base import Row

    judge = rlhf_pipeline._judge("dialogue")
    assert judge(Row(ASKED), PLAIN + "<|im_end|>") == pytest.approx(0.5 * (1 + 1 + 18 / 24))


@pytest.mark.parametrize("task, row, message", [
    ("summarize", "{not json", "not valid JSON"),
    ("summarize", {"title": "t"}, "needs 'prompt'"),
    ("summarize", {"post": ""}, "'post' must be a non-empty string"),
    ("summarize", {"post": "p", "title": 3}, "'title' must be a non-empty string"),
    ("summarize", {"prompt": "p", "label": ""}, "'label' must be a non-empty string"),
    ("dialogue", {"text2": "x"}, "needs 'messages'"),
    ("dialogue", {"chosen": "Just text, no turns"}, "HH-RLHF dialogue"),
    ("dialogue", {"messages": []}, "non-empty list"),
    ("dialogue", {"messages": [{"role": "user"}]}, "string 'role' and 'content'"),
    ("dialogue", {"messages": [{"role": "bot", "content": "x"}]}, "role 'bot'"),
    ("dialogue", {"messages": [{"role": "assistant", "content": "x"}]}, "end with a non-empty user turn"),
])
def test_malformed_rows_are_one_line_naming_file_and_line(tmp_path, task, row, message):
    good = {"summarize": {"post": "fine"}, "dialogue": {"messages": [{"role": "user", "content": "hi"}]}}[task]
    path = write_jsonl(tmp_path / "rows.jsonl", [good, row])
    with pytest.raises(TaskError) as e:
        build_task(task, ctx(chat=True), {"path": str(path)})
    text = str(e.value)
    assert "\n" not in text and "rows.jsonl:2:" in text and message in text, text


def test_a_dialogue_without_chat_rendering_is_refused(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(TaskError, match="prompts.chat: true"):
        build_task("dialogue", ctx(), {"path": str(path)})


# ----------------------------------------------------------------------------------------------------------------
# The hub, unreachable: one line within seconds


@pytest.mark.parametrize("task, kwargs", [("summarize", {}), ("summarize", {"dataset": "trl-lib/tldr"}),
                                          ("dialogue", {})])
def test_an_unreachable_hub_fails_fast_with_the_offline_way(monkeypatch, task, kwargs):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: the connect is refused at once
    t = time.time()
    with pytest.raises(TaskError) as e:
        build_task(task, ctx(chat=True), kwargs)
    assert time.time() - t < 10
    text = str(e.value)
    assert "\n" not in text and "cannot be reached" in text and "task.kwargs.path" in text


def test_hf_hub_offline_reads_only_the_cache_and_says_how_to_work_offline(monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = time.time()
    with pytest.raises(TaskError) as e:
        build_task("summarize", ctx(), {"dataset": "CarperAI/openai_summarize_tldr"})
    assert time.time() - t < 60  # the datasets import is most of it
    assert "\n" not in str(e.value) and "task.kwargs.path" in str(e.value)


@pytest.mark.parametrize("config", ["tldr.yaml", "hh_dialogue.yaml"])
def test_the_hub_configs_stop_with_one_line_offline(tmp_path, config):
    """The command line on the hub configs, with the hub unreachable: exit 2, one line, nothing written."""
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "PYTHONPATH": str(REPO)}
    env.pop("HF_HUB_OFFLINE", None)
    proc = subprocess.run([sys.executable, str(REPO / "experiments" / "ppo_gpt2.py"), "--config",
                           str(REPO / "configs" / config), "--run-dir", str(tmp_path / "run")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ppo_gpt2.py: error: task.name=") and "cannot be reached" in last
    assert "task.kwargs.path" in last and not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------------------------------
# The offline pipeline on a tiny random policy


@pytest.mark.slow
@pytest.mark.parametrize("task", ["summarize", "dialogue"])
def test_pipeline_task_smoke_on_a_tiny_random_policy(tmp_path, monkeypatch, task):
    """``rlhf_pipeline.py --task T --fast``: rows from CPython's docs, judge labels, a reward model, PPO on the task,
    and a report with the judge's score before and after on held-out rows (the numbers of a tiny random policy
    are noise: the SmolLM2 run is README.md's). The preset's ``eval_k`` samples each held-out row that often and its
    ``batch_size`` reaches the PPO config."""
    sys.path.insert(0, str(REPO / "experiments"))
    import rlhf_pipeline

    monkeypatch.setitem(rlhf_pipeline.TASK_PRESETS["fast"], "eval_k", 3)
    out = tmp_path / "p"
    assert rlhf_pipeline.main(["--out", str(out), "--fast", "--task", task, "--iterations", "3",
                               "--num-queries", "64"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["task"] == task and report["comparisons"] == 64 and report["rm_chance"] == 0.25
    assert report["ppo_iterations"] == 3
    assert report["before"]["samples"] == report["after"]["samples"] == 3 * report["rows"]["evaluated"] > 0
    config = (out / "ppo" / "config.yaml").read_text()
    assert f"batch_size: {rlhf_pipeline.TASK_PRESETS['fast']['batch_size']}\n" in config
    assert f"name: {task}" in config and "kind: reward_model" in config
    from ppojax.rl import preferences

    rows = preferences.read_preferences(out / "labels.jsonl")
    assert len(rows) == 64 and all(r.choice == max(range(4), key=lambda j: r.extra["scores"][j]) or
                                   r.extra["scores"][r.choice] == max(r.extra["scores"]) for r in rows)


def test_pipeline_refuses_a_labeler_with_a_task(tmp_path, capsys):
    sys.path.insert(0, str(REPO / "experiments"))
    import rlhf_pipeline

    assert rlhf_pipeline.main(["--out", str(tmp_path / "p"), "--fast", "--task", "dialogue",
                               "--labeler", "lexicon"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "proxy judge" in err[0] and not (tmp_path / "p").exists()


def test_pair_agreement_is_the_share_of_judged_pairs_the_model_orders_alike():
    """``rlhf_pipeline.pair_agreement`` against a loop over every pair of one query's responses: pairs the judge
    ties are not counted, a model tie counts as disagreement."""
    sys.path.insert(0, str(REPO / "experiments"))
    import rlhf_pipeline

    rng = np.random.default_rng(0)
    judge = rng.integers(0, 3, size=(40, 4)).astype(float)  # many judge ties
    model = np.where(rng.random((40, 4)) < 0.2, 0.0, rng.normal(size=(40, 4)) + 0.5 * judge)  # some model ties
    agree = total = 0
    for j, m in zip(judge, model):
        for a in range(4):
            for b in range(a + 1, 4):
                if j[a] != j[b]:
                    total += 1
                    agree += (m[a] - m[b]) * (j[a] - j[b]) > 0
    got = rlhf_pipeline.pair_agreement(judge, model)
    assert got == {"pairs": total, "accuracy": agree / total} and 0.5 < got["accuracy"] < 1
    assert rlhf_pipeline.pair_agreement(judge, -model)["accuracy"] < 0.5
    assert rlhf_pipeline.pair_agreement(np.ones((3, 4)), model[:3]) == {"pairs": 0, "accuracy": None}
