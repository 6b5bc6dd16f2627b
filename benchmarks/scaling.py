"""Scaling shape check on CPU virtual devices: per-device memory and iteration time vs device count and mesh.

Not a speed claim: the "devices" are XLA host-platform slices of the same 2 shared cores, so time per iteration can
only grow with the device count (more collectives, same compute). What the numbers do show is the *shape*: with
``fsdp = k`` the parameter + optimizer bytes per device fall ~k-fold, and with ``data = k`` the batch rows per device
fall k-fold while the state stays whole.

Each mesh runs in its own subprocess (``XLA_FLAGS=--xla_force_host_platform_device_count=N``). Per-device memory is
the sum of the addressable shard sizes of the live train state (``device.memory_stats()`` is None on the CPU
backend, so peak temporaries inside the step are not measured).

    python benchmarks/scaling.py            # writes benchmarks/results/scaling_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import _env
import _loop

MESHES = [(1, "data=1"), (2, "data=2"), (4, "data=4"), (8, "data=8"), (8, "data=4,fsdp=2"), (8, "data=2,fsdp=4"),
          (8, "data=1,fsdp=8")]


def child(n: int, mesh_text: str, iters: int) -> dict:
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n}"
    import jax
    import jax.numpy as jnp
    import numpy as np

    import ppojax
    from ppojax import parallel
    from ppojax.rl import rewards
    from ppojax.rl.kl import KLControlConfig
    from ppojax.rl.config import OptimizerConfig, PPOConfig
    from ppojax.rl.state import create_train_state
    from ppojax.train import loop

    model = ppojax.GPT2Config(vocab_size=1024, n_positions=64, n_embd=128, n_layer=2, n_head=4)
    cfg = PPOConfig(batch_size=32, minibatch_size=16, ppo_epochs=2, response_length=16, temperature=1.0,
                    kl=KLControlConfig(kind="fixed", init_coef=0.05))
    state = create_train_state(model, ppojax.init_params(model, jax.random.key(1)), ppo=cfg,
                               reward=rewards.FunctionReward(lambda t, m: (t < 100).mean(-1).astype(jnp.float32)),
                               key=jax.random.key(0), optimizer=OptimizerConfig(learning_rate=1e-3))
    mesh = parallel.make_mesh(mesh_text)
    parallel.check_batch(cfg, OptimizerConfig(), mesh)
    state = parallel.shard_state(state, mesh)
    rng = np.random.RandomState(0)
    prompts = _loop.Prompts(rng.randint(0, 1024, (32, 32)).astype(np.int32), on_device=False)
    times, last = [], {}

    def record(info):
        times.append(info.metrics["time_s"])
        last.update(info.metrics)

    # The library's loop over the mesh (it lays each batch's rows out with shard_batch); the first iteration
    # compiles.
    state = loop.train(state, prompts, iterations=iters + 1, mesh=mesh, donate=False, callbacks=[record],
                       check=None).state
    compile_s, times = times[0], times[1:]
    state_bytes = parallel.bytes_per_device({"params": state.params, "opt": state.opt_state,
                                             "ref": state.ref_params})
    stats = jax.devices()[0].memory_stats()
    return {"devices": n, "mesh": mesh_text, "first_call_s": round(compile_s, 2),
            "iteration_s_median": round(sorted(times)[len(times) // 2], 3),
            "state_bytes_per_device_max": max(state_bytes.values()),
            "state_bytes_total": sum(state_bytes.values()),
            "batch_rows_per_device": 32 // parallel.batch_shards(mesh),
            "memory_stats_available": stats is not None,
            "score_mean": last["score_mean"]}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "scaling_cpu.json"))
    p.add_argument("--child", nargs=2, default=None)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(int(args.child[0]), args.child[1], args.iters)))
        return
    before = _env.load_sample()
    _env.warn_if_busy(before)
    rows = []
    for n, mesh in MESHES:
        out = subprocess.run([sys.executable, __file__, "--child", str(n), mesh, "--iters", str(args.iters)],
                             capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(out.stderr[-2000:])
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    result = {"benchmark": "scaling", "note": __doc__.split("\n\n")[1].replace("\n", " "), "results": rows,
              "machine": _env.machine_info(), "versions": _env.versions(("jax", "jaxlib", "flax", "optax")),
              "date": _env.now_utc(), "load_before": before, "load_after": _env.load_sample()}
    _env.write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
