"""Data parallelism, FSDP, multi-process and checkpoints across meshes (``ppojax.parallel``, ``ppojax.distributed``).

The multi-device checks run ``tests/_parallel_worker.py`` in subprocesses with
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` (this pytest process keeps its one device); the reference
is always the same iteration on one device.
"""

import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from ppojax import parallel
from ppojax.parallel import distributed
from ppojax.rl.config import OptimizerConfig, PPOConfig

WORKER = Path(__file__).with_name("_parallel_worker.py")
REPO = WORKER.parent.parent
TOL = 1e-5  # fp32, reduction order only


def _run_worker(*args, timeout=400):
    proc = subprocess.run([sys.executable, str(WORKER), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def on_8_devices(tmp_path_factory):
    return _run_worker("devices", 8, tmp_path_factory.mktemp("ckpt") / "checkpoints")


def _params(run):
    return np.asarray(run["params"])


def test_one_iteration_is_independent_of_the_device_count(on_8_devices):
    ref = on_8_devices["data=1"]
    for k in (2, 4, 8):
        run = on_8_devices[f"data={k}"]
        assert run["tokens"] == ref["tokens"], f"{k} devices sampled different tokens"
        np.testing.assert_allclose(_params(run), _params(ref), atol=TOL, err_msg=f"{k} devices")
        for name in ("score_mean", "kl", "advantage_mean", "loss/total", "grad_norm"):
            np.testing.assert_allclose(run["metrics"][name], ref["metrics"][name], atol=TOL, err_msg=name)
    # The update moved the parameters (a vacuous equality would not).
    assert ref["metrics"]["grad_norm"] > 0


def test_single_jit_iteration_equals_the_two_halves(on_8_devices):
    np.testing.assert_allclose(_params(on_8_devices["iteration data=4"]), _params(on_8_devices["data=1"]), atol=TOL)


def test_shard_map_route_with_explicit_psum_matches_one_device(on_8_devices):
    """Explicit collectives: one psum of grads, a global permutation from gathered rows (a per-device permutation
    or a doubled gradient would both break this)."""
    run, ref = on_8_devices["shard_map data=4"], on_8_devices["data=1"]
    np.testing.assert_allclose(_params(run), _params(ref), atol=TOL)
    np.testing.assert_allclose(run["metrics"]["grad_norm"], ref["metrics"]["grad_norm"], rtol=1e-5)


def test_fsdp_with_remat_and_grad_accum_equals_unsharded_and_shards_params(on_8_devices):
    run, ref = on_8_devices["data=2,fsdp=4"], on_8_devices["data=1"]
    assert run["tokens"] == ref["tokens"]
    np.testing.assert_allclose(_params(run), _params(ref), atol=TOL)
    per_device = on_8_devices["fsdp_bytes"]
    assert len(per_device) == 8
    full = on_8_devices["full_bytes"]
    # Every weight matrix is split 4 ways; only a few small vectors that 4 does not divide stay whole.
    assert max(per_device.values()) < 0.3 * full, (per_device, full)
    assert any("fsdp" in spec for spec in on_8_devices["fsdp_specs"])


def test_checkpoint_written_on_one_mesh_restores_onto_another(on_8_devices):
    assert on_8_devices["restore_equal"]
    assert on_8_devices["restore_on_target_mesh"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one_process_with_four_devices(on_8_devices, tmp_path):
    port = _free_port()
    procs, logs = [], []
    for pid in (0, 1):  # output to files: a full pipe would block one process and stall the other's collectives
        out, err = open(tmp_path / f"out{pid}", "w+"), open(tmp_path / f"err{pid}", "w+")
        logs.append((out, err))
        procs.append(subprocess.Popen([sys.executable, str(WORKER), "process", str(port), str(pid)], stdout=out,
                                      stderr=err, text=True, cwd=REPO))
    outs = []
    try:
        for p, (out, err) in zip(procs, logs):
            p.wait(timeout=300)
            out.seek(0), err.seek(0)
            assert p.returncode == 0, err.read()[-3000:]
            outs.append(json.loads(out.read().strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    ref = on_8_devices["iteration data=4"]
    for run in outs:
        for name, value in ref["metrics"].items():
            if name != "time_s":
                np.testing.assert_allclose(run["metrics"][name], value, atol=TOL, err_msg=name)
        np.testing.assert_allclose(_params(run), _params(ref), atol=TOL)


# ----------------------------------------------------------------------------------------------------------------
# Bad input: clear errors before compiling (in this process, one device)


def test_mesh_that_does_not_match_the_devices():
    with pytest.raises(parallel.MeshError, match=r"data=2 x fsdp=1 = 2 devices, but 1 are visible"):
        parallel.make_mesh("data=2")
    with pytest.raises(parallel.MeshError, match="fsdp=3 does not divide"):
        parallel.make_mesh("fsdp=3")
    with pytest.raises(parallel.MeshError, match="expected 'data=N,fsdp=M'"):
        parallel.MeshConfig.parse("data=2,tensor=2")


def test_batch_that_does_not_split_over_the_mesh():
    mesh = jax.sharding.AbstractMesh((4, 2), parallel.MESH_AXES)
    opt = OptimizerConfig()
    with pytest.raises(parallel.MeshError, match="batch_size=12 does not split over the 8 batch shards"):
        parallel.check_batch(PPOConfig(batch_size=12, minibatch_size=12), opt, mesh)
    with pytest.raises(parallel.MeshError, match="minibatch_size=12"):
        parallel.check_batch(PPOConfig(batch_size=48, minibatch_size=12), opt, mesh)
    with pytest.raises(parallel.MeshError, match="micro-batch"):
        parallel.check_batch(PPOConfig(batch_size=32, minibatch_size=16), OptimizerConfig(grad_accum_steps=4), mesh)
    parallel.check_batch(PPOConfig(batch_size=32, minibatch_size=16), OptimizerConfig(grad_accum_steps=2), mesh)


def test_unreachable_coordinator_times_out_with_a_clear_message():
    port = _free_port()  # nothing listens there
    cfg = distributed.DistributedConfig(coordinator=f"127.0.0.1:{port}", num_processes=2, process_id=1,
                                        timeout_s=2)
    t0 = time.monotonic()
    with pytest.raises(distributed.DistributedError, match=rf"coordinator 127.0.0.1:{port} unreachable after 2 s"):
        distributed.initialize(cfg)
    assert time.monotonic() - t0 < 15


def test_distributed_settings_are_checked(monkeypatch):
    with pytest.raises(distributed.DistributedError, match="needs num_processes and process_id"):
        distributed.DistributedConfig(coordinator="10.0.0.1:1234")
    with pytest.raises(distributed.DistributedError, match="must be 'host:port'"):
        distributed.DistributedConfig(coordinator="10.0.0.1", num_processes=2, process_id=0)
    with pytest.raises(distributed.DistributedError, match=r"process_id=2 must be in \[0, num_processes=2\)"):
        distributed.DistributedConfig(coordinator="h:1", num_processes=2, process_id=2)
    monkeypatch.setenv("PPOJAX_COORDINATOR", "h:1")
    monkeypatch.setenv("PPOJAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("PPOJAX_PROCESS_ID", "3")
    cfg = distributed.DistributedConfig.from_env()
    assert (cfg.coordinator, cfg.num_processes, cfg.process_id) == ("h:1", 4, 3)
    assert distributed.DistributedConfig.from_env(process_id=1).process_id == 1  # a flag wins over the env


def test_runner_rejects_a_bad_mesh_before_compiling(tmp_path, capsys):
    from ppojax import cli as runner

    code = runner.main(["--config", str(REPO / "configs" / "tiny.yaml"), "--run-dir", str(tmp_path / "run"),
                        "--mesh", "data=3"])
    assert code == 2
    assert "data=3 x fsdp=1 = 3 devices, but 1 are visible" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_param_spec_shards_the_largest_divisible_dimension():
    P = jax.sharding.PartitionSpec
    assert parallel.param_spec((2, 32, 96), 4) == P(None, None, "fsdp")
    assert parallel.param_spec((48, 32), 4) == P("fsdp", None)
    assert parallel.param_spec((2, 32, 96), 1) == P()
    assert parallel.param_spec((7, 5), 4) == P()  # nothing divides: replicated
    assert parallel.param_spec((), 4) == P()


# ----------------------------------------------------------------------------------------------------------------
# Start-up failures are one line within the timeout, never jax.distributed's SIGABRT (exit 134)


def _service(port, banner):
    """A TCP service on ``port`` that is not ppojax: it sends ``banner`` (or nothing) to whoever connects."""
    server = socket.create_server(("127.0.0.1", port))
    server.settimeout(0.2)
    conns, stop = [], threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except socket.timeout:
                continue
            conns.append(conn)
            if banner:
                conn.sendall(banner)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()

    def close():
        stop.set()
        thread.join()
        for c in conns:
            c.close()
        server.close()

    return close


@pytest.mark.parametrize("banner, match", [(b"SSH-2.0-OpenSSH_9.6\r\n", "is not ppojax process 0 .*SSH-2.0"),
                                           (b"", "accepted the connection but gave no go within 2 s")],
                         ids=["answers", "silent"])
def test_a_service_that_is_not_process_0_fails_cleanly(banner, match):
    port = _free_port()
    close = _service(port, banner)
    try:
        t0 = time.monotonic()
        with pytest.raises(distributed.DistributedError, match=match):
            distributed.initialize(distributed.DistributedConfig(coordinator=f"127.0.0.1:{port}", num_processes=2,
                                                                 process_id=1, timeout_s=2))
        assert time.monotonic() - t0 < 15
    finally:
        close()


def test_process_0_whose_peers_never_join_fails_cleanly_in_the_runner(tmp_path, capsys):
    from ppojax import cli as runner

    port = _free_port()
    t0 = time.monotonic()
    code = runner.main(["--config", str(REPO / "configs" / "tiny.yaml"), "--run-dir", str(tmp_path / "run"),
                        "--coordinator", f"127.0.0.1:{port}", "--num-processes", "3", "--process-id", "0",
                        "--distributed-timeout", "2"])
    err = capsys.readouterr().err
    assert code == 2 and time.monotonic() - t0 < 20
    lines = [line for line in err.splitlines() if "error" in line]
    assert len(lines) == 1 and "only 1 of 3 processes joined" in lines[0] and "missing process ids: [1, 2]" in lines[0]
    assert not (tmp_path / "run").exists()


def test_processes_started_with_other_settings_are_refused_on_both_sides():
    port = _free_port()
    address = f"127.0.0.1:{port}"
    errors = {}

    def process_0():
        try:
            distributed.gather_processes(address, 3, timeout_s=10)
        except distributed.DistributedError as e:
            errors[0] = str(e)

    thread = threading.Thread(target=process_0)
    thread.start()
    with pytest.raises(distributed.DistributedError, match=r"refused process 1: it was started with "
                                                           r"num_processes=2, process 0 with 3"):
        distributed.check_in(address, 2, 1, timeout_s=10)
    thread.join()
    assert "does not fit: it was started with num_processes=2" in errors[0]


def test_rendezvous_releases_every_process_together():
    port = _free_port()
    address = f"127.0.0.1:{port}"
    done = []
    peers = [threading.Thread(target=lambda i=i: (distributed.check_in(address, 3, i, timeout_s=20), done.append(i)))
             for i in (1, 2)]
    for p in peers:  # the peers may start first: they retry until process 0 listens
        p.start()
    time.sleep(0.5)
    distributed.gather_processes(address, 3, timeout_s=20)
    for p in peers:
        p.join()
    assert sorted(done) == [1, 2]
    with socket.create_server(("127.0.0.1", port)):  # the port is free again, for JAX's service
        pass


_LOCK_TWO_PROCESSES = r"""
import sys
from pathlib import Path
from ppojax.parallel import distributed
from ppojax.train import run as runner

port, pid, run_dir = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
distributed.initialize(distributed.DistributedConfig(coordinator=f"127.0.0.1:{port}", num_processes=2,
                                                     process_id=pid, timeout_s=60))
lock = runner.lock_run_dir(run_dir, is_main=pid == 0)  # held: only process 0 holds a lock object
print("LOCKED", lock is not None, flush=True)
try:
    runner.lock_run_dir(run_dir, is_main=pid == 0)  # a second job, while this one holds it
except runner.RunError as e:
    print("REFUSED", e, flush=True)
if lock is not None:
    lock.release()
"""


def test_only_process_0_takes_the_run_lock_and_every_process_learns_the_outcome(tmp_path):
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-c", _LOCK_TWO_PROCESSES, str(port), str(pid), str(tmp_path / "run")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
             for pid in (0, 1)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert "LOCKED True" in outs[0][0] and "LOCKED False" in outs[1][0]
    assert "REFUSED" in outs[0][0] and "is in use by another job" in outs[0][0]
    assert "REFUSED process 0 could not lock the run directory" in outs[1][0]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == []


_LIFELINE = r"""
import socket, sys, time
from ppojax.parallel import distributed

ours, theirs = socket.socketpair()
distributed._watch_peers({1: ours}, 0, 2)
distributed.set_progress(iteration=3, last_good="The last good checkpoint (iteration 2) is intact.")
distributed.on_peer_lost(lambda: print("CLEANED", flush=True))
if sys.argv[1] == "goodbye":
    theirs.sendall(b"exit 0\n")
theirs.close()
time.sleep(2.0)
print("STILL HERE", flush=True)
"""


@pytest.mark.parametrize("how", ["killed", "goodbye"])
def test_lifelines_end_a_survivor_with_one_line_unless_the_peer_said_goodbye(how):
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", _LIFELINE, how], capture_output=True, text=True, cwd=REPO,
                          timeout=60)
    if how == "goodbye":  # a peer that finished: nothing to say
        assert proc.returncode == 0 and "STILL HERE" in proc.stdout and proc.stderr == "", proc.stderr
        return
    assert proc.returncode == distributed.LOST_EXIT_CODE and "CLEANED" in proc.stdout, proc
    assert "STILL HERE" not in proc.stdout and time.monotonic() - t0 < 30
    assert proc.stderr.splitlines() == ["[ppojax] error: process 1 of 2 stopped responding during iteration 3. The "
                                        "last good checkpoint (iteration 2) is intact."]
