"""Hugging Face checkpoints in and out: key map, round trip through transformers, and every bad input."""

import json
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

import ppojax


def _logits(model, ids, mask):
    pos = np.maximum(mask.cumsum(-1) - 1, 0)
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                     position_ids=torch.tensor(pos)).logits.numpy()


def test_load_maps_every_tensor(tiny_hf_dir, tiny_hf_model):
    config, params = ppojax.load_pretrained(tiny_hf_dir)
    assert (config.n_layer, config.n_head, config.n_embd, config.vocab_size, config.n_positions) == (2, 4, 32, 101, 48)
    sd = tiny_hf_model.state_dict()
    h = params["transformer"]["h"]
    np.testing.assert_array_equal(h["c_fc"]["kernel"][1], sd["transformer.h.1.mlp.c_fc.weight"].numpy())
    np.testing.assert_array_equal(h["c_proj"]["bias"][0], sd["transformer.h.0.attn.c_proj.bias"].numpy())
    np.testing.assert_array_equal(params["transformer"]["wpe"]["embedding"], sd["transformer.wpe.weight"].numpy())
    n_hf = sum(v.numel() for k, v in sd.items() if k != "lm_head.weight")  # lm_head is tied to wte
    assert sum(x.size for x in jax.tree.leaves(params)) == n_hf


def test_save_pretrained_round_trip_in_transformers(tiny_hf_dir, left_padded_batch, tmp_path):
    ids, mask = left_padded_batch
    config, params = ppojax.load_pretrained(tiny_hf_dir)
    # Perturb so the round trip cannot pass by reloading the original file.
    params = jax.tree.map(lambda x: x + 0.01 * jnp.sin(jnp.arange(x.size).reshape(x.shape)), params)
    out = ppojax.save_pretrained(tmp_path / "export", config, params)
    model = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    ours = np.asarray(ppojax.forward(config, params, jnp.asarray(ids), jnp.asarray(mask)))
    np.testing.assert_allclose(_logits(model, ids, mask)[mask > 0], ours[mask > 0], atol=1e-4)
    config2, params2 = ppojax.load_pretrained(out)
    assert config2 == config
    jax.tree.map(np.testing.assert_array_equal, params, params2)


def test_value_params_export_the_lm(tiny_hf_dir, tmp_path):
    config, params = ppojax.load_pretrained(tiny_hf_dir)
    out = ppojax.save_pretrained(tmp_path / "critic", config, ppojax.init_value_params(config, params))
    _, reloaded = ppojax.load_pretrained(out)
    jax.tree.map(np.testing.assert_array_equal, params, reloaded)


def test_old_style_checkpoint_without_prefix_and_with_buffers(tiny_hf_dir, tmp_path):
    """The hub's gpt2 files have no 'transformer.' prefix and carry causal-mask buffers."""
    tensors = load_file(str(tiny_hf_dir / "model.safetensors"))
    old = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    old["h.0.attn.bias"] = np.tril(np.ones((1, 1, 48, 48), np.float32))
    old["lm_head.weight"] = old["wte.weight"].copy()
    d = tmp_path / "old"
    d.mkdir()
    shutil.copy(tiny_hf_dir / "config.json", d / "config.json")
    save_file(old, str(d / "model.safetensors"))
    _, params = ppojax.load_pretrained(d)
    _, ref = ppojax.load_pretrained(tiny_hf_dir)
    jax.tree.map(np.testing.assert_array_equal, params, ref)


def test_pytorch_bin_checkpoint(tiny_hf_dir, tiny_hf_model, tmp_path):
    d = tmp_path / "bin"
    d.mkdir()
    shutil.copy(tiny_hf_dir / "config.json", d / "config.json")
    torch.save(tiny_hf_model.state_dict(), d / "pytorch_model.bin")
    _, params = ppojax.load_pretrained(d)
    _, ref = ppojax.load_pretrained(tiny_hf_dir)
    jax.tree.map(np.testing.assert_array_equal, params, ref)


