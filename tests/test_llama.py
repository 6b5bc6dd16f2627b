"""The Flax Llama family (Llama, Qwen2, Mistral) against transformers' PyTorch models, its checkpoints in and out, and
PPO / reward-model training on a tiny Llama."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

import ppojax
from ppojax.rl import preferences, reward_training, rewards

VOCAB = 101
BASE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=48, initializer_range=0.2, bos_token_id=1,
            eos_token_id=2)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8}
# name -> (transformers class, config overrides). Each exercises one feature against transformers' own code.
KINDS = {
    "llama_gqa": (transformers.LlamaForCausalLM, {}),
    "llama_tied": (transformers.LlamaForCausalLM, dict(tie_word_embeddings=True, num_key_value_heads=4)),
    "llama_biases_mqa": (transformers.LlamaForCausalLM, dict(attention_bias=True, mlp_bias=True,
                                                             num_key_value_heads=1)),
    "llama_head_dim": (transformers.LlamaForCausalLM, dict(head_dim=12)),
    # theta 50 with an original context of 8: every frequency band of the llama3 rule is hit by positions < 9.
    "llama3_rope": (transformers.LlamaForCausalLM, dict(rope_theta=50.0, rope_scaling=LLAMA3)),
    "qwen2": (transformers.Qwen2ForCausalLM, {}),
    "mistral": (transformers.MistralForCausalLM, dict(sliding_window=None)),
}


def _hf_model(kind, seed=0):
    cls, overrides = KINDS[kind]
    config_cls = {transformers.LlamaForCausalLM: transformers.LlamaConfig,
                  transformers.Qwen2ForCausalLM: transformers.Qwen2Config,
                  transformers.MistralForCausalLM: transformers.MistralConfig}[cls]
    torch.manual_seed(seed)
    model = cls(config_cls(**{**BASE, **overrides})).eval()
    with torch.no_grad():  # transformers initialises norms to 1 and biases to 0: perturb them so they are tested
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """kind -> (directory written by transformers' save_pretrained, the torch model)."""
    out = {}
    for kind in KINDS:
        model = _hf_model(kind)
        path = tmp_path_factory.mktemp(kind)
        model.save_pretrained(path)
        out[kind] = (path, model)
    return out


@pytest.fixture
def batch():
    """Three prompts of lengths 9, 6 and 3, left-padded to 9 with pad id VOCAB (outside the vocabulary)."""
    rng = np.random.RandomState(0)
    ids = np.full((3, 9), VOCAB, np.int64)
    mask = np.zeros((3, 9), np.int64)
    for b, n in enumerate([9, 6, 3]):
        ids[b, 9 - n:] = rng.randint(0, VOCAB, n)
        mask[b, 9 - n:] = 1
    return ids, mask


def _torch_logits(model, ids, mask):
    positions = np.maximum(mask.cumsum(-1) - 1, 0)
    with torch.no_grad():
        return model(input_ids=torch.tensor(np.where(mask > 0, ids, 0)), attention_mask=torch.tensor(mask),
                     position_ids=torch.tensor(positions)).logits.numpy()


def _logits(config, params, ids, mask):
    return np.asarray(jax.jit(ppojax.forward, static_argnums=0)(config, params, jnp.asarray(ids), jnp.asarray(mask)))


@pytest.mark.parametrize("kind", list(KINDS))
def test_logits_match_transformers_on_left_padded_batch(kind, hf_dirs, batch):
    path, model = hf_dirs[kind]
    ids, mask = batch
    config, params = ppojax.load_pretrained(path)
    assert isinstance(config, ppojax.LlamaConfig) and config.model_type == model.config.model_type
    ours, ref = _logits(config, params, ids, mask), _torch_logits(model, ids, mask)
    real = mask > 0
    assert ours.dtype == np.float32 and ours.shape == (3, 9, VOCAB)
    assert np.abs(ours - ref)[real].max() <= 1e-4
    assert ref[real].std() > 0.1  # not trivially small


def test_llama3_rope_scaling_is_what_makes_the_match(hf_dirs, batch):
    """Without the llama3 frequency scaling the same weights give clearly different logits (the parity above is not
    blind to it)."""
    path, model = hf_dirs["llama3_rope"]
    ids, mask = batch
    config, params = ppojax.load_pretrained(path)
    assert config.rope_scaling == ppojax.models.llama.Llama3RopeScaling(
        factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8)
    plain = _logits(config.replace(rope_scaling=None), params, ids, mask)
    assert np.abs(plain - _torch_logits(model, ids, mask))[mask > 0].max() > 1e-2


@pytest.mark.parametrize("kind", ["llama_gqa", "qwen2", "llama_tied"])
def test_greedy_generation_matches_transformers(kind, hf_dirs, batch):
    path, model = hf_dirs[kind]
    ids, mask = batch
    config, params = ppojax.load_pretrained(path)
    out = ppojax.generate(config, params, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(0), max_new_tokens=8,
                          temperature=0)
    model.generation_config.eos_token_id = None  # both sides generate exactly 8 tokens
    model.generation_config.pad_token_id = 0
    with torch.no_grad():
        ref = model.generate(input_ids=torch.tensor(np.where(mask > 0, ids, 0)), attention_mask=torch.tensor(mask),
                             do_sample=False, max_new_tokens=8)[:, ids.shape[1]:].numpy()
    np.testing.assert_array_equal(np.asarray(out.tokens), ref)


def test_cached_decoding_equals_full_forward_at_every_step(hf_dirs, batch):
    ids, mask = batch
    config, params = ppojax.load_pretrained(hf_dirs["llama_biases_mqa"][0])
    full = _logits(config, params, ids, mask)
    cache = ppojax.init_cache(config, 3, ids.shape[1])
    assert cache.key.shape == (2, 3, 1, 9, 8)  # [n_layer, batch, kv_heads, max_len, head_dim]: kv heads only
    step = jax.jit(ppojax.forward_with_cache, static_argnums=0)
    logits, cache = step(config, params, jnp.asarray(ids[:, :5]), jnp.asarray(mask[:, :5]), cache)
    real = mask[:, :5] > 0
    np.testing.assert_allclose(np.asarray(logits)[real], full[:, :5][real], atol=1e-5)
    for t in range(5, ids.shape[1]):
        logits, cache = step(config, params, jnp.asarray(ids[:, t:t + 1]), jnp.asarray(mask[:, t:t + 1]), cache)
        real = mask[:, t] > 0
        np.testing.assert_allclose(np.asarray(logits)[real, 0], full[real, t], atol=1e-5, err_msg=f"step {t}")


def test_pad_id_outside_vocabulary_is_harmless(hf_dirs, batch):
    ids, mask = batch
    config, params = ppojax.load_pretrained(hf_dirs["qwen2"][0])
    a = _logits(config, params, ids, mask)
    b = _logits(config, params, np.where(mask > 0, ids, 10**6), mask)
    np.testing.assert_array_equal(a[mask > 0], b[mask > 0])


@pytest.mark.parametrize("kind", ["llama_gqa", "llama_tied", "qwen2", "llama3_rope", "llama_biases_mqa"])
def test_save_pretrained_round_trip_in_transformers(kind, hf_dirs, batch, tmp_path):
    ids, mask = batch
    config, params = ppojax.load_pretrained(hf_dirs[kind][0])
    # Perturb so the round trip cannot pass by reloading the original file.
    params = jax.tree.map(lambda x: x + 0.01 * jnp.sin(jnp.arange(x.size).reshape(x.shape)), params)
    out = ppojax.save_pretrained(tmp_path / "export", config, params)
    exported = json.loads((out / "config.json").read_text())
    assert exported["model_type"] == config.model_type
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(model) is KINDS[kind][0]
    ours = _logits(config, params, ids, mask)
    np.testing.assert_allclose(_torch_logits(model, ids, mask)[mask > 0], ours[mask > 0], atol=1e-4)
    config2, params2 = ppojax.load_pretrained(out)
    assert config2 == config
    jax.tree.map(np.testing.assert_array_equal, params, params2)


def test_sharded_checkpoint_loads(tmp_path, batch):
    model = _hf_model("llama_gqa", seed=3)
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    shards = sorted(p.name for p in tmp_path.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").exists()
    ids, mask = batch
    config, params = ppojax.load_pretrained(tmp_path)
    np.testing.assert_allclose(_logits(config, params, ids, mask)[mask > 0], _torch_logits(model, ids, mask)[mask > 0],
                               atol=1e-4)


def test_bf16_compute_is_close_and_remat_is_exact(hf_dirs, batch):
    ids, mask = batch
    config, params = ppojax.load_pretrained(hf_dirs["llama_gqa"][0])
    ref = _logits(config, params, ids, mask)
    bf16 = _logits(config.replace(dtype="bfloat16"), params, ids, mask)
    assert bf16.dtype == np.float32  # logits stay float32 whatever the compute dtype
    err = np.abs(bf16 - ref)[mask > 0]
    assert np.isfinite(err).all() and 0 < err.max() < 0.1 * np.abs(ref[mask > 0]).max()

    def loss(p, cfg):
        return ppojax.forward(cfg, p, jnp.asarray(ids), jnp.asarray(mask)).mean()

    g1 = jax.grad(loss)(params, config)
    g2 = jax.grad(loss)(params, config.replace(remat=True))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g1, g2)


def test_init_params_shapes_and_lm_head():
    config = ppojax.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=3,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16)
    params = ppojax.init_params(config, jax.random.key(0))
    layers = params["transformer"]["layers"]
    assert layers["q_proj"]["kernel"].shape == (3, 32, 32) and layers["k_proj"]["kernel"].shape == (3, 32, 16)
    assert layers["down_proj"]["kernel"].shape == (3, 40, 32)
    assert ppojax.models.lm_head(config, params).shape == (64, 32)
    tied = config.replace(tie_word_embeddings=True)
    tied_params = ppojax.init_params(tied, jax.random.key(0))
    assert "lm_head" not in tied_params
    assert ppojax.models.lm_head(tied, tied_params) is tied_params["transformer"]["embed_tokens"]["embedding"]
    assert ppojax.models.get_family("llama").lora_targets == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                              "up_proj", "down_proj")
    assert set(ppojax.models.get_family("llama").lora_targets) <= set(layers)


