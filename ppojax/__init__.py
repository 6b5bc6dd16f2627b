"""ppojax: PPO for RLHF of language models, as pure jit-compiled JAX/Flax functions."""

from ppojax.hub import CheckpointError, HubUnreachableError, load_pretrained, save_pretrained
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
from ppojax.sampling import SampleOutput, filter_logits, generate
from ppojax.tokenizer import load_tokenizer

__all__ = [
    "CheckpointError",
    "GPT2Config",
    "HubUnreachableError",
    "KVCache",
    "SampleOutput",
    "filter_logits",
    "forward",
    "forward_with_cache",
    "generate",
    "init_cache",
    "init_params",
    "init_value_params",
    "load_pretrained",
    "load_tokenizer",
    "save_pretrained",
    "value_forward",
]
