"""Fault injection on experiments/ppo_gpt2.py with the tiny config: kill -9 at random moments, two jobs on one run
directory, corrupted checkpoint files and a torn metrics.jsonl.

Every case ends with the same check: the run directory's metrics equal those of an uninterrupted run, each
iteration exactly once; and every failure on the way is one error line with its exit code. About 4 minutes on
2 CPU cores (each job start costs ~15 s of imports and compilation).
"""

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "experiments" / "ppo_gpt2.py"
ITERATIONS = 6
# A checkpoint every iteration (keep 2): kills land in and around saves, and fallbacks have a step to go to.
ARGS = ["--config", str(REPO / "configs" / "tiny.yaml"), "--iterations", str(ITERATIONS),
        "--set", "checkpoint.every=1", "--set", "checkpoint.keep=2"]
ENV = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")


def _start(run_dir, *extra):
    return subprocess.Popen([sys.executable, str(SCRIPT), *ARGS, "--run-dir", str(run_dir), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=REPO)


def _run(run_dir, *extra, timeout=600, env=ENV):
    proc = subprocess.run([sys.executable, str(SCRIPT), *ARGS, "--run-dir", str(run_dir), *extra],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout)
    return proc.returncode, proc.stderr


def _metrics(run_dir):
    """Each line of metrics.jsonl without its wall time (the one field a resumed run may change)."""
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "time_s"} for line in lines]


def _errors(stderr):
    """The runner's error lines (``ppo_gpt2.py: error: ...`` for bad input, ``[ppojax] error: ...`` in training)."""
    return [line for line in stderr.splitlines() if line.startswith(("ppo_gpt2.py: error:", "[ppojax] error:"))
            or "Traceback" in line]


def _assert_equals_uninterrupted(run_dir, reference):
    got = _metrics(run_dir)
    assert [m["iteration"] for m in got] == list(range(1, ITERATIONS + 1))  # each iteration exactly once
    assert got == reference
    assert not (Path(run_dir) / "ppojax.lock").exists()


def _lines(path):
    return path.read_text().count("\n") if path.exists() else 0


