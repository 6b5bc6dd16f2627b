"""Subprocess body of tests/test_parallel.py (and benchmarks/scaling.py): runs with its own XLA_FLAGS device count.

    python tests/_parallel_worker.py devices N            iterations on 1..N devices, FSDP, shard_map, checkpoints
    python tests/_parallel_worker.py process PORT ID      one of two jax.distributed processes (2 devices each)

Prints one JSON object on the last line of stdout.
"""

import json
import os
import sys

mode = sys.argv[1]
n_local = int(sys.argv[2]) if mode == "devices" else 2
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n_local}"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import ppojax  # noqa: E402
from ppojax import distributed, parallel, rewards  # noqa: E402
from ppojax.rl import iteration as ppo  # noqa: E402
from ppojax.train import mesh_step  # noqa: E402
from ppojax.io.data import PromptLoader  # noqa: E402
from ppojax.rl.kl import KLControlConfig  # noqa: E402
from ppojax.rl.config import OptimizerConfig, PPOConfig  # noqa: E402
from ppojax.rl.state import create_train_state  # noqa: E402

VOCAB, BATCH = 48, 16


def reward_fn(tokens, mask):
    hit = ((tokens < 8) & (mask > 0)).sum(-1)
    return hit.astype(jnp.float32) / jnp.maximum(mask.sum(-1), 1).astype(jnp.float32)


def make_state(axis_name=None, remat=False, accum=1):
    model = ppojax.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=32, n_layer=1, n_head=4, remat=remat)
    cfg = PPOConfig(batch_size=BATCH, minibatch_size=8, ppo_epochs=1, response_length=6, temperature=1.0,
                    kl=KLControlConfig(kind="fixed", init_coef=0.05))
    return create_train_state(model, ppojax.init_params(model, jax.random.key(1)), ppo=cfg,
                              reward=rewards.FunctionReward(reward_fn), key=jax.random.key(0),
                              optimizer=OptimizerConfig(learning_rate=3e-3, grad_accum_steps=accum),
                              axis_name=axis_name)


def prompts():
    rng = np.random.RandomState(0)
    ids = rng.randint(0, VOCAB, (BATCH, 5)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[::3, :2] = 0
    ids[mask == 0] = VOCAB
    return ids, mask


def flat(tree):
    return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


def summary(state, metrics, rollout_tokens=None):
    out = {"metrics": {k: float(v) for k, v in parallel.to_host(metrics).items()},
           "params": flat(parallel.to_host(state.params)).tolist()}
    if rollout_tokens is not None:
        out["tokens"] = np.asarray(rollout_tokens).tolist()
    return out


def one_iteration(state, mesh, process_index=0, process_count=1, halves=True):
    """One iteration on ``mesh``. ``halves``: as rollout + update (the host-reward path), which also returns the
    sampled tokens; else the single-jit ``ppo_iteration`` (the runner's default path)."""
    ids, mask = PromptLoader(*prompts(), BATCH, seed=0, shuffle=False, process_index=process_index,
                             process_count=process_count).batch(0)
    ids, mask = parallel.shard_batch(mesh, ids, mask)
    state = parallel.shard_state(state, mesh)
    if not halves:
        new_state, metrics = mesh_step.ppo_iteration(state, ids, mask, mesh)
        return new_state, metrics, None
    state, batch = mesh_step.rollout(state, ids, mask, mesh)
    with jax.set_mesh(mesh):
        scores = jax.jit(ppo.compute_scores)(state, batch)
    new_state, metrics = mesh_step.update(state, batch, scores, mesh)
    return new_state, metrics, parallel.to_host(batch.tokens)


def devices_mode(n):
    out = {}
    for k in [1, 2, 4, 8]:
        if k > n:
            break
        mesh = parallel.make_mesh("", devices=jax.devices()[:k])
        state, metrics, tokens = one_iteration(make_state(), mesh)
        if k == 4:  # the single-jit iteration too: the 2-process run is compared with it
            state_b, metrics_b, _ = one_iteration(make_state(), mesh, halves=False)
            out["iteration data=4"] = summary(state_b, metrics_b)
        out[f"data={k}"] = summary(state, metrics, tokens)

    # FSDP (with remat and gradient accumulation on: both must be exact under the mesh).
    mesh = parallel.make_mesh("data=2,fsdp=4")
    state, metrics, tokens = one_iteration(make_state(remat=True, accum=2), mesh)
    out["data=2,fsdp=4"] = summary(state, metrics, tokens)
    out["fsdp_bytes"] = {str(d): b for d, b in parallel.bytes_per_device(state.params).items()}
    out["full_bytes"] = int(sum(x.nbytes for x in jax.tree.leaves(parallel.to_host(state.params))))
    out["fsdp_specs"] = sorted({str(x.sharding.spec) for x in jax.tree.leaves(state.params)})

    # Checkpoint written on the FSDP mesh, restored onto a data-only mesh of 4 devices.
    from ppojax.io.checkpoint import Checkpointer

    arrays = {"params": state.params, "opt_state": state.opt_state, "key": state.key}
    with Checkpointer(sys.argv[3], keep=1) as ck:
        ck.save(1, arrays)
        ck.wait()
    other = parallel.make_mesh("data=4", devices=jax.devices()[:4])
    target = parallel.shard_state(make_state(), other)
    target = {"params": target.params, "opt_state": target.opt_state, "key": target.key}
    with Checkpointer(sys.argv[3], keep=1) as ck:
        _, restored, _ = ck.restore(target)
    out["restore_equal"] = bool(np.array_equal(flat(parallel.to_host(restored["params"])),
                                               flat(parallel.to_host(state.params)))
                                and np.array_equal(flat(parallel.to_host(restored["opt_state"])),
                                                   flat(parallel.to_host(state.opt_state))))
    out["restore_on_target_mesh"] = all(x.sharding.mesh == other and len(x.sharding.device_set) == 4
                                        for x in jax.tree.leaves(restored["params"]))

    # The shard_map route (explicit psum of grads, global permutation from gathered rows) on 4 devices.
    mesh = parallel.make_mesh("data=4", devices=jax.devices()[:4])
    ids, mask = prompts()
    state, metrics = mesh_step.shard_map_iteration(make_state(axis_name="data"), jnp.asarray(ids),
                                                  jnp.asarray(mask), mesh)
    out["shard_map data=4"] = summary(state, metrics)
    return out


def process_mode(port, pid):
    distributed.initialize(distributed.DistributedConfig(coordinator=f"127.0.0.1:{port}", num_processes=2,
                                                         process_id=pid, timeout_s=90))
    mesh = parallel.make_mesh()  # 2 processes x 2 devices
    assert len(jax.devices()) == 4 and len(jax.local_devices()) == 2, jax.devices()
    state, metrics, _ = one_iteration(make_state(), mesh, jax.process_index(), jax.process_count(), halves=False)
    return summary(state, metrics)


if __name__ == "__main__":
    result = devices_mode(n_local) if mode == "devices" else process_mode(int(sys.argv[2]), int(sys.argv[3]))
    print(json.dumps(result))
