"""Shared pieces of the tiny-PPO tests: a dense jittable reward and left-padded random prompts."""

import jax.numpy as jnp
import numpy as np


def low_token_share(tokens, mask, target: int = 8):
    """Dense jittable reward: the share of response tokens below ``target`` (a random policy over 48 tokens gets
    about 8/48)."""
    hit = ((tokens < target) & (mask > 0)).sum(-1)
    return hit.astype(jnp.float32) / jnp.maximum(mask.sum(-1), 1).astype(jnp.float32)


def left_padded_prompts(n: int, vocab: int, width: int = 6, seed: int = 0):
    """``(ids, mask)`` ``[n, width]``: random prompts, every third row left-padded by two (the pad id is ``vocab``,
    outside the vocabulary)."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(0, vocab, (n, width)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[::3, :2] = 0
    ids[mask == 0] = vocab
    return jnp.asarray(ids), jnp.asarray(mask)
