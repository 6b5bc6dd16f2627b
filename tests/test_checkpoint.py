"""Checkpoints: exact round trips, pruning, fallback past checkpoints corrupted on disk, clear errors, resharding."""

import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ppojax.io.checkpoint import CheckpointCorruptError, Checkpointer, CheckpointMismatchError, check_writable


@flax.struct.dataclass
class _State:
    params: dict
    opt_state: Any
    key: jax.Array
    step: jax.Array
    kl_coef: jax.Array
    label: str = flax.struct.field(pytree_node=False, default="fresh")


def _make_state(seed: int, *, trained: bool, label: str = "fresh") -> _State:
    """A small train state; ``trained`` takes one Adam step so that every optimizer leaf is non-trivial."""
    k1, k2 = jax.random.split(jax.random.key(seed + 100))
    params = {
        # Big enough (16 KiB of incompressible floats) that a flipped byte in its data file lands in the values.
        "dense": {"kernel": jax.random.normal(k1, (64, 64)), "bias": jnp.full((64,), 0.5 * seed, jnp.float32)},
        "emb": jax.random.normal(k2, (5, 4)).astype(jnp.bfloat16),
    }
    tx = optax.adam(1e-3)
    opt_state = tx.init(params)
    if trained:
        grads = jax.tree.map(lambda p: jnp.ones_like(p) * (seed + 1), params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
    return _State(params=params, opt_state=opt_state, key=jax.random.key(seed), step=jnp.int32(7 * seed + 3),
                  kl_coef=jnp.float32(0.1 * seed + 0.05), label=label)


def _assert_identical(got, want):
    """Same treedef, and every leaf the same dtype and the same bytes (keys compared through their data)."""
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        if jax.dtypes.issubdtype(b.dtype, jax.dtypes.prng_key):
            assert a.dtype == b.dtype and jax.random.key_impl(a) == jax.random.key_impl(b)
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        assert a.dtype == b.dtype and a.shape == b.shape
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


def _step_dir(root: Path, step: int) -> Path:
    return root / str(step)


def _data_files(root: Path, step: int) -> list[Path]:
    files = [p for p in (_step_dir(root, step) / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert files, "expected orbax array data files in a 'd' directory"
    return files


def _truncate_data(root, step):
    for f in _data_files(root, step):
        os.truncate(f, f.stat().st_size // 2)


def _delete_metadata(root, step):
    (_step_dir(root, step) / "metadata" / "metadata").unlink()


def _flip_bit_mid_data(root, step):
    f = max(_data_files(root, step), key=lambda p: p.stat().st_size)
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    f.write_bytes(bytes(raw))


def test_round_trip_is_bit_identical(tmp_path):
    saved = _make_state(1, trained=True, label="saved")
    meta = {"iteration": 4, "data_position": [2, 17], "config_hash": "abc123", "wall_time": 12.5}
    with Checkpointer(tmp_path / "run") as ckpt:
        ckpt.save(4, saved, meta)
        step, restored, restored_meta = ckpt.restore(_make_state(0, trained=False, label="target"))

    assert step == 4 and restored_meta == meta
    _assert_identical(restored, saved.replace(label="target"))
    assert restored.label == "target"  # static fields come from the target, they are not saved
    assert isinstance(restored.opt_state[0], optax.ScaleByAdamState)  # namedtuples survive
    assert restored.step.dtype == jnp.int32 and restored.kl_coef.dtype == jnp.float32
    np.testing.assert_array_equal(jax.random.key_data(jax.random.split(restored.key, 3)),
                                  jax.random.key_data(jax.random.split(saved.key, 3)))


def test_restore_into_other_sharding_and_abstract_target(tmp_path):
    mesh = jax.make_mesh((1,), ("data",))
    on_mesh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    saved = jax.device_put(_make_state(2, trained=True), on_mesh)
    single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=single), saved)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(0, saved)
        _, restored, meta = ckpt.restore(target)
        _, no_sharding, _ = ckpt.restore(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), saved))
    assert meta == {}
    _assert_identical(restored, saved)
    _assert_identical(no_sharding, saved)
    for leaf in jax.tree.leaves(restored):
        assert leaf.sharding == single