def _wait_for_iterations(proc, run_dir, n, poll=0.05, timeout=300):
    """Until the job has logged ``n`` iterations (or ended, or ``timeout`` seconds passed)."""
    deadline = time.time() + timeout
    while proc.poll() is None and _lines(run_dir / "metrics.jsonl") < n and time.time() < deadline:
        time.sleep(poll)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The run directory of the run done in one go (checkpoints 5 and 6 kept)."""
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    code, err = _run(run_dir)
    assert code == 0, err[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def reference(uninterrupted):
    return _metrics(uninterrupted)


def test_kill_9_at_random_moments_then_resume(reference, tmp_path):
    run_dir = tmp_path / "run"
    rng = random.Random(16)
    for _ in range(3):
        proc = _start(run_dir)
        # A random moment: after a random number of logged iterations (0: during start-up or compilation), plus a
        # random fraction of a second (mid-iteration, mid-save, mid-log line).
        _wait_for_iterations(proc, run_dir, rng.randint(0, ITERATIONS - 2))
        time.sleep(rng.uniform(0.0, 1.5))
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)  # reaped: its lock is stale now, not held by a zombie
    # What a kill in the middle of writing a metrics line leaves behind.
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write('{"iteration": 99, "score_mean": 0.0')
    code, err = _run(run_dir)
    assert code == 0 and not _errors(err), err[-3000:]
    _assert_equals_uninterrupted(run_dir, reference)


def test_two_jobs_on_one_run_directory(reference, tmp_path):
    run_dir = tmp_path / "run"
    jobs = [_start(run_dir), _start(run_dir)]
    outcomes = [(job.pid, job.communicate(timeout=600)[1]) for job in jobs]
    outcomes = [(pid, job.returncode, err) for (pid, err), job in zip(outcomes, jobs)]
    codes = sorted(code for _, code, _ in outcomes)
    assert codes == [0, 2], [err[-2000:] for _, _, err in outcomes]
    (winner, _, _), = [o for o in outcomes if o[1] == 0]
    (_, _, loser_err), = [o for o in outcomes if o[1] == 2]
    errors = _errors(loser_err)
    assert len(errors) == 1 and "is in use by another job" in errors[0] and f"PID {winner}" in errors[0], loser_err
    _assert_equals_uninterrupted(run_dir, reference)


def _data_files(step_dir):
    return [p for p in Path(step_dir).rglob("*") if p.is_file() and p.parent.name == "d"]


def test_corrupted_checkpoints(uninterrupted, reference, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted, run_dir)  # checkpoints 5 and 6

    # The newest checkpoint's arrays are emptied: the resume falls back to 5 with one warning, and redoes 6.
    for f in _data_files(run_dir / "checkpoints" / "6"):
        f.write_bytes(b"")
    code, err = _run(run_dir)
    assert code == 0 and not _errors(err), err[-3000:]
    warned = [line for line in err.splitlines() if "unusable" in line]
    assert len(warned) == 1 and "checkpoint step 6" in warned[0] and "restored step 5" in warned[0], err[-3000:]
    assert "OUT_OF_RANGE" in warned[0] or "DATA_LOSS" in warned[0] or "FAILED_PRECONDITION" in warned[0]
    assert "Traceback" not in err and "TensorStore({" not in err
    _assert_equals_uninterrupted(run_dir, reference)

    # Every checkpoint unusable (a metadata file deleted, array data truncated): exit 2, one line, nothing changed.
    (run_dir / "checkpoints" / "6" / "metadata" / "metadata").unlink()
    for f in _data_files(run_dir / "checkpoints" / "5"):
        os.truncate(f, f.stat().st_size // 2)
    before = sorted(str(p) for p in run_dir.rglob("*"))
    code, err = _run(run_dir, "--iterations", str(ITERATIONS + 2))
    assert code == 2, err[-3000:]
    errors = _errors(err)
    assert len(errors) == 1 and "aside" in errors[0] and "Traceback" not in err, err[-3000:]
    assert sorted(str(p) for p in run_dir.rglob("*")) == before
    assert [m["iteration"] for m in _metrics(run_dir)] == list(range(1, ITERATIONS + 1))


# ----------------------------------------------------------------------------------------------------------------
# Signals during start-up and saves, a finished run missing its end products, train_reward.py's SIGTERM,
# rlhf_pipeline.py's --out (issue 25).


def _error_lines(stderr, prog="ppo_gpt2.py"):
    return [line for line in stderr.splitlines() if line.startswith(f"{prog}: error:") or "Traceback" in line]


@pytest.mark.parametrize("signum,delay", [(signal.SIGINT, 1.0), (signal.SIGTERM, 3.0), (signal.SIGINT, 7.0),
                                          (signal.SIGTERM, 7.0)])
def test_signal_during_start_up_is_one_line_and_leaves_nothing(tmp_path, signum, delay):
    run_dir = tmp_path / "run"
    proc = _start(run_dir)
    time.sleep(delay)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=300)
    if "received signal" in err:  # a fast machine: the loop had started and saved (its own contract)
        assert proc.returncode == 0 and not (run_dir / "ppojax.lock").exists(), err[-3000:]
        return
    assert proc.returncode == 128 + signum, err[-3000:]
    errors = _error_lines(err)
    name = signal.Signals(signum).name
    assert errors == [f"ppo_gpt2.py: error: interrupted by {name} during start-up; nothing was written"], err[-3000:]
    assert not run_dir.exists()  # the directory this job created is gone, with its lock


def test_signal_during_start_up_of_a_resume_keeps_the_run(uninterrupted, reference, tmp_path):
    """A resumed run interrupted while starting: its directory stays as it was (no lock), and the rerun finishes
    it exactly as the uninterrupted run did."""
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted, run_dir)
    before = sorted(str(p) for p in run_dir.rglob("*"))
    proc = _start(run_dir, "--iterations", str(ITERATIONS + 2))
    time.sleep(4.0)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    if "received signal" not in err:
        assert proc.returncode == 143 and len(_error_lines(err)) == 1, err[-3000:]
        assert sorted(str(p) for p in run_dir.rglob("*")) == before
    assert not (run_dir / "ppojax.lock").exists()
    code, err = _run(run_dir)
    assert code == 0 and not _errors(err), err[-3000:]
    assert _metrics(run_dir)[:ITERATIONS] == reference


def test_second_sigint_during_a_save_is_one_line_and_resume_equals_uninterrupted(reference, tmp_path):
    run_dir = tmp_path / "run"
    proc = _start(run_dir)
    _wait_for_iterations(proc, run_dir, 2, poll=0.02)
    proc.send_signal(signal.SIGINT)  # the loop finishes the iteration and saves ...
    time.sleep(0.4)
    proc.send_signal(signal.SIGINT)  # ... and the second one cuts the save
    _, err = proc.communicate(timeout=300)
    errors = _error_lines(err)
    if proc.returncode == 0:  # the save had finished before the second signal: the loop's own stop
        assert not errors and "received signal" in err, err[-3000:]
    else:
        assert proc.returncode == 130, err[-3000:]
        assert len(errors) == 1 and "interrupted by SIGINT; the checkpoints already saved are kept" in errors[0], err
    assert not (run_dir / "ppojax.lock").exists()
    code, err = _run(run_dir)
    assert code == 0 and not _errors(err), err[-3000:]
    _assert_equals_uninterrupted(run_dir, reference)


def test_rerun_of_a_finished_run_writes_its_missing_curves_and_export(uninterrupted, reference, tmp_path):
    """What kill -9 after the last iteration's checkpoint leaves: no curves.png and no export. The rerun writes
    them instead of saying "nothing to do"."""
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted, run_dir)
    (run_dir / "curves.png").unlink()
    shutil.rmtree(run_dir / "export")
    code, err = _run(run_dir)
    assert code == 0 and not _errors(err), err[-3000:]
    assert "wrote what was missing: curves.png, export" in err, err[-3000:]
    assert (run_dir / "curves.png").stat().st_size > 0 and (run_dir / "export" / "config.json").exists()
    assert _metrics(run_dir) == reference
    code, err = _run(run_dir)  # now complete: nothing to do
    assert code == 0 and "nothing to do" in err


def test_kill_9_after_the_last_iteration_then_rerun_has_curves(reference, tmp_path):
    run_dir = tmp_path / "run"
    proc = _start(run_dir)
    deadline = time.time() + 300
    while proc.poll() is None and not (run_dir / "checkpoints" / str(ITERATIONS)).is_dir() and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    code, err = _run(run_dir)
    assert code == 0 and not _errors(err), err[-3000:]
    assert (run_dir / "curves.png").exists() and (run_dir / "export").is_dir()
    _assert_equals_uninterrupted(run_dir, reference)


def test_train_reward_sigterm_is_one_line_keeps_the_saved_epochs_and_resumes(tmp_path):
    rows = [{"query": f"Item {i} was", "responses": [" good", " bad"], "choice": i % 2} for i in range(64)]
    data = tmp_path / "labels.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "rm"
    argv = [sys.executable, str(REPO / "experiments" / "train_reward.py"), "--data", str(data), "--init", "random",
            "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--n-positions", "32", "--out", str(out),
            "--query-length", "8", "--response-length", "4", "--batch-size", "8", "--normalize", "none"]
    proc = subprocess.Popen(argv + ["--epochs", "200"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=ENV, cwd=REPO)
    deadline = time.time() + 300
    while proc.poll() is None and not (out / "checkpoints" / "1").is_dir() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-3000:]
    errors = _error_lines(err, "train_reward.py")
    assert len(errors) == 1 and "interrupted by SIGTERM; the checkpoints already saved are kept" in errors[0], err
    assert not (out / "ppojax.lock").exists() and (out / "checkpoints" / "1").is_dir()
    saved = max(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    done = subprocess.run(argv + ["--epochs", str(saved + 1)], capture_output=True, text=True, env=ENV, cwd=REPO,
                          timeout=300)
    assert done.returncode == 0 and f"resuming {out} after epoch {saved}" in done.stderr, done.stderr[-3000:]


@pytest.mark.parametrize("case", ["file", "under_a_file", "not_creatable", "missing_policy"])
def test_pipeline_out_and_policy_errors_are_one_line_and_create_nothing(tmp_path, case):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    out, extra, words = {
        "file": (a_file, ["--fast"], "is a file, not a directory"),
        "under_a_file": (a_file / "sub", ["--fast"], "is a file, not a directory"),
        "not_creatable": (Path("/proc/ppojax-no-such-dir/out"), ["--fast"], "cannot create the directory"),
        "missing_policy": (tmp_path / "out", ["--policy", str(tmp_path / "no-policy")], "does not exist"),
    }[case]
    before = sorted(p.name for p in tmp_path.iterdir())
    proc = subprocess.run([sys.executable, str(REPO / "experiments" / "rlhf_pipeline.py"), "--out", str(out), *extra],
                          capture_output=True, text=True, env=ENV, cwd=REPO, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = _error_lines(proc.stderr, "rlhf_pipeline.py")
    assert len(errors) == 1 and words in errors[0], proc.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == before and a_file.read_text() == "x"


# A host reward that hangs: SIGTERM and reward.timeout_s end the run (exit 1, one line, last good checkpoint kept,
# lock released), and a rerun resumes to what an uninterrupted run with the same reward leaves.

HANGING_REWARD = '''
import os
import time

import ppojax


@ppojax.register_reward("hangs_after", host=True)
def hangs_after(responses):
    """The length of each response; from call HANG_AFTER + 1 on, it never returns."""
    hangs_after.calls = getattr(hangs_after, "calls", 0) + 1
    if hangs_after.calls > int(os.environ.get("HANG_AFTER", "1000000")):
        time.sleep(3600)
    return [float(len(r)) for r in responses]
'''
# Scoring and sample tables call the reward: iterations 1 and 2 make calls 1-4, iteration 3 scores with call 5.
HANG_ARGS = ["--import", "hanging_reward", "--set", "reward.kind=hangs_after"]


@pytest.fixture(scope="module")
def hanging_reward(tmp_path_factory):
    folder = tmp_path_factory.mktemp("modules")
    (folder / "hanging_reward.py").write_text(HANGING_REWARD)
    return folder


def _hang_env(folder, hang_after=None):
    env = dict(ENV, PYTHONPATH=os.pathsep.join([str(folder), ENV.get("PYTHONPATH", "")]))
    if hang_after is not None:
        env["HANG_AFTER"] = str(hang_after)
    return env


def _hang_run(folder, run_dir, *extra, hang_after=None, timeout=600):
    proc = subprocess.run([sys.executable, str(SCRIPT), *ARGS, "--run-dir", str(run_dir), *HANG_ARGS, *extra],
                          capture_output=True, text=True, env=_hang_env(folder, hang_after), cwd=REPO,
                          timeout=timeout)
    return proc.returncode, proc.stderr


@pytest.fixture(scope="module")
def hang_reference(hanging_reward, tmp_path_factory):
    """The metrics of the run with the same reward that never hangs, done in one go."""
    run_dir = tmp_path_factory.mktemp("hang-reference")
    code, err = _hang_run(hanging_reward, run_dir)
    assert code == 0, err[-3000:]
    return _metrics(run_dir)


def _resumes_to_reference(folder, run_dir, reference, last_good):
    assert (run_dir / "checkpoints" / str(last_good)).is_dir()
    code, err = _hang_run(folder, run_dir)  # the reward fixed: the rerun resumes from the last good checkpoint
    assert code == 0 and not _errors(err), err[-3000:]
    assert f"resuming {run_dir} from iteration {last_good}" in err
    _assert_equals_uninterrupted(run_dir, reference)


def test_sigterm_stops_a_run_whose_reward_hangs(hanging_reward, hang_reference, tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *ARGS, "--run-dir", str(run_dir), *HANG_ARGS],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_hang_env(hanging_reward, hang_after=4), cwd=REPO)
    deadline = time.time() + 300
    while not (run_dir / "checkpoints" / "2").is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(3)  # iteration 3's scoring is now stuck in the reward
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert time.time() - sent < 30, err[-3000:]  # a 5 s grace for the reward, then out through the normal path
    errors = _errors(err)
    assert proc.returncode == 1 and len(errors) == 1, err[-3000:]
    assert errors[0].startswith("[ppojax] error: reward.kind='hangs_after' was abandoned at iteration 3: "
                                "still running 5 s after SIGTERM"), errors[0]
    assert "last good checkpoint (iteration 2)" in errors[0]
    assert not (run_dir / "ppojax.lock").exists()
    _resumes_to_reference(hanging_reward, run_dir, hang_reference, last_good=2)


def test_reward_timeout_stops_a_run_whose_reward_hangs(hanging_reward, hang_reference, tmp_path):
    run_dir = tmp_path / "run"
    code, err = _hang_run(hanging_reward, run_dir, "--set", "reward.timeout_s=2", hang_after=4)
    errors = _errors(err)
    assert code == 1 and len(errors) == 1, err[-3000:]
    assert errors[0].startswith("[ppojax] error: reward.kind='hangs_after' timed out at iteration 3: no result "
                                "after 2 s (reward.timeout_s)"), errors[0]
    assert not (run_dir / "ppojax.lock").exists()
    _resumes_to_reference(hanging_reward, run_dir, hang_reference, last_good=2)



# ----------------------------------------------------------------------------------------------------------------
# Full disks, file-size limits and a lost lock: one line, exit code 1, the last good checkpoint kept, the lock
# released, nothing half-written left; once the cause is gone, the same command ends where an uninterrupted run does.


def _file_size_limit(max_bytes):
    """``ulimit -f`` for the child: writes past ``max_bytes`` fail with EFBIG (SIGXFSZ, which would kill it, is
    ignored, as a shell's ``trap '' XFSZ`` would)."""
    import resource

    def preexec():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, resource.RLIM_INFINITY))

    return preexec


