"""The PPO and optimizer configs: frozen dataclasses with a docstring per field and checks in ``__post_init__``.

``PPOConfig`` names the pieces a run is built from (the advantage estimator, the policy loss, user loss terms) by
registered name or ``'package.module:function'``; ``PPOConfig.hparams`` holds the values of the array hyperparameters
those pieces declare at registration (``register_estimator(..., hparams={'lam_critic': 0.95})``). Which fields become
arrays in the train state (changeable without recompiling) is ``ppojax.rl.hparams``'s business.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
from collections.abc import Mapping
from typing import Literal, Optional

from ppojax.rl.advantages import get_estimator
from ppojax.rl.kl import KLControlConfig
from ppojax.rl.losses import LOSS_AGGREGATIONS, get_policy_loss, policy_loss_hparams


def bucket_widths(length: int, n: int) -> tuple[int, ...]:
    """``n`` widths spread evenly up to ``length``, ``ceil(length * i / n)`` for i = 1..n, narrowest first and
    without repeats (``ppo.length_buckets``); empty for ``n = 0``."""
    return tuple(sorted({-(-length * i // n) for i in range(1, n + 1)}))


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
    """Stop a response at this token. None: a run on a chat model (its tokenizer has a chat template) stops at the
    tokenizer's EOS, its end of turn (``ppojax.train.run.resolve_built``); otherwise always response_length tokens,
    as lm-human-preferences. -1: never stop early."""
    stop_token_ids: tuple[tuple[int, ...], ...] = ()
    """Stop sequences besides ``eos_token_id``: a response ends after its last tokens equal any of these id
    sequences (the stop tokens stay in the response, as EOS does). ``prompts.stop`` strings add their tokenization."""
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
    length_buckets: int = 0
    """Update only: run each minibatch at the narrowest of this many response widths that holds its longest
    response, so that the epochs of minibatches do not compute on padding. 0 (the default): off, every minibatch
    runs at the full ``response_length``, as before. With N > 0 the widths are ``ceil(response_length * i / N)``
    for i = 1..N, one ``lax.switch`` branch each (one compilation, N copies of the update's forward and backward
    in it), and each epoch's minibatches group responses of similar length: the epoch's random permutation of the
    prompt groups (the same one as with 0) is stably sorted by the group's longest response, cut into minibatches,
    and the order of the minibatches shuffled (with a key folded from the epoch's key: the state's RNG key is used
    exactly as with 0, so resume stays exact either way). The minibatches therefore differ from the padded
    update's; at equal minibatches the loss, gradients, updated params and metrics equal the full-width update's up
    to float rounding (tests/test_bucketed_update.py: N = 1 is that full-width update of the length-grouped
    minibatches). Set it when responses end at very different lengths (EOS, stop sequences, truncation);
    benchmarks/bucketed_update.py measures the gain. A user loss term or policy loss that reads the width of its
    arrays (``inputs.mask.shape[-1]``) sees the trimmed width; the built-ins do not depend on it
    (``seq-mean-token-sum-norm`` divides by the full ``response_length``). Under a vmapped sweep the switch runs
    every branch (vmap turns it into a select): leave it off there."""
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
    (``ppojax.rl.roles.SharedCritic``): params are ``{'actor', 'value_head'}``, one trunk forward gives both the log-probs and
    the values in the rollout and in every update, the value loss trains the policy's trunk too (weighted by
    ``vf_coef``), and no critic copy (weights, gradients, two Adam moments) is held. Needs an estimator with a
    critic (GAE); full fine-tuning only (refused with LoRA roles)."""
    hparams: dict[str, float] = dataclasses.field(default_factory=dict)
    """Values of the array hyperparameters declared by the selected estimator and policy loss, by name;
    unset ones take the declared default (``register_estimator(..., hparams={'lam_critic': 0.95})``). Each is an
    array of the train state: ``set_hparams`` and sweeps (``ppo.hparams.<name>``) change it without recompiling."""

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
        buckets = self.length_buckets
        if not isinstance(buckets, int) or isinstance(buckets, bool) or not 0 <= buckets <= self.response_length:
            raise ValueError(f"ppo.length_buckets must be an int in [0, response_length={self.response_length}] "
                             f"(0: off), got {buckets!r}")
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
        stops = self.stop_token_ids
        if not isinstance(stops, tuple) or not all(
                isinstance(q, tuple) and q and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                   for t in q) for q in stops):
            raise ValueError(f"ppo.stop_token_ids must be a list of non-empty lists of token ids, got {stops!r}")
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
        self._check_hparams(estimator.hparams, policy_loss_hparams(self.policy_loss))
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

    def _check_hparams(self, by_estimator: dict, by_policy_loss: dict) -> None:
        if not isinstance(self.hparams, Mapping):
            raise ValueError(f"ppo.hparams must be a mapping {{name: value}}, got {self.hparams!r}")
        declared = {**by_estimator, **by_policy_loss}
        for name, value in self.hparams.items():
            if name not in declared:
                close = difflib.get_close_matches(str(name), list(declared), n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise ValueError(
                    f"ppo.hparams.{name} is declared by neither this run's estimator nor its policy loss: {hint}"
                    f"(advantage estimator {self.advantage_estimator!r} declares {sorted(by_estimator) or 'none'}, "
                    f"policy loss {self.policy_loss!r} declares {sorted(by_policy_loss) or 'none'})")
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ValueError(f"ppo.hparams.{name} must be a finite number, got {value!r}")

    @property
    def declared_hparams(self) -> dict[str, float]:
        """Every hyperparameter the estimator and the policy loss declare, ``{name: value}``: ``hparams[name]``,
        else the declared default."""
        declared = {**get_estimator(self.advantage_estimator).hparams, **policy_loss_hparams(self.policy_loss)}
        return {name: float(self.hparams.get(name, default)) for name, default in sorted(declared.items())}

    @property
    def prompts_per_iteration(self) -> int:
        """Prompts an iteration takes: ``batch_size / samples_per_prompt``."""
        return self.batch_size // self.samples_per_prompt

    @property
    def num_minibatches(self) -> int:
        return self.batch_size // self.minibatch_size

    @property
    def bucket_widths(self) -> tuple[int, ...]:
        """The response widths the update may run a minibatch at (``length_buckets``), narrowest first; empty when
        off. The last is always ``response_length``."""
        return bucket_widths(self.response_length, self.length_buckets)

    @property
    def updates_per_iteration(self) -> int:
        """Optimizer updates in one iteration: epochs x minibatches."""
        return self.ppo_epochs * self.num_minibatches

