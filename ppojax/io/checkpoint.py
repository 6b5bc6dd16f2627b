"""Train-state checkpoints: atomic orbax saves, exact resumes, fallback past corrupt checkpoints.

A ``Checkpointer`` owns one directory::

    <directory>/
      <step>/                               one complete checkpoint (orbax writes a temporary directory and
        state/                              renames it into place, so a half-written one never has this name)
          ...                               the arrays (orbax OCDBT/zarr)
        metadata/metadata                   the caller's JSON metadata (iteration, data position, config hash...)
        manifest/metadata                   ppojax's manifest: per leaf its key path, shape, dtype, PRNG impl
                                            and a checksum of its bytes
      <step>.orbax-checkpoint-tmp-<t>/      an unfinished save (a kill mid-write): never listed as a step, and
                                            deleted when a Checkpointer opens the directory
      <step>.corrupt-<t>/                   a checkpoint that ``restore()`` found unusable and moved aside

Only the array leaves of the state are saved; static fields (``pytree_node=False``) are not, the caller rebuilds
them and passes a target with the same structure to ``restore``. Typed PRNG keys (``jax.random.key``) are saved
as their raw key data and rewrapped with their impl on restore.

Corruption. A finalized step can still be unusable: a data file deleted or truncated (orbax/TensorStore raise on
read), a metadata or manifest file missing (raises on read), or bytes changed in place -- a flipped bit in an
array's data file restores a wrong value with no error from orbax, so the manifest keeps a checksum of every
leaf, computed on device at save time and checked after restore. ``restore()`` walks back from the latest step
to the newest usable one, warns once per skipped step (one line naming it and the reason: the root error, not
orbax's wrapper with its TensorStore spec), and moves the skipped ones aside so that the resumed run can save those
step numbers again. A failed read leaves orbax's background reads to die with the event loop; the tracebacks they
would print ("Event loop is closed", "Task exception was never retrieved", "coroutine ... was never awaited":
thousands of lines for one bad step, some of them after the read has returned) are filtered out, and nothing else.

Multi-process (TPU pods): every process must call ``save``, ``restore``, ``wait`` and ``close`` with the same
arguments, in the same order. Orbax coordinates the writes (each process writes its own shards; only process 0
writes the JSON files and renames the directory), every process checks each step and they agree on whether it
is usable before falling back, and only process 0 moves a corrupt step aside. One training job writes to a
directory at a time (``ppojax.io.lock`` makes sure of it): opening a writable ``Checkpointer`` deletes unfinished
saves left in it. A ``read_only`` one changes nothing on disk, so it may look at a directory that a job is writing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging
import operator
import os
import re
import shutil
import sys
import threading
import time
import uuid
import warnings
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from ppojax.io.atomic import write_error_reason

__all__ = ["Checkpointer", "CheckpointCorruptError", "CheckpointMismatchError", "CheckpointWriteError",
           "check_writable"]

_FORMAT = 1  # version of the manifest layout below
_ITEMS = ("state", "metadata", "manifest")
_MAX_LISTED = 12  # paths listed per kind of difference in a mismatch error
_MAX_REASON_CHARS = 300  # orbax/TensorStore errors embed whole specs; a warning keeps the first line


class CheckpointCorruptError(RuntimeError):
    """No usable checkpoint: the requested step (or every step, when restoring the latest) cannot be read back."""


class CheckpointMismatchError(ValueError):
    """The restore target does not have the checkpoint's structure; the message names the differing key paths."""


class CheckpointWriteError(OSError):
    """A save could not be written (a full disk, a file-size limit, a directory gone read-only). One line:
    ``checkpoint 4 could not be written to <directory>: No space left on device``. The half-written step is
    removed; the checkpoints saved before it are untouched."""


def check_writable(directory: str | os.PathLike) -> epath.Path:
    """Create ``directory`` if needed and write and delete a probe file in it; returns it as a path.

    Call it before training starts, so a bad ``--checkpoint-dir`` fails in seconds, not at the first save hours
    later. Raises ``PermissionError`` (an ``OSError``) saying what failed. Each process writes its own probe.
    """
    path = _as_path(directory)
    probe = path / f".ppojax-write-probe-{jax.process_index()}-{uuid.uuid4().hex}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        try:
            probe.write_text("ok")
        finally:  # a full disk creates the file and then fails to write it: remove it either way
            with contextlib.suppress(OSError):
                probe.unlink()
    except OSError as e:
        raise PermissionError(
            f"checkpoint directory {path} is not writable ({type(e).__name__}: {e}); fix its permissions or "
            "choose another checkpoint directory before training"
        ) from e
    return path


