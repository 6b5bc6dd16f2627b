"""One job per output: an exclusive lock on a run directory (or an output file) for the whole life of a job.

The lock is a small file next to what it guards (``<run_dir>/ppojax.lock``, or ``<out>.lock`` for a file) holding
a JSON record of its holder: host name, boot id, PID, the process's start time, and when the lock was taken. It is
created with the recipe that open(2) gives for NFS: the record is written (atomically) to a uniquely named sibling,
then hard-linked to the lock's name. ``link`` fails with ``EEXIST`` when the lock exists, atomically, on local
filesystems and on NFS (where a lost reply is detected by the unique file's link count). On a filesystem without
hard links the lock is created with ``O_CREAT | O_EXCL`` instead. No ``fcntl``/``flock`` is needed, so it also
works where those are missing or only local (Lustre without ``-o flock``, some FUSE mounts).

A lock outlives a killed holder (kill -9, a node crash), so a job that finds one decides whether its holder is
alive. On the same host (same host name and boot id) it can tell: a PID that is gone, a zombie, or a PID reused by
a process that started later means a stale lock, which is taken over with a warning. A holder on another host
cannot be checked from here, so that lock is never broken automatically: the error names the host and PID and says
to delete the lock file once that job is known to be dead.

Taking over a stale lock is itself race-free. Jobs that find the same stale lock serialise on a guard file,
``<lock>.break``, created with ``O_CREAT | O_EXCL``; the one that creates it re-reads the lock and deletes it only
if it still holds the record judged stale. While the guard exists the lock file cannot change under the breaker:
a new lock can only be linked where no file is, and the stale holder is dead, so nobody else removes it. (An
earlier rename-and-put-back scheme let a racing job delete a fresh lock: two winners.) A guard left by a breaker
killed mid-takeover, which takes milliseconds, is removed once it is older than 30 seconds.

A held lock can still be lost: someone deletes the file of a running job, and a second job takes the directory.
The holder calls :meth:`DirectoryLock.verify` before it writes (a run does at each iteration), which raises
``LockLostError`` once the file is gone or names another holder, so the job stops instead of writing over the
other one's files.

Directories created on the way to the lock are removed again when a job fails at start-up. When several jobs race
for a directory that does not exist, the one that creates it may lose the lock to one that found it: the creator
makes it under a temporary name with a ``.ppojax-new`` marker in it and renames it into place, and whoever takes
the lock first adopts the marked directory as one it created (removing the marker), so the job that ends up
holding it removes it on a failed start.
"""

from __future__ import annotations

import dataclasses
import datetime
import errno
import json
import os
import socket
import time
import uuid
import warnings
from pathlib import Path
from typing import Optional

from ppojax.io.atomic import atomic_write_json

__all__ = ["DirectoryLock", "LockError", "LockHolder", "LockLostError", "LOCK_NAME", "lock_path_for"]

LOCK_NAME = "ppojax.lock"
_NEW_MARK = ".ppojax-new"  # in a directory a job created for its lock, until a job takes the lock in it
_TRIES = 50  # acquire attempts when a lock vanishes or another job is taking a stale one over
_BREAK_STALE_S = 30.0  # a takeover guard older than this was left by a breaker that died


class LockError(RuntimeError):
    """The lock is held by another live job (or cannot be created); the message names the holder."""


class LockLostError(LockError):
    """A lock this job held is gone (its file deleted) or now names another holder."""


@dataclasses.dataclass(frozen=True)
class LockHolder:
    """Who holds a lock: what its file records."""

    host: str
    pid: int
    since: float
    """Unix time at which the lock was taken."""
    boot_id: str = ""
    process_start: Optional[int] = None
    """The process's start time in clock ticks after boot (Linux ``/proc/<pid>/stat``), to detect a reused PID."""
    token: str = ""

    @classmethod
    def of_this_process(cls) -> "LockHolder":
        pid = os.getpid()
        return cls(host=socket.gethostname(), pid=pid, since=time.time(), boot_id=_boot_id(),
                   process_start=_process_start(pid), token=uuid.uuid4().hex)

    @classmethod
    def from_json(cls, text: str) -> "LockHolder":
        """Parse a lock file's record; ``ValueError`` if it is not one."""
        try:
            data = json.loads(text)
            return cls(host=str(data["host"]), pid=int(data["pid"]), since=float(data["since"]),
                       boot_id=str(data.get("boot_id", "")), process_start=data.get("process_start"),
                       token=str(data.get("token", "")))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"not a lock record ({type(e).__name__})") from None

    def describe(self) -> str:
        """``host H, PID P, since 2026-01-02 03:04:05``."""
        when = datetime.datetime.fromtimestamp(self.since).strftime("%Y-%m-%d %H:%M:%S")
        return f"host {self.host}, PID {self.pid}, since {when}"

    def same_host(self) -> bool:
        """True when the holder ran on this machine since its last boot (so its PID can be checked here)."""
        return self.host == socket.gethostname() and (not self.boot_id or self.boot_id == _boot_id())

    def is_alive(self) -> bool:
        """Whether the holder process still runs. Only meaningful on the same host: elsewhere, assume it does."""
        if not self.same_host():
            return True
        state = _process_state(self.pid)
        if state is None or state in ("Z", "X"):  # gone, or a zombie: dead but not yet reaped
            return False
        start = _process_start(self.pid)
        return self.process_start is None or start is None or start == self.process_start


