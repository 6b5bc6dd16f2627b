"""Llama-style decoders in Flax: Llama 1-3, Qwen2 and Mistral (without a sliding window), and SmolLM2.

Architecture (Touvron et al. 2023, "LLaMA"), one pre-norm block repeated ``num_hidden_layers`` times::

    x = x + o_proj(attn(rope(q_proj(n)), rope(k_proj(n)), v_proj(n))),   n = RMSNorm_1(x)
    x = x + down_proj(silu(gate_proj(n)) * up_proj(n)),                  n = RMSNorm_2(x)

then a final RMSNorm and the LM head (tied to the token embedding or its own ``[vocab, width]`` matrix).

- RMSNorm (Zhang & Sennrich 2019): ``y = x / sqrt(mean(x^2) + eps) * weight``, in float32.
- RoPE (Su et al. 2021), in Hugging Face's "rotate half" layout: within a head of width ``d`` the pairs are
  ``(j, j + d/2)``, rotated by the angle ``p * f_j`` at position ``p``, ``f_j = theta^(-2j/d)``::

      q'[j]       = q[j] cos(p f_j) - q[j + d/2] sin(p f_j)
      q'[j + d/2] = q[j + d/2] cos(p f_j) + q[j] sin(p f_j)

  Llama 3.1's frequency scaling (``rope_scaling.rope_type = "llama3"``) divides the low frequencies by ``factor``
  and blends smoothly between the two bands (:func:`rope_frequencies`).
- Grouped-query attention (Ainslie et al. 2023): ``num_key_value_heads`` key/value heads, each shared by
  ``G = num_attention_heads / num_key_value_heads`` query heads (query head ``h`` reads kv head ``h // G``), so the
  KV cache holds only the kv heads.
- SwiGLU MLP (Shazeer 2020): ``down(silu(gate(x)) * up(x))``, ``silu(z) = z * sigmoid(z)``.
- Optional biases: Qwen2 has biases on q, k and v (not on o_proj); Llama's ``attention_bias`` puts them on all four
  attention projections, ``mlp_bias`` on the three MLP ones.

The design follows ppojax's GPT-2 (``ppojax/models/gpt2/model.py``): the blocks are one ``nn.scan`` over stacked
parameters (leading ``[n_layer]`` axis) with a remat switch; positions come from the attention mask, so left padding
does not shift them; pads (any id, even outside the vocabulary) are embedded as token 0 and never attended to; the
KV cache ``[n_layer, batch, kv_heads, max_len, head_dim]`` is carried whole through the layer loop and written in
place; no dropout. ``dtype`` is the compute dtype (bfloat16 works); the norms, RoPE, the softmax and the logits are
float32.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ppojax.models.base import (ConfigNumerics, KVCache, Params, cache_positions_and_bias, empty_cache,
                                 remat_block)

MODEL_TYPES = ("llama", "qwen2", "mistral")
"""Hugging Face ``model_type`` values this family implements (kept in the config so an export round-trips)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Llama3RopeScaling:
    """Llama 3.1's RoPE frequency scaling (``rope_scaling = {"rope_type": "llama3", ...}`` in ``config.json``)."""

    factor: float
    """Divisor of the low frequencies (8 in Llama 3.1)."""
    low_freq_factor: float
    """Wavelengths above ``original_max_position_embeddings / low_freq_factor`` are divided by ``factor``."""
    high_freq_factor: float
    """Wavelengths below ``original_max_position_embeddings / high_freq_factor`` are kept."""
    original_max_position_embeddings: int
    """Context length of pre-training, before the extension."""

    def __post_init__(self):
        if not self.factor > 0:
            raise ValueError(f"rope_scaling.factor must be > 0, got {self.factor!r}")
        if not 0 < self.low_freq_factor < self.high_freq_factor:
            raise ValueError(f"rope_scaling needs 0 < low_freq_factor < high_freq_factor, got "
                             f"{self.low_freq_factor!r} and {self.high_freq_factor!r}")
        if not isinstance(self.original_max_position_embeddings, int) or self.original_max_position_embeddings <= 0:
            raise ValueError("rope_scaling.original_max_position_embeddings must be a positive int, got "
                             f"{self.original_max_position_embeddings!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig(ConfigNumerics):
    """Shape and numerics of a Llama-style decoder. Field names are those of transformers' ``config.json``.

    Hashable, so it can be a static argument of a jitted function.
    """

    model_type: str = "llama"
    """Hugging Face ``model_type`` this model exports as: 'llama', 'qwen2' or 'mistral'."""
    vocab_size: int = 32000
    """Rows of the token embedding and of the LM head."""
    hidden_size: int = 4096
    """Width of the residual stream."""
    intermediate_size: int = 11008
    """Hidden width of the SwiGLU MLP."""
    num_hidden_layers: int = 32
    """Number of decoder blocks."""
    num_attention_heads: int = 32
    """Query heads per block."""
    num_key_value_heads: Optional[int] = None
    """Key/value heads (grouped-query attention); must divide ``num_attention_heads``. None: as many as queries."""
    head_dim: Optional[int] = None
    """Width of one head; None: ``hidden_size / num_attention_heads`` (which must then divide evenly)."""
    max_position_embeddings: int = 2048
    """Context length."""
    rms_norm_eps: float = 1e-6
    """Epsilon of every RMSNorm."""
    rope_theta: float = 10000.0
    """RoPE base: ``f_j = rope_theta^(-2j / head_dim)``."""
    rope_scaling: Optional[Llama3RopeScaling] = None
    """Llama 3.1's frequency scaling, or None for plain RoPE."""
    tie_word_embeddings: bool = False
    """LM head = token embedding (True), or its own ``params['lm_head']['embedding']`` (False)."""
    qkv_bias: bool = False
    """Biases on q_proj, k_proj, v_proj (Qwen2: always; Llama: ``attention_bias``)."""
    o_bias: bool = False
    """Bias on o_proj (Llama's ``attention_bias``; never in Qwen2)."""
    mlp_bias: bool = False
    """Biases on gate_proj, up_proj, down_proj (Llama's ``mlp_bias``)."""
    bos_token_id: Optional[int] = None
    """Written to ``config.json`` on export; the model itself does not use it."""
    eos_token_id: Union[int, tuple, None] = None
    """One id or a tuple of ids; written to ``config.json`` on export."""
    dtype: str = "float32"
    """Compute dtype: 'float32', 'bfloat16' or 'float16'."""
    param_dtype: str = "float32"
    """Storage dtype of the parameters."""
    remat: Union[bool, Literal["full", "dots"]] = False
    """Rematerialisation of the blocks in the backward pass: False, True (= "full") or "dots" (keep the weight
    matmuls' outputs, recompute the rest); ``ppojax.models.base.remat_block``."""

    def __post_init__(self):
        name = "LlamaConfig"
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"{name}.model_type must be one of {MODEL_TYPES}, got {self.model_type!r}")
        for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                      "max_position_embeddings"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name}.{field} must be a positive int, got {value!r}")
        for field in ("num_key_value_heads", "head_dim"):
            value = getattr(self, field)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ValueError(f"{name}.{field} must be a positive int or None, got {value!r}")
        if self.num_attention_heads % self.kv_heads:
            raise ValueError(f"{name}.num_key_value_heads={self.kv_heads} must divide num_attention_heads="
                             f"{self.num_attention_heads} (each kv head serves a whole group of query heads)")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(f"{name}.num_attention_heads={self.num_attention_heads} must divide hidden_size="
                             f"{self.hidden_size}, or give head_dim")
        if self.head_width % 2:
            raise ValueError(f"{name}: the head width must be even for RoPE's pairs, got {self.head_width}")
        if not self.rms_norm_eps > 0:
            raise ValueError(f"{name}.rms_norm_eps must be > 0, got {self.rms_norm_eps!r}")
        if not self.rope_theta > 0:
            raise ValueError(f"{name}.rope_theta must be > 0, got {self.rope_theta!r}")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, Llama3RopeScaling):
            raise ValueError(f"{name}.rope_scaling must be a Llama3RopeScaling or None, got {self.rope_scaling!r}")
        self.check_dtypes()
        if isinstance(self.eos_token_id, list):  # keep the config hashable
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        # Each model_type's transformers class has a fixed bias layout; a config it cannot express would not
        # export faithfully.
        biases = (self.qkv_bias, self.o_bias, self.mlp_bias)
        allowed = {"qwen2": [(True, False, False)], "mistral": [(False, False, False)],
                   "llama": [(a, a, m) for a in (False, True) for m in (False, True)]}[self.model_type]
        if biases not in allowed:
            raise ValueError(
                f"{name}: model_type {self.model_type!r} cannot have qkv_bias={self.qkv_bias}, o_bias={self.o_bias}, "
                f"mlp_bias={self.mlp_bias} (qwen2: q/k/v biases only; mistral: none; llama: attention_bias puts "
                "biases on q, k, v and o together, mlp_bias on the MLP)"
            )

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads if self.num_key_value_heads is not None else self.num_attention_heads

    @property
    def head_width(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads

    @property
    def n_layer(self) -> int:
        return self.num_hidden_layers

    @property
    def width(self) -> int:
        """Width of the residual stream (the model interface's name for ``hidden_size``)."""
        return self.hidden_size

    @property
    def max_positions(self) -> int:
        """Context length (the model interface's name for ``max_position_embeddings``)."""
        return self.max_position_embeddings



def rope_frequencies(config: LlamaConfig) -> np.ndarray:
    """The ``head_width / 2`` rotary frequencies ``f_j`` (float32), with Llama 3.1's scaling when configured.

    Plain RoPE: ``f_j = theta^(-2j / d)``. Llama 3.1 (Meta's ``apply_scaling``), with wavelength ``w_j = 2 pi / f_j``,
    ``L`` the original context, ``w_lo = L / low_freq_factor`` and ``w_hi = L / high_freq_factor``::

        f_j                                      if w_j < w_hi         (high frequencies kept)
        f_j / factor                             if w_j > w_lo         (low frequencies stretched)
        (1 - s) f_j / factor + s f_j,  s = (L / w_j - low_freq_factor) / (high_freq_factor - low_freq_factor)
                                                 otherwise             (a smooth blend)

    Computed in float64 on the host (the config is static), rounded once to float32.
    """
    d = config.head_width
    freqs = config.rope_theta ** (-np.arange(0, d, 2, dtype=np.float64) / d)
    s = config.rope_scaling
    if s is not None:
        wavelen = 2 * math.pi / freqs
        L = s.original_max_position_embeddings
        smooth = (L / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
        blended = (1 - smooth) * freqs / s.factor + smooth * freqs
        freqs = np.where(wavelen < L / s.high_freq_factor, freqs,
                         np.where(wavelen > L / s.low_freq_factor, freqs / s.factor, blended))
    return freqs.astype(np.float32)


def rope_angles(config: LlamaConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(cos, sin)`` of ``p * f_j`` for ``positions [batch, time]``: each ``[batch, time, head_width / 2]`` float32."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(rope_frequencies(config))
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate ``x [batch, heads, time, d]`` pairwise over ``(j, j + d/2)`` (float32 in, float32 out)."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    c, s = cos[:, None], sin[:, None]  # [batch, 1, time, d/2]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


class RMSNorm(nn.Module):
    """``y = x / sqrt(mean(x^2) + eps) * weight``, computed and returned in float32."""

    eps: float
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        weight = self.param("weight", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        x = x.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
        return x * weight.astype(jnp.float32)


def _dense(config: LlamaConfig, features: int, name: str, bias: bool) -> nn.Dense:
    return nn.Dense(features, use_bias=bias, dtype=config.compute_dtype, param_dtype=config.storage_dtype,
                    kernel_init=nn.initializers.normal(0.02), name=name)


class Block(nn.Module):
    """One decoder block; ``nn.scan`` stacks ``num_hidden_layers`` of them.

    Scanned call: ``((x, cache_kv), layer) -> ((x, cache_kv), None)`` with ``x [batch, time, width]`` (the residual
    stream, compute dtype). ``cache_kv`` is None without a cache, else the WHOLE stacked ``(key, value)`` cache
    ``[n_layer, batch, kv_heads, max_len, head_dim]``, written in place at ``(layer, :, :, write_index)`` (slicing
    it per layer as a scanned input would copy every layer's cache in and out at every decode step).
    """

    config: LlamaConfig

    @nn.compact
    def __call__(self, carry, layer, attn_bias, cos, sin, write_index):
        x, cache_kv = carry
        cfg = self.config
        batch, time, _ = x.shape
        dt = cfg.compute_dtype
        H, K, d = cfg.num_attention_heads, cfg.kv_heads, cfg.head_width
        G = H // K

        h = RMSNorm(cfg.rms_norm_eps, cfg.storage_dtype, name="input_layernorm")(x).astype(dt)
        q = _dense(cfg, H * d, "q_proj", cfg.qkv_bias)(h)
        k = _dense(cfg, K * d, "k_proj", cfg.qkv_bias)(h)
        v = _dense(cfg, K * d, "v_proj", cfg.qkv_bias)(h)
        q = q.reshape(batch, time, H, d).transpose(0, 2, 1, 3)  # [batch, H, time, d]
        k = k.reshape(batch, time, K, d).transpose(0, 2, 1, 3)  # [batch, K, time, d]
        v = v.reshape(batch, time, K, d).transpose(0, 2, 1, 3)
        q = apply_rope(q.astype(jnp.float32), cos, sin).astype(dt)
        k = apply_rope(k.astype(jnp.float32), cos, sin).astype(dt)
        if cache_kv is not None:
            cache_k, cache_v = cache_kv
            start = (layer, 0, 0, write_index, 0)
            cache_k = jax.lax.dynamic_update_slice(cache_k, k[None].astype(cache_k.dtype), start)
            cache_v = jax.lax.dynamic_update_slice(cache_v, v[None].astype(cache_v.dtype), start)
            k = jax.lax.dynamic_index_in_dim(cache_k, layer, keepdims=False)  # [batch, K, max_len, d]
            v = jax.lax.dynamic_index_in_dim(cache_v, layer, keepdims=False)
            cache_kv = (cache_k, cache_v)
        # Query head h = kv * G + g reads kv head h // G: group the queries instead of repeating the keys.
        q = q.reshape(batch, K, G, time, d)
        scores = jnp.einsum("bkgqd,bksd->bkgqs", q, k.astype(dt), preferred_element_type=jnp.float32)
        scores = scores * (d**-0.5) + attn_bias[:, :, None]  # bias [batch, 1, 1, time, slots]
        probs = jax.nn.softmax(scores, axis=-1).astype(dt)
        attn = jnp.einsum("bkgqs,bksd->bqkgd", probs, v.astype(dt)).reshape(batch, time, H * d)
        x = x + _dense(cfg, cfg.hidden_size, "o_proj", cfg.o_bias)(attn).astype(x.dtype)

        h = RMSNorm(cfg.rms_norm_eps, cfg.storage_dtype, name="post_attention_layernorm")(x).astype(dt)
        gate = _dense(cfg, cfg.intermediate_size, "gate_proj", cfg.mlp_bias)(h)
        up = _dense(cfg, cfg.intermediate_size, "up_proj", cfg.mlp_bias)(h)
        x = x + _dense(cfg, cfg.hidden_size, "down_proj", cfg.mlp_bias)(jax.nn.silu(gate) * up).astype(x.dtype)
        return (x, cache_kv), None


class LlamaTrunk(nn.Module):
    """Token embedding, the scanned blocks and the final RMSNorm: ``(ids, mask, cache) -> (hidden f32, cache)``."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, input_ids, attention_mask, cache: Optional[KVCache] = None):
        cfg = self.config
        time = input_ids.shape[1]
        embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, embedding_init=nn.initializers.normal(0.02),
                         param_dtype=cfg.storage_dtype, name="embed_tokens")
        attention_mask = attention_mask.astype(jnp.int32)
        # Pads (any id, even one outside the vocabulary) become token 0; attention never looks at them anyway.
        ids = jnp.where(attention_mask > 0, input_ids, 0)
        positions, bias, kv_mask = cache_positions_and_bias(attention_mask, cache)
        cos, sin = rope_angles(cfg, positions)
        cache_kv, write_index = (None, None) if cache is None else ((cache.key, cache.value), cache.index)

        x = embed(ids).astype(cfg.compute_dtype)  # the residual stream, in the compute dtype (as GPT-2's)
        block = remat_block(Block, cfg.remat)
        blocks = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
            length=cfg.num_hidden_layers,
        )(cfg, name="layers")
        (x, new_kv), _ = blocks((x, cache_kv), jnp.arange(cfg.num_hidden_layers), bias, cos, sin, write_index)
        x = RMSNorm(cfg.rms_norm_eps, cfg.storage_dtype, name="norm")(x)
        new_cache = None
        if cache is not None:
            new_cache = KVCache(key=new_kv[0], value=new_kv[1], mask=kv_mask, index=cache.index + time)
        return x, new_cache


# ----------------------------------------------------------------------------------------------------------------
# The model interface (ppojax.models.base): the family's functions.


def init_params(config: LlamaConfig, key: jax.Array) -> Params:
    """Random LM parameters: ``{'transformer': trunk}`` plus ``{'lm_head': {'embedding': [V, D]}}`` when untied.

    Every matrix ~ N(0, 0.02^2) (transformers' ``initializer_range``), RMSNorm weights 1, biases 0.
    """
    trunk_key, head_key = jax.random.split(key)
    ids = jnp.zeros((1, 1), jnp.int32)
    params = {"transformer": LlamaTrunk(config).init(trunk_key, ids, jnp.ones_like(ids))["params"]}
    if not config.tie_word_embeddings:
        W = 0.02 * jax.random.normal(head_key, (config.vocab_size, config.hidden_size))
        params["lm_head"] = {"embedding": W.astype(config.storage_dtype)}
    return params


def hidden(config: LlamaConfig, params: Params, input_ids, attention_mask, cache: Optional[KVCache] = None):
    """``(hidden [batch, time, hidden_size] f32, new cache or None)`` of the trunk (``params['transformer']``)."""
    return LlamaTrunk(config).apply({"params": params["transformer"]}, input_ids, attention_mask, cache)


def lm_head(config: LlamaConfig, params: Params) -> jax.Array:
    """The LM-head matrix ``[vocab, hidden_size]``: the token embedding when tied, else ``params['lm_head']``."""
    if config.tie_word_embeddings:
        return params["transformer"]["embed_tokens"]["embedding"]
    if "lm_head" not in params:
        raise KeyError("this LlamaConfig has an untied LM head (tie_word_embeddings=False), but the params have no "
                       "'lm_head' entry: scalar-head (critic / reward model) params have no LM head")
    return params["lm_head"]["embedding"]


def init_cache(config: LlamaConfig, batch_size: int, max_len: int) -> KVCache:
    """An empty cache of ``max_len`` slots: ``[n_layer, batch, kv_heads, max_len, head_dim]`` (only the kv heads)."""
    return empty_cache(config.num_hidden_layers, batch_size, config.kv_heads, max_len, config.head_width,
                       config.compute_dtype)


def random_config(*, vocab_size: int, n_positions: int, n_embd: int, n_layer: int, n_head: int,
                  num_key_value_heads: Optional[int] = None, intermediate_size: Optional[int] = None,
                  dtype: str = "float32", param_dtype: str = "float32", remat: Union[bool, str] = False) -> LlamaConfig:
    """A Llama config of this shape for a random init (``ModelFamily.random_config``), its LM head tied to the token
    embedding (as SmolLM2's). ``intermediate_size`` None: 8/3 * n_embd rounded up to a multiple of 8, so that the
    SwiGLU MLP (three matrices) has about the parameters of a 4 * n_embd two-matrix one."""
    return LlamaConfig(vocab_size=vocab_size, max_position_embeddings=n_positions, hidden_size=n_embd,
                       num_hidden_layers=n_layer, num_attention_heads=n_head, num_key_value_heads=num_key_value_heads,
                       tie_word_embeddings=True, intermediate_size=intermediate_size or -(-n_embd // 3) * 8,
                       dtype=dtype, param_dtype=param_dtype, remat=remat)


def shape_of(config: LlamaConfig) -> dict:
    """The generic shape of a Llama config (``ModelFamily.shape_of``), the inverse of :func:`random_config`."""
    return dict(vocab_size=config.vocab_size, n_positions=config.max_position_embeddings, n_embd=config.hidden_size,
                n_layer=config.num_hidden_layers, n_head=config.num_attention_heads,
                num_key_value_heads=config.num_key_value_heads, intermediate_size=config.intermediate_size)
