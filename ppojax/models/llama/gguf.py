"""llama.cpp GGUF files of architecture ``llama`` (Llama, Mistral, SmolLM2, ...) into the Llama family.

Metadata (``<arch>`` = ``general.architecture``)       LlamaConfig
  <arch>.block_count                                  num_hidden_layers
  <arch>.embedding_length                             hidden_size
  <arch>.feed_forward_length                          intermediate_size
  <arch>.attention.head_count / head_count_kv         num_attention_heads / num_key_value_heads
  <arch>.attention.key_length (optional)              head_dim
  <arch>.context_length                               max_position_embeddings
  <arch>.rope.freq_base                               rope_theta
  <arch>.attention.layer_norm_rms_epsilon             rms_norm_eps
  tokenizer.ggml.tokens (its length)                  vocab_size
  no ``output.weight`` tensor                         tie_word_embeddings = True

Tensors                                           Hugging Face name (then ``convert.py``'s key map)
  token_embd.weight                               model.embed_tokens.weight
  output_norm.weight, output.weight               model.norm.weight, lm_head.weight
  blk.{i}.attn_norm                               model.layers.{i}.input_layernorm
  blk.{i}.attn_q, attn_k, attn_v, attn_output     model.layers.{i}.self_attn.{q,k,v,o}_proj
  blk.{i}.ffn_norm                                model.layers.{i}.post_attention_layernorm
  blk.{i}.ffn_gate, ffn_up, ffn_down              model.layers.{i}.mlp.{gate,up,down}_proj

llama.cpp's converter reorders the rows of q_proj and k_proj (weights and biases) for its rotary kernel, which
rotates adjacent pairs ``(2j, 2j + 1)`` of a head where transformers rotates ``(j, j + d/2)``:
:func:`unpermute_rope_rows` undoes it.
"""

from __future__ import annotations

import re
from typing import Dict, Mapping

import numpy as np

from ppojax.models.base import CheckpointError, GGUFConverter
from ppojax.models.llama import convert
from ppojax.models.llama.model import LlamaConfig

ARCHITECTURES = ("llama",)

_TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight"}
_BLOCK = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
          "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
          "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
_REQUIRED = object()


