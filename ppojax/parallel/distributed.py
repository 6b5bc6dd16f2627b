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
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time
from typing import Optional

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


def gather_processes(address: str, num_processes: int, timeout_s: float) -> None:
    """Process 0: wait on ``address``'s port until processes ``1 .. num_processes - 1`` have all checked in, then
    release them together. ``DistributedError`` if they do not all come within ``timeout_s``, or one was started
    with other settings (which it is told too)."""
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
        for conn in joined.values():  # let each peer hang up first: the port is then free for JAX at once
            _read_line(conn, time.monotonic() + 2.0)
    finally:
        for conn in joined.values():
            conn.close()
        server.close()


def check_in(address: str, num_processes: int, process_id: int, timeout_s: float) -> None:
    """A process other than 0: connect to process 0 at ``address``, check in, and wait for its ``go``.
    ``DistributedError`` if it cannot be reached, answers as something else, refuses this process, or does not
    answer within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    with _connect(address, timeout_s) as conn:
        try:
            conn.sendall(f"{_HELLO} {num_processes} {process_id}\n".encode())
        except OSError as e:
            raise DistributedError(f"coordinator {address} closed the connection ({e}); it is not ppojax process 0: "
                                   "check --coordinator's host and port") from None
        reply = _read_line(conn, deadline)
    if reply == "go":
        return
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
    if config.num_processes > 1:  # JAX aborts the process on start-up failures: meet first, in Python
        if config.process_id == 0:
            gather_processes(config.coordinator, config.num_processes, config.timeout_s)
        else:
            check_in(config.coordinator, config.num_processes, config.process_id, config.timeout_s)
    try:
        jax.distributed.initialize(coordinator_address=config.coordinator, num_processes=config.num_processes,
                                   process_id=config.process_id, initialization_timeout=config.timeout_s)
    except Exception as e:  # noqa: BLE001
        raise DistributedError(
            f"jax.distributed.initialize(coordinator={config.coordinator}, num_processes={config.num_processes}, "
            f"process_id={config.process_id}) failed within {config.timeout_s} s: {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}") from e
    return True


__all__ = ["DistributedConfig", "DistributedError", "check_in", "gather_processes", "initialize",
           "wait_for_coordinator"]
