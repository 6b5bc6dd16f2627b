"""The PPO phases jitted over a device mesh: the layer ABOVE the iteration.

``ppo_iteration``, ``rollout`` and ``update`` here are ``ppojax.rl.iteration``'s, compiled with ``jax.jit`` and
``NamedSharding`` over a ``(data, fsdp)`` mesh (``ppojax.parallel.sharding`` has the rules): the state keeps its
``state_shardings`` layout from call to call, prompts and rollouts are row-sharded, metrics come back replicated.
``shard_map_iteration`` runs the same iteration with explicit collectives instead (``jax.shard_map`` over the
``data`` axis, parameters replicated), for code that wants them; the two are tested against each other.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from ppojax.parallel.sharding import MeshError, batch_sharding, replicate, state_shardings
from ppojax.rl import iteration

_JITS: dict = {}


def _jitted(phase: str, state, mesh: jax.sharding.Mesh, donate: bool = False):
    key = (phase, state.setup, mesh, donate)
    fn = _JITS.get(key)
    if fn is None:
        shardings = state_shardings(state, mesh)
        out = {"iteration": NamedSharding(mesh, P()), "rollout": batch_sharding(mesh),
               "update": NamedSharding(mesh, P()), "episode": batch_sharding(mesh)}[phase]
        changes = iteration.CHANGES[phase]
        # Inputs arrive laid out (shard_state / shard_batch); the outputs keep the state's layout, so the next
        # iteration reuses this executable. Only the fields a phase changes leave the jit.
        changed = {k: getattr(shardings, k) for k in changes}
        fn = iteration.jit_state_fn(iteration.PHASES[phase], changes, donate=donate, out_shardings=(changed, out),
                                    name=f"mesh/{phase}")
        _JITS[key] = fn
    return fn


def ppo_iteration(state, prompt_ids, prompt_mask, mesh: jax.sharding.Mesh, *, donate: bool = False):
    """``ppojax.ppo_iteration`` over ``mesh``: the state keeps its ``state_shardings`` layout, prompts are row
    sharded (``shard_batch``), metrics come back replicated (readable on every process). ``donate`` as in
    ``ppojax.ppo_iteration``."""
    with jax.set_mesh(mesh):
        return _jitted("iteration", state, mesh, donate)(state, prompt_ids, prompt_mask)


def rollout(state, prompt_ids, prompt_mask, mesh: jax.sharding.Mesh):
    """``ppojax.rollout`` over ``mesh`` (the rollout stays row-sharded)."""
    with jax.set_mesh(mesh):
        return _jitted("rollout", state, mesh)(state, prompt_ids, prompt_mask)


def update(state, rollout_batch, scores, mesh: jax.sharding.Mesh, *, donate: bool = False):
    """``ppojax.update`` over ``mesh``; ``scores`` is a host array of the global batch (same on every process)
    or a row-sharded array. ``donate`` as in ``ppojax.ppo_iteration``."""
    if not isinstance(scores, jax.Array):
        scores = replicate(mesh, np.asarray(scores, np.float32))
    with jax.set_mesh(mesh):
        return _jitted("update", state, mesh, donate)(state, rollout_batch, scores)


def episode_rollout(state, *arrays, mesh: jax.sharding.Mesh):
    """``ppojax.rl.iteration``'s rollout of played multi-turn episodes (``ppojax.train.multiturn``) over ``mesh``:
    the episode's row-sharded arrays in, a row-sharded ``Rollout`` out."""
    with jax.set_mesh(mesh):
        return _jitted("episode", state, mesh)(state, *arrays)[1]


def score_rollout(state, rollout_batch, mesh: jax.sharding.Mesh):
    """The scores of a rollout under the state's jittable reward, over ``mesh``."""
    with jax.set_mesh(mesh):
        return iteration.score_rollout(state, rollout_batch)


def shard_map_iteration(state, prompt_ids, prompt_mask, mesh: jax.sharding.Mesh, check_vma: bool = False):
    """The same iteration written with explicit collectives: ``jax.shard_map`` over the mesh's ``data`` axis
    (parameters replicated; the state must be created with ``axis_name='data'``, which gives its setup the
    collectives that ``psum`` statistics and gradients). Kept as the reference the GSPMD path is tested against."""
    if state.setup.axis_name != "data":
        raise ValueError("shard_map_iteration needs a state created with axis_name='data'")
    if mesh.shape["fsdp"] != 1:
        raise MeshError("shard_map_iteration replicates parameters: use a mesh with fsdp=1")
    key = ("shard_map", state.setup, mesh, check_vma)
    fn = _JITS.get(key)
    if fn is None:
        rows = P("data")
        changes = iteration.CHANGES["iteration"]

        def transform(inner):
            # (setup, changing, frozen, prompts, mask): setup is static (closed over by jit's static_argnums).
            def mapped(setup, changing, frozen, ids, mask):
                return jax.shard_map(lambda c, f, i, m: inner(setup, c, f, i, m), mesh=mesh,
                                     in_specs=(P(), P(), rows, rows), out_specs=(P(), P()),
                                     check_vma=check_vma)(changing, frozen, ids, mask)
            return mapped

        fn = iteration.jit_state_fn(iteration.PHASES["iteration"], changes, name="shard_map/iteration",
                                    transform=transform)
        _JITS[key] = fn
    return fn(state, prompt_ids, prompt_mask)


__all__ = ["episode_rollout", "ppo_iteration", "rollout", "score_rollout", "shard_map_iteration", "update"]
