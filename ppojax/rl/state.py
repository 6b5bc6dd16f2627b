"""The PPO train state: trainable and frozen parts, hyperparameters as arrays, and the static setup.

``TrainState`` is one pytree of arrays:

- ``params``: what the optimizer sees. ``{'actor': LM params}`` plus ``'critic'`` (a scalar-head model: the
  actor's trunk and a zero value head at the start) when the advantage estimator needs one. One optimizer state
  over all of it, so global grad-norm clipping sees actor and critic together, as in TRL's PPO. With
  ``ppo.critic='shared'`` (:class:`SharedCritic`, lm-human-preferences' design) the critic is a value head on the
  actor's trunk instead: ``{'actor': LM params, 'value_head': {'kernel', 'bias'}}``.
- ``frozen``: inputs that never train. ``{'ref': the reference policy}`` (the initial actor: the KL anchor); the
  LoRA setup keeps the frozen base here instead.
- ``reward``: the jittable reward (a lexicon table, a reward model's params, a static function), or None when the
  reward runs on the host between ``rollout`` and ``update``.
- ``hparams``: every float hyperparameter that does not change a shape or the code (:class:`HParams`): learning
  rate and Adam's constants, clip ranges, loss coefficients and term weights, gamma and lambda, the sampling
  temperature and top-p, penalties and the KL controller's target and horizon. Changing one between iterations
  (``set_hparams``) recompiles nothing, and a sweep stacks them on a run axis.
- ``kl`` (the KL coefficient), ``key`` and ``step``.

``PPOSetup`` (a static field, identity-hashed) holds what fixes the program: the model config, the static view of
the PPO and optimizer configs (their array fields replaced by markers that refuse to be read), the advantage
estimator, the policy loss and the loss terms, and the collectives. Configs that differ only in array
hyperparameters get the same setup object, hence one compilation.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any, Callable, ClassVar, Literal, Optional

import flax.struct
import jax
import jax.numpy as jnp
import optax

from ppojax.models import ModelConfig, Params, init_head, init_value_params
from ppojax.parallel.sharding import Collectives
from ppojax.rl.advantages import Estimator, get_estimator
from ppojax.rl.kl import KLControlConfig, KLState, init_kl_state
from ppojax.rl.losses import (LOSS_AGGREGATIONS, LossTerm, combine, entropy_loss, get_policy_loss, kl_loss,
                              value_loss)


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
    """Adam/AdamW with global grad-norm clipping and an optional linear decay of the learning rate to 0."""

    name: Literal["adam", "adamw"] = "adam"
    """'adam' (PyTorch/optax flavour: epsilon outside the square root) or 'adamw' (decoupled weight decay)."""
    learning_rate: float = 1e-5
    """Peak learning rate (lm-human-preferences: 1e-5 for sentiment)."""
    schedule: Literal["constant", "linear"] = "constant"
    """'linear' anneals the rate to 0 over ``decay_iterations`` (lm-human-preferences); 'constant' keeps it."""
    decay_iterations: Optional[int] = None
    """'linear' only: PPO iterations over which the rate decays to 0. Part of the config rather than taken from the
    run length, so a run stopped early and resumed with more iterations follows the same schedule. None: the
    ``total_iterations`` given to ``create_train_state``."""
    b1: float = 0.9
    """Adam beta1."""
    b2: float = 0.999
    """Adam beta2."""
    eps: float = 1e-5
    """Adam epsilon (lm-human-preferences and TRL's PPO use 1e-5)."""
    weight_decay: float = 0.0
    """AdamW only: decoupled weight decay."""
    max_grad_norm: Optional[float] = 1.0
    """Clip the global gradient norm over actor and critic together to this; None disables clipping."""
    grad_accum_steps: int = 1
    """Split each minibatch into this many micro-batches and sum their gradients (exact: same update, less memory)."""

    def __post_init__(self):
        if self.name not in ("adam", "adamw"):
            raise ValueError(f"optimizer.name must be 'adam' or 'adamw', got {self.name!r}")
        if self.schedule not in ("constant", "linear"):
            raise ValueError(f"optimizer.schedule must be 'constant' or 'linear', got {self.schedule!r}")
        for name in ("learning_rate", "eps"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"optimizer.{name} must be a finite number > 0, got {value!r}")
        for name in ("b1", "b2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"optimizer.{name} must be in [0, 1), got {getattr(self, name)!r}")
        if self.weight_decay < 0:
            raise ValueError(f"optimizer.weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"optimizer.max_grad_norm must be > 0 or None, got {self.max_grad_norm!r}")
        if self.decay_iterations is not None and self.decay_iterations < 1:
            raise ValueError(f"optimizer.decay_iterations must be >= 1 or None, got {self.decay_iterations!r}")
        if not isinstance(self.grad_accum_steps, int) or self.grad_accum_steps < 1:
            raise ValueError(f"optimizer.grad_accum_steps must be an int >= 1, got {self.grad_accum_steps!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExtraLossTerm:
    """A user loss term named in a config: ``fn`` is ``'package.module:function'`` with signature
    ``fn(inputs: LossInputs, **kwargs) -> (loss, metrics)``; it is added to the total as ``weight * loss``."""

    name: str
    """Unique name; logged as ``loss/<name>``."""
    fn: str
    """``'package.module:function'``."""
    weight: float = 1.0
    """Weight of the term in the total loss."""
    kwargs: dict = dataclasses.field(default_factory=dict)
    """Keyword arguments bound to the function."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class PPOConfig:
    """PPO-RLHF hyperparameters. Defaults follow lm-human-preferences' sentiment runs where they apply."""

    batch_size: int = 64
    """Responses (episodes) per iteration, over all devices."""
    minibatch_size: int = 8
    """Responses per optimizer update; must divide batch_size and be >= 8 (lm-human-preferences asserts this)."""
    ppo_epochs: int = 4
    """Passes over the batch per iteration, each with a fresh permutation."""
    response_length: int = 24
    """Tokens sampled per response."""
    temperature: float = 0.7
    """Sampling temperature; log-probs are recomputed with it (forgetting that inflates the KL)."""
    top_k: int = 0
    """Top-k filter while sampling (0: off)."""
    top_p: float = 1.0
    """Nucleus filter while sampling (1: off)."""
    eos_token_id: Optional[int] = None
    """Stop a response at this token (None: always response_length tokens, as lm-human-preferences)."""
    pad_token_id: Optional[int] = None
    """Fills response positions after EOS / truncation; None means the model's vocab_size (ppojax's pad id)."""
    gamma: float = 1.0
    """Discount in GAE."""
    lam: float = 0.95
    """GAE lambda."""
    clip_eps: float = 0.2
    """Policy ratio clip."""
    dual_clip: Optional[float] = None
    """Dual-clip constant c > 1 for negative advantages (Ye et al. 2020); None disables it."""
    value_clip_eps: float = 0.2
    """Value prediction clip around the rollout values."""
    vf_coef: float = 0.1
    """Weight of the value loss."""
    entropy_coef: float = 0.0
    """Weight of the entropy bonus."""
    kl_loss_coef: float = 0.0
    """Weight of a KL-to-reference loss term (k3), as an alternative or complement to the KL in the reward."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    """Per-token KL estimator inside the reward."""
    whiten_rewards: bool = False
    """Scale shaped rewards by their std (no mean shift) before GAE."""
    whiten_advantages: Optional[bool] = None
    """Shift and scale advantages over the whole batch; None: the estimator's default (GAE: yes; GRPO, RLOO,
    REINFORCE++: no, they normalise themselves)."""
    truncate_token: Optional[int] = None
    """lm-human-preferences truncation: cut the response after the first of this token (e.g. 13, '.')..."""
    truncate_after: int = 0
    """...found at or after this response position (e.g. 16)."""
    missing_truncate_penalty: Optional[float] = None
    """Replace the score of responses without the truncate token by this (lm-human-preferences: -1)."""
    missing_eos_penalty: Optional[float] = None
    """Subtract this from the score of responses with no EOS (TRL's missing_eos_penalty)."""
    rollout_chunk_size: Optional[int] = None
    """Rows per forward when recomputing rollout log-probs/values; None means minibatch_size."""
    vocab_chunk_size: int = 4096
    """Token log-probs and entropies walk the vocabulary in chunks of this many rows (``ppojax.token_logprobs``):
    no ``[tokens, vocab]`` log-softmax passes over memory. >= the vocabulary size means one chunk."""
    recompute_logits: bool = False
    """Update only: recompute each vocabulary chunk's logits in the backward pass (one more vocabulary matmul) instead
    of keeping them from the forward pass (``[minibatch x response, vocab]`` f32). Set it when memory is short."""
    advantage_estimator: str = "gae"
    """'gae' (PPO with a critic), 'grpo', 'dr_grpo', 'rloo', 'reinforce_pp' (critic-free), or
    'package.module:function' for a user's own (``ppojax.advantages.register_estimator``)."""
    samples_per_prompt: int = 1
    """k responses sampled per prompt, each with its own randomness (rows g*k .. g*k+k-1 share a prompt).
    ``batch_size`` still counts responses: an iteration takes ``batch_size / k`` prompts."""
    loss_aggregation: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                              "seq-mean-token-sum-norm"] = "token-mean"
    """How per-token losses reduce to a scalar (``ppojax.losses.aggregate``); exact across minibatches and devices."""
    clip_eps_high: Optional[float] = None
    """Clip-higher (DAPO): the ratio is clipped to [1 - clip_eps, 1 + clip_eps_high]; None: symmetric."""
    policy_loss: str = "ppo"
    """'ppo' (token ratios), 'gspo' (sequence-level ratio, Zheng et al. 2025), or 'package.module:function'."""
    kl: KLControlConfig = dataclasses.field(default_factory=KLControlConfig)
    """KL coefficient control."""
    extra_loss_terms: tuple[ExtraLossTerm, ...] = ()
    """User loss terms added to the PPO loss."""
    reuse_sampler_logprobs: bool = False
    """Less work, off by default. The rollout takes the actor's log-probs from the sampler (``SampleOutput.logprobs``:
    ``log softmax(logits / T)`` at each sampled token, the tempered unfiltered distribution, computed on the KV-cache
    decode path) instead of a second forward pass over prompt + response: with a separate critic the actor's trunk
    and vocabulary projection do not run in the rollout at all; with ``critic='shared'`` the trunk still runs (for
    the values) and the vocabulary projection is saved. The price: the two paths round differently, so the first
    minibatch's ratio ``exp(logp - logp_old)`` is 1 only up to float error instead of exactly (the pitfall in
    RLHF-FACTS; fp32, tests/test_perf_options.py: rollout log-probs within 1e-5 of the recomputed ones,
    ``first_minibatch/ratio_max`` within 1e-4 of 1; bf16 compute moves it further). The rollout then has no entropy
    (``Rollout.entropy`` is None): the logged ``entropy`` is the update's first minibatch's, which is the rollout
    policy itself on ``minibatch_size`` of the responses (all of them with one minibatch)."""
    critic: Literal["separate", "shared"] = "separate"
    """'separate': the critic is a model of its own (the actor's trunk + a zero value head at the start; TRL PPOv2,
    Tunix). 'shared': lm-human-preferences' original design, a zero-initialised value head on the policy's trunk
    (:class:`SharedCritic`): params are ``{'actor', 'value_head'}``, one trunk forward gives both the log-probs and
    the values in the rollout and in every update, the value loss trains the policy's trunk too (weighted by
    ``vf_coef``), and no critic copy (weights, gradients, two Adam moments) is held. Needs an estimator with a
    critic (GAE); full fine-tuning only (refused with LoRA roles)."""

    def __post_init__(self):
        for name in ("batch_size", "minibatch_size", "ppo_epochs", "response_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ppo.{name} must be a positive int, got {value!r}")
        if self.minibatch_size < 8:
            raise ValueError(
                f"ppo.minibatch_size={self.minibatch_size} is smaller than 8; lm-human-preferences asserts "
                "minibatches of at least 8 episodes (noisy updates otherwise)"
            )
        if self.batch_size % self.minibatch_size:
            raise ValueError(
                f"ppo.minibatch_size={self.minibatch_size} must divide ppo.batch_size={self.batch_size}"
            )
        chunk = self.rollout_chunk_size
        if chunk is not None and (chunk < 1 or self.batch_size % chunk):
            raise ValueError(f"ppo.rollout_chunk_size={chunk} must be a positive divisor of batch_size")
        for name in ("gamma", "lam"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"ppo.{name} must be in [0, 1], got {getattr(self, name)!r}")
        for name in ("clip_eps", "value_clip_eps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ppo.{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("vf_coef", "entropy_coef", "kl_loss_coef"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"ppo.{name} must be a finite number >= 0, got {value!r}")
        if self.dual_clip is not None and not self.dual_clip > 1:
            raise ValueError(f"ppo.dual_clip must be > 1 or None, got {self.dual_clip!r}")
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            raise ValueError(
                f"ppo.temperature must be > 0 for PPO (log-probs are divided by it), got {self.temperature!r}"
            )
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"ppo.top_k must be an int >= 0, got {self.top_k!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"ppo.top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.vocab_chunk_size, int) or isinstance(self.vocab_chunk_size, bool) \
                or self.vocab_chunk_size < 1:
            raise ValueError(f"ppo.vocab_chunk_size must be a positive int, got {self.vocab_chunk_size!r}")
        if self.kl_estimator not in ("k1", "k2", "k3"):
            raise ValueError(f"ppo.kl_estimator must be 'k1', 'k2' or 'k3', got {self.kl_estimator!r}")
        if self.truncate_after < 0 or self.truncate_after >= self.response_length:
            raise ValueError(
                f"ppo.truncate_after={self.truncate_after} must be in [0, response_length={self.response_length})"
            )
        if self.missing_truncate_penalty is not None and self.truncate_token is None:
            raise ValueError("ppo.missing_truncate_penalty needs ppo.truncate_token")
        if self.missing_eos_penalty is not None and self.eos_token_id is None:
            raise ValueError("ppo.missing_eos_penalty needs ppo.eos_token_id")
        k = self.samples_per_prompt
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"ppo.samples_per_prompt must be a positive int, got {k!r}")
        if self.batch_size % k or self.minibatch_size % k:
            raise ValueError(f"ppo.samples_per_prompt={k} must divide ppo.batch_size={self.batch_size} and "
                             f"ppo.minibatch_size={self.minibatch_size} (a minibatch holds whole groups)")
        estimator = get_estimator(self.advantage_estimator)  # unknown name: the closest one in the message
        if estimator.needs_groups and k < 2:
            raise ValueError(f"ppo.advantage_estimator={self.advantage_estimator!r} compares the k responses to one "
                             "prompt: set ppo.samples_per_prompt >= 2 (e.g. 4)")
        if self.loss_aggregation not in LOSS_AGGREGATIONS:
            raise ValueError(f"ppo.loss_aggregation must be one of {LOSS_AGGREGATIONS}, got "
                             f"{self.loss_aggregation!r}")
        if self.clip_eps_high is not None and not self.clip_eps_high >= self.clip_eps:
            raise ValueError(f"ppo.clip_eps_high={self.clip_eps_high} must be >= ppo.clip_eps={self.clip_eps} "
                             "(clip-higher widens the upper bound; None means symmetric)")
        get_policy_loss(self.policy_loss)
        if not isinstance(self.reuse_sampler_logprobs, bool):
            raise ValueError(f"ppo.reuse_sampler_logprobs must be true or false, got {self.reuse_sampler_logprobs!r}")
        if self.critic not in ("separate", "shared"):
            raise ValueError(f"ppo.critic must be 'separate' or 'shared', got {self.critic!r}")
        if self.critic == "shared" and not estimator.needs_critic:
            raise ValueError(f"ppo.critic='shared' puts a value head on the policy's trunk, but "
                             f"ppo.advantage_estimator={self.advantage_estimator!r} uses no critic: leave ppo.critic "
                             "at 'separate' (no critic is built) or use an estimator with a critic ('gae')")
        names = [t.name for t in self.extra_loss_terms]
        reserved = {"policy", "value", "entropy", "kl"}
        if reserved & set(names) or len(set(names)) != len(names):
            raise ValueError(f"ppo.extra_loss_terms names must be unique and not in {sorted(reserved)}: {names}")

    @property
    def prompts_per_iteration(self) -> int:
        """Prompts an iteration takes: ``batch_size / samples_per_prompt``."""
        return self.batch_size // self.samples_per_prompt

    @property
    def num_minibatches(self) -> int:
        return self.batch_size // self.minibatch_size

    @property
    def updates_per_iteration(self) -> int:
        """Optimizer updates in one iteration: epochs x minibatches."""
        return self.ppo_epochs * self.num_minibatches


# ----------------------------------------------------------------------------------------------------------------
# Hyperparameters as arrays


@flax.struct.dataclass
class HParams:
    """Every float hyperparameter that changes neither a shape nor the code, as float32 scalar arrays.

    The static setup decides whether an optional one is used at all (``ppo.dual_clip: null`` compiles no dual clip;
    ``ppo.top_p: 1`` no nucleus filter; ``optimizer.max_grad_norm: null`` no clipping); its array here is then
    unused. ``term_weights`` holds the weights of the config's ``ppo.extra_loss_terms`` by name.
    """

    learning_rate: jax.Array
    b1: jax.Array
    b2: jax.Array
    eps: jax.Array
    weight_decay: jax.Array
    max_grad_norm: jax.Array
    temperature: jax.Array
    top_p: jax.Array
    gamma: jax.Array
    lam: jax.Array
    clip_eps: jax.Array
    clip_eps_high: jax.Array
    dual_clip: jax.Array
    value_clip_eps: jax.Array
    vf_coef: jax.Array
    entropy_coef: jax.Array
    kl_loss_coef: jax.Array
    missing_truncate_penalty: jax.Array
    missing_eos_penalty: jax.Array
    kl_target: jax.Array
    kl_horizon: jax.Array
    term_weights: dict


# Config path -> HParams field. The initial KL coefficient is an array too, but of the KL controller's state.
HPARAM_PATHS: dict[str, str] = {
    "optimizer.learning_rate": "learning_rate",
    "optimizer.b1": "b1",
    "optimizer.b2": "b2",
    "optimizer.eps": "eps",
    "optimizer.weight_decay": "weight_decay",
    "optimizer.max_grad_norm": "max_grad_norm",
    "ppo.temperature": "temperature",
    "ppo.top_p": "top_p",
    "ppo.gamma": "gamma",
    "ppo.lam": "lam",
    "ppo.clip_eps": "clip_eps",
    "ppo.clip_eps_high": "clip_eps_high",
    "ppo.dual_clip": "dual_clip",
    "ppo.value_clip_eps": "value_clip_eps",
    "ppo.vf_coef": "vf_coef",
    "ppo.entropy_coef": "entropy_coef",
    "ppo.kl_loss_coef": "kl_loss_coef",
    "ppo.missing_truncate_penalty": "missing_truncate_penalty",
    "ppo.missing_eos_penalty": "missing_eos_penalty",
    "ppo.kl.target": "kl_target",
    "ppo.kl.horizon": "kl_horizon",
}
ARRAY_CONFIG_PATHS = (*HPARAM_PATHS, "ppo.kl.init_coef")
"""Every config field that lives in the state as an array: runs that differ only in these share one program."""

# Optional fields whose None (or, for top_p, 1.0) switches code off: the presence is static, the value an array.
_SWITCHES = {"optimizer.max_grad_norm": None, "ppo.clip_eps_high": None, "ppo.dual_clip": None,
             "ppo.missing_truncate_penalty": None, "ppo.missing_eos_penalty": None, "ppo.top_p": 1.0}


def _f32(x) -> jax.Array:
    return jnp.asarray(0.0 if x is None else x, jnp.float32)


def _get_path(cfgs: dict, path: str):
    obj = cfgs
    for part in path.split("."):
        obj = obj[part] if isinstance(obj, dict) else getattr(obj, part)
    return obj


def hparams_from_config(ppo: "PPOConfig", optimizer: "OptimizerConfig") -> HParams:
    """The state's hyperparameter arrays for these configs (an optional one that is off is stored as 0)."""
    cfgs = {"ppo": ppo, "optimizer": optimizer}
    values = {field: _f32(_get_path(cfgs, path)) for path, field in HPARAM_PATHS.items()}
    if ppo.clip_eps_high is None:
        values["clip_eps_high"] = _f32(ppo.clip_eps)
    return HParams(**values, term_weights={t.name: _f32(t.weight) for t in ppo.extra_loss_terms})


class InState:
    """Marks, in the static setup, a config value that lives in ``state.hparams``: reading it as a number raises,
    so static code never uses a value that a sweep or ``set_hparams`` changes."""

    def __init__(self, path: str):
        self.path = path

    def __repr__(self) -> str:
        return f"<in state.hparams: {self.path}>"

    def __eq__(self, other) -> bool:
        return isinstance(other, InState) and other.path == self.path

    def __hash__(self) -> int:
        return hash(("InState", self.path))

    def _refuse(self, *_):
        raise TypeError(f"{self.path} is an array hyperparameter: read it from state.hparams, not from the setup")

    __float__ = __int__ = __bool__ = __lt__ = __le__ = __gt__ = __ge__ = __neg__ = _refuse
    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = __truediv__ = __rtruediv__ = _refuse


def _replace_static(obj, **fields):
    """A copy of a frozen config dataclass with fields set, skipping its validation (the values are markers)."""
    new = copy.copy(obj)
    for k, v in fields.items():
        object.__setattr__(new, k, v)
    return new


def static_view(ppo: "PPOConfig", optimizer: "OptimizerConfig"):
    """The configs with every array field replaced by an :class:`InState` marker (or left as the None / 1.0 that
    switches it off): equal for runs that differ only in array hyperparameters."""
    def mark(cfg, prefix, names):
        out = {}
        for name in names:
            path = f"{prefix}.{name}"
            if path in _SWITCHES and getattr(cfg, name) == _SWITCHES[path]:
                continue
            out[name] = InState(path)
        return out

    fields = lambda prefix: [p.split(".", 1)[1] for p in ARRAY_CONFIG_PATHS
                             if p.startswith(prefix + ".") and p.count(".") == 1]
    kl = _replace_static(ppo.kl, init_coef=InState("ppo.kl.init_coef"), target=InState("ppo.kl.target"),
                         horizon=InState("ppo.kl.horizon"))
    terms = tuple(_replace_static(t, weight=InState(f"ppo.extra_loss_terms.{t.name}.weight"))
                  for t in ppo.extra_loss_terms)
    ppo_static = _replace_static(ppo, kl=kl, extra_loss_terms=terms, **mark(ppo, "ppo", fields("ppo")))
    opt_static = _replace_static(optimizer, **mark(optimizer, "optimizer", fields("optimizer")))
    return ppo_static, opt_static


# ----------------------------------------------------------------------------------------------------------------
# The optimizer


def total_updates(ppo: "PPOConfig", optimizer: "OptimizerConfig", total_iterations: int) -> int:
    """Optimizer updates over which a linear learning-rate schedule decays to 0."""
    return int(optimizer.decay_iterations or total_iterations) * ppo.updates_per_iteration


def learning_rate_at(setup: "PPOSetup", hparams: HParams, count) -> jax.Array:
    """``lr * max(1 - count / total_updates, 0)`` for the linear schedule (lm-human-preferences), else ``lr``."""
    lr = hparams.learning_rate
    if setup.optimizer.schedule == "linear":
        frac = jnp.minimum(jnp.asarray(count, jnp.float32) / max(setup.total_updates, 1), 1.0)
        lr = lr * (1.0 - frac)
    return lr


def make_optimizer(setup: "PPOSetup", hparams: HParams, learning_rate) -> optax.GradientTransformation:
    """The optax chain at these (possibly traced) hyperparameters: clip by global norm -> Adam(W).

    Built anew at every update from the state's arrays; the optimizer state's structure does not depend on their
    values, so ``init`` at any values and ``update`` at the current ones agree."""
    opt = setup.optimizer
    if opt.name == "adam":
        inner = optax.adam(learning_rate, b1=hparams.b1, b2=hparams.b2, eps=hparams.eps)
    else:
        inner = optax.adamw(learning_rate, b1=hparams.b1, b2=hparams.b2, eps=hparams.eps,
                            weight_decay=hparams.weight_decay)
    parts = [optax.clip_by_global_norm(hparams.max_grad_norm)] if opt.max_grad_norm is not None else []
    return optax.chain(*parts, inner)


def update_count(opt_state) -> jax.Array:
    """Optimizer updates done (Adam's ``count``)."""
    has_count = lambda x: "count" in getattr(x, "_fields", ())  # optax states are NamedTuples
    counts = [x.count for x in jax.tree.leaves(opt_state, is_leaf=has_count) if has_count(x)]
    return counts[0] if counts else jnp.zeros((), jnp.int32)


def optimizer_step(setup: "PPOSetup", hparams: HParams, learning_rate, grads, opt_state, params):
    """One update of :func:`make_optimizer`'s chain, fused per parameter: ``(params, opt_state, grad_norm)``.

    The math of optax's ``clip_by_global_norm -> adam`` (or ``adamw``) and the same optimizer-state tree (the chain's
    ``ScaleByAdamState`` is replaced in place), written as one expression per output so that XLA makes three
    elementwise passes per parameter (``m``, ``v``, ``p``). Through optax's chain it makes four to five on a CPU: the
    clipped gradient is written out and read back, and without clipping the ``g^2`` of Adam's second moment is
    shared with the global norm's and written out too. With ``k`` the updates done so far::

        n  = ||g||_2 over every parameter                            (returned: the logged grad_norm)
        c  = 1 if n < max_grad_norm else max_grad_norm / n           (1 without clipping)
        m' = b1 m + (1 - b1) c g
        v' = b2 v + (1 - b2) c^2 g^2
        p' = p - lr [ (m' / (1 - b1^(k+1))) / (sqrt(v' / (1 - b2^(k+1))) + eps) + wd p ]     (wd: AdamW only)

    Each output keeps its input's dtype. Equal to the optax chain up to float rounding (tests/test_perf_options.py).
    """
    from optax import tree_utils as otu

    opt = setup.optimizer
    grad_norm = optax.global_norm(grads)
    scale = jnp.float32(1.0)
    if opt.max_grad_norm is not None:  # optax: g if n < max_norm else (g / n) * max_norm
        scale = jnp.where(grad_norm < hparams.max_grad_norm, 1.0, hparams.max_grad_norm / grad_norm)
    b1, b2, eps = hparams.b1, hparams.b2, hparams.eps
    count = optax.safe_increment(otu.tree_get(opt_state, "count"))
    c1, c2 = (1.0 - b1) * scale, (1.0 - b2) * scale * scale  # scalars folded in: no clipped gradient in memory
    bc1, bc2 = 1.0 - b1 ** count, 1.0 - b2 ** count
    decay = hparams.weight_decay if opt.name == "adamw" else None

    def leaf(p, m, v, g):
        m_new = b1 * m + c1 * g
        v_new = b2 * v + (c2 * g) * g
        step = (m_new / bc1) / (jnp.sqrt(v_new / bc2) + eps)
        if decay is not None:
            step = step + decay * p
        return (p - learning_rate * step).astype(p.dtype), m_new.astype(m.dtype), v_new.astype(v.dtype)

    leaves, treedef = jax.tree.flatten(params)
    others = [treedef.flatten_up_to(t) for t in (otu.tree_get(opt_state, "mu"), otu.tree_get(opt_state, "nu"), grads)]
    with jax.named_scope("optimizer_step"):  # names its ops in profiles (benchmarks/profile_iteration.py)
        new_p, new_m, new_v = (treedef.unflatten(list(col)) for col in zip(*map(leaf, leaves, *others)))
    return new_p, otu.tree_set(opt_state, count=count, mu=new_m, nu=new_v), grad_norm


# ----------------------------------------------------------------------------------------------------------------
# Roles: which params are the actor, the reference and the critic


@dataclasses.dataclass(frozen=True)
class FullFineTune:
    """Every actor and critic weight trains; the reference is a frozen copy of the initial actor.

    A role view maps ``(params, frozen)`` to the param trees the model functions take; LoRA's view
    (``ppojax.models.lora``) builds them from one frozen base and the adapters instead."""

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


# ----------------------------------------------------------------------------------------------------------------
# The static setup


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

    def loss_fn(inputs, hp: HParams):
        weights = {"entropy": hp.entropy_coef, "kl": hp.kl_loss_coef,
                   **{name: hp.term_weights[name] for name in extra_names}}
        policy = {"clip_eps": hp.clip_eps, "clip_eps_high": hp.clip_eps_high,
                  "dual_clip": hp.dual_clip if ppo.dual_clip is not None else None}
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


# ----------------------------------------------------------------------------------------------------------------
# The state


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


def _hparam_field(name: str) -> str:
    if name in HPARAM_PATHS:
        return HPARAM_PATHS[name]
    if name in HParams.__dataclass_fields__ and name != "term_weights":
        return name
    import difflib

    choices = list(HPARAM_PATHS) + [f for f in HParams.__dataclass_fields__ if f != "term_weights"]
    close = difflib.get_close_matches(name, choices, n=1)
    raise KeyError(f"{name!r} is not an array hyperparameter{f'; did you mean {close[0]!r}?' if close else ''} "
                   f"(see ppojax.rl.state.HPARAM_PATHS)")


def set_hparams(state: TrainState, **values) -> TrainState:
    """The state with hyperparameters changed; nothing recompiles. Keys are ``HParams`` field names
    (``clip_eps=0.3``) or config paths through a dict (``**{"ppo.clip_eps": 0.3}``); ``term_weights={"name": w}``
    sets user loss-term weights. An optional hyperparameter that the setup switched off (``ppo.dual_clip: null``...)
    cannot be switched on here: that changes the program."""
    changes, weights = {}, dict(state.hparams.term_weights)
    for name, value in values.items():
        if name == "term_weights":
            unknown = set(value) - set(weights)
            if unknown:
                raise KeyError(f"no loss terms {sorted(unknown)} in this run (terms: {sorted(weights)})")
            weights.update({k: _f32(v) for k, v in value.items()})
            continue
        field = _hparam_field(name)
        path = next(p for p, f in HPARAM_PATHS.items() if f == field)
        if path in _SWITCHES:
            section, attr = path.split(".")
            static = getattr(getattr(state.setup, section), attr)
            if not isinstance(static, InState):
                raise ValueError(f"{path} is off in this run's setup ({static!r}); switching it on changes the "
                                 "compiled program: set it in the config instead")
        old = getattr(state.hparams, field)
        changes[field] = jnp.asarray(value, jnp.float32).reshape(old.shape)
    return state.replace(hparams=state.hparams.replace(**changes, term_weights=weights))
