"""Evaluation of a trained run: sample quality and held-out likelihood.

* :func:`load_run` restores ``(config, model, state)`` from a training workdir.
* :func:`sample_prior` draws decoder means of z ~ prior.
* :func:`evaluate` computes, against the same number of real TEST images:

  - in the feature space of the shipped 28x28 classifier
    (:mod:`lpc_jax.classifier`; Fashion-MNIST -> suffix ``fmnist``, MNIST ->
    ``mnist`` when its weights exist): ``fd_<s>`` (the FID formula on
    classifier features, NOT comparable to FID), ``kid_<s>``,
    ``density_<s>``, ``coverage_<s>`` (k = 5);
  - with FID Inception-v3 weights (:mod:`lpc_jax.inception`): ``fid``,
    ``kid_inception``, ``density_inception``, ``coverage_inception``;
  - the importance-weighted bound on log p(x) (Burda et al. 2016) with the
    encoder as proposal, in nats per image and bits/dim, and the test ELBO.

* :class:`FDMonitor` caches real test features once and returns the
  classifier-space Frechet distance of fresh samples in seconds, for an
  online curve during training (the paper's Figure 5B, on the ``fd_fmnist``
  scale instead of FID).

Library code only: no flags. The command-line front end is
``python -m experiments.evaluate``.
"""

from __future__ import annotations

import functools
import math
import os
import time
from typing import Any

import jax
import numpy as np

from lpc_jax import checkpoints, classifier, data, inception, metrics, models, plotting
from lpc_jax import config as config_lib
from lpc_jax import train_step as ts
from lpc_jax.config import Config

Params = Any

# dataset -> suffix of the classifier-space metric names (fd_<suffix>, kid_<suffix>, ...)
CLASSIFIER_SUFFIX = {"fashion_mnist": "fmnist", "mnist": "mnist"}
DENSITY_K = 5  # Naeem et al. 2020


class NoFeatureExtractorError(ValueError):
    """The dataset has no offline (shipped) feature extractor for classifier-space metrics."""


# --------------------------------------------------------------------------- #
# Loading a run
# --------------------------------------------------------------------------- #


def checkpoint_steps(workdir: str) -> list[int]:
    """Sorted steps of the finished checkpoints in ``workdir/checkpoints`` ([] if none)."""
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        return []
    return sorted(int(name) for name in os.listdir(directory)
                  if name.isdigit() and os.path.isdir(os.path.join(directory, name)))