def _run_limited(run_dir, preexec, *extra):
    proc = subprocess.run([sys.executable, str(SCRIPT), *ARGS, "--run-dir", str(run_dir), *extra],
                          capture_output=True, text=True, env=ENV, cwd=REPO, timeout=600, preexec_fn=preexec)
    return proc.returncode, proc.stderr


def _leftovers(run_dir):
    """Temporary or half-written things: staged exports, orbax's unfinished steps, atomic writes' temporaries, write
    probes, the lock."""
    return sorted(str(p.relative_to(run_dir)) for p in Path(run_dir).rglob("*")
                  if p.name.endswith((".partial", ".tmp")) or "orbax-checkpoint-tmp" in p.name
                  or "write-probe" in p.name or p.name == "ppojax.lock")


def test_file_size_limit_during_a_checkpoint_save(reference, tmp_path):
    run_dir = tmp_path / "run"
    code, err = _run(run_dir, "--iterations", "3")
    assert code == 0, err[-3000:]
    # 1 MB: the logs fit, a checkpoint's array data (several MB) does not.
    code, err = _run_limited(run_dir, _file_size_limit(1 << 20))
    assert code == 1, err[-3000:]
    checkpoints = run_dir / "checkpoints"
    assert _errors(err) == [f"[ppojax] error: checkpoint 4 could not be written to {checkpoints}: File too large. "
                            f"The last good checkpoint (iteration 3) is intact in {checkpoints}."], err[-3000:]
    assert "ERROR" not in err.replace("[ppojax] error", ""), err[-3000:]
    assert sorted(p.name for p in checkpoints.iterdir()) == ["2", "3"] and _leftovers(run_dir) == []
    code, err = _run(run_dir)  # the limit lifted: resumes from 3
    assert code == 0 and not _errors(err), err[-3000:]
    _assert_equals_uninterrupted(run_dir, reference)


