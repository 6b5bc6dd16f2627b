"""The experiment config of ``experiments/ppo_gpt2.py``: typed, validated, built from YAML plus ``--set`` overrides.

Every field has a docstring (``python experiments/ppo_gpt2.py --help-config`` prints them all). Unknown keys, wrong
types and bad values are rejected with one message naming the dotted field (and, for a typo, the closest name)
before anything is compiled.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Optional, Union

from ppojax.rl.kl import KLControlConfig
from ppojax.rl.config import OptimizerConfig, PPOConfig

@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """The policy (actor), the reference (a frozen copy) and the critic (same trunk, zero value head)."""

    name_or_path: str = "random"
    """'random' for a random init of the shape below; else a hub id ('gpt2', 'gpt2-medium',
    'HuggingFaceTB/SmolLM2-135M-Instruct', ...), a local transformers directory (GPT-2, Llama, Qwen2, Mistral) or a
    .gguf file."""
    family: str = "gpt2"
    """Random init only: a registered model family ('gpt2', 'llama', or one a module under `imports:` registers);
    a checkpoint's own config.json says which family it is."""
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
    remat: Union[bool, Literal["full", "dots"]] = False
    """Rematerialise the transformer blocks in the backward pass: ``false`` (keep every activation), ``true`` or
    ``full`` (recompute each block: least memory, one more forward), ``dots`` (keep the weight matmuls' outputs and
    recompute the norms, activations and attention scores: about half the activation memory at little compute;
    ``ppojax.models.base.remat_block``)."""

    def __post_init__(self):
        if not self.name_or_path:
            raise ValueError("name_or_path must be 'random', a hub id or a local directory")
        for name in ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_head={self.n_head} must divide n_embd={self.n_embd}")
        if self.num_key_value_heads is not None:
            if self.num_key_value_heads < 1 or self.n_head % self.num_key_value_heads:
                raise ValueError(f"num_key_value_heads={self.num_key_value_heads} must divide n_head={self.n_head}")
        if self.intermediate_size is not None and self.intermediate_size < 1:
            raise ValueError(f"intermediate_size must be >= 1, got {self.intermediate_size}")
        self._family()  # a registered family
        if self.name_or_path == "random":
            self.random_init_config()  # the family takes this shape (e.g. num_key_value_heads only where it has them)

    def _family(self):
        from ppojax.models import model_families

        families = model_families()
        if self.family not in families:
            close = difflib.get_close_matches(self.family, list(families), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"model.family={self.family!r}: unknown model family{hint} (registered: "
                             f"{', '.join(sorted(families))}; a module that registers more is named under imports:)")
        return families[self.family]

    def random_init_config(self):
        """The family's model config for a random init of this shape (``name_or_path: random``), from its
        ``ModelFamily.random_config`` hook. A random Llama ties its LM head to the token embedding (as SmolLM2
        does). Raises ValueError (one line naming the field) for a family without a random init or a shape it
        cannot take."""
        family = self._family()
        if family.random_config is None:
            raise ValueError(f"model.family={self.family!r}: the family has no random init (ModelFamily."
                             "random_config); load a checkpoint with model.name_or_path instead")
        return family.random_config(
            vocab_size=self.vocab_size, n_positions=self.n_positions, n_embd=self.n_embd, n_layer=self.n_layer,
            n_head=self.n_head, num_key_value_heads=self.num_key_value_heads,
            intermediate_size=self.intermediate_size, dtype=self.dtype, param_dtype=self.param_dtype,
            remat=self.remat)


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
    chat: bool = False
    """Render every prompt through the tokenizer's chat template as a user turn, with the assistant's generation
    prompt added (the ids of transformers' ``apply_chat_template(messages, add_generation_prompt=True)``); a
    prompt that is already a list of messages is rendered as it is. Needs a tokenizer with a chat template."""
    system: Optional[str] = None
    """chat: a system message put before every prompt (None: the template's own default, if it has one)."""
    stop: tuple[str, ...] = ()
    """Stop strings: a response ends after any of these (matched on their tokenization, which is added to
    ``ppo.stop_token_ids``), besides the end-of-turn / EOS token."""

    def __post_init__(self):
        if self.max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens must be >= 1, got {self.max_prompt_tokens}")
        if self.path is not None and self.dataset is not None:
            raise ValueError("give either path or dataset, not both")
        if self.system is not None and not self.chat:
            raise ValueError("prompts.system is a chat system message: set prompts.chat: true too")
        if isinstance(self.stop, str) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"prompts.stop must be a list of non-empty strings, got {self.stop!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TaskConfig:
    """What the run trains on and is judged by: a registered task (``ppojax.tasks``; a module under `imports:` may
    register more with ``ppojax.register_task``)."""

    name: str = "sentiment"
    """Built in: 'sentiment' (the prompts: file, scored by reward:), 'arithmetic' (seeded integer problems,
    verified), 'gsm8k' (the GSM8K schema, verified) and 'file' (any prompt file or dataset, with an optional answer
    field)."""
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Keyword arguments of the task's builder (e.g. {digits: 1, operators: '+-'} for arithmetic)."""

    def __post_init__(self):
        from ppojax.tasks import check_task_name

        check_task_name(self.name)