def load_run(workdir: str, step: int | None = None) -> tuple[Config, ts.Model, ts.TrainState]:
    """Restores a training run written by :func:`lpc_jax.train.train_and_evaluate`.

    Args:
      workdir: the run's directory (holds ``config.json`` and ``checkpoints/``).
      step: checkpoint step to restore; default the newest.

    Returns:
      ``(config, model, state)``: the run's validated Config, the Model built from
      it, and the restored TrainState.

    Raises:
      FileNotFoundError: ``workdir``, its ``config.json`` or its checkpoints are
        missing (the message names the path).
      checkpoints.CheckpointError: ``step`` does not exist, or a checkpoint cannot be
        restored.
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
        config = config_lib.load(workdir).validate()
    except (ValueError, TypeError) as e:  # JSONDecodeError is a ValueError
        raise ValueError(f"{config_path} is unreadable or invalid: {e}") from e
    steps = checkpoint_steps(workdir)
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {os.path.join(workdir, 'checkpoints')}: the run has not "
                                f"reached its first --checkpoint_every step yet (step {config.checkpoint_every}).")
    if step is not None and step not in steps:
        raise checkpoints.CheckpointError(
            f"no checkpoint for step {step} in {os.path.join(workdir, 'checkpoints')}; available: {steps}")
    model = ts.build_model(config)
    # Abstract template (shapes and dtypes only): eager initialisation would compile
    # every layer op by op, which takes tens of seconds on a CPU.
    template = jax.eval_shape(lambda: ts.create_train_state(
        jax.random.key(0), model, data.image_shape(config.dataset), config.latent_dim))
    ckpt = checkpoints.Checkpointer(workdir)
    try:
        state = ckpt.restore(template, step)
    finally:
        ckpt.close()
    return config, model, state


# --------------------------------------------------------------------------- #
# Sampling
# --------------------------------------------------------------------------- #


def sample_prior(params: Params, model: ts.Model, config: Config, num_samples: int, rng_key: jax.Array,
                 batch_size: int = 500) -> np.ndarray:
    """Decoder means of z ~ N(0, prior_scale^2 I), batched.

    Batch ``i`` uses ``z = prior_scale * normal(fold_in(rng_key, i), (batch_size, D))``
    and every batch has the same shape (one compilation; the surplus of the
    last batch is dropped), so the result depends on ``batch_size``.

    Args:
      params: the run's params ``{'decoder': ..., 'encoder': ...}`` (or the
        decoder's params alone).
      model: from :func:`load_run` / ``train_step.build_model``.
      config: the run's Config (latent_dim, prior_scale).
      num_samples: N >= 0.
      rng_key: PRNG key.
      batch_size: latents decoded per call.

    Returns:
      (N, H, W, C) float32 in [-1, 1] (Bernoulli: 2 sigmoid(logits) - 1).
    """
    if num_samples < 0 or batch_size < 1:
        raise ValueError(f"need num_samples >= 0 and batch_size >= 1; got {num_samples}, {batch_size}")
    dec_params = params["decoder"] if isinstance(params, dict) and "decoder" in params else params
    batch_size = min(batch_size, max(num_samples, 1))
    outs = []
    for i in range(int(math.ceil(num_samples / batch_size))):
        z = config.prior_scale * jax.random.normal(jax.random.fold_in(rng_key, i), (batch_size, config.latent_dim))
        outs.append(np.asarray(models.decode_mean(model.decoder, dec_params, z, model.likelihood)))
    if not outs:
        return np.zeros((0, *data.image_shape(config.dataset)), np.float32)
    return np.concatenate(outs)[:num_samples].astype(np.float32, copy=False)


def save_samples_png(generated: np.ndarray, real: np.ndarray, path: str, title: str | None = None,
                     num: int = 64, ncols: int = 8) -> str:
    """One PNG: ``num`` generated images (left) beside ``num`` real test images (right).

    Images are (N, H, W, C), float32 in [-1, 1] or uint8.
    """
    import matplotlib.pyplot as plt  # plotting already selected the Agg backend

    def as_float(x):
        x = np.asarray(x)[:num]
        return data.to_float(x) if x.dtype == np.uint8 else x

    grids = [plotting.image_grid(as_float(x), ncols) for x in (generated, real)]
    gray = grids[0].shape[-1] == 1
    h, w = grids[0].shape[:2]
    fig, axes = plt.subplots(1, 2, figsize=(2 * w * 3 / 100 + 0.3, h * 3 / 100 + 0.6), dpi=100)
    for ax, grid, name in zip(axes, grids, ("generated (z ~ prior)", "real (test set)")):
        ax.imshow(grid[..., 0] if gray else grid, cmap="gray" if gray else None,
                  interpolation="nearest", vmin=0, vmax=255)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- #
# Feature spaces
# --------------------------------------------------------------------------- #


def classifier_suffix(dataset: str) -> str:
    """Metric-name suffix of ``dataset``'s classifier space; NoFeatureExtractorError if it has none."""
    if dataset not in CLASSIFIER_SUFFIX or dataset not in classifier.PRETRAINED:
        raise NoFeatureExtractorError(
            f"dataset {dataset!r} has no offline feature extractor: classifier-space metrics "
            f"(fd_*) exist for {sorted(CLASSIFIER_SUFFIX)} (28x28x1). For other datasets use "
            f"FID with Inception weights (--inception_weights).")
    return CLASSIFIER_SUFFIX[dataset]


