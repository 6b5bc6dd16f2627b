"""LoRA over one shared base: the merge against a per-layer loop, PPO and reward-model training with only adapters
and heads trainable, the state's memory, exact resume, and both exports checked by transformers and PEFT."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ppojax
from ppojax.rl import iteration as ppo
from ppojax.io.checkpoint import CheckpointMismatchError
from ppojax.models import lora
from ppojax.models.lora import LoraError, LoraSpec
from ppojax.rl.roles import LoraRoles, roles_from_config
from ppojax.train.resume import describe_mismatch
from ppojax.rl import preferences, reward_training, rewards
from ppojax.rl.kl import KLControlConfig
from ppojax.rl.config import OptimizerConfig, PPOConfig
from ppojax.rl.state import create_train_state

VOCAB = 48
MODEL = ppojax.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=4)
ROLES = LoraRoles(rank=4, alpha=8.0, targets=("c_attn", "c_fc"))


def _base():
    return ppojax.init_params(MODEL, jax.random.key(100))


def _prompts(batch, seed=0):
    rng = np.random.RandomState(seed)
    ids = rng.randint(0, VOCAB, (batch, 6)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[::3, :2] = 0  # some left padding
    ids[mask == 0] = VOCAB  # the pad id sits outside the vocabulary
    return jnp.asarray(ids), jnp.asarray(mask)


def low_token_share(tokens, mask):
    hit = ((tokens < 8) & (mask > 0)).sum(-1)
    return hit.astype(jnp.float32) / jnp.maximum(mask.sum(-1), 1).astype(jnp.float32)


def _state(roles=ROLES, seed=0, base=None, reward=None, **ppo_kw):
    cfg = dict(batch_size=16, minibatch_size=8, ppo_epochs=2, response_length=6, temperature=1.0,
               kl=KLControlConfig(kind="fixed", init_coef=0.05))
    cfg.update(ppo_kw)
    return create_train_state(MODEL, _base() if base is None else base, ppo=PPOConfig(**cfg),
                              reward=reward or rewards.FunctionReward(low_token_share), key=jax.random.key(seed),
                              optimizer=OptimizerConfig(learning_rate=1e-2), roles=roles)


def _perturbed(adapters, seed=0, scale=0.3):
    """Adapters with a random B, so that the update A B is not zero."""
    keys = iter(jax.random.split(jax.random.key(seed), len(adapters)))
    return {name: {"lora_a": ab["lora_a"], "lora_b": scale * jax.random.normal(next(keys), ab["lora_b"].shape)}
            for name, ab in adapters.items()}


def _nbytes(tree):
    return sum(x.nbytes for x in jax.tree.leaves(tree))


def _leaf_paths(tree):
    return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


# ----------------------------------------------------------------------------------------------------------------
# The merge


def test_zero_adapters_give_the_base_logits_exactly_and_the_reference_is_the_base():
    base = _base()
    state = _state(base=base)
    ids, mask = _prompts(4)
    np.testing.assert_array_equal(ppojax.forward(MODEL, state.actor_params, ids, mask),
                                  ppojax.forward(MODEL, base, ids, mask))
    assert state.ref_params is base  # adapters off: the base itself, not a copy
    assert state.frozen["base"] is base
    critic = state.critic_params
    np.testing.assert_array_equal(ppojax.forward_hidden(MODEL, critic, ids, mask),
                                  ppojax.forward_hidden(MODEL, base, ids, mask))
    assert not np.any(np.asarray(ppojax.value_forward(MODEL, critic, ids, mask)))  # zero value head


def test_merge_matches_a_per_layer_loop():
    base = _base()
    spec = LoraSpec(rank=3, alpha=5.0, targets="c_attn, c_proj_mlp")
    adapters = _perturbed(spec.init_adapters(MODEL, base, jax.random.key(1)))
    merged = jax.jit(lora.merge, static_argnums=(2, 3))(base, adapters, 5.0, 3)
    h, mh = base["transformer"]["h"], merged["transformer"]["h"]
    for name in ("c_attn", "c_proj_mlp"):
        a, b = np.asarray(adapters[name]["lora_a"], np.float64), np.asarray(adapters[name]["lora_b"], np.float64)
        for layer in range(MODEL.n_layer):
            want = np.asarray(h[name]["kernel"][layer], np.float64) + 5.0 / 3 * a[layer] @ b[layer]
            np.testing.assert_allclose(mh[name]["kernel"][layer], want, rtol=1e-5, atol=1e-6)
    for name in ("c_proj", "c_fc"):  # not targeted: the base's own arrays
        assert mh[name]["kernel"] is h[name]["kernel"] or np.array_equal(mh[name]["kernel"], h[name]["kernel"])
    # A starts as PEFT's kaiming-uniform U(-1/sqrt(in), 1/sqrt(in)), B at zero.
    fresh = spec.init_adapters(MODEL, base, jax.random.key(2))
    bound = 1 / np.sqrt(MODEL.n_embd)
    a = np.asarray(fresh["c_attn"]["lora_a"])
    assert a.shape == (2, 32, 3) and np.abs(a).max() <= bound and np.abs(a).max() > 0.8 * bound
    assert not np.any(np.asarray(fresh["c_attn"]["lora_b"]))


@pytest.mark.parametrize("kw, message", [
    (dict(targets=("q_proj", "c_attn")), r"\['q_proj'\].*valid targets: c_attn, c_proj, c_fc, c_proj_mlp"),
    (dict(targets="attn"), r"\['attn'\].*valid targets"),
    (dict(targets=()), "empty"),
    (dict(rank=0), "positive int"),
    (dict(rank=-2), "positive int"),
    (dict(rank=1.5), "positive int"),
    (dict(rank=True), "positive int"),
    (dict(rank=33), r"rank 33 is larger than min\(in, out\) of c_attn \[in=32, out=96\].*rank <= 32"),
    (dict(alpha=0.0), "alpha"),
])
def test_bad_settings_fail_with_one_clear_error_before_compiling(kw, message):
    settings = dict(rank=4, alpha=8.0, targets=("c_attn",))
    settings.update(kw)
    before = ppojax.compile_count()
    with pytest.raises(LoraError, match=message):
        _state(roles=LoraRoles(**settings))
    assert ppojax.compile_count() == before


# ----------------------------------------------------------------------------------------------------------------
# PPO


def test_ppo_iteration_trains_only_adapters_and_heads():
    base = _base()
    base_bytes = jax.tree.map(lambda x: np.asarray(x).tobytes(), base)
    state = _state(base=base)
    assert set(state.params) == {"actor", "critic"}
    assert set(state.params["critic"]) == {"adapters", "head"}
    new, metrics = ppo.ppo_iteration(state, *_prompts(16))
    metrics = jax.device_get(metrics)
    assert metrics["first_minibatch/approx_kl"] < 1e-12 and np.isfinite(metrics["loss/total"])
    # The base: the same arrays, byte for byte.
    assert new.frozen["base"] is base
    assert jax.tree.map(lambda x: np.asarray(x).tobytes(), new.frozen["base"]) == base_bytes
    # Every adapter's B, and the value head, moved.
    for role, adapters in (("actor", new.params["actor"]), ("critic", new.params["critic"]["adapters"])):
        for name in ROLES.targets:
            assert np.abs(np.asarray(adapters[name]["lora_b"])).max() > 0, (role, name)
    assert np.abs(np.asarray(new.params["critic"]["head"]["kernel"])).max() > 0
    # The optimizer state covers the adapters and the head only: Adam's moments have exactly the params' structure.
    opt_arrays = [x for x in jax.tree.leaves(new.opt_state) if x.ndim > 0]
    assert sum(x.size for x in opt_arrays) == 2 * sum(x.size for x in jax.tree.leaves(new.params))
    moment_paths = [p for p in _leaf_paths(new.opt_state) if "mu" in p or "nu" in p]
    assert moment_paths and all(("lora_" in p) or ("['head']" in p) for p in moment_paths), moment_paths
    # The adapted policy differs from the base now; the reference still is the base.
    ids, mask = _prompts(4)
    assert not np.allclose(ppojax.forward(MODEL, new.actor_params, ids, mask), ppojax.forward(MODEL, base, ids, mask))
    assert new.ref_params is base


def test_state_holds_one_copy_of_the_base():
    base = _base()
    base_bytes = _nbytes(base)
    lora_state, full_state = _state(base=base), _state(roles=None, base=base)
    lora_held = _nbytes((lora_state.params, lora_state.frozen))
    full_held = _nbytes((full_state.params, full_state.frozen))
    adapters_and_head = _nbytes(lora_state.params)
    assert _nbytes(lora_state.frozen) == base_bytes
    assert lora_held == base_bytes + adapters_and_head and adapters_and_head < 0.25 * base_bytes
    assert full_held >= 2.9 * base_bytes  # actor, reference and the critic's trunk
    # And the optimizer state is Adam's two moments of the adapters and head, not of the model.
    assert _nbytes(lora_state.opt_state) < 2.1 * adapters_and_head
    assert _nbytes(full_state.opt_state) >= 2 * 1.9 * base_bytes


def test_exact_resume_from_a_checkpoint(tmp_path):
    prompts = _prompts(16)
    state = _state(seed=5)
    after_one, _ = ppo.ppo_iteration(state, *prompts)
    _, uninterrupted = ppo.ppo_iteration(after_one, *prompts)
    with ppojax.Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(1, after_one)
        fresh = _state(seed=9)  # other keys, other initial A: everything must come from the checkpoint
        step, restored, _ = ckpt.restore(fresh)
    assert step == 1
    _, resumed = ppo.ppo_iteration(restored, *prompts)
    uninterrupted, resumed = jax.device_get((uninterrupted, resumed))
    assert uninterrupted.keys() == resumed.keys()
    for k in uninterrupted:
        np.testing.assert_array_equal(resumed[k], uninterrupted[k], err_msg=k)


def _runner_arrays(state):
    """What the runner checkpoints: the state's array fields as a dict."""
    return {"params": state.params, "opt_state": state.opt_state, "frozen": state.frozen, "reward": state.reward,
            "hparams": state.hparams, "kl": state.kl, "key": state.key, "step": state.step}


