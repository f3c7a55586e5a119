"""Evaluation of a trained run: sample quality and held-out likelihood.

* :func:`load_run` restores ``(config, model, state)`` from a training workdir.
* :func:`test_elbo`: the test-set ELBO (nats per image and bits/dim), the one
  held-out ELBO that training, sweeps and evaluation report.
* Evaluators, each ``(params, model, real, fake, rng_key) -> dict`` with its
  options bound by :func:`make_evaluators` and chosen by name (``EVALUATORS``):

  - ``classifier`` (:func:`classifier_metrics`): in the feature space of the
    shipped 28x28 classifier (:mod:`lpc_jax.classifier`; Fashion-MNIST ->
    suffix ``fmnist``, MNIST -> ``mnist`` when its weights exist): ``fd_<s>``
    (the FID formula on classifier features, NOT comparable to FID),
    ``kid_<s>``, ``density_<s>``, ``coverage_<s>`` (k = 5);
  - ``inception`` (:func:`inception_metrics`): with FID Inception-v3 weights
    (:mod:`lpc_jax.inception`, imported only when this evaluator is built):
    ``fid``, ``kid_inception``, ``density_inception``, ``coverage_inception``;
  - ``likelihood`` (:func:`likelihood_metrics`): the importance-weighted bound
    on log p(x) (Burda et al. 2016) with the encoder as proposal, in nats per
    image and bits/dim, and the test ELBO.

* :func:`evaluate` samples once, runs the chosen evaluators and times each.
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
from typing import Any, Callable, NamedTuple, Sequence

import jax
import numpy as np

from lpc_jax import checkpoints, classifier, data, metrics, models, objectives, plotting
from lpc_jax import config as config_lib
from lpc_jax import train_step as ts
from lpc_jax.config import Config

Params = Any
# (params, model, real (N, H, W, C) uint8, fake (M, H, W, C) float32 in [-1, 1], rng_key) -> dict
Evaluator = Callable[[Params, ts.Model, np.ndarray, np.ndarray, jax.Array], dict]

# dataset -> suffix of the classifier-space metric names (fd_<suffix>, kid_<suffix>, ...)
CLASSIFIER_SUFFIX = {"fashion_mnist": "fmnist", "mnist": "mnist"}
DENSITY_K = 5  # Naeem et al. 2020
INCEPTION_INPUT_SIZE = 299  # = inception.INPUT_SIZE, without importing the network


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
# Test ELBO and the IWAE bound
# --------------------------------------------------------------------------- #


def _pad(x: np.ndarray, size: int) -> np.ndarray:
    if x.shape[0] == size:
        return x
    return np.concatenate([x, np.zeros((size - x.shape[0], *x.shape[1:]), x.dtype)])


def _largest_divisor_at_most(n: int, cap: int) -> int:
    """Largest divisor of ``n`` that is <= ``cap`` (>= 1)."""
    return next(d for d in range(max(1, min(cap, n)), 0, -1) if n % d == 0)


def _map_batches(fn, images: np.ndarray, batch_size: int, rng_key: jax.Array) -> np.ndarray:
    """Applies ``fn(x_float, key) -> (B,)`` to fixed-size batches (last one zero-padded).

    Batch ``i`` holds ``images[i * B : (i + 1) * B]`` with ``B = min(batch_size, N)``,
    zero-padded to ``B`` rows, and gets the key ``fold_in(rng_key, i)``.
    """
    n = images.shape[0]
    batch_size = min(batch_size, max(n, 1))
    out = []
    for i, start in enumerate(range(0, n, batch_size)):
        x = data.to_float(images[start : start + batch_size])
        valid = x.shape[0]
        out.append(np.asarray(fn(_pad(x, batch_size), jax.random.fold_in(rng_key, i)))[:valid])
    return np.concatenate(out) if out else np.zeros((0,), np.float32)


@functools.partial(jax.jit, static_argnames=("model",))
def _elbo_batch(params: Params, x: jax.Array, key: jax.Array, *, model: ts.Model) -> jax.Array:
    mean, variance = model.encoder.apply({"params": params["encoder"]}, x)
    return objectives.reparameterized_elbo(key, mean, variance, lambda z: model.log_joint(params["decoder"], x, z))


def _elbo_per_image(params: Params, model: ts.Model, images: np.ndarray, rng_key: jax.Array,
                    batch_size: int = 500) -> np.ndarray:
    """Single-sample encoder ELBO of each image, (N,) float32 nats (schedule of :func:`test_elbo`)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    return _map_batches(lambda x, k: _elbo_batch(params, x, k, model=model), images, batch_size, rng_key)