def load_classifier(dataset: str) -> tuple[str, Params, str]:
    """``(suffix, params, description)`` of the shipped classifier for ``dataset``.

    Raises:
      NoFeatureExtractorError: no classifier for this dataset, or its weights are
        not shipped (the message says how to train them).
    """
    suffix = classifier_suffix(dataset)
    try:
        pretrained = classifier.load_pretrained(dataset)
    except FileNotFoundError as e:
        raise NoFeatureExtractorError(f"no classifier weights for {dataset!r}, so fd_{suffix} is "
                                      f"unavailable: {e}") from e
    weights_path, _ = classifier.asset_paths(dataset)
    acc = pretrained.info.get("test_accuracy")
    desc = (f"{dataset} CNN classifier, {classifier.FEATURE_DIM}-d penultimate layer "
            f"({os.path.relpath(weights_path, os.path.dirname(os.path.dirname(weights_path)))}"
            + (f", test accuracy {acc:.4f})" if acc is not None else ")"))
    return suffix, pretrained.params, desc


def feature_metrics(real_feats: np.ndarray, fake_feats: np.ndarray, suffix: str, fd_name: str,
                    kid_subsets: int = 100, kid_subset_size: int = 1000, k: int = DENSITY_K,
                    seed: int = 0) -> dict:
    """Frechet distance, KID (mean, std) and density/coverage between two feature sets."""
    kid, kid_std = metrics.kernel_inception_distance(real_feats, fake_feats, kid_subsets, kid_subset_size, seed)
    density, coverage = metrics.density_coverage(real_feats, fake_feats, k=k)
    return {fd_name: metrics.fd_from_features(fake_feats, real_feats),
            f"kid_{suffix}": kid, f"kid_{suffix}_std": kid_std,
            f"density_{suffix}": density, f"coverage_{suffix}": coverage}


# --------------------------------------------------------------------------- #
# Likelihood
# --------------------------------------------------------------------------- #


def _pad(x: np.ndarray, size: int) -> np.ndarray:
    if x.shape[0] == size:
        return x
    return np.concatenate([x, np.zeros((size - x.shape[0], *x.shape[1:]), x.dtype)])


def _largest_divisor_at_most(n: int, cap: int) -> int:
    """Largest divisor of ``n`` that is <= ``cap`` (>= 1)."""
    return next(d for d in range(max(1, min(cap, n)), 0, -1) if n % d == 0)


@functools.partial(jax.jit, static_argnames=("model", "num_samples", "chunk_size"))
def _iwae_batch(params: Params, x: jax.Array, key: jax.Array, *, model: ts.Model, num_samples: int,
                chunk_size: int) -> jax.Array:
    mean, variance = model.encoder.apply({"params": params["encoder"]}, x)
    return metrics.iwae_log_likelihood(key, lambda z: model.log_joint(params["decoder"], x, z), mean, variance,
                                       num_samples, chunk_size)


@functools.partial(jax.jit, static_argnames=("model",))
def _elbo_batch(params: Params, x: jax.Array, key: jax.Array, *, model: ts.Model) -> jax.Array:
    return ts.elbo_estimate(params, x, key, model=model)


def _map_batches(fn, images: np.ndarray, batch_size: int, rng_key: jax.Array) -> np.ndarray:
    """Applies ``fn(x_float, key) -> (B,)`` to fixed-size batches (last one zero-padded)."""
    n = images.shape[0]
    batch_size = min(batch_size, max(n, 1))
    out = []
    for i, start in enumerate(range(0, n, batch_size)):
        x = data.to_float(images[start : start + batch_size])
        valid = x.shape[0]
        out.append(np.asarray(fn(_pad(x, batch_size), jax.random.fold_in(rng_key, i)))[:valid])
    return np.concatenate(out) if out else np.zeros((0,), np.float32)


