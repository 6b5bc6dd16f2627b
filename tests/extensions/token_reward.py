"""A new reward: the share of a response's tokens that equal ``token`` (a jittable ``(tokens, mask) -> [batch]``)."""

import jax.numpy as jnp


def share_of_token_three(tokens, mask):
    hit = ((tokens == 3) & (mask > 0)).sum(-1)
    return hit.astype(jnp.float32) / jnp.maximum(mask.sum(-1), 1).astype(jnp.float32)
