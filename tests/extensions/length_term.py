"""A new loss term: a penalty on the log-probability of tokens after position ``after`` (shorter answers)."""

import jax.numpy as jnp


def late_token_penalty(inputs, *, after: int = 2):
    """``loss = sum_{t >= after} m_t logp_t / n_tokens``: minimising it makes late tokens less likely."""
    late = (jnp.arange(inputs.mask.shape[1]) >= after)[None, :] * inputs.mask
    loss = jnp.sum(late * inputs.logprobs) / inputs.n_tokens
    return loss, {"late_logprob": loss}