def iwae_bound(params: Params, model: ts.Model, images: np.ndarray, rng_key: jax.Array,
               num_samples: int = 5000, batch_size: int = 50, chunk_size: int | None = None) -> np.ndarray:
    """Per-image IWAE bound on log p(x) with the encoder q(z|x) as proposal, (N,) nats.

    Args:
      params: ``{'decoder', 'encoder'}`` params.
      model: the run's Model.
      images: (N, H, W, C) uint8 test images.
      rng_key: PRNG key; batch ``i`` uses ``fold_in(rng_key, i)``.
      num_samples: K importance samples per image.
      batch_size: images per jitted call (the last batch is zero-padded).
      chunk_size: samples per vmapped decoder call; default keeps
        ``chunk_size * batch_size`` <= 2000 latents, preferring a divisor of K
        (then the scan has no separately compiled remainder chunk).
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1; got {num_samples}")
    if chunk_size is None:
        cap = min(num_samples, max(1, 2000 // max(batch_size, 1)))
        divisor = _largest_divisor_at_most(num_samples, cap)
        chunk_size = divisor if 2 * divisor >= cap else cap  # e.g. prime K: accept a remainder chunk
    chunk_size = min(chunk_size, num_samples)
    return _map_batches(lambda x, k: _iwae_batch(params, x, k, model=model, num_samples=num_samples,
                                                 chunk_size=chunk_size), images, batch_size, rng_key)


def elbo_per_image(params: Params, model: ts.Model, images: np.ndarray, rng_key: jax.Array,
                   batch_size: int = 500) -> np.ndarray:
    """Single-sample encoder ELBO per image, (N,) nats (the quantity train.py reports)."""
    return _map_batches(lambda x, k: _elbo_batch(params, x, k, model=model), images, batch_size, rng_key)


def _bpd(nats: float, dims: int) -> float:
    return float(metrics.bits_per_dim(nats, dims))


# --------------------------------------------------------------------------- #
# Full evaluation
# --------------------------------------------------------------------------- #


def evaluate(config: Config, model: ts.Model, state: ts.TrainState, *, num_samples: int = 10000,
             rng_key: jax.Array, inception_weights: str | None = None, inception_variables: Any = None,
             inception_size: int = inception.INPUT_SIZE, inception_batch_size: int = 50,
             iwae_samples: int = 5000, iwae_examples: int = 1000, iwae_batch_size: int = 50,
             elbo_examples: int = 0, kid_subsets: int = 100, kid_subset_size: int = 1000,
             sample_batch_size: int = 500, samples_png: str | None = None,
             test_images: np.ndarray | None = None) -> dict:
    """Sample quality and held-out likelihood of a trained model.

    Args:
      config, model, state: from :func:`load_run`.
      num_samples: generated images, compared with as many real test images (capped
        at the size of the test split; the cap is reported as ``num_real``).
      rng_key: PRNG key (split into sampling, IWAE and ELBO keys).
      inception_weights: path of pytorch-fid's Inception weights, or ``"auto"`` for
        :func:`lpc_jax.inception.default_weight_paths`; None skips Inception metrics.
      inception_variables: already loaded Inception variables (overrides
        ``inception_weights``).
      inception_size: Inception input size (keep 299 for FID; smaller only in tests).
      inception_batch_size: images per Inception call.
      iwae_samples: K importance samples per image (0 skips the IWAE bound).
      iwae_examples: test images for the IWAE bound (the first ones of the split).
      iwae_batch_size: images per IWAE call.
      elbo_examples: test images for the test ELBO; 0 = the whole split.
      kid_subsets, kid_subset_size: KID subsets (Binkowski et al. use 100 x 1000).
      sample_batch_size: latents decoded per call.
      samples_png: if given, writes generated-vs-real images there.
      test_images: (N, H, W, C) uint8 test images to use instead of loading the split.

    Returns:
      A JSON-serialisable dict: metric values (floats), ``num_samples``,
      ``num_real``, ``feature_extractors`` ({suffix: description}), ``notes``
      (why a metric was skipped), ``timings_s`` ({part: seconds}) and ``wall_s``.

    Raises:
      FileNotFoundError: ``inception_weights`` given but not found.
      data.DatasetNotFoundError: the test split is not available offline.
    """
    if num_samples < 2:
        raise ValueError(f"num_samples must be >= 2; got {num_samples}")
    t_start = time.time()
    timings: dict[str, float] = {}
    notes: list[str] = []
    extractors: dict[str, str] = {}
    params = state.params
    k_sample, k_iwae, k_elbo = jax.random.split(rng_key, 3)
    dims = int(np.prod(data.image_shape(config.dataset)))

    t = time.time()
    if test_images is None:
        test_images = data.load(config.dataset, "test", config.data_source, config.data_dir).images
    timings["load_test_data"] = time.time() - t
    num_real = min(num_samples, test_images.shape[0])
    if num_real < num_samples:
        notes.append(f"the test split has only {test_images.shape[0]} images: real sets use {num_real}")
    real = test_images[:num_real]

    t = time.time()
    fake = sample_prior(params, model, config, num_samples, k_sample, sample_batch_size)
    timings["sampling"] = time.time() - t
    out: dict[str, Any] = {"step": int(state.step), "dataset": config.dataset, "algorithm": config.algorithm,
                           "num_samples": int(num_samples), "num_real": int(num_real)}
    if samples_png:
        save_samples_png(fake, real, samples_png,
                         title=f"{config.algorithm} {config.dataset}, step {int(state.step)}: generated | real")
        out["samples_png"] = samples_png

    # Classifier feature space (28x28x1 datasets with shipped weights).
    t = time.time()
    try:
        suffix, clf_params, desc = load_classifier(config.dataset)
    except NoFeatureExtractorError as e:
        notes.append(f"classifier-space metrics skipped: {e}")
    else:
        real_f = classifier.features(clf_params, real)
        fake_f = classifier.features(clf_params, fake)
        out.update(feature_metrics(real_f, fake_f, suffix, f"fd_{suffix}", kid_subsets, kid_subset_size))
        extractors[suffix] = desc
        timings[f"metrics_{suffix}"] = time.time() - t

    # Inception pool3 space.
    if inception_variables is None and inception_weights:
        t = time.time()
        inception_variables = inception.load_fid_inception(None if inception_weights == "auto"
                                                           else inception_weights)
        timings["load_inception"] = time.time() - t
    if inception_variables is not None:
        t = time.time()
        real_f = inception.inception_features(inception_variables, real, inception_batch_size, inception_size)
        fake_f = inception.inception_features(inception_variables, fake, inception_batch_size, inception_size)
        out.update(feature_metrics(real_f, fake_f, "inception", "fid", kid_subsets, kid_subset_size))
        extractors["inception"] = (f"FID Inception-v3 pool3, {inception.FEATURE_DIM}-d, input {inception_size}x"
                                   f"{inception_size}" + ("" if inception_size == inception.INPUT_SIZE
                                                          else " (NOT the FID resolution)"))
        timings["metrics_inception"] = time.time() - t
        if num_samples < 10000:
            notes.append(f"fid from {num_samples} samples is biased upwards relative to the usual 10k/50k")
    else:
        notes.append("Inception metrics (fid, kid_inception, ...) skipped: no --inception_weights given")

    # Likelihood: IWAE bound and the ELBO on the same images, then the ELBO on more.
    if iwae_samples > 0 and iwae_examples > 0:
        t = time.time()
        iw_images = test_images[:iwae_examples]
        iw = iwae_bound(params, model, iw_images, k_iwae, iwae_samples, iwae_batch_size)
        timings["iwae"] = time.time() - t
        elbo_same = elbo_per_image(params, model, iw_images, k_elbo)
        mean_iw = float(np.mean(iw))
        out.update({
            "iwae_log_likelihood_nats": mean_iw,
            "iwae_log_likelihood_stderr_nats": float(np.std(iw) / math.sqrt(max(len(iw), 1))),
            "iwae_bits_per_dim": _bpd(mean_iw, dims),
            "iwae_samples": int(iwae_samples), "iwae_examples": int(iw.shape[0]),
            "elbo_on_iwae_examples_nats": float(np.mean(elbo_same)),
            "iwae_minus_elbo_nats": float(np.mean(iw - elbo_same)),
        })
    t = time.time()
    elbo_images = test_images if not elbo_examples else test_images[:elbo_examples]
    elbo = elbo_per_image(params, model, elbo_images, k_elbo)
    timings["elbo"] = time.time() - t
    out.update({"test_elbo_nats": float(np.mean(elbo)), "test_elbo_bits_per_dim": _bpd(float(np.mean(elbo)), dims),
                "test_elbo_examples": int(elbo.shape[0])})
    if config.likelihood == "gaussian":
        notes.append("likelihood 'gaussian' is a density on [-1, 1] pixels: bits/dim are not comparable "
                     "to discrete-likelihood numbers")

    out.update({"feature_extractors": extractors, "notes": notes, "timings_s": timings,
                "wall_s": time.time() - t_start})
    return out


# --------------------------------------------------------------------------- #
# Online monitor
# --------------------------------------------------------------------------- #


class FDMonitor:
    """Classifier-space Frechet distance of prior samples vs. cached real test features.

    Built once (loads the shipped classifier and the first ``num_samples`` test
    images, and caches their Gaussian fit); each call decodes ``num_samples``
    latents z ~ prior, embeds them and returns ``{metric_name: fd}``.

    Example (in a training loop)::

        monitor = FDMonitor.from_config(config, num_samples=2000)
        key = jax.random.key(123)  # the same key each time: fixed z, smoother curve
        row.update(monitor(state.params, model, config, key))   # {"fd_fmnist": 41.2}

    Attributes:
      metric_name: ``"fd_fmnist"`` (Fashion-MNIST) or ``"fd_mnist"``.
      num_samples: generated (and real) images per call.
    """

    def __init__(self, dataset: str, num_samples: int = 2000, data_source: str = "auto",
                 data_dir: str | None = None, batch_size: int = 500):
        """Loads the classifier and real test features.

        Raises:
          NoFeatureExtractorError: ``dataset`` has no shipped classifier (e.g. cifar10,
            or mnist before its classifier is trained).
          data.DatasetNotFoundError: the test split is not available offline.
          ValueError: ``num_samples`` < 2.
        """
        if num_samples < 2:
            raise ValueError(f"num_samples must be >= 2; got {num_samples}")
        suffix, self._clf_params, self.description = load_classifier(dataset)
        self.dataset = dataset
        self.metric_name = f"fd_{suffix}"
        self.batch_size = batch_size
        real = data.load(dataset, "test", data_source, data_dir, num_samples).images
        self.num_samples = int(num_samples)
        self.num_real = int(real.shape[0])
        self._real_stats = metrics.gaussian_stats(classifier.features(self._clf_params, real, batch_size))

    @classmethod
    def from_config(cls, config: Config, num_samples: int = 2000, batch_size: int = 500) -> "FDMonitor":
        """Monitor for ``config.dataset`` read from ``config.data_source`` / ``config.data_dir``."""
        return cls(config.dataset, num_samples, config.data_source, config.data_dir, batch_size)

    def __call__(self, params: Params, model: ts.Model, config: Config, rng_key: jax.Array) -> dict[str, float]:
        """``{metric_name: fd}`` for ``num_samples`` samples decoded with ``params``.

        Args:
          params: ``state.params`` (``{'decoder', 'encoder'}``; only the decoder is used).
          model: the run's Model.
          config: the run's Config (latent_dim, prior_scale).
          rng_key: PRNG key of the latents.

        Returns:
          ``{"fd_fmnist": float}`` (or ``fd_mnist``), squared classifier-feature units.
        """
        fake = sample_prior(params, model, config, self.num_samples, rng_key, self.batch_size)
        fake_stats = metrics.gaussian_stats(classifier.features(self._clf_params, fake, self.batch_size))
        return {self.metric_name: metrics.frechet_distance(*fake_stats, *self._real_stats)}
