"""The static setup of a run: what fixes the compiled program.

``PPOSetup`` (a static field of the train state, identity-hashed) holds the model config, the static view of the PPO
and optimizer configs (their array fields replaced by markers that refuse to be read, ``ppojax.rl.hparams``), the
advantage estimator, the policy loss and the loss terms (:func:`build_loss`), the role view (``ppojax.rl.roles``) and
the collectives. Configs that differ only in array hyperparameters get the same setup object (:func:`make_setup`
caches them), hence one compilation.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

from ppojax.models import ModelConfig
from ppojax.parallel.sharding import Collectives
from ppojax.rl.advantages import Estimator, get_estimator
from ppojax.rl.config import OptimizerConfig, PPOConfig
from ppojax.rl.hparams import HParams, static_view
from ppojax.rl.losses import LossTerm, combine, entropy_loss, get_policy_loss, kl_loss, policy_loss_hparams, value_loss
from ppojax.rl.optimizer import total_updates
from ppojax.rl.roles import FullFineTune, SharedCritic


@dataclasses.dataclass(frozen=True, eq=False)
class PPOSetup:
    """The static part of a run (identity-hashed: one setup object, one compilation)."""

    model: ModelConfig
    ppo: PPOConfig
    """Static view: array hyperparameters are :class:`InState` markers (read them from ``state.hparams``)."""
    optimizer: OptimizerConfig
    """Static view, as ``ppo``."""
    total_updates: int
    estimator: Estimator
    loss_fn: Callable
    """``loss_fn(inputs, hparams) -> (total, metrics)``."""
    roles: Any = FullFineTune()
    collectives: Collectives = Collectives()
    """How statistics and gradients become global: identity for a global (jit / GSPMD) program, ``psum`` over the
    mesh axis inside ``shard_map``."""

    @property
    def axis_name(self) -> Optional[str]:
        return self.collectives.axis_name

    @property
    def has_critic(self) -> bool:
        return self.estimator.needs_critic

    @property
    def shared_critic(self) -> bool:
        """The critic's value head reads the actor's hidden states (:class:`SharedCritic`): one trunk forward."""
        return self.has_critic and getattr(self.roles, "shares_actor_trunk", False)

    @property
    def whiten_advantages(self) -> bool:
        w = self.ppo.whiten_advantages
        return self.estimator.whiten_advantages if w is None else bool(w)

    @property
    def pad_token_id(self) -> int:
        return self.model.vocab_size if self.ppo.pad_token_id is None else self.ppo.pad_token_id


def build_loss(ppo: PPOConfig, extra: tuple = ()) -> Callable:
    """``loss_fn(inputs, hparams)``: the policy loss + vf_coef * value (with a critic) + entropy_coef * entropy +
    kl_loss_coef * KL (k3) + the config's and ``extra`` user terms, with every weight and clip range read from the
    state's arrays (``ppojax.losses.combine``). ``ppo`` is the static view."""
    has_critic = get_estimator(ppo.advantage_estimator).needs_critic
    terms = [LossTerm("policy", get_policy_loss(ppo.policy_loss))]
    if has_critic:
        terms.append(LossTerm("value", value_loss))
    terms += [LossTerm("entropy", entropy_loss), LossTerm("kl", kl_loss, 1.0, {"estimator": "k3"})]
    terms += [LossTerm(t.name, t.fn, 1.0, dict(t.kwargs)) for t in ppo.extra_loss_terms]
    terms += list(extra)
    combined = combine(terms)
    extra_names = tuple(t.name for t in ppo.extra_loss_terms)
    policy_declared = tuple(policy_loss_hparams(ppo.policy_loss))  # its own hyperparameters, as keyword arguments

    def loss_fn(inputs, hp: HParams):
        weights = {"entropy": hp.entropy_coef, "kl": hp.kl_loss_coef,
                   **{name: hp.term_weights[name] for name in extra_names}}
        policy = {"clip_eps": hp.clip_eps, "clip_eps_high": hp.clip_eps_high,
                  "dual_clip": hp.dual_clip if ppo.dual_clip is not None else None,
                  **{name: hp.declared[name] for name in policy_declared}}
        kwargs = {"policy": policy}
        if has_critic:
            weights["value"] = hp.vf_coef
            kwargs["value"] = {"clip_eps": hp.value_clip_eps}
        return combined(inputs, weights=weights, kwargs=kwargs)

    return loss_fn


def _roles_for(ppo: PPOConfig, roles: Any) -> Any:
    """The role view for ``ppo.critic``: :class:`FullFineTune` or :class:`SharedCritic` when none is given; a given
    view must agree with ``ppo.critic`` (a shared critic is implemented for full fine-tuning only)."""
    shared = ppo.critic == "shared"
    if roles is None:
        return SharedCritic() if shared else FullFineTune()
    if shared != bool(getattr(roles, "shares_actor_trunk", False)):
        if shared:
            raise ValueError(f"ppo.critic='shared' is implemented for full fine-tuning only, not with "
                             f"{type(roles).__name__} roles (e.g. LoRA, whose critic is the base plus its own "
                             "adapters and head): use ppo.critic='separate'")
        raise ValueError(f"roles={type(roles).__name__}() share the actor's trunk with the critic: set "
                         "ppo.critic='shared'")
    return roles


_SETUPS: dict = {}


def make_setup(model_config: ModelConfig, ppo: PPOConfig, optimizer: OptimizerConfig, total_iterations: int,
               extra_loss_terms: tuple = (), axis_name: Optional[str] = None, roles: Any = None) -> PPOSetup:
    """The static setup for these configs. Configs equal up to their array hyperparameters give the same object, so
    rebuilding a state (a resumed run, a test, another grid point of a sweep) reuses the compiled iteration."""
    ppo_s, opt_s = static_view(ppo, optimizer)
    roles = _roles_for(ppo, roles)
    updates = total_updates(ppo, optimizer, total_iterations) if optimizer.schedule == "linear" else 0
    key = repr((model_config, ppo_s, opt_s, updates, axis_name, roles,
                tuple((t.name, id(t.fn), t.weight, sorted(t.kwargs.items())) for t in extra_loss_terms)))
    setup = _SETUPS.get(key)
    if setup is None:
        setup = PPOSetup(model=model_config, ppo=ppo_s, optimizer=opt_s, total_updates=updates,
                         estimator=get_estimator(ppo.advantage_estimator), loss_fn=build_loss(ppo_s, extra_loss_terms),
                         roles=roles, collectives=Collectives(axis_name))
        _SETUPS[key] = setup
    return setup