def _mismatch(saved, target, tmp_path, as_dict):
    pack = _runner_arrays if as_dict else (lambda s: s)
    with ppojax.Checkpointer(tmp_path) as ckpt:
        ckpt.save(0, pack(saved))
        with pytest.raises(CheckpointMismatchError) as info:
            ckpt.restore(pack(target))
    return describe_mismatch(info.value, target), str(info.value)


@pytest.mark.parametrize("as_dict", [False, True])
def test_resume_across_lora_and_full_fine_tuning_names_lora(tmp_path, as_dict):
    base = _base()
    lora_state, full_state = _state(base=base), _state(roles=None, base=base)
    message, raw = _mismatch(lora_state, full_state, tmp_path / "a", as_dict)
    assert message.startswith("this checkpoint was saved by a LoRA run") and message.endswith(raw)
    message, raw = _mismatch(full_state, lora_state, tmp_path / "b", as_dict)
    assert message.startswith("this checkpoint was saved by a full fine-tuning run") and "lora.rank: 0" in message
    rank2 = _state(roles=LoraRoles(rank=2, alpha=8.0, targets=ROLES.targets), base=base)
    message, _ = _mismatch(lora_state, rank2, tmp_path / "c", as_dict)
    assert message.startswith("this checkpoint's LoRA adapters have rank 4, this run's rank 2")
    other = _state(roles=LoraRoles(rank=4, alpha=8.0, targets=("c_attn", "c_proj")), base=base)
    message, _ = _mismatch(lora_state, other, tmp_path / "d", as_dict)
    assert "other modules than this run's lora.targets" in message and "['c_fc']" in message


