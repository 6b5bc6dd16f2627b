"""The Llama family's explicit key map to and from Hugging Face transformers checkpoints (Llama, Qwen2, Mistral).

HF key (``model.`` prefix optional)                  ppojax param (blocks stacked on a leading ``[n_layer]`` axis)
  model.embed_tokens.weight            [V, D]        transformer/embed_tokens/embedding
  layers.{i}.input_layernorm.weight    [D]           transformer/layers/input_layernorm/weight[i]
  layers.{i}.self_attn.q_proj.weight   [H d, D]      transformer/layers/q_proj/kernel[i]    [D, H d]  (transposed)
  layers.{i}.self_attn.k_proj.weight   [K d, D]      transformer/layers/k_proj/kernel[i]    [D, K d]
  layers.{i}.self_attn.v_proj.weight   [K d, D]      transformer/layers/v_proj/kernel[i]    [D, K d]
  layers.{i}.self_attn.o_proj.weight   [D, H d]      transformer/layers/o_proj/kernel[i]    [H d, D]
  layers.{i}.self_attn.{q,k,v,o}_proj.bias           .../bias[i]   (Qwen2: q, k, v; Llama attention_bias: all four)
  layers.{i}.post_attention_layernorm.weight [D]     transformer/layers/post_attention_layernorm/weight[i]
  layers.{i}.mlp.gate_proj.weight      [F, D]        transformer/layers/gate_proj/kernel[i] [D, F]
  layers.{i}.mlp.up_proj.weight        [F, D]        transformer/layers/up_proj/kernel[i]   [D, F]
  layers.{i}.mlp.down_proj.weight      [D, F]        transformer/layers/down_proj/kernel[i] [F, D]
  layers.{i}.mlp.{gate,up,down}_proj.bias            .../bias[i]   (Llama mlp_bias only)
  model.norm.weight                    [D]           transformer/norm/weight
  lm_head.weight                       [V, D]        lm_head/embedding (untied); tied: absent, or equal to the embedding

A torch ``nn.Linear`` stores its weight as ``[out, in]`` and computes ``x W^T``; Flax's kernel is ``[in, out]``
(``x K``), so every projection is transposed on the way in and out. The non-persistent RoPE buffers that old
checkpoints carry (``rotary_emb.inv_freq``) are recognised and skipped: ppojax derives the frequencies from the config.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping

import numpy as np

from ppojax.models.base import CheckpointError, HFConverter, stack_layers
from ppojax.models.llama.model import MODEL_TYPES, Llama3RopeScaling, LlamaConfig

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
_BUFFER_SUFFIXES = ("rotary_emb.inv_freq",)


# ----------------------------------------------------------------------------------------------------------------
# config.json


def _rope_from_hf(hf: Dict[str, Any], source: str):
    """``(rope_theta, Llama3RopeScaling or None)`` from transformers 5's ``rope_parameters`` or 4.x's
    ``rope_theta`` + ``rope_scaling``; refuses every RoPE variant ppojax does not implement."""
    params = hf.get("rope_parameters") or {}
    if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
        raise CheckpointError(f"{source}: rope_parameters={params!r} is not supported (per-layer RoPE settings)")
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    scaling = hf.get("rope_scaling") or params
    rope_type = scaling.get("rope_type", scaling.get("type")) if scaling else None
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise CheckpointError(f"{source}: partial_rotary_factor={partial!r} is not supported (ppojax rotates whole "
                              "heads)")
    if rope_type in (None, "default"):
        return theta, None
    if rope_type != "llama3":
        raise CheckpointError(f"{source}: RoPE type {rope_type!r} is not supported; ppojax implements plain RoPE "
                              "('default') and Llama 3.1's 'llama3' scaling")
    try:
        return theta, Llama3RopeScaling(
            factor=float(scaling["factor"]), low_freq_factor=float(scaling["low_freq_factor"]),
            high_freq_factor=float(scaling["high_freq_factor"]),
            original_max_position_embeddings=int(scaling["original_max_position_embeddings"]))
    except KeyError as e:
        raise CheckpointError(f"{source}: llama3 rope scaling needs {e.args[0]!r}") from None
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None


def _refuse_sliding_window(hf: Dict[str, Any], model_type: str, max_positions: int, source: str) -> None:
    """ppojax attends over the whole context. A window at least as long as the context masks nothing (transformers'
    Mistral defaults to 4096), so only a window that can cut attention short is refused."""
    if model_type == "qwen2":
        sliding = bool(hf.get("use_sliding_window", False)) or "sliding_attention" in (hf.get("layer_types") or ())
    else:
        window = hf.get("sliding_window")
        sliding = window is not None and int(window) < max_positions
    if sliding:
        raise CheckpointError(
            f"{source}: sliding-window attention (sliding_window={hf.get('sliding_window')!r}) is not supported; "
            f"ppojax's {model_type} attends over the whole context (sliding_window null, or at least "
            f"max_position_embeddings={max_positions})"
        )


def config_from_hf(hf: Dict[str, Any], source: str = "config.json", **overrides) -> LlamaConfig:
    """LlamaConfig from a transformers ``config.json`` dict (model_type llama, qwen2 or mistral); refuses the options
    ppojax does not implement (other activations, other RoPE types, sliding windows) with one clear error each."""
    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPES:
        raise CheckpointError(f"{source}: model_type is {model_type!r}; the llama family loads "
                              f"{', '.join(MODEL_TYPES)}")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"{source}: hidden_act={act!r} is not supported (ppojax's SwiGLU MLP uses 'silu')")
    try:
        fields = dict(
            model_type=model_type,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=int(hf["hidden_size"]),
            intermediate_size=int(hf["intermediate_size"]),
            num_hidden_layers=int(hf["num_hidden_layers"]),
            num_attention_heads=int(hf["num_attention_heads"]),
            num_key_value_heads=None if hf.get("num_key_value_heads") is None else int(hf["num_key_value_heads"]),
            head_dim=None if hf.get("head_dim") is None else int(hf["head_dim"]),
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=tuple(hf["eos_token_id"]) if isinstance(hf.get("eos_token_id"), list)
            else hf.get("eos_token_id"),
        )
    except KeyError as e:
        raise CheckpointError(f"{source}: missing field {e.args[0]!r} of a {model_type} config") from None
    if fields["head_dim"] is not None and fields["head_dim"] * fields["num_attention_heads"] == fields["hidden_size"]:
        fields["head_dim"] = None  # the default width: one canonical config whether or not config.json spells it out
    _refuse_sliding_window(hf, model_type, fields["max_position_embeddings"], source)
    fields["rope_theta"], fields["rope_scaling"] = _rope_from_hf(hf, source)
    if model_type == "qwen2":
        fields.update(qkv_bias=True, o_bias=False, mlp_bias=False)
    elif model_type == "llama":
        attention_bias = bool(hf.get("attention_bias", False))
        fields.update(qkv_bias=attention_bias, o_bias=attention_bias, mlp_bias=bool(hf.get("mlp_bias", False)))
    fields.update(overrides)
    try:
        return LlamaConfig(**fields)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: {e}") from None


def config_to_hf(config: LlamaConfig) -> Dict[str, Any]:
    """A transformers ``config.json`` dict (``LlamaForCausalLM``, ``Qwen2ForCausalLM`` or ``MistralForCausalLM`` by
    ``config.model_type``). RoPE settings are written both as transformers 5's ``rope_parameters`` and as 4.x's
    ``rope_theta`` / ``rope_scaling``."""
    rope = {"rope_type": "default", "rope_theta": config.rope_theta}
    legacy_scaling = None
    if config.rope_scaling is not None:
        s = config.rope_scaling
        legacy_scaling = {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                          "high_freq_factor": s.high_freq_factor,
                          "original_max_position_embeddings": s.original_max_position_embeddings}
        rope = {**legacy_scaling, "rope_theta": config.rope_theta}
    eos = list(config.eos_token_id) if isinstance(config.eos_token_id, tuple) else config.eos_token_id
    out = {
        "architectures": [ARCHITECTURES[config.model_type]],
        "model_type": config.model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_width,
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "hidden_act": "silu",
        "rope_parameters": rope,
        "rope_theta": config.rope_theta,
        "rope_scaling": legacy_scaling,
        "tie_word_embeddings": config.tie_word_embeddings,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": eos,
        "use_cache": True,
        "torch_dtype": "float32",
    }
    if config.model_type == "llama":
        out.update(attention_bias=config.qkv_bias, mlp_bias=config.mlp_bias)
    elif config.model_type == "qwen2":
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=config.num_hidden_layers)
    else:
        out.update(sliding_window=None)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Tensors


def block_tensors(config: LlamaConfig):
    """``(HF name inside layer i, module, leaf, HF shape)`` of every per-layer tensor ``config`` has."""
    D, F, d = config.hidden_size, config.intermediate_size, config.head_width
    Hd, Kd = config.num_attention_heads * d, config.kv_heads * d
    out = [("input_layernorm.weight", "input_layernorm", "weight", (D,))]
    for name, rows in (("q_proj", Hd), ("k_proj", Kd), ("v_proj", Kd)):
        out.append((f"self_attn.{name}.weight", name, "kernel", (rows, D)))
        if config.qkv_bias:
            out.append((f"self_attn.{name}.bias", name, "bias", (rows,)))
    out.append(("self_attn.o_proj.weight", "o_proj", "kernel", (D, Hd)))
    if config.o_bias:
        out.append(("self_attn.o_proj.bias", "o_proj", "bias", (D,)))
    out.append(("post_attention_layernorm.weight", "post_attention_layernorm", "weight", (D,)))
    for name, (rows, cols) in (("gate_proj", (F, D)), ("up_proj", (F, D)), ("down_proj", (D, F))):
        out.append((f"mlp.{name}.weight", name, "kernel", (rows, cols)))
        if config.mlp_bias:
            out.append((f"mlp.{name}.bias", name, "bias", (rows,)))
    return out


def top_tensors(config: LlamaConfig):
    """``(HF name without the 'model.' prefix, module, leaf, HF shape)`` of the trunk's other tensors."""
    V, D = config.vocab_size, config.hidden_size
    return [("embed_tokens.weight", "embed_tokens", "embedding", (V, D)), ("norm.weight", "norm", "weight", (D,))]


