"""GPT-2 in Flax: the causal LM (actor, reference), and the same trunk with a scalar head (critic, reward model).

Architecture (Radford et al. 2019): token + learned position embeddings, ``n_layer`` pre-LayerNorm blocks
``x + attn(ln_1(x))``, ``x + mlp(ln_2(x))`` with GELU (tanh approximation, "gelu_new"), a final LayerNorm, and an LM
head tied to the token embedding.

Design choices, and why:
- The blocks are one ``nn.scan`` over stacked parameters (every block leaf has a leading ``[n_layer]`` axis):
  compile time does not grow with depth, rematerialisation is one switch, and sharding rules see one array per
  weight kind.
- Left-padded batches: positions come from the attention mask (``cumsum(mask) - 1``, clipped at 0), and a query may
  attend to a key iff the key is a real token at or before the query's slot. Pad tokens are mapped to id 0 before
  the embedding, so a pad id outside the vocabulary is safe and a real EOS is never masked by accident.
- One attention path for everything: keys live in "slots" (the column of the padded sequence). Without a cache the
  slots are the sequence itself; with a cache (``KVCache``) the new keys are written at ``cache.index`` and queries
  attend over all slots, with the cache's ``mask`` saying which slots hold real tokens. Prefill and every decode
  step therefore compute exactly what the full forward computes.
- No dropout anywhere: PPO's ratio must be exactly 1 on the first minibatch.
- ``dtype`` is the compute dtype (bfloat16 works), ``param_dtype`` the storage dtype; LayerNorm statistics, the
  softmax and the output logits / values are float32.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import chex
import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

Params = Any  # a nested dict of arrays

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True, kw_only=True)
class GPT2Config:
    """Shape and numerics of a GPT-2. Hashable, so it can be a static argument of a jitted function."""

    vocab_size: int = 50257
    """Rows of the token embedding (and of the tied LM head)."""
    n_positions: int = 1024
    """Context length: rows of the position embedding."""
    n_embd: int = 768
    """Width of the residual stream."""
    n_layer: int = 12
    """Number of transformer blocks."""
    n_head: int = 12
    """Attention heads per block; must divide ``n_embd``."""
    n_inner: Optional[int] = None
    """Hidden width of the MLP; None means ``4 * n_embd``."""
    layer_norm_epsilon: float = 1e-5
    """Epsilon of every LayerNorm."""
    dtype: str = "float32"
    """Compute dtype: 'float32', 'bfloat16' or 'float16'."""
    param_dtype: str = "float32"
    """Storage dtype of the parameters."""
    remat: bool = False
    """Rematerialise each block in the backward pass (gradient checkpointing): less memory, ~1/3 more compute."""

    def __post_init__(self):
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"GPT2Config.{name} must be a positive int, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(
                f"GPT2Config.n_head={self.n_head} must divide n_embd={self.n_embd} (head width = n_embd / n_head)"
            )
        if self.n_inner is not None and (not isinstance(self.n_inner, int) or self.n_inner <= 0):
            raise ValueError(f"GPT2Config.n_inner must be a positive int or None, got {self.n_inner!r}")
        if not self.layer_norm_epsilon > 0:
            raise ValueError(f"GPT2Config.layer_norm_epsilon must be > 0, got {self.layer_norm_epsilon!r}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ValueError(f"GPT2Config.{name} must be one of {sorted(_DTYPES)}, got {getattr(self, name)!r}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def mlp_width(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    @property
    def compute_dtype(self):
        return _DTYPES[self.dtype]

    @property
    def storage_dtype(self):
        return _DTYPES[self.param_dtype]

    def replace(self, **changes) -> "GPT2Config":
        return dataclasses.replace(self, **changes)


# Shapes of the released checkpoints, for random inits "of a given shape" and for documentation.
PRESETS = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
    "distilgpt2": dict(n_layer=6, n_head=12, n_embd=768),
}


@flax.struct.dataclass
class KVCache:
    """Keys and values of every block for incremental decoding.

    ``key``/``value``: ``[n_layer, batch, n_head, max_len, head_dim]`` in the compute dtype.
    ``mask``: ``[batch, max_len]`` 1 where a slot holds a real token (written or about to be written).
    ``index``: int32 scalar, the slot the next call writes its first token to.
    """

    key: jax.Array
    value: jax.Array
    mask: jax.Array
    index: jax.Array


def init_cache(config: GPT2Config, batch_size: int, max_len: int) -> KVCache:
    """An empty cache of ``max_len`` slots (prompt plus new tokens)."""
    shape = (config.n_layer, batch_size, config.n_head, max_len, config.head_dim)
    return KVCache(
        key=jnp.zeros(shape, config.compute_dtype),
        value=jnp.zeros(shape, config.compute_dtype),
        mask=jnp.zeros((batch_size, max_len), jnp.int32),
        index=jnp.zeros((), jnp.int32),
    )


def position_ids_from_mask(attention_mask: jax.Array) -> jax.Array:
    """``positions[b, t] = max(cumsum(mask[b])[t] - 1, 0)``: left padding does not shift the positions."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def _layer_norm(config: GPT2Config, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=config.layer_norm_epsilon, dtype=jnp.float32, param_dtype=config.storage_dtype, name=name
    )


