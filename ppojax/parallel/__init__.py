"""Parallelism. ``sharding`` (the mesh, the sharding rules and the collectives) sits below the iteration;
``step`` (the iteration jitted over a mesh, and the ``shard_map`` path) sits above it; ``distributed`` starts a
multi-process run."""

from ppojax.parallel import distributed
from ppojax.parallel.sharding import (
    BATCH_AXES,
    MESH_AXES,
    MeshConfig,
    MeshError,
    batch_shards,
    batch_sharding,
    bytes_per_device,
    check_batch,
    constrain_rows,
    env_mesh,
    make_mesh,
    param_spec,
    replicate,
    shard_batch,
    shard_state,
    state_shardings,
    to_host,
)
from ppojax.parallel.sharding import Collectives

_STEP = ("ppo_iteration", "rollout", "score_rollout", "shard_map_iteration", "update")


def __getattr__(name):
    # The mesh-jitted phases live above the iteration, which imports the sharding rules from this package: loading
    # them on first use keeps the import graph a DAG (sharding -> rl.iteration -> parallel.step).
    if name in _STEP or name == "step":
        import importlib

        step = importlib.import_module("ppojax.parallel.step")
        return step if name == "step" else getattr(step, name)
    raise AttributeError(f"module 'ppojax.parallel' has no attribute {name!r}")

__all__ = [
    "BATCH_AXES",
    "Collectives",
    "MESH_AXES",
    "MeshConfig",
    "MeshError",
    "batch_shards",
    "batch_sharding",
    "bytes_per_device",
    "check_batch",
    "constrain_rows",
    "distributed",
    "env_mesh",
    "make_mesh",
    "param_spec",
    "ppo_iteration",
    "replicate",
    "rollout",
    "score_rollout",
    "shard_batch",
    "shard_map_iteration",
    "shard_state",
    "state_shardings",
    "to_host",
    "update",
]
