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
from typing import Literal, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from ppojax.models.base import (ConfigNumerics, KVCache, Params, cache_positions_and_bias, empty_cache,
                                 remat_block)


@dataclasses.dataclass(frozen=True, kw_only=True)
class GPT2Config(ConfigNumerics):
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
    remat: Union[bool, Literal["full", "dots"]] = False
    """Rematerialisation of the blocks in the backward pass: False, True (= "full") or "dots" (keep the weight
    matmuls' outputs, recompute the rest); ``ppojax.models.base.remat_block``."""

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
        self.check_dtypes()

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def mlp_width(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    @property
    def width(self) -> int:
        """Width of the residual stream (the model interface's name for ``n_embd``)."""
        return self.n_embd

    @property
    def max_positions(self) -> int:
        """Context length (the model interface's name for ``n_positions``)."""
        return self.n_positions



# Shapes of the released checkpoints, for random inits "of a given shape" and for documentation.
PRESETS = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
    "distilgpt2": dict(n_layer=6, n_head=12, n_embd=768),
}


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
        positions, bias, kv_mask = cache_positions_and_bias(attention_mask, cache)
        cache_kv, write_index = (None, None) if cache is None else ((cache.key, cache.value), cache.index)

        x = (wte(ids).astype(jnp.float32) + wpe(positions).astype(jnp.float32)).astype(cfg.compute_dtype)
        block = remat_block(Block, cfg.remat)
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


# ----------------------------------------------------------------------------------------------------------------
# The model interface (ppojax.models.base): GPT-2 as a registered family.


def init_params(config: GPT2Config, key: jax.Array) -> Params:
    """Random LM parameters (GPT-2's init: N(0, 0.02), residual projections scaled by 1/sqrt(2 n_layer))."""
    ids = jnp.zeros((1, 1), jnp.int32)
    return GPT2LMHeadModel(config).init(key, ids, jnp.ones_like(ids))["params"]


def hidden(config: GPT2Config, params: Params, input_ids, attention_mask, cache: Optional[KVCache] = None):
    """``(hidden [batch, time, n_embd] f32, new cache or None)`` of the trunk (``params['transformer']``)."""
    return GPT2Trunk(config).apply({"params": params["transformer"]}, input_ids, attention_mask, cache)


def lm_head(config: GPT2Config, params: Params) -> jax.Array:
    """GPT-2's LM head is tied: the token embedding ``wte`` ``[vocab, n_embd]``."""
    return params["transformer"]["wte"]["embedding"]


def init_cache(config: GPT2Config, batch_size: int, max_len: int) -> KVCache:
    """An empty cache of ``max_len`` slots: ``[n_layer, batch, n_head, max_len, head_dim]``."""
    return empty_cache(config.n_layer, batch_size, config.n_head, max_len, config.head_dim, config.compute_dtype)


def random_config(*, vocab_size: int, n_positions: int, n_embd: int, n_layer: int, n_head: int,
                  num_key_value_heads: Optional[int] = None, intermediate_size: Optional[int] = None,
                  dtype: str = "float32", param_dtype: str = "float32", remat: Union[bool, str] = False) -> GPT2Config:
    """A GPT-2 config of this shape for a random init (``ModelFamily.random_config``); ``intermediate_size`` is the
    MLP width (None: ``4 * n_embd``). GPT-2 has no grouped-query attention: ``num_key_value_heads`` must be None."""
    if num_key_value_heads is not None:
        raise ValueError("num_key_value_heads: the gpt2 family has no grouped-query attention; leave it unset, or "
                         "use a family that has it (family: llama)")
    return GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                      n_inner=intermediate_size, dtype=dtype, param_dtype=param_dtype, remat=remat)


def shape_of(config: GPT2Config) -> dict:
    """The generic shape of a GPT-2 config (``ModelFamily.shape_of``), the inverse of :func:`random_config`."""
    return dict(vocab_size=config.vocab_size, n_positions=config.n_positions, n_embd=config.n_embd,
                n_layer=config.n_layer, n_head=config.n_head, num_key_value_heads=None,
                intermediate_size=config.n_inner)