def _dense(config: GPT2Config, features: int, name: str, std: float = 0.02) -> nn.Dense:
    # GPT-2's Conv1D is a dense layer with weight [in, out], exactly Flax's kernel layout.
    return nn.Dense(
        features,
        dtype=config.compute_dtype,
        param_dtype=config.storage_dtype,
        kernel_init=nn.initializers.normal(std),
        name=name,
    )


class Block(nn.Module):
    """One pre-LN transformer block; ``nn.scan`` stacks ``n_layer`` of them.

    Scanned call: ``((x, cache_kv), layer) -> ((x, cache_kv), None)`` with ``x [batch, time, width]``. ``cache_kv``
    is None for a cacheless forward, else the WHOLE stacked ``(key, value)`` cache ``[n_layer, batch, n_head, max_len,
    head_dim]``, carried through the layer loop and written in place at ``(layer, :, :, write_index)``: slicing it
    per layer as a scanned input would copy every layer's cache in and out at every decode step.
    """

    config: GPT2Config

    @nn.compact
    def __call__(self, carry, layer, attn_bias, write_index):
        x, cache_kv = carry
        cfg = self.config
        batch, time, _ = x.shape
        dt = cfg.compute_dtype
        # Residual projections scaled by 1/sqrt(2 n_layer) at init, as in GPT-2.
        proj_std = 0.02 / (2 * cfg.n_layer) ** 0.5

        h = _layer_norm(cfg, "ln_1")(x).astype(dt)
        qkv = _dense(cfg, 3 * cfg.n_embd, "c_attn")(h)  # [batch, time, 3 * width]
        q, k, v = jnp.split(qkv, 3, axis=-1)
        # [batch, n_head, time, head_dim]
        q, k, v = (a.reshape(batch, time, cfg.n_head, cfg.head_dim).transpose(0, 2, 1, 3) for a in (q, k, v))
        if cache_kv is not None:
            cache_k, cache_v = cache_kv
            start = (layer, 0, 0, write_index, 0)
            cache_k = jax.lax.dynamic_update_slice(cache_k, k[None].astype(cache_k.dtype), start)
            cache_v = jax.lax.dynamic_update_slice(cache_v, v[None].astype(cache_v.dtype), start)
            k = jax.lax.dynamic_index_in_dim(cache_k, layer, keepdims=False)  # [batch, n_head, max_len, head_dim]
            v = jax.lax.dynamic_index_in_dim(cache_v, layer, keepdims=False)
            cache_kv = (cache_k, cache_v)
        scores = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
        scores = scores * (cfg.head_dim**-0.5) + attn_bias  # bias: 0 where allowed, -inf-ish where not
        probs = jax.nn.softmax(scores, axis=-1).astype(dt)
        attn = jnp.einsum("bhqk,bhkd->bqhd", probs, v).reshape(batch, time, cfg.n_embd)
        x = x + _dense(cfg, cfg.n_embd, "c_proj", proj_std)(attn).astype(x.dtype)

        h = _layer_norm(cfg, "ln_2")(x).astype(dt)
        h = _dense(cfg, cfg.mlp_width, "c_fc")(h)
        h = jax.nn.gelu(h, approximate=True)  # GPT-2's "gelu_new"
        x = x + _dense(cfg, cfg.n_embd, "c_proj_mlp", proj_std)(h).astype(x.dtype)
        return (x, cache_kv), None


def _attention_bias(query_slots, key_slots, key_valid):
    """Additive attention bias ``[batch, 1, q, k]``: 0 iff key slot <= query slot and the key is a real token."""
    allowed = (key_slots[None, None, :] <= query_slots[None, :, None]) & (key_valid[:, None, :] > 0)
    return jnp.where(allowed, 0.0, jnp.finfo(jnp.float32).min)[:, None, :, :]


