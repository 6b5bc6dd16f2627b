"""The jitted sampler: greedy parity with transformers, distributional tests, EOS handling and bad inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import ppojax


@pytest.fixture(scope="module")
def tiny(tiny_hf_dir):
    return ppojax.load_pretrained(tiny_hf_dir)


def test_greedy_matches_transformers_generate(tiny, tiny_hf_model, left_padded_batch):
    config, params = tiny
    ids, mask = left_padded_batch
    with torch.no_grad():
        ref = tiny_hf_model.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                                     max_new_tokens=8, do_sample=False, pad_token_id=100, eos_token_id=None)
    out = ppojax.generate(config, params, ids, mask, jax.random.key(0), max_new_tokens=8, temperature=0.0)
    np.testing.assert_array_equal(np.asarray(out.tokens), ref[:, ids.shape[1]:].numpy())
    assert len(set(np.asarray(out.tokens).ravel())) > 3  # not a degenerate repeat of one token
    np.testing.assert_array_equal(np.asarray(out.mask), 1)


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.7, 0, 1.0), (0.7, 4, 1.0), (1.3, 0, 0.5), (0.0, 0, 1.0)])
def test_logprobs_are_tempered_logprobs_of_the_full_forward(tiny, left_padded_batch, temperature, top_k, top_p):
    # The unfiltered tempered log-softmax (plain logits at temperature 0), whatever the filters sampled from.
    config, params = tiny
    ids, mask = left_padded_batch
    out = ppojax.generate(config, params, ids, mask, jax.random.key(3), max_new_tokens=6, temperature=temperature,
                          top_k=top_k, top_p=top_p)
    full_ids = np.concatenate([ids, np.asarray(out.tokens)], 1)
    full_mask = np.concatenate([mask, np.asarray(out.mask)], 1)
    logits = np.asarray(ppojax.forward(config, params, jnp.asarray(full_ids), jnp.asarray(full_mask)), np.float64)
    logits = logits[:, ids.shape[1] - 1:-1] / (temperature or 1.0)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    expected = np.take_along_axis(logp, np.asarray(out.tokens)[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(out.logprobs), expected, atol=1e-4)


def _filtered_probs_numpy(logits, temperature, top_k, top_p):
    """Reference: HF's order of warpers, temperature -> top-k -> top-p, written as a plain loop."""
    z = logits.astype(np.float64) / temperature
    keep = np.ones_like(z, bool)
    if top_k:
        kth = np.sort(z)[::-1][top_k - 1]
        keep &= z >= kth
    p = np.where(keep, np.exp(z - z.max()), 0.0)
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        mass, chosen = 0.0, np.zeros_like(keep)
        for i in order:
            if mass >= top_p:
                break
            chosen[i] = True
            mass += p[i]
        keep &= chosen
    p = np.where(keep, np.exp(z - z.max()), 0.0)
    return p / p.sum()


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 5, 1.0), (1.0, 0, 0.6),
                                                      (0.8, 6, 0.7)])
def test_first_token_distribution_matches_filtered_softmax(temperature, top_k, top_p):
    vocab = 12
    config = ppojax.GPT2Config(vocab_size=vocab, n_positions=8, n_embd=16, n_layer=1, n_head=2)
    params = ppojax.init_params(config, jax.random.key(0))
    # Spread the logits: scale the tied embedding so the next-token distribution is far from uniform.
    params["transformer"]["wte"]["embedding"] = params["transformer"]["wte"]["embedding"] * 60.0
    n = 6000
    prompt = jnp.tile(jnp.array([[3, 7]], jnp.int32), (n, 1))
    out = ppojax.generate(config, params, prompt, jnp.ones_like(prompt), jax.random.key(42), max_new_tokens=1,
                          temperature=temperature, top_k=top_k, top_p=top_p)
    logits = np.asarray(ppojax.forward(config, params, prompt[:1], jnp.ones_like(prompt[:1])))[0, -1]
    expected = _filtered_probs_numpy(logits, temperature, top_k, top_p)
    counts = np.bincount(np.asarray(out.tokens)[:, 0], minlength=vocab)
    assert counts[expected == 0].sum() == 0, "sampled a token that the filters remove"
    observed = counts / n
    # Chi-square goodness of fit over the kept tokens; 99.9% quantile bound for <= 11 dof is ~31.3.
    kept = expected > 0
    chi2 = float((((counts[kept] - n * expected[kept]) ** 2) / (n * expected[kept])).sum())
    assert chi2 < 31.3, (chi2, observed.round(3), expected.round(3))
    assert np.abs(observed - expected).max() < 0.03


