"""Evaluators by name: sample quality and held-out likelihood of a trained model.

Each evaluator is ``(params, model, real, fake, rng_key) -> dict`` with its options
bound by :func:`make_evaluators` and chosen by name (``EVALUATORS``):

* ``classifier`` (:func:`classifier_metrics`): in the feature space of the
  shipped 28x28 classifier (:mod:`lpc_jax.evaluation.classifier`; Fashion-MNIST ->
  suffix ``fmnist``, MNIST -> ``mnist`` when its weights exist): ``fd_<s>``
  (the FID formula on classifier features, NOT comparable to FID),
  ``kid_<s>``, ``density_<s>``, ``coverage_<s>`` (k = 5);
* ``inception`` (:func:`inception_metrics`): with FID Inception-v3 weights
  (:mod:`lpc_jax.evaluation.inception`, imported only when this evaluator is built):
  ``fid``, ``kid_inception``, ``density_inception``, ``coverage_inception``;
* ``likelihood`` (:func:`likelihood_metrics`): the importance-weighted bound
  on log p(x) (Burda et al. 2016) with the encoder as proposal, in nats per
  image and bits/dim, and the test ELBO (:mod:`lpc_jax.evaluation.bounds`);
* ``ais`` (:func:`ais_metrics`, only when ``EvalOptions.ais_steps`` > 0): annealed
  importance sampling of log p(x) from the prior (:mod:`lpc_jax.evaluation.ais`),
  the decoder's likelihood without the encoder's help, in nats and bits/dim.

:func:`run_evaluators` runs them on one set of samples and times each; a whole
run is evaluated by :func:`lpc_jax.training.evaluate.evaluate`.
"""

from __future__ import annotations

import functools
import math
import time
from typing import Any, Callable, NamedTuple, Sequence

import jax
import numpy as np

from lpc_jax.evaluation import ais, bounds, classifier, features
from lpc_jax.model.state import Model

Params = Any
# (params, model, real (N, H, W, C) uint8, fake (M, H, W, C) float32 in [-1, 1], rng_key) -> dict
Evaluator = Callable[[Params, Model, np.ndarray, np.ndarray, jax.Array], dict]


# --------------------------------------------------------------------------- #
# Evaluators: (params, model, real, fake, rng_key) -> dict
# --------------------------------------------------------------------------- #
# Besides metric values, an evaluator's dict may hold "feature_extractors"
# ({suffix: description}) and "notes" (list of str); run_evaluators merges them.


