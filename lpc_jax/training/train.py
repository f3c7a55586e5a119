"""``train_and_evaluate(config, workdir)``: one run through the training loop.

The loop itself (:class:`lpc_jax.training.loop.Trainer`) is shared with the sweeps of
:mod:`lpc_jax.training.sweep`; a single run is one unstacked member of it.

What a run leaves in ``workdir``:

* ``config.json``: the run's settings (checked again on resume).
* ``checkpoints/<step>/``: orbax checkpoints; rerunning with the same workdir
  resumes from the newest and gives the same result as an uninterrupted run.
* ``metrics.jsonl``: one JSON object per logged step (loss terms, ELBO, log p at
  chain start and end, examples/s, wall time).
* ``samples.png``: decoder means of z ~ prior, refreshed at every checkpoint.
* ``curves.png``: the training curves.
* ``summary.json``: test-set ELBO (nats and bits/dim), timings and, with
  ``eval_samples > 0``, fd/KID/density/coverage of that many prior samples in the
  shipped classifier's feature space, at the end.
* ``tensorboard/``: the same training scalars (and steps/s), the FD monitor's
  metrics and prior-sample grid at each FD step, and the summary's numbers as
  ``test/...`` at the end: ``tensorboard --logdir runs/``.

Every file is written whole or not at all (a temporary renamed into place); a
full disk gives one ``LogWriteError`` naming the file, and a rerun resumes.
"""

from __future__ import annotations

import os
from typing import Callable

import jax
import numpy as np
from absl import logging

from lpc_jax import plotting
from lpc_jax.evaluation import bounds, evaluators, features, monitor
from lpc_jax.model import networks
from lpc_jax.model.state import Model
from lpc_jax.runtime import distributed, logs, workdir_lock, writers
from lpc_jax.sampling import langevin
from lpc_jax.training import build, loop
from lpc_jax.training.config import Config, ConfigError, check_resumable, load_config
from lpc_jax.training.loop import DivergenceError  # noqa: F401  (public here: train.DivergenceError)


def _write_samples(run: loop.Run, params, rng_key: jax.Array, step: int) -> str:
    """``samples.png``: an 8 x 8 grid of decoder means of z ~ prior (drawn and written by process 0)."""
    c = run.config
    path = os.path.join(run.workdir, "samples.png")
    if not distributed.is_primary():
        return path
    params = distributed.local_copy(params)
    images = networks.sample_prior(run.model.decoder, params["decoder"], rng_key, 64, latent_dim=c.latent_dim,
                                 prior_scale=c.prior_scale, likelihood=run.model.likelihood)
    with logs.atomic_path(path) as tmp:  # complete or absent, also on a full disk
        plotting.save_image_grid(images, tmp, ncols=8, title=f"{c.algorithm} {c.dataset}: z ~ prior, step {step}")
    return path


def prior_grid(run: loop.Run, params, rng_key: jax.Array) -> np.ndarray:
    """The ``samples.png`` grid (8 x 8 decoder means of z ~ prior) as an (H, W, C) float image in [0, 1]:
    the FD monitor's ``prior_samples`` image in TensorBoard."""
    c = run.config
    images = networks.sample_prior(run.model.decoder, params["decoder"], rng_key, 64, latent_dim=c.latent_dim,
                                   prior_scale=c.prior_scale, likelihood=run.model.likelihood)
    return plotting.image_grid(np.asarray(images), 8) / 255.0


def sample_metrics(run: loop.Run, params, rng_key: jax.Array) -> dict:
    """fd/KID/density/coverage of ``run.config.eval_samples`` prior samples vs as many test images.

    Keys ``fd_<s>``, ``kid_<s>``, ``kid_<s>_std``, ``density_<s>``, ``coverage_<s>``
    (``s`` = ``fmnist`` for Fashion-MNIST) and ``eval_samples`` (the count used,
    capped by the test images loaded); see :func:`lpc_jax.evaluation.evaluators.classifier_metrics`.
    """
    c = run.config
    real = run.test_images[: c.eval_samples]
    fake = networks.sample_prior(run.model.decoder, params["decoder"], rng_key, real.shape[0],
                               latent_dim=c.latent_dim, prior_scale=c.prior_scale,
                               likelihood=run.model.likelihood)
    out = evaluators.classifier_metrics(params, run.model, real, fake, rng_key, dataset=c.dataset)
    out.pop("feature_extractors", None)
    return {**out, "eval_samples": int(real.shape[0])}


