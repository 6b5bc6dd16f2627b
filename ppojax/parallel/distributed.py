"""Multi-host start-up: ``jax.distributed`` from flags or the environment, with a bounded wait for the coordinator.

Three ways to run:

- One process (the default): nothing to initialise.
- A TPU pod slice (or a SLURM / Open MPI / Kubernetes cluster that JAX recognises): ``coordinator='auto'``
  (``PPOJAX_COORDINATOR=auto``) calls ``jax.distributed.initialize()`` with no arguments; JAX reads the coordinator,
  the process count and the process id from the environment.
- Explicit (multi-node GPU, or CPU processes over loopback in tests): ``coordinator='host:port'``, ``num_processes``
  and ``process_id`` (``PPOJAX_COORDINATOR``, ``PPOJAX_NUM_PROCESSES``, ``PPOJAX_PROCESS_ID``). Process 0 hosts the
  coordinator service at that address.

Never hangs and never aborts. ``jax.distributed.initialize`` ends the process with SIGABRT and a C++ stack trace
(exit code 134) when its peers do not all register in time, or when the coordinator address is a service that is
not JAX's; no Python ``except`` can catch that. So in explicit mode the processes first meet in a rendezvous of
their own, in Python, on the coordinator's port: process 0 listens there and waits up to ``timeout_s`` for every
other process to check in (``ppojax-rendezvous 1 <num_processes> <process_id>``), then answers ``go`` to all,
closes the port and starts JAX's coordination service on it; the others connect (retrying until ``timeout_s``),
check in and, on ``go``, call ``jax.distributed.initialize``, whose client waits for the service to come up. Every
failure before JAX starts is one ``DistributedError`` line: peers that never join (naming the missing process
ids), a port process 0 cannot listen on, an address that is unreachable or answers as something else, processes
started with different ``num_processes`` or the same ``process_id``. ``jax.distributed.initialize`` then gets the
same bound as ``initialization_timeout``. ``coordinator='auto'`` leaves the start-up to JAX (the cluster's
scheduler starts every process). Must run before anything touches a JAX device.

A process that dies later (``kill -9``, its host gone) is noticed in seconds, not by JAX: JAX's coordination
service notices it only after ``heartbeat_timeout_seconds`` (100 s) and then aborts every survivor with SIGABRT and
a C++ stack trace, and gloo's collectives fail on the survivors with errors that name a socket, not a process. So
in explicit mode the rendezvous connections stay open as lifelines for the life of the run: each side sends a
beat every ``BEAT_S`` seconds, and a background thread (``_Lifelines``) on each process watches them. A peer
whose connection closes without a goodbye (killed: at once) or that is silent for ``SILENCE_S`` seconds (its host
or the network is gone) stopped responding; one that said goodbye with a non-zero exit code and whose peers have
not ended too within ``GRACE_S`` seconds ended early. The survivor then runs the cleanups the run registered (the
run directory's lock), prints one line (``[ppojax] error: process 1 of 2 stopped responding during iteration 3;
...``, with the progress the run reported through ``set_progress``) and exits with code 1 (``os._exit``: the
thread that is stuck in a collective cannot be unwound). Process 0 tells the others which process was lost, so
every survivor names the same one. The bound: at most ``SILENCE_S`` + ``BEAT_S`` seconds after the loss (about
a second for a killed process), well before JAX's heartbeat abort. ``leave`` (called by the command line with
its exit code, and at interpreter exit) says goodbye.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import os
import select
import socket
import sys
import threading
import time
from typing import Any, Callable, Optional

import jax


class DistributedError(RuntimeError):
    """Multi-host start-up failed (bad settings, or a coordinator that cannot be reached in time)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistributedConfig:
    """How this process joins a multi-process run."""

    coordinator: Optional[str] = None
    """None: one process. 'auto': let JAX detect the cluster (TPU pods, SLURM, ...). 'host:port': explicit."""
    num_processes: Optional[int] = None
    """Explicit mode: number of processes."""
    process_id: Optional[int] = None
    """Explicit mode: this process's id in [0, num_processes)."""
    timeout_s: int = 300
    """Seconds to wait for the coordinator (and for every process to join) before failing."""

    def __post_init__(self):
        if self.timeout_s < 1:
            raise DistributedError(f"distributed timeout_s must be >= 1, got {self.timeout_s}")
        if self.coordinator is None:
            # Without a coordinator the run is one process: settings that say otherwise are a mistake, not a hint.
            if (self.num_processes or 1) > 1 or (self.process_id or 0) != 0:
                raise DistributedError(
                    f"num_processes={self.num_processes}, process_id={self.process_id} without a coordinator: "
                    "give --coordinator host:port (or $PPOJAX_COORDINATOR) for a multi-process run, or drop "
                    "--num-processes/--process-id for one process")
            return
        if self.coordinator == "auto":
            return
        host, sep, port = self.coordinator.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise DistributedError(f"coordinator {self.coordinator!r} must be 'host:port' (or 'auto')")
        if self.num_processes is None or self.process_id is None:
            raise DistributedError(f"coordinator {self.coordinator!r} needs num_processes and process_id "
                                   "(--num-processes/--process-id or PPOJAX_NUM_PROCESSES/PPOJAX_PROCESS_ID)")
        if self.num_processes < 1 or not 0 <= self.process_id < self.num_processes:
            raise DistributedError(f"process_id={self.process_id} must be in [0, num_processes="
                                   f"{self.num_processes})")

    @classmethod
    def from_env(cls, coordinator: Optional[str] = None, num_processes: Optional[int] = None,
                 process_id: Optional[int] = None, timeout_s: Optional[int] = None) -> "DistributedConfig":
        """Explicit arguments win; unset ones come from ``PPOJAX_COORDINATOR``, ``PPOJAX_NUM_PROCESSES``,
        ``PPOJAX_PROCESS_ID`` and ``PPOJAX_DISTRIBUTED_TIMEOUT``."""
        env = os.environ

        def num(value, name):
            if value is not None:
                return value
            raw = env.get(name)
            if raw in (None, ""):
                return None
            try:
                return int(raw)
            except ValueError:
                raise DistributedError(f"{name}={raw!r} is not an integer") from None

        timeout = num(timeout_s, "PPOJAX_DISTRIBUTED_TIMEOUT")
        return cls(coordinator=coordinator or env.get("PPOJAX_COORDINATOR") or None,
                   num_processes=num(num_processes, "PPOJAX_NUM_PROCESSES"),
                   process_id=num(process_id, "PPOJAX_PROCESS_ID"),
                   timeout_s=300 if timeout is None else timeout)