def _to_flax(hf_value: np.ndarray, leaf: str) -> np.ndarray:
    return hf_value.T if leaf == "kernel" else hf_value


def params_from_hf(config: LlamaConfig, tensors: Mapping[str, np.ndarray], source: str = "checkpoint", dtype=None):
    """Map HF tensors onto ppojax's stacked parameter tree. Uses every tensor or fails naming the leftovers; checks
    every shape, naming the tensor, its shape and the expected one.

    The names are checked first (missing tensors, then leftovers), before any tensor is read. ``tensors`` is read
    one key at a time and each stacked leaf becomes a device array as soon as its layers are in, so a lazy mapping
    (a GGUF file's decoder, :mod:`ppojax.models.llama.gguf`) holds at most one decoded tensor and one stacked leaf
    on the host beside the finished params, not a second copy of the model.
    """
    import jax.numpy as jnp

    dtype = dtype or config.storage_dtype
    prefix = "model." if any(k.startswith("model.") for k in tensors) else ""
    remaining = set(tensors)
    missing = []

    def want(key):
        if key not in remaining:
            missing.append(key)
        remaining.discard(key)
        return key

    top = [(module, leaf, want(prefix + hf_key), shape) for hf_key, module, leaf, shape in top_tensors(config)]
    L = config.num_hidden_layers
    blocks = [(module, leaf, [want(f"{prefix}layers.{i}.{hf_key}") for i in range(L)], shape)
              for hf_key, module, leaf, shape in block_tensors(config)]
    head_shape = (config.vocab_size, config.hidden_size)
    tied_head = config.tie_word_embeddings and "lm_head.weight" in remaining  # allowed if equal to the embedding
    if tied_head:
        remaining.discard("lm_head.weight")
    head = None if config.tie_word_embeddings else want("lm_head.weight")
    if missing:
        raise CheckpointError(
            f"{source}: {len(missing)} tensors of a {L}-layer {config.model_type} are missing, e.g. {missing[:5]}; is "
            "config.json from the same checkpoint?"
        )
    leftovers = sorted(k for k in remaining if not k.endswith(_BUFFER_SUFFIXES))
    if leftovers:
        raise CheckpointError(
            f"{source}: {len(leftovers)} tensors have no place in the {config.model_type} key map: {leftovers[:10]}. "
            "Does config.json match the weights (biases, tied head), or does the checkpoint carry an extra head?"
        )

    def read(key, shape):
        value = np.asarray(tensors[key])
        if tuple(value.shape) != tuple(shape):
            raise CheckpointError(f"{source}: tensor {key} has shape {tuple(value.shape)}, expected {tuple(shape)} "
                                  f"for a {config.model_type} of hidden_size={config.hidden_size}, "
                                  f"intermediate_size={config.intermediate_size}, heads={config.num_attention_heads}"
                                  f"/{config.kv_heads} (q/kv), head_dim={config.head_width}, "
                                  f"vocab_size={config.vocab_size}")
        return value

    trunk: Dict[str, Any] = {}
    for module, leaf, key, shape in top:
        value = read(key, shape)
        if tied_head and leaf == "embedding" and not np.array_equal(read("lm_head.weight", head_shape), value):
            raise CheckpointError(f"{source}: lm_head.weight differs from the token embedding, but config.json has "
                                  "tie_word_embeddings=true")
        trunk.setdefault(module, {})[leaf] = jnp.asarray(value, dtype=dtype)
    layers: Dict[str, Dict[str, Any]] = {}
    for module, leaf, keys, shape in blocks:
        layers.setdefault(module, {})[leaf] = stack_layers((_to_flax(read(key, shape), leaf) for key in keys), L,
                                                           dtype)
    trunk["layers"] = layers
    params: Dict[str, Any] = {"transformer": trunk}
    if head is not None:
        params["lm_head"] = {"embedding": jnp.asarray(read(head, head_shape), dtype=dtype)}
    return params


