"""The experiment config of ``experiments/ppo_gpt2.py``: typed, validated, built from YAML plus ``--set`` overrides.

Every field has a docstring (``python experiments/ppo_gpt2.py --help-config`` prints them all). Unknown keys, wrong
types and bad values are rejected with one message naming the dotted field (and, for a typo, the closest name)
before anything is compiled.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional

from ppojax.rl.kl import KLControlConfig
from ppojax.rl.config import OptimizerConfig, PPOConfig

@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """The policy (actor), the reference (a frozen copy) and the critic (same trunk, zero value head)."""

    name_or_path: str = "random"
    """'random' for a random init of the shape below; else a hub id ('gpt2', 'gpt2-medium',
    'HuggingFaceTB/SmolLM2-135M-Instruct', ...), a local transformers directory (GPT-2, Llama, Qwen2, Mistral) or a
    .gguf file."""
    family: Literal["gpt2", "llama"] = "gpt2"
    """Random init only: the model family (a checkpoint's own config.json says which family it is)."""
    n_layer: int = 2
    """Random init only: transformer blocks."""
    n_head: int = 4
    """Random init only: attention heads."""
    n_embd: int = 128
    """Random init only: width."""
    n_positions: int = 128
    """Random init only: context length."""
    vocab_size: int = 50257
    """Random init only: vocabulary (GPT-2's is 50257)."""
    num_key_value_heads: Optional[int] = None
    """Random init only, llama: key/value heads of grouped-query attention (must divide n_head); None: n_head."""
    intermediate_size: Optional[int] = None
    """Random init only: MLP hidden width; None: 4 * n_embd for gpt2, 8/3 * n_embd rounded up to a multiple of 8 for
    llama (its SwiGLU MLP then has about the parameters of a 4 * n_embd one)."""
    init_seed: int = 0
    """Random init only: seed of the initial weights (independent of the run's seed)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Compute dtype."""
    param_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Storage dtype of the parameters."""
    remat: bool = False
    """Rematerialise transformer blocks in the backward pass (less memory, more compute)."""

    def __post_init__(self):
        if not self.name_or_path:
            raise ValueError("name_or_path must be 'random', a hub id or a local directory")
        for name in ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_head={self.n_head} must divide n_embd={self.n_embd}")
        if self.num_key_value_heads is not None:
            if self.family != "llama":
                raise ValueError("num_key_value_heads is a field of the llama family; set family: llama")
            if self.num_key_value_heads < 1 or self.n_head % self.num_key_value_heads:
                raise ValueError(f"num_key_value_heads={self.num_key_value_heads} must divide n_head={self.n_head}")
        if self.intermediate_size is not None and self.intermediate_size < 1:
            raise ValueError(f"intermediate_size must be >= 1, got {self.intermediate_size}")

    def random_init_config(self):
        """The family's model config for a random init of this shape (``name_or_path: random``). A random Llama
        ties its LM head to the token embedding (as SmolLM2 does)."""
        from ppojax.models import GPT2Config, LlamaConfig

        numerics = dict(dtype=self.dtype, param_dtype=self.param_dtype, remat=self.remat)
        if self.family == "gpt2":
            return GPT2Config(vocab_size=self.vocab_size, n_positions=self.n_positions, n_embd=self.n_embd,
                              n_layer=self.n_layer, n_head=self.n_head, n_inner=self.intermediate_size, **numerics)
        return LlamaConfig(vocab_size=self.vocab_size, max_position_embeddings=self.n_positions,
                           hidden_size=self.n_embd, num_hidden_layers=self.n_layer, num_attention_heads=self.n_head,
                           num_key_value_heads=self.num_key_value_heads, tie_word_embeddings=True,
                           intermediate_size=self.intermediate_size or -(-self.n_embd // 3) * 8, **numerics)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraConfig:
    """LoRA adapters over one frozen base (`ppojax.models.lora`): each adapted kernel is W + alpha/rank · A B, and only
    the adapters (and the value head) train."""

    rank: int = 0
    """Rank r of every adapter; 0 turns LoRA off (every weight trains)."""
    alpha: float = 16.0
    """PEFT's lora_alpha: the update A B is scaled by alpha / rank."""
    targets: tuple[str, ...] | str = ()
    """Projection modules to adapt, by the model family's names (GPT-2: c_attn, c_proj, c_fc, c_proj_mlp); a list or
    one comma-separated string. Empty: all of them."""

    def __post_init__(self):
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 0:
            raise ValueError(f"rank must be an int >= 0 (0: LoRA off), got {self.rank!r}")
        alpha = self.alpha
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < float("inf"):
            raise ValueError(f"alpha must be a finite number > 0, got {self.alpha!r}")
        names = self.targets.split(",") if isinstance(self.targets, str) else self.targets
        if not all(isinstance(t, str) and t.strip() for t in names):
            raise ValueError(f"targets must be non-empty module names, got {self.targets!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PromptsConfig:
    """Where prompts come from and how they become left-padded token ids."""

    path: Optional[str] = None
    """A text file (one prompt per line) or a .jsonl file (one object per line with `field`). Relative paths are
    looked up next to the config file, then in the working directory."""
    field: str = "prompt"
    """JSONL / dataset field holding the prompt text."""
    dataset: Optional[str] = None
    """A Hugging Face dataset id instead of a file (needs the `datasets` package and hub access)."""
    split: str = "train"
    """Dataset split."""
    max_prompt_tokens: int = 64
    """Query length: prompts are left-padded to this many tokens (lm-human-preferences: 64)."""
    truncate: Literal["left", "error"] = "left"
    """A longer prompt keeps its last tokens ('left') or stops the run with an error naming it ('error')."""
    shuffle: bool = True
    """Reshuffle the prompts every pass (seeded: a resumed run sees the same order)."""

    def __post_init__(self):
        if self.max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens must be >= 1, got {self.max_prompt_tokens}")
        if self.path is not None and self.dataset is not None:
            raise ValueError("give either path or dataset, not both")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RewardConfig:
    """What scores a finished response."""

    kind: Literal["lexicon", "vader", "reward_model", "function"] = "lexicon"
    """'lexicon': jittable per-token VADER valence (mean over the response); 'vader': VADER on decoded text, on the
    host between rollout and update; 'reward_model': a GPT-2 reward model checkpoint; 'function': `function`."""
    function: Optional[str] = None
    """kind=function: 'package.module:function', a jittable (tokens, mask) -> scores [batch]."""
    reward_model_path: Optional[str] = None
    """kind=reward_model: a directory written by experiments/train_reward.py."""
    lexicon_reduce: Literal["mean", "sum"] = "mean"
    """kind=lexicon: average or sum the per-token valences over the response."""

    def __post_init__(self):
        if self.kind == "function" and not self.function:
            raise ValueError("kind 'function' needs reward.function = 'package.module:function'")
        if self.kind == "reward_model" and not self.reward_model_path:
            raise ValueError("kind 'reward_model' needs reward.reward_model_path")


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    """Orbax checkpoints under `<run-dir>/checkpoints`."""

    every: int = 50
    """Save every this many iterations (and always at the end and on SIGTERM/SIGINT)."""
    keep: int = 3
    """Keep the last this many checkpoints."""

    def __post_init__(self):
        if self.every < 1 or self.keep < 1:
            raise ValueError(f"every and keep must be >= 1, got every={self.every}, keep={self.keep}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoggingConfig:
    """What the run reports, besides metrics.jsonl (always written)."""

    samples_every: int = 10
    """Write a table of samples every this many iterations (0: never)."""
    num_samples: int = 8
    """Rows per sample table."""
    tensorboard: bool = True
    """TensorBoard event files under `<run-dir>/tensorboard`."""
    wandb_project: Optional[str] = None
    """Log to Weights & Biases under this project (when `wandb` is installed)."""
    console_every: int = 1
    """Without a terminal, print one progress line every this many iterations."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExperimentConfig:
    """A PPO-RLHF run of `experiments/ppo_gpt2.py`."""

    seed: int = 0
    """Seed of sampling, shuffling and the data order."""
    iterations: int = 100
    """Total PPO iterations of the run (a resumed run counts those already done)."""
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    """The policy model."""
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
    """LoRA adapters over the frozen model instead of fine-tuning every weight (rank 0: off)."""
    tokenizer: str = "gpt2"
    """Tokenizer hub id or local directory ('gpt2' works offline)."""
    prompts: PromptsConfig = dataclasses.field(default_factory=PromptsConfig)
    """Prompt data."""
    reward: RewardConfig = dataclasses.field(default_factory=RewardConfig)
    """The reward."""
    ppo: PPOConfig = dataclasses.field(default_factory=PPOConfig)
    """PPO hyperparameters, KL control and extra loss terms."""
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    """Optimizer."""
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    """Checkpointing."""
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)
    """Logging."""
    export: bool = True
    """Export the final policy in Hugging Face format to `<run-dir>/export`."""
    mesh: Optional[str] = None
    """Device mesh, e.g. 'data=4,fsdp=2' (the --mesh flag wins); None: every device on the data axis. A run may
    resume on another mesh: checkpoints restore into any sharding."""

    def __post_init__(self):
        if self.iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {self.iterations}")


__all__ = [
    "CheckpointConfig",
    "ExperimentConfig",
    "KLControlConfig",
    "LoggingConfig",
    "LoraConfig",
    "ModelConfig",
    "OptimizerConfig",
    "PPOConfig",
    "PromptsConfig",
    "RewardConfig",
]
