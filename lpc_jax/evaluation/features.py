"""Feature spaces for sample metrics: the shipped Fashion-MNIST / MNIST classifier and the
metrics computed between two feature sets (FD, KID, density and coverage)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from lpc_jax.evaluation import classifier, sample_metrics

Params = Any


# dataset -> suffix of the classifier-space metric names (fd_<suffix>, kid_<suffix>, ...)
CLASSIFIER_SUFFIX = {"fashion_mnist": "fmnist", "mnist": "mnist"}


DENSITY_K = 5  # Naeem et al. 2020


INCEPTION_INPUT_SIZE = 299  # = inception.INPUT_SIZE, without importing the network


class NoFeatureExtractorError(ValueError):
    """The dataset has no offline (shipped) feature extractor for classifier-space sample_metrics."""


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
    kid, kid_std = sample_metrics.kernel_inception_distance(real_feats, fake_feats, kid_subsets, kid_subset_size, seed)
    density, coverage = sample_metrics.density_coverage(real_feats, fake_feats, k=k)
    return {fd_name: sample_metrics.fd_from_features(fake_feats, real_feats),
            f"kid_{suffix}": kid, f"kid_{suffix}_std": kid_std,
            f"density_{suffix}": density, f"coverage_{suffix}": coverage}