def test_a_mismatch_without_lora_keeps_its_message(tmp_path):
    a = _state(roles=None)
    b = _state(roles=None, advantage_estimator="grpo", samples_per_prompt=4)  # no critic
    message, raw = _mismatch(a, b, tmp_path / "full", True)
    assert message == raw
    c = _state(advantage_estimator="grpo", samples_per_prompt=4)  # LoRA both sides, one without a critic
    message, raw = _mismatch(_state(), c, tmp_path / "lora", True)
    assert message == raw


# ----------------------------------------------------------------------------------------------------------------
# Critic-free estimators and a LoRA reward model on the same base


def _lora_reward(base, seed=3):
    spec = LoraSpec(rank=2, alpha=4.0, targets=("c_attn",))
    adapters = _perturbed(spec.init_adapters(MODEL, base, jax.random.key(seed)), seed=seed)
    head = ppojax.models.init_head(MODEL, head_init_std=0.5, key=jax.random.key(seed + 1))
    return rewards.lora_reward_model(MODEL, spec, {"adapters": adapters, "head": head}), spec, adapters, head


def test_grpo_lora_run_scores_with_a_lora_reward_model_on_the_shared_base():
    base = _base()
    rm, spec, adapters, head = _lora_reward(base)
    state = _state(base=base, reward=rm, advantage_estimator="grpo", samples_per_prompt=4)
    assert set(state.params) == {"actor"}  # no critic
    assert _nbytes(state.reward) < 0.1 * _nbytes(base)  # adapters and head only: the base is not in the reward
    # Scores inside the iteration equal a full reward model built here from the merged weights.
    prompts = _prompts(4)
    after, batch = ppo.rollout(state, *prompts)
    full_rm = rewards.reward_model(MODEL, {"transformer": lora.merge(base, adapters, 4.0, 2)["transformer"],
                                           "head": head})
    ids = jnp.concatenate([batch.prompt_ids, batch.tokens], 1)
    mask = jnp.concatenate([batch.prompt_mask, batch.mask], 1)
    np.testing.assert_allclose(ppo.score_rollout(after, batch), full_rm(ids, mask), rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="with_base"):
        rm(ids, mask)
    history = []
    for _ in range(2):
        state, metrics = ppo.ppo_iteration(state, *prompts)
        history.append(jax.device_get(metrics))
    assert all(np.isfinite(m["loss/total"]) and m["first_minibatch/approx_kl"] < 1e-12 for m in history)
    assert "value_loss" not in history[0]
    assert np.abs(np.asarray(state.params["actor"]["c_fc"]["lora_b"])).max() > 0
    assert state.frozen["base"] is base


