"""ppojax: PPO-RLHF and its relatives (GRPO, RLOO, REINFORCE++) as pure jit-compiled JAX/Flax functions.

The package is arranged by role:

    models/     the model interface and registry (``forward``, ``init_params``...), one folder per family
    generate/   token sampling (``generate``) and chunked token log-probs (``token_logprobs``)
    rl/         the RL pieces, each a plain function behind a registry: advantage estimators, losses, KL control,
                rewards; the train state and the jitted iteration; reward-model training
    parallel/   the device mesh, sharding rules and collectives (below the iteration), the iteration jitted over a
                mesh (above it), multi-process start-up
    io/         Hugging Face weights and tokenizers, checkpoints, configs, logs, prompt data, atomic writes
    train/      one training step and loop, the experiment config and the runner behind experiments/ppo_gpt2.py

Modules that used to sit at the top level (``ppojax.ppo``, ``ppojax.state``, ``ppojax.losses``, ...) still import
under those names.
"""

import importlib as _importlib
import sys as _sys

from ppojax import models
from ppojax.generate.logprobs import TokenLogProbs, token_logprobs
from ppojax.generate.sampling import SampleOutput, filter_logits, generate
from ppojax.io.checkpoint import CheckpointCorruptError, Checkpointer, CheckpointMismatchError
from ppojax.io.hub import CheckpointError, HubUnreachableError, load_pretrained, save_pretrained
from ppojax.io.tokenizer import load_tokenizer
from ppojax.models import (
    GPT2Config,
    KVCache,
    LlamaConfig,
    ModelFamily,
    forward,
    forward_hidden,
    forward_with_cache,
    init_cache,
    init_params,
    init_value_params,
    register_model_family,
    unembed,
    value_forward,
)
from ppojax.rl import advantages, kl, losses, preferences, reward_training, rewards
from ppojax.rl.advantages import AdvantageInputs, gae, masked_mean, register_estimator, whiten
from ppojax.rl.iteration import Rollout, check_metrics, compile_count, ppo_iteration, rollout, score_rollout, update
from ppojax.rl.kl import KLControlConfig, KLState
from ppojax.rl.losses import LossInputs, LossTerm, combine, kl_estimate, register_policy_loss
from ppojax.rl.rewards import FunctionReward, LexiconReward, RewardModel, lexicon_reward, lexicon_valence_table
from ppojax.rl.state import (
    ExtraLossTerm,
    HParams,
    OptimizerConfig,
    PPOConfig,
    TrainState,
    create_train_state,
    set_hparams,
)
from ppojax import parallel
from ppojax.parallel import distributed
from ppojax.train.loop import train, train_step

__version__ = "0.2.0"

# Old module paths -> their modules in the role folders (the same module objects: private names come along).
_MOVED = {
    "ppo": "ppojax.rl.iteration",
    "state": "ppojax.rl.state",
    "losses": "ppojax.rl.losses",
    "gae": "ppojax.rl.advantages",
    "kl": "ppojax.rl.kl",
    "rewards": "ppojax.rl.rewards",
    "reward_training": "ppojax.rl.reward_training",
    "preferences": "ppojax.rl.preferences",
    "sampling": "ppojax.generate.sampling",
    "logprobs": "ppojax.generate.logprobs",
    "hub": "ppojax.io.hub",
    "tokenizer": "ppojax.io.tokenizer",
    "checkpoint": "ppojax.io.checkpoint",
    "configlib": "ppojax.io.configlib",
    "logger": "ppojax.io.logger",
    "data": "ppojax.io.data",
    "config": "ppojax.train.config",
    "distributed": "ppojax.parallel.distributed",
}


for _old, _new in _MOVED.items():
    # The same module object under both names; the package attribute keeps its own meaning (``ppojax.gae`` is
    # the function, ``ppojax.kl`` the module), so only names that are free get the module.
    _sys.modules[f"ppojax.{_old}"] = _importlib.import_module(_new)
    if _old not in globals():
        globals()[_old] = _sys.modules[f"ppojax.{_old}"]

__all__ = [
    "AdvantageInputs",
    "CheckpointCorruptError",
    "CheckpointError",
    "CheckpointMismatchError",
    "Checkpointer",
    "ExtraLossTerm",
    "FunctionReward",
    "GPT2Config",
    "HParams",
    "HubUnreachableError",
    "KLControlConfig",
    "KLState",
    "KVCache",
    "LexiconReward",
    "LlamaConfig",
    "LossInputs",
    "LossTerm",
    "ModelFamily",
    "OptimizerConfig",
    "PPOConfig",
    "RewardModel",
    "Rollout",
    "SampleOutput",
    "TokenLogProbs",
    "TrainState",
    "advantages",
    "check_metrics",
    "combine",
    "compile_count",
    "create_train_state",
    "distributed",
    "filter_logits",
    "forward",
    "forward_hidden",
    "forward_with_cache",
    "gae",
    "generate",
    "init_cache",
    "init_params",
    "init_value_params",
    "kl",
    "kl_estimate",
    "lexicon_reward",
    "lexicon_valence_table",
    "load_pretrained",
    "load_tokenizer",
    "losses",
    "masked_mean",
    "models",
    "parallel",
    "ppo_iteration",
    "preferences",
    "register_estimator",
    "register_model_family",
    "register_policy_loss",
    "reward_training",
    "rewards",
    "rollout",
    "save_pretrained",
    "score_rollout",
    "set_hparams",
    "token_logprobs",
    "train",
    "train_step",
    "unembed",
    "update",
    "value_forward",
    "whiten",
]
