"""A new policy loss with a hyperparameter of its own, declared where it is registered: PPO's clipped surrogate
times ``policy_scale`` (an array of the train state, passed to the loss as a keyword argument)."""

import ppojax
from ppojax.rl.losses import ppo_clip_loss


@ppojax.register_policy_loss("scaled_ppo", hparams={"policy_scale": 1.0})
def scaled_ppo(inputs, *, clip_eps, clip_eps_high=None, dual_clip=None, policy_scale):
    """``policy_scale * ppo_clip_loss``; logs the scale it was given as ``policy_scale``."""
    loss, metrics = ppo_clip_loss(inputs, clip_eps=clip_eps, clip_eps_high=clip_eps_high, dual_clip=dual_clip)
    return policy_scale * loss, {**metrics, "policy_scale": policy_scale}
