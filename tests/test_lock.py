"""The run-directory lock: one holder at a time, holder named in the error, stale locks of dead processes taken over."""

import contextlib
import dataclasses
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from ppojax.io.atomic import atomic_write_json
from ppojax.io.lock import DirectoryLock, LockError, LockHolder, LockLostError


def _write_record(path, **fields):
    record = dataclasses.asdict(LockHolder.of_this_process())
    record.update(fields)
    atomic_write_json(path, record)
    return record


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_one_holder_and_the_error_names_it(tmp_path):
    run_dir = tmp_path / "a" / "run"
    first = DirectoryLock(run_dir).acquire()
    record = json.loads(first.path.read_text())
    assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
    with pytest.raises(LockError) as info:
        DirectoryLock(run_dir).acquire()
    message = str(info.value)
    assert f"PID {os.getpid()}" in message and socket.gethostname() in message and "since 20" in message
    first.release(remove_created=True)
    assert not (tmp_path / "a").exists()  # the directories the lock created are gone with it
    with DirectoryLock(run_dir) as again:  # free again
        assert again.held
    assert run_dir.is_dir() and not list(run_dir.iterdir())


def test_release_keeps_directories_that_are_not_empty_or_were_there(tmp_path):
    lock = DirectoryLock(tmp_path).acquire()
    assert lock.created == []
    lock.release(remove_created=True)
    assert tmp_path.is_dir()
    lock = DirectoryLock(tmp_path / "new").acquire()
    (tmp_path / "new" / "metrics.jsonl").write_text("{}\n")
    lock.release(remove_created=True)
    assert (tmp_path / "new" / "metrics.jsonl").exists() and not (tmp_path / "new" / "ppojax.lock").exists()


