"""The discretised Gaussian's per-pixel log mass and its hand-written gradient against
float64 references (scipy), in the bulk, in the far tails and at the edge bins."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from lpc_jax.model import likelihoods


def _reference(x, mean, scale):
    """float64 log mass of each pixel's bin and d/d mean, d/d log_scale (analytic)."""
    x, mean, scale = (np.asarray(v, np.float64) for v in (x, mean, scale))
    a = np.where(x < -1 + 1e-3, -np.inf, (x - 1 / 255 - mean) / scale)
    b = np.where(x > 1 - 1e-3, np.inf, (x + 1 / 255 - mean) / scale)
    flip = a > 0  # mirrored: both CDFs in the lower tail, as scipy needs for accuracy too
    lo, hi = np.where(flip, -b, a), np.where(flip, -a, b)
    log_hi = special.log_ndtr(hi)
    log_p = log_hi + np.log(-np.expm1(special.log_ndtr(lo) - log_hi))
    with np.errstate(invalid="ignore", over="ignore"):
        ratio = lambda u: np.where(np.isinf(u), 0.0, np.exp(-0.5 * u * u - 0.5 * np.log(2 * np.pi) - log_p))
        d_a, d_b = -ratio(a), ratio(b)
        fa, fb = np.where(np.isinf(a), 0.0, a), np.where(np.isinf(b), 0.0, b)
    return log_p, -(d_a + d_b) / scale, -(fa * d_a + fb * d_b)


def _pixels_means(scale, seed=0, n=4096):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, n) / 127.5 - 1.0
    x[:64], x[64:128] = -1.0, 1.0  # edge bins, with means on both sides below
    offset = rng.normal(size=n) * rng.choice([0.3, 3.0, 40.0], size=n) * scale
    return x.astype(np.float32), (x + offset).astype(np.float32)


def _ours(x, mean, scale):
    """Per-pixel log mass and gradients: each pixel gets its own (B, 1, 1, 1) log_scale."""
    log_scale = jnp.full((x.size, 1, 1, 1), np.log(scale), jnp.float32)
    f = lambda m, ls: likelihoods.discretized_gaussian_log_prob(jnp.asarray(x).reshape(-1, 1, 1, 1), m, ls)
    m = jnp.asarray(mean).reshape(-1, 1, 1, 1)
    d_mean, d_scale = jax.grad(lambda m, ls: f(m, ls).sum(), argnums=(0, 1))(m, log_scale)
    return np.asarray(f(m, log_scale)), np.asarray(d_mean).reshape(-1), np.asarray(d_scale).reshape(-1)


@pytest.mark.parametrize("scale", [1e-3, 0.02, 0.1, 0.5])
def test_log_mass_and_gradients_match_float64_including_tails_and_edges(scale):
    x, mean = _pixels_means(scale)
    log_p, d_mean, d_scale = _ours(x, mean, scale)
    want_p, want_mean, want_scale = _reference(x, mean, scale)
    assert np.all(np.isfinite(log_p)) and np.all(np.isfinite(d_mean)) and np.all(np.isfinite(d_scale))
    assert log_p.min() < -500  # the far tail is exercised (a naive log(cdf - cdf) is -inf there)
    np.testing.assert_allclose(log_p, want_p, rtol=2e-5, atol=2e-4)
    # Narrow bins lose digits to cancellation in Phi(b) - Phi(a), here as in any
    # float32 form: compare against the largest gradient of the set.
    np.testing.assert_allclose(d_mean, want_mean, rtol=1e-4, atol=1e-4 * np.abs(want_mean).max())
    np.testing.assert_allclose(d_scale, want_scale, rtol=1e-4, atol=1e-4 * np.abs(want_scale).max())


def test_edge_bins_take_the_tails():
    x = np.array([-1.0, -1.0, 1.0, 1.0], np.float32)
    mean = np.array([-3.0, 0.5, 3.0, -0.5], np.float32)
    log_p, d_mean, _ = _ours(x, mean, 0.1)
    want_p, want_mean, _ = _reference(x, mean, 0.1)
    np.testing.assert_allclose(log_p, want_p, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(log_p[[0, 2]], 0.0, atol=1e-6)  # the whole tail mass, log 1
    np.testing.assert_allclose(d_mean, want_mean, rtol=1e-5, atol=1e-6)


def test_gradients_equal_autodiff_of_the_log_ndtr_form_in_the_bulk():
    """Within 8 sigma (where autodiff through jax.scipy.special.log_ndtr is accurate)
    the hand-written gradient equals it to float32 tolerance."""
    from jax.scipy.special import log_ndtr

    def autodiff_form(x, mean, log_scale):
        inv = jnp.exp(-log_scale)
        a = jnp.where(x < -1 + 1 / 255, -30.0, (x - 1 / 255 - mean) * inv)
        b = jnp.where(x > 1 - 1 / 255, 30.0, (x + 1 / 255 - mean) * inv)
        flip = a > 0
        lo, hi = jnp.where(flip, -b, a), jnp.where(flip, -a, b)
        return (log_ndtr(hi) + jnp.log(-jnp.expm1(log_ndtr(lo) - log_ndtr(hi)))).sum()

    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.integers(0, 256, (8, 6, 6, 3)) / 127.5 - 1.0, jnp.float32)
    mean = x + jnp.asarray(rng.uniform(-8, 8, x.shape) * 0.1, jnp.float32)
    log_scale = jnp.log(jnp.asarray([0.1, 0.12, 0.08], jnp.float32)).reshape(1, 1, 1, 3)
    ours = jax.grad(lambda m, ls: likelihoods.discretized_gaussian_log_prob(x, m, ls).sum(), argnums=(0, 1))
    want = jax.grad(lambda m, ls: autodiff_form(x, m, ls), argnums=(0, 1))(mean, log_scale)
    got = ours(mean, log_scale)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5 * float(jnp.abs(want[0]).max()))
    np.testing.assert_allclose(got[1], want[1], rtol=1e-5)
    assert got[1].shape == (1, 1, 1, 3)