class Checkpointer:
    """Saves and restores a train-state pytree plus JSON metadata under ``directory``, one subdirectory per step.

    Args:
      directory: a local path or a path orbax can write (e.g. ``gs://bucket/run``); created if missing, and checked
        to be writable (``check_writable``) right away.
      keep: how many of the newest checkpoints to keep (older ones are deleted after each save); ``None`` keeps all.
        Keep at least 2 so that ``restore`` has something to fall back on.
      async_save: if True, ``save`` returns once the arrays are copied to host memory and writes in a background
        thread; call ``wait()`` (``close()`` does) before exiting. Meanwhile ``all_steps()`` already lists the
        step being written. The default writes before returning.
      read_only: list, read and restore only: nothing is created, cleaned up or moved aside, and ``save`` raises.
        For inspecting a directory before a job commits to it, or while another job writes it.
      this_process_only: with ``read_only``, for one process of a multi-process run to look alone (no barrier,
        no agreement with the others): e.g. process 0 reading a run directory's config before telling the others.

    Usage::

        ckpt = Checkpointer(run_dir, keep=3)
        if ckpt.latest_step() is not None:
            it, state, meta = ckpt.restore(state)          # state: a fresh state (or its abstract shapes)
        ...
        ckpt.save(it, state, {"iteration": it, "data_position": pos, "config_hash": h, "wall_time": t})
        ...
        # On SIGTERM/SIGINT: save unless this iteration is already saved, then close (waits for the write).
        if ckpt.latest_step() != it:
            ckpt.save(it, state, meta)
        ckpt.close()

    All processes of a multi-process run must make the same calls (see the module docstring).
    """

    def __init__(self, directory: str | os.PathLike, *, keep: Optional[int] = 3, async_save: bool = False,
                 read_only: bool = False, this_process_only: bool = False):
        if keep is not None and (not isinstance(keep, int) or isinstance(keep, bool) or keep < 1):
            raise ValueError(f"keep must be an int >= 1 or None, got {keep!r}")
        self.directory = _as_path(directory) if read_only else check_writable(directory)
        self.keep = keep
        self.read_only = read_only
        self._pending: Optional[int] = None  # the step an asynchronous save is still writing
        self._failed: set[int] = set()  # steps whose save failed: their leftovers are removed again on close
        if this_process_only and not read_only:
            raise ValueError("this_process_only needs read_only=True: a save is every process's work")
        self._alone = this_process_only or jax.process_count() == 1
        _install_log_filters()
        # Orbax logs a notice for each option that read-only mode overrides, and for the mode itself.
        with _dropped_log("absl", ("read_only=True", "Given directory is read only")):
            options = ocp.CheckpointManagerOptions(
                max_to_keep=keep,
                enable_async_checkpointing=async_save,
                read_only=read_only,
                # Unfinished saves from a killed run: dead weight, never a step.
                cleanup_tmp_directories=not read_only,
                **({"multiprocessing_options": ocp.options.MultiprocessingOptions(
                    primary_host=jax.process_index(), active_processes={jax.process_index()})}
                   if this_process_only and jax.process_count() > 1 else {}),
            )
            self._manager = ocp.CheckpointManager(self.directory, item_names=_ITEMS, options=options)

    # -- listing -------------------------------------------------------------------------------------------------

    def all_steps(self) -> list[int]:
        """Steps of the complete checkpoints in the directory, ascending (unfinished saves are not listed)."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> Optional[int]:
        """The newest checkpoint's step, or None if there is none. It is not checked for corruption: ``restore``
        does that."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    # -- save ----------------------------------------------------------------------------------------------------

    def save(self, step: int, state: Any, metadata: Optional[dict] = None, *, force: bool = False) -> None:
        """Save ``state`` (a pytree of arrays) and ``metadata`` (a JSON-serializable dict) as checkpoint ``step``.

        Atomic: the step appears in ``all_steps()`` (and on disk under its final name) only once complete. Then
        checkpoints beyond the newest ``keep`` are deleted. ``step`` must be newer than every existing checkpoint;
        ``force=True`` deletes the existing checkpoints at ``step`` and after it first (e.g. to branch a run from
        an older step). Metadata round-trips as JSON does (tuples come back as lists).
        """
        step = operator.index(step)
        if self.read_only:
            raise ValueError(f"cannot save step {step}: this Checkpointer of {self.directory} is read-only")
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        metadata = {} if metadata is None else metadata
        if not isinstance(metadata, dict):
            raise TypeError(f"metadata must be a dict, got {type(metadata).__name__}")
        try:
            json.dumps(metadata)
        except (TypeError, ValueError) as e:
            raise TypeError(f"checkpoint metadata must be JSON-serializable: {e}") from e

        storage, specs = _storage_tree(state)
        leaves = [_get(storage, s.names) for s in specs]
        manifest = {
            "format": _FORMAT,
            "leaves": [dict(s.as_json(), checksum=c) for s, c in zip(specs, _checksums(leaves))],
        }

        self.wait()
        clashing = [s for s in self.all_steps() if s >= step]
        if clashing and not force:
            raise ValueError(
                f"cannot save step {step} in {self.directory}: checkpoints {clashing} already exist at or after it "
                "(pass force=True to replace them)"
            )
        for s in clashing:
            self._manager.delete(s)
        with self._writing(step):
            self._manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(storage),
                    metadata=ocp.args.JsonSave(metadata),
                    manifest=ocp.args.JsonSave(manifest),
                ),
                force=True,  # the caller decides when to save: bypass orbax's save-interval policy
            )
            self._pending = step

    def wait(self) -> None:
        """Block until an asynchronous save has finished (a no-op for blocking saves). ``CheckpointWriteError`` if
        it could not be written."""
        with self._writing(self._pending):
            self._manager.wait_until_finished()
        self._pending = None

    @contextlib.contextmanager
    def _writing(self, step: Optional[int]):
        """Around orbax's save: a failed write (ENOSPC, EFBIG, EROFS...) becomes one ``CheckpointWriteError``, the
        unfinished step directory is removed, and what orbax's writer threads log and leave behind (an
        ``ERROR:absl`` record with a traceback per thread, tracebacks of its event loop) is filtered out."""
        with _contained_background_errors(), _dropped_log("absl", ("raised an exception",)):
            try:
                yield
            except Exception as e:  # noqa: BLE001 -- orbax/TensorStore raise ValueError or plain Exception
                self._pending = None
                with contextlib.suppress(Exception):
                    self._manager.wait_until_finished()  # let the other writer threads end before cleaning up
                self._discard_unfinished(step)
                if step is not None:
                    self._failed.add(step)
                raise CheckpointWriteError(
                    f"checkpoint {'' if step is None else f'{step} '}could not be written to {self.directory}: "
                    f"{write_error_reason(e)}") from None

    def _discard_unfinished(self, step: Optional[int]) -> None:
        """Remove what a failed save of ``step`` left (orbax's temporary directory; process 0 only), so that the
        directory holds the checkpoints saved before it and nothing else."""
        if jax.process_index() == 0 and step is not None:
            for tmp in self.directory.glob(f"{step}.orbax-checkpoint-tmp*"):
                shutil.rmtree(os.fspath(tmp), ignore_errors=True)
        with contextlib.suppress(Exception):
            self._manager.reload()

    # -- restore -------------------------------------------------------------------------------------------------

    def metadata(self, step: int) -> dict:
        """The JSON metadata saved with checkpoint ``step`` (cheap: no array is read). ``FileNotFoundError`` if
        there is no such step, ``CheckpointCorruptError`` if its metadata cannot be read."""
        step = operator.index(step)
        self._manager.reload()
        if step not in self.all_steps():
            raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}")
        try:
            metadata, _ = self._read_json_items(step)
        except _Unusable as e:
            raise CheckpointCorruptError(f"checkpoint step {step} in {self.directory} is unusable: {e}") from None
        return metadata

    def restore(self, target: Any, step: Optional[int] = None) -> tuple[int, Any, dict]:
        """Restore a checkpoint into the structure, shapes, dtypes and shardings of ``target``.

        ``target`` is a pytree like the saved state: concrete arrays or ``jax.ShapeDtypeStruct`` leaves (typed
        PRNG keys as keys or key-dtype structs). Each leaf is restored with the target leaf's sharding, so a
        checkpoint saved on one mesh restores onto another; a leaf without a sharding is replicated on all
        devices. Static fields come from ``target``; restored leaves are ``jax.Array``.

        With ``step=None``, restores the newest usable checkpoint: unusable newer ones are skipped with a warning
        naming each and why, and moved aside to ``<step>.corrupt-<time>`` (left in place when ``read_only``). With
        an explicit ``step``, nothing falls back. Returns ``(step, state, metadata)``.

        Raises ``FileNotFoundError`` if there is no checkpoint (or no such ``step``), ``CheckpointMismatchError``
        if ``target``'s structure differs from the checkpoint's (naming the key paths), and
        ``CheckpointCorruptError`` if no checkpoint can be read (with each step's reason).
        """
        self.wait()
        self._manager.reload()  # see the directory as it is now, not as this object last left it
        plan = _restore_plan(target)
        steps = self.all_steps()
        if not self._alone:  # every process walks the same steps, in the same collectives, whatever it lists itself
            from ppojax.parallel.distributed import from_process_0

            steps = from_process_0(steps)
        if step is not None:
            step = operator.index(step)
            if step not in steps:
                raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory} (steps: {steps})")
            try:
                return self._restore_step(step, plan)
            except _Unusable as e:
                raise CheckpointCorruptError(f"checkpoint step {step} in {self.directory} is unusable: {e}") from e
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")

        skipped = []
        for s in reversed(steps):
            try:
                result = self._restore_step(s, plan)
            except _Unusable as e:
                skipped.append((s, str(e)))
                continue
            moved = self._move_aside([bad for bad, _ in skipped])
            for (bad, reason), where in zip(skipped, moved):
                fate = (f"Moved it to {where}." if where else "Left it in place (read-only)." if self.read_only
                        else "Could not move it aside.")
                warnings.warn(f"checkpoint step {bad} in {self.directory} is unusable ({reason}); restored step {s} "
                              f"instead. {fate}", stacklevel=2)
            return result
        details = "; ".join(f"step {s}: {reason}" for s, reason in skipped)
        raise CheckpointCorruptError(f"no usable checkpoint in {self.directory}: {details}")

    def _restore_step(self, step: int, plan: "_RestorePlan") -> tuple[int, Any, dict]:
        """One step: read the JSON items, compare structures, read the arrays, verify checksums. Raises
        ``_Unusable`` for a corrupt checkpoint (agreed by all processes), ``CheckpointMismatchError`` for a target
        that does not fit."""
        metadata, saved = self._read_json_items(step)
        _check_structure(step, saved, plan.specs)

        with _contained_background_errors():
            try:
                restored = self._manager.restore(
                    step, args=ocp.args.Composite(state=ocp.args.StandardRestore(plan.abstract_storage))
                )["state"]
                leaves = [_get(restored, s.names) for s in plan.specs]
                error = None
            except Exception as e:  # noqa: BLE001 -- TensorStore raises plain Exception for unreadable chunks
                error = f"cannot read its arrays: {_short(e)}"
        _agree_or_raise(error, self._alone)

        # Checksums are global reductions: every process computes the same values, so no agreement step is needed.
        bad = [
            s.path for s, want, got in zip(plan.specs, (leaf["checksum"] for leaf in saved), _checksums(leaves))
            if want is not None and got is not None and list(want) != list(got)
        ]
        if bad:
            raise _Unusable(f"checksum mismatch (data changed on disk) in {_listed(bad)}")

        leaves = [jax.random.wrap_key_data(x, impl=s.key_impl) if s.key_impl else x for s, x in zip(plan.specs, leaves)]
        return step, jax.tree_util.tree_unflatten(plan.treedef, leaves), metadata

    def _read_json_items(self, step: int) -> tuple[dict, list[dict]]:
        """``(metadata, manifest leaves)`` of one step; ``_Unusable`` (agreed by all processes) if unreadable."""
        metadata = saved = None
        with _contained_background_errors():
            try:
                meta_items = self._manager.restore(
                    step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore(), manifest=ocp.args.JsonRestore())
                )
                metadata, manifest = meta_items["metadata"], meta_items["manifest"]
                if not isinstance(metadata, dict):
                    raise ValueError("metadata file is missing or not a JSON object")
                saved = _parse_manifest(manifest)
                error = None
            except Exception as e:  # noqa: BLE001 -- any failure to read a file means this step is unusable
                error = f"cannot read its metadata or manifest: {_short(e)}"
        _agree_or_raise(error, self._alone)
        return metadata, saved

    def _move_aside(self, steps: list[int]) -> list[Optional[str]]:
        """Rename unusable step directories to ``<step>.corrupt-<time>`` (process 0; the others wait), so that
        the resumed run can save those steps again and ``keep`` counts only good checkpoints."""
        if not steps or self.read_only:
            return [None] * len(steps)
        moved: list[Optional[str]] = []
        stamp = time.strftime("%Y%m%dT%H%M%S")
        for s in steps:
            src = self.directory / str(s)
            dst = self.directory / f"{s}.corrupt-{stamp}"
            if jax.process_index() == 0:
                try:
                    src.rename(dst)
                except OSError:
                    dst = None
            moved.append(str(dst) if dst is not None else None)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("ppojax_checkpoint_move_aside")
        self._manager.reload()
        return moved

    # -- lifetime ------------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Wait for a pending save and release orbax's resources."""
        with self._writing(self._pending):
            self._manager.wait_until_finished()
        self._manager.close()
        for step in sorted(self._failed):  # a writer thread of a failed save may have made its directory again
            self._discard_unfinished(step)
        self._failed.clear()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpointer({str(self.directory)!r}, keep={self.keep}, steps={self.all_steps()})"


