"""The PPO train state: trainable and frozen parts, hyperparameters as arrays, and the static setup beside them.

``TrainState`` is one pytree of arrays:

- ``params``: what the optimizer sees. ``{'actor': LM params}`` plus ``'critic'`` (a scalar-head model: the
  actor's trunk and a zero value head at the start) when the advantage estimator needs one. One optimizer state
  over all of it, so global grad-norm clipping sees actor and critic together, as in TRL's PPO. With
  ``ppo.critic='shared'`` (``ppojax.rl.roles.SharedCritic``, lm-human-preferences' design) the critic is a value head on the
  actor's trunk instead: ``{'actor': LM params, 'value_head': {'kernel', 'bias'}}``.
- ``frozen``: inputs that never train. ``{'ref': the reference policy}`` (the initial actor: the KL anchor); the
  LoRA setup keeps the frozen base here instead.
- ``reward``: the jittable reward (a lexicon table, a reward model's params, a static function), or None when the
  reward runs on the host between ``rollout`` and ``update``.
- ``hparams``: every float hyperparameter that does not change a shape or the code (:class:`HParams`): learning
  rate and Adam's constants, clip ranges, loss coefficients and term weights, gamma and lambda, the sampling
  temperature and top-p, penalties and the KL controller's target and horizon, and those the estimator and policy
  loss declared (``ppojax.rl.hparams``). Changing one between iterations (``set_hparams``) recompiles nothing, and
  a sweep stacks them on a run axis.
- ``kl`` (the KL coefficient), ``key`` and ``step``.

``setup`` (a static field: ``ppojax.rl.setup.PPOSetup``, identity-hashed) holds what fixes the program. Configs that
differ only in array hyperparameters get the same setup object, hence one compilation.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.struct
import jax
import jax.numpy as jnp
import optax

from ppojax.models import ModelConfig, Params
from ppojax.rl.config import OptimizerConfig, PPOConfig
from ppojax.rl.hparams import HParams, hparams_from_config
from ppojax.rl.kl import KLState, init_kl_state
from ppojax.rl.optimizer import make_optimizer
from ppojax.rl.setup import PPOSetup, make_setup


@flax.struct.dataclass
class TrainState:
    """Everything the PPO iteration reads and writes, as one pytree (see the module docstring)."""

    params: Params
    """Trainable: ``{'actor': ..., 'critic': ...}`` (no critic when the estimator needs none; ``'value_head'``
    instead of ``'critic'`` with ``ppo.critic='shared'``)."""
    opt_state: optax.OptState
    """The optimizer state over ``params`` only."""
    frozen: Params
    """Frozen inputs: ``{'ref': reference policy}`` (or LoRA's shared base)."""
    reward: Any
    """A jittable reward pytree ``(tokens, mask) -> scores [batch]``, or None for a host reward."""
    hparams: HParams
    """Array hyperparameters."""
    kl: KLState
    """The KL controller's state (the coefficient, an array)."""
    key: jax.Array
    """RNG key; each iteration splits a fresh one for sampling and shuffling."""
    step: jax.Array
    """int32: iterations done."""
    setup: PPOSetup = flax.struct.field(pytree_node=False)

    @property
    def actor_params(self) -> Params:
        return self.setup.roles.actor(self.params, self.frozen)

    @property
    def ref_params(self) -> Params:
        """The frozen reference policy's params."""
        return self.setup.roles.reference(self.params, self.frozen)

    @property
    def critic_params(self) -> Optional[Params]:
        return self.setup.roles.critic(self.params, self.frozen) if self.setup.has_critic else None


_ROLES_KEY = 0x10A  # fold_in constant of the key a role view initialises its weights with (LoRA's A matrices)


def create_train_state(
    model_config: ModelConfig,
    actor_params: Params,
    *,
    ppo: PPOConfig,
    reward: Any,
    key: jax.Array,
    optimizer: OptimizerConfig = OptimizerConfig(),
    total_iterations: int = 1,
    critic_params: Optional[Params] = None,
    ref_params: Optional[Params] = None,
    extra_loss_terms: tuple = (),
    axis_name: Optional[str] = None,
    roles: Any = None,
) -> TrainState:
    """A fresh state: the critic (when the estimator needs one) is the actor's trunk with a zero value head (TRL
    PPOv2 / Tunix), the reference a copy of the actor. ``reward`` is a jittable reward pytree, or None when scores
    come from the host (``ppojax.update(state, rollout, scores)``). ``total_iterations`` sets the length of a linear
    learning-rate decay unless ``optimizer.decay_iterations`` does."""
    if reward is not None and not callable(reward):
        raise TypeError(f"reward must be a callable pytree (tokens, mask) -> scores, or None for a host reward; got "
                        f"{type(reward).__name__}")
    setup = make_setup(model_config, ppo, optimizer, total_iterations, tuple(extra_loss_terms), axis_name, roles)
    # The roles' key is folded off the state's, which stays as given (the state's first split is the same whatever
    # the roles).
    params, frozen = setup.roles.init(model_config, actor_params, critic=setup.has_critic,
                                      critic_params=critic_params, ref_params=ref_params,
                                      key=jax.random.fold_in(key, _ROLES_KEY))
    hparams = hparams_from_config(ppo, optimizer)
    tx = make_optimizer(setup, hparams, hparams.learning_rate)
    return TrainState(params=params, opt_state=tx.init(params), frozen=frozen, reward=reward, hparams=hparams,
                      kl=init_kl_state(ppo.kl), key=key, step=jnp.zeros((), jnp.int32), setup=setup)
