"""Evaluating a trained run: prior samples once, then the chosen evaluators on them."""

from __future__ import annotations

import time
from typing import Any, Sequence

import jax
import numpy as np

from lpc_jax import plotting
from lpc_jax.data import sources
from lpc_jax.evaluation.evaluators import (
    EvalOptions,
    default_evaluators,
    make_evaluators,
    run_evaluators,
)
from lpc_jax.model import networks
from lpc_jax.model.state import Model, TrainState
from lpc_jax.training.config import Config


def evaluate(config: Config, model: Model, state: TrainState, *, rng_key: jax.Array,
             num_samples: int = 10000, options: EvalOptions = EvalOptions(),
             evaluators: Sequence[str] | None = None, samples_png: str | None = None,
             test_images: np.ndarray | None = None) -> dict:
    """Samples ``num_samples`` images from the prior once and runs the named evaluators on them.

    Args:
      config, model, state: from :func:`lpc_jax.training.restore.load_run`.
      rng_key: PRNG key, split into the sampling key and the key every evaluator gets.
      num_samples: generated images, compared with as many real test images (capped
        at the size of the test split; the cap is reported as ``num_real``).
      options: evaluator options (:class:`EvalOptions`).
      evaluators: names from ``EVALUATORS``; default :func:`default_evaluators`.
      samples_png: if given, writes generated-vs-real images there.
      test_images: (N, H, W, C) uint8 test images to use instead of loading the split.

    Returns:
      A JSON-serialisable dict: ``step``, ``dataset``, ``algorithm``,
      ``num_samples``, ``num_real``, the evaluators' metrics (floats),
      ``feature_extractors``, ``notes``, ``timings_s`` ({part: seconds}) and ``wall_s``.

    Raises:
      ValueError: ``num_samples`` < 2 or an unknown evaluator.
      FileNotFoundError: Inception weights requested but not found.
      sources.DatasetNotFoundError: the test split is not available offline.
    """
    if num_samples < 2:
        raise ValueError(f"num_samples must be >= 2; got {num_samples}")
    t_start = time.time()
    k_sample, k_eval = jax.random.split(rng_key)
    if test_images is None:
        test_images = sources.load(config.dataset, "test", config.data_source, config.data_dir,
                                   image_size=config.image_size or None).images
    timings = {"load_test_data": time.time() - t_start}
    names = default_evaluators(options) if evaluators is None else tuple(evaluators)
    t = time.time()
    bound = make_evaluators(names, config.dataset, options, test_images)
    timings["load_evaluators"] = time.time() - t
    num_real = min(num_samples, test_images.shape[0])
    real = test_images[:num_real]
    t = time.time()
    fake = networks.sample_prior(model.decoder, state.params["decoder"], k_sample, num_samples,
                               latent_dim=config.latent_dim, prior_scale=config.prior_scale,
                               likelihood=model.likelihood, batch_size=options.sample_batch_size)
    timings["sampling"] = time.time() - t
    out: dict[str, Any] = {"step": int(state.step), "dataset": config.dataset, "algorithm": config.algorithm,
                           "num_samples": int(num_samples), "num_real": int(num_real)}
    if samples_png:
        out["samples_png"] = plotting.save_samples_png(
            fake, real, samples_png,
            title=f"{config.algorithm} {config.dataset}, step {int(state.step)}: generated | real")
    results = run_evaluators(bound, state.params, model, real, fake, k_eval)
    notes = results.pop("notes")
    if num_real < num_samples:
        notes.insert(0, f"the test split has only {test_images.shape[0]} images: real sets use {num_real}")
    if "inception" not in names:
        notes.append("Inception metrics (fid, kid_inception, ...) skipped: no Inception weights given "
                     "(inception_weights)")
    timings.update(results.pop("timings_s"))
    out.update(results)
    out.update({"notes": notes, "timings_s": timings, "wall_s": time.time() - t_start})
    return out
