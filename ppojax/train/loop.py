"""One training step and the one training loop: the runner (``ppojax.train.run.Run.train``), sweeps, benchmarks
and long tests all drive :func:`train`.

``train_step`` is one PPO iteration whichever way the pieces are arranged: on one device or over a mesh, with a
jittable reward (the whole iteration in one jit) or a host reward (jitted rollout, scores on the host, jitted
update); with ``timing=True`` the three phases run as separate programs, each waited for, and their wall times come
back in the metrics (``time/rollout_s``, ``time/score_s``, ``time/update_s``).

``train`` runs iterations: it asks a step function for each one, pulls the metrics to the host once, checks them
for non-finite values, and hands an :class:`Iteration` to each callback (logging, samples, checkpoints). It owns
the one signal handler of the library: SIGTERM or SIGINT lets the current iteration finish, the callbacks see
``stopping=True`` (so a checkpoint callback saves), then the loop returns; a second SIGINT interrupts at once.
What differs between a run, a sweep and a benchmark is passed in (a step function, callbacks, options), never a
copy of this loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import time
from typing import Any, Callable, Iterator, Optional, Protocol, Sequence

import jax
import numpy as np

from ppojax.rl import iteration
from ppojax.rl.state import TrainState

HostReward = Callable[..., np.ndarray]
"""A reward computed on the host: ``(tokens [batch, T] np.int32, mask [batch, T], *, prompts=(ids, mask)) ->
scores [batch] float32``; the ``prompts`` keyword is passed only to a host reward whose ``uses_prompts`` is
True."""


class PromptSource(Protocol):
    """What the default step reads prompts from: ``batch(iteration) -> (ids, mask)``, this process's rows of the
    iteration's left-padded prompts (``ppojax.io.data.PromptLoader`` is one)."""

    def batch(self, iteration: int) -> tuple[np.ndarray, np.ndarray]: ...


def score_on_host(host_reward: HostReward, tokens, mask, prompt_ids, prompt_mask) -> np.ndarray:
    """``host_reward(tokens, mask)``, with ``prompts=(prompt_ids, prompt_mask)`` for a reward that wants them."""
    if getattr(host_reward, "uses_prompts", False):
        return host_reward(tokens, mask, prompts=(prompt_ids, prompt_mask))
    return host_reward(tokens, mask)


def _block(tree):
    return jax.block_until_ready(tree)


def train_step(state: TrainState, prompt_ids, prompt_mask, *, mesh: Optional[jax.sharding.Mesh] = None,
               host_reward: Optional[HostReward] = None, donate: bool = False,
               timing: bool = False) -> tuple[TrainState, dict]:
    """One PPO iteration: ``(state, prompts) -> (state, metrics)`` with metrics as scalar arrays.

    Args:
      state: the train state (laid out with ``ppojax.parallel.shard_state`` when ``mesh`` is given).
      prompt_ids, prompt_mask: ``[batch / samples_per_prompt, P]`` left-padded prompts (global arrays from
        ``ppojax.parallel.shard_batch`` when ``mesh`` is given).
      mesh: run over this device mesh (jit + ``NamedSharding``); None: the single-device jit.
      host_reward: score on the host between the jitted rollout and update (the state's reward is then unused);
        None: the state's jittable reward scores inside the one jitted iteration.
      donate: update the parameters and optimizer state in place (the state passed in is consumed).
      timing: run rollout, scoring and update as separate programs, wait for each and add their wall times to the
        metrics as ``time/rollout_s``, ``time/score_s``, ``time/update_s`` (floats). For benchmarks: the three
        programs compute what the fused iteration computes.
    """
    if mesh is None:
        from ppojax.rl.iteration import rollout, score_rollout, update

        fused = lambda: iteration.ppo_iteration(state, prompt_ids, prompt_mask, donate=donate)  # noqa: E731
        to_host = jax.device_get
        jit_score = lambda after, batch: score_rollout(after, batch)  # noqa: E731
        do_update = lambda after, batch, scores: update(after, batch, scores, donate=donate)  # noqa: E731
        do_rollout = lambda: rollout(state, prompt_ids, prompt_mask)  # noqa: E731
    else:
        from ppojax.parallel import to_host
        from ppojax.train import mesh_step as step

        fused = lambda: step.ppo_iteration(state, prompt_ids, prompt_mask, mesh, donate=donate)  # noqa: E731
        jit_score = lambda after, batch: step.score_rollout(after, batch, mesh)  # noqa: E731
        do_update = lambda after, batch, scores: step.update(after, batch, scores, mesh, donate=donate)  # noqa: E731
        do_rollout = lambda: step.rollout(state, prompt_ids, prompt_mask, mesh)  # noqa: E731

    if host_reward is None and not timing:
        return fused()
    t0 = time.perf_counter()
    after, batch = do_rollout()
    if timing:
        _block(batch)
    t1 = time.perf_counter()
    if host_reward is None:
        scores = jit_score(after, batch)
        if timing:
            _block(scores)
    else:
        # Every process scores the global batch (``to_host`` gathers it).
        tokens, mask, p_ids, p_mask = to_host((batch.tokens, batch.mask, batch.prompt_ids, batch.prompt_mask))
        scores = score_on_host(host_reward, tokens, mask, p_ids, p_mask)
    t2 = time.perf_counter()
    state, metrics = do_update(after, batch, scores)
    if timing:
        _block((state, metrics))
        t3 = time.perf_counter()
        metrics = {**metrics, "time/rollout_s": t1 - t0, "time/score_s": t2 - t1, "time/update_s": t3 - t2}
    return state, metrics


