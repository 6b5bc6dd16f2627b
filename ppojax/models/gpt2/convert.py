"""GPT-2's explicit key map to and from Hugging Face transformers checkpoints.

HF key (``transformer.`` prefix optional)      ppojax param (blocks stacked on a leading ``[n_layer]`` axis)
  wte.weight            [V, D]                   transformer/wte/embedding
  wpe.weight            [P, D]                   transformer/wpe/embedding
  h.{i}.ln_1.{weight,bias}                       transformer/h/ln_1/{scale,bias}[i]
  h.{i}.attn.c_attn.{weight [D,3D], bias}        transformer/h/c_attn/{kernel,bias}[i]
  h.{i}.attn.c_proj.{weight [D,D], bias}         transformer/h/c_proj/{kernel,bias}[i]
  h.{i}.ln_2.{weight,bias}                       transformer/h/ln_2/{scale,bias}[i]
  h.{i}.mlp.c_fc.{weight [D,4D], bias}           transformer/h/c_fc/{kernel,bias}[i]
  h.{i}.mlp.c_proj.{weight [4D,D], bias}         transformer/h/c_proj_mlp/{kernel,bias}[i]
  ln_f.{weight,bias}                             transformer/ln_f/{scale,bias}
  lm_head.weight        [V, D] (optional)        tied: must equal wte.weight
GPT-2's Conv1D stores weights as [in, out], Flax's kernel layout, so no transpose is needed. The non-parameter
buffers of old checkpoints (``h.{i}.attn.bias``, ``h.{i}.attn.masked_bias``: causal masks) are recognised and
skipped.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping

import numpy as np

from ppojax.models.base import CheckpointError, HFConverter, stack_layers
from ppojax.models.gpt2.model import GPT2Config

# (HF name inside a block, ppojax name, leaf) for the per-layer tensors.
_BLOCK_KEYS = (
    ("ln_1.weight", "ln_1", "scale"),
    ("ln_1.bias", "ln_1", "bias"),
    ("attn.c_attn.weight", "c_attn", "kernel"),
    ("attn.c_attn.bias", "c_attn", "bias"),
    ("attn.c_proj.weight", "c_proj", "kernel"),
    ("attn.c_proj.bias", "c_proj", "bias"),
    ("ln_2.weight", "ln_2", "scale"),
    ("ln_2.bias", "ln_2", "bias"),
    ("mlp.c_fc.weight", "c_fc", "kernel"),
    ("mlp.c_fc.bias", "c_fc", "bias"),
    ("mlp.c_proj.weight", "c_proj_mlp", "kernel"),
    ("mlp.c_proj.bias", "c_proj_mlp", "bias"),
)
_TOP_KEYS = (
    ("wte.weight", "wte", "embedding"),
    ("wpe.weight", "wpe", "embedding"),
    ("ln_f.weight", "ln_f", "scale"),
    ("ln_f.bias", "ln_f", "bias"),
)
_BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias")




def config_from_hf(hf: Dict[str, Any], source: str = "config.json", **overrides) -> GPT2Config:
    """GPT2Config from a transformers ``config.json`` dict; refuses other architectures and unsupported options."""
    model_type = hf.get("model_type")
    if model_type != "gpt2":
        archs = hf.get("architectures")
        raise CheckpointError(
            f"{source}: model_type is {model_type!r} (architectures {archs}); ppojax loads GPT-2 checkpoints "
            "(model_type 'gpt2') only"
        )
    unsupported = {
        "activation_function": ("gelu_new", "gelu_pytorch_tanh"),
        "scale_attn_weights": (True,),
        "scale_attn_by_inverse_layer_idx": (False,),
        "reorder_and_upcast_attn": (False,),
        "add_cross_attention": (False,),
    }
    for key, allowed in unsupported.items():
        if key in hf and hf[key] not in allowed:
            raise CheckpointError(f"{source}: {key}={hf[key]!r} is not supported (ppojax's GPT-2 uses {allowed[0]!r})")
    if hf.get("tie_word_embeddings", True) is False:
        raise CheckpointError(f"{source}: tie_word_embeddings=false; ppojax's GPT-2 ties the LM head to wte")
    try:
        fields = dict(
            vocab_size=int(hf["vocab_size"]),
            n_positions=int(hf.get("n_positions", hf.get("n_ctx", 1024))),
            n_embd=int(hf["n_embd"]),
            n_layer=int(hf["n_layer"]),
            n_head=int(hf["n_head"]),
            n_inner=None if hf.get("n_inner") is None else int(hf["n_inner"]),
            layer_norm_epsilon=float(hf.get("layer_norm_epsilon", 1e-5)),
        )
    except KeyError as e:
        raise CheckpointError(f"{source}: missing field {e.args[0]!r} of a GPT-2 config") from None
    fields.update(overrides)
    return GPT2Config(**fields)


def config_to_hf(config: GPT2Config) -> Dict[str, Any]:
    """A transformers GPT-2 ``config.json`` dict for ``config``."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "activation_function": "gelu_new",
        "vocab_size": config.vocab_size,
        "n_positions": config.n_positions,
        "n_ctx": config.n_positions,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": config.n_inner,
        "layer_norm_epsilon": config.layer_norm_epsilon,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "summary_first_dropout": 0.0,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        "bos_token_id": 50256,
        "eos_token_id": 50256,
        "use_cache": True,
        "torch_dtype": "float32",
    }


