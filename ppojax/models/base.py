"""The model interface: what the iteration, the sampler, the log-prob code and the reward model need of a language
model, and the registry that maps a family name or a Hugging Face ``model_type`` to an implementation.

A family is one :class:`ModelFamily` value, a handful of pure functions over ``(config, params)``:

    init_params(config, key)                       -> params          {'transformer': trunk, ...heads}
    hidden(config, params, ids, mask, cache=None)  -> (h, cache)      h [batch, time, width] float32, after the
                                                                      final norm; with a cache the ids are appended
                                                                      at ``cache.index`` (prefill or one decode step)
    lm_head(config, params)                        -> W [vocab, width]  the LM-head matrix, tied or untied:
                                                                      logits = h W^T
    init_cache(config, batch, max_len)             -> KVCache
    random_config(*, vocab_size, n_embd, ...)      -> config  (optional) a random init's config from a run config's
                                                                      generic shape fields (``model.family``)
    hf: HFConverter (optional)                     -> config and tensors to and from transformers' layout
    gguf: GGUFConverter (optional)                 -> config and tensors from a llama.cpp GGUF file

Everything else is written once, here, on top of those: :func:`forward`, :func:`forward_hidden`,
:func:`unembed`, :func:`next_token_logits`, the scalar head of a critic or reward model (:func:`value_forward`,
:func:`init_value_params`) and the input checks. The scalar-head params of every family are
``{'transformer': trunk, 'head': {'kernel': [width, 1], 'bias': [1]}}``: the same trunk as the LM, so a critic or a
reward model starts from the policy's weights (TRL's PPOv2, Tunix; RLHF-FACTS "Heads and initialisation").

A family's config is a frozen, hashable dataclass (a static argument of jitted functions) with at least
``vocab_size``, ``max_positions``, ``width``, ``compute_dtype``, ``storage_dtype`` and ``replace(**changes)``.
Dispatch is by the config's type, so ``forward(config, params, ...)`` works for any registered family.

Registering a family (see ``docs/extending.md``)::

    register_model_family(ModelFamily(name="mymodel", config_type=MyConfig, hf_model_types=("mymodel",),
                                      init_params=..., hidden=..., lm_head=..., init_cache=...))
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Callable, Optional

import chex
import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

Params = Any  # a nested dict of arrays
ModelConfig = Any  # a registered family's config dataclass (GPT2Config, LlamaConfig, ...)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
"""Names of the compute / storage dtypes a model config accepts."""


REMAT = (False, True, "full", "dots")
"""``remat`` settings of a family's blocks in the backward pass (:func:`remat_block`)."""


def remat_block(block, remat):
    """The block module to scan for ``remat``:

    - ``False``: nothing recomputed; the backward reads every activation the forward kept.
    - ``True`` or ``"full"``: each block's activations are recomputed from its input in the backward (one more
      forward pass; the backward keeps one width per layer and token, plus one whole block).
    - ``"dots"``: keep the outputs of the weight matmuls (the projections, the MLP and LoRA adapters: dots with no
      batch dimension, ``jax.checkpoint_policies.dots_with_no_batch_dims_saveable``), recompute the rest (norms,
      RoPE, the MLP's activation, the attention scores and softmax). About half the activation memory of ``False``
      for little compute: only elementwise work and the attention's two batched matmuls run again.
    """
    if not remat:
        return block
    policy = jax.checkpoint_policies.dots_with_no_batch_dims_saveable if remat == "dots" else None
    return nn.remat(block, prevent_cse=False, policy=policy)


class ConfigNumerics:
    """Mixin of a family's config dataclass: the compute and storage dtypes named by its ``dtype`` and
    ``param_dtype`` fields, their check, and ``replace``."""

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    @property
    def storage_dtype(self):
        return DTYPES[self.param_dtype]

    def check_dtypes(self) -> None:
        for field in ("dtype", "param_dtype"):
            if getattr(self, field) not in DTYPES:
                raise ValueError(f"{type(self).__name__}.{field} must be one of {sorted(DTYPES)}, got "
                                 f"{getattr(self, field)!r}")
        if self.remat not in REMAT:
            raise ValueError(f"{type(self).__name__}.remat must be one of {list(REMAT)}, got {self.remat!r}")

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


