"""ppojax: PPO-RLHF and its relatives (GRPO, RLOO, REINFORCE++) as pure jit-compiled JAX/Flax functions.

The package is arranged by role:

    models/     the model interface and registry (``forward``, ``init_params``...), one folder per family, and LoRA
    generate/   token sampling (``generate``) and chunked token log-probs (``token_logprobs``)
    rl/         the RL pieces, each a plain function behind a registry: advantage estimators, losses, KL control,
                rewards; the configs, the array hyperparameters, the optimizer, the role views, the static setup, the
                train state and the jitted iteration; reward-model training
    parallel/   the device mesh, sharding rules and collectives, multi-process start-up (below the iteration)
    io/         Hugging Face weights and tokenizers, checkpoints, configs, logs, prompt data, atomic writes
    train/      building and driving a run (``ppojax.train.build_run`` -> ``Run.train``), the one training loop, the
                iteration jitted over a mesh, sweeps, the experiment config
    cli.py      the command lines of experiments/ppo_gpt2.py and experiments/sweep.py (argparse only)
    registry.py resolving and checking the user callables a config names (``'package.module:function'``)

``import ppojax`` is cheap: every public name below is imported from its module on first use (PEP 562), so a tool
that only reads configs does not pay for jax.
"""

import importlib as _importlib
import sys as _sys
import types as _types

__version__ = "0.3.0"

# Public name -> the module that defines it.
_PUBLIC = {
    "AdvantageInputs": "ppojax.rl.advantages",
    "CheckpointCorruptError": "ppojax.io.checkpoint",
    "CheckpointError": "ppojax.io.hub",
    "CheckpointMismatchError": "ppojax.io.checkpoint",
    "Checkpointer": "ppojax.io.checkpoint",
    "ExtraLossTerm": "ppojax.rl.config",
    "FunctionReward": "ppojax.rl.rewards",
    "GPT2Config": "ppojax.models",
    "HParams": "ppojax.rl.hparams",
    "HubUnreachableError": "ppojax.io.hub",
    "KLControlConfig": "ppojax.rl.kl",
    "KLState": "ppojax.rl.kl",
    "KVCache": "ppojax.models",
    "LexiconReward": "ppojax.rl.rewards",
    "LlamaConfig": "ppojax.models",
    "LossInputs": "ppojax.rl.losses",
    "LossTerm": "ppojax.rl.losses",
    "ModelFamily": "ppojax.models",
    "OptimizerConfig": "ppojax.rl.config",
    "PPOConfig": "ppojax.rl.config",
    "RewardModel": "ppojax.rl.rewards",
    "Run": "ppojax.train.run",
    "RunError": "ppojax.train.run",
    "Rollout": "ppojax.rl.iteration",
    "SampleOutput": "ppojax.generate.sampling",
    "TokenLogProbs": "ppojax.generate.logprobs",
    "TrainState": "ppojax.rl.state",
    "check_metrics": "ppojax.rl.iteration",
    "combine": "ppojax.rl.losses",
    "compile_count": "ppojax.rl.iteration",
    "build_run": "ppojax.train.run",
    "create_train_state": "ppojax.rl.state",
    "filter_logits": "ppojax.generate.sampling",
    "forward": "ppojax.models",
    "forward_hidden": "ppojax.models",
    "forward_with_cache": "ppojax.models",
    "gae": "ppojax.rl.advantages",
    "generate": "ppojax.generate.sampling",
    "init_cache": "ppojax.models",
    "init_params": "ppojax.models",
    "init_value_params": "ppojax.models",
    "kl_estimate": "ppojax.rl.losses",
    "lexicon_reward": "ppojax.rl.rewards",
    "lexicon_valence_table": "ppojax.rl.rewards",
    "load_pretrained": "ppojax.io.hub",
    "load_tokenizer": "ppojax.io.tokenizer",
    "masked_mean": "ppojax.rl.advantages",
    "ppo_iteration": "ppojax.rl.iteration",
    "register_env": "ppojax.envs",
    "register_estimator": "ppojax.rl.advantages",
    "register_model_family": "ppojax.models",
    "register_policy_loss": "ppojax.rl.losses",
    "register_reward": "ppojax.rl.rewards",
    "register_reward_builder": "ppojax.rl.rewards",
    "register_task": "ppojax.tasks",
    "rollout": "ppojax.rl.iteration",
    "save_pretrained": "ppojax.io.hub",
    "score_rollout": "ppojax.rl.iteration",
    "set_hparams": "ppojax.rl.hparams",
    "token_logprobs": "ppojax.generate.logprobs",
    "train_step": "ppojax.train.loop",
    "unembed": "ppojax.models",
    "update": "ppojax.rl.iteration",
    "value_forward": "ppojax.models",
    "whiten": "ppojax.rl.advantages",
}
# Public names that are modules -> the module.
_PUBLIC_MODULES = {
    "advantages": "ppojax.rl.advantages",
    "distributed": "ppojax.parallel.distributed",
    "envs": "ppojax.envs",
    "kl": "ppojax.rl.kl",
    "losses": "ppojax.rl.losses",
    "models": "ppojax.models",
    "parallel": "ppojax.parallel",
    "preferences": "ppojax.rl.preferences",
    "reward_training": "ppojax.rl.reward_training",
    "rewards": "ppojax.rl.rewards",
    "tasks": "ppojax.tasks",
    "train": "ppojax.train",
}
# Subpackages reachable as attributes too (``ppojax.rl.losses`` after ``import ppojax``).
_SUBPACKAGES = ("cli", "envs", "generate", "io", "models", "parallel", "registry", "rl", "tasks", "train")
# A public function named like a subpackage: importing ``ppojax.generate.sampling`` must not replace the function
# ``ppojax.generate`` (``ppojax.train``, by contrast, is the subpackage: ``ppojax.train.build_run``).
_FUNCTIONS_OVER_PACKAGES = frozenset(n for n in ("generate",) if n in _PUBLIC)

__all__ = sorted([*_PUBLIC, *_PUBLIC_MODULES])


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(_importlib.import_module(_PUBLIC[name]), name)
    elif name in _PUBLIC_MODULES:
        value = _importlib.import_module(_PUBLIC_MODULES[name])
    elif name in _SUBPACKAGES and name not in _PUBLIC:
        value = _importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__) | set(_SUBPACKAGES))


class _Package(_types.ModuleType):
    """The package module: a submodule import does not overwrite a public function of the same name."""

    def __setattr__(self, name, value):
        if name in _FUNCTIONS_OVER_PACKAGES and isinstance(value, _types.ModuleType):
            return
        super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package
