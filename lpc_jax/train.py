"""``train_and_evaluate(config, workdir)``: the one impure training loop.

What a run leaves in ``workdir``:

* ``config.json``: the run's settings (checked again on resume).
* ``checkpoints/<step>/``: orbax checkpoints; rerunning with the same workdir
  resumes from the newest and gives the same result as an uninterrupted run.
* ``metrics.jsonl``: one JSON object per logged step (loss terms, ELBO, log p at
  chain start and end, examples/s, wall time).
* ``samples.png``: decoder means of z ~ prior, refreshed at every checkpoint.
* ``curves.png``: the training curves.
* ``summary.json``: test-set ELBO (nats and bits/dim) and timings, at the end.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from lpc_jax import checkpoints, data, evaluation, langevin, plotting
from lpc_jax import config as config_lib
from lpc_jax import train_step as ts
from lpc_jax.config import Config


class DivergenceError(FloatingPointError):
    """Training produced NaN or Inf; the last good checkpoint is left as it was."""


def _format_time(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def total_train_steps(config: Config, num_examples: int) -> int:
    steps_per_epoch = num_examples // config.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"--batch_size={config.batch_size} exceeds the {num_examples} training examples")
    if config.num_train_steps:
        return config.num_train_steps
    return max(1, int(math.ceil(config.num_epochs * steps_per_epoch)))


def evaluate_elbo(params, model: ts.Model, images: np.ndarray, rng_key: jax.Array,
                  batch_size: int = 500) -> dict:
    """Mean single-sample encoder ELBO over ``images`` (uint8), nats and bits/dim."""
    fn = jax.jit(lambda p, x, k: ts.elbo_estimate(p, x, k, model=model))
    total, count = 0.0, 0
    for i in range(0, images.shape[0], batch_size):
        x = data.to_float(images[i : i + batch_size])
        total += float(jnp.sum(fn(params, x, jax.random.fold_in(rng_key, i))))
        count += x.shape[0]
    elbo = total / count
    dims = int(np.prod(images.shape[1:]))
    return {"test_elbo_nats": elbo, "test_elbo_bits_per_dim": -elbo / (dims * math.log(2.0)),
            "test_examples": count}


def _finite(metrics: dict) -> bool:
    return all(math.isfinite(float(v)) for v in metrics.values())


def train_and_evaluate(config: Config, workdir: str,
                       on_log: Callable[[int, dict], None] | None = None) -> dict:
    """Trains per ``config``, checkpointing and logging into ``workdir``.

    Args:
      config: run settings; validated first.
      workdir: output directory; an existing checkpoint there is resumed.
      on_log: optional callback ``(step, metrics_row)`` after each logged step.

    Returns:
      The summary dict also written to ``workdir/summary.json``.

    Raises:
      ValueError: invalid config, or a workdir holding a different model.
      data.DatasetNotFoundError: the dataset is not available offline.
      checkpoints.CheckpointError: an existing checkpoint cannot be restored.
      DivergenceError: a step produced NaN/Inf (no checkpoint is written for it).
    """
    config.validate()
    train = data.load(config.dataset, "train", config.data_source, config.data_dir,
                      config.max_train_examples or None)
    test = data.load(config.dataset, "test", config.data_source, config.data_dir,
                     config.eval_examples or None)
    num_total = total_train_steps(config, train.images.shape[0])
    steps_per_epoch = train.images.shape[0] // config.batch_size

    os.makedirs(workdir, exist_ok=True)
    config_path = os.path.join(workdir, "config.json")
    if os.path.exists(config_path):
        config_lib.check_resumable(config_lib.load(workdir), config, config_path)

    model = ts.build_model(config)
    image_shape = data.image_shape(config.dataset)
    seed_key = jax.random.key(config.seed)
    init_key, step_key, sample_key, eval_key = jax.random.split(seed_key, 4)
    state = jax.jit(ts.create_train_state, static_argnums=(1, 2, 3))(
        init_key, model, image_shape, config.latent_dim)
    fd_monitor = evaluation.FDMonitor.from_config(config, config.fd_samples) if config.fd_every else None
    ckpt = checkpoints.Checkpointer(workdir)
    try:
        return _train(config, workdir, model, state, ckpt, train, test, num_total, steps_per_epoch,
                      step_key, sample_key, eval_key, on_log, fd_monitor)
    finally:
        ckpt.close()


def _train(config, workdir, model, state, ckpt, train, test, num_total, steps_per_epoch,
           step_key, sample_key, eval_key, on_log, fd_monitor) -> dict:
    if ckpt.latest_step() is not None:
        state = ckpt.restore(state)
        logging.info("resumed from %s at step %d", ckpt.directory, int(state.step))
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json())

    hparams = langevin.hparams(config.step_size, config.decay, config.eps)
    step_fn = jax.jit(ts.make_train_step(config, model), donate_argnums=0)
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    samples_path = os.path.join(workdir, "samples.png")

    def write_samples(state, step):
        imgs = evaluation.sample_prior(state.params, model, config, 64, sample_key)
        plotting.save_image_grid(imgs, samples_path, ncols=8,
                                 title=f"{config.algorithm} {config.dataset}: z ~ prior, step {step}")

    start_step = int(state.step)
    # A run killed after its last checkpoint logged steps it will now redo: drop them.
    rows = plotting.read_metrics(metrics_path)
    if any(r.get("step", 0) > start_step for r in rows):
        with open(metrics_path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows if r.get("step", 0) <= start_step)
    logging.info("training %s on %s: steps %d -> %d (%d per epoch), T=%d, batch %d",
                 config.algorithm, config.dataset, start_step, num_total, steps_per_epoch,
                 config.num_steps, config.batch_size)
    t_start = time.time()
    t_window, window_start = t_start, start_step
    step = start_step
    new_state = state
    try:
        for index, x in data.step_batches(train.images, config.batch_size, config.seed, start_step, num_total):
            new_state, metrics = step_fn(state, jnp.asarray(x), jax.random.fold_in(step_key, index), hparams)
            metrics = jax.device_get(metrics)
            if not _finite(metrics) or not _params_finite(new_state.params):
                raise DivergenceError(
                    f"step {index + 1} produced NaN/Inf (metrics: "
                    f"{ {k: float(v) for k, v in metrics.items()} }). Training stopped; the last "
                    f"good checkpoint ({ckpt.latest_step()}) in {ckpt.directory} is untouched. Try a "
                    f"smaller --step_size or --learning_rate, or --preconditioner.")
            state, step = new_state, index + 1
            fd_now = fd_monitor is not None and (step % config.fd_every == 0 or step == num_total)
            if fd_now or step % config.log_every == 0 or step == num_total:
                now = time.time()
                rate = (step - window_start) / max(now - t_window, 1e-9)
                row = {"step": step, "epoch": step / steps_per_epoch,
                       **{k: float(v) for k, v in metrics.items()},
                       "examples_per_s": rate * config.batch_size, "wall_s": now - t_start}
                if fd_now:
                    row.update(fd_monitor(state.params, model, config, sample_key))
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
                logging.info("step %d/%d (%.1f%%) | %.2f steps/s, %.0f ex/s | ETA %s | loss %.1f elbo %.1f",
                             step, num_total, 100 * step / num_total, rate, rate * config.batch_size,
                             _format_time((num_total - step) / max(rate, 1e-9)), row["loss"], row["elbo"])
                t_window, window_start = now, step
                if on_log:
                    on_log(step, row)
            if step % config.checkpoint_every == 0 or step == num_total:
                ckpt.save(step, state)
                write_samples(state, step)
    except KeyboardInterrupt:
        if _deleted(state):
            # Ctrl-C landed while the step that consumed (donated) ``state`` ran:
            # keep that step's result if it finished and is finite, else save nothing.
            done = new_state is not state and not _deleted(new_state) and _params_finite(new_state.params)
            state, step = (new_state, step + 1) if done else (None, step)
        if state is not None and step > int(ckpt.latest_step() or 0):
            logging.warning("interrupted: saving step %d so the run can resume", step)
            ckpt.save(step, state)
        raise
    train_s = time.time() - t_start

    write_samples(state, step)
    plotting.plot_curves(plotting.read_metrics(metrics_path), os.path.join(workdir, "curves.png"))
    summary = {"step": step, "train_wall_s_this_run": train_s, "samples_png": samples_path,
               **evaluate_elbo(state.params, model, test.images, eval_key)}
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    logging.info("done: %s", summary)
    return summary


@jax.jit
def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)]))


def _deleted(state) -> bool:
    """True if any array of ``state`` was donated to a jitted step (and freed)."""
    return any(isinstance(leaf, jax.Array) and leaf.is_deleted() for leaf in jax.tree.leaves(state))


def _params_finite(params) -> bool:
    return bool(_all_finite(params))
