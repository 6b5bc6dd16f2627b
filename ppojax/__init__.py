"""ppojax: PPO for RLHF of language models, as pure jit-compiled JAX/Flax functions.

The model (``GPT2Config``, ``forward``, ``generate``), Hugging Face weights in and out (``load_pretrained``,
``save_pretrained``), the RL pieces (``gae``, ``whiten``, loss terms in ``ppojax.losses``, KL control in
``ppojax.kl``, rewards in ``ppojax.rewards``) and the iteration (``create_train_state``, ``ppo_iteration``).
"""

from ppojax import distributed, kl, losses, parallel, preferences, reward_training, rewards
from ppojax.checkpoint import CheckpointCorruptError, Checkpointer, CheckpointMismatchError
from ppojax.gae import gae, masked_mean, whiten
from ppojax.hub import CheckpointError, HubUnreachableError, load_pretrained, save_pretrained
from ppojax.kl import KLControlConfig, KLState
from ppojax.logprobs import TokenLogProbs, token_logprobs
from ppojax.losses import LossInputs, LossTerm, combine, kl_estimate
from ppojax.models.gpt2 import (
    GPT2Config,
    KVCache,
    forward,
    forward_with_cache,
    init_cache,
    init_params,
    init_value_params,
    value_forward,
)
from ppojax.ppo import Rollout, check_metrics, ppo_iteration, rollout, update
from ppojax.rewards import FunctionReward, LexiconReward, RewardModel, lexicon_reward, lexicon_valence_table
from ppojax.sampling import SampleOutput, filter_logits, generate
from ppojax.state import ExtraLossTerm, OptimizerConfig, PPOConfig, TrainState, create_train_state
from ppojax.tokenizer import load_tokenizer

__version__ = "0.1.0"

__all__ = [
    "CheckpointCorruptError",
    "CheckpointError",
    "CheckpointMismatchError",
    "Checkpointer",
    "ExtraLossTerm",
    "FunctionReward",
    "GPT2Config",
    "HubUnreachableError",
    "KLControlConfig",
    "KLState",
    "KVCache",
    "LexiconReward",
    "LossInputs",
    "LossTerm",
    "OptimizerConfig",
    "PPOConfig",
    "RewardModel",
    "Rollout",
    "SampleOutput",
    "TokenLogProbs",
    "TrainState",
    "check_metrics",
    "combine",
    "create_train_state",
    "filter_logits",
    "forward",
    "forward_with_cache",
    "gae",
    "generate",
    "init_cache",
    "init_params",
    "init_value_params",
    "distributed",
    "kl",
    "kl_estimate",
    "lexicon_reward",
    "lexicon_valence_table",
    "load_pretrained",
    "load_tokenizer",
    "losses",
    "masked_mean",
    "parallel",
    "preferences",
    "reward_training",
    "ppo_iteration",
    "rewards",
    "rollout",
    "save_pretrained",
    "token_logprobs",
    "update",
    "value_forward",
    "whiten",
]