def test_keep_prunes_and_steps_are_listed(tmp_path):
    ckpt = Checkpointer(tmp_path, keep=2)
    assert ckpt.latest_step() is None and ckpt.all_steps() == []
    for step in (10, 20, 30):
        ckpt.save(step, _make_state(step, trained=False), {"iteration": step})
    assert ckpt.all_steps() == [20, 30] and ckpt.latest_step() == 30
    assert not _step_dir(tmp_path, 10).exists()
    # A new Checkpointer on the directory sees the same steps.
    assert Checkpointer(tmp_path, keep=2).all_steps() == [20, 30]

    with pytest.raises(ValueError, match=r"step 30 .*\[30\] already exist"):
        ckpt.save(30, _make_state(0, trained=False))
    ckpt.save(20, _make_state(5, trained=False), {"iteration": "branch"}, force=True)  # replaces 20 and 30
    assert ckpt.all_steps() == [20]
    step, restored, meta = ckpt.restore(_make_state(0, trained=False))
    assert step == 20 and meta == {"iteration": "branch"}
    _assert_identical(restored, _make_state(5, trained=False))
    ckpt.close()


def test_async_save_then_wait(tmp_path):
    saved = _make_state(3, trained=True)
    with Checkpointer(tmp_path, async_save=True) as ckpt:
        ckpt.save(1, saved, {"a": 1})
        ckpt.wait()
        assert ckpt.all_steps() == [1]
        _, restored, _ = ckpt.restore(saved)
    _assert_identical(restored, saved)


@pytest.mark.parametrize(
    "corrupt, reason",
    [(_truncate_data, "cannot read its arrays"), (_delete_metadata, "cannot read its metadata"),
     (_flip_bit_mid_data, "checksum mismatch")],
    ids=["truncated-data", "missing-metadata", "flipped-bit"],
)
def test_corrupt_latest_falls_back_to_previous(tmp_path, corrupt, reason):
    ckpt = Checkpointer(tmp_path, keep=3)
    ckpt.save(1, _make_state(1, trained=True), {"iteration": 1})
    ckpt.save(2, _make_state(2, trained=True), {"iteration": 2})
    corrupt(tmp_path, 2)

    with pytest.warns(UserWarning, match=rf"step 2 .*unusable \({reason}.*restored step 1"):
        step, restored, meta = ckpt.restore(_make_state(0, trained=False))
    assert step == 1 and meta == {"iteration": 1}
    _assert_identical(restored, _make_state(1, trained=True))
    # The bad one is moved aside, so the resumed run can write step 2 again.
    assert ckpt.all_steps() == [1] and len(list(tmp_path.glob("2.corrupt-*"))) == 1
    ckpt.save(2, _make_state(4, trained=True), {"iteration": 2})
    _assert_identical(ckpt.restore(_make_state(0, trained=False))[1], _make_state(4, trained=True))
    ckpt.close()


def test_unfinished_save_is_ignored(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, _make_state(1, trained=False))
    # What a kill in the middle of writing step 2 leaves: orbax's temporary directory, never renamed into place.
    tmp_dir = tmp_path / "2.orbax-checkpoint-tmp-1700000000000"
    (tmp_dir / "state").mkdir(parents=True)
    (tmp_dir / "state" / "_METADATA").write_text("{")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ckpt = Checkpointer(tmp_path)
        assert ckpt.latest_step() == 1 and ckpt.all_steps() == [1]
        step, restored, _ = ckpt.restore(_make_state(0, trained=False))
        ckpt.close()
    assert step == 1
    _assert_identical(restored, _make_state(1, trained=False))
    assert not [w for w in caught if "unusable" in str(w.message)]


def test_no_usable_checkpoint_raises(tmp_path):
    ckpt = Checkpointer(tmp_path)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        ckpt.restore(_make_state(0, trained=False))
    ckpt.save(5, _make_state(1, trained=False))
    _truncate_data(tmp_path, 5)
    with pytest.raises(CheckpointCorruptError, match=r"no usable checkpoint .*step 5: cannot read its arrays"):
        ckpt.restore(_make_state(0, trained=False))
    with pytest.raises(CheckpointCorruptError, match="step 5 .* is unusable"):
        ckpt.restore(_make_state(0, trained=False), step=5)
    with pytest.raises(FileNotFoundError, match="step 6"):
        ckpt.restore(_make_state(0, trained=False), step=6)
    assert ckpt.all_steps() == [5]  # nothing is moved aside when there is nothing to fall back to
    ckpt.close()


