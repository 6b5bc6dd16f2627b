"""Parallelism: a named ``(data, fsdp)`` device mesh, sharding rules, and the PPO iteration jitted over it.

Design. The iteration is written once, for one global batch (``ppojax.ppo``); this module runs it with
``jax.jit`` and ``NamedSharding`` (GSPMD) rather than inside ``shard_map``:

- The prompt batch, hence every rollout array, is sharded by rows over *both* mesh axes (``data`` and ``fsdp``:
  FSDP is data parallelism whose parameters are also sharded).
- Every parameter (actor, critic, reference, reward model) and every optimizer moment is sharded over ``fsdp`` on
  its largest dimension that divides evenly (``param_spec``), replicated over ``data``.
- Because the program is the global one, everything that must not depend on the device count is global by
  construction: per-example sampling keys come from ``fold_in(key, global row index)``, whitening and metrics
  reduce over the whole batch, and each epoch's minibatch permutation is a permutation of the global batch.
- Gradients become global where the row-sharded loss meets the fsdp-sharded parameters: XLA inserts one
  all-reduce over ``data`` (a reduce-scatter over ``fsdp``) for the gradient of each parameter, and all-gathers
  a layer's fsdp-sharded weights before they are used. ``ppojax.ppo._minibatch_update`` marks the spot.

Why not ``shard_map`` here: with sharded parameters ``shard_map`` needs hand-written all-gathers per layer (or a
partially-manual mesh), while sharding annotations give FSDP, the global permutation and multi-host arrays for
free. The ``shard_map`` route stays available for code that wants explicit collectives: ``ppo``'s functions take
``PPOSetup.axis_name`` and then ``psum`` statistics and gradients themselves (``shard_map_iteration`` below).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")  # rows of every batch array are split over both axes


class MeshError(ValueError):
    """A mesh or batch that cannot work on these devices; raised before anything compiles."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshConfig:
    """Shape of the device mesh. ``data * fsdp`` must equal the number of devices (all processes together)."""

    data: int = -1
    """Devices on the data axis; -1 means every device not used by ``fsdp`` (the default: all on ``data``)."""
    fsdp: int = 1
    """Devices each parameter is sharded over (1: parameters replicated)."""

    def __post_init__(self):
        if not isinstance(self.fsdp, int) or self.fsdp < 1:
            raise MeshError(f"mesh fsdp must be an int >= 1, got {self.fsdp!r}")
        if not isinstance(self.data, int) or (self.data < 1 and self.data != -1):
            raise MeshError(f"mesh data must be an int >= 1 or -1 (all remaining devices), got {self.data!r}")

    @classmethod
    def parse(cls, text: Optional[str]) -> "MeshConfig":
        """``'data=4,fsdp=2'`` (either axis may be left out; ``''``/None: every device on ``data``)."""
        if not text:
            return cls()
        values = {}
        for part in text.split(","):
            m = re.fullmatch(r"\s*(\w+)\s*=\s*(-?\d+)\s*", part)
            if not m or m.group(1) not in MESH_AXES:
                raise MeshError(f"mesh {text!r}: expected 'data=N,fsdp=M' (axes {', '.join(MESH_AXES)}), "
                                f"got {part.strip()!r}")
            values[m.group(1)] = int(m.group(2))
        return cls(**values)

    def shape(self, n_devices: int) -> Tuple[int, int]:
        """``(data, fsdp)`` on ``n_devices``; raises ``MeshError`` when they do not multiply to it."""
        data = self.data
        if data == -1:
            if n_devices % self.fsdp:
                raise MeshError(f"mesh fsdp={self.fsdp} does not divide the {n_devices} devices")
            data = n_devices // self.fsdp
        if data * self.fsdp != n_devices:
            raise MeshError(f"mesh data={data} x fsdp={self.fsdp} = {data * self.fsdp} devices, but "
                            f"{n_devices} are visible ({jax.process_count()} process(es)); make the product equal "
                            "the device count, or leave data=-1")
        return data, self.fsdp


def make_mesh(config: MeshConfig | str | None = None, devices: Optional[Sequence[Any]] = None) -> jax.sharding.Mesh:
    """A ``(data, fsdp)`` mesh over ``devices`` (default: every device of every process), axes in Auto mode."""
    if not isinstance(config, MeshConfig):
        config = MeshConfig.parse(config)
    devices = list(jax.devices() if devices is None else devices)
    shape = config.shape(len(devices))
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)