# ----------------------------------------------------------------------------------------------------------------
# Leaves, storage layout and the manifest


class _Unusable(Exception):
    """This step cannot be read back; the message says why."""


@dataclasses.dataclass(frozen=True)
class _LeafSpec:
    """One array leaf: its key path (for messages), its place in the saved nested dict, and what it must be."""

    path: str
    names: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: str
    key_impl: Optional[str]  # the PRNG impl name for a typed key (saved as its key data), else None

    def as_json(self) -> dict:
        return {"path": self.path, "names": list(self.names), "shape": list(self.shape), "dtype": self.dtype,
                "key_impl": self.key_impl}

    def describe(self) -> str:
        kind = f"key<{self.key_impl}>" if self.key_impl else self.dtype
        return f"{kind}{list(self.shape)}"


def _as_path(directory) -> epath.Path:
    text = os.fspath(directory)
    return epath.Path(text if "://" in text else os.path.abspath(text))


def _entry_name(entry) -> str:
    for attr in ("key", "name", "idx"):  # DictKey / FlattenedIndexKey, GetAttrKey, SequenceKey
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _key_impl_name(x) -> str:
    if isinstance(x, jax.Array):
        return str(jax.random.key_impl(x))
    found = []  # key_impl reads a traced key, not a ShapeDtypeStruct
    jax.eval_shape(lambda k: found.append(str(jax.random.key_impl(k))), jax.ShapeDtypeStruct(x.shape, x.dtype))
    return found[0]