@flax.struct.dataclass
class KVCache:
    """Keys and values of every layer for incremental decoding.

    ``key``/``value``: ``[n_layer, batch, kv_heads, max_len, head_dim]`` in the compute dtype (a family may use
    another layout; only it reads them). ``mask``: ``[batch, max_len]``, 1 where a slot holds a real token.
    ``index``: int32 scalar, the slot the next call writes its first token to.
    """

    key: jax.Array
    value: jax.Array
    mask: jax.Array
    index: jax.Array


def empty_cache(n_layer: int, batch: int, kv_heads: int, max_len: int, head_dim: int, dtype) -> KVCache:
    """A zeroed :class:`KVCache` in the standard layout."""
    shape = (n_layer, batch, kv_heads, max_len, head_dim)
    return KVCache(key=jnp.zeros(shape, dtype), value=jnp.zeros(shape, dtype),
                   mask=jnp.zeros((batch, max_len), jnp.int32), index=jnp.zeros((), jnp.int32))


def position_ids_from_mask(attention_mask: jax.Array) -> jax.Array:
    """``positions[b, t] = max(cumsum(mask[b])[t] - 1, 0)``: left padding does not shift the positions."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def attention_bias(query_slots, key_slots, key_valid):
    """Additive attention bias ``[batch, 1, q, k]``: 0 iff key slot <= query slot and the key is a real token."""
    allowed = (key_slots[None, None, :] <= query_slots[None, :, None]) & (key_valid[:, None, :] > 0)
    return jnp.where(allowed, 0.0, jnp.finfo(jnp.float32).min)[:, None, :, :]


def cache_positions_and_bias(attention_mask, cache: Optional[KVCache]):
    """Positions ``[batch, time]``, attention bias ``[batch, 1, time, slots]`` and the cache's new slot mask for
    ``time`` new tokens: the one attention layout every family shares.

    Without a cache the slots are the sequence itself. With one, the new tokens take slots ``index ..
    index + time - 1`` and attend over every slot that holds a real token at or before theirs, so a prefill and
    each decode step compute exactly what the full forward computes. Left padding: a token's position is the number
    of real tokens before it.
    """
    attention_mask = attention_mask.astype(jnp.int32)
    time = attention_mask.shape[1]
    if cache is None:
        slots = jnp.arange(time)
        return position_ids_from_mask(attention_mask), attention_bias(slots, slots, attention_mask), None
    kv_mask = jax.lax.dynamic_update_slice(cache.mask, attention_mask, (0, cache.index))
    positions = jnp.maximum(jnp.cumsum(kv_mask, axis=-1) - 1, 0)
    positions = jax.lax.dynamic_slice_in_dim(positions, cache.index, time, axis=1)
    bias = attention_bias(cache.index + jnp.arange(time), jnp.arange(kv_mask.shape[1]), kv_mask)
    return positions, bias, kv_mask


@dataclasses.dataclass(frozen=True)
class HFConverter:
    """A family's explicit map to and from Hugging Face transformers checkpoints.

    ``config_from_hf(hf_dict, source, **overrides) -> config`` refuses options the family does not implement;
    ``config_to_hf(config) -> dict`` is a ``config.json``; ``params_from_hf(config, tensors, source) -> params``
    uses every tensor or fails naming the leftovers, and checks every shape; ``params_to_hf(config, params) ->
    {name: np.ndarray}`` is its inverse.
    """

    config_from_hf: Callable[..., Any]
    config_to_hf: Callable[[Any], dict]
    params_from_hf: Callable[..., Params]
    params_to_hf: Callable[[Any, Params], dict]
    lora_modules: tuple = ()
    """``((target, module), ...)``: for each of ``ModelFamily.lora_targets``, the transformers module that holds that
    projection in layer ``{layer}``, e.g. ``('c_attn', 'transformer.h.{layer}.attn.c_attn')``. LoRA adapters are
    written and read in PEFT's format under these names (``ppojax.models.lora.save_adapter``)."""
    fan_in_fan_out: bool = False
    """Whether transformers stores these projections as ``[in, out]`` (GPT-2's Conv1D) rather than ``nn.Linear``'s
    ``[out, in]``: PEFT's ``fan_in_fan_out``."""