def _comparisons(n, rng):
    """Preferences over the tiny vocabulary: the response with more tokens below 16 wins."""
    q, r, k = 3, 5, 2
    tokens = rng.integers(0, VOCAB, (n, k, r)).astype(np.int32)
    mask = np.ones((n, k, r), np.int32)
    choice = ((tokens < 16).sum(-1)).argmax(-1)
    q_ids = rng.integers(0, VOCAB, (n, q)).astype(np.int32)
    return preferences.PreferenceBatch(query_ids=q_ids, query_mask=np.ones_like(q_ids), tokens=tokens, mask=mask,
                                       choice=choice)


def test_reward_training_with_lora_trains_adapters_and_head_only(tmp_path):
    base = _base()
    data = _comparisons(96, np.random.default_rng(0))
    spec = LoraSpec(rank=4, alpha=8.0, targets=("c_attn", "c_fc"))
    cfg = reward_training.RewardTrainConfig(epochs=3, batch_size=16, learning_rate=1e-2)
    state = reward_training.create_reward_train_state(MODEL, base, cfg, key=jax.random.key(0), lora=spec)
    assert set(state.params) == {"adapters", "head"} and state.base is base
    before = reward_training.evaluate(MODEL, reward_training.reward_params(state), data)
    state, history = reward_training.fit(state, data, cfg)
    after = reward_training.evaluate(MODEL, reward_training.reward_params(state), data)
    assert after["loss"] < before["loss"] - 0.05, (before, history, after)
    np.testing.assert_array_equal(state.base["transformer"]["h"]["c_attn"]["kernel"],
                                  base["transformer"]["h"]["c_attn"]["kernel"])
    opt_arrays = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
    assert sum(x.size for x in opt_arrays) == 2 * sum(x.size for x in jax.tree.leaves(state.params))
    # The trained model scores in PPO as a LoraRewardModel over the same base.
    rm = reward_training.trained_reward_model(state)
    assert isinstance(rm, rewards.LoraRewardModel)
    ids = jnp.concatenate([data.query_ids[:8], data.tokens[:8, 0]], 1)
    mask = jnp.ones_like(ids)
    want = reward_training.comparison_scores(MODEL, reward_training.reward_params(state), data.take(np.arange(8)))
    np.testing.assert_allclose(rm.with_base(base)(ids, mask), want[:, 0], rtol=1e-5, atol=1e-5)
    # Normalised on samples, saved without the base (a PEFT adapter + the head) and loaded back unchanged.
    rm = reward_training.normalize_reward_model(rm, data.query_ids, data.query_mask, data.tokens[:, 0],
                                                data.mask[:, 0], base=base)
    scores = np.asarray(rm.with_base(base)(ids, mask))
    calibration = np.asarray(rm.with_base(base)(jnp.concatenate([data.query_ids, data.tokens[:, 0]], 1),
                                                jnp.ones((96, 8), jnp.int32)))
    assert abs(calibration.mean()) < 1e-4 and abs(calibration.std() - 1) < 1e-3
    out = reward_training.save_reward_model(tmp_path / "rm", rm)
    assert (out / "adapter_model.safetensors").exists() and not (out / "model.safetensors").exists()
    loaded = reward_training.load_reward_model(out)
    assert isinstance(loaded, rewards.LoraRewardModel) and loaded.lora == spec
    np.testing.assert_allclose(loaded.with_base(base)(ids, mask), scores, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Exports, checked by transformers and PEFT


def _hf_logits(model, ids, mask):
    import torch

    pos = np.maximum(mask.cumsum(-1) - 1, 0)
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                     position_ids=torch.tensor(pos)).logits.numpy()