def test_structure_mismatch_names_the_paths(tmp_path):
    saved = _make_state(1, trained=False)
    ckpt = Checkpointer(tmp_path)
    ckpt.save(1, saved)
    ckpt.save(2, saved)

    params = dict(saved.params, extra=jnp.zeros(3))
    params["dense"] = {"kernel": jnp.zeros((64, 32))}  # 'bias' missing, kernel reshaped
    target = saved.replace(params=params, key=jax.random.key(0, impl="rbg"))
    with pytest.raises(CheckpointMismatchError) as info:
        ckpt.restore(target)
    message = str(info.value)
    assert "checkpoint step 2 does not match" in message
    assert "in the target but not the checkpoint: .params['extra']" in message
    assert "in the checkpoint but not the target: .params['dense']['bias']" in message
    assert ".params['dense']['kernel']: checkpoint float32[64, 64], target float32[64, 32]" in message
    assert ".key: checkpoint key<threefry2x32>[], target key<rbg>[]" in message
    assert ckpt.all_steps() == [1, 2]  # a wrong target is not corruption: no fallback, nothing moved
    ckpt.close()


def test_bad_inputs_fail_before_writing(tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    with pytest.raises(PermissionError, match="not writable"):
        check_writable(not_a_dir / "run")
    with pytest.raises(PermissionError, match="not writable"):
        Checkpointer(not_a_dir / "run")
    created = check_writable(tmp_path / "a" / "b")
    assert Path(created).is_dir() and not list(Path(created).iterdir())  # the probe is cleaned up

    ckpt = Checkpointer(tmp_path / "run")
    with pytest.raises(TypeError, match="JSON-serializable"):
        ckpt.save(1, _make_state(1, trained=False), {"when": object()})
    with pytest.raises(TypeError, match=r"leaf \['lr'\] is a float"):
        ckpt.save(1, {"w": jnp.zeros(2), "lr": 1e-3})
    with pytest.raises(ValueError, match="keep"):
        Checkpointer(tmp_path / "run", keep=0)
    assert ckpt.all_steps() == []
    ckpt.close()


_MULTI_DEVICE = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding
from ppojax.io.checkpoint import Checkpointer
assert jax.device_count() == 4
mesh4 = jax.make_mesh((4,), ("data",))
state = {"w": jax.device_put(jnp.arange(32.0).reshape(8, 4), NamedSharding(mesh4, P("data"))),
         "key": jax.device_put(jax.random.split(jax.random.key(3), 4), NamedSharding(mesh4, P("data")))}
ckpt = Checkpointer({dir!r})
ckpt.save(1, state)
mesh2 = jax.make_mesh((2,), ("data",), devices=jax.devices()[2:])
for sharding in (NamedSharding(mesh2, P("data")), SingleDeviceSharding(jax.devices()[1])):
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)
    _, got, _ = ckpt.restore(target)
    assert got["w"].sharding == sharding and got["key"].sharding == sharding, (got["w"].sharding, sharding)
    np.testing.assert_array_equal(got["w"], state["w"])
    np.testing.assert_array_equal(jax.random.key_data(got["key"]), jax.random.key_data(state["key"]))
