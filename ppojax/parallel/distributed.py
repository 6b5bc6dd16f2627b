"""Multi-host start-up: ``jax.distributed`` from flags or the environment, with a bounded wait for the coordinator.

Three ways to run:

- One process (the default): nothing to initialise.
- A TPU pod slice (or a SLURM / Open MPI / Kubernetes cluster that JAX recognises): ``coordinator='auto'``
  (``PPOJAX_COORDINATOR=auto``) calls ``jax.distributed.initialize()`` with no arguments; JAX reads the coordinator,
  the process count and the process id from the environment.
- Explicit (multi-node GPU, or CPU processes over loopback in tests): ``coordinator='host:port'``, ``num_processes``
  and ``process_id`` (``PPOJAX_COORDINATOR``, ``PPOJAX_NUM_PROCESSES``, ``PPOJAX_PROCESS_ID``). Process 0 hosts the
  coordinator service at that address.

Never hangs: a non-zero process first checks that the coordinator's port accepts connections, retrying until
``timeout_s``, and raises ``DistributedError`` naming the address otherwise; ``jax.distributed.initialize`` gets the
same bound as ``initialization_timeout``. Must run before anything touches a JAX device.
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
        if self.coordinator in (None, "auto"):
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
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout_s
    last = None
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=min(2.0, timeout_s)):
                return
        except OSError as e:
            last = e
        if time.monotonic() >= deadline:
            raise DistributedError(
                f"coordinator {address} unreachable after {timeout_s:g} s ({type(last).__name__}: {last}); check "
                "that process 0 is running with the same --coordinator, and the host, port and firewall")
        time.sleep(0.25)


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
    if config.process_id != 0:  # process 0 starts the service itself
        wait_for_coordinator(config.coordinator, config.timeout_s)
    try:
        jax.distributed.initialize(coordinator_address=config.coordinator, num_processes=config.num_processes,
                                   process_id=config.process_id, initialization_timeout=config.timeout_s)
    except Exception as e:  # noqa: BLE001
        raise DistributedError(
            f"jax.distributed.initialize(coordinator={config.coordinator}, num_processes={config.num_processes}, "
            f"process_id={config.process_id}) failed within {config.timeout_s} s: {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}") from e
    return True


__all__ = ["DistributedConfig", "DistributedError", "initialize", "wait_for_coordinator"]