def _adapted(tiny_hf_dir, targets=("c_attn", "c_proj_mlp")):
    config, base = ppojax.load_pretrained(tiny_hf_dir)
    spec = LoraSpec(rank=4, alpha=12.0, targets=targets)
    adapters = _perturbed(spec.init_adapters(config, base, jax.random.key(7)), seed=7, scale=0.5)
    return config, base, spec, adapters


def test_merged_export_loads_in_transformers_with_the_adapted_logits(tiny_hf_dir, left_padded_batch, tmp_path):
    import transformers

    ids, mask = left_padded_batch
    config, base, spec, adapters = _adapted(tiny_hf_dir)
    state_like = LoraRoles(spec.rank, spec.alpha, spec.targets)
    adapted = state_like.actor({"actor": adapters}, {"base": base})
    ours = np.asarray(ppojax.forward(config, adapted, jnp.asarray(ids), jnp.asarray(mask)))
    base_logits = np.asarray(ppojax.forward(config, base, jnp.asarray(ids), jnp.asarray(mask)))
    assert np.abs(ours - base_logits)[mask > 0].max() > 1e-2  # the adapters do change the model
    out = ppojax.save_pretrained(tmp_path / "merged", config, adapted)
    model = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    np.testing.assert_allclose(_hf_logits(model, ids, mask)[mask > 0], ours[mask > 0], atol=1e-4)


def test_peft_export_has_peft_names_and_peft_reproduces_the_logits(tiny_hf_dir, left_padded_batch, tmp_path):
    import peft
    import transformers
    from safetensors.numpy import load_file

    ids, mask = left_padded_batch
    config, base, spec, adapters = _adapted(tiny_hf_dir)
    out = lora.save_adapter(tmp_path / "adapter", config, adapters, spec, base_model_name_or_path=str(tiny_hf_dir))
    ours = load_file(str(out / "adapter_model.safetensors"))
    peft_config = json.loads((out / "adapter_config.json").read_text())
    assert (peft_config["peft_type"], peft_config["r"], peft_config["lora_alpha"]) == ("LORA", 4, 12.0)
    assert peft_config["fan_in_fan_out"] is True  # GPT-2's Conv1D stores [in, out]
    assert "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight" in ours
    assert ours["base_model.model.transformer.h.1.mlp.c_proj.lora_B.weight"].shape == (32, 4)  # [out, r]
    assert ours["base_model.model.transformer.h.1.mlp.c_proj.lora_A.weight"].shape == (4, 128)  # [r, in]
    assert not any(".attn.c_proj." in k for k in ours)  # attention's c_proj is not a target

    # The names and shapes PEFT itself writes for the same adapter.
    reference = peft.get_peft_model(
        transformers.GPT2LMHeadModel.from_pretrained(tiny_hf_dir),
        peft.LoraConfig(r=4, lora_alpha=12, target_modules=["c_attn", "mlp.c_proj"], fan_in_fan_out=True))
    reference.save_pretrained(tmp_path / "peft_reference")
    theirs = load_file(str(tmp_path / "peft_reference" / "adapter_model.safetensors"))
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}

    # PEFT on the transformers base reproduces ppojax's adapted logits.
    hf_base = transformers.GPT2LMHeadModel.from_pretrained(tiny_hf_dir).eval()
    model = peft.PeftModel.from_pretrained(hf_base, out).eval()
    want = np.asarray(ppojax.forward(config, spec.merge(base, adapters), jnp.asarray(ids), jnp.asarray(mask)))
    np.testing.assert_allclose(_hf_logits(model, ids, mask)[mask > 0], want[mask > 0], atol=1e-4)

    # And the directory reads back into ppojax unchanged.
    spec2, adapters2 = lora.load_adapter(out, config)
    assert spec2 == spec
    jax.tree.map(np.testing.assert_array_equal, adapters2, adapters)