ckpt.close()
print("OK")
"""


def test_restore_onto_another_mesh_in_subprocess(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    code = textwrap.dedent(_MULTI_DEVICE).replace("{dir!r}", repr(str(tmp_path)))
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]


def test_read_only_checkpointer_changes_nothing(tmp_path):
    ckpt = Checkpointer(tmp_path, keep=3)
    ckpt.save(1, _make_state(1, trained=False), {"iteration": 1, "config": {"seed": 1}})
    ckpt.save(2, _make_state(2, trained=False), {"iteration": 2})
    ckpt.close()
    _truncate_data(tmp_path, 2)
    (tmp_path / "3.orbax-checkpoint-tmp-1700000000000").mkdir()  # a save killed midway
    before = sorted((str(p.relative_to(tmp_path)), p.stat().st_size) for p in tmp_path.rglob("*"))

    reader = Checkpointer(tmp_path, read_only=True)
    assert reader.all_steps() == [1, 2]
    assert reader.metadata(1) == {"iteration": 1, "config": {"seed": 1}}
    with pytest.warns(UserWarning, match=r"step 2 .*unusable .*restored step 1 instead. Left it in place"):
        step, _, _ = reader.restore(_make_state(0, trained=False))
    assert step == 1
    with pytest.raises(ValueError, match="read-only"):
        reader.save(3, _make_state(3, trained=False))
    reader.close()
    assert sorted((str(p.relative_to(tmp_path)), p.stat().st_size) for p in tmp_path.rglob("*")) == before
    assert not Path(tmp_path / "missing").exists()
    Checkpointer(tmp_path / "missing", read_only=True).close()
    assert not Path(tmp_path / "missing").exists()  # nothing created either


# What orbax leaves behind when a read fails: the read coroutines (defined in orbax's serialization module; the
# file name is what matters) die with an exception nobody retrieves, one never runs, and TensorStore callbacks hit
# the closed event loop. Orbax's wrapper exception hides the reason behind a TensorStore spec.
_FAILED_READ = r'''
import asyncio, sys, threading, time, warnings
import jax.numpy as jnp
import orbax.checkpoint as ocp
from ppojax.io.checkpoint import Checkpointer

ORBAX_LIKE = """
import asyncio
async def _read_array_index_and_device_put():
    raise Exception("Encountered error while reading array index: (slice(0, 4, 1),). See full TensorStore "
                    "details: <bound method spec of TensorStore({") from ValueError(
        'OUT_OF_RANGE: Error reading "w/0.0" in OCDBT database at local file "/x/2/state/": Requested byte range '
        '[0, 64) is not valid for value of size 0')
def leave_background_errors():
    loop = asyncio.new_event_loop()
    task = loop.create_task(_read_array_index_and_device_put())
    loop.run_until_complete(asyncio.sleep(0.01))
    loop.close()
    return [task, _read_array_index_and_device_put()]
"""
orbax_like = {}
exec(compile(ORBAX_LIKE, "/site-packages/orbax/checkpoint/_src/serialization/serialization.py", "exec"), orbax_like)


class PendingCallback:
    def __del__(self):
        raise RuntimeError("Event loop is closed")


class Unrelated:
    def __del__(self):
        raise KeyError("an unrelated error that must still be shown")


real_restore = ocp.CheckpointManager.restore


def late_callback():  # a TensorStore thread finishing its read after the read has failed and returned
    time.sleep(0.3)
    raise RuntimeError("Event loop is closed")


def failing_restore(self, step, args=None, **kw):
    if step == 2 and "state" in args:
        threading.Thread(target=late_callback).start()
        junk = orbax_like["leave_background_errors"]() + [PendingCallback()]
        try:
            coro = junk[1]
            raise Exception("Encountered error while reading array index. See full TensorStore details: "
                            "TensorStore({") from ValueError(
                'OUT_OF_RANGE: Error reading "w/0.0" in OCDBT database at local file "/x/2/state/": Requested '
                'byte range [0, 64) is not valid for value of size 0')
        finally:
            del junk
    return real_restore(self, step, args=args, **kw)


ocp.CheckpointManager.restore = failing_restore
with Checkpointer(sys.argv[1]) as ckpt:
    ckpt.save(1, {"w": jnp.ones(4)})
    ckpt.save(2, {"w": jnp.zeros(4)})
    step, _, _ = ckpt.restore({"w": jnp.ones(4)})
print("restored", step, file=sys.stderr)
time.sleep(0.6)
try:  # what TensorStore's C++ threads print through PyErr_Print, i.e. sys.excepthook
    raise RuntimeError("Event loop is closed")
except RuntimeError:
    sys.excepthook(*sys.exc_info())
Unrelated()
threading.Thread(target=lambda: 1 / 0).start()  # an unrelated thread error is still shown
'''


def test_failed_read_is_one_readable_warning_without_background_tracebacks(tmp_path):
    result = subprocess.run([sys.executable, "-c", _FAILED_READ, str(tmp_path / "ckpt")], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    warned = [line for line in lines if "unusable" in line]
    assert len(warned) == 1, result.stderr[-3000:]
    assert ('(cannot read its arrays: OUT_OF_RANGE: Error reading "w/0.0": Requested byte range [0, 64) is not '
            'valid for value of size 0); restored step 1 instead') in warned[0]
    for noise in ("Event loop is closed", "never retrieved", "never awaited", "TensorStore({"):
        assert noise not in result.stderr, result.stderr[-3000:]
    assert "restored 1" in result.stderr
    assert "an unrelated error that must still be shown" in result.stderr  # only the noise is filtered
    assert "ZeroDivisionError" in result.stderr


def test_garbage_checkpoints_log_nothing_but_the_error(tmp_path, caplog):
    """Every file of every step overwritten: orbax's ``ERROR:absl ... Metadata file`` lines (one per step, each time
    the steps are listed) are dropped; the one error names each step's reason."""
    with Checkpointer(tmp_path) as ckpt:
        for step in (1, 2):
            ckpt.save(step, _make_state(step, trained=False))
    for f in tmp_path.rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    with caplog.at_level("DEBUG"):
        with Checkpointer(tmp_path, read_only=True) as ckpt:
            with pytest.raises(CheckpointCorruptError, match="step 2 .* is unusable"):
                ckpt.metadata(2)
        with Checkpointer(tmp_path) as ckpt, pytest.raises(CheckpointCorruptError, match="step 2: .*step 1: "):
            ckpt.restore(_make_state(0, trained=False))
    assert not [r for r in caplog.records if "Metadata file" in r.getMessage()]


