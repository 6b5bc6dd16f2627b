"""Llama-style decoders (Llama 1-3, Qwen2, Mistral without a sliding window, SmolLM2): the Flax model, its Hugging
Face key map and its GGUF reader, registered as family ``llama``."""

from ppojax.models.base import ModelFamily, register_model_family
from ppojax.models.llama import convert, gguf, model
from ppojax.models.llama.model import Llama3RopeScaling, LlamaConfig, LlamaTrunk

FAMILY = register_model_family(ModelFamily(
    name="llama",
    config_type=LlamaConfig,
    hf_model_types=("llama", "qwen2", "mistral"),
    init_params=model.init_params,
    hidden=model.hidden,
    lm_head=model.lm_head,
    init_cache=model.init_cache,
    random_config=model.random_config,
    shape_of=model.shape_of,
    hf=convert.CONVERTER,
    gguf=gguf.CONVERTER,
    lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
))

__all__ = ["FAMILY", "Llama3RopeScaling", "LlamaConfig", "LlamaTrunk"]