def _previous_formulation(x, mean, log_scale):
    """The formulation this module used before (log Phi of both mirrored bin ends, log(1 - r)
    with r = Phi(lo) / Phi(hi), hand-written hazards), compactly, float32: per-pixel log mass,
    d/d mean, and the per-pixel d/d log_scale (summed by the caller)."""
    def log_ndtr_and_hazard(u):
        t = 0.5 * jax.lax.erfc(jnp.abs(u) * np.float32(np.sqrt(0.5)))
        us = jnp.minimum(u, -10.0)
        ix = 1.0 / (us * us)
        series = (1.0 - ix * (1.0 - ix * (3.0 - 15.0 * ix))) / -us
        tail, cdf = u < -10.0, jnp.where(u < 0, t, 1.0 - t)
        log_cdf = jnp.log(jnp.where(tail, series, cdf)) + jnp.where(tail, -0.5 * us * us - 0.5 * np.log(2 * np.pi), 0.0)
        return log_cdf, jnp.where(tail, 1.0 / series, jnp.exp(-0.5 * u * u - 0.5 * np.log(2 * np.pi)) / cdf)

    inv = jnp.exp(-log_scale)
    a0, b0 = (x - 1 / 255 - mean) * inv, (x + 1 / 255 - mean) * inv
    a, b = jnp.where(x < -1 + 1 / 255, -jnp.inf, a0), jnp.where(x > 1 - 1 / 255, jnp.inf, b0)
    flip = a > 0
    log_lo, haz_lo = log_ndtr_and_hazard(jnp.where(flip, -b, a))
    log_hi, haz_hi = log_ndtr_and_hazard(jnp.where(flip, -a, b))
    log_r = jnp.minimum(log_lo - log_hi, -1e-30)
    r = jnp.exp(log_r)
    d_hi, d_lo = haz_hi / (1.0 - r), jnp.where(r > 0, -haz_lo * r / (1.0 - r), 0.0)
    d_a, d_b = jnp.where(flip, -d_hi, d_lo), jnp.where(flip, -d_lo, d_hi)
    return log_hi + jnp.log(-jnp.expm1(log_r)), -(d_a + d_b) * inv, -(a0 * d_a + b0 * d_b)


@pytest.mark.parametrize("shape", [(4, 16, 16, 3), (4, 28, 28, 1)])
def test_agrees_with_the_previous_formulation(shape):
    """Values, d/d mean and d/d log_scale against the previous formulation, on random
    pixels (edge bins included) and means from the bulk out to ~1000 sigma (far tails on
    both sides). Not bitwise: log P is now formed from upper-tail masses in linear space
    (the previous form subtracted two log CDFs), so the two differ by float32 rounding:
    log P to 2e-5 relative + 2e-6 absolute per pixel (the absolute part where P ~ 1),
    gradients to 1e-4 of the largest in the set (as the float64 comparison above)."""
    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, shape) / 127.5 - 1.0
    x.reshape(-1)[:40], x.reshape(-1)[40:80] = -1.0, 1.0
    scale = np.array([0.01, 0.1, 0.5])[: shape[-1]]
    spread = rng.choice([0.3, 3.0, 12.0, 1000.0], size=shape) * scale
    mean = (x + rng.normal(size=shape) * spread).astype(np.float32)
    x, log_scale = x.astype(np.float32), np.log(scale).astype(np.float32).reshape(1, 1, 1, -1)

    f = lambda m, ls: likelihoods.discretized_gaussian_log_prob(x, m, ls)
    value, (d_mean, d_log_scale) = jax.value_and_grad(lambda m, ls: f(m, ls).sum(), argnums=(0, 1))(mean, log_scale)
    old_p, old_mean, old_scale = _previous_formulation(jnp.asarray(x), jnp.asarray(mean), jnp.asarray(log_scale))
    per_pixel = jax.vmap(lambda xi, mi: likelihoods.discretized_gaussian_log_prob(
        xi.reshape(-1, 1, 1, 1), mi.reshape(-1, 1, 1, 1), jnp.broadcast_to(log_scale[0], shape[1:]).reshape(-1, 1, 1, 1)))(
        x.reshape(shape[0], -1), mean.reshape(shape[0], -1))

    assert float(old_p.min()) < -1000 and np.all(np.isfinite(per_pixel))  # far tails are in the set
    np.testing.assert_allclose(per_pixel, np.asarray(old_p).reshape(shape[0], -1), rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(f(mean, log_scale), np.asarray(old_p).reshape(shape[0], -1).sum(-1), rtol=1e-5)
    np.testing.assert_allclose(value, float(np.asarray(old_p, np.float64).sum()), rtol=1e-5)
    np.testing.assert_allclose(d_mean, old_mean, rtol=1e-4, atol=1e-4 * float(jnp.abs(old_mean).max()))
    want_scale = np.asarray(old_scale, np.float64).sum((0, 1, 2), keepdims=True)
    np.testing.assert_allclose(d_log_scale, want_scale, rtol=1e-4, atol=1e-4 * np.abs(np.asarray(old_scale)).sum())