def batch_shards(mesh: jax.sharding.Mesh) -> int:
    """How many pieces every batch is split into (``data * fsdp``)."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def check_batch(ppo, optimizer, mesh: jax.sharding.Mesh) -> None:
    """Raise ``MeshError`` unless the batch, each minibatch and each micro-batch split evenly over the mesh."""
    n = batch_shards(mesh)
    where = f"the {n} batch shards of mesh {dict(mesh.shape)}"
    if ppo.batch_size % n:
        raise MeshError(f"ppo.batch_size={ppo.batch_size} does not split over {where}")
    if ppo.minibatch_size % n:
        raise MeshError(f"ppo.minibatch_size={ppo.minibatch_size} does not split over {where}")
    micro, accum = ppo.minibatch_size // (optimizer.grad_accum_steps or 1), optimizer.grad_accum_steps
    if ppo.minibatch_size % accum or micro % n:
        raise MeshError(f"a micro-batch of ppo.minibatch_size / optimizer.grad_accum_steps = "
                        f"{ppo.minibatch_size}/{accum} does not split over {where}")


# ----------------------------------------------------------------------------------------------------------------
# Sharding rules


def param_spec(shape: Sequence[int], fsdp: int) -> P:
    """Shard the largest dimension that ``fsdp`` divides (the first of equals) over ``fsdp``; else replicate.

    Scalars, small vectors that do not divide and ``fsdp == 1`` stay replicated. The rule only looks at the shape,
    so an optimizer moment gets the spec of its parameter.
    """
    if fsdp == 1 or not shape:
        return P()
    candidates = [(size, -i) for i, size in enumerate(shape) if size % fsdp == 0 and size >= fsdp]
    if not candidates:
        return P()
    _, neg_i = max(candidates)
    spec = [None] * len(shape)
    spec[-neg_i] = "fsdp"
    return P(*spec)


def _leaf_sharding(mesh: jax.sharding.Mesh, x) -> Any:
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return NamedSharding(mesh, P())
    if isinstance(x, (jax.Array, np.ndarray)) and jnp.issubdtype(x.dtype, jnp.floating):
        return NamedSharding(mesh, param_spec(x.shape, mesh.shape["fsdp"]))
    return NamedSharding(mesh, P())


def state_shardings(state, mesh: jax.sharding.Mesh):
    """A pytree like ``state`` (a ``TrainState``) of ``NamedSharding``: float arrays by ``param_spec``, the rest
    (keys, counters, the KL coefficient) replicated."""
    return jax.tree.map(lambda x: _leaf_sharding(mesh, x), state)


def shard_state(state, mesh: jax.sharding.Mesh):
    """``state`` laid out on ``mesh``. Every process must pass the same values (same seed / same checkpoint)."""
    shardings = state_shardings(state, mesh)
    return jax.tree.map(_put_global, state, shardings)


def _put_global(x, sharding: NamedSharding):
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    # Multi-process: every process holds the full value; keep the slices that its own devices need.
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        impl = jax.random.key_impl(x)
        data = _put_global(np.asarray(jax.random.key_data(x)), sharding)
        return jax.random.wrap_key_data(data, impl=impl)
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def shard_batch(mesh: jax.sharding.Mesh, *local_arrays: np.ndarray):
    """Global row-sharded arrays from each process's rows (``PromptLoader.batch``: process ``i`` holds rows
    ``[i * n / count, (i + 1) * n / count)`` of the global batch, which is exactly its devices' share)."""
    sharding = batch_sharding(mesh)
    out = []
    for x in local_arrays:
        x = np.asarray(x)
        global_shape = (x.shape[0] * jax.process_count(), *x.shape[1:])
        out.append(jax.make_array_from_process_local_data(sharding, x, global_shape))
    return out[0] if len(out) == 1 else tuple(out)


def replicate(mesh: jax.sharding.Mesh, x):
    """A host value (the same on every process) as a replicated global array."""
    return _put_global(jnp.asarray(x) if jax.process_count() == 1 else np.asarray(x), NamedSharding(mesh, P()))


def to_host(tree):
    """Every leaf as a full numpy array on every process (collective in a multi-process run: all must call it)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def constrain_rows(tree, leading: int = 0):
    """Inside a jit run under ``jax.set_mesh(mesh)``: keep the rows (dimension ``leading``) of every array split
    over the batch axes. Without an ambient ``(data, fsdp)`` mesh it returns ``tree`` unchanged, so the one-device
    path compiles exactly as before."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or tuple(mesh.axis_names) != MESH_AXES or mesh.are_all_axes_manual:
        return tree

    def one(x):
        spec = P(*([None] * leading), BATCH_AXES)
        return jax.lax.with_sharding_constraint(x, spec)

    return jax.tree.map(one, tree)


# ----------------------------------------------------------------------------------------------------------------
# The iteration over a mesh

_JITS: dict = {}


