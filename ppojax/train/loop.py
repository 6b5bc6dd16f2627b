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
import re
import signal
import threading
import time
from typing import Any, Callable, Iterator, Optional, Protocol, Sequence

import jax
import numpy as np

from ppojax.registry import error_detail
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


class HostCallError(RuntimeError):
    """A host callback (a host reward) that raised, ran past its timeout, or was abandoned after a signal. ``label``
    names it (its config key, e.g. ``reward.kind='vader'``), ``how`` says what happened; :meth:`line` is the one
    line a user sees."""

    def __init__(self, label: str, how: str, detail: str = ""):
        self.label, self.how, self.detail = label, how, detail
        super().__init__(self.line())

    def line(self, iteration: Optional[int] = None) -> str:
        at = f" at iteration {iteration}" if iteration is not None else ""
        return f"{self.label} {self.how}{at}{': ' + self.detail if self.detail else ''}"


SIGNAL_GRACE_S = 5.0
"""After SIGTERM/SIGINT, how long a running host call may still take before it is abandoned (the run then ends
with exit code 1, keeping its last good checkpoint)."""
_WAIT_SLICE_S = 0.05
_STOPS: list["StopSignal"] = []  # the loop's installed signal handler, read while a host call runs


def call_on_host(fn: Callable, *args, label: str, timeout_s: Optional[float] = None,
                 timeout_key: str = "timeout_s", **kwargs):
    """``fn(*args, **kwargs)`` in a daemon worker thread, waited for in short slices so the main thread stays
    responsive. :class:`HostCallError` when ``fn`` raises, runs past ``timeout_s`` (None or 0: no limit), or is
    still running :data:`SIGNAL_GRACE_S` after the loop's SIGTERM/SIGINT (a second SIGINT: at once). An abandoned
    call keeps running in its thread, which does not keep the process alive."""
    box: dict[str, Any] = {}
    done = threading.Event()

    def work():
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 -- reported on the main thread
            box["error"] = e
        finally:
            done.set()

    threading.Thread(target=work, name=f"ppojax host call {label}", daemon=True).start()
    start, signalled = time.monotonic(), None
    while True:
        try:
            if done.wait(_WAIT_SLICE_S):
                break
        except KeyboardInterrupt:  # the second SIGINT: stop waiting now
            raise HostCallError(label, "was abandoned", "still running at the second SIGINT") from None
        now = time.monotonic()
        if timeout_s and now - start > timeout_s:
            raise HostCallError(label, "timed out", f"no result after {timeout_s:g} s ({timeout_key})")
        sig = _STOPS[-1].signal if _STOPS else None
        if sig is not None:
            signalled = signalled or now
            if now - signalled > SIGNAL_GRACE_S:
                raise HostCallError(label, "was abandoned", f"still running {SIGNAL_GRACE_S:g} s after "
                                                            f"{signal.Signals(sig).name}")
    if "error" in box:
        raise HostCallError(label, "failed", error_detail(box["error"])) from None
    return box["value"]


def score_on_host(host_reward: HostReward, tokens, mask, prompt_ids, prompt_mask) -> np.ndarray:
    """``host_reward(tokens, mask)``, with ``prompts=(prompt_ids, prompt_mask)`` for a reward that wants them, run by
    :func:`call_on_host` with the reward's ``label`` and ``timeout_s`` (attributes set by
    ``ppojax.rl.rewards.build_reward``; absent: no limit): :class:`HostCallError` if it raises, hangs past its
    timeout or is still running after a signal."""
    kwargs = {"prompts": (prompt_ids, prompt_mask)} if getattr(host_reward, "uses_prompts", False) else {}
    return call_on_host(host_reward, tokens, mask, label=getattr(host_reward, "label", "the host reward"),
                        timeout_s=getattr(host_reward, "timeout_s", None),
                        timeout_key=getattr(host_reward, "timeout_key", "timeout_s"), **kwargs)


_CALLBACK_ERROR = re.compile(r"^[A-Za-z_][\w.]*: \S")