def test_value_params_of_an_untied_model_export_and_reload(hf_dirs, tmp_path):
    config, params = ppojax.load_pretrained(hf_dirs["llama_gqa"][0])
    out = ppojax.save_pretrained(tmp_path / "critic", config, ppojax.init_value_params(config, params))
    _, reloaded = ppojax.load_pretrained(out)
    jax.tree.map(np.testing.assert_array_equal, params["transformer"], reloaded["transformer"])


def test_lora_adapter_loads_in_peft_with_the_same_logits(hf_dirs, batch, tmp_path):
    """The family's LoRA targets and PEFT module names: ppojax's merged model equals PEFT's adapted transformers
    model."""
    peft = pytest.importorskip("peft")
    from ppojax.models import lora

    path, _ = hf_dirs["llama_biases_mqa"]
    config, params = ppojax.load_pretrained(path)
    spec = lora.LoraSpec(rank=2, alpha=4.0, targets=ppojax.models.get_family("llama").lora_targets)
    adapters = spec.init_adapters(config, params, jax.random.key(0))
    adapters = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(1), x.shape), adapters)  # B != 0
    out = lora.save_adapter(tmp_path / "adapter", config, adapters, spec)
    adapted = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(path), out).eval()
    ids, mask = batch
    ours = _logits(config, spec.merge(params, adapters), ids, mask)
    assert np.abs(ours - _logits(config, params, ids, mask))[mask > 0].max() > 1e-2  # the adapters do something
    np.testing.assert_allclose(ours[mask > 0], _torch_logits(adapted, ids, mask)[mask > 0], atol=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# Training on a tiny Llama

TINY = ppojax.LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)


