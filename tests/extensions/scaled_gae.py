"""A new advantage estimator with hyperparameters of its own, declared where it is registered: GAE over rewards
multiplied by ``reward_scale``, with the critic's targets from their own lambda ``lam_critic`` (actor and critic
lambdas decoupled, as verl's ``lam`` / ``lam_critic`` or Yuan et al. 2025's VC-PPO). Both become array
hyperparameters of the train state (``ppo.hparams.reward_scale``): changing them recompiles nothing."""

import ppojax


@ppojax.register_estimator("scaled_gae", needs_critic=True, whiten_advantages=False,
                           hparams={"reward_scale": 1.0, "lam_critic": 1.0})
def scaled_gae(inputs: ppojax.AdvantageInputs):
    """``A = GAE(c r, V; gamma, lam)``, returns ``= GAE(c r, V; gamma, lam_critic) + V`` with ``c = reward_scale``."""
    rewards = inputs.hparams["reward_scale"] * inputs.rewards
    advantages, _ = ppojax.gae(rewards, inputs.values, inputs.mask, gamma=inputs.gamma, lam=inputs.lam)
    _, returns = ppojax.gae(rewards, inputs.values, inputs.mask, gamma=inputs.gamma, lam=inputs.hparams["lam_critic"])
    return advantages, returns