def lock_path_for(target: str | os.PathLike, *, is_file: bool = False) -> Path:
    """The lock file guarding ``target``: ``<target>/ppojax.lock`` for a directory, ``<target>.lock`` beside a
    file (``is_file``)."""
    target = Path(target)
    return target.with_name(target.name + ".lock") if is_file else target / LOCK_NAME


class DirectoryLock:
    """An exclusive lock on ``target``, a directory (or an output file with ``is_file=True``), held from
    :meth:`acquire` to :meth:`release`.

    Usage::

        with DirectoryLock(run_dir) as lock:      # LockError naming the holder if another job has it
            ...                                   # the job; lock.created lists the directories it had to create
        # or: lock = DirectoryLock(run_dir); lock.acquire(); ...; lock.release(remove_created=True)

    Acquiring creates the missing directories on the way to the lock file; ``release(remove_created=True)``
    removes those of them that are still empty, so a job that fails at start-up leaves the disk as it found it.
    """

    def __init__(self, target: str | os.PathLike, *, is_file: bool = False):
        self.path = lock_path_for(target, is_file=is_file)
        self.created: list[Path] = []
        self._holder: Optional[LockHolder] = None

    @property
    def held(self) -> bool:
        return self._holder is not None

    def acquire(self) -> "DirectoryLock":
        """Take the lock, or raise ``LockError`` naming the live holder. A stale lock (same host, holder gone) is
        taken over with a warning. ``OSError`` if the directory cannot be created or written. On any failure the
        directories this call created are removed again, so nothing is left behind."""
        if self._holder is not None:
            return self
        try:
            self.created = _make_dirs(self.path.parent)
            return self._acquire()
        except BaseException:
            self.release(remove_created=True)
            raise

    def _acquire(self) -> "DirectoryLock":
        me = LockHolder.of_this_process()
        for _ in range(_TRIES):
            try:
                linked = _link_record(self.path, me)
            except FileNotFoundError:  # a racing job that had created the directory removed it on a failed start
                self.created += [d for d in _make_dirs(self.path.parent) if d not in self.created]
                continue
            if linked:
                self._holder = me
                self._adopt_new_directory()
                return self
            holder = _read_holder(self.path)
            if holder is None:
                continue  # released (or taken over) between our link and our read: try again
            if isinstance(holder, str) or holder.is_alive():
                raise LockError(self._held_message(holder))
            if _take_over(self.path, holder):
                warnings.warn(f"took over the stale lock {self.path} of a job that is gone ({holder.describe()})",
                              stacklevel=3)  # the caller of acquire(), past _acquire
            else:
                time.sleep(0.01)  # another job is taking it over: its lock (or none) is there in milliseconds
        raise LockError(f"could not take the lock {self.path}: other jobs keep taking it; try again")

    def _adopt_new_directory(self) -> None:
        """The lock's directory was made for a job's lock and nobody has held it yet: count it as created here."""
        mark = self.path.parent / _NEW_MARK
        try:
            mark.unlink()
        except FileNotFoundError:
            return
        if self.path.parent not in self.created:
            self.created.append(self.path.parent)

    def verify(self) -> None:
        """Raise ``LockLostError`` if this job's lock file is gone or names another holder (someone deleted it, and
        another job may have taken the directory). Call it before writing into the guarded directory."""
        if self._holder is None:
            raise LockLostError(f"{self.path} is not held by this job")
        current = _read_holder(self.path)
        if isinstance(current, LockHolder) and current.token == self._holder.token:
            return
        if current is None:
            why = "was deleted"
        elif isinstance(current, LockHolder):
            why = f"now names another job ({current.describe()})"
        else:
            why = f"was replaced by something else ({current})"
        raise LockLostError(f"the lock {self.path} of this job {why}; another job may be writing "
                            f"{self.path.parent}, so this one stops without writing more")

    def release(self, *, remove_created: bool = False) -> None:
        """Delete the lock file if this object holds it (idempotent). ``remove_created``: also remove the
        directories ``acquire`` created, where they are empty."""
        if self._holder is not None:
            current = _read_holder(self.path)
            if isinstance(current, LockHolder) and current.token == self._holder.token:
                try:
                    self.path.unlink()
                except FileNotFoundError:
                    pass
            self._holder = None
        if remove_created:
            for directory in reversed(self.created):
                if directory == self.path.parent and not self.path.exists():  # nobody took it: our marker goes
                    (directory / _NEW_MARK).unlink(missing_ok=True)
                try:
                    directory.rmdir()
                except OSError:  # not empty (or gone): leave it
                    break
            self.created = []

    def __enter__(self) -> "DirectoryLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def _held_message(self, holder: "LockHolder | str") -> str:
        if isinstance(holder, str):
            return (f"{self.path} exists but is not a ppojax lock ({holder}); if no job is using "
                    f"{self.path.parent}, delete it")
        where = "this host" if holder.same_host() else "another host, which this job cannot check"
        return (f"{self.path.parent} is in use by another job ({holder.describe()}; on {where}); wait for it to "
                f"finish or stop it. If that job is dead, delete {self.path}")