def params_to_hf(config: LlamaConfig, params) -> Dict[str, np.ndarray]:
    """The inverse map: ppojax params -> ``model.*`` (and ``lm_head.weight``) float32 tensors. Every shape is checked
    against ``config`` first, naming the tensor.

    Scalar-head params (a critic or reward model: no ``lm_head`` entry) of an untied config export the token
    embedding as ``lm_head.weight``, so the export still loads as a causal LM in transformers and in ppojax.
    """
    trunk = params["transformer"]
    out = {}
    for hf_key, module, leaf, shape in top_tensors(config):
        out["model." + hf_key] = _checked(trunk[module][leaf], shape, hf_key, config)
    L = config.num_hidden_layers
    for hf_key, module, leaf, shape in block_tensors(config):
        flax_shape = (L, *shape[::-1]) if leaf == "kernel" else (L, *shape)
        stacked = _checked(np.asarray(trunk["layers"][module][leaf]), flax_shape, f"layers.*.{hf_key} (stacked)",
                           config)
        for i in range(L):
            out[f"model.layers.{i}.{hf_key}"] = _to_flax(stacked[i], leaf)  # the transpose is its own inverse
    if not config.tie_word_embeddings:
        head = params["lm_head"]["embedding"] if "lm_head" in params else trunk["embed_tokens"]["embedding"]
        out["lm_head.weight"] = _checked(head, (config.vocab_size, config.hidden_size), "lm_head.weight", config)
    return {k: np.ascontiguousarray(np.asarray(v, dtype=np.float32)) for k, v in out.items()}


def _checked(x, shape, name, config):
    if tuple(np.shape(x)) != tuple(shape):
        raise CheckpointError(f"save_pretrained: tensor {name} has shape {tuple(np.shape(x))}, but the "
                              f"{config.model_type} config needs {tuple(shape)}")
    return x


# LoRA targets (ppojax module names) -> transformers module paths: PEFT's adapter tensor names (ppojax.models.lora).
LORA_MODULES = tuple((name, f"model.layers.{{layer}}.{part}.{name}")
                     for part, names in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                                         ("mlp", ("gate_proj", "up_proj", "down_proj")))
                     for name in names)

CONVERTER = HFConverter(config_from_hf=config_from_hf, config_to_hf=config_to_hf, params_from_hf=params_from_hf,
                        params_to_hf=params_to_hf, lora_modules=LORA_MODULES)