@dataclasses.dataclass(frozen=True, kw_only=True)
class EnvConfig:
    """Multi-turn episodes (``ppojax.train.multiturn``, docs/multi_turn.md): a registered environment
    (``ppojax.envs``; a module under `imports:` may register more with ``ppojax.register_env``) answers each turn of
    the policy. The episode's whole response region (turns, observations between them) is ``ppo.response_length``
    tokens; the prompt is the environment's first observation (at most ``prompts.max_prompt_tokens``)."""

    name: Optional[str] = None
    """Built in: 'calculator' (a tool for the arithmetic task), 'guess' (a guessing game), 'scripted_user' (a dialogue
    with a scripted user). None: single-turn responses (no environment)."""
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Keyword arguments of the environment's factory (one object per episode)."""
    max_turns: int = 4
    """Assistant turns per episode at most (the episode ends earlier when the environment says done)."""
    timeout_s: Optional[float] = 30.0
    """Seconds one reset() or step() call may take (None or 0: no limit); past it the run stops (exit 1), keeping its
    last checkpoint."""
    turn_tokens: int = 32
    """New tokens per assistant turn at most (a turn also ends at EOS or a stop sequence)."""
    observation_tokens: int = 64
    """Tokens of one observation at most, as rendered (the chat template's turn markers included); a longer one
    ends the episode (counted in env/truncated)."""
    credit: Literal["turn", "episode"] = "turn"
    """Where the rewards go: 'turn' at the last token of the turn that earned each one (per-turn credit), 'episode'
    all at the episode's last token."""

    def __post_init__(self):
        from ppojax.envs import check_env_kwargs, get_env

        if self.name is None:
            return
        get_env(self.name)
        if not isinstance(self.kwargs, Mapping):
            raise ValueError(f"kwargs must be a mapping of the environment's arguments, got {self.kwargs!r}")
        check_env_kwargs(self.name, self.kwargs)
        for name in ("max_turns", "turn_tokens", "observation_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.timeout_s is not None and (isinstance(self.timeout_s, bool) or not isinstance(
                self.timeout_s, (int, float)) or self.timeout_s < 0):
            raise ValueError(f"timeout_s must be a number of seconds >= 0 or null, got {self.timeout_s!r}")
        if self.credit not in ("turn", "episode"):
            raise ValueError(f"credit must be 'turn' or 'episode', got {self.credit!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """Evaluation on the task's held-out prompts during training (jitted generation, scored by the run's reward),
    logged as `eval/...` rows of metrics.jsonl, TensorBoard and curves.png."""

    every: int = 0
    """Evaluate every this many iterations, before the first one and after the last (0: never)."""
    num_prompts: int = 64
    """Held-out prompts evaluated (the task holds exactly these out of its training prompts)."""
    greedy: bool = True
    """Greedy decoding; False: sample at `temperature`."""
    samples_per_prompt: int = 1
    """Responses per prompt, k: pass@k and mean@k are reported for k > 1 (sampled, not greedy)."""
    temperature: Optional[float] = None
    """Sampling temperature when not greedy; None: ppo.temperature."""
    batch_size: Optional[int] = None
    """Prompts per generation call (None: ppo.batch_size / ppo.samples_per_prompt)."""
    seed: int = 0
    """Seed of sampled evaluation (the same at every evaluation and on resume)."""

    def __post_init__(self):
        for name in ("every", "num_prompts", "samples_per_prompt"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "every" else 1):
                raise ValueError(f"{name} must be an int >= {0 if name == 'every' else 1}, got {value!r}")
        if self.greedy and self.samples_per_prompt > 1:
            raise ValueError("eval.samples_per_prompt > 1 samples: set eval.greedy: false (greedy responses to one "
                             "prompt are all the same)")
        if self.temperature is not None and not (isinstance(self.temperature, (int, float)) and
                                                 self.temperature > 0):
            raise ValueError(f"temperature must be > 0 (greedy: eval.greedy: true), got {self.temperature!r}")
        if self.batch_size is not None and (isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int)
                                            or self.batch_size < 1):
            raise ValueError(f"batch_size must be an int >= 1, got {self.batch_size!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RewardConfig:
    """What scores a finished response: a reward registered by name (``ppojax.rl.rewards``)."""

    kind: Optional[str] = None
    """A registered reward; None: the task's (a verifiable task's `exact_answer`), else 'lexicon'. Built in: 'lexicon' (jittable per-token VADER valence, mean over the response), 'vader'
    (VADER on decoded text, on the host between rollout and update), 'reward_model' (a reward model checkpoint),
    'function' (`function`, jittable) and 'host_function' (`function`, on decoded text). A module listed under
    `imports:` may register more (`ppojax.register_reward`)."""
    function: Optional[str] = None
    """kind=function: 'package.module:function', a jittable (tokens, mask) -> scores [batch] float32;
    kind=host_function: 'package.module:function', a host (responses: list[str]) -> [batch] numbers (with a
    parameter named `prompts`, it gets the decoded prompts too)."""
    reward_model_path: Optional[str] = None
    """kind=reward_model: a directory written by experiments/train_reward.py (relative: next to the config file,
    then the working directory)."""
    lexicon_reduce: Literal["mean", "sum"] = "mean"
    """kind=lexicon: average or sum the per-token valences over the response."""
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Keyword arguments bound to a registered or `function` reward when it is built (e.g. {word: great})."""
    timeout_s: Optional[float] = 600.0
    """A host reward's call (kind=vader, host_function, or a registered host reward) that takes longer than this
    many seconds stops the run: one error line naming the reward and the iteration, exit code 1, the last good
    checkpoint kept. null or 0: no limit. SIGTERM/SIGINT abandon a call still running 5 s after the signal."""

    def __post_init__(self):
        from ppojax.rl.rewards import check_reward_config

        t = self.timeout_s
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not t >= 0
                              or t == float("inf")):
            raise ValueError(f"reward.timeout_s must be a number of seconds >= 0 (0 or null: no limit), got {t!r}")

        if self.kind is not None:
            check_reward_config(self)  # a registered kind, and what its builder needs is set


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
    task: TaskConfig = dataclasses.field(default_factory=TaskConfig)
    """The task: training prompts, held-out prompts and the reward it verifies with."""
    prompts: PromptsConfig = dataclasses.field(default_factory=PromptsConfig)
    """Prompt data and rendering (plain text or the chat template)."""
    reward: RewardConfig = dataclasses.field(default_factory=RewardConfig)
    """The reward."""
    ppo: PPOConfig = dataclasses.field(default_factory=PPOConfig)
    """PPO hyperparameters, KL control and extra loss terms."""
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    """Optimizer."""
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    """Checkpointing."""
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    """Held-out evaluation during training."""
    env: EnvConfig = dataclasses.field(default_factory=EnvConfig)
    """Multi-turn episodes against an environment (name: null: single-turn responses)."""
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)
    """Logging."""
    export: bool = True
    """Export the final policy in Hugging Face format to `<run-dir>/export`."""
    mesh: Optional[str] = None
    """Device mesh, e.g. 'data=4,fsdp=2' (the --mesh flag wins); None: every device on the data axis. A run may
    resume on another mesh: checkpoints restore into any sharding."""
    imports: tuple[str, ...] = ()
    """Python modules imported before the rest of the config is read (`load_config`; the command line's --import adds
    more), so that what they register (a reward, an advantage estimator, a model family) can be named here and in
    --set. Looked up on sys.path, next to the config file and in the working directory."""

    def __post_init__(self):
        if self.iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {self.iterations}")
        env = self.env
        if env.name is not None:
            bad = [(key, why) for key, on, why in (
                ("ppo.truncate_token", self.ppo.truncate_token is not None, "truncation applies to one response"),
                ("reward.kind", self.reward.kind is not None, "the environment's step() rewards the episode"),
                ("ppo.length_buckets", bool(self.ppo.length_buckets), "not built for multi-turn episodes yet"),
            ) if on]
            if bad:
                raise ValueError(f"{bad[0][0]} cannot be combined with env.name={env.name!r}: {bad[0][1]}")
            if env.turn_tokens > self.ppo.response_length:
                raise ValueError(f"env.turn_tokens={env.turn_tokens} exceeds ppo.response_length="
                                 f"{self.ppo.response_length}, the episode's whole response region (turns and "
                                 "observations)")