# ----------------------------------------------------------------------------------------------------------------
# The lock file


def _link_record(path: Path, holder: LockHolder) -> bool:
    """Create ``path`` holding ``holder``'s record, atomically; False if it already exists."""
    unique = path.with_name(f".{path.name}.{holder.token}")
    # FileNotFoundError if the directory is gone (atomic_write_json would quietly make it again, unrecorded).
    if not path.parent.is_dir():
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(path.parent))
    atomic_write_json(unique, dataclasses.asdict(holder))
    try:
        os.link(unique, path)
        return True
    except FileExistsError:
        return False
    except OSError as e:
        # NFS: the link may have happened even though its reply was lost; the unique file then has two links.
        if unique.stat().st_nlink == 2:
            return True
        if e.errno in _NO_HARD_LINKS:
            return _create_record(path, holder)
        raise
    finally:
        unique.unlink()


_NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EXDEV}


def _create_record(path: Path, holder: LockHolder) -> bool:
    """For filesystems without hard links: ``O_CREAT | O_EXCL`` (atomic on local filesystems and NFS v3+). A reader
    may see the file before its record is complete; it then reports an unreadable lock rather than a holder."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(dataclasses.asdict(holder), f)
        f.flush()
        os.fsync(f.fileno())
    return True


def _read_holder(path: Path) -> "LockHolder | str | None":
    """The record in ``path``; None if there is no file, a string saying why if it cannot be parsed."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        return f"unreadable: {e}"
    try:
        return LockHolder.from_json(text)
    except ValueError as e:
        return str(e)


def _take_over(path: Path, stale: LockHolder) -> bool:
    """Delete ``path`` if it still holds ``stale``'s record, under the takeover guard. True if this call deleted it;
    False if the lock changed, or another job holds the guard (the caller retries)."""
    guard = path.with_name(path.name + ".break")
    try:
        os.close(os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except FileExistsError:
        try:
            if time.time() - guard.stat().st_mtime > _BREAK_STALE_S:
                guard.unlink()  # its breaker died mid-takeover
        except FileNotFoundError:
            pass
        return False
    try:
        found = _read_holder(path)
        if isinstance(found, LockHolder) and found.token == stale.token:
            path.unlink()
            return True
        return False
    finally:
        guard.unlink()


def _make_dirs(directory: Path) -> list[Path]:
    """``mkdir -p`` that returns the directories it created, outermost first. The last one (the lock's own) is
    made under a temporary name holding the ``.ppojax-new`` marker and renamed into place, so that it never exists
    unmarked: a job that finds it and wins the lock before its creator adopts it as created."""
    missing = []
    for d in [directory, *directory.parents]:
        if d.exists():
            break
        missing.append(d)
    created = []
    for d in reversed(missing):
        try:
            if d == directory:
                _make_marked(d)
            else:
                d.mkdir()
            created.append(d)
        except FileExistsError:
            pass
    return created


def _make_marked(directory: Path) -> None:
    """Create ``directory`` with the marker in it, atomically; ``FileExistsError`` if another job made it first."""
    tmp = directory.with_name(f".{directory.name}.new-{uuid.uuid4().hex}")
    tmp.mkdir()
    try:
        (tmp / _NEW_MARK).touch()
        try:
            os.rename(tmp, directory)  # fails (ENOTEMPTY or EEXIST) onto another job's directory, marked: not empty
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.EISDIR):
                raise FileExistsError(errno.EEXIST, "exists", str(directory)) from None
            raise
    except BaseException:
        (tmp / _NEW_MARK).unlink(missing_ok=True)
        tmp.rmdir()
        raise


# ----------------------------------------------------------------------------------------------------------------
# Processes


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _stat_fields(pid: int) -> Optional[list[str]]:
    """Fields of ``/proc/<pid>/stat`` after the command name (field 3 onwards), or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2:].split()


def _process_start(pid: int) -> Optional[int]:
    fields = _stat_fields(pid)
    return int(fields[19]) if fields and len(fields) > 19 else None  # field 22: starttime


def _process_state(pid: int) -> Optional[str]:
    """The process's state letter (``R``, ``S``, ``Z``...), ``"?"`` if alive but unknown, None if it is gone."""
    fields = _stat_fields(pid)
    if fields:
        return fields[0]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return "?"  # another user's process
    return "?"