def _flatten(tree, what: str):
    """(leaf, spec) pairs and the treedef, with the leaf types ``what`` (save or restore) accepts checked."""
    with_paths, treedef = jax.tree_util.tree_flatten_with_path(tree)
    if not with_paths:
        raise ValueError(f"the {what} pytree has no array leaves")
    out, seen = [], {}
    for path, leaf in with_paths:
        path_str = jax.tree_util.keystr(path) or "<root>"
        ok = (jax.Array, np.ndarray, np.generic) + ((jax.ShapeDtypeStruct,) if what == "restore target" else ())
        if not isinstance(leaf, ok):
            raise TypeError(
                f"{what} leaf {path_str} is a {type(leaf).__name__}, not an array; make it an array (numbers that "
                "change during training) or a static field (flax.struct.field(pytree_node=False))"
            )
        names = tuple(_entry_name(e) for e in path) or ("value",)
        # Orbax names each array by its key path joined with '.', so two paths may not join the same way.
        joined = ".".join(names)
        if joined in seen:
            raise ValueError(f"{what} leaves {seen[joined]} and {path_str} would be stored under the same name")
        seen[joined] = path_str
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            spec = _LeafSpec(path_str, names, tuple(leaf.shape), str(leaf.dtype), _key_impl_name(leaf))
        else:
            spec = _LeafSpec(path_str, names, tuple(leaf.shape), str(np.dtype(leaf.dtype)), None)
        out.append((leaf, spec))
    return out, treedef