class GPT2Trunk(nn.Module):
    """Embeddings, the scanned blocks and the final LayerNorm. Returns hidden states ``[batch, time, width]`` (f32)."""

    config: GPT2Config

    @nn.compact
    def __call__(self, input_ids, attention_mask, cache: Optional[KVCache] = None):
        cfg = self.config
        batch, time = input_ids.shape
        wte = nn.Embed(cfg.vocab_size, cfg.n_embd, embedding_init=nn.initializers.normal(0.02),
                       param_dtype=cfg.storage_dtype, name="wte")
        wpe = nn.Embed(cfg.n_positions, cfg.n_embd, embedding_init=nn.initializers.normal(0.01),
                       param_dtype=cfg.storage_dtype, name="wpe")
        attention_mask = attention_mask.astype(jnp.int32)
        # Pads (any id, even one outside the vocabulary) become token 0; attention never looks at them anyway.
        ids = jnp.where(attention_mask > 0, input_ids, 0)

        if cache is None:
            positions = position_ids_from_mask(attention_mask)
            slots = jnp.arange(time)
            bias = _attention_bias(slots, slots, attention_mask)
            cache_kv, write_index, kv_mask = None, None, None
        else:
            kv_mask = jax.lax.dynamic_update_slice(cache.mask, attention_mask, (0, cache.index))
            # Position of each new token = number of real tokens before it in the whole sequence.
            positions = jnp.maximum(jnp.cumsum(kv_mask, axis=-1) - 1, 0)
            positions = jax.lax.dynamic_slice_in_dim(positions, cache.index, time, axis=1)
            query_slots = cache.index + jnp.arange(time)
            bias = _attention_bias(query_slots, jnp.arange(kv_mask.shape[1]), kv_mask)
            cache_kv, write_index = (cache.key, cache.value), cache.index

        x = (wte(ids).astype(jnp.float32) + wpe(positions).astype(jnp.float32)).astype(cfg.compute_dtype)
        block = Block
        if cfg.remat:
            block = nn.remat(Block, prevent_cse=False)
        blocks = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(0, nn.broadcast, nn.broadcast),
            length=cfg.n_layer,
        )(cfg, name="h")
        (x, new_kv), _ = blocks((x, cache_kv), jnp.arange(cfg.n_layer), bias, write_index)
        x = _layer_norm(cfg, "ln_f")(x)
        new_cache = None
        if cache is not None:
            new_cache = KVCache(key=new_kv[0], value=new_kv[1], mask=kv_mask, index=cache.index + time)
        return x, new_cache


class GPT2LMHeadModel(nn.Module):
    """Causal LM: trunk + LM head tied to ``wte``. ``(ids, mask, cache) -> (logits f32 [b, t, vocab], cache)``."""

    config: GPT2Config

    @nn.compact
    def __call__(self, input_ids, attention_mask, cache: Optional[KVCache] = None):
        trunk = GPT2Trunk(self.config, name="transformer")
        hidden, cache = trunk(input_ids, attention_mask, cache)
        wte = trunk.variables["params"]["wte"]["embedding"]
        dt = self.config.compute_dtype
        logits = jnp.einsum("btd,vd->btv", hidden.astype(dt), wte.astype(dt), preferred_element_type=jnp.float32)
        return logits, cache


class GPT2ScalarHeadModel(nn.Module):
    """Trunk + a linear head to one scalar per token: the critic (head init 0) or a reward model (std 1/sqrt(d+1))."""

    config: GPT2Config
    head_init_std: float = 0.0

    @nn.compact
    def __call__(self, input_ids, attention_mask):
        hidden, _ = GPT2Trunk(self.config, name="transformer")(input_ids, attention_mask)
        init = nn.initializers.zeros if self.head_init_std == 0 else nn.initializers.normal(self.head_init_std)
        head = nn.Dense(1, dtype=jnp.float32, param_dtype=self.config.storage_dtype, kernel_init=init, name="head")
        return head(hidden)[..., 0]  # [batch, time]


# ----------------------------------------------------------------------------------------------------------------
# Pure functions over params: the API the rest of ppojax uses.