def test_one_ppo_iteration_on_a_tiny_llama():
    def low_tokens(tokens, mask):
        return ((tokens < 8) & (mask > 0)).sum(-1).astype(jnp.float32) / jnp.maximum(mask.sum(-1), 1)

    params = ppojax.init_params(TINY, jax.random.key(0))
    ppo = ppojax.PPOConfig(batch_size=16, minibatch_size=8, ppo_epochs=2, response_length=6, temperature=1.0,
                           kl=ppojax.KLControlConfig(kind="fixed", init_coef=0.05))
    state = ppojax.create_train_state(TINY, params, ppo=ppo, reward=ppojax.FunctionReward(low_tokens),
                                      key=jax.random.key(1), optimizer=ppojax.OptimizerConfig(learning_rate=1e-3))
    rng = np.random.RandomState(0)
    prompt_ids = rng.randint(0, 48, (16, 5)).astype(np.int32)
    prompt_mask = np.ones_like(prompt_ids)
    prompt_mask[::2, :2] = 0
    prompt_ids[prompt_mask == 0] = 48  # pad id outside the vocabulary
    new_state, metrics = ppojax.ppo_iteration(state, jnp.asarray(prompt_ids), jnp.asarray(prompt_mask))
    metrics = jax.device_get(metrics)
    assert all(np.isfinite(v).all() for v in metrics.values())
    assert metrics["first_minibatch/approx_kl"] < 1e-10  # rollout and update share one forward path
    before = jax.tree.leaves(state.params)
    after = jax.tree.leaves(new_state.params)
    assert any(not np.array_equal(a, b) for a, b in zip(before, after))