@dataclasses.dataclass(frozen=True)
class GGUFConverter:
    """A family's map from llama.cpp GGUF files (``ppojax.io.gguf`` reads and dequantizes them).

    ``architectures``: the ``general.architecture`` values it reads. ``config_from_gguf(gguf_file, source,
    **overrides) -> config`` reads the metadata and refuses what the family does not implement;
    ``params_from_gguf(config, gguf_file, source) -> params`` maps the (dequantized) tensors, uses every one of
    them or fails naming the leftovers, and checks every shape.
    """

    architectures: tuple
    config_from_gguf: Callable[..., Any]
    params_from_gguf: Callable[..., Params]


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    """One model family behind the interface (see the module docstring for each function's contract)."""

    name: str
    """Registry name, e.g. 'gpt2'."""
    config_type: type
    """The family's config dataclass; dispatch is by ``type(config)``."""
    init_params: Callable[[Any, jax.Array], Params]
    hidden: Callable[..., tuple]
    lm_head: Callable[[Any, Params], jax.Array]
    init_cache: Callable[[Any, int, int], KVCache]
    hf_model_types: tuple = ()
    """Hugging Face ``model_type`` values this family loads (``config.json``)."""
    hf: Optional[HFConverter] = None
    """Weights in and out of transformers' format; None: the family has no HF counterpart."""
    gguf: Optional[GGUFConverter] = None
    """Weights in from llama.cpp's GGUF format; None: the family reads no GGUF files."""
    lora_targets: tuple = ()
    """Names of the trunk's projection modules that LoRA may adapt (``lora.targets``), e.g. ('c_attn', ...)."""
    random_config: Optional[Callable[..., Any]] = None
    """Optional: the family's config for a random init from the generic shape of a run config (``model.family``
    with ``model.name_or_path: random``)::

        random_config(*, vocab_size, n_positions, n_embd, n_layer, n_head, num_key_value_heads, intermediate_size,
                      dtype, param_dtype, remat) -> config

    ``num_key_value_heads`` and ``intermediate_size`` may be None (the family's default); a shape the family cannot
    take raises ValueError with one line naming the field. None: the family has no random init."""
    shape_of: Optional[Callable[[Any], dict]] = None
    """Optional, the inverse of ``random_config``: a config's generic shape, ``{vocab_size, n_positions, n_embd,
    n_layer, n_head, num_key_value_heads, intermediate_size}``, so that a run's resolved config records the model it
    built (a checkpoint's shapes, not the random-init defaults). None: not recorded."""


_FAMILIES: dict[str, ModelFamily] = {}
_BY_CONFIG: dict[type, ModelFamily] = {}
_BY_MODEL_TYPE: dict[str, ModelFamily] = {}
_BY_GGUF_ARCH: dict[str, ModelFamily] = {}


def register_model_family(family: ModelFamily, *, replace: bool = False) -> ModelFamily:
    """Add ``family`` to the registry under its name, its config type and its HF ``model_type``s."""
    if not isinstance(family, ModelFamily):
        raise TypeError(f"register_model_family takes a ModelFamily, got {type(family).__name__}")
    for fn in ("init_params", "hidden", "lm_head", "init_cache"):
        if not callable(getattr(family, fn)):
            raise TypeError(f"model family {family.name!r}: {fn} must be callable")
    for hook in ("random_config", "shape_of"):
        if getattr(family, hook) is not None and not callable(getattr(family, hook)):
            raise TypeError(f"model family {family.name!r}: {hook} must be callable or None")
    if not replace:
        if family.name in _FAMILIES and _FAMILIES[family.name] is not family:
            raise ValueError(f"a model family named {family.name!r} is already registered (pass replace=True)")
        taken = [t for t in family.hf_model_types if t in _BY_MODEL_TYPE and _BY_MODEL_TYPE[t] is not family]
        if taken:
            raise ValueError(f"model_type(s) {taken} already belong to family {_BY_MODEL_TYPE[taken[0]].name!r}")
    _FAMILIES[family.name] = family
    _BY_CONFIG[family.config_type] = family
    for t in family.hf_model_types:
        _BY_MODEL_TYPE[t] = family
    for arch in (family.gguf.architectures if family.gguf is not None else ()):
        _BY_GGUF_ARCH[arch] = family
    return family


