"""Sample-quality and likelihood metrics, as small pure functions.

Feature-space metrics (NumPy, host memory) take embeddings of shape ``(N, F)``
from any feature extractor: the Fashion-MNIST classifier
(:mod:`lpc_jax.evaluation.classifier`, metric name ``fd_fmnist``) or the FID
Inception-v3 (:mod:`lpc_jax.evaluation.inception`, pool3 features, metric name ``fid``).

* Frechet distance between Gaussian fits: Heusel et al. 2017, "GANs Trained by
  a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium" (FID),
  using the closed form of Dowson & Landau 1982, "The Frechet distance between
  multivariate normal distributions" (Frechet 1957).
* Kernel Inception Distance: Binkowski et al. 2018, "Demystifying MMD GANs".
* Density and coverage: Naeem et al. 2020, "Reliable Fidelity and Diversity
  Metrics for Generative Models".

Likelihood metrics (JAX):

* Importance-weighted log-likelihood bound: Burda et al. 2016, "Importance
  Weighted Autoencoders".
* Bits per dimension of a discrete likelihood.
"""

from __future__ import annotations

import math

import jax
import numpy as np

Array = jax.Array

_LOG_2PI = math.log(2.0 * math.pi)


# --------------------------------------------------------------------------- #
# Frechet distance
# --------------------------------------------------------------------------- #


def _check_features(name: str, feats: np.ndarray, min_rows: int = 2) -> np.ndarray:
    feats = np.asarray(feats)
    if feats.ndim != 2:
        raise ValueError(f"{name} must have shape (N, F); got {feats.shape}")
    if feats.shape[0] < min_rows:
        raise ValueError(f"{name} needs at least {min_rows} rows; got {feats.shape[0]}")
    if not np.issubdtype(feats.dtype, np.number):
        raise ValueError(f"{name} must be numeric; got dtype {feats.dtype}")
    if not np.all(np.isfinite(feats)):
        raise ValueError(f"{name} contains NaN or inf")
    return feats


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance of a feature set (the Gaussian fit of FID).

    Args:
      features: (N, F) embeddings, any real dtype, N >= 2.

    Returns:
      ``(mean, cov)``: (F,) and (F, F) float64; ``cov`` uses the N - 1
      denominator, as in Heusel et al. 2017's reference implementation.

    Raises:
      ValueError: wrong rank, fewer than 2 rows, or non-finite entries.
    """
    feats = _check_features("features", features).astype(np.float64)
    mean = feats.mean(axis=0)
    cov = np.cov(feats, rowvar=False)
    return mean, np.atleast_2d(cov)


def _psd_sqrt(cov: np.ndarray) -> np.ndarray:
    """Symmetric square root of a PSD matrix via eigh; tiny negative eigenvalues -> 0."""
    w, v = np.linalg.eigh(cov)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """Squared Frechet (2-Wasserstein) distance between two Gaussians.

    d^2 = ||mu1 - mu2||^2 + tr(C1) + tr(C2) - 2 tr((C1^1/2 C2 C1^1/2)^1/2)
    (Dowson & Landau 1982; the FID of Heusel et al. 2017 when the Gaussians are
    fitted to Inception pool3 features).

    The trace term is computed without a general (non-symmetric) ``sqrtm``:
    C1^1/2 comes from a symmetric eigendecomposition, M = C1^1/2 C2 C1^1/2 is
    symmetric PSD, and tr(M^1/2) is the sum of square roots of M's
    eigenvalues. Eigenvalues below zero (round-off on singular covariances,
    e.g. fewer samples than features) are clipped to zero. Everything is
    float64. The result is clipped at 0 (round-off can give -1e-12 for equal
    inputs).

    Args:
      mu1, mu2: (F,) means.
      cov1, cov2: (F, F) symmetric PSD covariances.

    Returns:
      The squared distance, a Python float (units: squared feature units).

    Raises:
      ValueError: inconsistent shapes or non-finite entries.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    cov1, cov2 = np.atleast_2d(np.asarray(cov1, np.float64)), np.atleast_2d(np.asarray(cov2, np.float64))
    f = mu1.shape[0]
    if mu1.shape != (f,) or mu2.shape != (f,) or cov1.shape != (f, f) or cov2.shape != (f, f):
        raise ValueError(
            f"shape mismatch: mu1 {mu1.shape}, mu2 {mu2.shape}, cov1 {cov1.shape}, cov2 {cov2.shape}; "
            f"expected (F,), (F,), (F, F), (F, F)"
        )
    for name, a in (("mu1", mu1), ("mu2", mu2), ("cov1", cov1), ("cov2", cov2)):
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{name} contains NaN or inf")
    cov1 = 0.5 * (cov1 + cov1.T)
    cov2 = 0.5 * (cov2 + cov2.T)
    s1 = _psd_sqrt(cov1)
    m = s1 @ cov2 @ s1
    m = 0.5 * (m + m.T)
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(m), 0.0, None)).sum()
    diff = mu1 - mu2
    fd = diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * tr_covmean
    return float(max(fd, 0.0))


