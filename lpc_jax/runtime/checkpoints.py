"""Orbax checkpoints of training state in ``workdir/checkpoints``.

A single run saves its ``TrainState``; a sweep saves its stacked member states
with a small JSON record beside them (which members diverged, their last
metrics). A checkpoint never holds a state that failed the loop's NaN/Inf check
unless that record marks the member as diverged, so the newest checkpoint is
the last good one.

    with Checkpointer(workdir, max_to_keep=3) as ckpt:   # the training loop: the one writer
        if ckpt.latest_step() is not None:
            state = ckpt.restore(state)
        ...
        ckpt.save(step, state)

    with Checkpointer(workdir) as ckpt:                  # everyone else: read-only
        state = ckpt.restore(template)

What keeps the directory sound:

* Orbax writes a step into ``<step>.orbax-checkpoint-tmp`` and renames it when
  complete, so a process killed mid-save leaves a temporary, never a partial
  ``<step>/``; the newest complete step is what a rerun resumes. The writer
  (under the workdir lock, :mod:`lpc_jax.runtime.workdir_lock`) removes such leftovers when
  it opens the directory. A read-only Checkpointer never creates, deletes or
  cleans anything, so it is safe beside a running training.
* Retention is orbax's ``max_to_keep``: older steps are deleted only after a
  newer one has been saved.
* A save that fails (a full disk above all) raises :class:`CheckpointSaveError`
  naming the directory, the step, the last good checkpoint kept and how to
  resume, after removing that step's temporaries. A save is refused up front,
  before orbax writes anything, when the filesystem has less free space than
  the last checkpoint took.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax's name for a step being written
ITEM = "default"  # the arrays of a checkpoint saved without meta
STATE_ITEM = "state"  # ... and with meta (beside the JSON item "meta")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be restored or saved; the message says what to do."""


class CheckpointSaveError(CheckpointError):
    """Saving a step failed (e.g. the disk is full); the checkpoints saved before are kept.

    Attributes:
      step: the step that was not saved.
      last_good: the newest complete checkpoint step, None if there is none.
      disk_full: whether the cause was a full filesystem (ENOSPC).
    """

    def __init__(self, message: str, *, step: int, last_good: int | None, disk_full: bool):
        super().__init__(message)
        self.step, self.last_good, self.disk_full = step, last_good, disk_full


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error`` or an exception it was raised from is "no space left on device".

    Orbax reports tensorstore's ENOSPC as a ValueError (``RESOURCE_EXHAUSTED ...
    No space left on device [os_error_code='28']``), Python as ``OSError(ENOSPC)``.
    """
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(error)
        if "No space left on device" in text or "os_error_code='28'" in text or "Disk quota exceeded" in text:
            return True
        error = error.__cause__ or error.__context__
    return False


def free_bytes(directory: str) -> int:
    """Bytes the current user can still write on ``directory``'s filesystem."""
    st = os.statvfs(directory)
    return st.f_frsize * (st.f_bfree if os.geteuid() == 0 else st.f_bavail)


def disk_bytes(path: str) -> int:
    """Bytes the files under ``path`` occupy on disk (allocated blocks)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_blocks * 512
            except FileNotFoundError:  # removed meanwhile
                pass
    return total


def replicated() -> NamedSharding:
    """Every array whole on every device of every process (the mesh of all ``jax.devices()``)."""
    return NamedSharding(jax.sharding.Mesh(np.asarray(jax.devices()), ("devices",)), P())


def restore_target(template: Any, sharding: jax.sharding.Sharding | None = None) -> Any:
    """``template`` as ``jax.ShapeDtypeStruct`` leaves that each carry a sharding of this process's devices.

    A ``jax.Array`` leaf keeps its own sharding, a ``ShapeDtypeStruct`` its own if
    it has one; any other leaf (numpy, orbax metadata, unsharded structs) takes
    ``sharding``, default :func:`replicated`. Orbax restores each array straight
    into that layout (``ocp.args.StandardRestore``), whatever layout saved it.
    """
    default = sharding or replicated()

    def one(leaf):
        own = getattr(leaf, "sharding", None)
        if not isinstance(own, jax.sharding.Sharding) or (isinstance(leaf, jax.Array) and leaf.is_deleted()):
            own = default
        return jax.ShapeDtypeStruct(tuple(leaf.shape), np.dtype(leaf.dtype), sharding=own)

    return jax.tree.map(one, template)


def _leaf_signatures(tree: Any) -> dict[str, tuple]:
    """{"a/b/0": (shape, dtype name)}: paths by key names alone, so that a saved tree (orbax writes
    dicts and lists) and a template of the same arrays (dataclasses, named tuples) agree."""
    def name(entry):
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                return str(getattr(entry, attr))
        return str(entry)

    return {"/".join(name(e) for e in path): (tuple(a.shape), np.dtype(a.dtype).name)
            for path, a in jax.tree_util.tree_leaves_with_path(tree)}


def tree_differences(saved: Any, template: Any, limit: int = 5) -> list[str]:
    """``"<path>: saved <shape dtype>, expected <shape dtype>"`` for up to ``limit`` differing arrays.

    ``saved`` is :meth:`Checkpointer.saved_tree`'s metadata, ``template`` the
    reader's state (arrays or ``ShapeDtypeStruct``). [] when they agree.
    """
    got, want = _leaf_signatures(saved), _leaf_signatures(template)
    out = []
    for path in sorted(got.keys() | want.keys()):
        if got.get(path) != want.get(path):
            show = [f"{v[0]} {v[1]}" if v else "absent" for v in (got.get(path), want.get(path))]
            out.append(f"{path or 'root'}: saved {show[0]}, expected {show[1]}")
    if len(out) > limit:
        out = out[:limit] + [f"{len(out) - limit} more"]
    return out


def _named_files(error: BaseException, step_dir: str) -> list[str]:
    """The files under ``step_dir`` that ``error`` (or an error it came from) names, in tensorstore's words."""
    text = " ".join(str(e) for e in _chain(error))
    return sorted({f for f in re.findall(re.escape(step_dir) + r"[^\s\"'\],\\]*", text)
                   if os.path.basename(f) and not f.endswith("/")})