def hf_name(gguf_name: str):
    """The Hugging Face name of a GGUF tensor name, or None when it has none in this family."""
    if gguf_name in _TOP:
        return _TOP[gguf_name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
    if m and m.group(2) in _BLOCK:
        return f"model.layers.{m.group(1)}.{_BLOCK[m.group(2)]}.{m.group(3)}"
    return None


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's row order of a q or k projection (``[n_heads * d, ...]`` weight or ``[n_heads * d]`` bias).

    llama.cpp's ``convert_hf_to_gguf.py`` moves, within each head of width ``d``, the transformers row ``a * d/2 + j``
    (``a`` in {0, 1}, ``j < d/2``) to row ``2 j + a``, so that a rotary pair sits in adjacent rows. The inverse
    reads each head as ``[d/2, 2]`` and transposes it to ``[2, d/2]``.
    """
    rows = w.shape[0]
    if rows % n_heads or (rows // n_heads) % 2:
        raise CheckpointError(f"a rotary projection of {rows} rows does not split into {n_heads} heads of even width")
    d = rows // n_heads
    return w.reshape(n_heads, d // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def config_from_gguf(f, source: str = "GGUF file", **overrides) -> LlamaConfig:
    """LlamaConfig from a GGUF file's metadata; refuses what ppojax does not implement (mixture of experts, RoPE
    scaling stored as llama.cpp ``rope_freqs``, per-layer head counts), one clear error each."""
    arch = f.architecture
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"{source}: GGUF architecture {arch!r}; the llama family reads {ARCHITECTURES}")

    def meta(key, default=_REQUIRED):
        value = f.get(f"{arch}.{key}", default)
        if value is _REQUIRED:
            raise CheckpointError(f"{source}: GGUF metadata {arch}.{key} is missing")
        if isinstance(value, list):
            raise CheckpointError(f"{source}: GGUF metadata {arch}.{key} is a per-layer list; ppojax needs one value")
        return value

    if meta("expert_count", 0):
        raise CheckpointError(f"{source}: a mixture-of-experts GGUF ({arch}.expert_count={meta('expert_count')}) is "
                              "not supported")
    scaling = meta("rope.scaling.type", "none")
    if scaling not in ("none", None) or "rope_freqs.weight" in f.tensor_names():
        raise CheckpointError(f"{source}: RoPE scaling in a GGUF file (rope.scaling.type={scaling!r}"
                              f"{', rope_freqs tensor' if 'rope_freqs.weight' in f.tensor_names() else ''}) is not "
                              "supported; load the Hugging Face checkpoint instead (its llama3 scaling is)")
    heads = int(meta("attention.head_count"))
    hidden = int(meta("embedding_length"))
    head_dim = int(meta("attention.key_length", hidden // heads))
    if int(meta("attention.value_length", head_dim)) != head_dim:
        raise CheckpointError(f"{source}: key and value heads of different widths are not supported")
    rope_dim = meta("rope.dimension_count", head_dim)
    if int(rope_dim) != head_dim:
        raise CheckpointError(f"{source}: {arch}.rope.dimension_count={rope_dim} differs from the head width "
                              f"{head_dim}; partial rotary embeddings are not supported")
    names = set(f.tensor_names())
    if "token_embd.weight" not in names:
        raise CheckpointError(f"{source}: no token_embd.weight tensor; is this a {arch} model?")
    vocab = f.array_length("tokenizer.ggml.tokens") or meta("vocab_size", None) or f.tensor_shape(
        "token_embd.weight")[0]
    attention_bias = "blk.0.attn_q.bias" in names
    fields = dict(
        model_type="llama",
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(meta("feed_forward_length")),
        num_hidden_layers=int(meta("block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(meta("attention.head_count_kv", heads)),
        head_dim=None if head_dim * heads == hidden else head_dim,
        max_position_embeddings=int(meta("context_length")),
        rms_norm_eps=float(meta("attention.layer_norm_rms_epsilon")),
        rope_theta=float(meta("rope.freq_base", 10000.0)),
        tie_word_embeddings="output.weight" not in names,
        qkv_bias=attention_bias,
        o_bias=attention_bias,
        mlp_bias="blk.0.ffn_gate.bias" in names,
        bos_token_id=f.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=f.get("tokenizer.ggml.eos_token_id"),
    )
    fields.update(overrides)
    try:
        return LlamaConfig(**fields)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: {e}") from None


def params_from_gguf(config: LlamaConfig, f, source: str = "GGUF file"):
    """Params from a GGUF file: every tensor named, shape-checked (before decoding) and used, or one error naming
    the GGUF tensors at fault; then q/k rows un-permuted and ``convert.params_from_hf``'s key map."""
    expected: Dict[str, tuple] = {"model." + k: shape for k, _, _, shape in convert.top_tensors(config)}
    for i in range(config.num_hidden_layers):
        expected.update({f"model.layers.{i}.{k}": shape for k, _, _, shape in convert.block_tensors(config)})
    if not config.tie_word_embeddings:
        expected["lm_head.weight"] = (config.vocab_size, config.hidden_size)
    to_hf: Dict[str, str] = {}
    leftovers = []
    for name in f.tensor_names():
        hf = hf_name(name)
        if hf is None or hf not in expected:
            leftovers.append(name)
            continue
        shape = f.tensor_shape(name)
        if shape != tuple(expected[hf]):
            raise CheckpointError(f"{source}: tensor {name} has shape {shape}, expected {tuple(expected[hf])} for "
                                  f"the model its metadata describes ({config.num_hidden_layers} layers, width "
                                  f"{config.hidden_size}, {config.num_attention_heads}/{config.kv_heads} heads)")
        to_hf[name] = hf
    if leftovers:
        raise CheckpointError(f"{source}: {len(leftovers)} GGUF tensors have no place in the llama key map: "
                              f"{sorted(leftovers)[:10]}")
    missing = sorted(set(expected) - set(to_hf.values()))
    if missing:
        from_hf = {hf: g for g, hf in ((g, hf_name(g)) for g in _gguf_names(config))}
        raise CheckpointError(f"{source}: {len(missing)} tensors are missing, e.g. "
                              f"{[from_hf.get(m, m) for m in missing[:5]]}")
    return convert.params_from_hf(config, _DecodedTensors(f, to_hf, config), source)


class _DecodedTensors(Mapping):
    """A GGUF file's tensors under their transformers names, each decoded to float32 (q/k rows un-permuted) only when
    read: ``convert.params_from_hf`` reads them one at a time, so loading never holds a second copy of the model."""

    def __init__(self, f, to_hf: Dict[str, str], config: LlamaConfig):
        self._f, self._config = f, config
        self._names = {hf: name for name, hf in to_hf.items()}

    def __getitem__(self, hf: str) -> np.ndarray:
        value = self._f.tensor(self._names[hf])
        if ".self_attn.q_proj." in hf:
            value = unpermute_rope_rows(value, self._config.num_attention_heads)
        elif ".self_attn.k_proj." in hf:
            value = unpermute_rope_rows(value, self._config.kv_heads)
        return value

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def _gguf_names(config: LlamaConfig):
    """Every GGUF tensor name a file of ``config``'s shape could hold (for naming missing ones)."""
    yield from _TOP
    for i in range(config.num_hidden_layers):
        for part in _BLOCK:
            yield f"blk.{i}.{part}.weight"
            yield f"blk.{i}.{part}.bias"


CONVERTER = GGUFConverter(architectures=ARCHITECTURES, config_from_gguf=config_from_gguf,
                          params_from_gguf=params_from_gguf)