def fd_from_features(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Frechet distance between Gaussian fits of two feature sets.

    Args:
      feats_a: (N, F) features of set A (N >= 2).
      feats_b: (M, F) features of set B (M >= 2), same F.

    Returns:
      Squared Frechet distance (float), see :func:`frechet_distance`.
    """
    feats_a = _check_features("feats_a", feats_a)
    feats_b = _check_features("feats_b", feats_b)
    if feats_a.shape[1] != feats_b.shape[1]:
        raise ValueError(f"feature dims differ: {feats_a.shape[1]} vs {feats_b.shape[1]}")
    return frechet_distance(*gaussian_stats(feats_a), *gaussian_stats(feats_b))


# --------------------------------------------------------------------------- #
# Kernel Inception Distance
# --------------------------------------------------------------------------- #


def _polynomial_mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3 between equal-size samples (m, d)."""
    m, d = x.shape
    k_xx = (x @ x.T / d + 1.0) ** 3
    k_yy = (y @ y.T / d + 1.0) ** 3
    k_xy = (x @ y.T / d + 1.0) ** 3
    sum_xx = k_xx.sum() - np.trace(k_xx)
    sum_yy = k_yy.sum() - np.trace(k_yy)
    return float((sum_xx + sum_yy) / (m * (m - 1)) - 2.0 * k_xy.sum() / (m * m))


def kernel_inception_distance(
    feats_a: np.ndarray,
    feats_b: np.ndarray,
    num_subsets: int = 100,
    subset_size: int = 1000,
    rng: np.random.Generator | int | None = 0,
) -> tuple[float, float]:
    """Kernel (Inception) Distance: unbiased polynomial-kernel MMD^2 over subsets.

    Binkowski et al. 2018: k(x, y) = (x.y / d + 1)^3 with d the feature
    dimension; the unbiased MMD^2 estimator (diagonal of the within-set Gram
    matrices excluded, cross term over all m^2 pairs) is averaged over
    ``num_subsets`` random subsets, each drawn without replacement from each
    set. As in the authors' code, ``subset_size`` is clamped to
    ``min(N, M)``. Computed in float64. Unbiased, so it can be slightly
    negative when the two sets come from one distribution.

    Args:
      feats_a: (N, d) features.
      feats_b: (M, d) features.
      num_subsets: number of subset pairs to average over (>= 1).
      subset_size: subset size m (>= 2, clamped to min(N, M)).
      rng: ``numpy.random.Generator``, or a seed for ``default_rng``.

    Returns:
      ``(mean, std)`` of MMD^2 over the subsets (std with ddof=0; 0 for one
      subset), in squared kernel units.

    Raises:
      ValueError: bad shapes, sizes or non-finite features.
    """
    feats_a = _check_features("feats_a", feats_a).astype(np.float64)
    feats_b = _check_features("feats_b", feats_b).astype(np.float64)
    if feats_a.shape[1] != feats_b.shape[1]:
        raise ValueError(f"feature dims differ: {feats_a.shape[1]} vs {feats_b.shape[1]}")
    if num_subsets < 1:
        raise ValueError(f"num_subsets must be >= 1; got {num_subsets}")
    if subset_size < 2:
        raise ValueError(f"subset_size must be >= 2; got {subset_size}")
    m = min(subset_size, feats_a.shape[0], feats_b.shape[0])
    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    values = np.empty(num_subsets, np.float64)
    for i in range(num_subsets):
        xa = feats_a[gen.choice(feats_a.shape[0], m, replace=False)]
        xb = feats_b[gen.choice(feats_b.shape[0], m, replace=False)]
        values[i] = _polynomial_mmd2_unbiased(xa, xb)
    return float(values.mean()), float(values.std())


# --------------------------------------------------------------------------- #
# Density and coverage
# --------------------------------------------------------------------------- #


def _sq_dists(a: np.ndarray, b: np.ndarray, b_sq: np.ndarray) -> np.ndarray:
    """(n, m) squared Euclidean distances, clipped at 0; ``b_sq`` = row norms^2 of b."""
    d2 = (a * a).sum(axis=1, keepdims=True) + b_sq[None, :] - 2.0 * (a @ b.T)
    return np.maximum(d2, 0.0, out=d2)


def knn_radii_sq(features: np.ndarray, k: int, chunk_size: int = 1024) -> np.ndarray:
    """Squared distance from each row to its k-th nearest other row.

    Self-distances are excluded (set to +inf), so a duplicate row counts as a
    neighbour at distance 0, as in Naeem et al. 2020's reference code.
    Memory O(chunk_size * N).

    Args:
      features: (N, F) float array (computation in its dtype).
      k: neighbour rank, 1 <= k < N.
      chunk_size: rows per block of the pairwise-distance computation.

    Returns:
      (N,) squared radii, same dtype as ``features``.
    """
    n = features.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"k must satisfy 1 <= k < N = {n}; got {k}")
    sq = (features * features).sum(axis=1)
    radii = np.empty(n, features.dtype)
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        d2 = _sq_dists(features[start:stop], features, sq)
        d2[np.arange(stop - start), np.arange(start, stop)] = np.inf
        radii[start:stop] = np.partition(d2, k - 1, axis=1)[:, k - 1]
    return radii


