"""GPT-2 (Radford et al. 2019): the Flax model and its Hugging Face key map, registered as family ``gpt2``."""

from ppojax.models.base import ModelFamily, register_model_family
from ppojax.models.gpt2 import convert, model
from ppojax.models.gpt2.model import PRESETS, GPT2Config, GPT2LMHeadModel, GPT2Trunk

FAMILY = register_model_family(ModelFamily(
    name="gpt2",
    config_type=GPT2Config,
    hf_model_types=("gpt2",),
    init_params=model.init_params,
    hidden=model.hidden,
    lm_head=model.lm_head,
    init_cache=model.init_cache,
    random_config=model.random_config,
    shape_of=model.shape_of,
    hf=convert.CONVERTER,
    lora_targets=("c_attn", "c_proj", "c_fc", "c_proj_mlp"),
))

__all__ = ["FAMILY", "GPT2Config", "GPT2LMHeadModel", "GPT2Trunk", "PRESETS"]
