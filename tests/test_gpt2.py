"""The Flax GPT-2 against transformers' PyTorch GPT-2, and cached decoding against the full forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import ppojax
from ppojax.models import gpt2


def _torch_logits(model, ids, mask):
    positions = np.maximum(mask.cumsum(-1) - 1, 0)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                    position_ids=torch.tensor(positions))
    return out.logits.numpy()


def test_logits_match_transformers_on_left_padded_batch(tiny_hf_dir, tiny_hf_model, left_padded_batch):
    ids, mask = left_padded_batch
    config, params = ppojax.load_pretrained(tiny_hf_dir)
    ours = np.asarray(jax.jit(ppojax.forward, static_argnums=0)(config, params, jnp.asarray(ids), jnp.asarray(mask)))
    ref = _torch_logits(tiny_hf_model, ids, mask)
    assert ours.dtype == np.float32 and ours.shape == (3, 9, 101)
    real = mask.astype(bool)
    assert np.abs(ours - ref)[real].max() <= 1e-4
    # Not trivially small: the logits vary across the vocabulary.
    assert ref[real].std() > 0.1


def test_padding_does_not_change_real_tokens(tiny_hf_dir, left_padded_batch):
    """Row with 3 real tokens gives the same logits alone (unpadded) as inside the left-padded batch."""
    ids, mask = left_padded_batch
    config, params = ppojax.load_pretrained(tiny_hf_dir)
    batched = np.asarray(ppojax.forward(config, params, jnp.asarray(ids), jnp.asarray(mask)))
    alone = np.asarray(ppojax.forward(config, params, jnp.asarray(ids[2:, 6:]), jnp.ones((1, 3), jnp.int32)))
    np.testing.assert_allclose(batched[2, 6:], alone[0], atol=1e-5)


def test_pad_id_outside_vocabulary_is_harmless(tiny_hf_dir, left_padded_batch):
    ids, mask = left_padded_batch
    config, params = ppojax.load_pretrained(tiny_hf_dir)
    a = ppojax.forward(config, params, jnp.asarray(ids), jnp.asarray(mask))
    ids2 = np.where(mask > 0, ids, config.vocab_size + 5)
    b = ppojax.forward(config, params, jnp.asarray(ids2), jnp.asarray(mask))
    np.testing.assert_array_equal(np.asarray(a)[mask > 0], np.asarray(b)[mask > 0])


def test_cached_decoding_equals_full_forward_at_every_step(tiny_hf_dir, left_padded_batch):
    ids, mask = left_padded_batch
    config, params = ppojax.load_pretrained(tiny_hf_dir)
    prompt_len = 5
    full_ids, full_mask = jnp.asarray(ids), jnp.asarray(mask)
    full = np.asarray(ppojax.forward(config, params, full_ids, full_mask))
    cache = ppojax.init_cache(config, 3, ids.shape[1])
    step = jax.jit(ppojax.forward_with_cache, static_argnums=0)
    # Prefill the first 5 columns (row 2 is all padding there), then feed one column at a time.
    logits, cache = step(config, params, full_ids[:, :prompt_len], full_mask[:, :prompt_len], cache)
    np.testing.assert_allclose(np.asarray(logits)[mask[:, :prompt_len] > 0],
                               full[:, :prompt_len][mask[:, :prompt_len] > 0], atol=1e-5)
    for t in range(prompt_len, ids.shape[1]):
        logits, cache = step(config, params, full_ids[:, t:t + 1], full_mask[:, t:t + 1], cache)
        real = mask[:, t] > 0  # outputs at pad positions are meaningless in both paths
        np.testing.assert_allclose(np.asarray(logits)[real, 0], full[real, t], atol=1e-5, err_msg=f"step {t}")
    assert int(cache.index) == ids.shape[1]


def test_bf16_compute_is_close_to_fp32(tiny_hf_dir, left_padded_batch):
    ids, mask = left_padded_batch
    config, params = ppojax.load_pretrained(tiny_hf_dir)
    ref = np.asarray(ppojax.forward(config, params, jnp.asarray(ids), jnp.asarray(mask)))
    bf16 = config.replace(dtype="bfloat16")
    out = ppojax.forward(bf16, params, jnp.asarray(ids), jnp.asarray(mask))
    assert out.dtype == jnp.float32  # logits are float32 whatever the compute dtype
    real = mask > 0
    err = np.abs(np.asarray(out) - ref)[real]
    assert err.max() < 0.1 * np.abs(ref[real]).max() and np.isfinite(err).all()


def test_remat_gives_same_logits_and_grads(tiny_hf_dir, left_padded_batch):
    ids, mask = left_padded_batch
    config, params = ppojax.load_pretrained(tiny_hf_dir)

    def loss(p, cfg):
        return ppojax.forward(cfg, p, jnp.asarray(ids), jnp.asarray(mask)).mean()

    g1 = jax.grad(loss)(params, config)
    g2 = jax.grad(loss)(params, config.replace(remat=True))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g1, g2)


def test_value_model_starts_at_zero_and_shares_trunk(tiny_hf_dir, left_padded_batch):
    ids, mask = left_padded_batch
    config, params = ppojax.load_pretrained(tiny_hf_dir)
    vparams = ppojax.init_value_params(config, params)
    values = ppojax.value_forward(config, vparams, jnp.asarray(ids), jnp.asarray(mask))
    assert values.shape == (3, 9) and values.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(values), 0.0)
    # With a random head, the value equals head(final hidden state) computed by hand from the LM's trunk.
    rm = ppojax.init_value_params(config, params, head_init_std=1 / np.sqrt(config.n_embd + 1), key=jax.random.key(1))
    hidden, _ = gpt2.GPT2Trunk(config).apply({"params": params["transformer"]}, jnp.asarray(ids), jnp.asarray(mask))
    expected = np.asarray(hidden) @ np.asarray(rm["head"]["kernel"])[:, 0] + np.asarray(rm["head"]["bias"])[0]
    got = np.asarray(ppojax.value_forward(config, rm, jnp.asarray(ids), jnp.asarray(mask)))
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_init_params_shapes_and_scale():
    config = ppojax.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=3, n_head=4)
    params = ppojax.init_params(config, jax.random.key(0))
    h = params["transformer"]["h"]
    assert h["c_attn"]["kernel"].shape == (3, 32, 96)
    assert h["c_fc"]["kernel"].shape == (3, 32, 128)
    assert abs(float(params["transformer"]["wte"]["embedding"].std()) - 0.02) < 0.005


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n_embd=30, n_head=4), "must divide n_embd"),
        (dict(n_layer=0), "n_layer must be a positive int"),
        (dict(dtype="float8"), "dtype must be one of"),
    ],
)
def test_bad_config_is_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ppojax.GPT2Config(**kwargs)


def test_forward_rejects_bad_shapes(tiny_hf_dir):
    config, params = ppojax.load_pretrained(tiny_hf_dir)
    with pytest.raises(ValueError, match="same"):
        ppojax.forward(config, params, jnp.zeros((2, 5), jnp.int32), jnp.ones((2, 4), jnp.int32))
    with pytest.raises(ValueError, match="exceeds the context"):
        ppojax.forward(config, params, jnp.zeros((1, 49), jnp.int32), jnp.ones((1, 49), jnp.int32))


def test_hidden_then_unembed_equals_forward(tiny_hf_dir, left_padded_batch):
    ids, mask = left_padded_batch
    config, params = ppojax.load_pretrained(tiny_hf_dir)
    hidden = ppojax.forward_hidden(config, params, jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(ppojax.unembed(config, params, hidden[:, 4:])),
                               np.asarray(ppojax.forward(config, params, jnp.asarray(ids), jnp.asarray(mask)))[:, 4:],
                               atol=1e-5)