def test_one_reward_model_epoch_on_a_tiny_llama():
    rng = np.random.default_rng(0)
    n, k, q, r = 8, 2, 4, 5
    tokens = rng.integers(0, 48, (n, k, r)).astype(np.int32)
    mask = np.ones((n, k, r), np.int32)
    q_mask = np.ones((n, q), np.int32)
    q_mask[::2, 0] = 0
    q_ids = np.where(q_mask > 0, rng.integers(0, 48, (n, q)), 48).astype(np.int32)
    data = preferences.PreferenceBatch(query_ids=q_ids, query_mask=q_mask, tokens=tokens, mask=mask,
                                       choice=rng.integers(0, k, n))
    cfg = reward_training.RewardTrainConfig(epochs=1, batch_size=4, learning_rate=1e-3)
    lm = ppojax.init_params(TINY, jax.random.key(0))
    state = reward_training.create_reward_train_state(TINY, lm, cfg, key=jax.random.key(1))
    assert state.params["head"]["kernel"].shape == (32, 1)
    new_state, metrics = reward_training.train_epoch(state, jax.tree.map(jnp.asarray, data), batch_size=4)
    assert int(new_state.step) == 2 and np.isfinite(float(metrics["loss"]))
    assert not np.array_equal(new_state.params["head"]["kernel"], state.params["head"]["kernel"])
    rm = rewards.reward_model(TINY, new_state.params)
    scores = rm(jnp.concatenate([q_ids, tokens[:, 0]], 1), jnp.concatenate([q_mask, mask[:, 0]], 1))
    assert scores.shape == (n,) and np.isfinite(np.asarray(scores)).all()


def test_runner_builds_a_random_llama():
    from ppojax.train import config as train_config
    from ppojax.train import run as runner

    cfg = train_config.ExperimentConfig(model=train_config.ModelConfig(
        family="llama", n_layer=1, n_head=4, num_key_value_heads=2, n_embd=32, n_positions=16, vocab_size=64))
    config, params = runner.build_model(cfg)
    assert isinstance(config, ppojax.LlamaConfig)
    assert (config.num_hidden_layers, config.kv_heads, config.hidden_size, config.vocab_size) == (1, 2, 32, 64)
    assert ppojax.forward(config, params, jnp.zeros((1, 3), jnp.int32), jnp.ones((1, 3), jnp.int32)).shape == (1, 3, 64)
    with pytest.raises(ValueError, match="num_key_value_heads.*llama"):
        train_config.ModelConfig(family="gpt2", num_key_value_heads=2)


# ----------------------------------------------------------------------------------------------------------------
# Bad inputs