def _nest(pairs) -> dict:
    """A nested dict from (names, value) pairs."""
    tree: dict = {}
    for names, value in pairs:
        node = tree
        for name in names[:-1]:
            node = node.setdefault(name, {})
            if not isinstance(node, dict):
                raise ValueError(f"pytree path {'/'.join(names)} passes through an array leaf")
        if names[-1] in node:
            raise ValueError(f"two pytree leaves map to {'/'.join(names)}")
        node[names[-1]] = value
    return tree


def _get(tree, names):
    for name in names:
        tree = tree[name]
    return tree


def _storage_tree(state) -> tuple[dict, list[_LeafSpec]]:
    """The state as a nested dict of plain arrays (typed keys replaced by their key data) and the leaf specs.

    Saving a nested dict rather than the state itself keeps orbax away from the state's node types: restored
    namedtuples (optax states) come back from orbax as plain tuples; the target's treedef rebuilds every node
    type exactly.
    """
    pairs, _ = _flatten(state, "save")
    specs = [spec for _, spec in pairs]
    arrays = [jax.random.key_data(leaf) if spec.key_impl else np.asarray(leaf) if isinstance(leaf, np.generic)
              else leaf for leaf, spec in pairs]
    return _nest((spec.names, x) for spec, x in zip(specs, arrays)), specs