def metrics_to_host(metrics: dict) -> dict[str, float]:
    """An iteration's metrics as Python floats (one device-to-host transfer)."""
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


# ----------------------------------------------------------------------------------------------------------------
# The loop


@dataclasses.dataclass
class Iteration:
    """What a callback of :func:`train` sees after each iteration."""

    done: int
    """Iterations completed (1-based: the first iteration of a fresh run is 1)."""
    total: int
    """The run's last iteration."""
    state: Any
    """The state after this iteration (a ``TrainState``, or whatever a custom step carries)."""
    metrics: Any
    """This iteration's metrics as host floats (a dict; a custom step may return another structure)."""
    prompts: Any = None
    """The iteration's prompts ``(ids, mask)`` (default step), for callbacks that sample from the policy."""
    signal: Optional[int] = None
    """A signal (SIGTERM/SIGINT) arrived: this is the last iteration of this process (save what must be saved)."""
    error: Optional[str] = None
    """Set when the metrics are not finite: the loop stops after the callbacks (which should not checkpoint)."""

    @property
    def stopping(self) -> bool:
        """A signal arrived during this iteration."""
        return self.signal is not None

    @property
    def last(self) -> bool:
        """No iteration follows: the run's end, a signal or a non-finite metric."""
        return self.done >= self.total or self.stopping or self.error is not None


Callback = Callable[[Iteration], Optional[bool]]
"""Called after every iteration; a True return stops the loop after it."""


@dataclasses.dataclass
class LoopResult:
    """How :func:`train` ended."""

    state: Any
    """The last state."""
    done: int
    """Iterations completed, counting those before ``start``."""
    stop_reason: Optional[str] = None
    """None: ran to ``iterations``; ``'signal'``, ``'non-finite'`` or ``'callback'``."""
    signal: Optional[int] = None
    """The signal that stopped it, if any."""
    error: Optional[str] = None
    """The non-finite metric's message, if any."""