def classifier_metrics(params: Params, model: Model, real: np.ndarray, fake: np.ndarray,
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
    suffix, clf_params, description = features.load_classifier(dataset)
    out = features.feature_metrics(classifier.features(clf_params, real), classifier.features(clf_params, fake),
                          suffix=suffix, fd_name=f"fd_{suffix}", kid_subsets=kid_subsets,
                          kid_subset_size=kid_subset_size)
    return {**out, "feature_extractors": {suffix: description}}


def inception_metrics(params: Params, model: Model, real: np.ndarray, fake: np.ndarray,
                      rng_key: jax.Array, *, variables: Any, size: int = features.INCEPTION_INPUT_SIZE,
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
    from lpc_jax.evaluation import (
        inception,  # the network is imported only where it is used
    )

    del params, model, rng_key
    real_f = inception.inception_features(variables, real, batch_size, size)
    fake_f = inception.inception_features(variables, fake, batch_size, size)
    out = features.feature_metrics(real_f, fake_f, suffix="inception", fd_name="fid", kid_subsets=kid_subsets,
                          kid_subset_size=kid_subset_size)
    description = (f"FID Inception-v3 pool3, {inception.FEATURE_DIM}-d, input {size}x{size}"
                   + ("" if size == inception.INPUT_SIZE else " (NOT the FID resolution)"))
    notes = ([f"fid from {len(fake)} samples is biased upwards relative to the usual 10k/50k"]
             if len(fake) < 10000 else [])
    return {**out, "feature_extractors": {"inception": description}, "notes": notes}


def likelihood_metrics(params: Params, model: Model, real: np.ndarray, fake: np.ndarray,
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
      ``iwae_minus_elbo_nats``, ``iwae_per_image_nats`` (list, for pairing with
      AIS on the same images; all when K > 0), ``test_elbo_nats``,
      ``test_elbo_bits_per_dim``, ``test_elbo_examples``.
    """
    del real, fake
    k_iwae, k_elbo = jax.random.split(rng_key)
    dims = int(np.prod(images.shape[1:]))
    out: dict[str, Any] = {}
    if iwae_samples > 0 and iwae_examples > 0:
        iw_images = images[:iwae_examples]
        iw = bounds.iwae_bound(params, model, iw_images, k_iwae, num_samples=iwae_samples, batch_size=iwae_batch_size)
        elbo_same = bounds.elbo_per_image(params, model, iw_images, k_elbo)
        mean_iw = float(np.mean(iw, dtype=np.float64))
        out.update({
            "iwae_log_likelihood_nats": mean_iw,
            "iwae_log_likelihood_stderr_nats": float(np.std(iw) / math.sqrt(len(iw))),
            "iwae_bits_per_dim": float(bounds.bits_per_dim(mean_iw, dims)),
            "iwae_samples": int(iwae_samples), "iwae_examples": int(iw.shape[0]),
            "elbo_on_iwae_examples_nats": float(np.mean(elbo_same, dtype=np.float64)),
            "iwae_minus_elbo_nats": float(np.mean(iw - elbo_same, dtype=np.float64)),
            "iwae_per_image_nats": [float(v) for v in iw],
        })
    elbo = bounds.test_elbo(params, model, images[:elbo_examples] if elbo_examples else images, k_elbo)
    out.update({"test_elbo_nats": elbo["test_elbo_nats"], "test_elbo_bits_per_dim": elbo["test_elbo_bits_per_dim"],
                "test_elbo_examples": elbo["test_examples"]})
    if model.likelihood == "gaussian":
        out["notes"] = ["likelihood 'gaussian' is a density on [-1, 1] pixels: bits/dim are not comparable "
                        "to discrete-likelihood numbers"]
    return out


def ais_metrics(params: Params, model: Model, real: np.ndarray, fake: np.ndarray, rng_key: jax.Array, *,
                images: np.ndarray, options: ais.AISOptions, examples: int = 100, batch_size: int = 25,
                progress: Callable[[int, int], None] | None = None) -> dict:
    """AIS log-likelihood (Neal 2001) of the first ``examples`` held-out images, nats and bits/dim.

    Args:
      params, model: the run's; real, fake: unused (the held-out set is ``images``).
      rng_key: the AIS key (pilot and estimate per batch, :func:`lpc_jax.evaluation.ais.ais_per_image`).
      images: (N, H, W, C) uint8 held-out images.
      options: :class:`lpc_jax.evaluation.ais.AISOptions` (K, chains, schedule, init, step size).
      examples: the first this many ``images`` are evaluated.
      batch_size: images per jitted call.
      progress: ``progress(images_done, examples)`` after each batch.

    Returns:
      ``ais_log_likelihood_nats`` (mean over images), ``ais_log_likelihood_stderr_nats``
      (its standard error over images), ``ais_chain_stderr_nats`` (root-mean-square of
      the per-image delta-method standard errors over chains), ``ais_bits_per_dim``,
      ``ais_ess`` (mean effective sample size of the chains), ``ais_acceptance``,
      ``ais_steps``, ``ais_chains``, ``ais_pilot_chains`` (0: a fixed step size),
      ``ais_examples``, ``ais_init``; and
      ``ais_per_image_nats`` (list) for pairing with other bounds on the same images.
    """
    del real, fake
    sub = images[:examples]
    out = ais.ais_per_image(params, model, sub, rng_key, options=options, batch_size=batch_size, progress=progress)
    ll = out["log_marginal"]
    mean = float(np.mean(ll))
    return {
        "ais_log_likelihood_nats": mean,
        "ais_log_likelihood_stderr_nats": float(np.std(ll) / math.sqrt(len(ll))),
        "ais_chain_stderr_nats": float(np.sqrt(np.nanmean(out["stderr"] ** 2))),
        "ais_bits_per_dim": float(bounds.bits_per_dim(mean, int(np.prod(images.shape[1:])))),
        "ais_ess": float(np.mean(out["ess"])), "ais_acceptance": float(np.mean(out["acceptance"])),
        "ais_steps": options.num_steps, "ais_chains": options.num_chains, "ais_examples": int(len(ll)),
        "ais_pilot_chains": options.pilot_chains if options.step_size == 0.0 else 0,
        "ais_init": options.init, "ais_per_image_nats": [float(v) for v in ll],
    }


class EvalOptions(NamedTuple):
    """Options of :func:`evaluate` and its evaluators; each evaluator reads its own."""

    sample_batch_size: int = 500  # latents decoded per call
    kid_subsets: int = 100  # KID: subsets of up to kid_subset_size images (classifier, inception)
    kid_subset_size: int = 1000
    inception_weights: str | None = None  # pytorch-fid weights path, or "auto" (default paths)
    inception_variables: Any = None  # already loaded Inception variables (override the path)
    inception_size: int = features.INCEPTION_INPUT_SIZE  # keep 299 for FID; smaller only in tests
    inception_batch_size: int = 50
    iwae_samples: int = 5000  # K per image; 0 skips the IWAE bound
    iwae_examples: int = 1000  # first test images that get the IWAE bound
    iwae_batch_size: int = 50
    elbo_examples: int = 0  # first test images that get the test ELBO; 0 = the whole split
    ais_steps: int = 0  # AIS intermediate distributions K; 0 = no AIS evaluator by default
    ais_chains: int = 16  # AIS chains per image
    ais_examples: int = 100  # first test images that get the AIS estimate
    ais_batch_size: int = 25
    ais_schedule: str = "sigmoid"  # or "linear"
    ais_init: str = "prior"  # or "encoder" (q(z|x) as the path's start)
    ais_prior_scale: float = 1.0  # the run's Config.prior_scale
    ais_step_size: float = 0.0  # fixed MALA step size; 0 = a pilot pass tunes one per image and temperature
    ais_pilot_chains: int = 4  # chains per image of that pilot pass
    ais_progress: Callable[[int, int], None] | None = None  # progress(images_done, ais_examples)

    def ais_options(self) -> ais.AISOptions:
        """The AIS settings above, checked (ValueError naming the bad one)."""
        options = ais.AISOptions(num_steps=self.ais_steps, num_chains=self.ais_chains,
                                 schedule_name=self.ais_schedule, init=self.ais_init,
                                 prior_scale=self.ais_prior_scale, step_size=self.ais_step_size,
                                 pilot_chains=self.ais_pilot_chains)
        ais.check_options(options)
        return options


def _bind_classifier(dataset: str, options: EvalOptions, images: np.ndarray) -> Evaluator:
    del images
    return functools.partial(classifier_metrics, dataset=dataset, kid_subsets=options.kid_subsets,
                             kid_subset_size=options.kid_subset_size)


def _bind_inception(dataset: str, options: EvalOptions, images: np.ndarray) -> Evaluator:
    del dataset, images
    variables = options.inception_variables
    if variables is None:
        from lpc_jax.evaluation import inception

        auto = options.inception_weights in (None, "auto")
        variables = inception.load_fid_inception(None if auto else options.inception_weights)
    return functools.partial(inception_metrics, variables=variables, size=options.inception_size,
                             batch_size=options.inception_batch_size, kid_subsets=options.kid_subsets,
                             kid_subset_size=options.kid_subset_size)


def _bind_likelihood(dataset: str, options: EvalOptions, images: np.ndarray) -> Evaluator:
    del dataset
    return functools.partial(likelihood_metrics, images=images, iwae_samples=options.iwae_samples,
                             iwae_examples=options.iwae_examples, iwae_batch_size=options.iwae_batch_size,
                             elbo_examples=options.elbo_examples)


def _bind_ais(dataset: str, options: EvalOptions, images: np.ndarray) -> Evaluator:
    del dataset
    ais_options = options.ais_options()  # bad settings fail here, before any evaluator runs
    return functools.partial(ais_metrics, images=images, options=ais_options, examples=options.ais_examples,
                             batch_size=options.ais_batch_size, progress=options.ais_progress)


# name -> builder (dataset, options, held-out images) -> Evaluator
EVALUATORS: dict[str, Callable[[str, EvalOptions, np.ndarray], Evaluator]] = {
    "classifier": _bind_classifier,
    "inception": _bind_inception,
    "likelihood": _bind_likelihood,
    "ais": _bind_ais,
}


def default_evaluators(options: EvalOptions) -> tuple[str, ...]:
    """``classifier``, ``inception`` (only with Inception weights or variables), ``likelihood``
    and ``ais`` (only with ``ais_steps`` > 0)."""
    with_inception = bool(options.inception_weights) or options.inception_variables is not None
    names = ("classifier", "inception", "likelihood") if with_inception else ("classifier", "likelihood")
    return names + ("ais",) if options.ais_steps > 0 else names


def make_evaluators(names: Sequence[str], dataset: str, options: EvalOptions,
                    images: np.ndarray) -> dict[str, Evaluator]:
    """Binds the options of each named evaluator.

    Args:
      names: keys of ``EVALUATORS``.
      dataset: the run's dataset (``config.dataset``), for the classifier space.
      options: evaluator options.
      images: (N, H, W, C) uint8 held-out images (the likelihood evaluator's data).

    Raises:
      ValueError: an unknown name (the message lists the known ones).
      FileNotFoundError: ``inception`` requested but its weights are missing.
    """
    unknown = [n for n in names if n not in EVALUATORS]
    if unknown:
        raise ValueError(f"unknown evaluator(s) {unknown}; choose from {sorted(EVALUATORS)}")
    return {name: EVALUATORS[name](dataset, options, images) for name in names}


def run_evaluators(evaluators: dict[str, Evaluator], params: Params, model: Model, real: np.ndarray,
                   fake: np.ndarray, rng_key: jax.Array) -> dict:
    """Runs each evaluator on the same inputs and key, timing it.

    An evaluator raising :class:`lpc_jax.evaluation.features.NoFeatureExtractorError` is skipped with a note.

    Returns:
      The evaluators' metrics merged, plus ``feature_extractors`` ({suffix:
      description}), ``notes`` (list of str) and ``timings_s`` ({name: seconds}).
    """
    out: dict[str, Any] = {"feature_extractors": {}, "notes": [], "timings_s": {}}
    for name, evaluator in evaluators.items():
        t = time.time()
        try:
            result = dict(evaluator(params, model, real, fake, rng_key))
        except features.NoFeatureExtractorError as e:
            out["notes"].append(f"{name} metrics skipped: {e}")
            continue
        out["feature_extractors"].update(result.pop("feature_extractors", {}))
        out["notes"].extend(result.pop("notes", []))
        out.update(result)
        out["timings_s"][name] = time.time() - t
    return out


