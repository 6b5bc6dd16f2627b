"""The estimators inside the iteration: k samples per prompt, critic-free states, exact aggregation across
micro-batches and devices, learning, and the bad inputs refused before compiling."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ppojax

VOCAB = 40
MODEL = ppojax.GPT2Config(vocab_size=VOCAB, n_positions=24, n_embd=16, n_layer=1, n_head=2)
WORKER = Path(__file__).with_name("_estimators_worker.py")


def below_8(tokens, mask):
    hit = ((tokens < 8) & (mask > 0)).sum(-1)
    return hit.astype(jnp.float32) / jnp.maximum(mask.sum(-1), 1).astype(jnp.float32)


def _state(seed=0, opt_kw=None, **ppo_kw):
    kw = dict(batch_size=16, minibatch_size=8, ppo_epochs=2, response_length=6, temperature=1.0,
              kl=ppojax.KLControlConfig(kind="fixed", init_coef=0.0))
    kw.update(ppo_kw)
    params = ppojax.init_params(MODEL, jax.random.key(1))
    return ppojax.create_train_state(MODEL, params, ppo=ppojax.PPOConfig(**kw), reward=ppojax.FunctionReward(below_8),
                                     key=jax.random.key(seed),
                                     optimizer=ppojax.OptimizerConfig(**{"learning_rate": 1e-2, **(opt_kw or {})}))


def _prompts(n, seed=0):
    ids = np.random.RandomState(seed).randint(0, VOCAB, (n, 5)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[::3, :2] = 0
    return jnp.asarray(ids), jnp.asarray(mask)


def test_critic_free_state_has_no_critic_and_runs_no_value_forward():
    grpo = _state(advantage_estimator="grpo", samples_per_prompt=4)
    gae = _state()
    assert set(grpo.params) == {"actor"} and set(gae.params) == {"actor", "critic"}
    n_actor = len(jax.tree.leaves(grpo.params["actor"]))
    # Adam keeps two moments per trainable leaf (plus scalar counts): none for a critic.
    moments = [x for x in jax.tree.leaves(grpo.opt_state) if x.ndim > 0]
    assert len(moments) == 2 * n_actor
    assert sum(x.size for x in jax.tree.leaves(grpo.opt_state)) < sum(x.size for x in jax.tree.leaves(gae.opt_state))
    _, batch = ppojax.rollout(grpo, *_prompts(4))
    assert batch.values is None
    state, m = ppojax.ppo_iteration(grpo, *_prompts(4))
    assert "value_loss" not in m and "explained_variance" not in m and set(state.params) == {"actor"}


def test_k_samples_of_a_prompt_are_distinct_samples_of_that_prompt():
    k = 4
    state = _state(advantage_estimator="rloo", samples_per_prompt=k)
    ids, mask = _prompts(4)
    _, batch = ppojax.rollout(state, ids, mask)
    tokens = np.asarray(batch.tokens)
    for g in range(4):
        rows = slice(g * k, (g + 1) * k)
        assert (np.asarray(batch.prompt_ids)[rows] == np.asarray(ids)[g]).all()
        assert len({tuple(t) for t in tokens[rows]}) == k, tokens[rows]  # 40^6 outcomes: distinct
    # Each row is the sample of its own row index: the same as sampling that prompt alone with that index.
    actor = state.actor_params
    key = jax.random.split(state.key)[1]
    for row in (1, 6):
        alone = ppojax.generate(MODEL, actor, ids[row // k][None], mask[row // k][None], key, max_new_tokens=6,
                                temperature=1.0, example_ids=jnp.asarray([row]))
        np.testing.assert_array_equal(np.asarray(alone.tokens)[0], tokens[row])


@pytest.mark.parametrize("mode", ["token-mean", pytest.param("seq-mean-token-mean", marks=pytest.mark.slow),
                                  "seq-mean-token-sum-norm"])
def test_aggregation_is_exact_across_micro_batches(mode):
    kw = dict(advantage_estimator="grpo", samples_per_prompt=4, loss_aggregation=mode)
    a, ma = ppojax.ppo_iteration(_state(**kw), *_prompts(4))
    b, mb = ppojax.ppo_iteration(_state(opt_kw={"grad_accum_steps": 2}, **kw), *_prompts(4))
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=2e-6)
    np.testing.assert_allclose(float(ma["loss/total"]), float(mb["loss/total"]), rtol=1e-5)


@pytest.mark.slow
def test_aggregation_and_groups_are_exact_across_devices():
    """1, 2, 4 and 8 virtual devices (jit + NamedSharding), and shard_map on 4, give one device's result."""
    proc = subprocess.run([sys.executable, str(WORKER)], capture_output=True, text=True, timeout=900,
                          cwd=WORKER.parent.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, by_devices in runs.items():
        ref = by_devices["1"]
        assert ref["grad_norm"] > 0, name
        for devices, run in by_devices.items():
            assert run["tokens"] == ref["tokens"], (name, devices)
            np.testing.assert_allclose(run["params"], ref["params"], atol=1e-5, err_msg=f"{name} on {devices}")
            for k in ("loss/total", "advantage_mean", "score_mean"):
                np.testing.assert_allclose(run[k], ref[k], atol=1e-5, err_msg=f"{name} {k} on {devices}")


@pytest.mark.parametrize("estimator", ["grpo", "rloo", "reinforce_pp", "tests.test_estimators:doubled_rloo"])
def test_estimator_raises_the_score(estimator):
    k = 1 if estimator == "reinforce_pp" else 4
    state = _state(advantage_estimator=estimator, samples_per_prompt=k, batch_size=32, minibatch_size=16)
    scores = []
    for i in range(20):
        state, m = ppojax.ppo_iteration(state, *_prompts(32 // k, seed=i % 4))
        scores.append(float(m["score_mean"]))
    assert np.mean(scores[-4:]) > np.mean(scores[:4]) + 0.15, scores


def doubled_rloo(inputs):
    """A user estimator named by module path in a config: RLOO with twice the advantage."""
    return 2.0 * ppojax.advantages.rloo(inputs.scores, inputs.mask, group_size=inputs.group_size), None


@pytest.mark.parametrize("kw, message", [
    (dict(samples_per_prompt=3), "must divide ppo.batch_size"),
    (dict(samples_per_prompt=16, batch_size=32, minibatch_size=8), "must divide"),
    (dict(advantage_estimator="grpo"), "samples_per_prompt >= 2"),
    (dict(advantage_estimator="rlo"), "did you mean 'rloo'"),
    (dict(clip_eps=0.2, clip_eps_high=0.1), "clip_eps_high=0.1 must be >= ppo.clip_eps=0.2"),
    (dict(loss_aggregation="seq-mean"), "loss_aggregation must be one of"),
    (dict(policy_loss="gpso"), "did you mean 'gspo'"),
    (dict(advantage_estimator="tests.test_estimators:missing"), "has no attribute 'missing'"),
])
def test_bad_estimator_settings_are_refused_by_the_config(kw, message):
    with pytest.raises((ValueError, AttributeError), match=message):
        ppojax.PPOConfig(**{"batch_size": 16, "minibatch_size": 8, **kw})


def test_gspo_and_clip_higher_run_in_the_iteration():
    state = _state(advantage_estimator="grpo", samples_per_prompt=4, policy_loss="gspo", clip_eps_high=0.28,
                   loss_aggregation="seq-mean-token-mean")
    state, m = ppojax.ppo_iteration(state, *_prompts(4))
    assert float(m["first_minibatch/ratio_max"]) == pytest.approx(1.0, abs=1e-5)
    assert np.isfinite(float(m["policy_loss"]))