def wait_for_coordinator(address: str, timeout_s: float) -> None:
    """Return once ``host:port`` accepts a TCP connection; ``DistributedError`` after ``timeout_s``."""
    _connect(address, timeout_s).close()


def _connect(address: str, timeout_s: float) -> socket.socket:
    """A TCP connection to ``host:port``, retried until ``timeout_s``; ``DistributedError`` naming it after that."""
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout_s
    last = None
    while True:
        try:
            return socket.create_connection((host.strip("[]"), int(port)), timeout=min(2.0, timeout_s))
        except OSError as e:
            last = e
        if time.monotonic() >= deadline:
            raise DistributedError(
                f"coordinator {address} unreachable after {timeout_s:g} s ({type(last).__name__}: {last}); check "
                "that process 0 is running with the same --coordinator, and the host, port and firewall")
        time.sleep(0.25)


# ----------------------------------------------------------------------------------------------------------------
# Rendezvous: every process meets process 0 before JAX's coordination service starts


_HELLO = "ppojax-rendezvous 1"
_LINE_MAX = 512


def _read_line(conn: socket.socket, deadline: float) -> Optional[str]:
    """One ``\n``-terminated line (at most ``_LINE_MAX`` bytes) from ``conn``; what arrived (possibly "") if the
    peer hangs up or sends too much; None if nothing complete arrived before ``deadline``."""
    data = b""
    while b"\n" not in data and len(data) < _LINE_MAX:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        conn.settimeout(min(remaining, 1.0))
        try:
            chunk = conn.recv(_LINE_MAX)
        except socket.timeout:
            continue
        except OSError:
            break
        if not chunk:
            break
        data += chunk
    return data.split(b"\n")[0].decode("utf-8", "replace").strip()


