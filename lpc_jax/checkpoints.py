"""Orbax checkpoints of a ``TrainState`` in ``workdir/checkpoints``.

A checkpoint is only ever written from a state whose metrics were finite, so
the newest checkpoint is always the last good one.
"""

from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
    """A checkpoint exists but cannot be restored; the message says what to do."""


class Checkpointer:
    """Thin wrapper over ``ocp.CheckpointManager`` (keeps the newest ``max_to_keep``)."""

    def __init__(self, workdir: str, max_to_keep: int = 2):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        self._manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any) -> None:
        """Saves ``state`` as step ``step`` and waits until it is on disk."""
        self._manager.save(step, args=ocp.args.StandardSave(state), force=True)
        self._manager.wait_until_finished()

    def restore(self, template: Any, step: int | None = None) -> Any:
        """Restores ``step`` (default: newest) into the structure of ``template``.

        Raises:
          CheckpointError: no checkpoint, or one that is corrupt or from another model.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        try:
            return self._manager.restore(step, args=ocp.args.StandardRestore(template))
        except Exception as e:  # orbax raises many types for unreadable / mismatched trees
            raise CheckpointError(
                f"checkpoint {self.directory}/{step} cannot be restored ({type(e).__name__}: "
                f"{str(e)[:300]}). It is corrupt or was written by a different model; move it "
                f"away or use another --workdir. Nothing was deleted.") from e

    def close(self) -> None:
        self._manager.close()
