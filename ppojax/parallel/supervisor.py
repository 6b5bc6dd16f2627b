"""A parent process for each process of an explicit multi-process run, so that a run whose peer died ends with
one line, even when JAX aborts it.

When process 0 dies, the coordination service it hosts dies with it, and JAX's client on every other process
ends that process at once: a FATAL log line, ``abort()``, SIGABRT and a C++ stack trace. Its callback for this is
not usable from Python (the status it passes cannot be converted: ``std::bad_cast``), and no Python code runs
after ``abort()``. The lifelines (``ppojax.parallel.distributed``) see the same closed connection at the same
moment and usually exit first, but not always. So ``experiments/ppo_gpt2.py`` with ``--coordinator host:port``
and ``--num-processes`` > 1 runs the job as a child of a small parent (this module, no JAX) that:

- forwards the child's stderr line by line, except that JAX's C++ log lines (``W1204 23:37:06.776 ... file.cc:147]
  ...`` and what follows them) are held for ``HOLD_S`` seconds: printed if the child lives on, dropped if it dies
  of a signal meanwhile (that noise is the abort's);
- reads the child's progress (``REPORT_FD_ENV``: the iteration, the last good checkpoint, a lost peer, written by
  the lifelines) and, if the child dies of a signal, prints the lifelines' line itself and exits with code 1;
- forwards SIGINT, SIGTERM and SIGHUP to the child (in its own process group, so a terminal's Ctrl-C arrives once),
  and takes the child with it if it is killed itself (``PR_SET_PDEATHSIG``: ``kill -9`` of the job's pid still
  ends the job).

Exit code: the child's; 1 for a child that died of a signal after a peer was lost (or with JAX's fatal error);
128 + the signal's number for another signal.
"""

from __future__ import annotations

import os
import re
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

CHILD_ENV = "PPOJAX_SUPERVISED"
REPORT_FD_ENV = "PPOJAX_SUPERVISOR_FD"
HOLD_S = 2.0
"""How long a C++ log line is held back before it is printed (dropped if the child dies of a signal meanwhile)."""

_CPP_LOG = re.compile(rb"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+:\d+\] ")
_OURS = (b"[ppojax] ", b"ppo_gpt2.py: ", b"it ")
_CHILD = "import sys; from ppojax.cli import main; sys.exit(main(sys.argv[1:]))"


def wanted(coordinator: Optional[str], num_processes: Optional[int]) -> bool:
    """Whether a job with these flags (unset ones from the environment) runs supervised: an explicit multi-process
    run, not already the supervised child."""
    if os.environ.get(CHILD_ENV) == "1":
        return False
    coordinator = coordinator or os.environ.get("PPOJAX_COORDINATOR") or None
    if num_processes is None:
        raw = os.environ.get("PPOJAX_NUM_PROCESSES", "")
        num_processes = int(raw) if raw.isdigit() else None
    return coordinator not in (None, "auto") and (num_processes or 1) > 1


def _die_with_parent() -> None:  # in the child, before exec (Linux; elsewhere a kill -9 of the parent orphans it)
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run(argv: Sequence[str], err=None) -> int:
    """Run ``ppojax.cli.main(argv)`` in a child process as described above; returns the exit code for this one."""
    err = err or sys.stderr
    report_r, report_w = os.pipe()
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, **{CHILD_ENV: "1", REPORT_FD_ENV: str(report_w),
                              "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)})
    child = subprocess.Popen([sys.executable, "-c", _CHILD, *argv], env=env, pass_fds=(report_w,),
                             stderr=subprocess.PIPE, process_group=0, preexec_fn=_die_with_parent)
    os.close(report_w)

    forwarded = []

    def forward(signum, frame):
        forwarded.append(signum)
        try:
            child.send_signal(signum)
        except ProcessLookupError:
            pass

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    state = {"iteration": None, "last_good": None, "lost": None}
    held: list[tuple[float, bytes]] = []  # C++ log lines (and the lines after them) waiting for HOLD_S
    buffers = {child.stderr.fileno(): b"", report_r: b""}

    def write(line: bytes) -> None:
        err.write(line.decode("utf-8", "replace"))
        err.flush()

    def on_stderr(line: bytes) -> None:
        if _CPP_LOG.match(line) or (held and not line.startswith(_OURS)):
            held.append((time.monotonic(), line))
        else:
            flush_held()
            write(line)

    def flush_held() -> None:
        while held:
            write(held.pop(0)[1])

    def on_report(line: bytes) -> None:
        kind, _, rest = line.decode("utf-8", "replace").rstrip("\n").partition(" ")
        if kind == "iteration":
            state["iteration"] = rest
        elif kind == "last_good":
            state["last_good"] = rest
        elif kind == "lost":
            state["lost"] = rest

    try:
        with selectors.DefaultSelector() as sel:
            sel.register(child.stderr, selectors.EVENT_READ)
            sel.register(report_r, selectors.EVENT_READ)
            open_fds = 2
            while open_fds:
                for key, _ in sel.select(timeout=0.25):
                    fd = key.fd if isinstance(key.fileobj, int) else key.fileobj.fileno()
                    try:
                        data = os.read(fd, 65536)
                    except InterruptedError:
                        continue
                    if not data:
                        sel.unregister(key.fileobj)
                        open_fds -= 1
                        if buffers[fd]:
                            data = b"\n"
                        else:
                            continue
                    buffers[fd] += data
                    *lines, buffers[fd] = buffers[fd].split(b"\n")
                    for line in lines:
                        (on_stderr if fd != report_r else on_report)(line + b"\n")
                if held and time.monotonic() - held[0][0] > HOLD_S and child.poll() is None:
                    flush_held()
            code = child.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        os.close(report_r)
    if code >= 0:
        flush_held()
        return code
    # Died of a signal: what it held back was the abort's noise; keep only our own lines among it.
    for _, line in held:
        if line.startswith(_OURS):
            write(line)
    if -code in forwarded:  # the user's signal, not handled in time
        return 128 - code
    lost = state["lost"]
    me, n = _flag(argv, "--process-id", "PPOJAX_PROCESS_ID"), _flag(argv, "--num-processes", "PPOJAX_NUM_PROCESSES")
    # A process other than 0 that JAX aborted: the coordination service, in process 0, is gone.
    who = (f"process {lost.split(' ', 1)[0]} of {n}" if lost else f"process 0 of {n}" if me not in (None, "0")
           else "another process")
    how = lost.split(" ", 1)[1] if lost and " " in lost else "stopped responding"
    when = f"during iteration {state['iteration']}" if state["iteration"] else "during start-up"
    after = f". {state['last_good']}" if state["last_good"] else ""
    write(f"[ppojax] error: {who} {how} {when}{after}\n".encode())
    return 1


def _flag(argv: Sequence[str], name: str, env: str) -> Optional[str]:
    argv = list(argv)
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return os.environ.get(env) or None


def report(kind: str, text: str) -> None:
    """From the supervised child: one fact for the parent (``iteration``, ``last_good``, ``lost``). A no-op when
    not supervised."""
    fd = os.environ.get(REPORT_FD_ENV)
    if not fd:
        return
    try:
        os.write(int(fd), f"{kind} {text}\n".encode())
    except (OSError, ValueError):
        pass


__all__ = ["CHILD_ENV", "HOLD_S", "REPORT_FD_ENV", "report", "run", "wanted"]