class StopSignal:
    """SIGTERM/SIGINT set a flag that the loop reads after each iteration; a second SIGINT raises
    ``KeyboardInterrupt`` at once. Installed only on the main thread, for the loop's duration (the previous
    handlers come back afterwards)."""

    def __init__(self):
        self.signal: Optional[int] = None

    def _handler(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum

    @contextlib.contextmanager
    def installed(self) -> Iterator["StopSignal"]:
        import threading

        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.signal(s, self._handler) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield self
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


def default_step(prompts: PromptSource, *, mesh: Optional[jax.sharding.Mesh] = None,
                 host_reward: Optional[HostReward] = None, donate: bool = True, timing: bool = False):
    """The step of a single run: ``step(state, it) -> (state, metrics as host floats, (ids, mask))``, reading
    ``prompts.batch(it)`` (``it`` counts from 0: a resumed run sees the same data) and laying the rows out over
    ``mesh``."""

    def step(state, it: int):
        ids, mask = prompts.batch(it)
        if mesh is not None:
            from ppojax.parallel import shard_batch

            ids, mask = shard_batch(mesh, ids, mask)  # this process's rows -> global arrays
        state, metrics = train_step(state, ids, mask, mesh=mesh, host_reward=host_reward, donate=donate,
                                    timing=timing)
        return state, metrics_to_host(metrics), (ids, mask)

    return step


def _check_finite(metrics, done: int) -> Optional[str]:
    try:
        iteration.check_metrics(metrics, done)
    except FloatingPointError as e:
        return str(e)
    return None


def train(state: Any, prompts: Optional[PromptSource] = None, *, iterations: int, start: int = 0,
          mesh: Optional[jax.sharding.Mesh] = None, host_reward: Optional[HostReward] = None, donate: bool = True,
          timing: bool = False, step: Optional[Callable] = None, callbacks: Sequence[Callback] = (),
          check: Optional[Callable[[Any, int], Optional[str]]] = _check_finite,
          handle_signals: bool = False) -> LoopResult:
    """Iterations ``start + 1 .. iterations``.

    Each iteration calls ``step(state, it)`` -- by default :func:`default_step` over ``prompts`` (with ``mesh``,
    ``host_reward``, ``donate`` and ``timing``) -- which returns ``(state, metrics, prompts)`` with the metrics on
    the host. The loop adds ``time_s`` (the iteration's wall time) to a dict of metrics, runs ``check(metrics,
    done)`` (default: :func:`ppojax.rl.iteration.check_metrics`; a message means non-finite), then calls every
    callback with an :class:`Iteration`. It stops after the callbacks when the run is done, a callback returns
    True, a metric is not finite, or (``handle_signals``) SIGTERM/SIGINT arrived.
    """
    if step is None:
        if prompts is None:
            raise TypeError("train needs prompts (a PromptSource) or a step function")
        step = default_step(prompts, mesh=mesh, host_reward=host_reward, donate=donate, timing=timing)
    stop = StopSignal()
    result = LoopResult(state=state, done=start)
    with stop.installed() if handle_signals else contextlib.nullcontext(stop):
        for it in range(start, iterations):
            t0 = time.time()
            state, metrics, batch = step(state, it)
            if isinstance(metrics, dict):
                metrics["time_s"] = time.time() - t0
            done = it + 1
            error = check(metrics, done) if check is not None else None
            info = Iteration(done=done, total=iterations, state=state, metrics=metrics, prompts=batch,
                             signal=stop.signal, error=error)
            asked = [bool(cb(info)) for cb in callbacks]
            result = LoopResult(state=state, done=done)
            if error is not None:
                result.stop_reason, result.error = "non-finite", error
                break
            if stop.signal is not None:
                result.stop_reason, result.signal = "signal", stop.signal
                break
            if any(asked):
                result.stop_reason = "callback"
                break
    return result


def sample_table(state: TrainState, prompt_ids, prompt_mask, *, mesh: Optional[jax.sharding.Mesh] = None,
                 host_reward: Optional[HostReward] = None):
    """A fresh rollout of the current policy and its scores, on the host: ``(Rollout of numpy arrays, scores)``.
    Seeded from the state, which is unchanged. Collective in a multi-process run: every process calls it."""
    if mesh is None:
        _, batch = iteration.rollout(state, prompt_ids, prompt_mask)
        host = jax.device_get(batch)
        scores = (score_on_host(host_reward, host.tokens, host.mask, host.prompt_ids, host.prompt_mask)
                  if host_reward else jax.device_get(iteration.score_rollout(state, batch)))
        return host, np.asarray(scores)
    from ppojax.parallel import to_host
    from ppojax.train import mesh_step as step

    _, batch = step.rollout(state, prompt_ids, prompt_mask, mesh)
    host = to_host(batch)
    scores = (score_on_host(host_reward, host.tokens, host.mask, host.prompt_ids, host.prompt_mask)
              if host_reward else to_host(step.score_rollout(state, batch, mesh)))
    return host, np.asarray(scores)


__all__ = ["Callback", "HostReward", "Iteration", "LoopResult", "PromptSource", "StopSignal", "default_step",
           "metrics_to_host", "sample_table", "score_on_host", "train", "train_step"]
