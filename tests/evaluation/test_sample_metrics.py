"""Tests of lpc_jax.evaluation.sample_metrics: Frechet distance, KID, density/coverage, IWAE, bits/dim."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
import scipy.spatial.distance
import scipy.stats

from lpc_jax.evaluation import bounds, sample_metrics


def _gaussian(rng, n, dim, shift=0.0, scale=1.0):
    return rng.standard_normal((n, dim)) * scale + shift


# --------------------------------------------------------------------------- #
# Frechet distance
# --------------------------------------------------------------------------- #


def test_gaussian_stats_shapes_and_dtype():
    feats = np.random.default_rng(0).standard_normal((50, 4)).astype(np.float32)
    mean, cov = sample_metrics.gaussian_stats(feats)
    assert mean.shape == (4,) and cov.shape == (4, 4)
    assert mean.dtype == np.float64 and cov.dtype == np.float64
    np.testing.assert_allclose(cov, np.cov(feats.astype(np.float64), rowvar=False))


def test_fd_of_set_with_itself_is_zero():
    feats = np.random.default_rng(0).standard_normal((500, 32))
    assert sample_metrics.fd_from_features(feats, feats) == pytest.approx(0.0, abs=1e-8)


def test_fd_with_singular_covariance_is_finite_and_zero_for_itself():
    # Fewer samples than features: covariance is rank deficient.
    feats = np.random.default_rng(1).standard_normal((20, 64))
    fd = sample_metrics.fd_from_features(feats, feats)
    assert np.isfinite(fd) and fd == pytest.approx(0.0, abs=1e-6)


def test_fd_closed_form_diagonal_gaussians():
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.5])
    var1, var2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2)
    got = sample_metrics.frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2))
    assert got == pytest.approx(expected, rel=1e-12)


def test_fd_matches_sqrtm_formula_for_full_covariances():
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((6, 6)), rng.standard_normal((6, 6))
    cov1, cov2 = a @ a.T + 0.1 * np.eye(6), b @ b.T + 0.1 * np.eye(6)
    mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
    ref = (np.sum((mu1 - mu2) ** 2) + np.trace(cov1) + np.trace(cov2)
           - 2 * np.trace(scipy.linalg.sqrtm(cov1 @ cov2).real))
    assert sample_metrics.frechet_distance(mu1, cov1, mu2, cov2) == pytest.approx(ref, rel=1e-9)
    # Symmetric in its two arguments.
    assert sample_metrics.frechet_distance(mu2, cov2, mu1, cov1) == pytest.approx(ref, rel=1e-9)


def test_fd_small_for_same_distribution_and_monotone_in_shift_and_noise():
    rng = np.random.default_rng(3)
    dim = 16
    base = _gaussian(rng, 4000, dim)
    same = _gaussian(rng, 4000, dim)
    fd_same = sample_metrics.fd_from_features(base, same)
    assert fd_same < 0.1
    shifts = [sample_metrics.fd_from_features(base, same + s) for s in (0.1, 0.3, 1.0)]
    assert fd_same < shifts[0] < shifts[1] < shifts[2]
    assert shifts[2] == pytest.approx(dim * 1.0, rel=0.05)  # ||shift||^2 = 16
    noise = rng.standard_normal(same.shape)
    noisy = [sample_metrics.fd_from_features(base, same + s * noise) for s in (0.3, 0.6, 1.2)]
    assert fd_same < noisy[0] < noisy[1] < noisy[2]


def test_fd_rejects_bad_input():
    with pytest.raises(ValueError, match="feature dims differ"):
        sample_metrics.fd_from_features(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="NaN"):
        sample_metrics.fd_from_features(np.full((5, 3), np.nan), np.zeros((5, 3)))
    with pytest.raises(ValueError, match="shape"):
        sample_metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))


# --------------------------------------------------------------------------- #
# KID
# --------------------------------------------------------------------------- #


def test_kid_single_subset_matches_direct_unbiased_mmd():
    rng = np.random.default_rng(4)
    x, y = _gaussian(rng, 30, 5), _gaussian(rng, 30, 5, shift=0.5)
    k = lambda a, b: (a @ b.T / 5 + 1) ** 3  # noqa: E731
    m = 30
    direct = ((k(x, x).sum() - np.trace(k(x, x))) / (m * (m - 1))
              + (k(y, y).sum() - np.trace(k(y, y))) / (m * (m - 1)) - 2 * k(x, y).mean())
    mean, std = sample_metrics.kernel_inception_distance(x, y, num_subsets=1, subset_size=30)
    assert mean == pytest.approx(direct, rel=1e-10) and std == 0.0


def test_kid_near_zero_for_same_distribution_and_larger_for_different():
    rng = np.random.default_rng(5)
    dim = 32
    a, b = _gaussian(rng, 2000, dim), _gaussian(rng, 2000, dim)
    shifted = _gaussian(rng, 2000, dim, shift=0.3)
    wider = _gaussian(rng, 2000, dim, scale=1.5)
    same, same_std = sample_metrics.kernel_inception_distance(a, b, num_subsets=20, subset_size=500, rng=0)
    diff_mean, _ = sample_metrics.kernel_inception_distance(a, shifted, num_subsets=20, subset_size=500, rng=0)
    diff_scale, _ = sample_metrics.kernel_inception_distance(a, wider, num_subsets=20, subset_size=500, rng=0)
    assert abs(same) < 3 * same_std / math.sqrt(20) + 1e-3
    assert diff_mean > 20 * abs(same) and diff_scale > 20 * abs(same)


def test_kid_clamps_subset_size_and_is_seeded():
    rng = np.random.default_rng(6)
    a, b = _gaussian(rng, 40, 4), _gaussian(rng, 60, 4)
    r1 = sample_metrics.kernel_inception_distance(a, b, num_subsets=3, subset_size=1000, rng=7)
    r2 = sample_metrics.kernel_inception_distance(a, b, num_subsets=3, subset_size=1000, rng=7)
    assert r1 == r2 and np.isfinite(r1[0])


# --------------------------------------------------------------------------- #
# Density and coverage
# --------------------------------------------------------------------------- #


def _density_coverage_bruteforce(real, fake, k):
    d_rr = scipy.spatial.distance.cdist(real, real)
    np.fill_diagonal(d_rr, np.inf)
    radii = np.sort(d_rr, axis=1)[:, k - 1]
    inside = scipy.spatial.distance.cdist(fake, real) < radii[None, :]
    return inside.sum() / (k * fake.shape[0]), inside.any(axis=0).mean()


def test_density_coverage_match_bruteforce():
    rng = np.random.default_rng(7)
    real, fake = _gaussian(rng, 300, 6), _gaussian(rng, 250, 6, shift=0.2)
    expected = _density_coverage_bruteforce(real, fake, k=5)
    got = sample_metrics.density_coverage(real, fake, k=5, chunk_size=64, dtype=np.float64)
    assert got == pytest.approx(expected, abs=1e-12)


def test_density_coverage_chunked_equals_unchunked():
    rng = np.random.default_rng(8)
    real, fake = _gaussian(rng, 1500, 10), _gaussian(rng, 1200, 10)
    full = sample_metrics.density_coverage(real, fake, k=5, chunk_size=10_000, dtype=np.float64)
    chunked = sample_metrics.density_coverage(real, fake, k=5, chunk_size=37, dtype=np.float64)
    assert chunked == full
    f32 = sample_metrics.density_coverage(real, fake, k=5, chunk_size=37, dtype=np.float32)
    assert f32 == pytest.approx(full, abs=2e-3)


def test_knn_radii_exclude_self():
    pts = np.array([[0.0], [1.0], [3.0], [6.0]])
    np.testing.assert_allclose(sample_metrics.knn_radii_sq(pts, k=1), [1.0, 1.0, 4.0, 9.0])
    np.testing.assert_allclose(sample_metrics.knn_radii_sq(pts, k=2, chunk_size=3), [9.0, 4.0, 9.0, 25.0])


def test_density_and_coverage_expected_values_for_same_distribution():
    rng = np.random.default_rng(9)
    n = m = 4000
    k = 5
    real, fake = _gaussian(rng, n, 8), _gaussian(rng, m, 8)
    density, coverage = sample_metrics.density_coverage(real, fake, k=k, chunk_size=512)
    # Naeem et al. 2020: E[density] = 1; E[coverage] = 1 - prod_{i=1..k} (N - i) / (N + M - i)
    # (~ 1 - 2^-k = 0.969 for k = 5, M = N).
    expected_coverage = 1.0 - np.prod([(n - i) / (n + m - i) for i in range(1, k + 1)])
    assert expected_coverage == pytest.approx(1 - 0.5 ** k, abs=1e-3)
    assert density == pytest.approx(1.0, abs=0.05)
    assert coverage == pytest.approx(expected_coverage, abs=0.015)
    # Shifted fakes (mode shift) lose density and coverage.
    d_shift, c_shift = sample_metrics.density_coverage(real, fake + 1.0, k=k)
    assert d_shift < 0.8 * density and c_shift < 0.9 * coverage


def test_density_coverage_rejects_bad_k():
    with pytest.raises(ValueError, match="k must satisfy"):
        sample_metrics.density_coverage(np.zeros((5, 2)), np.zeros((5, 2)), k=5)


# --------------------------------------------------------------------------- #
# IWAE bound
# --------------------------------------------------------------------------- #

_D_Z, _D_X, _SIGMA = 3, 5, 0.5


def _linear_gaussian_model(seed=0, batch=256):
    """z ~ N(0, I), x | z ~ N(W z + b, sigma^2 I) with W^T W diagonal, so p(z | x) is diagonal."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((_D_X, _D_Z)))
    s = np.array([2.0, 1.0, 0.5])
    w = q * s  # columns orthogonal: W^T W = diag(s^2)
    b = rng.standard_normal(_D_X)
    z = rng.standard_normal((batch, _D_Z))
    x = z @ w.T + b + _SIGMA * rng.standard_normal((batch, _D_X))
    exact = scipy.stats.multivariate_normal(b, w @ w.T + _SIGMA**2 * np.eye(_D_X)).logpdf(x)
    post_var = 1.0 / (1.0 + s**2 / _SIGMA**2)
    post_mean = ((x - b) @ w / _SIGMA**2) * post_var
    post_var = np.broadcast_to(post_var, post_mean.shape)
    wj, bj, xj = jnp.asarray(w, jnp.float32), jnp.asarray(b, jnp.float32), jnp.asarray(x, jnp.float32)

    def log_joint(zz):  # (B, D_z) -> (B,)
        log_prior = -0.5 * jnp.sum(zz**2 + math.log(2 * math.pi), axis=-1)
        resid = (xj - zz @ wj.T - bj[None]) / _SIGMA
        log_lik = -0.5 * jnp.sum(resid**2 + math.log(2 * math.pi * _SIGMA**2), axis=-1)
        return log_prior + log_lik

    return log_joint, post_mean.astype(np.float32), post_var.astype(np.float32), exact


