"""The PPO train state: one named pytree of arrays, plus the static setup that the jitted iteration reads.

``TrainState`` holds everything that changes or is an input of the iteration: the actor and critic params (one
optimizer state over both, so global grad-norm clipping sees both, as in TRL's PPO), the frozen reference params,
the reward (a pytree: a lexicon table, a reward model's params, or a static function), the KL controller state,
the RNG key and the iteration counter. Numbers that change during training are arrays, so nothing recompiles.

``PPOSetup`` holds what is fixed for a run: the model config, the PPO hyperparameters, the optimizer and the
combined loss function. It is a static field of the state with identity hashing, so one setup object means one
compilation.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Literal, Optional

import flax.struct
import jax
import jax.numpy as jnp
import optax

from ppojax.kl import KLControlConfig, KLState, init_kl_state
from ppojax.losses import LossTerm, combine, entropy_loss, kl_loss, ppo_clip_loss, value_loss
from ppojax.models.gpt2 import GPT2Config, Params, init_value_params


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


def learning_rate_schedule(cfg: OptimizerConfig, total_updates: int) -> optax.Schedule:
    """Learning rate as a function of the optimizer update count."""
    if cfg.schedule == "linear":
        return optax.linear_schedule(cfg.learning_rate, 0.0, transition_steps=max(int(total_updates), 1))
    return optax.constant_schedule(cfg.learning_rate)


def make_optimizer(cfg: OptimizerConfig, total_updates: int) -> optax.GradientTransformation:
    """The optax chain: clip by global norm -> Adam(W) with the learning-rate schedule."""
    lr = learning_rate_schedule(cfg, total_updates)
    if cfg.name == "adam":
        opt = optax.adam(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
    else:
        opt = optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
    parts = [optax.clip_by_global_norm(cfg.max_grad_norm)] if cfg.max_grad_norm is not None else []
    return optax.chain(*parts, opt)


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
    """Prompts (episodes) per iteration, over all devices."""
    minibatch_size: int = 8
    """Episodes per optimizer update; must divide batch_size and be >= 8 (lm-human-preferences asserts this)."""
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
    whiten_advantages: bool = True
    """Shift and scale advantages over the whole batch."""
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
    kl: KLControlConfig = dataclasses.field(default_factory=KLControlConfig)
    """KL coefficient control."""
    extra_loss_terms: tuple[ExtraLossTerm, ...] = ()
    """User loss terms added to the PPO loss."""

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
        names = [t.name for t in self.extra_loss_terms]
        reserved = {"policy", "value", "entropy", "kl"}
        if reserved & set(names) or len(set(names)) != len(names):
            raise ValueError(f"ppo.extra_loss_terms names must be unique and not in {sorted(reserved)}: {names}")

    @property
    def num_minibatches(self) -> int:
        return self.batch_size // self.minibatch_size

    @property
    def updates_per_iteration(self) -> int:
        """Optimizer updates in one iteration: epochs x minibatches."""
        return self.ppo_epochs * self.num_minibatches


def build_loss_terms(cfg: PPOConfig, extra: tuple = ()) -> list[LossTerm]:
    """The total loss as a list of terms: policy + vf_coef * value [+ entropy] [+ kl] + user terms.

    ``extra`` takes further ``LossTerm`` objects from Python (functions need no module path).
    """
    terms = [
        LossTerm("policy", ppo_clip_loss, 1.0, {"clip_eps": cfg.clip_eps, "dual_clip": cfg.dual_clip}),
        LossTerm("value", value_loss, cfg.vf_coef, {"clip_eps": cfg.value_clip_eps}),
    ]
    if cfg.entropy_coef:
        terms.append(LossTerm("entropy", entropy_loss, cfg.entropy_coef))
    if cfg.kl_loss_coef:
        terms.append(LossTerm("kl", kl_loss, cfg.kl_loss_coef, {"estimator": "k3"}))
    for t in cfg.extra_loss_terms:
        terms.append(LossTerm(t.name, t.fn, t.weight, dict(t.kwargs)))
    return terms + list(extra)


@dataclasses.dataclass(frozen=True, eq=False)
class PPOSetup:
    """The static part of a run (identity-hashed: one setup object, one compilation)."""

    model: GPT2Config
    ppo: PPOConfig
    optimizer: OptimizerConfig
    tx: optax.GradientTransformation
    lr_schedule: Callable
    loss_fn: Callable
    axis_name: Optional[str] = None
    """Mesh axis of data parallelism when the iteration runs inside ``shard_map`` (None: one device)."""

    @property
    def pad_token_id(self) -> int:
        return self.model.vocab_size if self.ppo.pad_token_id is None else self.ppo.pad_token_id


_SETUPS: dict = {}


def make_setup(model_config: GPT2Config, ppo: PPOConfig, optimizer: OptimizerConfig, total_iterations: int,
               extra_loss_terms: tuple = (), axis_name: Optional[str] = None) -> PPOSetup:
    """The static setup for these configs. Equal configs give the same object, so rebuilding a state (a resumed
    run, a test, an ablation over seeds) reuses the compiled iteration instead of compiling it again."""
    key = repr((model_config, ppo, optimizer, int(total_iterations), axis_name,
                tuple((t.name, id(t.fn), t.weight, sorted(t.kwargs.items())) for t in extra_loss_terms)))
    setup = _SETUPS.get(key)
    if setup is None:
        total_updates = int(optimizer.decay_iterations or total_iterations) * ppo.updates_per_iteration
        setup = PPOSetup(model=model_config, ppo=ppo, optimizer=optimizer,
                         tx=make_optimizer(optimizer, total_updates),
                         lr_schedule=learning_rate_schedule(optimizer, total_updates),
                         loss_fn=combine(build_loss_terms(ppo, extra_loss_terms)), axis_name=axis_name)
        _SETUPS[key] = setup
    return setup


@flax.struct.dataclass
class TrainState:
    """Everything the PPO iteration reads and writes, as one pytree."""

    params: Params
    """``{'actor': LM params, 'critic': value-model params}``."""
    opt_state: optax.OptState
    """One optimizer state over ``params`` (actor and critic)."""
    ref_params: Params
    """Frozen reference policy (the initial actor): the KL anchor."""
    reward: Any
    """A jittable reward pytree with ``__call__(tokens, mask) -> scores [batch]`` (see ``ppojax.rewards``)."""
    kl: KLState
    """The KL controller's state (the coefficient, an array)."""
    key: jax.Array
    """RNG key; each iteration splits a fresh one for sampling and shuffling."""
    step: jax.Array
    """int32: iterations done."""
    setup: PPOSetup = flax.struct.field(pytree_node=False)


def create_train_state(
    model_config: GPT2Config,
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
) -> TrainState:
    """A fresh state: the critic is the actor's trunk with a zero value head (TRL PPOv2 / Tunix), the reference is a
    copy of the actor. ``total_iterations`` sets the length of a linear learning-rate decay unless
    ``optimizer.decay_iterations`` does."""
    if reward is None or not callable(reward):
        raise TypeError(f"reward must be a callable pytree (tokens, mask) -> scores, got {type(reward).__name__}")
    if critic_params is None:
        critic_params = init_value_params(model_config, actor_params)
    if ref_params is None:
        ref_params = jax.tree.map(jnp.copy, actor_params)
    setup = make_setup(model_config, ppo, optimizer, total_iterations, tuple(extra_loss_terms), axis_name)
    tx = setup.tx
    params = {"actor": actor_params, "critic": critic_params}
    return TrainState(
        params=params,
        opt_state=tx.init(params),
        ref_params=ref_params,
        reward=reward,
        kl=init_kl_state(ppo.kl),
        key=key,
        step=jnp.zeros((), jnp.int32),
        setup=setup,
    )
