"""Preference data: the JSONL format, validation errors, tokenized layout, synthetic labels, sample_for_labels.py."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from ppojax.rl import preferences
from ppojax.rl.preferences import Comparison, PreferenceError

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "experiments"))


@pytest.fixture(scope="module")
def tok():
    import ppojax

    return ppojax.load_tokenizer("gpt2")


def _write(tmp_path, lines, name="prefs.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n")
    return path


GOOD = {"query": "The movie was", "responses": [" great", " awful"], "choice": 0}


def test_round_trip_keeps_rows_and_extra_fields(tmp_path):
    rows = [Comparison("q1", ("a", "b", "c"), 2, {"scores": [0.1, 0.2, 0.3]}),
            Comparison("q2 ünï", ("d", "e", "f"), None)]
    path = preferences.write_preferences(tmp_path / "out.jsonl", rows)
    assert preferences.read_preferences(path, require_choice=False) == rows
    assert json.loads(path.read_text().splitlines()[1]) == {"query": "q2 ünï", "responses": ["d", "e", "f"],
                                                            "choice": None}


# (lines, line number named in the error, words the message must contain)
BAD = {
    "not_json": ([GOOD, '{"query": "x", "responses": ["a", "b"], "choice": 0'], 2, "not valid JSON"),
    "not_object": ([GOOD, GOOD, "[1, 2]"], 3, "expected a JSON object"),
    "missing_fields": ([{"query": "x"}], 1, "missing fields 'responses', 'choice'"),
    "missing_choice": ([{"query": "x", "responses": ["a", "b"]}], 1, "use null"),
    "choice_out_of_range": ([GOOD, dict(GOOD, choice=2)], 2, "choice 2 is out of range for 2 responses"),
    "choice_negative": ([dict(GOOD, choice=-1)], 1, "out of range"),
    "choice_not_int": ([dict(GOOD, choice="0")], 1, "'choice' must be an integer"),
    "choice_bool": ([dict(GOOD, choice=True)], 1, "'choice' must be an integer"),
    "no_responses": ([dict(GOOD, responses=[])], 1, "needs k >= 2"),
    "one_response": ([dict(GOOD, responses=["a"])], 1, "needs k >= 2"),
    "empty_response": ([dict(GOOD, responses=["a", "  "])], 1, "response 1 is empty"),
    "responses_not_strings": ([dict(GOOD, responses=["a", 3])], 1, "list of strings"),
    "query_not_string": ([dict(GOOD, query=None)], 1, "'query' must be a string"),
    "inconsistent_k": ([GOOD, "", dict(GOOD, responses=["a", "b", "c"])], 3, "but line 1 has 2"),
    "unlabeled": ([GOOD, dict(GOOD, choice=None)], 2, "unlabeled"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_files_give_one_clear_error_naming_file_and_line(tmp_path, case):
    lines, line_no, words = BAD[case]
    path = _write(tmp_path, lines)
    with pytest.raises(PreferenceError) as info:
        preferences.read_preferences(path)
    message = str(info.value)
    assert message.startswith(f"{path}:{line_no}: "), message
    assert words in message and "\n" not in message


def test_file_level_errors(tmp_path):
    with pytest.raises(PreferenceError, match="does not exist"):
        preferences.read_preferences(tmp_path / "missing.jsonl")
    with pytest.raises(PreferenceError, match="holds no comparisons"):
        preferences.read_preferences(_write(tmp_path, ["", "  "]))
    # Unlabeled rows are fine where labels are not needed yet.
    rows = preferences.read_preferences(_write(tmp_path, [dict(GOOD, choice=None)]), require_choice=False)
    assert rows[0].choice is None


def test_tokenized_layout_matches_the_rollout_conventions(tok):
    pad, eos = tok.pad_token_id, tok.eos_token_id
    assert pad != eos
    long_query = "one two three four five six seven eight nine ten"
    rows = [Comparison("The movie was", (" great fun", " bad<|endoftext|>"), 1),
            Comparison(long_query, (" a b c d e f g", " ok"), 0)]
    with pytest.warns(UserWarning, match="1 of 2 queries .* 1 of 4 responses"):
        batch = preferences.tokenize_preferences(tok, rows, query_length=6, response_length=4)
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]
    q0 = enc("The movie was")
    assert batch.query_ids[0].tolist() == [pad] * (6 - len(q0)) + q0  # left-padded
    assert batch.query_mask[0].tolist() == [0] * (6 - len(q0)) + [1] * len(q0)
    assert batch.query_ids[1].tolist() == enc(long_query)[-6:]  # a long query keeps its last tokens
    r = enc(" great fun")
    assert batch.tokens[0, 0].tolist() == r + [pad] * (4 - len(r))  # right-padded
    assert batch.mask[0, 0].tolist() == [1] * len(r) + [0] * (4 - len(r))
    assert batch.tokens[0, 1].tolist()[:2] == [enc(" bad")[0], eos] and batch.mask[0, 1].tolist() == [1, 1, 0, 0]
    assert batch.tokens[1, 0].tolist() == enc(" a b c d e f g")[:4]  # a long response keeps its first tokens
    assert batch.choice.tolist() == [1, 0]
    assert batch.tokens.dtype == np.int32 and batch.tokens.shape == (2, 2, 4)


def test_split_is_seeded_and_disjoint(tok):
    rows = [Comparison(f"query {i}", (f" a{i}", f" b{i}"), i % 2) for i in range(20)]
    batch = preferences.tokenize_preferences(tok, rows, query_length=4, response_length=3)
    train, val = preferences.split_preferences(batch, 0.25, seed=3)
    again, val_again = preferences.split_preferences(batch, 0.25, seed=3)
    _, other = preferences.split_preferences(batch, 0.25, seed=4)
    assert (train.n, val.n) == (15, 5)
    np.testing.assert_array_equal(val.tokens, val_again.tokens)
    key = lambda b: {tuple(row) for row in b.query_ids.tolist()}
    assert not key(train) & key(val) and len(key(train) | key(val)) == 20
    assert key(val) != key(other)


def test_choose_noiseless_picks_the_best_and_breaks_ties_at_random():
    rng = np.random.default_rng(0)
    scores = np.array([[0.1, 0.9, 0.3], [2.0, -1.0, 0.0]])
    np.testing.assert_array_equal(preferences.choose(scores, temperature=0.0, rng=rng), [1, 0])
    tied = np.zeros((400, 2))
    picks = preferences.choose(tied, temperature=0.0, rng=rng)
    assert 150 < picks.sum() < 250  # not always response 0


def test_choose_with_noise_follows_softmax():
    rng = np.random.default_rng(1)
    s, T, n = np.array([0.0, 0.5, 1.0]), 0.5, 20000
    picks = preferences.choose(np.tile(s, (n, 1)), temperature=T, rng=rng)
    freq = np.bincount(picks, minlength=3) / n
    expected = np.exp(s / T) / np.exp(s / T).sum()
    np.testing.assert_allclose(freq, expected, atol=0.015)


def test_label_comparisons_and_labeler_specs(tok):
    rows = [Comparison("q", ("short", "a much longer one", "mid size"), None)]
    labeled = preferences.label_comparisons(rows, lambda texts: np.array([len(t) for t in texts], float))
    assert labeled[0].choice == 1 and labeled[0].extra["scores"] == [5.0, 17.0, 8.0]
    assert preferences.parse_labeler("vader") == ("vader", 0.0)
    assert preferences.parse_labeler("lexicon:0.25") == ("lexicon", 0.25)
    for bad in ("vadr", "vader:x", "vader:-1"):
        with pytest.raises(ValueError):
            preferences.parse_labeler(bad)
    vader = preferences.text_scorer("vader")
    assert vader(["This is wonderful and great!"])[0] > 0.5 > vader(["terrible, awful"])[0]
    # lexicon: the mean valence of the text's tokens, as the jittable LexiconReward computes it on those tokens.
    from ppojax.rl import rewards

    texts = [" good happy day", " the table sad", " xyzzy"]
    lexicon = preferences.text_scorer("lexicon", tok, vocab_size=50257)
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(map(len, ids))
    tokens = np.array([i + [0] * (width - len(i)) for i in ids])
    mask = np.array([[1] * len(i) + [0] * (width - len(i)) for i in ids])
    reward = rewards.lexicon_reward(rewards.lexicon_valence_table(tok, vocab_size=50257))
    np.testing.assert_allclose(lexicon(texts), np.asarray(reward(tokens, mask)), atol=1e-6)
    assert lexicon(texts)[0] > 0 > lexicon(texts)[1]


def test_sample_for_labels_writes_unlabeled_and_synthetic_rows(tmp_path, capsys):
    import sample_for_labels

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The movie was\nThe food was\nMy day\n")
    model = ["--policy", "random", "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--n-positions", "32"]
    sizes = ["--k", "3", "--num-queries", "5", "--query-length", "6", "--response-length", "4", "--top-k", "5",
             "--batch-size", "8"]
    common = model + sizes + ["--prompts", str(prompts)]
    out = tmp_path / "to_label.jsonl"
    assert sample_for_labels.main(common + ["--out", str(out)]) == 0
    rows = preferences.read_preferences(out, require_choice=False)
    assert len(rows) == 5 and all(r.k == 3 and r.choice is None for r in rows)
    assert {r.query for r in rows} == {"The movie was", "The food was", "My day"}  # cycled through the prompts
    with pytest.raises(PreferenceError, match="unlabeled"):
        preferences.read_preferences(out)

    labeled = tmp_path / "labeled.jsonl"
    assert sample_for_labels.main(common + ["--out", str(labeled), "--label-with", "lexicon:0.1"]) == 0
    rows_l = preferences.read_preferences(labeled)  # every row labeled
    assert [r.responses for r in rows_l] == [r.responses for r in rows]  # same seed, same samples
    assert all(len(r.extra["scores"]) == 3 for r in rows_l)

    capsys.readouterr()
    assert sample_for_labels.main(model + sizes + ["--prompts", str(tmp_path / "nope.txt"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sample_for_labels.py: error:") and "nope.txt" in err and "\n" not in err
    assert sample_for_labels.main(common + ["--out", str(out), "--label-with", "stars"]) == 2


def test_sample_for_labels_refuses_an_output_another_job_holds(tmp_path, capsys):
    import dataclasses
    import subprocess

    import sample_for_labels
    from ppojax.io.atomic import atomic_write_json
    from ppojax.io.lock import LockHolder

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The movie was\n")
    out = tmp_path / "labels.jsonl"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        record = dict(dataclasses.asdict(LockHolder.of_this_process()), pid=holder.pid, process_start=None)
        atomic_write_json(tmp_path / "labels.jsonl.lock", record)
        assert sample_for_labels.main(["--policy", "random", "--prompts", str(prompts), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert "is in use by another job" in err and f"PID {holder.pid}" in err and "\n" not in err, err
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()


def test_sample_for_labels_takes_the_policys_own_tokenizer(tmp_path):
    """A hub id or a .gguf policy brings its own tokenizer (SmolLM2's is not GPT-2's); a random policy or a directory
    without tokenizer files falls back to gpt2; --tokenizer always wins."""
    import sample_for_labels

    name = sample_for_labels.tokenizer_name
    assert name("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert name(str(tmp_path / "m.gguf")) == str(tmp_path / "m.gguf")
    assert name("random") == "gpt2" and name(str(tmp_path)) == "gpt2"
    (tmp_path / "tokenizer.json").write_text("{}")
    assert name(str(tmp_path)) == str(tmp_path)
    assert name("HuggingFaceTB/SmolLM2-135M-Instruct", "gpt2") == "gpt2"