def _expected_shapes(config: GPT2Config):
    """HF shapes of the top-level and of the per-block tensors (block keys without the ``h.{i}.`` prefix)."""
    D, V, P, F = config.n_embd, config.vocab_size, config.n_positions, config.mlp_width
    top = {"wte.weight": (V, D), "wpe.weight": (P, D), "ln_f.weight": (D,), "ln_f.bias": (D,)}
    block = {
        "ln_1.weight": (D,), "ln_1.bias": (D,), "attn.c_attn.weight": (D, 3 * D), "attn.c_attn.bias": (3 * D,),
        "attn.c_proj.weight": (D, D), "attn.c_proj.bias": (D,), "ln_2.weight": (D,), "ln_2.bias": (D,),
        "mlp.c_fc.weight": (D, F), "mlp.c_fc.bias": (F,), "mlp.c_proj.weight": (F, D), "mlp.c_proj.bias": (D,),
    }
    return top, block


def params_from_hf(config: GPT2Config, tensors: Mapping[str, np.ndarray], source: str = "checkpoint", dtype=None):
    """Map HF GPT-2 tensors onto ppojax's stacked parameter tree. Fails on gaps and leftovers (naming them), on shape
    mismatches (naming the tensor, its shape and the expected one) and on an ``lm_head.weight`` that is not ``wte``.

    The names are checked first (missing tensors, then leftovers), before any tensor is read. ``tensors`` is read
    one key at a time and each stacked leaf becomes a device array as soon as its layers are in, so a lazy mapping
    holds at most one tensor and one stacked leaf on the host beside the finished params (as the Llama converter).
    """
    import jax.numpy as jnp

    dtype = dtype or config.storage_dtype
    prefix = "transformer." if any(k.startswith("transformer.") for k in tensors) else ""
    remaining = set(tensors)
    missing = []

    def want(key):
        if key not in remaining:
            missing.append(key)
        remaining.discard(key)
        return key

    L = config.n_layer
    expected_top, expected_block = _expected_shapes(config)
    top = [(module, leaf, want(prefix + hf_key), expected_top[hf_key]) for hf_key, module, leaf in _TOP_KEYS]
    blocks = [(module, leaf, [want(f"{prefix}h.{i}.{hf_key}") for i in range(L)], expected_block[hf_key])
              for hf_key, module, leaf in _BLOCK_KEYS]
    head = "lm_head.weight" in remaining  # tied: allowed if equal to wte
    remaining.discard("lm_head.weight")
    if missing:
        raise CheckpointError(
            f"{source}: {len(missing)} tensors of a {L}-layer GPT-2 are missing, e.g. {missing[:5]}; is config.json "
            "from the same checkpoint?"
        )
    leftovers = sorted(k for k in remaining if not k.endswith(_BUFFER_SUFFIXES))
    if leftovers:
        raise CheckpointError(
            f"{source}: {len(leftovers)} tensors have no place in GPT-2's key map: {leftovers[:10]}. "
            "Is this a GPT-2 checkpoint with an extra head (value/score head)? Load its trunk with the matching API."
        )

    def read(key, shape):
        value = np.asarray(tensors[key])
        if tuple(value.shape) != tuple(shape):
            raise CheckpointError(
                f"{source}: tensor {key} has shape {tuple(value.shape)}, expected {tuple(shape)} for {config}"
            )
        return value

    trunk: Dict[str, Any] = {}
    for module, leaf, key, shape in top:
        value = read(key, shape)
        if head and module == "wte" and not np.array_equal(read("lm_head.weight", shape), value):
            raise CheckpointError(f"{source}: lm_head.weight differs from wte.weight; ppojax's GPT-2 ties the two")
        trunk.setdefault(module, {})[leaf] = jnp.asarray(value, dtype=dtype)
    blocks_out: Dict[str, Dict[str, Any]] = {}
    for module, leaf, keys, shape in blocks:
        blocks_out.setdefault(module, {})[leaf] = stack_layers((read(key, shape) for key in keys), L, dtype)
    trunk["h"] = blocks_out
    return {"transformer": trunk}


def params_to_hf(config: GPT2Config, params) -> Dict[str, np.ndarray]:
    """The inverse map: ppojax params -> ``transformer.*`` float32 tensors (the LM head is tied, so not written).
    Every shape is checked against ``config`` first, naming the tensor."""
    trunk = params["transformer"]
    expected_top, expected_block = _expected_shapes(config)
    out = {}
    for hf_key, module, leaf in _TOP_KEYS:
        out["transformer." + hf_key] = _checked(trunk[module][leaf], expected_top[hf_key], hf_key, config)
    for hf_key, module, leaf in _BLOCK_KEYS:
        stacked = trunk["h"][module][leaf]
        _checked(stacked, (config.n_layer, *expected_block[hf_key]), f"h.*.{hf_key} (stacked)", config)
        for i in range(config.n_layer):
            out[f"transformer.h.{i}.{hf_key}"] = stacked[i]
    return {k: np.ascontiguousarray(np.asarray(v, dtype=np.float32)) for k, v in out.items()}


def _checked(x, shape, name, config):
    if tuple(np.shape(x)) != tuple(shape):
        raise CheckpointError(f"save_pretrained: tensor {name} has shape {tuple(np.shape(x))}, but {config} needs "
                              f"{tuple(shape)}")
    return x


# LoRA targets (ppojax module names) -> transformers module paths: PEFT's adapter tensor names.
LORA_MODULES = tuple((module, "transformer.h.{layer}." + hf_key.removesuffix(".weight"))
                     for hf_key, module, leaf in _BLOCK_KEYS if leaf == "kernel")

CONVERTER = HFConverter(config_from_hf=config_from_hf, config_to_hf=config_to_hf, params_from_hf=params_from_hf,
                        params_to_hf=params_to_hf, lora_modules=LORA_MODULES, fan_in_fan_out=True)