def _read_failure(error: BaseException, step_dir: str) -> str:
    """What a failed orbax read says, in words: a file named where the error names one."""
    text = " ".join(str(e) for e in _chain(error))
    files = _named_files(error, step_dir)
    if "Topology mismatch" in text or "devices used to save" in text:
        return (f"it was saved on other devices and orbax could not lay it out on this process's "
                f"{jax.device_count()} ({type(error).__name__}: {str(error)[:300]})")
    what = ", ".join(files[:3]) if files else f"a data file under {step_dir}"  # tensorstore named none
    return f"{what} is missing, truncated or unreadable ({type(error).__name__}: {str(error)[:300]})"


def _chain(error: BaseException | None):
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


class Checkpointer:
    """Thin wrapper over ``ocp.CheckpointManager``.

    Args:
      workdir: the run directory; checkpoints live in ``workdir/checkpoints``.
      max_to_keep: None (default) opens the directory read-only (``latest_step``,
        ``restore``); an int >= 1 opens it for writing, keeping the newest
        ``max_to_keep`` steps (orbax's own retention) and removing temporaries
        left by a process killed mid-save. Only the holder of the workdir lock
        may open it for writing.

    A context manager: leaving the ``with`` block closes the manager.
    """

    def __init__(self, workdir: str, max_to_keep: int | None = None):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        self.read_only = max_to_keep is None
        if self.read_only:
            options = ocp.CheckpointManagerOptions(read_only=True, create=False)
        else:
            if max_to_keep < 1:
                raise ValueError(f"keep_checkpoints={max_to_keep} is invalid: keep at least 1 checkpoint")
            options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                                   cleanup_tmp_directories=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.close()
        except Exception:
            if exc is None:
                raise  # otherwise keep the error that is already on its way out

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, *, meta: dict | None = None) -> None:
        """Saves ``state`` (a pytree) as step ``step`` and waits until it is on disk.

        ``meta``, a JSON-serialisable dict, is stored beside the arrays; a
        checkpoint saved with it must be restored with ``with_meta=True``.

        Raises:
          CheckpointSaveError: less free space than the last checkpoint took (checked
            first: nothing is written), or the save failed; that step's temporaries are removed and
            every checkpoint saved before is kept.
        """
        if self.read_only:
            raise CheckpointError(f"{self.directory} was opened read-only; pass max_to_keep to save")
        last_good = self.latest_step()
        if last_good is not None:  # a new step takes about as much space as the last one
            need, free = disk_bytes(os.path.join(self.directory, str(last_good))), free_bytes(self.directory)
            if free < need:
                raise self._save_error(step, last_good, f"no space left on device ({free / 2**20:.1f} MiB free, "
                                       f"step {last_good} took {need / 2**20:.1f} MiB)", True)
        if meta is None:
            args = ocp.args.StandardSave(state)
        else:
            args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        try:
            self._manager.save(step, args=args, force=True)
            self._manager.wait_until_finished()
        except Exception as e:  # orbax wraps I/O errors in several types
            self._discard(step)
            full = is_disk_full(e)
            reason = "no space left on device" if full else f"{type(e).__name__}: {str(e)[:300]}"
            raise self._save_error(step, self.latest_step(), reason, full) from e

    def _discard(self, step: int) -> None:
        """Removes what a failed save of ``step`` left; re-reads the finished steps from disk."""
        for name in os.listdir(self.directory):
            if name.startswith(f"{step}{TMP_SUFFIX}"):
                shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
        self._manager.reload()

    def _save_error(self, step: int, last_good: int | None, reason: str, disk_full: bool) -> CheckpointSaveError:
        kept = (f"The last good checkpoint, step {last_good}, is kept" if last_good is not None
                else "No earlier checkpoint exists")
        resume = "resume from it" if last_good is not None else "start again from step 0"
        fix = ("free space there or move the run directory to a larger disk (a run needs room for "
               "--keep_checkpoints + 1 checkpoints)" if disk_full else "fix the cause")
        return CheckpointSaveError(
            f"could not save the checkpoint of step {step} in {self.directory}: {reason}. {kept}; nothing of "
            f"step {step} was left behind. To continue, {fix}, then rerun the same command with the same "
            f"--workdir to {resume}.", step=step, last_good=last_good, disk_full=disk_full)

    def saved_tree(self, step: int, *, item: str = ITEM) -> Any:
        """The pytree of ``ocp`` array metadata (``shape``, ``dtype``, the saving ``sharding``) of ``step``.

        Raises:
          CheckpointError: the step's metadata is missing or unreadable (names the file).
        """
        path = os.path.join(self.directory, str(step), item)
        for name in ("_METADATA", "manifest.ocdbt"):
            if not os.path.isfile(os.path.join(path, name)):
                raise self._restore_error(step, f"the file {os.path.join(path, name)} is missing")
        try:
            metadata = ocp.StandardCheckpointer().metadata(path).item_metadata
            error = None
        except Exception as e:  # orbax raises many types for unreadable metadata
            metadata, error = None, e
        if metadata is not None:
            return metadata.tree
        # Orbax reads the tree metadata from the data files too, and says None when one is
        # damaged; a plain read makes tensorstore name the file.
        files = []
        try:
            ocp.StandardCheckpointer().restore(path)
        except Exception as e:  # noqa: BLE001 (any failure: only the file names matter)
            files = _named_files(e, os.path.join(self.directory, str(step)))
        what = f"{', '.join(files[:3])} is missing, truncated or unreadable" if files else \
            f"its metadata in {path} is truncated or unreadable"
        detail = f" ({type(error).__name__}: {str(error)[:200]})" if error is not None else ""
        raise self._restore_error(step, what + detail) from error

    def restore(self, template: Any = None, step: int | None = None, *, with_meta: bool = False,
                sharding: jax.sharding.Sharding | None = None) -> Any:
        """Restores ``step`` (default: newest) onto this process's devices, whatever devices saved it.

        Orbax reads each array straight into the sharding of the target that
        :func:`restore_target` makes of ``template`` (``ocp.args.StandardRestore``
        with ``jax.ShapeDtypeStruct(..., sharding=...)`` leaves), so a checkpoint
        written on any number of devices or processes restores on any other.

        Args:
          template: a pytree like the saved one: placed ``jax.Array`` leaves keep
            their sharding (e.g. a sweep's members spread over the devices); numpy
            arrays and unsharded ``ShapeDtypeStruct`` leaves take ``sharding``.
            None: the saved structure, read from the checkpoint's metadata.
          step: default the newest.
          with_meta: the checkpoint was saved with ``meta``; also return it.
          sharding: for the leaves without one; default :func:`replicated`.

        Returns:
          The state; with ``with_meta``, ``(state, meta)``.

        Raises:
          CheckpointError: no checkpoint; a file missing or truncated (named); a
            checkpoint of another model (the differing arrays named); or
            another failure, with orbax's message. Nothing is ever deleted.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        item = STATE_ITEM if with_meta else ITEM
        saved = self.saved_tree(step, item=item)
        if template is None:
            template = saved
        else:
            differences = tree_differences(saved, template)
            if differences:
                raise self._restore_error(step, "it was written by another model or config (saved vs expected: "
                                          + "; ".join(differences) + ")")
        target = restore_target(template, sharding)
        try:
            if not with_meta:
                return self._manager.restore(step, args=ocp.args.StandardRestore(target))
            out = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
            return out["state"], out["meta"]
        except Exception as e:  # orbax raises many types for unreadable / mismatched trees
            raise self._restore_error(step, _read_failure(e, os.path.join(self.directory, str(step)))) from e

    def _restore_error(self, step: int, reason: str) -> CheckpointError:
        return CheckpointError(
            f"checkpoint {self.directory}/{step} cannot be restored: {reason}. Nothing was deleted; "
            f"move that step away to resume from an earlier one, or use another --workdir.")

    def close(self) -> None:
        self._manager.close()
