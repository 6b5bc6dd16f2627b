"""Atomic writes: a reader (or a resumed job after a kill) sees the old file or the new one, never a torn one.

Files are written to a temporary sibling, flushed to disk, then renamed over the target with ``os.replace`` (atomic
on POSIX within one filesystem). Directories are built in a temporary sibling and renamed into place; an existing
directory is swapped out only once the new one is complete.

Permissions are those of an ordinary ``open``/``mkdir``: 0666 and 0777 less the process's umask (``tempfile``
creates its files 0600 and directories 0700, which would make every atomically written file private).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

__all__ = ["atomic_write_bytes", "atomic_write_text", "atomic_write_json", "atomic_directory", "write_error_reason"]


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temporary sibling, fsync, ``os.replace``). Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> Path:
    """Write ``obj`` as JSON (with a final newline) to ``path`` atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Build a directory in a temporary sibling and rename it to ``path`` when the block succeeds.

    ``with atomic_directory(out) as tmp: write files into tmp``. On an exception the temporary directory is removed
    and ``path`` is untouched; an existing ``path`` is replaced only after the new one is complete.
    """
    path = Path(path).expanduser()
    parent = path.parent
    parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a directory")
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=parent))
    try:
        tmp.chmod(0o777 & ~_umask())
        yield tmp
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=parent))
            old.rmdir()
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    """The process's umask. Linux reports it in ``/proc/self/status``; elsewhere it is read by setting it and
    putting it back (not atomic with respect to other threads creating files at that instant)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_error_reason(e: BaseException) -> str:
    """Why a write failed, as the operating system says it (``No space left on device``, ``File too large``), found
    along the error's causes: an ``OSError``'s errno, TensorStore's ``[os_error_code='28']`` or Rust's
    ``(os error 28)`` (safetensors) inside a longer message. Else the error's type and first line."""
    root = e
    while root is not None:
        if isinstance(root, OSError) and root.errno:
            return os.strerror(root.errno)
        codes = re.findall(r"(?:os_error_code='?|Os \{ code: |\(os error )(\d+)", str(root))
        if codes:
            return os.strerror(int(codes[-1]))
        root = root.__cause__ if root.__cause__ is not None else (
            root.__context__ if not root.__suppress_context__ else None)
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"