def test_elbo(params: Params, model: ts.Model, images: np.ndarray, rng_key: jax.Array, *,
              batch_size: int = 500) -> dict:
    """Mean single-sample ELBO of held-out images, in nats per image and bits/dim.

    The ELBO is log p(x, z) - log q(z | x) with one reparameterised sample
    z ~ q(z | x) (:func:`lpc_jax.objectives.reparameterized_elbo`, section 1.2).
    Key schedule: ``B = min(batch_size, N)``; batch ``i`` holds images
    ``[i * B, (i + 1) * B)``, zero-padded to ``B`` rows (one compiled shape),
    and draws its noise ``normal(fold_in(rng_key, i), (B, latent_dim))``; the
    padded rows are dropped before averaging.

    Args:
      params: ``{'decoder', 'encoder'}`` params (``state.params``).
      model: the run's Model.
      images: (N, H, W, C) uint8 test images, N >= 1.
      rng_key: PRNG key.
      batch_size: images per jitted call.

    Returns:
      ``{"test_elbo_nats": float (mean nats per image), "test_elbo_bits_per_dim":
      float (:func:`lpc_jax.metrics.bits_per_dim` of that mean, D = H * W * C),
      "test_examples": N}``.
    """
    if images.shape[0] < 1:
        raise ValueError("test_elbo needs at least one image; got an empty array")
    elbo = float(np.mean(_elbo_per_image(params, model, images, rng_key, batch_size), dtype=np.float64))
    dims = int(np.prod(images.shape[1:]))
    return {"test_elbo_nats": elbo, "test_elbo_bits_per_dim": float(metrics.bits_per_dim(elbo, dims)),
            "test_examples": int(images.shape[0])}


@functools.partial(jax.jit, static_argnames=("model", "num_samples", "chunk_size"))
def _iwae_batch(params: Params, x: jax.Array, key: jax.Array, *, model: ts.Model, num_samples: int,
                chunk_size: int) -> jax.Array:
    mean, variance = model.encoder.apply({"params": params["encoder"]}, x)
    return metrics.iwae_log_likelihood(key, lambda z: model.log_joint(params["decoder"], x, z), mean, variance,
                                       num_samples, chunk_size)