def test_file_size_limit_during_the_export(uninterrupted, reference, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted, run_dir)
    shutil.rmtree(run_dir / "export")  # what a kill during the export leaves: the rerun exports
    # 3 MB: the tokenizer (1.7 MB) fits, the weights (6.5 MB) do not.
    code, err = _run_limited(run_dir, _file_size_limit(3 << 20))
    assert code == 1, err[-3000:]
    assert _errors(err) == [f"[ppojax] error: the export to {run_dir / 'export'} could not be written: File too "
                            f"large. The checkpoints in {run_dir / 'checkpoints'} are kept: rerun the same command "
                            "to export again (once there is space)"], err[-3000:]
    assert not (run_dir / "export").exists() and _leftovers(run_dir) == []
    code, err = _run(run_dir)  # the limit lifted: exports (and trains nothing)
    assert code == 0 and not _errors(err) and "exported the policy" in err, err[-3000:]
    for f in (uninterrupted / "export").iterdir():
        assert (run_dir / "export" / f.name).read_bytes() == f.read_bytes(), f.name
    _assert_equals_uninterrupted(run_dir, reference)


def test_disk_full_during_a_checkpoint_save(reference, tmp_path):
    """A 48 MB tmpfs: the first checkpoint (~30 MB) fits, the second does not; after the filesystem is grown the
    same command resumes from the first."""
    mount = tmp_path / "small"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mount)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip() or mounted.returncode}")
    try:
        run_dir = mount / "run"
        code, err = _run(run_dir)
        assert code == 1, err[-3000:]
        errors = _errors(err)
        assert len(errors) == 1 and errors[0].startswith("[ppojax] error: checkpoint ") and (
            f"could not be written to {run_dir / 'checkpoints'}: No space left on device. The last good checkpoint "
            f"(iteration ") in errors[0], err[-3000:]
        assert "ERROR" not in err.replace("[ppojax] error", "") and _leftovers(run_dir) == [], err[-3000:]
        subprocess.run(["mount", "-o", "remount,size=256m", str(mount)], check=True)
        code, err = _run(run_dir)
        assert code == 0 and not _errors(err), err[-3000:]
        _assert_equals_uninterrupted(run_dir, reference)
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_deleted_lock_stops_the_job_without_writing_more(reference, tmp_path):
    run_dir = tmp_path / "run"
    proc = _start(run_dir)
    _wait_for_iterations(proc, run_dir, 2)
    (run_dir / "ppojax.lock").unlink()  # someone deletes the lock of a running job
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err[-3000:]
    errors = _errors(err)
    assert len(errors) == 1 and f"the lock {run_dir / 'ppojax.lock'} of this job was deleted" in errors[0], err
    assert _lines(run_dir / "metrics.jsonl") < ITERATIONS and not (run_dir / "curves.png").exists()
    code, err = _run(run_dir)
    assert code == 0 and not _errors(err), err[-3000:]
    _assert_equals_uninterrupted(run_dir, reference)


