"""Restoring a training run: its Config, the Model built from it and a checkpointed TrainState."""

from __future__ import annotations

import os

import jax

from lpc_jax.data import sources
from lpc_jax.model.state import Model, TrainState, create_train_state
from lpc_jax.runtime import checkpoints
from lpc_jax.training import build
from lpc_jax.training.config import Config, load_config


def checkpoint_steps(workdir: str) -> list[int]:
    """Sorted steps of the finished checkpoints in ``workdir/checkpoints`` ([] if none)."""
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        return []
    return sorted(int(name) for name in os.listdir(directory)
                  if name.isdigit() and os.path.isdir(os.path.join(directory, name)))


def load_run(workdir: str, step: int | None = None, *,
             sharding: jax.sharding.Sharding | None = None) -> tuple[Config, Model, TrainState]:
    """Restores a training run written by :func:`lpc_jax.training.train.train_and_evaluate`.

    Works whatever devices or processes trained the run: orbax reads the arrays
    straight into ``sharding`` (:meth:`lpc_jax.runtime.checkpoints.Checkpointer.restore`).

    Args:
      workdir: the run's directory (holds ``config.json`` and ``checkpoints/``).
      step: checkpoint step to restore; default the newest.
      sharding: where the state goes; default the first local device (what
        evaluation, diagnostics and figures run on); e.g.
        ``checkpoints.replicated()`` for every device.

    Returns:
      ``(config, model, state)``: the run's validated Config, the Model built from
      it, and the restored TrainState.

    Raises:
      FileNotFoundError: ``workdir``, its ``config.json`` or its checkpoints are
        missing (the message names the path).
      checkpoints.CheckpointError: ``step`` does not exist, or a checkpoint cannot be
        restored (the message says why: a file missing or truncated, or arrays
        that another model or config wrote).
      ValueError: ``config.json`` is unreadable or invalid.
    """
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"run directory {workdir} does not exist; pass the --workdir of a "
                                f"training run (e.g. runs/fashion_mnist_lpc).")
    config_path = os.path.join(workdir, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{config_path} not found: {workdir} is not a training run directory "
                                f"(train.train_and_evaluate writes config.json first).")
    try:
        config = load_config(workdir).validate()
    except (ValueError, TypeError) as e:  # JSONDecodeError is a ValueError
        raise ValueError(f"{config_path} is unreadable or invalid: {e}") from e
    steps = checkpoint_steps(workdir)
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {os.path.join(workdir, 'checkpoints')}: the run has not "
                                f"reached its first --checkpoint_every step yet (step {config.checkpoint_every}).")
    if step is not None and step not in steps:
        raise checkpoints.CheckpointError(
            f"no checkpoint for step {step} in {os.path.join(workdir, 'checkpoints')}; available: {steps}")
    model = build.build_model(config)
    # Abstract template (shapes and dtypes only): eager initialisation would compile
    # every layer op by op, which takes tens of seconds on a CPU.
    template = jax.eval_shape(lambda: create_train_state(
        jax.random.key(0), model, sources.image_shape(config.dataset, config.image_size or None), config.latent_dim))
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    with checkpoints.Checkpointer(workdir) as ckpt:
        try:
            state = ckpt.restore(template, step, sharding=sharding)
        except checkpoints.CheckpointError as e:
            if "another model or config" not in str(e):
                raise
            raise checkpoints.CheckpointError(f"{e} Its config.json ({config_path}) does not describe the "
                                              f"networks that wrote it.") from e
    return config, model, state
