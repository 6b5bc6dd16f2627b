"""Random-init model families by registry name (``model.family``): each family's ``random_config`` hook gives the
config the generic shape fields described before the registry (written out here, field by field), and an unknown
family or a shape a family cannot take is a one-line error."""

import pytest

import ppojax
from ppojax.io import configlib
from ppojax.train.config import ExperimentConfig, ModelConfig, load_config

SHAPE = dict(n_layer=3, n_head=4, n_embd=48, n_positions=40, vocab_size=300, dtype="bfloat16",
             param_dtype="float32", remat=True)


def test_gpt2_by_name_gives_the_same_config_as_before():
    assert ModelConfig(family="gpt2", **SHAPE).random_init_config() == ppojax.GPT2Config(
        vocab_size=300, n_positions=40, n_embd=48, n_layer=3, n_head=4, n_inner=None, dtype="bfloat16",
        param_dtype="float32", remat=True)
    assert ModelConfig(family="gpt2", intermediate_size=100, **SHAPE).random_init_config().n_inner == 100


def test_llama_by_name_gives_the_same_config_as_before():
    expected = ppojax.LlamaConfig(vocab_size=300, max_position_embeddings=40, hidden_size=48, num_hidden_layers=3,
                                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                  intermediate_size=128, dtype="bfloat16", param_dtype="float32", remat=True)
    assert ModelConfig(family="llama", num_key_value_heads=2, **SHAPE).random_init_config() == expected  # 8/3*48
    cfg = ModelConfig(family="llama", intermediate_size=96, **SHAPE).random_init_config()
    assert (cfg.intermediate_size, cfg.num_key_value_heads) == (96, None)
    assert ModelConfig(family="llama", n_embd=50, n_head=5).random_init_config().intermediate_size == 136  # ceil


def test_a_family_registered_by_an_imported_module_is_named_in_yaml():
    cfg, _ = load_config({"imports": ["tests.extensions.bag_lm"], "model": {"family": "bag_lm", "n_embd": 24,
                                                                             "n_positions": 32, "vocab_size": 50}})
    from tests.extensions import bag_lm

    assert cfg.model.random_init_config() == bag_lm.BagLMConfig(vocab_size=50, width=24, max_positions=32)
    with pytest.raises(configlib.ConfigError, match="model: bag_lm has no attention heads or MLP"):
        load_config({"imports": ["tests.extensions.bag_lm"], "model": {"family": "bag_lm", "intermediate_size": 8}})


def test_unknown_family_names_the_closest_registered_one():
    with pytest.raises(configlib.ConfigError) as e:
        configlib.from_dict(ExperimentConfig, {"model": {"family": "lama"}})
    message = str(e.value)
    assert "\n" not in message and message.startswith("model.family='lama': unknown model family; did you mean "
                                                      "'llama'? (registered: ")


def test_kv_heads_for_a_family_without_them_is_one_line():
    with pytest.raises(configlib.ConfigError) as e:
        configlib.from_dict(ExperimentConfig, {"model": {"family": "gpt2", "num_key_value_heads": 2}})
    assert "\n" not in str(e.value) and str(e.value).startswith("model: num_key_value_heads: the gpt2 family has no "
                                                                "grouped-query attention")


def test_a_family_without_a_random_init_says_so():
    from tests.extensions import bag_lm

    name = "bag_lm_no_random_init"
    if name not in ppojax.models.model_families():
        ppojax.models.register_model_family(ppojax.models.ModelFamily(
            name=name, config_type=type("NoRandomConfig", (bag_lm.BagLMConfig,), {}), init_params=bag_lm.init_params,
            hidden=bag_lm.hidden, lm_head=bag_lm.lm_head, init_cache=bag_lm.init_cache))
    with pytest.raises(ValueError, match=f"model.family='{name}': the family has no random init"):
        ModelConfig(family=name)
    assert ModelConfig(family=name, name_or_path="some/checkpoint").family == name  # only a random init needs it