def test_file_size_limit_during_a_sweep_checkpoint(tmp_path):
    """experiments/sweep.py, 3 seeds x 2 values in two programs (groups): a save that fails is one line and exit
    code 1, the step is dropped from every group (so they resume from one step), and the rerun resumes each run
    exactly once."""
    sweep = [sys.executable, str(REPO / "experiments" / "sweep.py"), "--config", str(REPO / "configs" / "tiny.yaml"),
             "--seeds", "3", "--grid", "ppo.ppo_epochs=1,2", "--set", "checkpoint.every=1", "--run-dir",
             str(tmp_path / "sweep")]
    first = subprocess.run(sweep + ["--iterations", "2"], capture_output=True, text=True, env=ENV, cwd=REPO,
                           timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    limited = subprocess.run(sweep + ["--iterations", "3"], capture_output=True, text=True, env=ENV, cwd=REPO,
                             timeout=600, preexec_fn=_file_size_limit(1 << 20))
    assert limited.returncode == 1, limited.stderr[-3000:]
    errors = [line for line in limited.stderr.splitlines() if "error" in line.lower() or "Traceback" in line]
    checkpoints = tmp_path / "sweep" / "checkpoints"
    assert errors == [f"[sweep] error: checkpoint 3 could not be written to {checkpoints / 'group-0'}: File too "
                      f"large. The last checkpoint (iteration 2) is kept in {checkpoints}: rerun the same command to "
                      "resume"], limited.stderr[-3000:]
    assert [sorted(p.name for p in g.iterdir()) for g in sorted(checkpoints.iterdir())] == [["1", "2"], ["1", "2"]]
    rest = subprocess.run(sweep + ["--iterations", "3"], capture_output=True, text=True, env=ENV, cwd=REPO,
                          timeout=600)
    assert rest.returncode == 0 and "resuming" in rest.stderr, rest.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "sweep" / "metrics.jsonl").read_text().splitlines()]
    assert sorted((r["run"], r["iteration"]) for r in rows) == [(run, it) for run in range(6) for it in (1, 2, 3)]