def test_same_key_same_output_different_key_different(tiny, left_padded_batch):
    config, params = tiny
    ids, mask = left_padded_batch
    kw = dict(max_new_tokens=10, temperature=1.0)
    a = ppojax.generate(config, params, ids, mask, jax.random.key(0), **kw)
    b = ppojax.generate(config, params, ids, mask, jax.random.key(0), **kw)
    c = ppojax.generate(config, params, ids, mask, jax.random.key(1), **kw)
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    assert not np.array_equal(np.asarray(a.tokens), np.asarray(c.tokens))


def test_row_samples_do_not_depend_on_batch_companions(tiny, left_padded_batch):
    config, params = tiny
    ids, mask = left_padded_batch
    kw = dict(max_new_tokens=6, temperature=1.0)
    full = ppojax.generate(config, params, ids, mask, jax.random.key(5), **kw)
    # Row 1 alone, with its global example id, samples exactly what it sampled inside the batch.
    alone = ppojax.generate(config, params, ids[1:2, 3:], mask[1:2, 3:], jax.random.key(5), example_ids=jnp.array([1]),
                            **kw)
    np.testing.assert_array_equal(np.asarray(full.tokens)[1], np.asarray(alone.tokens)[0])


def test_eos_stops_rows_and_pads_after(tiny, left_padded_batch):
    config, params = tiny
    ids, mask = left_padded_batch
    greedy = ppojax.generate(config, params, ids, mask, jax.random.key(0), max_new_tokens=8, temperature=0.0)
    toks = np.asarray(greedy.tokens)
    # Make EOS a greedy token that first appears at a position j >= 1 in some row r.
    r, j = next((r, j) for r in range(3) for j in range(1, 8) if toks[r, j] not in toks[r, :j])
    eos = int(toks[r, j])
    out = ppojax.generate(config, params, ids, mask, jax.random.key(0), max_new_tokens=8, temperature=0.0,
                          eos_token_id=eos, pad_token_id=999)
    t, m = np.asarray(out.tokens), np.asarray(out.mask)
    for b in range(3):
        hits = np.where(toks[b] == eos)[0]
        stop = hits[0] + 1 if len(hits) else 8
        np.testing.assert_array_equal(t[b, :stop], toks[b, :stop])
        np.testing.assert_array_equal(m[b], (np.arange(8) < stop).astype(int))
        assert (t[b, stop:] == 999).all()
        assert (np.asarray(out.logprobs)[b, stop:] == 0).all()
    assert m[r].sum() == j + 1 and int(out.lengths[r]) == j + 1


def test_early_stop_when_all_rows_finish(tiny):
    config, params = tiny
    prompt = jnp.array([[1, 2, 3]], jnp.int32)
    first = ppojax.generate(config, params, prompt, jnp.ones_like(prompt), jax.random.key(0), max_new_tokens=1,
                            temperature=0.0)
    eos = int(first.tokens[0, 0])
    out = ppojax.generate(config, params, prompt, jnp.ones_like(prompt), jax.random.key(0), max_new_tokens=30,
                          temperature=0.0, eos_token_id=eos)
    assert int(out.lengths[0]) == 1 and np.asarray(out.mask)[0, 1:].sum() == 0
    assert (np.asarray(out.tokens)[0, 1:] == config.vocab_size).all()  # default pad id: vocab_size


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(temperature=-0.5), "temperature must be >= 0"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(top_k=-1), "top_k must be an int >= 0"),
        (dict(max_new_tokens=0), "max_new_tokens must be a positive int"),
        (dict(max_new_tokens=60), "exceeds the model's context of 48"),
    ],
)
def test_bad_sampling_arguments(tiny, left_padded_batch, kwargs, match):
    config, params = tiny
    ids, mask = left_padded_batch
    args = dict(max_new_tokens=4)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        ppojax.generate(config, params, ids, mask, jax.random.key(0), **args)


def test_right_padded_or_mismatched_prompts_are_refused(tiny, left_padded_batch):
    config, params = tiny
    ids, mask = left_padded_batch
    with pytest.raises(ValueError, match="left-padded"):
        ppojax.generate(config, params, ids, mask[:, ::-1], jax.random.key(0), max_new_tokens=2)
    with pytest.raises(ValueError, match="prompt_mask shape"):
        ppojax.generate(config, params, ids, mask[:, 1:], jax.random.key(0), max_new_tokens=2)


@pytest.mark.parametrize("k", [1, 7, 50, 999])
def test_top_k_threshold_is_the_exact_kth_value_with_ties(k):
    from ppojax.generate.sampling import _kth_largest

    x = np.round(np.random.RandomState(k).randn(4, 1000) * 4)  # many ties
    kth = np.sort(x, axis=-1)[:, ::-1][:, k - 1:k]
    np.testing.assert_array_equal(np.asarray(_kth_largest(jnp.asarray(x), k)), kth)
    kept = np.asarray(ppojax.filter_logits(jnp.asarray(x, jnp.float32), top_k=k)) > np.finfo(np.float32).min
    np.testing.assert_array_equal(kept, x >= kth)