def iwae_bound(params: Params, model: ts.Model, images: np.ndarray, rng_key: jax.Array, *,
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


def feature_metrics(real_feats: np.ndarray, fake_feats: np.ndarray, *, suffix: str, fd_name: str,
                    kid_subsets: int = 100, kid_subset_size: int = 1000, k: int = DENSITY_K,
                    seed: int = 0) -> dict:
    """Frechet distance, KID (mean, std) and density/coverage between two (N, F) feature sets.

    Returns:
      ``{fd_name, kid_<suffix>, kid_<suffix>_std, density_<suffix>, coverage_<suffix>}``, floats.
    """
    kid, kid_std = metrics.kernel_inception_distance(real_feats, fake_feats, kid_subsets, kid_subset_size, seed)
    density, coverage = metrics.density_coverage(real_feats, fake_feats, k=k)
    return {fd_name: metrics.fd_from_features(fake_feats, real_feats),
            f"kid_{suffix}": kid, f"kid_{suffix}_std": kid_std,
            f"density_{suffix}": density, f"coverage_{suffix}": coverage}


# --------------------------------------------------------------------------- #
# Evaluators: (params, model, real, fake, rng_key) -> dict
# --------------------------------------------------------------------------- #
# Besides metric values, an evaluator's dict may hold "feature_extractors"
# ({suffix: description}) and "notes" (list of str); run_evaluators merges them.


def classifier_metrics(params: Params, model: ts.Model, real: np.ndarray, fake: np.ndarray,
                       rng_key: jax.Array, *, dataset: str, kid_subsets: int = 100,
                       kid_subset_size: int = 1000) -> dict:
    """``fd_<s>``, ``kid_<s>`` (+ ``_std``), ``density_<s>``, ``coverage_<s>`` in classifier space.

    Args:
      params, model, rng_key: unused (the metrics compare two image sets).
      real: (N, 28, 28, 1) uint8 test images.
      fake: (M, 28, 28, 1) float32 samples in [-1, 1].
      dataset: selects the shipped classifier and the suffix ``s`` (``fmnist``, ``mnist``).
      kid_subsets, kid_subset_size: KID subsets (Binkowski et al. use 100 x 1000).

    Raises:
      NoFeatureExtractorError: ``dataset`` has no shipped classifier.
    """
    del params, model, rng_key
    suffix, clf_params, description = load_classifier(dataset)
    out = feature_metrics(classifier.features(clf_params, real), classifier.features(clf_params, fake),
                          suffix=suffix, fd_name=f"fd_{suffix}", kid_subsets=kid_subsets,
                          kid_subset_size=kid_subset_size)
    return {**out, "feature_extractors": {suffix: description}}


def inception_metrics(params: Params, model: ts.Model, real: np.ndarray, fake: np.ndarray,
                      rng_key: jax.Array, *, variables: Any, size: int = INCEPTION_INPUT_SIZE,
                      batch_size: int = 50, kid_subsets: int = 100, kid_subset_size: int = 1000) -> dict:
    """``fid``, ``kid_inception`` (+ ``_std``), ``density_inception``, ``coverage_inception``.

    Args:
      params, model, rng_key: unused.
      real: (N, H, W, C) uint8 test images; fake: (M, H, W, C) float32 in [-1, 1].
      variables: FID Inception variables (``inception.load_fid_inception``).
      size: Inception input size (keep 299 for FID; smaller only in tests).
      batch_size: images per Inception call.
      kid_subsets, kid_subset_size: KID subsets.
    """
    from lpc_jax import inception  # the network is imported only where it is used

    del params, model, rng_key
    real_f = inception.inception_features(variables, real, batch_size, size)
    fake_f = inception.inception_features(variables, fake, batch_size, size)
    out = feature_metrics(real_f, fake_f, suffix="inception", fd_name="fid", kid_subsets=kid_subsets,
                          kid_subset_size=kid_subset_size)
    description = (f"FID Inception-v3 pool3, {inception.FEATURE_DIM}-d, input {size}x{size}"
                   + ("" if size == inception.INPUT_SIZE else " (NOT the FID resolution)"))
    notes = ([f"fid from {len(fake)} samples is biased upwards relative to the usual 10k/50k"]
             if len(fake) < 10000 else [])
    return {**out, "feature_extractors": {"inception": description}, "notes": notes}


def likelihood_metrics(params: Params, model: ts.Model, real: np.ndarray, fake: np.ndarray,
                       rng_key: jax.Array, *, images: np.ndarray, iwae_samples: int = 5000,
                       iwae_examples: int = 1000, iwae_batch_size: int = 50, elbo_examples: int = 0) -> dict:
    """IWAE bound on log p(x) (Burda et al. 2016) and the test ELBO, nats per image and bits/dim.

    Args:
      params: ``{'decoder', 'encoder'}`` params; model: the run's Model.
      real, fake: unused (the held-out set is ``images``).
      rng_key: split into the IWAE key and the ELBO key.
      images: (N, H, W, C) uint8 held-out images (the test split).
      iwae_samples: K importance samples per image (0 skips the IWAE bound).
      iwae_examples: the first this many ``images`` get the IWAE bound, and the
        ELBO on the same images (``elbo_on_iwae_examples_nats``).
      iwae_batch_size: images per IWAE call.
      elbo_examples: the first this many ``images`` get the test ELBO; 0 = all.

    Returns:
      ``iwae_log_likelihood_nats`` (+ ``_stderr_nats``), ``iwae_bits_per_dim``,
      ``iwae_samples``, ``iwae_examples``, ``elbo_on_iwae_examples_nats``,
      ``iwae_minus_elbo_nats`` (when K > 0), ``test_elbo_nats``,
      ``test_elbo_bits_per_dim``, ``test_elbo_examples``.
    """
    del real, fake
    k_iwae, k_elbo = jax.random.split(rng_key)
    dims = int(np.prod(images.shape[1:]))
    out: dict[str, Any] = {}
    if iwae_samples > 0 and iwae_examples > 0:
        iw_images = images[:iwae_examples]
        iw = iwae_bound(params, model, iw_images, k_iwae, num_samples=iwae_samples, batch_size=iwae_batch_size)
        elbo_same = _elbo_per_image(params, model, iw_images, k_elbo)
        mean_iw = float(np.mean(iw, dtype=np.float64))
        out.update({
            "iwae_log_likelihood_nats": mean_iw,
            "iwae_log_likelihood_stderr_nats": float(np.std(iw) / math.sqrt(len(iw))),
            "iwae_bits_per_dim": float(metrics.bits_per_dim(mean_iw, dims)),
            "iwae_samples": int(iwae_samples), "iwae_examples": int(iw.shape[0]),
            "elbo_on_iwae_examples_nats": float(np.mean(elbo_same, dtype=np.float64)),
            "iwae_minus_elbo_nats": float(np.mean(iw - elbo_same, dtype=np.float64)),
        })
    elbo = test_elbo(params, model, images[:elbo_examples] if elbo_examples else images, k_elbo)
    out.update({"test_elbo_nats": elbo["test_elbo_nats"], "test_elbo_bits_per_dim": elbo["test_elbo_bits_per_dim"],
                "test_elbo_examples": elbo["test_examples"]})
    if model.likelihood == "gaussian":
        out["notes"] = ["likelihood 'gaussian' is a density on [-1, 1] pixels: bits/dim are not comparable "
                        "to discrete-likelihood numbers"]
    return out


class EvalOptions(NamedTuple):
    """Options of :func:`evaluate` and its evaluators; each evaluator reads its own."""

    sample_batch_size: int = 500  # latents decoded per call
    kid_subsets: int = 100  # KID: subsets of up to kid_subset_size images (classifier, inception)
    kid_subset_size: int = 1000
    inception_weights: str | None = None  # pytorch-fid weights path, or "auto" (default paths)
    inception_variables: Any = None  # already loaded Inception variables (override the path)
    inception_size: int = INCEPTION_INPUT_SIZE  # keep 299 for FID; smaller only in tests
    inception_batch_size: int = 50
    iwae_samples: int = 5000  # K per image; 0 skips the IWAE bound
    iwae_examples: int = 1000  # first test images that get the IWAE bound
    iwae_batch_size: int = 50
    elbo_examples: int = 0  # first test images that get the test ELBO; 0 = the whole split


def _bind_classifier(config: Config, options: EvalOptions, images: np.ndarray) -> Evaluator:
    del images
    return functools.partial(classifier_metrics, dataset=config.dataset, kid_subsets=options.kid_subsets,
                             kid_subset_size=options.kid_subset_size)


def _bind_inception(config: Config, options: EvalOptions, images: np.ndarray) -> Evaluator:
    del config, images
    variables = options.inception_variables
    if variables is None:
        from lpc_jax import inception

        auto = options.inception_weights in (None, "auto")
        variables = inception.load_fid_inception(None if auto else options.inception_weights)
    return functools.partial(inception_metrics, variables=variables, size=options.inception_size,
                             batch_size=options.inception_batch_size, kid_subsets=options.kid_subsets,
                             kid_subset_size=options.kid_subset_size)


def _bind_likelihood(config: Config, options: EvalOptions, images: np.ndarray) -> Evaluator:
    del config
    return functools.partial(likelihood_metrics, images=images, iwae_samples=options.iwae_samples,
                             iwae_examples=options.iwae_examples, iwae_batch_size=options.iwae_batch_size,
                             elbo_examples=options.elbo_examples)


# name -> builder (config, options, held-out images) -> Evaluator
EVALUATORS: dict[str, Callable[[Config, EvalOptions, np.ndarray], Evaluator]] = {
    "classifier": _bind_classifier,
    "inception": _bind_inception,
    "likelihood": _bind_likelihood,
}


def default_evaluators(options: EvalOptions) -> tuple[str, ...]:
    """``classifier``, ``inception`` (only with Inception weights or variables) and ``likelihood``."""
    with_inception = bool(options.inception_weights) or options.inception_variables is not None
    return ("classifier", "inception", "likelihood") if with_inception else ("classifier", "likelihood")


def make_evaluators(names: Sequence[str], config: Config, options: EvalOptions,
                    images: np.ndarray) -> dict[str, Evaluator]:
    """Binds the options of each named evaluator.

    Args:
      names: keys of ``EVALUATORS``.
      config: the run's Config (dataset).
      options: evaluator options.
      images: (N, H, W, C) uint8 held-out images (the likelihood evaluator's data).

    Raises:
      ValueError: an unknown name (the message lists the known ones).
      FileNotFoundError: ``inception`` requested but its weights are missing.
    """
    unknown = [n for n in names if n not in EVALUATORS]
    if unknown:
        raise ValueError(f"unknown evaluator(s) {unknown}; choose from {sorted(EVALUATORS)}")
    return {name: EVALUATORS[name](config, options, images) for name in names}


def run_evaluators(evaluators: dict[str, Evaluator], params: Params, model: ts.Model, real: np.ndarray,
                   fake: np.ndarray, rng_key: jax.Array) -> dict:
    """Runs each evaluator on the same inputs and key, timing it.

    An evaluator raising :class:`NoFeatureExtractorError` is skipped with a note.

    Returns:
      The evaluators' metrics merged, plus ``feature_extractors`` ({suffix:
      description}), ``notes`` (list of str) and ``timings_s`` ({name: seconds}).
    """
    out: dict[str, Any] = {"feature_extractors": {}, "notes": [], "timings_s": {}}
    for name, evaluator in evaluators.items():
        t = time.time()
        try:
            result = dict(evaluator(params, model, real, fake, rng_key))
        except NoFeatureExtractorError as e:
            out["notes"].append(f"{name} metrics skipped: {e}")
            continue
        out["feature_extractors"].update(result.pop("feature_extractors", {}))
        out["notes"].extend(result.pop("notes", []))
        out.update(result)
        out["timings_s"][name] = time.time() - t
    return out


# --------------------------------------------------------------------------- #
# Full evaluation
# --------------------------------------------------------------------------- #


def evaluate(config: Config, model: ts.Model, state: ts.TrainState, *, rng_key: jax.Array,
             num_samples: int = 10000, options: EvalOptions = EvalOptions(),
             evaluators: Sequence[str] | None = None, samples_png: str | None = None,
             test_images: np.ndarray | None = None) -> dict:
    """Samples ``num_samples`` images from the prior once and runs the named evaluators on them.

    Args:
      config, model, state: from :func:`load_run`.
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
      data.DatasetNotFoundError: the test split is not available offline.
    """
    if num_samples < 2:
        raise ValueError(f"num_samples must be >= 2; got {num_samples}")
    t_start = time.time()
    k_sample, k_eval = jax.random.split(rng_key)
    if test_images is None:
        test_images = data.load(config.dataset, "test", config.data_source, config.data_dir).images
    timings = {"load_test_data": time.time() - t_start}
    names = default_evaluators(options) if evaluators is None else tuple(evaluators)
    t = time.time()
    bound = make_evaluators(names, config, options, test_images)
    timings["load_evaluators"] = time.time() - t
    num_real = min(num_samples, test_images.shape[0])
    real = test_images[:num_real]
    t = time.time()
    fake = models.sample_prior(model.decoder, state.params["decoder"], k_sample, num_samples,
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


# --------------------------------------------------------------------------- #
# Online monitor
# --------------------------------------------------------------------------- #


class FDMonitor:
    """Classifier-space Frechet distance of prior samples vs. cached real test features.

    Built once (loads the shipped classifier and the first ``num_samples`` test
    images, and caches their Gaussian fit); each call decodes ``num_samples``
    latents z ~ prior (:func:`lpc_jax.models.sample_prior`), embeds them and
    returns ``{metric_name: fd}``.

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
        fake = models.sample_prior(model.decoder, params["decoder"], rng_key, self.num_samples,
                                   latent_dim=config.latent_dim, prior_scale=config.prior_scale,
                                   likelihood=model.likelihood, batch_size=self.batch_size)
        fake_stats = metrics.gaussian_stats(classifier.features(self._clf_params, fake, self.batch_size))
        return {self.metric_name: metrics.frechet_distance(*fake_stats, *self._real_stats)}