def load_config(source: str | os.PathLike | Mapping[str, Any], overrides: Sequence[str] = (),
                imports: Sequence[str] = ()) -> tuple[ExperimentConfig, Optional[Path]]:
    """``(ExperimentConfig, config_dir)`` from a YAML file (or a mapping of its contents), ``a.b=value`` overrides
    and extra modules to import (the command line's ``--import``), in this order:

    1. read the YAML; 2. apply the overrides (each path must name a field); 3. import the modules of its
    ``imports`` (after overrides) and then ``imports``, looked up on sys.path, next to the config file and in the
    working directory (``configlib.import_modules``), so that what they register can be named; 4. build and check
    the dataclass. The config's ``imports`` holds both lists (extras not already listed are appended), so the saved
    config of a run reimports them by itself.

    ``config_dir`` is the YAML file's directory (relative paths in the config are looked up there first), None for
    a mapping. Every failure is a ``configlib.ConfigError`` (a ValueError) with one line naming the key.
    """
    from ppojax.io import configlib

    if isinstance(source, Mapping):
        data, config_dir = dict(source), None
    else:
        path = Path(source)
        data, config_dir = configlib.load_yaml(path), path.resolve().parent
    data = configlib.apply_overrides(data, overrides, ExperimentConfig)
    listed = data.get("imports") or []
    if not isinstance(listed, (list, tuple)):
        raise configlib.ConfigError(f"imports: expected a list of module names, got {listed!r}")
    if isinstance(imports, str):
        raise TypeError("imports must be a sequence of module names, not one string")
    names = list(listed) + [name for name in imports if name not in listed]
    configlib.import_modules(names, search_dirs=[d for d in (config_dir, Path.cwd()) if d is not None])
    if names:
        data["imports"] = names
    return configlib.from_dict(ExperimentConfig, data), config_dir


__all__ = [
    "CheckpointConfig",
    "EnvConfig",
    "EvalConfig",
    "ExperimentConfig",
    "KLControlConfig",
    "LoggingConfig",
    "LoraConfig",
    "ModelConfig",
    "OptimizerConfig",
    "PPOConfig",
    "PromptsConfig",
    "RewardConfig",
    "TaskConfig",
    "load_config",
]