def _listen(address: str, port: int) -> socket.socket:
    try:
        if socket.has_dualstack_ipv6():
            return socket.create_server(("", port), family=socket.AF_INET6, dualstack_ipv6=True)
        return socket.create_server(("", port))
    except OSError as e:
        raise DistributedError(f"process 0 cannot listen on port {port} of coordinator {address} ({e}); another job "
                               "or service is using it: pick a free port") from None


def gather_processes(address: str, num_processes: int, timeout_s: float, *, keep: bool = False
                     ) -> dict[int, socket.socket]:
    """Process 0: wait on ``address``'s port until processes ``1 .. num_processes - 1`` have all checked in, then
    release them together. ``DistributedError`` if they do not all come within ``timeout_s``, or one was started
    with other settings (which it is told too). ``keep``: return the open connection to each process (by id), the
    run's lifelines; else they are closed."""
    port = int(address.rpartition(":")[2])
    deadline = time.monotonic() + timeout_s
    joined: dict[int, socket.socket] = {}
    server = _listen(address, port)

    def fail(message: str, why: str):
        for peer in joined.values():  # tell those already waiting, so they stop now rather than at their timeout
            try:
                peer.sendall(f"error {why}\n".encode())
            except OSError:
                pass
        raise DistributedError(message)

    try:
        server.settimeout(0.25)
        while len(joined) < num_processes - 1:
            if time.monotonic() >= deadline:
                missing = sorted(set(range(1, num_processes)) - set(joined))
                fail(f"only {len(joined) + 1} of {num_processes} processes joined coordinator {address} within "
                     f"{timeout_s:g} s (missing process ids: {missing}); start every process with the same "
                     "--coordinator and --num-processes, or raise --distributed-timeout",
                     f"process 0 gave up waiting for process ids {missing}")
            try:
                conn, _ = server.accept()
            except socket.timeout:
                continue
            words = (_read_line(conn, min(deadline, time.monotonic() + 5.0)) or "").split()
            if words[:2] != _HELLO.split() or len(words) != 4 or not all(w.isdigit() for w in words[2:]):
                conn.close()  # not one of ours (a port scanner, a health check): ignore it
                continue
            n, pid = int(words[2]), int(words[3])
            problem = (f"it was started with num_processes={n}, process 0 with {num_processes}" if n != num_processes
                       else f"process_id={pid} is not in 1..{num_processes - 1}" if not 0 < pid < num_processes
                       else f"two processes were started with process_id={pid}" if pid in joined else None)
            if problem is not None:
                with conn:
                    conn.sendall(f"error {problem}\n".encode())
                fail(f"a process that joined coordinator {address} does not fit: {problem}", problem)
            joined[pid] = conn
        for conn in joined.values():
            conn.sendall(b"go\n")
        if keep:  # the listening socket closes below: JAX's service can take the port (SO_REUSEADDR on both)
            kept, joined = joined, {}
            return kept
        for conn in joined.values():  # let each peer hang up first: the port is then free for JAX at once
            _read_line(conn, time.monotonic() + 2.0)
        return {}
    finally:
        for conn in joined.values():
            conn.close()
        server.close()


