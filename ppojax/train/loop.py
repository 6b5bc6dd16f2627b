"""One training step and one training loop, shared by the runner, the sweeps, the benchmarks and the tests.

``train_step`` is one PPO iteration whichever way the pieces are arranged: on one device or over a mesh, with a
jittable reward (the whole iteration in one jit) or a host reward (jitted rollout, scores on the host, jitted
update). ``train`` runs iterations over a prompt source, pulls the metrics to the host once per iteration and hands
them to a callback, which logs, checkpoints or stops the loop.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional, Protocol

import jax
import numpy as np

from ppojax.rl import iteration
from ppojax.rl.state import TrainState

HostReward = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""A reward computed on the host: ``(tokens [batch, T] np.int32, mask [batch, T]) -> scores [batch] float32``."""


class PromptSource(Protocol):
    """What ``train`` reads prompts from: ``batch(iteration) -> (ids, mask)``, this process's rows of the
    iteration's left-padded prompts (``ppojax.io.data.PromptLoader`` is one)."""

    def batch(self, iteration: int) -> tuple[np.ndarray, np.ndarray]: ...


def train_step(state: TrainState, prompt_ids, prompt_mask, *, mesh: Optional[jax.sharding.Mesh] = None,
               host_reward: Optional[HostReward] = None, donate: bool = False) -> tuple[TrainState, dict]:
    """One PPO iteration: ``(state, prompts) -> (state, metrics)`` with metrics as scalar arrays.

    Args:
      state: the train state (laid out with ``ppojax.parallel.shard_state`` when ``mesh`` is given).
      prompt_ids, prompt_mask: ``[batch / samples_per_prompt, P]`` left-padded prompts (global arrays from
        ``ppojax.parallel.shard_batch`` when ``mesh`` is given).
      mesh: run over this device mesh (jit + ``NamedSharding``); None: the single-device jit.
      host_reward: score on the host between the jitted rollout and update (the state's reward is then unused);
        None: the state's jittable reward scores inside the one jitted iteration.
      donate: update the parameters and optimizer state in place (the state passed in is consumed).
    """
    if mesh is None:
        if host_reward is None:
            return iteration.ppo_iteration(state, prompt_ids, prompt_mask, donate=donate)
        after, batch = iteration.rollout(state, prompt_ids, prompt_mask)
        scores = host_reward(*jax.device_get((batch.tokens, batch.mask)))
        return iteration.update(after, batch, scores, donate=donate)
    from ppojax.parallel import to_host
    from ppojax.train import mesh_step as step

    if host_reward is None:
        return step.ppo_iteration(state, prompt_ids, prompt_mask, mesh, donate=donate)
    after, batch = step.rollout(state, prompt_ids, prompt_mask, mesh)
    tokens, mask = to_host((batch.tokens, batch.mask))
    scores = host_reward(tokens, mask)  # every process scores the global batch
    return step.update(after, batch, scores, mesh, donate=donate)


def metrics_to_host(metrics: dict) -> dict[str, float]:
    """An iteration's metrics as Python floats (one device-to-host transfer)."""
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


def train(state: TrainState, prompts: PromptSource, *, iterations: int, start: int = 0,
          mesh: Optional[jax.sharding.Mesh] = None, host_reward: Optional[HostReward] = None, donate: bool = True,
          on_iteration: Optional[Callable[[int, TrainState, dict, Any], bool]] = None) -> TrainState:
    """Iterations ``start + 1 .. iterations`` of :func:`train_step`.

    Each iteration reads ``prompts.batch(i)`` (``i`` counts from 0: a resumed run sees the same data), runs the
    step, pulls its metrics to the host as floats (plus ``time_s``, the iteration's wall time) and calls
    ``on_iteration(done, state, metrics, (ids, mask))``; a True return stops the loop after that iteration.
    Returns the last state.
    """
    for it in range(start, iterations):
        t0 = time.time()
        ids, mask = prompts.batch(it)
        if mesh is not None:
            from ppojax.parallel import shard_batch

            ids, mask = shard_batch(mesh, ids, mask)  # this process's rows -> global arrays
        state, metrics = train_step(state, ids, mask, mesh=mesh, host_reward=host_reward, donate=donate)
        metrics = metrics_to_host(metrics)
        metrics["time_s"] = time.time() - t0
        if on_iteration is not None and on_iteration(it + 1, state, metrics, (ids, mask)):
            break
    return state


def sample_table(state: TrainState, prompt_ids, prompt_mask, *, mesh: Optional[jax.sharding.Mesh] = None,
                 host_reward: Optional[HostReward] = None):
    """A fresh rollout of the current policy and its scores, on the host: ``(Rollout of numpy arrays, scores)``.
    Seeded from the state, which is unchanged. Collective in a multi-process run: every process calls it."""
    if mesh is None:
        _, batch = iteration.rollout(state, prompt_ids, prompt_mask)
        host = jax.device_get(batch)
        scores = host_reward(host.tokens, host.mask) if host_reward else jax.device_get(
            iteration.score_rollout(state, batch))
        return host, np.asarray(scores)
    from ppojax.parallel import to_host
    from ppojax.train import mesh_step as step

    _, batch = step.rollout(state, prompt_ids, prompt_mask, mesh)
    host = to_host(batch)
    scores = host_reward(host.tokens, host.mask) if host_reward else to_host(step.score_rollout(state, batch, mesh))
    return host, np.asarray(scores)


__all__ = ["HostReward", "PromptSource", "metrics_to_host", "sample_table", "train", "train_step"]
