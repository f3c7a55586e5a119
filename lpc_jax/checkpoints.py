"""Orbax checkpoints of training state in ``workdir/checkpoints``.

A single run saves its ``TrainState``; a sweep saves its stacked member states
with a small JSON record beside them (which members diverged, their last
metrics). A checkpoint never holds a state that failed the loop's NaN/Inf check
unless that record marks the member as diverged, so the newest checkpoint is
the last good one.

    with Checkpointer(workdir) as ckpt:
        if ckpt.latest_step() is not None:
            state = ckpt.restore(state)
        ...
        ckpt.save(step, state)
"""

from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
    """A checkpoint exists but cannot be restored; the message says what to do."""


class Checkpointer:
    """Thin wrapper over ``ocp.CheckpointManager`` (keeps the newest ``max_to_keep``).

    A context manager: leaving the ``with`` block closes the manager.
    """

    def __init__(self, workdir: str, max_to_keep: int = 2):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        self._manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, *, meta: dict | None = None) -> None:
        """Saves ``state`` (a pytree) as step ``step`` and waits until it is on disk.

        ``meta``, a JSON-serialisable dict, is stored beside the arrays; a
        checkpoint saved with it must be restored with ``with_meta=True``.
        """
        if meta is None:
            args = ocp.args.StandardSave(state)
        else:
            args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        self._manager.save(step, args=args, force=True)
        self._manager.wait_until_finished()

    def restore(self, template: Any, step: int | None = None, *, with_meta: bool = False) -> Any:
        """Restores ``step`` (default: newest) into the structure of ``template``.

        Returns:
          The state; with ``with_meta``, ``(state, meta)``.

        Raises:
          CheckpointError: no checkpoint, or one that is corrupt or from another model.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        try:
            if not with_meta:
                return self._manager.restore(step, args=ocp.args.StandardRestore(template))
            out = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(template), meta=ocp.args.JsonRestore()))
            return out["state"], out["meta"]
        except Exception as e:  # orbax raises many types for unreadable / mismatched trees
            raise CheckpointError(
                f"checkpoint {self.directory}/{step} cannot be restored ({type(e).__name__}: "
                f"{str(e)[:300]}). It is corrupt or was written by a different model; move it "
                f"away or use another --workdir. Nothing was deleted.") from e

    def close(self) -> None:
        self._manager.close()