def check_in(address: str, num_processes: int, process_id: int, timeout_s: float, *, keep: bool = False
             ) -> Optional[socket.socket]:
    """A process other than 0: connect to process 0 at ``address``, check in, and wait for its ``go``.
    ``DistributedError`` if it cannot be reached, answers as something else, refuses this process, or does not
    answer within ``timeout_s``. ``keep``: return the open connection (the lifeline to process 0)."""
    deadline = time.monotonic() + timeout_s
    conn = _connect(address, timeout_s)
    try:
        try:
            conn.sendall(f"{_HELLO} {num_processes} {process_id}\n".encode())
        except OSError as e:
            raise DistributedError(f"coordinator {address} closed the connection ({e}); it is not ppojax process 0: "
                                   "check --coordinator's host and port") from None
        reply = _read_line(conn, deadline)
        if reply == "go" and keep:
            kept, conn = conn, None
            return kept
    finally:
        if conn is not None:
            conn.close()
    if reply == "go":
        return None
    if reply is None:
        raise DistributedError(
            f"coordinator {address} accepted the connection but gave no go within {timeout_s:g} s: either not all "
            f"{num_processes} processes were started, or the address is not ppojax process 0 (check --coordinator)")
    if reply.startswith("error "):
        raise DistributedError(f"process 0 at {address} refused process {process_id}: {reply[6:]}")
    shown = f"answered {reply[:40]!r}" if reply else "closed the connection"
    raise DistributedError(f"coordinator {address} is not ppojax process 0 (it {shown}); check --coordinator's host "
                           "and port")


def initialize(config: DistributedConfig) -> bool:
    """Join the multi-process run described by ``config``; returns True when ``jax.distributed`` was initialised.

    On CPU the cross-process collectives use gloo (JAX's default in this version, set explicitly here).
    """
    if config.coordinator is None:
        return False
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if config.coordinator == "auto":
        try:
            jax.distributed.initialize(initialization_timeout=config.timeout_s)
        except Exception as e:  # noqa: BLE001 - JAX raises several types; one clear message
            raise DistributedError(f"jax.distributed auto-detection failed ({type(e).__name__}: {e}); outside a TPU "
                                   "pod / SLURM / MPI job give --coordinator host:port, --num-processes and "
                                   "--process-id") from e
        return True
    lifelines: dict[int, socket.socket] = {}
    if config.num_processes > 1:  # JAX aborts the process on start-up failures: meet first, in Python
        if config.process_id == 0:
            lifelines = gather_processes(config.coordinator, config.num_processes, config.timeout_s, keep=True)
        else:
            lifelines = {0: check_in(config.coordinator, config.num_processes, config.process_id, config.timeout_s,
                                     keep=True)}
    if lifelines:
        # Its poll of the coordination service logs warnings when the service's process dies; a stop is ours
        # (SIGTERM -> checkpoint), and orbax treats a disabled service as "no preemption".
        jax.config.update("jax_enable_preemption_service", False)
    try:
        jax.distributed.initialize(coordinator_address=config.coordinator, num_processes=config.num_processes,
                                   process_id=config.process_id, initialization_timeout=config.timeout_s)
    except Exception as e:  # noqa: BLE001
        for conn in lifelines.values():
            conn.close()
        raise DistributedError(
            f"jax.distributed.initialize(coordinator={config.coordinator}, num_processes={config.num_processes}, "
            f"process_id={config.process_id}) failed within {config.timeout_s} s: {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}") from e
    if lifelines:
        _watch_peers(lifelines, config.process_id, config.num_processes)
    return True


# ----------------------------------------------------------------------------------------------------------------
# Agreement: facts that process 0 decides and every process uses