_FULL_SAVE = """
import resource, signal, sys
import jax, jax.numpy as jnp
from ppojax.io.checkpoint import Checkpointer, CheckpointWriteError
state = {"w": jax.random.normal(jax.random.key(0), (256, 256))}  # 256 KiB of incompressible floats
ckpt = Checkpointer(sys.argv[1], keep=3)
ckpt.save(1, state, {"iteration": 1})
if sys.argv[2] == "fsize":  # a file-size limit (ulimit -f): writes beyond it fail with EFBIG
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, resource.RLIM_INFINITY))
try:
    ckpt.save(2, state, {"iteration": 2})
except CheckpointWriteError as e:
    print(e)
if sys.argv[2] == "fsize":  # the limit lifted: the next save works
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    ckpt.save(3, state, {"iteration": 3})
print(ckpt.all_steps())
ckpt.close()
"""


def _tmpfs(path: Path, size: str) -> Path:
    """A small tmpfs at ``path`` (skips the test where this container may not mount)."""
    path.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                            text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip() or result.returncode}")
    return path


@pytest.mark.parametrize("limit", ["fsize", "disk-full"])
def test_save_that_cannot_be_written_is_one_error_and_keeps_the_last_checkpoint(tmp_path, limit):
    """A file-size limit or a full disk during a save: one ``CheckpointWriteError`` line with the system's reason,
    none of orbax's threads' tracebacks, the half-written step removed and the earlier checkpoint intact (a save
    after the limit is lifted works)."""
    if limit == "disk-full":
        directory = _tmpfs(tmp_path / "small", "400k") / "checkpoints"  # one checkpoint fits, not two
    else:
        directory = tmp_path / "checkpoints"
    try:
        result = subprocess.run([sys.executable, "-c", _FULL_SAVE, str(directory), limit], capture_output=True,
                                text=True, timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
        reason = "File too large" if limit == "fsize" else "No space left on device"
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stdout.splitlines()[0] == f"checkpoint 2 could not be written to {directory}: {reason}"
        assert result.stdout.splitlines()[1] == ("[1, 3]" if limit == "fsize" else "[1]")
        assert "Traceback" not in result.stderr and "ERROR" not in result.stderr, result.stderr[-3000:]
        assert sorted(p.name for p in directory.iterdir()) == (["1", "3"] if limit == "fsize" else ["1"])
        with Checkpointer(directory, read_only=True) as ckpt:
            assert ckpt.metadata(1) == {"iteration": 1}
    finally:
        if limit == "disk-full":
            subprocess.run(["umount", str(tmp_path / "small")], check=False)


def test_write_probe_is_removed_on_a_full_disk(tmp_path):
    """On a full disk the probe file is created and its write fails: the error says so and leaves no probe."""
    small = _tmpfs(tmp_path / "small", "64k")
    try:
        (small / "checkpoints").mkdir()
        fd = os.open(small / "filler", os.O_WRONLY | os.O_CREAT)
        with pytest.raises(OSError, match="No space"):
            while True:
                os.write(fd, b"x" * 4096)
        os.close(fd)
        with pytest.raises(PermissionError, match="not writable .*No space left"):
            check_writable(small / "checkpoints")
        assert list((small / "checkpoints").iterdir()) == []
    finally:
        subprocess.run(["umount", str(small)], check=False)