def _jitted(kind: str, state, mesh: jax.sharding.Mesh, donate: bool = False):
    from ppojax import ppo

    key = (kind, state.setup, mesh, donate)
    fn = _JITS.get(key)
    if fn is None:
        shardings = state_shardings(state, mesh)
        replicated = NamedSharding(mesh, P())
        rows = batch_sharding(mesh)
        # Inputs arrive laid out (shard_state / shard_batch); the outputs keep the state's layout, so the next
        # iteration reuses this executable. Only the fields a phase changes leave the jit (ppo.jit_state_fn).
        fn_, changes, out = {"iteration": (ppo._iteration, ppo.UPDATE_CHANGES, replicated),
                             "rollout": (ppo._rollout, ppo.ROLLOUT_CHANGES, rows),
                             "update": (ppo._update, ppo.UPDATE_CHANGES, replicated)}[kind]
        changed = {k: getattr(shardings, k) for k in changes}
        fn = ppo.jit_state_fn(fn_, changes, donate=donate, out_shardings=(changed, out))
        _JITS[key] = fn
    return fn


def ppo_iteration(state, prompt_ids, prompt_mask, mesh: jax.sharding.Mesh, *, donate: bool = False):
    """``ppojax.ppo.ppo_iteration`` over ``mesh``: the state keeps its ``state_shardings`` layout, prompts are row
    sharded (``shard_batch``), metrics come back replicated (readable on every process). ``donate`` as in
    ``ppojax.ppo.ppo_iteration``."""
    with jax.set_mesh(mesh):
        return _jitted("iteration", state, mesh, donate)(state, prompt_ids, prompt_mask)


def rollout(state, prompt_ids, prompt_mask, mesh: jax.sharding.Mesh):
    """``ppojax.ppo.rollout`` over ``mesh`` (the rollout stays row-sharded)."""
    with jax.set_mesh(mesh):
        return _jitted("rollout", state, mesh)(state, prompt_ids, prompt_mask)


def update(state, rollout_batch, scores, mesh: jax.sharding.Mesh, *, donate: bool = False):
    """``ppojax.ppo.update`` over ``mesh``; ``scores`` is a host array of the global batch (same on every process)
    or a row-sharded array. ``donate`` as in ``ppojax.ppo.ppo_iteration``."""
    if not isinstance(scores, jax.Array):
        scores = replicate(mesh, np.asarray(scores, np.float32))
    with jax.set_mesh(mesh):
        return _jitted("update", state, mesh, donate)(state, rollout_batch, scores)


def shard_map_iteration(state, prompt_ids, prompt_mask, mesh: jax.sharding.Mesh, check_vma: bool = False):
    """The same iteration written with explicit collectives: ``jax.shard_map`` over the mesh's ``data`` axis
    (parameters replicated; ``state.setup.axis_name`` must be ``'data'``). ``ppo`` then ``psum``-s statistics and
    gradients itself. Kept as the reference that the GSPMD path is tested against."""
    from ppojax import ppo

    if state.setup.axis_name != "data":
        raise ValueError("shard_map_iteration needs a state created with axis_name='data'")
    if mesh.shape["fsdp"] != 1:
        raise MeshError("shard_map_iteration replicates parameters: use a mesh with fsdp=1")
    key = ("shard_map", state.setup, mesh, check_vma)
    fn = _JITS.get(key)
    if fn is None:
        rows = P("data")
        fn = jax.jit(jax.shard_map(ppo._iteration, mesh=mesh, in_specs=(P(), rows, rows), out_specs=(P(), P()),
                                   check_vma=check_vma))
        _JITS[key] = fn
    return fn(state, prompt_ids, prompt_mask)


# ----------------------------------------------------------------------------------------------------------------
# Memory accounting


def bytes_per_device(tree) -> dict:
    """``{device id: bytes}`` that the arrays of ``tree`` occupy on each addressable device (shard sizes)."""
    out: dict = {}
    for leaf in jax.tree.leaves(tree):
        if not isinstance(leaf, jax.Array):
            continue
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        for shard in leaf.addressable_shards:
            out[shard.device.id] = out.get(shard.device.id, 0) + shard.data.nbytes
    return out


def env_mesh() -> Optional[str]:
    """``PPOJAX_MESH`` (e.g. ``data=4,fsdp=2``), the default of the runner's ``--mesh``."""
    return os.environ.get("PPOJAX_MESH") or None


__all__ = [
    "BATCH_AXES",
    "MESH_AXES",
    "MeshConfig",
    "MeshError",
    "batch_shards",
    "batch_sharding",
    "bytes_per_device",
    "check_batch",
    "constrain_rows",
    "make_mesh",
    "param_spec",
    "ppo_iteration",
    "replicate",
    "rollout",
    "shard_batch",
    "shard_map_iteration",
    "shard_state",
    "state_shardings",
    "to_host",
    "update",
]
