"""The device mesh, the sharding rules and the collectives: the layer BELOW the iteration.

Design. The iteration (``ppojax.rl.iteration``) is written once, for one global batch; ``ppojax.train.mesh_step``
runs it with ``jax.jit`` and ``NamedSharding`` (GSPMD) over a named ``(data, fsdp)`` mesh:

- The prompt batch, hence every rollout array, is sharded by rows over *both* mesh axes (``data`` and ``fsdp``:
  FSDP is data parallelism whose parameters are also sharded).
- Every parameter (actor, critic, reference, reward model) and every optimizer moment is sharded over ``fsdp`` on
  its largest dimension that divides evenly (``param_spec``), replicated over ``data``.
- Because the program is the global one, everything that must not depend on the device count is global by
  construction: per-example sampling keys come from ``fold_in(key, global row index)``, whitening and metrics
  reduce over the whole batch, and each epoch's minibatch permutation is a permutation of the global batch.
- Gradients become global where the row-sharded loss meets the fsdp-sharded parameters: XLA inserts one
  all-reduce over ``data`` (a reduce-scatter over ``fsdp``) for the gradient of each parameter, and all-gathers
  a layer's fsdp-sharded weights before they are used (``Collectives.gradients`` marks the spot).

The ``shard_map`` route stays supported for code that wants explicit collectives (``ppojax.train.mesh_step.
shard_map_iteration``): the state's setup then carries ``Collectives(axis_name)``, the one object through which the
iteration makes statistics and gradients global.
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
    prompts = ppo.batch_size // ppo.samples_per_prompt
    if prompts % n:
        raise MeshError(f"the {prompts} prompts of an iteration (ppo.batch_size / ppo.samples_per_prompt) do not "
                        f"split over {where}")
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
# Collectives: the one place where statistics and gradients become global


@dataclasses.dataclass(frozen=True)
class Collectives:
    """How the iteration makes a value global over the devices that share the batch.

    ``axis_name=None`` (the default, and what jit + ``NamedSharding`` uses): the program is the global one, so every
    reduction is already global and each method is the identity. With ``axis_name`` set, the iteration runs inside
    ``jax.shard_map`` over that mesh axis with the batch's rows split over it, and each method is the collective
    that makes a per-device value global. The iteration calls these, never ``psum`` directly.
    """

    axis_name: Optional[str] = None

    def sum(self, x):
        """Sum over devices (a per-device share of a global sum becomes the global sum)."""
        return x if self.axis_name is None else jax.lax.psum(x, self.axis_name)

    def mean(self, x):
        """Mean over devices of per-device means of equal-size shards: the global mean."""
        return x if self.axis_name is None else jax.lax.pmean(x, self.axis_name)

    def max(self, x):
        return x if self.axis_name is None else jax.lax.pmax(x, self.axis_name)

    def gather_rows(self, tree):
        """Every device's rows, concatenated in device order (the global batch on every device)."""
        if self.axis_name is None:
            return tree
        return jax.tree.map(lambda x: jax.lax.all_gather(x, self.axis_name, tiled=True), tree)

    def device_count(self):
        return 1 if self.axis_name is None else jax.lax.axis_size(self.axis_name)

    def device_index(self):
        return 0 if self.axis_name is None else jax.lax.axis_index(self.axis_name)

    def local_gradients(self, params):
        """Mark replicated params device-varying before differentiating: with ``check_vma=True`` the gradient of a
        device-invariant parameter comes out already summed over the axis, and :meth:`gradients`'s psum would then
        multiply it by the device count."""
        return params if self.axis_name is None else jax.lax.pcast(params, self.axis_name, to="varying")

    def gradients(self, grads):
        """The global gradient. Each device's loss is its share of the global mean (a sum over local tokens divided
        by the global count), so the global gradient is the SUM over devices: psum, not pmean. Under jit +
        NamedSharding (axis None) XLA inserts the all-reduce over ``data`` (reduce-scatter over ``fsdp``) itself,
        where the row-sharded loss meets the fsdp-sharded parameters."""
        return self.sum(grads)


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
    "replicate",
    "shard_batch",
    "shard_state",
    "state_shardings",
    "to_host",
    "Collectives",
]