def model_families() -> dict[str, ModelFamily]:
    """The registered families by name."""
    return dict(_FAMILIES)


def supported_model_types() -> list[str]:
    """Every Hugging Face ``model_type`` some registered family loads."""
    return sorted(_BY_MODEL_TYPE)


def family_of(config: Any) -> ModelFamily:
    """The family of a model config (by its type)."""
    family = _BY_CONFIG.get(type(config))
    if family is None:
        raise TypeError(f"{type(config).__name__} is not the config of a registered model family "
                        f"(registered: {sorted(_FAMILIES)}); see ppojax.models.register_model_family")
    return family


def get_family(name: str) -> ModelFamily:
    """A family by registry name."""
    if name not in _FAMILIES:
        close = difflib.get_close_matches(name, list(_FAMILIES), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown model family {name!r} (registered: {sorted(_FAMILIES)}){hint}")
    return _FAMILIES[name]


def family_for_model_type(model_type: Any, source: str = "config.json") -> ModelFamily:
    """The family that loads checkpoints of HF ``model_type``; one clear error naming the supported ones."""
    family = _BY_MODEL_TYPE.get(model_type)
    if family is None:
        raise UnsupportedModelError(
            f"{source}: model_type {model_type!r} is not supported; ppojax loads {', '.join(supported_model_types())}"
        )
    return family


def family_for_gguf_architecture(architecture: Any, source: str = "GGUF file") -> ModelFamily:
    """The family that reads GGUF files of ``general.architecture``; one clear error naming the supported ones."""
    family = _BY_GGUF_ARCH.get(architecture)
    if family is None:
        raise UnsupportedModelError(
            f"{source}: GGUF architecture {architecture!r} is not supported; ppojax reads GGUF files of "
            f"{', '.join(sorted(_BY_GGUF_ARCH)) or 'no architecture'}"
        )
    return family


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded or saved; the message says what is wrong and what to do."""


class UnsupportedModelError(CheckpointError):
    """A checkpoint of a family ppojax does not implement."""


def stack_layers(values, n: int, dtype) -> jax.Array:
    """``jnp.stack(list(values)).astype(dtype)`` for the ``n`` per-layer host arrays of one leaf, filled one at a
    time into a single ``[n, *shape]`` host buffer: a converter reading a lazy mapping (``params_from_hf``) holds one
    tensor and one stacked leaf on the host, never a list of every layer's tensor beside their stack."""
    stacked = None
    for i, value in enumerate(values):
        if stacked is None:
            stacked = np.empty((n, *np.shape(value)), np.asarray(value).dtype)
        stacked[i] = value
    return jnp.asarray(stacked, dtype=dtype)


# ----------------------------------------------------------------------------------------------------------------
# The generic functions every caller uses: they dispatch on the config.


def check_inputs(config: Any, input_ids, attention_mask, offset: int = 0) -> None:
    """Shapes and dtypes of a ``[batch, time]`` batch, and the context length (static checks, trace time)."""
    chex.assert_rank([input_ids, attention_mask], 2)
    if input_ids.shape != attention_mask.shape:
        raise ValueError(
            f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} must have the same"
            " [batch, time] shape"
        )
    if not jnp.issubdtype(input_ids.dtype, jnp.integer):
        raise TypeError(f"input_ids must be integer token ids, got dtype {input_ids.dtype}")
    if input_ids.shape[1] + offset > config.max_positions:
        raise ValueError(
            f"sequence of {input_ids.shape[1] + offset} tokens exceeds the context of {config.max_positions}"
            f" positions ({type(config).__name__}); shorten the prompt or the response"
        )


def init_params(config: Any, key: jax.Array) -> Params:
    """Random LM parameters of the family's shape (its own initialisation)."""
    return family_of(config).init_params(config, key)


def forward_hidden(config: Any, params: Params, input_ids, attention_mask) -> jax.Array:
    """Final hidden states ``[batch, time, width]`` (float32, after the final norm) of the trunk."""
    check_inputs(config, input_ids, attention_mask)
    hidden, _ = family_of(config).hidden(config, params, input_ids, attention_mask, None)
    return hidden


