"""What every benchmark records next to its numbers: the machine, the package versions, the date, and how busy the
machine was. A number taken on a loaded, shared machine is not trustworthy, so each benchmark samples the load
before and after and flags a busy start instead of silently reporting a slow result.
"""

from __future__ import annotations

import datetime
import json
import os
import time
import platform
import sys
from importlib import metadata
from pathlib import Path

# A 1-minute load average above this fraction of the usable cores means other work competes for the CPU.
BUSY_LOAD_FRACTION = 0.5

DEFAULT_PACKAGES = ("jax", "jaxlib", "flax", "torch", "transformers")


def usable_cores() -> int:
    """Cores this process may run on (the affinity mask, which containers narrow), not the host's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _ram_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)  # kB -> GiB
    except OSError:
        pass
    return None


def machine_info() -> dict:
    return {
        "cpu_model": _cpu_model(),
        "cores": usable_cores(),
        "host_cpu_count": os.cpu_count(),
        "ram_gib": _ram_gib(),
        "os": platform.platform(),
    }


def versions(packages=DEFAULT_PACKAGES) -> dict:
    out = {"python": platform.python_version()}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def now_utc() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def load_sample() -> dict:
    """The 1-, 5- and 15-minute load averages, with a ``busy`` flag on the 1-minute one."""
    one, five, fifteen = os.getloadavg()
    cores = usable_cores()
    return {
        "load_1min": round(one, 2),
        "load_5min": round(five, 2),
        "load_15min": round(fifteen, 2),
        "cores": cores,
        "busy": one > BUSY_LOAD_FRACTION * cores,
    }


def _system_busy_seconds() -> float:
    """CPU seconds all processes have spent busy since boot (/proc/stat: everything but idle and iowait)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields) - idle) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


class OtherLoad:
    """How many cores OTHER processes kept busy while a benchmark ran: total busy CPU time minus this process's.

    The load average after a run counts the benchmark itself (a 2-core benchmark on 2 cores ends near 2), so it
    cannot tell a quiet machine from a shared one; this can.
    """

    def __init__(self):
        self.t0, self.sys0, self.own0 = time.time(), _system_busy_seconds(), _own_cpu_seconds()

    def cores(self) -> float:
        wall = max(time.time() - self.t0, 1e-9)
        other = (_system_busy_seconds() - self.sys0) - (_own_cpu_seconds() - self.own0)
        return round(max(other, 0.0) / wall, 3)


BUSY_OTHER_CORES = 0.25
"""Other processes keeping more than this many cores busy make a timing untrustworthy (the 'trustworthy' flag of
every benchmark, and the busy gate of the interleaved ones)."""


def other_load_probe(seconds: float = 2.0) -> float:
    """Cores OTHER processes kept busy while this one slept ``seconds``: the busyness check to run before and
    between repeats (no benchmark process is running then, so all of the load is someone else's)."""
    probe = OtherLoad()
    time.sleep(seconds)
    return probe.cores()


def wait_until_quiet(max_wait_s: float, *, probe=other_load_probe, threshold: float = BUSY_OTHER_CORES) -> list:
    """Probe until one probe is quiet (``<= threshold`` cores) or ``max_wait_s`` seconds have passed (at least one
    probe either way). Returns every probe value; the last one says whether the machine is quiet now."""
    t0 = time.time()
    values = [probe()]
    while values[-1] > threshold and time.time() - t0 < max_wait_s:
        values.append(probe())
    return values



def portable_path(path) -> str:
    """``path`` as a result file may record it: relative to the checkout when inside it, ``<site-packages>/...``
    inside an environment's packages, else its name alone (no machine's absolute paths in committed results)."""
    from pathlib import Path

    p = Path(path).resolve()
    root = Path(__file__).resolve().parents[1]
    try:
        return str(p.relative_to(root))
    except ValueError:
        pass
    parts = p.parts
    if "site-packages" in parts:
        return str(Path("<site-packages>", *parts[parts.index("site-packages") + 1:]))
    return p.name


def run_record(load_before: dict, others_cores: float, packages=DEFAULT_PACKAGES) -> dict:
    """The fields every result JSON ends with: machine, versions, the load samples, other processes' cores during
    the run and whether that makes the timings trustworthy. Call it when the timed work is over."""
    return {
        "machine": machine_info(),
        "versions": versions(packages),
        "load_before": load_before,
        "load_after": load_sample(),
        "other_processes_cores": others_cores,
        # The load average lags (it still counts a run that just ended) and, after the run, includes the benchmark
        # itself; the CPU time other processes used DURING the run is the direct measure of a shared machine.
        "trustworthy": others_cores <= BUSY_OTHER_CORES,
    }


def warn_if_busy(sample: dict, *, stream=sys.stderr) -> None:
    if sample["busy"]:
        print(
            f"WARNING: 1-minute load average {sample['load_1min']} > {BUSY_LOAD_FRACTION} x {sample['cores']} cores: "
            "the machine is busy and these timings are not trustworthy; rerun when it is quiet.",
            file=stream,
        )


def write_json(path: str | os.PathLike, data: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path