def _copy_with(tiny_hf_dir, tmp_path, edit_tensors=None, edit_config=None):
    d = tmp_path / "edited"
    d.mkdir()
    tensors = load_file(str(tiny_hf_dir / "model.safetensors"))
    cfg = json.loads((tiny_hf_dir / "config.json").read_text())
    if edit_tensors:
        edit_tensors(tensors)
    if edit_config:
        edit_config(cfg)
    save_file(tensors, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def test_leftover_tensor_is_named(tiny_hf_dir, tmp_path):
    d = _copy_with(tiny_hf_dir, tmp_path, edit_tensors=lambda t: t.update({"score.weight": np.zeros((1, 32), np.float32)}))
    with pytest.raises(ppojax.CheckpointError, match="score.weight"):
        ppojax.load_pretrained(d)


def test_missing_tensor_is_named(tiny_hf_dir, tmp_path):
    d = _copy_with(tiny_hf_dir, tmp_path, edit_tensors=lambda t: t.pop("transformer.h.1.mlp.c_fc.bias"))
    with pytest.raises(ppojax.CheckpointError, match=r"h\.1\.mlp\.c_fc\.bias"):
        ppojax.load_pretrained(d)


def test_shape_mismatch_is_named(tiny_hf_dir, tmp_path):
    d = _copy_with(tiny_hf_dir, tmp_path, edit_config=lambda c: c.update(n_positions=64))
    with pytest.raises(ppojax.CheckpointError, match=r"wpe\.weight has shape \(48, 32\), expected \(64, 32\)"):
        ppojax.load_pretrained(d)


class _CountingMapping(dict):
    """A mapping that counts the tensors read from it (``tensors[key]``), as a lazy checkpoint reader would."""

    def __init__(self, tensors):
        super().__init__(tensors)
        self.reads = []

    def __getitem__(self, key):
        self.reads.append(key)
        return super().__getitem__(key)


def test_gpt2_tensors_are_read_once_each_after_the_names_are_checked(tiny_hf_dir):
    """GPT-2's converter checks names before reading any tensor, then reads each one once (the tied lm_head.weight
    too), giving the same params as the plain dict; an lm_head.weight unlike wte.weight is refused."""
    from ppojax.models.gpt2.convert import params_from_hf

    config, ref = ppojax.load_pretrained(tiny_hf_dir)
    tensors = load_file(str(tiny_hf_dir / "model.safetensors"))
    tensors["lm_head.weight"] = tensors["transformer.wte.weight"].copy()
    lazy = _CountingMapping(tensors)
    jax.tree.map(np.testing.assert_array_equal, params_from_hf(config, lazy), ref)
    assert sorted(lazy.reads) == sorted(k for k in tensors if not k.endswith((".attn.bias", ".attn.masked_bias")))
    for edit, match in ((lambda t: t.pop("transformer.h.1.ln_2.bias"), r"h\.1\.ln_2\.bias"),
                        (lambda t: t.update({"score.weight": np.zeros((1, 32), np.float32)}), "score.weight")):
        bad = _CountingMapping(tensors)
        edit(bad)
        with pytest.raises(ppojax.CheckpointError, match=match):
            params_from_hf(config, bad)
        assert bad.reads == []
    tensors["lm_head.weight"] = tensors["lm_head.weight"] + 1.0
    with pytest.raises(ppojax.CheckpointError, match="lm_head.weight differs from wte.weight"):
        params_from_hf(config, tensors)


def test_other_architecture_is_refused(tmp_path):
    cfg = transformers.GPTNeoXConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=4)
    transformers.GPTNeoXForCausalLM(cfg).save_pretrained(tmp_path / "neox")
    # One line that names the family it got and the ones it supports.
    with pytest.raises(ppojax.CheckpointError, match=r"model_type 'gpt_neox' is not supported; ppojax loads .*gpt2"):
        ppojax.load_pretrained(tmp_path / "neox")


def test_missing_path_and_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ppojax.load_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ppojax.CheckpointError, match="no config.json"):
        ppojax.load_pretrained(tmp_path / "empty")


def test_unreachable_hub_fails_fast_with_offline_advice(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens on loopback
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    start = time.time()
    with pytest.raises(ppojax.HubUnreachableError, match="cannot be reached.*offline"):
        ppojax.load_pretrained("gpt2")
    assert time.time() - start < 30


def test_failed_save_writes_nothing(tiny_hf_dir, tmp_path):
    config, params = ppojax.load_pretrained(tiny_hf_dir)
    wrong = config.replace(n_positions=64)  # config disagrees with the params
    with pytest.raises(ppojax.CheckpointError, match="wpe"):
        ppojax.save_pretrained(tmp_path / "out", wrong, params)
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ppojax.CheckpointError, match="transformer"):
        ppojax.save_pretrained(tmp_path / "out", config, {"foo": 1})
    assert list(tmp_path.iterdir()) == []


def test_save_over_existing_directory_replaces_it(tiny_hf_dir, tmp_path):
    config, params = ppojax.load_pretrained(tiny_hf_dir)
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    ppojax.save_pretrained(out, config, params)
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_export_special_ids_fit_the_vocabulary(tmp_path, capfd):
    """A small vocabulary (the pipeline's 538 words) must not get GPT-2's 50256 as BOS/EOS: transformers warns
    that they lie outside the vocabulary. The tokenizer's ids go in when given."""
    config = ppojax.GPT2Config(vocab_size=538, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    params = ppojax.init_params(config, jax.random.key(0))
    default = json.loads((ppojax.save_pretrained(tmp_path / "a", config, params) / "config.json").read_text())
    assert default["bos_token_id"] is None and default["eos_token_id"] is None
    given = ppojax.save_pretrained(tmp_path / "b", config, params, bos_token_id=0, eos_token_id=0)
    assert json.loads((given / "config.json").read_text())["eos_token_id"] == 0
    transformers.GPT2LMHeadModel.from_pretrained(given)
    assert "within the vocabulary" not in capfd.readouterr().err
    gpt2 = ppojax.GPT2Config(vocab_size=50257, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    big = ppojax.save_pretrained(tmp_path / "c", gpt2, ppojax.init_params(gpt2, jax.random.key(0)))
    assert json.loads((big / "config.json").read_text())["eos_token_id"] == 50256  # GPT-2's own, unchanged