def callback_error(e: BaseException) -> Optional[str]:
    """What a Python callback inside a jitted program raised (``jax.pure_callback``/``io_callback``), as
    ``'ValueError: ...'`` from the runtime error that carries its traceback; None for any other runtime error."""
    text = str(e)  # a JaxRuntimeError (a ValueError when run eagerly): 'INTERNAL: CpuCallback error ...'
    if "callback error" not in text.lower() or "Traceback" not in text:
        return None
    lines = [line for line in text.splitlines() if _CALLBACK_ERROR.match(line)]
    return lines[-1] if lines else None


@contextlib.contextmanager
def _quiet_callback_logs():
    """JAX logs a failed callback's traceback before raising; the loop reports it in one line instead."""
    import logging

    log = logging.getLogger("jax._src.callback")
    was, log.disabled = log.disabled, True
    try:
        yield
    finally:
        log.disabled = was


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
    """None: ran to ``iterations``; ``'signal'``, ``'non-finite'``, ``'callback'`` or ``'host-call'`` (a host
    reward or a callback inside the jitted iteration failed, timed out or was abandoned after a signal)."""
    signal: Optional[int] = None
    """The signal that stopped it, if any."""
    error: Optional[str] = None
    """The non-finite metric's or the failed host call's message (one line), if any."""


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
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.signal(s, self._handler) for s in (signal.SIGTERM, signal.SIGINT)}
        _STOPS.append(self)  # a host call waiting on the main thread gives up after a signal
        try:
            yield self
        finally:
            _STOPS.remove(self)
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
          handle_signals: bool = False, callback_label: str = "a callback of the jitted iteration") -> LoopResult:
    """Iterations ``start + 1 .. iterations``.

    Each iteration calls ``step(state, it)`` -- by default :func:`default_step` over ``prompts`` (with ``mesh``,
    ``host_reward``, ``donate`` and ``timing``) -- which returns ``(state, metrics, prompts)`` with the metrics on
    the host. The loop adds ``time_s`` (the iteration's wall time) to a dict of metrics, runs ``check(metrics,
    done)`` (default: :func:`ppojax.rl.iteration.check_metrics`; a message means non-finite), then calls every
    callback with an :class:`Iteration`. It stops after the callbacks when the run is done, a callback returns
    True, a metric is not finite, or (``handle_signals``) SIGTERM/SIGINT arrived. A host reward or a Python
    callback inside the jitted iteration (named ``callback_label`` in the message) that raises, times out or is
    abandoned after a signal ends the loop at once with ``stop_reason='host-call'`` and a one-line ``error``; the
    state is then the last one that completed its callbacks.
    """
    if step is None:
        if prompts is None:
            raise TypeError("train needs prompts (a PromptSource) or a step function")
        step = default_step(prompts, mesh=mesh, host_reward=host_reward, donate=donate, timing=timing)
    stop = StopSignal()
    result = LoopResult(state=state, done=start)
    with stop.installed() if handle_signals else contextlib.nullcontext(stop), _quiet_callback_logs():
        for it in range(start, iterations):
            t0 = time.time()
            done = it + 1
            try:
                state, metrics, batch = step(state, it)
                if isinstance(metrics, dict):
                    metrics["time_s"] = time.time() - t0
                error = check(metrics, done) if check is not None else None
                info = Iteration(done=done, total=iterations, state=state, metrics=metrics, prompts=batch,
                                 signal=stop.signal, error=error)
                asked = [bool(cb(info)) for cb in callbacks]
            except HostCallError as e:  # the iteration is lost; the last checkpoint is what a rerun resumes
                result.stop_reason, result.error, result.signal = "host-call", e.line(done), stop.signal
                break
            except Exception as e:  # noqa: BLE001 -- only a failed callback is reported here; the rest re-raised
                detail = callback_error(e)
                if detail is None:
                    raise
                result.stop_reason, result.signal = "host-call", stop.signal
                result.error = HostCallError(callback_label, "failed", detail).line(done)
                break
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


__all__ = ["Callback", "HostCallError", "HostReward", "Iteration", "LoopResult", "PromptSource", "StopSignal",
           "call_on_host", "callback_error", "default_step", "metrics_to_host", "sample_table", "score_on_host",
           "train", "train_step"]