def _edited_copy(src, tmp_path, edit_tensors=None, edit_config=None):
    d = tmp_path / "edited"
    d.mkdir()
    tensors = load_file(str(src / "model.safetensors"))
    cfg = json.loads((src / "config.json").read_text())
    if edit_tensors:
        edit_tensors(tensors)
    if edit_config:
        edit_config(cfg)
    save_file(tensors, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def test_shape_mismatch_names_the_tensor_and_both_shapes(hf_dirs, tmp_path):
    d = _edited_copy(hf_dirs["llama_gqa"][0], tmp_path, edit_config=lambda c: c.update(intermediate_size=64))
    with pytest.raises(ppojax.CheckpointError,
                       match=r"model\.layers\.0\.mlp\.gate_proj\.weight has shape \(48, 32\), expected \(64, 32\)"):
        ppojax.load_pretrained(d)


def test_leftover_and_missing_tensors_are_named(hf_dirs, tmp_path):
    src = hf_dirs["qwen2"][0]
    d = _edited_copy(src, tmp_path, edit_tensors=lambda t: t.update({"score.weight": np.zeros((1, 32), np.float32)}))
    with pytest.raises(ppojax.CheckpointError, match="score.weight"):
        ppojax.load_pretrained(d)
    shutil.rmtree(d)
    d = _edited_copy(src, tmp_path, edit_tensors=lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"))
    with pytest.raises(ppojax.CheckpointError, match=r"missing.*model\.layers\.1\.self_attn\.k_proj\.bias"):
        ppojax.load_pretrained(d)


@pytest.mark.parametrize("edit, match", [
    (dict(model_type="mistral", sliding_window=16, architectures=["MistralForCausalLM"]),
     "sliding-window attention .*sliding_window=16"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}),
     "RoPE type 'yarn' is not supported"),
    (dict(hidden_act="gelu"), "hidden_act='gelu' is not supported"),
    (dict(num_key_value_heads=3), "num_key_value_heads=3 must divide num_attention_heads=4"),
])
def test_unsupported_options_are_refused_in_one_line(edit, match, hf_dirs, tmp_path):
    d = _edited_copy(hf_dirs["llama_gqa"][0], tmp_path, edit_config=lambda c: c.update(edit))
    with pytest.raises(ppojax.CheckpointError, match=match):
        ppojax.load_pretrained(d)


def test_a_mistral_window_longer_than_the_context_is_no_window(hf_dirs, tmp_path, batch):
    """transformers' Mistral defaults to sliding_window=4096: with a context of 48 it masks nothing."""
    path, model = hf_dirs["mistral"]
    d = _edited_copy(path, tmp_path, edit_config=lambda c: c.update(sliding_window=4096))
    config, params = ppojax.load_pretrained(d)
    ids, mask = batch
    np.testing.assert_allclose(_logits(config, params, ids, mask)[mask > 0], _torch_logits(model, ids, mask)[mask > 0],
                               atol=1e-4)


def test_unsupported_family_names_the_supported_ones(tmp_path):
    cfg = transformers.GPTNeoXConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=4)
    transformers.GPTNeoXForCausalLM(cfg).save_pretrained(tmp_path / "neox")
    with pytest.raises(ppojax.CheckpointError,
                       match=r"model_type 'gpt_neox' is not supported; ppojax loads gpt2, llama, mistral, qwen2"):
        ppojax.load_pretrained(tmp_path / "neox")


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_attention_heads=6), "must divide hidden_size"),
    (dict(model_type="qwen2", qkv_bias=False), "model_type 'qwen2' cannot have qkv_bias=False"),
    (dict(model_type="llama", qkv_bias=True), "attention_bias puts biases on q, k, v and o together"),
    (dict(model_type="gemma"), "model_type must be one of"),
    (dict(dtype="float8"), "dtype must be one of"),
])
def test_bad_config_is_rejected(kwargs, match):
    base = dict(vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=1, num_attention_heads=4)
    with pytest.raises(ValueError, match=match):
        ppojax.LlamaConfig(**{**base, **kwargs})