def test_an_adapter_trained_by_peft_loads_into_ppojax(tiny_hf_dir, left_padded_batch, tmp_path):
    import peft
    import torch
    import transformers

    ids, mask = left_padded_batch
    torch.manual_seed(1)
    model = peft.get_peft_model(
        transformers.GPT2LMHeadModel.from_pretrained(tiny_hf_dir),
        peft.LoraConfig(r=2, lora_alpha=6, target_modules=["c_fc", "attn.c_proj"], fan_in_fan_out=True,
                        init_lora_weights=False)).eval()  # random A and B: a non-trivial adapter
    model.save_pretrained(tmp_path / "peft")
    config, base = ppojax.load_pretrained(tiny_hf_dir)
    spec, adapters = lora.load_adapter(tmp_path / "peft", config)
    assert spec == LoraSpec(rank=2, alpha=6.0, targets=("c_proj", "c_fc"))
    ours = np.asarray(ppojax.forward(config, spec.merge(base, adapters), jnp.asarray(ids), jnp.asarray(mask)))
    np.testing.assert_allclose(ours[mask > 0], _hf_logits(model, ids, mask)[mask > 0], atol=1e-4)


def test_adapter_files_that_do_not_fit_fail_clearly(tiny_hf_dir, tmp_path):
    config, base, spec, adapters = _adapted(tiny_hf_dir)
    out = lora.save_adapter(tmp_path / "adapter", config, adapters, spec)
    cfg = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(LoraError, match="use_dora=True is not supported"):
        lora.load_adapter(out, config)
    with pytest.raises(LoraError, match="adapter_config.json is missing"):
        lora.load_adapter(tmp_path, config)
    with pytest.raises(LoraError, match="the spec names"):
        lora.save_adapter(tmp_path / "x", config, adapters, LoraSpec(4, 12.0, ("c_attn",)))
    assert not (tmp_path / "x").exists()


def test_roles_from_the_experiment_config():
    from ppojax.io import configlib
    from ppojax.train.config import ExperimentConfig

    off = configlib.from_dict(ExperimentConfig, {})
    assert roles_from_config(off.lora, MODEL) is None
    cfg = configlib.from_dict(ExperimentConfig, {"lora": {"rank": 8, "alpha": 32, "targets": "c_attn,c_fc"}})
    assert roles_from_config(cfg.lora, MODEL) == LoraRoles(rank=8, alpha=32.0, targets=("c_attn", "c_fc"))
    every = configlib.from_dict(ExperimentConfig, {"lora": {"rank": 2}})
    assert roles_from_config(every.lora, MODEL).targets == ("c_attn", "c_proj", "c_fc", "c_proj_mlp")
    with pytest.raises(configlib.ConfigError, match="lora.*rank"):
        configlib.from_dict(ExperimentConfig, {"lora": {"rank": -1}})


# ----------------------------------------------------------------------------------------------------------------
# The Llama family (Llama, Qwen2): the same code through the model interface

LLAMA_KINDS = {
    # Untied LM head, grouped-query attention.
    "llama": ("LlamaForCausalLM", "LlamaConfig", dict(tie_word_embeddings=False)),
    # Biases on q, k, v.
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", dict(tie_word_embeddings=False)),
}