def from_process_0(value: Any) -> Any:
    """Process 0's ``value`` (anything JSON can carry) on every process; ``value`` itself in a one-process run.
    A collective: every process calls it at the same point (the others' ``value`` is ignored). For decisions that
    depend on the file system (does the run directory hold checkpoints? which steps?): each process looking for
    itself sees it at a different moment, takes another branch, and the collectives after it no longer pair up."""
    if jax.process_count() == 1:
        return value
    import numpy as np
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(value).encode(), dtype=np.uint8) if jax.process_index() == 0 else None
    size = int(multihost_utils.broadcast_one_to_all(np.int32(0 if data is None else data.size)))
    data = multihost_utils.broadcast_one_to_all(data if data is not None else np.zeros(size, np.uint8))
    return json.loads(np.asarray(data, dtype=np.uint8).tobytes().decode())


# ----------------------------------------------------------------------------------------------------------------
# Lifelines: a process that stops is noticed in seconds, and the survivors end with one line


BEAT_S = 2.0
"""Seconds between beats on each lifeline."""
SILENCE_S = 20.0
"""A peer silent this long (its host or the network is gone) has stopped responding."""
GRACE_S = 10.0
"""A peer that ended with a non-zero exit code: how long the others get to end by themselves (an error that every
process meets, e.g. a refused lock, ends them all within this) before it counts as lost."""
LOST_EXIT_CODE = 1