@dataclasses.dataclass(frozen=True)
class _RestorePlan:
    """The target's leaf specs and treedef, and the abstract nested dict (with shardings) to restore into."""

    specs: list[_LeafSpec]
    treedef: Any
    abstract_storage: dict


def _default_sharding() -> jax.sharding.Sharding:
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("replica",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def _target_sharding(leaf, path: str):
    sharding = getattr(leaf, "sharding", None) if isinstance(leaf, (jax.Array, jax.ShapeDtypeStruct)) else None
    if sharding is None:
        return _default_sharding()
    mesh = getattr(sharding, "mesh", None)
    if isinstance(mesh, jax.sharding.AbstractMesh):
        raise ValueError(
            f"restore target leaf {path} has a sharding on an abstract mesh (as jax.eval_shape returns); give it "
            "a sharding on real devices, e.g. jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))"
        )
    return sharding


def _key_data_sharding(sharding, path: str):
    """The sharding of a key array's data: the key's, with the trailing key-data axis unsharded."""
    if isinstance(sharding, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(sharding.mesh, sharding.spec)  # a spec shorter than the rank replicates
    if isinstance(sharding, jax.sharding.SingleDeviceSharding):
        return sharding
    raise ValueError(
        f"restore target key {path} has a {type(sharding).__name__}; give a NamedSharding or a concrete key array"
    )


def _restore_plan(target) -> _RestorePlan:
    pairs, treedef = _flatten(target, "restore target")
    specs, abstract = [], []
    for leaf, spec in pairs:
        if spec.key_impl and isinstance(leaf, jax.Array):
            data = jax.random.key_data(leaf)
            sds = jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=data.sharding)
        elif spec.key_impl:
            data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(leaf.shape, leaf.dtype))
            sharding = _key_data_sharding(_target_sharding(leaf, spec.path), spec.path)
            sds = jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding)
        else:
            sds = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=_target_sharding(leaf, spec.path))
        specs.append(spec)
        abstract.append(sds)
    return _RestorePlan(specs, treedef, _nest((s.names, a) for s, a in zip(specs, abstract)))


def _parse_manifest(manifest) -> list[dict]:
    if not isinstance(manifest, dict) or manifest.get("format") != _FORMAT or not isinstance(
            manifest.get("leaves"), list):
        raise ValueError(f"manifest is missing or not ppojax format {_FORMAT}")
    fields = ("path", "names", "shape", "dtype", "key_impl", "checksum")
    if not all(isinstance(leaf, dict) and all(f in leaf for f in fields) for leaf in manifest["leaves"]):
        raise ValueError("manifest entries are malformed")
    return manifest["leaves"]