def test_iwae_exact_with_true_posterior():
    log_joint, mean, var, exact = _linear_gaussian_model(batch=64)
    ll = bounds.iwae_log_likelihood(jax.random.key(0), log_joint, mean, var, num_samples=50, chunk_size=16)
    assert ll.shape == (64,)
    # Every importance weight equals p(x), so the bound is exact for any K.
    np.testing.assert_allclose(np.asarray(ll), exact, atol=2e-4, rtol=1e-5)


def test_iwae_tightens_with_k_for_a_worse_proposal():
    log_joint, mean, var, exact = _linear_gaussian_model(batch=256)
    # Shifted and under-dispersed: heavy-tailed weights, so even K = 1000 leaves a gap.
    bad_mean, bad_var = mean + np.sqrt(var), var * 0.3
    values = []
    for k in (1, 30, 1000):  # each K compiles once; three keep the test fast
        ll = bounds.iwae_log_likelihood(jax.random.key(k), log_joint, bad_mean, bad_var,
                                         num_samples=k, chunk_size=250)
        values.append(float(jnp.mean(ll)))
    assert all(lo < hi for lo, hi in zip(values, values[1:])), values
    gaps = float(np.mean(exact)) - np.array(values)
    assert gaps[-1] > 0.2  # still a lower bound at K = 1000 (gap ~0.6 nats)
    assert gaps[0] > 1.0  # the proposal is genuinely worse