class _Lifelines:
    """The watching thread of one process (see the module docstring)."""

    def __init__(self, conns: dict[int, socket.socket], process_id: int, num_processes: int):
        self.conns, self.process_id, self.num_processes = dict(conns), process_id, num_processes
        self.left = threading.Event()
        self.lost = threading.Event()
        self.iteration: Optional[int] = None
        self.last_good: Optional[str] = None
        self.cleanups: list[Callable[[], None]] = []
        self._send_lock = threading.Lock()
        self._thread = threading.Thread(target=self._watch, name="ppojax-lifelines", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def send(self, line: str, pids=None) -> None:
        with self._send_lock:
            for pid, conn in list(self.conns.items()):
                if pids is None or pid in pids:
                    try:
                        conn.sendall(line.encode())
                    except OSError:
                        pass  # a closed lifeline shows as EOF on the reading side

    def leave(self, code: Optional[int]) -> None:
        if self.left.is_set():
            return
        self.left.set()
        self.send(f"exit {-1 if code is None else int(code)}\n")

    def _watch(self) -> None:
        now = time.monotonic()
        seen = {pid: now for pid in self.conns}
        ended: dict[int, tuple[int, float]] = {}  # pid -> (exit code, when it said so)
        buffers = {pid: b"" for pid in self.conns}
        next_beat = 0.0
        while not self.left.is_set():
            now = time.monotonic()
            if now >= next_beat:
                self.send(".\n")
                next_beat = now + BEAT_S
            watching = {conn: pid for pid, conn in self.conns.items()}
            if not watching:
                return
            try:
                readable, _, _ = select.select(list(watching), [], [], 0.25)
            except (OSError, ValueError):
                readable = list(watching)
            now = time.monotonic()
            for conn in readable:
                pid = watching[conn]
                try:
                    data = conn.recv(4096)
                except OSError:
                    data = b""
                if not data:  # closed: a goodbye came first, or the process died
                    self.conns.pop(pid).close()
                    if pid not in ended:
                        self._lost(pid, "stopped responding")
                    continue
                seen[pid] = now
                buffers[pid] += data
                *lines, buffers[pid] = buffers[pid].split(b"\n")
                for line in lines:
                    words = line.decode("ascii", "replace").split()
                    if words[:1] == ["exit"] and len(words) == 2:
                        ended[pid] = (int(words[1]), now)
                    elif words[:1] == ["lost"] and len(words) == 3 and words[1].isdigit():
                        self._lost(int(words[1]), " ".join(words[2:]).replace("_", " "))
            for pid, (code, when) in list(ended.items()):
                if code == 0:  # finished: nothing more to watch
                    conn = self.conns.pop(pid, None)
                    if conn is not None:
                        conn.close()
                elif now - when > GRACE_S:
                    self._lost(pid, f"ended early (exit code {code}; see its log)")
            for pid in list(self.conns):
                if pid not in ended and now - seen[pid] > SILENCE_S:
                    self._lost(pid, f"stopped responding (silent for {SILENCE_S:g} s)")

    def _lost(self, pid: int, how: str) -> None:
        if self.left.is_set() or self.lost.is_set():
            return
        self.lost.set()
        from ppojax.parallel import supervisor

        supervisor.report("lost", f"{pid} {how}")  # the parent says it if JAX aborts this process first
        if self.process_id == 0:  # the others name the same process (they only see process 0's lifeline)
            self.send(f"lost {pid} {how.replace(' ', '_')}\n", pids=[p for p in self.conns if p != pid])
        for cleanup in self.cleanups:
            try:
                cleanup()
            except Exception:  # noqa: BLE001 -- the line below matters more
                pass
        when = (f"during iteration {self.iteration}" if self.iteration is not None
                else "during start-up")
        after = f". {self.last_good}" if self.last_good else ""
        try:
            sys.stderr.write(f"[ppojax] error: process {pid} of {self.num_processes} {how} {when}{after}\n")
            sys.stderr.flush()
        finally:
            os._exit(LOST_EXIT_CODE)


_lifelines: Optional[_Lifelines] = None


def _watch_peers(conns: dict[int, socket.socket], process_id: int, num_processes: int) -> None:
    global _lifelines
    _lifelines = _Lifelines(conns, process_id, num_processes)
    _lifelines.start()
    # At interpreter exit (library use, without the command line's exit code): an uncaught error leaves
    # sys.last_value behind; otherwise the job ended normally.
    atexit.register(lambda: leave(1 if getattr(sys, "last_value", None) is not None else 0))
    hook = sys.excepthook

    def excepthook(kind, value, tb):  # an uncaught error caused by a lost peer: the lifelines say it in one line
        before_error()
        hook(kind, value, tb)

    sys.excepthook = excepthook


def set_progress(*, iteration: Optional[int] = None, last_good: Optional[str] = None) -> None:
    """What a survivor's line says if a peer is lost: the iteration in progress and where the last good state is
    (a sentence). A no-op without lifelines."""
    if _lifelines is not None:
        from ppojax.parallel import supervisor

        if iteration is not None and iteration != _lifelines.iteration:
            _lifelines.iteration = iteration
            supervisor.report("iteration", str(iteration))
        if last_good is not None and last_good != _lifelines.last_good:
            _lifelines.last_good = last_good
            supervisor.report("last_good", last_good)


def on_peer_lost(cleanup: Callable[[], None]) -> None:
    """Run ``cleanup`` (e.g. release the run directory's lock) before a survivor exits. A no-op without lifelines."""
    if _lifelines is not None:
        _lifelines.cleanups.append(cleanup)


def before_error(wait_s: float = 2.0) -> None:
    """Call before reporting an error in a multi-process run: a collective that failed because a peer died (gloo's
    "Connection reset by peer") is the peer's loss, said by the lifelines in one line; this gives them ``wait_s``
    to notice it, and never returns if they do (the process is exiting). Returns at once without lifelines."""
    watch = _lifelines
    if watch is None or watch.left.is_set():
        return
    if watch.lost.wait(wait_s):
        while True:
            time.sleep(60)


def leave(code: Optional[int] = None) -> None:
    """Say goodbye to the other processes (``code``: this process's exit code; None: unknown): exit code 0 ends
    their watch of this process, another code gives them ``GRACE_S`` to end too. Idempotent; a no-op without
    lifelines."""
    if _lifelines is not None:
        _lifelines.leave(code)


__all__ = ["DistributedConfig", "DistributedError", "before_error", "check_in", "from_process_0", "gather_processes",
           "initialize", "leave", "on_peer_lost", "set_progress", "wait_for_coordinator"]