def _check_structure(step: int, saved: list[dict], specs: list[_LeafSpec]) -> None:
    saved_by_path = {leaf["path"]: leaf for leaf in saved}
    target_by_path = {s.path: s for s in specs}
    only_target = [p for p in target_by_path if p not in saved_by_path]
    only_saved = [p for p in saved_by_path if p not in target_by_path]
    differ = []
    for path, spec in target_by_path.items():
        leaf = saved_by_path.get(path)
        if leaf is None:
            continue
        saved_spec = _LeafSpec(path, tuple(leaf["names"]), tuple(leaf["shape"]), leaf["dtype"], leaf["key_impl"])
        if (saved_spec.shape, saved_spec.dtype, saved_spec.key_impl, saved_spec.names) != (
                spec.shape, spec.dtype, spec.key_impl, spec.names):
            differ.append(f"{path}: checkpoint {saved_spec.describe()}, target {spec.describe()}")
    if only_target or only_saved or differ:
        lines = [f"checkpoint step {step} does not match the restore target:"]
        if only_target:
            lines.append(f"  in the target but not the checkpoint: {_listed(only_target)}")
        if only_saved:
            lines.append(f"  in the checkpoint but not the target: {_listed(only_saved)}")
        if differ:
            lines.append(f"  shape/dtype differs: {_listed(differ)}")
        raise CheckpointMismatchError("\n".join(lines))


def _listed(items: list[str]) -> str:
    more = len(items) - _MAX_LISTED
    return ", ".join(items[:_MAX_LISTED]) + (f", ... and {more} more" if more > 0 else "")


def _short(e: BaseException) -> str:
    """One readable line for why reading failed: the root cause (orbax wraps TensorStore's error in an Exception
    whose text is a whole TensorStore spec), without the directory the warning already names."""
    root = e
    while root.__cause__ is not None or (root.__context__ is not None and not root.__suppress_context__):
        root = root.__cause__ if root.__cause__ is not None else root.__context__
    lines = str(root).strip().splitlines() or str(e).strip().splitlines()
    first = re.sub(r' in OCDBT database at [a-z]+ file "[^"]*"', "", lines[0] if lines else "")
    first = first if len(first) <= _MAX_REASON_CHARS else first[:_MAX_REASON_CHARS] + "..."
    if re.match(r"[A-Z_]{4,}: ", first):  # a TensorStore status ("OUT_OF_RANGE: ...") says what it is
        return first
    return f"{type(root).__name__}: {first}"


def _install_log_filters() -> None:
    """Drop orbax's ``Failed to read Metadata file`` and ``Failed to json parse Metadata file`` records (an
    ``ERROR:absl`` line per step whose ``_CHECKPOINT_METADATA`` is unreadable, logged each time the steps are
    listed): ``restore`` reports every unusable step itself, in one line.
    Idempotent; stays for the process, like the background filters."""
    log = logging.getLogger("absl")
    if _not_metadata_noise not in log.filters:
        log.addFilter(_not_metadata_noise)


def _not_metadata_noise(record: logging.LogRecord) -> bool:
    message = str(record.msg)
    return not (message.startswith("Failed to") and "Metadata file" in message)


def _is_closed_loop(exc: Optional[BaseException]) -> bool:
    """TensorStore finishing a read for an orbax event loop that has already closed (it calls
    ``loop.call_soon_threadsafe`` from its own threads; the error is printed by ``sys.excepthook`` or as unraisable)."""
    return isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"


def _from_orbax(exc: Optional[BaseException], obj: Any = None) -> bool:
    """An exception raised in orbax's code, or a coroutine of orbax's, left behind by a failed read."""
    code = getattr(obj, "cr_code", None)
    if code is not None and "orbax" in code.co_filename:
        return True
    tb = getattr(exc, "__traceback__", None)
    while tb is not None:
        if "orbax" in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    return False


def _install_background_filters() -> None:
    """Filter what orbax's background reads print once a read has failed. They outlive the read (TensorStore threads
    finish their reads later), so the filters stay for the rest of the process, and each lets everything else
    through to the hook it wraps:

    - ``sys.excepthook`` and ``threading.excepthook``: only "Event loop is closed";
    - ``sys.unraisablehook`` (exceptions of garbage-collected coroutines and futures): that, or an exception or a
      coroutine of orbax's;
    - the ``asyncio`` logger ("Task exception was never retrieved" from the default exception handler of orbax's
      event loop): records about orbax's tasks.

    Idempotent: a hook already wrapped (its ``_ppojax`` attribute) is left alone.
    """
    if not getattr(sys.unraisablehook, "_ppojax", False):
        previous_unraisable = sys.unraisablehook

        def unraisable(info):
            if not (_is_closed_loop(info.exc_value) or _from_orbax(info.exc_value, info.object)):
                previous_unraisable(info)

        unraisable._ppojax = True
        sys.unraisablehook = unraisable
    if not getattr(sys.excepthook, "_ppojax", False):
        previous_except = sys.excepthook

        def excepthook(kind, value, tb):
            if not _is_closed_loop(value):
                previous_except(kind, value, tb)

        excepthook._ppojax = True
        sys.excepthook = excepthook
    if not getattr(threading.excepthook, "_ppojax", False):
        previous_thread = threading.excepthook

        def thread_hook(args):
            if not _is_closed_loop(args.exc_value):
                previous_thread(args)

        thread_hook._ppojax = True
        threading.excepthook = thread_hook
    asyncio_log = logging.getLogger("asyncio")
    if _not_orbax_task not in asyncio_log.filters:
        asyncio_log.addFilter(_not_orbax_task)