def test_failed_export_at_the_end_of_training_is_not_a_finished_run(tmp_path, monkeypatch, capsys):
    """In process: the export after the last iteration fails (ENOSPC while writing the weights): exit code 1, one
    error line, no export and no staged .partial; the rerun trains nothing and exports."""
    import errno

    from ppojax.train import build_run
    from ppojax.train import run as runs

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    real = runs._save_policy

    def full(path, *args):
        path.mkdir(parents=True)
        (path / "model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device", str(path / "model.safetensors"))

    run_dir = tmp_path / "run"
    monkeypatch.setattr(runs, "_save_policy", full)
    with build_run(REPO / "configs" / "tiny.yaml", run_dir, overrides=["iterations=1"]) as run:
        outcome = run.train()
    assert outcome.exit_code == 1 and outcome.error == (f"the export to {run_dir / 'export'} could not be written: No "
                                                        "space left on device")
    assert [line for line in capsys.readouterr().err.splitlines() if "error" in line] == [
        f"[ppojax] error: {outcome.error}. The checkpoints in {run_dir / 'checkpoints'} are kept: rerun the same "
        "command to export again (once there is space)"]
    assert not (run_dir / "export").exists() and _leftovers(run_dir) == []
    monkeypatch.setattr(runs, "_save_policy", real)
    with build_run(REPO / "configs" / "tiny.yaml", run_dir, overrides=["iterations=1"]) as run:
        outcome = run.train()
    assert outcome.exit_code == 0 and (run_dir / "export" / "model.safetensors").exists()
    assert (run_dir / "export" / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~_umask()
    assert _leftovers(run_dir) == []


def _umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# ----------------------------------------------------------------------------------------------------------------
# Two processes (jax.distributed over loopback, one CPU device each)


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_processes(run_dir, logs, *extra, n=2):
    """``n`` processes of one run; their output goes to files under ``logs`` (a full pipe would block one process
    and stall the others' collectives)."""
    port = _free_port()
    procs = []
    for pid in range(n):
        out, err = (open(logs / f"{run_dir.name}.{pid}.{kind}", "w") for kind in ("out", "err"))
        procs.append(subprocess.Popen(
            [sys.executable, str(SCRIPT), *ARGS, "--run-dir", str(run_dir), "--coordinator", f"127.0.0.1:{port}",
             "--num-processes", str(n), "--process-id", str(pid), "--distributed-timeout", "120", *extra],
            stdout=out, stderr=err, text=True, env=ENV, cwd=REPO))
        out.close(), err.close()
    return procs


def _stderr(run_dir, logs, pid):
    return (logs / f"{run_dir.name}.{pid}.err").read_text()


def _reap(procs, timeout=400):
    try:
        return [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


# One process with two CPU devices: the same mesh (data=2) as two processes with one device each, and the same
# metrics, bit for bit (an all-reduce of two partial sums is the same sum in either order).
TWO_DEVICES = dict(ENV, XLA_FLAGS=(ENV.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip())


@pytest.fixture(scope="module")
def two_device_reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("two_devices")
    code, err = _run(run_dir, env=TWO_DEVICES)
    assert code == 0, err[-3000:]
    return _metrics(run_dir)


def test_two_processes_on_a_fresh_directory_start_and_finish(two_device_reference, tmp_path):
    # Issue 25: on a fresh directory the faster process created checkpoints/ while the slower one still looked for
    # it; they took different branches and crashed in 2 of 4 attempts ("sync_global_devices name mismatch").
    for attempt in range(3):
        run_dir = tmp_path / f"run{attempt}"
        procs = _start_processes(run_dir, tmp_path)
        codes = _reap(procs)
        errs = [_stderr(run_dir, tmp_path, pid) for pid in (0, 1)]
        assert codes == [0, 0], [e[-3000:] for e in errs]
        assert not any(_errors(e) for e in errs), errs
        _assert_equals_uninterrupted(run_dir, two_device_reference)
        assert (run_dir / "export").is_dir()


_ABORT_SIGNS = ("Traceback", "SIGABRT", "Check failed", "stack trace", "Fatal Python error", "*** ")


@pytest.mark.parametrize("victim", [1, 0])
def test_killed_peer_ends_the_survivor_with_one_line(two_device_reference, tmp_path, victim):
    # Issue 25: the survivor of a kill -9 aborted after 93 s (JAX's missed heartbeats) with an 80-line C++ stack.
    from ppojax.parallel import distributed

    run_dir = tmp_path / "run"
    procs = _start_processes(run_dir, tmp_path)
    survivor = 1 - victim
    try:
        _wait_for_iterations(procs[survivor], run_dir, 3)
        time.sleep(0.3)  # into iteration 4 (or its checkpoint)
        assert procs[survivor].poll() is None, _stderr(run_dir, tmp_path, survivor)[-3000:]
        procs[victim].send_signal(signal.SIGKILL)
        t0 = time.monotonic()
        code = procs[survivor].wait(timeout=distributed.SILENCE_S + 40)
        took = time.monotonic() - t0
    finally:
        _reap(procs, timeout=5)
    err = _stderr(run_dir, tmp_path, survivor)
    assert code == distributed.LOST_EXIT_CODE and took < distributed.SILENCE_S + distributed.BEAT_S + 5, (took, err)
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith(f"[ppojax] error: process {victim} of 2 stopped responding "
                                                     "during iteration "), err
    assert "The last good checkpoint (iteration " in errors[0], err
    assert not any(sign in err for sign in _ABORT_SIGNS), err
    assert not re.search(r"^[WEF]\d{4} ", err, re.MULTILINE), err  # no C++ log line either
    print(f"survivor {survivor} ended {took:.1f} s after the kill: {errors[0]}")
    if survivor == 0:  # the lock holder released it; a killed process 0's lock is stale (taken over below)
        assert not (run_dir / "ppojax.lock").exists()
    # The last checkpoint is intact: one process (two devices) resumes from it and ends as the uninterrupted run.
    code, err = _run(run_dir, env=TWO_DEVICES)
    assert code == 0 and not _errors(err), err[-3000:]
    _assert_equals_uninterrupted(run_dir, two_device_reference)