def test_iwae_independent_of_chunk_size_and_jittable():
    log_joint, mean, var, _ = _linear_gaussian_model(batch=8)
    key = jax.random.key(3)
    ll_a = bounds.iwae_log_likelihood(key, log_joint, mean + 0.3, var * 2, num_samples=100, chunk_size=100)
    # chunk_size=7 leaves a partial last chunk; also run it nested inside an outer jit.
    jitted = jax.jit(lambda k, m, v: bounds.iwae_log_likelihood(k, log_joint, m, v, num_samples=100, chunk_size=7))
    ll_b = jitted(key, mean + 0.3, var * 2)
    np.testing.assert_allclose(np.asarray(ll_a), np.asarray(ll_b), rtol=1e-5, atol=1e-5)


def test_iwae_rejects_bad_shapes():
    log_joint, mean, var, _ = _linear_gaussian_model(batch=4)
    with pytest.raises(ValueError, match=r"\(B, D\)"):
        bounds.iwae_log_likelihood(jax.random.key(0), log_joint, mean, var[:, :2])
    with pytest.raises(ValueError, match="log_joint_fn"):
        bounds.iwae_log_likelihood(jax.random.key(0), lambda z: z, mean, var, num_samples=2)


def test_bits_per_dim():
    num_dims = 28 * 28
    ll = jnp.array([-8.0 * num_dims * math.log(2.0), 0.0])
    np.testing.assert_allclose(np.asarray(bounds.bits_per_dim(ll, num_dims)), [8.0, 0.0], rtol=1e-6)
    with pytest.raises(ValueError):
        bounds.bits_per_dim(ll, 0)