def make_group(config: Config, model: Model, keys: loop.RunKeys) -> loop.Group:
    """A single run's one member, data-parallel over every device (``distributed.data_parallel``).

    The jitted step is the single-device step, partitioned by XLA, except for the LPC
    chain, which runs under ``shard_map`` with one all-reduce after its T steps
    (``train_step.lpc_train_step``'s ``mesh``); the state is replicated and donated,
    the batch (``config.batch_size`` rows, global) sharded along the mesh.

    Raises:
      ValueError: ``config.batch_size`` not divisible by the device count.
    """
    placement = distributed.data_parallel(config.batch_size)
    step_fn = jax.jit(build.make_train_step(config, model, placement.batch.mesh), donate_argnums=0,
                      out_shardings=(placement.state, placement.replicated))
    return loop.Group(members=(0,), step_fn=step_fn, step_keys=keys.step,
                      hparams=langevin.hparams(config.step_size, config.decay, config.eps), placement=placement)


@workdir_lock.locked("train")
def train_and_evaluate(config: Config, workdir: str,
                       on_log: Callable[[int, dict], None] | None = None) -> dict:
    """Trains per ``config``, checkpointing and logging into ``workdir``.

    Args:
      config: run settings; validated first.
      workdir: output directory; an existing checkpoint there is resumed.
      on_log: optional callback ``(step, metrics_row)`` after each logged step.

    Returns:
      The summary dict also written to ``workdir/summary.json``: ``step``,
      ``train_wall_s_this_run``, ``samples_png`` and the test ELBO of
      :func:`lpc_jax.evaluation.bounds.test_elbo` (``test_elbo_nats``,
      ``test_elbo_bits_per_dim``, ``test_examples``); with ``config.eval_samples``
      also :func:`sample_metrics`.

    Raises:
      ValueError: invalid config, or a workdir holding a different model.
      data.DatasetNotFoundError: the dataset is not available offline.
      config.ConfigError: ``eval_samples`` > 0 for a dataset without a shipped
        classifier (raised before training).
      checkpoints.CheckpointError: an existing checkpoint cannot be restored.
      DivergenceError: a step produced NaN/Inf (no checkpoint is written for it).
      lpc_jax.runtime.workdir_lock.WorkdirLockedError: another process uses ``workdir`` (checked
        first, before any data loads).
    """
    if config.eval_samples:  # fail before training, not after it
        try:
            features.load_classifier(config.dataset)
        except features.NoFeatureExtractorError as e:
            raise ConfigError("eval_samples", config.eval_samples, f"set it to 0 ({e})") from e
    run = loop.setup(config, workdir)
    config_path = os.path.join(workdir, "config.json")
    if os.path.exists(config_path):
        check_resumable(load_config(workdir), config, config_path)
    keys = loop.run_keys(config.seed)
    group = make_group(config, run.model, keys)
    fd_monitor = monitor.FDMonitor.from_config(config, config.fd_samples) if config.fd_every else None
    trainer = loop.Trainer(
        run, [group], [loop.init_state(keys.init, run.model, run.image_shape, config.latent_dim)],
        [loop.Member({}, keys)], log_file="metrics.jsonl", config_file=("config.json", config.to_json()),
        fd_monitor=fd_monitor, on_log=None if on_log is None else (lambda step, rows: on_log(step, rows[0])),
        on_checkpoint=lambda step: _write_samples(run, trainer.states[0].params, keys.sample, step),
        fd_images=lambda params, key: prior_grid(run, params, key))
    trainer.fit()

    params = trainer.member_params(0)  # on one local device: evaluation is not sharded
    summary = {"step": trainer.step, "train_wall_s_this_run": trainer.train_s,
               "samples_png": _write_samples(run, params, keys.sample, trainer.step),
               **bounds.test_elbo(params, run.model, run.test_images, keys.eval)}
    if config.eval_samples:
        summary.update(sample_metrics(run, params, jax.random.fold_in(keys.sample, 1)))
    if distributed.is_primary():
        with logs.atomic_path(os.path.join(workdir, "curves.png")) as tmp:
            plotting.plot_curves(logs.read_metrics(os.path.join(workdir, "metrics.jsonl")), tmp)
        tensorboard = writers.TensorBoardWriter(os.path.join(workdir, "tensorboard"))
        tensorboard.write_scalars(trainer.step, {f"test/{k}": v for k, v in summary.items()})
        tensorboard.close()
        logs.write_json(os.path.join(workdir, "summary.json"), summary, indent=2)
    logging.info("done: %s", summary)
    return summary