def density_coverage(
    real_feats: np.ndarray,
    fake_feats: np.ndarray,
    k: int = 5,
    chunk_size: int = 1024,
    dtype: np.dtype | type = np.float32,
) -> tuple[float, float]:
    """Density and coverage of generated samples (Naeem et al. 2020).

    With B(r_i, R_i) the ball around real sample r_i whose radius R_i is the
    distance to its k-th nearest real neighbour (excluding itself):

    * density  = 1 / (k M) * sum_j sum_i 1[f_j in B(r_i, R_i)]
    * coverage = 1 / N * sum_i 1[exists j: f_j in B(r_i, R_i)]

    Membership is strict (d < R_i), as in the reference implementation. When
    real and fake come from one distribution, E[density] = 1 and E[coverage]
    = 1 - prod_{i=1..k} (N - i) / (N + M - i), i.e. ~1 - 2^-k (0.969 for k = 5)
    when M = N is large.

    Pairwise distances are computed in row blocks of ``chunk_size``, so no
    (N, N) or (M, N) matrix is ever held: memory is O(chunk_size * N). The
    features are centred on the real mean (in float64) before the cast to
    ``dtype``, which reduces cancellation in ||a||^2 + ||b||^2 - 2 a.b.

    Args:
      real_feats: (N, F) real features.
      fake_feats: (M, F) generated features.
      k: nearest-neighbour rank for the radii (Naeem et al. use 5).
      chunk_size: rows per distance block (>= 1).
      dtype: float dtype of the distance computation (float32 is ~2x faster;
        float64 for exactness).

    Returns:
      ``(density, coverage)`` floats; density is unbounded above, coverage in [0, 1].

    Raises:
      ValueError: bad shapes, k or chunk size, or non-finite features.
    """
    real = _check_features("real_feats", real_feats)
    fake = _check_features("fake_feats", fake_feats, min_rows=1)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature dims differ: {real.shape[1]} vs {fake.shape[1]}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1; got {chunk_size}")
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"dtype must be float32 or float64; got {dtype}")
    center = real.mean(axis=0, dtype=np.float64)
    real = (real - center).astype(dtype)
    fake = (fake - center).astype(dtype)

    radii_sq = knn_radii_sq(real, k, chunk_size)
    real_sq = (real * real).sum(axis=1)
    inside_count = 0
    covered = np.zeros(real.shape[0], bool)
    for start in range(0, fake.shape[0], chunk_size):
        inside = _sq_dists(fake[start : start + chunk_size], real, real_sq) < radii_sq[None, :]
        inside_count += int(inside.sum())
        covered |= inside.any(axis=0)
    density = inside_count / (k * fake.shape[0])
    coverage = float(covered.mean())
    return float(density), coverage


# --------------------------------------------------------------------------- #
# Importance-weighted likelihood
# --------------------------------------------------------------------------- #


