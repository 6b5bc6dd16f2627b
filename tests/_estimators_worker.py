"""Subprocess body of tests/test_estimators.py: group estimators and loss aggregations on 1, 2, 4 and 8 virtual CPU
devices (jit + NamedSharding) and through shard_map on 4. Prints one JSON object on its last line."""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import ppojax  # noqa: E402
from ppojax import parallel  # noqa: E402
from ppojax.train import mesh_step  # noqa: E402

VOCAB, BATCH, K = 40, 32, 4
# (the settings, the device counts they run on): every count for one case, the extremes for the others.
DEVICES = {"grpo seq-mean-token-mean": (1, 2, 4, 8)}
CASES = {
    "grpo seq-mean-token-mean": dict(advantage_estimator="grpo", loss_aggregation="seq-mean-token-mean"),
    "rloo gspo seq-mean-token-sum-norm": dict(advantage_estimator="rloo", policy_loss="gspo",
                                              loss_aggregation="seq-mean-token-sum-norm", clip_eps_high=0.28),
    "reinforce_pp seq-mean-token-sum": dict(advantage_estimator="reinforce_pp", loss_aggregation="seq-mean-token-sum"),
}


def below_8(tokens, mask):
    hit = ((tokens < 8) & (mask > 0)).sum(-1)
    return hit.astype(jnp.float32) / jnp.maximum(mask.sum(-1), 1).astype(jnp.float32)


def make_state(case, axis_name=None):
    model = ppojax.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    kw = dict(CASES[case])
    k = 1 if kw["advantage_estimator"] == "reinforce_pp" else K
    ppo = ppojax.PPOConfig(batch_size=BATCH, minibatch_size=16, ppo_epochs=1, response_length=5, temperature=1.0,
                           samples_per_prompt=k, kl=ppojax.KLControlConfig(kind="fixed", init_coef=0.05), **kw)
    return ppojax.create_train_state(model, ppojax.init_params(model, jax.random.key(1)), ppo=ppo,
                                     reward=ppojax.FunctionReward(below_8), key=jax.random.key(0),
                                     optimizer=ppojax.OptimizerConfig(learning_rate=3e-3), axis_name=axis_name)


def prompts(n):
    rng = np.random.RandomState(0)
    ids = rng.randint(0, VOCAB, (n, 5)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[::3, :2] = 0
    return ids, mask


def flat(tree):
    return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)]).tolist()


def summary(state, metrics, tokens):
    m = {k: float(v) for k, v in parallel.to_host(metrics).items()}
    return {"params": flat(parallel.to_host(state.params)), "tokens": np.asarray(tokens).tolist(),
            **{k: m[k] for k in ("loss/total", "advantage_mean", "score_mean", "grad_norm")}}


def main():
    out = {}
    for case in CASES:
        state0 = make_state(case)
        n_prompts = BATCH // state0.setup.ppo.samples_per_prompt
        ids, mask = prompts(n_prompts)
        out[case] = {}
        for n in DEVICES.get(case, (1, 8)):
            mesh = parallel.make_mesh("", devices=jax.devices()[:n])
            state = parallel.shard_state(make_state(case), mesh)
            p = parallel.shard_batch(mesh, ids, mask)
            after, batch = mesh_step.rollout(state, *p, mesh)
            scores = mesh_step.score_rollout(after, batch, mesh)
            new, metrics = mesh_step.update(after, batch, scores, mesh)
            out[case][str(n)] = summary(new, metrics, parallel.to_host(batch.tokens))
        mesh = parallel.make_mesh("data=4", devices=jax.devices()[:4])
        state, metrics = mesh_step.shard_map_iteration(make_state(case, axis_name="data"), jnp.asarray(ids),
                                                      jnp.asarray(mask), mesh)
        s = summary(state, metrics, out[case]["1"]["tokens"])  # shard_map returns no rollout: its params say it all
        out[case]["shard_map 4"] = s
    print(json.dumps(out))


if __name__ == "__main__":
    main()
