"""What a single run and a sweep do differently in :class:`lpc_jax.training.loop.Trainer`.

The Trainer holds one of these (``trainer.kind``) instead of branching on the
kind of run: the workdir lock's purpose, the checkpoint payload (a single run's
bare ``TrainState``; a sweep's stacked states with a JSON record of divergences
and last metrics, both formats unchanged since they were introduced), what a
non-finite step does (raise; record the member and go on) and the progress line.
"""

from __future__ import annotations

from typing import Any

from absl import logging

from lpc_jax.runtime import checkpoints

# The loop's Trainer, whose states, checkpointer and records these read and set (not
# imported: the loop imports this module).
Trainer = Any


class DivergenceError(FloatingPointError):
    """Training produced NaN or Inf; the last good checkpoint is left as it was."""


class SingleRun:
    """What a single run does differently from a sweep: raise at divergence, save the bare TrainState."""

    purpose = "train"  # the workdir lock's purpose

    def restore(self, trainer: Trainer, ckpt: checkpoints.Checkpointer) -> None:
        trainer.states = [ckpt.restore(trainer.states[0])]

    def save(self, trainer: Trainer, step: int) -> None:
        trainer.ckpt.save(step, trainer.states[0])

    def diverged(self, trainer: Trainer, i: int, step: int, row: dict) -> None:
        raise DivergenceError(
            f"step {step} produced NaN/Inf (metrics: {row}). Training stopped; the last good checkpoint "
            f"({trainer.ckpt.latest_step()}) in {trainer.ckpt.directory} is untouched. "
            f"Try a smaller --step_size or --learning_rate, or --preconditioner.")

    def log_note(self, rows: list[dict], alive: list[dict]) -> str:
        return ""


class Sweep:
    """A sweep: record a diverged member and go on; save the stacked states with a JSON record."""

    purpose = "sweep"

    def restore(self, trainer: Trainer, ckpt: checkpoints.Checkpointer) -> None:
        states, meta = ckpt.restore(tuple(trainer.states), with_meta=True)
        trainer.states, trainer.diverged, trainer.last = list(states), meta["diverged_at_step"], meta["last"]

    def save(self, trainer: Trainer, step: int) -> None:
        trainer.ckpt.save(step, tuple(trainer.states),
                          meta={"diverged_at_step": trainer.diverged, "last": trainer.last})

    def diverged(self, trainer: Trainer, i: int, step: int, row: dict) -> None:
        trainer.diverged[i] = step
        logging.warning("member %d %s diverged at step %d", i, trainer.members[i].label, step)

    def log_note(self, rows: list[dict], alive: list[dict]) -> str:
        return f" (best of {len(rows)}, {len(rows) - len(alive)} diverged)"