@pytest.fixture(scope="module", params=sorted(LLAMA_KINDS))
def llama_dir(request, tmp_path_factory):
    import torch
    import transformers

    model_cls, config_cls, overrides = LLAMA_KINDS[request.param]
    config = getattr(transformers, config_cls)(
        vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=48, initializer_range=0.2, bos_token_id=1, eos_token_id=2,
        **overrides)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp(request.param)
    getattr(transformers, model_cls)(config).eval().save_pretrained(path)
    return path


def _llama_logits(model, ids, mask):
    import torch

    pos = np.maximum(mask.cumsum(-1) - 1, 0)
    with torch.no_grad():
        return model(input_ids=torch.tensor(np.where(mask > 0, ids, 0)), attention_mask=torch.tensor(mask),
                     position_ids=torch.tensor(pos)).logits.float().numpy()


LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def test_llama_merged_and_peft_exports_reproduce_the_adapted_logits(llama_dir, left_padded_batch, tmp_path):
    import peft
    import transformers
    from safetensors.numpy import load_file

    ids, mask = left_padded_batch
    config, base = ppojax.load_pretrained(llama_dir)
    spec = LoraSpec(rank=4, alpha=8.0, targets=",".join(LLAMA_TARGETS))
    adapters = _perturbed(spec.init_adapters(config, base, jax.random.key(3)), seed=3, scale=0.5)
    adapted = spec.merge(base, adapters)
    assert adapted["lm_head"] is base["lm_head"]  # untied head: not adapted, not copied
    ours = np.asarray(ppojax.forward(config, adapted, jnp.asarray(ids), jnp.asarray(mask)))
    base_logits = np.asarray(ppojax.forward(config, base, jnp.asarray(ids), jnp.asarray(mask)))
    assert np.abs(ours - base_logits)[mask > 0].max() > 1e-2

    merged = transformers.AutoModelForCausalLM.from_pretrained(ppojax.save_pretrained(tmp_path / "m", config,
                                                                                      adapted)).eval()
    np.testing.assert_allclose(_llama_logits(merged, ids, mask)[mask > 0], ours[mask > 0], atol=1e-4)

    out = lora.save_adapter(tmp_path / "adapter", config, adapters, spec)
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 32)  # [r, in]
    assert tensors["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"].shape == (32, 4)  # [out, r]
    assert json.loads((out / "adapter_config.json").read_text())["fan_in_fan_out"] is False  # nn.Linear
    reference = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(llama_dir),
                                    peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(LLAMA_TARGETS)))
    reference.save_pretrained(tmp_path / "peft_reference")
    theirs = load_file(str(tmp_path / "peft_reference" / "adapter_model.safetensors"))
    assert {k: v.shape for k, v in tensors.items()} == {k: v.shape for k, v in theirs.items()}
    model = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(llama_dir), out).eval()
    np.testing.assert_allclose(_llama_logits(model, ids, mask)[mask > 0], ours[mask > 0], atol=1e-4)
    spec2, adapters2 = lora.load_adapter(out, config)
    assert spec2 == spec
    jax.tree.map(np.testing.assert_array_equal, adapters2, adapters)


def test_one_lora_ppo_iteration_on_a_tiny_llama(tmp_path):
    import torch
    import transformers

    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, initializer_range=0.2, bos_token_id=1, eos_token_id=2))
    hf.save_pretrained(tmp_path)
    config, base = ppojax.load_pretrained(tmp_path)
    roles = LoraRoles(rank=2, alpha=4.0, targets=("q_proj", "v_proj", "down_proj"))
    state = create_train_state(config, base, ppo=PPOConfig(batch_size=8, minibatch_size=8, ppo_epochs=1,
                                                           response_length=4, temperature=1.0),
                               reward=rewards.FunctionReward(low_token_share), key=jax.random.key(0),
                               optimizer=OptimizerConfig(learning_rate=1e-2), roles=roles)
    new, metrics = ppo.ppo_iteration(state, *_prompts(8))
    metrics = jax.device_get(metrics)
    assert metrics["first_minibatch/approx_kl"] < 1e-12 and np.isfinite(metrics["loss/total"])
    assert new.frozen["base"] is base and new.ref_params is base
    assert np.abs(np.asarray(new.params["actor"]["down_proj"]["lora_b"])).max() > 0
    assert np.abs(np.asarray(new.params["critic"]["head"]["kernel"])).max() > 0
