"""A new model family: a causal "bag of words" language model, behind ppojax's model interface.

    e_t = E[x_t] + P[pos_t]                       (token and position embeddings, [width])
    c_t = sum_{s <= t, real} E[x_s] / n_t           (the running mean of the real tokens so far)
    h_t = tanh(e_t + c_t M)                        logits_t = h_t E^T (tied head)

Its KV cache holds the running sum and count instead of keys and values: a family owns its cache's layout.
"""

import dataclasses

import jax
import jax.numpy as jnp

from ppojax.models import ConfigNumerics, KVCache, ModelFamily, register_model_family
from ppojax.models.base import cache_positions_and_bias


@dataclasses.dataclass(frozen=True, kw_only=True)
class BagLMConfig(ConfigNumerics):  # compute_dtype, storage_dtype and replace() from the dtype names
    vocab_size: int = 32
    width: int = 16
    max_positions: int = 64
    dtype: str = "float32"
    param_dtype: str = "float32"


def init_params(config, key):
    k1, k2, k3 = jax.random.split(key, 3)
    d, dt = config.width, config.storage_dtype
    return {"transformer": {"embed": (0.5 * jax.random.normal(k1, (config.vocab_size, d))).astype(dt),
                            "pos": (0.1 * jax.random.normal(k2, (config.max_positions, d))).astype(dt),
                            "mix": (0.5 * jax.random.normal(k3, (d, d))).astype(dt)}}


def hidden(config, params, ids, mask, cache=None):
    p = params["transformer"]
    mask = mask.astype(jnp.int32)
    positions, _, kv_mask = cache_positions_and_bias(mask, cache)  # positions from the mask: left padding is safe
    tok = p["embed"][jnp.where(mask > 0, ids, 0)]  # [batch, time, d]
    sum0 = 0.0 if cache is None else cache.key[:, None]  # the running sum and count before these tokens
    n0 = 0.0 if cache is None else cache.value[:, None]
    running = sum0 + jnp.cumsum(tok * mask[..., None], axis=1)
    counts = n0 + jnp.cumsum(mask, axis=1)
    h = jnp.tanh(tok + p["pos"][positions] + (running / jnp.maximum(counts, 1.0)[..., None]) @ p["mix"])
    new_cache = None
    if cache is not None:
        new_cache = KVCache(key=running[:, -1], value=counts[:, -1].astype(jnp.float32), mask=kv_mask,
                            index=cache.index + ids.shape[1])
    return h.astype(jnp.float32), new_cache


def lm_head(config, params):
    return params["transformer"]["embed"]


def init_cache(config, batch_size, max_len):
    return KVCache(key=jnp.zeros((batch_size, config.width), jnp.float32), value=jnp.zeros((batch_size,), jnp.float32),
                   mask=jnp.zeros((batch_size, max_len), jnp.int32), index=jnp.zeros((), jnp.int32))


def random_config(*, vocab_size, n_positions, n_embd, n_layer, n_head, num_key_value_heads, intermediate_size,
                  dtype, param_dtype, remat):
    # No layers, heads or MLP: only the vocabulary, width and context of a run config's shape apply.
    if num_key_value_heads is not None or intermediate_size is not None:
        raise ValueError("bag_lm has no attention heads or MLP: leave num_key_value_heads and intermediate_size unset")
    return BagLMConfig(vocab_size=vocab_size, width=n_embd, max_positions=n_positions, dtype=dtype,
                       param_dtype=param_dtype)


FAMILY = register_model_family(ModelFamily(name="bag_lm", config_type=BagLMConfig, init_params=init_params,
                                           hidden=hidden, lm_head=lm_head, init_cache=init_cache,
                                           random_config=random_config))