def lm_head(config: Any, params: Params) -> jax.Array:
    """The LM-head matrix ``[vocab, width]`` (the token embedding when tied)."""
    return family_of(config).lm_head(config, params)


def unembed(config: Any, params: Params, hidden: jax.Array) -> jax.Array:
    """Logits ``[..., vocab]`` (float32) of hidden states: ``h W^T`` in the compute dtype, accumulated in f32.

    ``forward == unembed(forward_hidden)``; splitting them lets a caller project only the positions it needs (the
    vocabulary projection is the largest matmul of a small LM).
    """
    dt = config.compute_dtype
    W = lm_head(config, params)
    return jnp.einsum("...d,vd->...v", hidden.astype(dt), W.astype(dt), preferred_element_type=jnp.float32)


def forward(config: Any, params: Params, input_ids, attention_mask) -> jax.Array:
    """Logits ``[batch, time, vocab]`` (float32) of the causal LM on a (left-)padded batch. Pure; jit it freely."""
    return unembed(config, params, forward_hidden(config, params, input_ids, attention_mask))


def init_cache(config: Any, batch_size: int, max_len: int) -> KVCache:
    """An empty cache of ``max_len`` slots (prompt plus new tokens)."""
    return family_of(config).init_cache(config, batch_size, max_len)


def forward_with_cache(config: Any, params: Params, input_ids, attention_mask, cache: KVCache):
    """Logits of ``input_ids`` appended at ``cache.index`` (prefill: the whole prompt; decode: one token)."""
    hidden, cache = family_of(config).hidden(config, params, input_ids, attention_mask, cache)
    return unembed(config, params, hidden), cache


def next_token_logits(config: Any, params: Params, input_ids, attention_mask, cache: KVCache):
    """Logits ``[batch, vocab]`` after the last of ``input_ids`` (appended at ``cache.index``), and the new cache.

    What a sampler needs: the prefill skips the vocabulary projection of every prompt position but the last.
    """
    hidden, cache = family_of(config).hidden(config, params, input_ids, attention_mask, cache)
    return unembed(config, params, hidden[:, -1]), cache


def scalar_head(params: Params, hidden: jax.Array) -> jax.Array:
    """``h . kernel + bias`` per position, float32: the value or reward head on hidden states ``[..., width]``."""
    head = params["head"]
    kernel = head["kernel"].astype(jnp.float32)[:, 0]
    return jnp.einsum("...d,d->...", hidden.astype(jnp.float32), kernel) + head["bias"].astype(jnp.float32)[0]


def value_forward(config: Any, params: Params, input_ids, attention_mask) -> jax.Array:
    """Per-token scalar outputs ``[batch, time]`` (float32) of a critic / reward model (``init_value_params``)."""
    return scalar_head(params, forward_hidden(config, params, input_ids, attention_mask))


def init_head(config: Any, *, head_init_std: float = 0.0, key: Optional[jax.Array] = None) -> Params:
    """A scalar head ``{'kernel': [width, 1], 'bias': [1]}``: zeros (a critic's value head, no key needed) or
    ``N(0, head_init_std^2)`` (a reward model: ``1/sqrt(width + 1)``, lm-human-preferences)."""
    d, dtype = config.width, config.storage_dtype
    if head_init_std == 0:
        kernel = jnp.zeros((d, 1), dtype)
    else:
        if key is None:
            raise ValueError("init_value_params: a random head (head_init_std > 0) needs a `key`")
        kernel = (head_init_std * jax.random.normal(key, (d, 1))).astype(dtype)
    return {"kernel": kernel, "bias": jnp.zeros((1,), dtype)}


def init_value_params(config: Any, lm_params: Params, *, head_init_std: float = 0.0,
                      key: Optional[jax.Array] = None) -> Params:
    """Scalar-head model params from LM params: the same trunk, a new head (see :func:`init_head`)."""
    return {"transformer": lm_params["transformer"], "head": init_head(config, head_init_std=head_init_std, key=key)}


def count_params(params: Params) -> int:
    """Number of parameters (array elements) in a tree."""
    return sum(int(x.size) for x in jax.tree.leaves(params))
