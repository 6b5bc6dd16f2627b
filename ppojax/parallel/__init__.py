"""Parallelism, below the iteration: ``sharding`` (the mesh, the sharding rules and the collectives) and
``distributed`` (starting a multi-process run). The iteration jitted over a mesh sits above the iteration, in
``ppojax.train.mesh_step``."""

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
    "replicate",
    "shard_batch",
    "shard_state",
    "state_shardings",
    "to_host",
]
