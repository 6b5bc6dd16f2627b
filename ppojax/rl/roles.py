"""Role views: which trainable and frozen params are the actor, the reference and the critic.

A role view maps ``(params, frozen)`` (the train state's trainable and frozen trees) to the param trees the model
functions take, and builds both trees for a fresh state (``init``):

- :class:`FullFineTune`: ``params = {'actor', 'critic'}``, ``frozen = {'ref'}`` (a copy of the initial actor).
- :class:`SharedCritic`: lm-human-preferences' one trunk with two heads, ``params = {'actor', 'value_head'}``.
- :class:`LoraRoles`: one frozen base shared by actor, critic and reference, ``params`` only adapters and a head
  (the adapter math is ``ppojax.models.lora``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Optional

import jax
import jax.numpy as jnp

from ppojax.models import init_head, init_value_params
from ppojax.models.lora import LoraError, LoraSpec, family_targets


@dataclasses.dataclass(frozen=True)
class FullFineTune:
    """Every actor and critic weight trains; the reference is a frozen copy of the initial actor.

    A role view maps ``(params, frozen)`` to the param trees the model functions take; LoRA's view
    (:class:`LoraRoles`) builds them from one frozen base and the adapters instead."""

    def actor(self, params, frozen):
        return params["actor"]

    def reference(self, params, frozen):
        return frozen["ref"]

    def critic(self, params, frozen):
        return params["critic"]

    def init(self, model_config, actor_params, *, critic: bool, critic_params=None, ref_params=None, key=None):
        """``(trainable, frozen)`` trees of a fresh state (``key``: for views with random initial weights, unused)."""
        trainable = {"actor": actor_params}
        if critic:
            trainable["critic"] = (init_value_params(model_config, actor_params) if critic_params is None
                                   else critic_params)
        ref = jax.tree.map(jnp.copy, actor_params) if ref_params is None else ref_params
        return trainable, {"ref": ref}


@dataclasses.dataclass(frozen=True)
class SharedCritic(FullFineTune):
    """lm-human-preferences' actor-critic (``ppo.critic='shared'``): one trunk, two heads.

    ``params = {'actor': LM params, 'value_head': {'kernel': [width, 1], 'bias': [1]}}`` (the head starts at zero,
    ``ppojax.models.init_head``); the reference is a frozen copy of the initial actor, as in :class:`FullFineTune`.
    The critic view is the actor's trunk under that head, ``V(s_t) = scalar_head(value_head, h_t)`` with ``h_t`` the
    actor's final hidden state, so code that asks for critic params (``state.critic_params``, ``value_forward``)
    sees an ordinary scalar-head model. ``shares_actor_trunk`` tells the iteration to run the trunk once for both
    heads: the gradient of ``policy + vf_coef * value`` reaches the trunk through both.
    """

    shares_actor_trunk: ClassVar[bool] = True

    def critic(self, params, frozen):
        return {"transformer": params["actor"]["transformer"], "head": params["value_head"]}

    def init(self, model_config, actor_params, *, critic: bool, critic_params=None, ref_params=None, key=None):
        if not critic:
            raise ValueError("ppo.critic='shared' needs an advantage estimator with a critic (e.g. 'gae')")
        if critic_params is not None:
            raise ValueError("with ppo.critic='shared' the critic is the actor's trunk plus a zero value head: "
                             "critic_params cannot be given (use ppo.critic='separate' to start from your own critic)")
        trainable = {"actor": actor_params, "value_head": init_head(model_config)}
        ref = jax.tree.map(jnp.copy, actor_params) if ref_params is None else ref_params
        return trainable, {"ref": ref}


def is_lora(roles: Any) -> bool:
    """Whether a state's role view (``state.setup.roles``) is LoRA's."""
    return isinstance(roles, LoraSpec)


# ----------------------------------------------------------------------------------------------------------------
# The PPO role view


@dataclasses.dataclass(frozen=True)
class LoraRoles(LoraSpec):
    """PPO roles over one frozen base: the actor and the critic are the base plus their own adapters (the critic
    with a value head), the reference is the base itself (``ppojax.models.lora``'s docstring draws the trees).

    ``create_train_state(config, base_params, ..., roles=LoraRoles(rank=8, alpha=16, targets=('c_attn',)))``: the
    state's ``frozen`` holds the base once, its ``params`` (and so the optimizer state) only adapters and the head.
    """

    def actor(self, params, frozen):
        return self.merge(frozen["base"], params["actor"])

    def reference(self, params, frozen):
        return frozen["base"]

    def critic(self, params, frozen):
        critic = params["critic"]
        return {"transformer": self.merge(frozen["base"], critic["adapters"])["transformer"], "head": critic["head"]}

    def init(self, model_config, actor_params, *, critic: bool, critic_params=None, ref_params=None, key=None):
        """``(trainable, frozen)`` of a fresh state; ``actor_params`` is the base (held as is, not copied). The critic
        starts as the base with a zero-effect adapter and a zero value head, as a full fine-tune's critic does."""
        if key is None:
            raise LoraError("LoraRoles.init needs a key for the adapters' A matrices")
        if critic_params is not None:
            raise LoraError("with LoRA the critic is the shared base plus its own adapter and head: critic_params "
                            "cannot be given")
        if ref_params is not None and ref_params is not actor_params:
            raise LoraError("with LoRA the reference is the shared base (adapters off): ref_params cannot be given")
        actor_key, critic_key = jax.random.split(key)
        trainable = {"actor": self.init_adapters(model_config, actor_params, actor_key)}
        if critic:
            trainable["critic"] = {"adapters": self.init_adapters(model_config, actor_params, critic_key),
                                   "head": init_head(model_config)}
        return trainable, {"base": actor_params}

    def spec(self) -> LoraSpec:
        """The rank, alpha and targets alone (e.g. for :func:`save_adapter`)."""
        return LoraSpec(self.rank, self.alpha, self.targets)


def roles_from_config(lora_config: Any, model_config: Any) -> Optional[LoraRoles]:
    """The role view of a ``lora`` config section (``rank``, ``alpha``, ``targets``): None when ``rank`` is 0 (LoRA
    off); empty ``targets`` means every projection the family lets LoRA adapt."""
    if lora_config is None or lora_config.rank == 0:
        return None
    targets = lora_config.targets
    if not targets:
        targets = family_targets(model_config)
    return LoraRoles(rank=lora_config.rank, alpha=lora_config.alpha, targets=targets)
