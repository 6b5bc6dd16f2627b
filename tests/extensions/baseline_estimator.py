"""A new advantage estimator: the score minus the batch's mean score, on every real token (critic-free)."""

import jax.numpy as jnp

import ppojax


@ppojax.register_estimator("mean_baseline", needs_critic=False)
def mean_baseline(inputs: ppojax.AdvantageInputs):
    """``A_i = s_i - mean_j s_j`` broadcast over the response's real tokens; no critic, so no returns."""
    centred = inputs.scores - jnp.mean(inputs.scores)
    return jnp.where(inputs.mask > 0, centred[:, None], 0.0), None