def _not_orbax_task(record: logging.LogRecord) -> bool:
    exc = record.exc_info[1] if record.exc_info else None
    return not (_is_closed_loop(exc) or _from_orbax(exc) or "orbax" in record.getMessage())


@contextlib.contextmanager
def _dropped_log(name: str, texts: tuple[str, ...]):
    """Drop log records of logger ``name`` that contain one of ``texts`` for the duration of the block."""
    def keep(record):
        message = record.getMessage()
        return not any(text in message for text in texts)

    log = logging.getLogger(name)
    log.addFilter(keep)
    try:
        yield
    finally:
        log.removeFilter(keep)


@contextlib.contextmanager
def _contained_background_errors():
    """Around an orbax read: the filters of ``_install_background_filters``, the "coroutine ... was never awaited"
    warnings of the read's coroutines, and a garbage collection on the way out, so that what a failed read leaves
    behind is freed (and filtered) now. Wrap the ``try`` *and* its ``except``: the garbage is freed once the
    exception is handled."""
    _install_background_filters()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"coroutine .* was never awaited", category=RuntimeWarning)
        try:
            yield
        finally:
            gc.collect()


def _agree_or_raise(error: Optional[str], alone: bool = False) -> None:
    """Raise ``_Unusable`` on every process if the step failed on any (so all fall back to the same step); with
    ``alone``, on this process if it failed here."""
    failed = error is not None
    if jax.process_count() > 1 and not alone:
        failed = bool(np.any(multihost_utils.process_allgather(np.array(failed))))
        error = error or "unreadable on another process"
    if failed:
        raise _Unusable(error)


# ----------------------------------------------------------------------------------------------------------------
# Checksums


def _checksummable(dtype) -> bool:
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return True
    if jnp.issubdtype(dtype, jnp.integer):
        bits = jnp.iinfo(dtype).bits
    elif jnp.issubdtype(dtype, jnp.floating):
        bits = jnp.finfo(dtype).bits
    else:
        return False
    return bits == 8 * dtype.itemsize and dtype.itemsize in (1, 2, 4, 8)  # not packed sub-byte types


def _checksum(x) -> tuple[jax.Array, jax.Array]:
    """Two uint32 sums of the array's bytes read as words: plain and position-weighted (catches swapped
    elements). Scalars, so they come back replicated on every process."""
    x = jnp.ravel(x)
    if x.dtype == jnp.bool_:
        words = x.astype(jnp.uint32)
    elif x.dtype.itemsize == 8:
        words = jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(-1)
    else:
        words = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * x.dtype.itemsize}")).astype(jnp.uint32)
    weights = 2 * jax.lax.iota(jnp.uint32, words.size) + 1  # odd, so any single changed word changes the sum
    return jnp.sum(words, dtype=jnp.uint32), jnp.sum(words * weights, dtype=jnp.uint32)  # both wrap mod 2**32


_checksums_jit = jax.jit(lambda xs: [_checksum(x) for x in xs])


def _checksums(arrays: list) -> list[Optional[list[int]]]:
    """Checksums of the arrays (None for dtypes without one), one jit call per set of devices the arrays live on
    (one jit cannot take committed arrays from different device sets)."""
    groups: dict = {}
    for i, x in enumerate(arrays):
        if _checksummable(x.dtype):
            devices = frozenset(d.id for d in x.sharding.device_set) if isinstance(x, jax.Array) else None
            groups.setdefault(devices, []).append(i)
    out: list[Optional[list[int]]] = [None] * len(arrays)
    for idx in groups.values():
        sums = _checksums_jit([arrays[i] for i in idx])
        for i, pair in zip(idx, sums):
            out[i] = [int(np.asarray(s.addressable_data(0))) for s in pair]
    return out