@pytest.mark.parametrize("how", ["dead", "zombie", "reused-pid"])
def test_stale_lock_of_a_dead_process_is_taken_over_with_a_warning(tmp_path, how):
    lock_file = tmp_path / "ppojax.lock"
    zombie = None
    if how == "dead":
        _write_record(lock_file, pid=_dead_pid(), process_start=None)
    elif how == "zombie":  # killed but not yet reaped by its parent
        zombie = subprocess.Popen([sys.executable, "-c", "pass"])
        while open(f"/proc/{zombie.pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z":
            time.sleep(0.05)
        _write_record(lock_file, pid=zombie.pid)
    else:  # our own PID, but the record's process started at another time: the PID was reused
        _write_record(lock_file, process_start=1)
    try:
        with pytest.warns(UserWarning, match="took over the stale lock"):
            lock = DirectoryLock(tmp_path).acquire()
    finally:
        if zombie is not None:
            zombie.wait()
    assert json.loads(lock_file.read_text())["token"] == lock._holder.token
    lock.release()
    assert not lock_file.exists()


def test_lock_of_another_host_is_never_broken(tmp_path):
    _write_record(tmp_path / "ppojax.lock", host="node-17", pid=_dead_pid())
    with pytest.raises(LockError, match=r"host node-17, PID \d+, since .*another host.*delete .*ppojax.lock"):
        DirectoryLock(tmp_path).acquire()
    (tmp_path / "ppojax.lock").write_text("garbage")
    with pytest.raises(LockError, match="not a ppojax lock"):
        DirectoryLock(tmp_path).acquire()


def test_lock_beside_an_output_file(tmp_path):
    out = tmp_path / "labels.jsonl"
    with DirectoryLock(out, is_file=True) as lock:
        assert lock.path == tmp_path / "labels.jsonl.lock"
        with pytest.raises(LockError):
            DirectoryLock(out, is_file=True).acquire()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("stale", [False, True], ids=["free", "stale"])
def test_racing_jobs_get_exactly_one_lock(tmp_path, stale):
    if stale:
        _write_record(tmp_path / "ppojax.lock", pid=_dead_pid(), process_start=None)
    start = threading.Barrier(8)
    won, lost = [], []

    def contend():
        lock = DirectoryLock(tmp_path)
        start.wait()
        try:
            won.append(lock.acquire())
        except LockError as e:
            lost.append(str(e))

    with pytest.warns(UserWarning, match="stale") if stale else contextlib.nullcontext():
        threads = [threading.Thread(target=contend) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(won) == 1 and len(lost) == 7, (won, lost)
    assert json.loads((tmp_path / "ppojax.lock").read_text())["token"] == won[0]._holder.token
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ppojax.lock"]  # no unique or stale files left



def test_filesystem_without_hard_links_falls_back_to_exclusive_create(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise PermissionError(1, "Operation not permitted")  # what e.g. some FUSE mounts answer

    monkeypatch.setattr(os, "link", no_links)
    first = DirectoryLock(tmp_path).acquire()
    with pytest.raises(LockError, match=f"PID {os.getpid()}"):
        DirectoryLock(tmp_path).acquire()
    first.release()
    _write_record(tmp_path / "ppojax.lock", pid=_dead_pid(), process_start=None)
    with pytest.warns(UserWarning, match="took over the stale lock"):
        DirectoryLock(tmp_path).acquire().release()
    assert list(tmp_path.iterdir()) == []


def test_takeover_guard_left_by_a_dead_breaker_is_cleared(tmp_path):
    """A breaker killed between creating ``ppojax.lock.break`` and deleting it must not block the directory
    forever: a guard older than 30 s is removed and the stale lock is then taken over."""
    _write_record(tmp_path / "ppojax.lock", pid=_dead_pid(), process_start=None)
    guard = tmp_path / "ppojax.lock.break"
    guard.write_text("")
    old = time.time() - 120
    os.utime(guard, (old, old))
    with pytest.warns(UserWarning, match="took over the stale lock"):
        lock = DirectoryLock(tmp_path).acquire()
    assert lock.held
    lock.release()
    assert list(tmp_path.iterdir()) == []


def test_fresh_takeover_guard_is_respected(tmp_path):
    """While another job holds a fresh guard, this one does not delete the stale lock behind its back."""
    _write_record(tmp_path / "ppojax.lock", pid=_dead_pid(), process_start=None)
    (tmp_path / "ppojax.lock.break").write_text("")
    with pytest.raises(LockError, match="other jobs keep taking it"):
        DirectoryLock(tmp_path).acquire()
    assert (tmp_path / "ppojax.lock").exists()


def test_failed_acquire_removes_the_directories_it_created(tmp_path, monkeypatch):
    """A disk that refuses the lock file (here ENOSPC from link) leaves no half-made run directory behind."""
    import errno

    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "link", full)
    with pytest.raises(OSError, match="No space left"):
        DirectoryLock(tmp_path / "a" / "b").acquire()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fails", [False, True], ids=["runs", "fails-at-start"])
def test_three_jobs_racing_for_a_fresh_directory_leave_nothing_behind(tmp_path, fails):
    """Jobs racing for a run directory that does not exist: one wins; when the winner fails at start-up (and
    removes what was created for it) no empty directory is left, whichever job created it."""
    for round_ in range(24):
        run_dir = tmp_path / f"run-{round_}"
        start = threading.Barrier(3)
        won, lost = [], []

        def contend():
            lock = DirectoryLock(run_dir)
            start.wait()
            try:
                won.append(lock.acquire())
            except LockError:
                lost.append(lock)
                lock.release(remove_created=True)

        threads = [threading.Thread(target=contend) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(won) == 1 and len(lost) == 2
        if fails:
            won[0].release(remove_created=True)
            assert not run_dir.exists(), sorted(tmp_path.rglob("*"))
        else:
            assert sorted(p.name for p in run_dir.iterdir()) == ["ppojax.lock"]  # no marker left
            won[0].release()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary directory


def test_verify_notices_a_deleted_or_replaced_lock(tmp_path):
    lock = DirectoryLock(tmp_path).acquire()
    lock.verify()  # held: silent
    lock.path.unlink()
    with pytest.raises(LockLostError, match="was deleted"):
        lock.verify()
    other = DirectoryLock(tmp_path).acquire()  # a second job takes the directory
    with pytest.raises(LockLostError, match="now names another job"):
        lock.verify()
    lock.release()  # does not delete the other job's lock
    assert json.loads(other.path.read_text())["token"] == other._holder.token
    other.verify()
    other.release()


def test_atomic_writes_honour_the_umask(tmp_path):
    """Files and directories written atomically get the permissions an ordinary open/mkdir would give."""
    from ppojax.io.atomic import atomic_directory, atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "config.yaml", "a: 1\n")
        with atomic_directory(tmp_path / "export") as out:
            (out / "config.json").write_text("{}")
        os.umask(0o077)
        atomic_write_text(tmp_path / "private.yaml", "a: 1\n")
    finally:
        os.umask(old)
    mode = lambda name: (tmp_path / name).stat().st_mode & 0o777  # noqa: E731
    assert (mode("config.yaml"), mode("export"), mode("private.yaml")) == (0o644, 0o755, 0o600)