def _check_inputs(config: GPT2Config, input_ids, attention_mask, offset: int = 0):
    chex.assert_rank([input_ids, attention_mask], 2)
    if input_ids.shape != attention_mask.shape:
        raise ValueError(
            f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} must have the same"
            " [batch, time] shape"
        )
    if not jnp.issubdtype(input_ids.dtype, jnp.integer):
        raise TypeError(f"input_ids must be integer token ids, got dtype {input_ids.dtype}")
    if input_ids.shape[1] + offset > config.n_positions:
        raise ValueError(
            f"sequence of {input_ids.shape[1] + offset} tokens exceeds the context of {config.n_positions}"
            " positions (GPT2Config.n_positions); shorten the prompt or the response"
        )


def forward(config: GPT2Config, params: Params, input_ids, attention_mask) -> jax.Array:
    """Logits ``[batch, time, vocab]`` (float32) of the causal LM on a (left-)padded batch. Pure; jit it freely."""
    _check_inputs(config, input_ids, attention_mask)
    logits, _ = GPT2LMHeadModel(config).apply({"params": params}, input_ids, attention_mask)
    return logits


def forward_hidden(config: GPT2Config, params: Params, input_ids, attention_mask) -> jax.Array:
    """Final hidden states ``[batch, time, width]`` (float32, after ``ln_f``) of the LM's trunk."""
    _check_inputs(config, input_ids, attention_mask)
    hidden, _ = GPT2Trunk(config).apply({"params": params["transformer"]}, input_ids, attention_mask)
    return hidden


def unembed(config: GPT2Config, params: Params, hidden: jax.Array) -> jax.Array:
    """Logits ``[..., vocab]`` (float32) of hidden states through the tied LM head.

    ``forward == unembed(forward_hidden)``; splitting them lets a caller project only the positions it needs (the
    vocabulary projection is the largest matmul of a small GPT-2).
    """
    dt = config.compute_dtype
    wte = params["transformer"]["wte"]["embedding"]
    return jnp.einsum("...d,vd->...v", hidden.astype(dt), wte.astype(dt), preferred_element_type=jnp.float32)


def forward_with_cache(config: GPT2Config, params: Params, input_ids, attention_mask, cache: KVCache):
    """Logits of ``input_ids`` appended at ``cache.index`` (prefill: the whole prompt; decode: one token)."""
    logits, cache = GPT2LMHeadModel(config).apply({"params": params}, input_ids, attention_mask, cache)
    return logits, cache


def next_token_logits(config: GPT2Config, params: Params, input_ids, attention_mask, cache: KVCache):
    """Logits ``[batch, vocab]`` after the last of ``input_ids`` (appended at ``cache.index``), and the new cache.

    What a sampler needs: the prefill skips the vocabulary projection of every prompt position but the last.
    """
    hidden, cache = GPT2Trunk(config).apply({"params": params["transformer"]}, input_ids, attention_mask, cache)
    return unembed(config, params, hidden[:, -1]), cache


def value_forward(config: GPT2Config, params: Params, input_ids, attention_mask) -> jax.Array:
    """Per-token scalar outputs ``[batch, time]`` (float32) of a critic / reward model (``init_value_params``)."""
    _check_inputs(config, input_ids, attention_mask)
    return GPT2ScalarHeadModel(config).apply({"params": params}, input_ids, attention_mask)


def init_params(config: GPT2Config, key: jax.Array) -> Params:
    """Random LM parameters (GPT-2's init: N(0, 0.02), residual projections scaled by 1/sqrt(2 n_layer))."""
    ids = jnp.zeros((1, 1), jnp.int32)
    return GPT2LMHeadModel(config).init(key, ids, jnp.ones_like(ids))["params"]


def init_value_params(config: GPT2Config, lm_params: Params, *, head_init_std: float = 0.0,
                      key: Optional[jax.Array] = None) -> Params:
    """Scalar-head model params from LM params: the same trunk, a new head.

    ``head_init_std=0`` (the critic's value head, zeros) needs no key; a reward model uses ``1/sqrt(n_embd + 1)``.
    """
    d = config.n_embd
    dtype = config.storage_dtype
    if head_init_std == 0:
        kernel = jnp.zeros((d, 1), dtype)
    else:
        if key is None:
            raise ValueError("init_value_params: a random head (head_init_std > 0) needs a `key`")
        kernel = (head_init_std * jax.random.normal(key, (d, 1))).astype(dtype)
    return {"transformer": lm_params["transformer"], "head": {"kernel": kernel, "bias": jnp.zeros((1,), dtype)}}


def count_params(params: Params) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(params))
