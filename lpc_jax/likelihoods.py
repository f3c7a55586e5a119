"""Observation likelihoods and the latent prior, as pure log-density functions.

Every function returns log densities in nats, summed over all but the batch
axis: inputs ``(B, ...)`` give an output of shape ``(B,)``, float32.

Pixels are 8-bit values scaled to [-1, 1] (pixel k -> 2k/255 - 1), so
neighbouring pixel values are 2/255 apart and each bin has half-width 1/255.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array

_HALF_BIN = 1.0 / 255.0
# float32(log(2 pi)) as a literal: jnp at import time would start the XLA backend before
# jax.distributed.initialize could run (lpc_jax/distributed.py).
_LOG_2PI = 1.8378770351409912
_SQRT_HALF = 0.7071067811865476
_LOG_SQRT_2PI = 0.5 * _LOG_2PI
_LOG_NDTR_LOWER = -10.0  # as jax.scipy.special.log_ndtr for float32


def _sum_event(x: Array) -> Array:
    return x.reshape(x.shape[0], -1).sum(-1)


def _log_ndtr_and_hazard(x: Array) -> tuple[Array, Array]:
    """``(log Phi(x), N(x) / Phi(x))``, float32: one ``erfc``, one ``log``, one ``exp``.

    From x = -10 up, Phi(x) = erfc(-x / sqrt 2) / 2 directly (for x > 0 from
    t = Phi(-x) as 1 - t, whose log is then accurate to float32 rounding in
    absolute terms, as in ``jax.scipy.special.log_ndtr``). Below -10, where ``erfc``
    loses precision and then underflows, ``log_ndtr``'s order-3 asymptotic series
    Phi(x) = N(x) / (-x) * (1 - x^-2 + 3 x^-4 - 15 x^-6) takes over; it gives the
    hazard N / Phi = -x / series without subtracting two large logs.
    """
    t = 0.5 * lax.erfc(jnp.abs(x) * _SQRT_HALF)  # Phi(-|x|)
    xs = jnp.minimum(x, _LOG_NDTR_LOWER)
    inv_x2 = 1.0 / (xs * xs)
    series_over_x = (1.0 - inv_x2 * (1.0 - inv_x2 * (3.0 - 15.0 * inv_x2))) / -xs
    in_tail = x < _LOG_NDTR_LOWER
    cdf = jnp.where(x < 0, t, 1.0 - t)
    log_cdf = jnp.log(jnp.where(in_tail, series_over_x, cdf)) + jnp.where(in_tail, -0.5 * xs * xs - _LOG_SQRT_2PI, 0.0)
    hazard = jnp.where(in_tail, 1.0 / series_over_x, jnp.exp(-0.5 * x * x - _LOG_SQRT_2PI) / cdf)
    return log_cdf, hazard


def _bin_edges(x: Array, mean: Array, log_scale: Array):
    """Standardised bin edges ``(a, b)``, ``a = (x - 1/255 - mean) / sigma``, ``b`` likewise
    with ``+ 1/255``; the edge bins (x = -1, x = 1) get a = -inf, b = +inf."""
    inv_scale = jnp.exp(-log_scale)
    a = (x - _HALF_BIN - mean) * inv_scale
    b = (x + _HALF_BIN - mean) * inv_scale
    return jnp.where(x < -1.0 + _HALF_BIN, -jnp.inf, a), jnp.where(x > 1.0 - _HALF_BIN, jnp.inf, b)


def _log_mass_parts(x: Array, mean: Array, log_scale: Array):
    """Per-pixel log mass of its bin and what its derivative needs.

    A bin above the mean (a > 0) is mirrored, Phi(b) - Phi(a) = Phi(-a) - Phi(-b),
    so that P = Phi(hi) - Phi(lo) with both terms lower-tail CDFs (lo <= 0), and
    log P = log Phi(hi) + log(1 - r), r = Phi(lo) / Phi(hi) = exp(log Phi(lo) - log Phi(hi)).
    Returns ``(log_p, (flip, r, hazard_lo, hazard_hi))``, all (B, H, W, C).
    """
    a, b = _bin_edges(x, mean, log_scale)
    flip = a > 0
    log_lo, hazard_lo = _log_ndtr_and_hazard(jnp.where(flip, -b, a))
    log_hi, hazard_hi = _log_ndtr_and_hazard(jnp.where(flip, -a, b))
    log_r = jnp.minimum(log_lo - log_hi, -1e-30)
    return log_hi + jnp.log(-jnp.expm1(log_r)), (flip, jnp.exp(log_r), hazard_lo, hazard_hi)


@jax.custom_vjp
def _discretized_log_mass(x: Array, mean: Array, log_scale: Array) -> Array:
    """Per-pixel log mass of its bin, (B, H, W, C) -> (B, H, W, C) nats."""
    return _log_mass_parts(x, mean, log_scale)[0]


def _discretized_log_mass_fwd(x, mean, log_scale):
    log_p, parts = _log_mass_parts(x, mean, log_scale)
    return log_p, (x, mean, log_scale, parts)


def _discretized_log_mass_bwd(res, g):
    """d log P / d hi = hazard(hi) / (1 - r), d log P / d lo = -hazard(lo) r / (1 - r);
    an infinite end (edge bin) has r = 0 or hazard 0 and contributes nothing. mean and
    log_scale enter through a, b = (x -+ 1/255 - mean) exp(-log_scale)."""
    x, mean, log_scale, (flip, r, hazard_lo, hazard_hi) = res
    d_hi = hazard_hi / (1.0 - r) * g
    d_lo = jnp.where(r > 0, -hazard_lo * r / (1.0 - r), 0.0) * g
    d_a, d_b = jnp.where(flip, -d_hi, d_lo), jnp.where(flip, -d_lo, d_hi)
    inv_scale = jnp.exp(-log_scale)
    d_x = (d_a + d_b) * inv_scale
    # d a / d log_scale = -a; with the finite a, b (d_a = 0 where a is the -inf end).
    d_scale = -((x - _HALF_BIN - mean) * d_a + (x + _HALF_BIN - mean) * d_b) * inv_scale
    return d_x, _unbroadcast(-d_x, jnp.shape(mean)), _unbroadcast(d_scale, jnp.shape(log_scale))


_discretized_log_mass.defvjp(_discretized_log_mass_fwd, _discretized_log_mass_bwd)


def _unbroadcast(g: Array, shape: tuple[int, ...]) -> Array:
    """Sums a cotangent of the broadcast shape down to an operand's ``shape``."""
    lead = g.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(lead + i for i, n in enumerate(shape) if n == 1 and g.shape[lead + i] != 1)
    return g.sum(axes, keepdims=True).reshape(shape) if axes else g


def discretized_gaussian_log_prob(x: Array, mean: Array, log_scale: Array) -> Array:
    """Log-probability of 8-bit pixels under a discretised Gaussian (SPEC section 2).

    Each pixel value x in {-1, -1 + 2/255, ..., 1} gets the Gaussian mass of its
    bin [x - 1/255, x + 1/255]; the edge bins take the tails (x = -1 gets
    (-inf, -1 + 1/255], x = 1 gets [1 - 1/255, inf)). Each pixel evaluates only
    its own bin's mass, as a difference of two lower-tail normal CDFs in log space,
    so saturated pixels far from the mean stay finite; the gradient is written by
    hand from the same values (d log P / d a, b are density / mass ratios).

    Args:
      x: (B, H, W, C) pixels in [-1, 1] on the 8-bit grid.
      mean: (B, H, W, C) Gaussian means (any real value).
      log_scale: log standard deviation, broadcastable to ``x`` (e.g. (C,)).

    Returns:
      (B,) log p(x | mean, scale) in nats.
    """
    shape = jnp.broadcast_shapes(jnp.shape(x), jnp.shape(mean), jnp.shape(log_scale))
    x, mean = jnp.broadcast_to(x, shape), jnp.broadcast_to(mean, shape)
    return _sum_event(_discretized_log_mass(x, mean, log_scale))


def gaussian_log_prob(x: Array, mean: Array, log_scale: Array) -> Array:
    """Continuous Gaussian log-density, (B, ...) -> (B,) nats (a density, not a mass)."""
    z = (x - mean) * jnp.exp(-log_scale)
    return _sum_event(-0.5 * z * z - log_scale - 0.5 * _LOG_2PI)


def bernoulli_log_prob(x: Array, logits: Array) -> Array:
    """Bernoulli log-mass of binarised pixels; ``x`` in [-1, 1] is thresholded at 0.

    Args:
      x: (B, ...) pixels in [-1, 1]; a pixel counts as on when x > 0.
      logits: (B, ...) Bernoulli logits.

    Returns:
      (B,) nats.
    """
    on = (x > 0).astype(logits.dtype)
    return _sum_event(on * jax.nn.log_sigmoid(logits) + (1 - on) * jax.nn.log_sigmoid(-logits))


def normal_prior_log_prob(z: Array, prior_scale: float | Array = 1.0) -> Array:
    """log N(z; 0, prior_scale^2 I), (B, D) -> (B,) nats."""
    return gaussian_log_prob(z, jnp.zeros_like(z), jnp.log(jnp.asarray(prior_scale, z.dtype)))


LIKELIHOODS = ("discretized_gaussian", "gaussian", "bernoulli")


def observation_log_prob(name: str, x: Array, decoder_out: Array, log_scale: Array) -> Array:
    """Dispatches on the likelihood ``name`` (one of ``LIKELIHOODS``).

    For ``bernoulli`` the decoder output is read as logits and ``log_scale`` is
    ignored. Raises ValueError on an unknown name.
    """
    if name == "discretized_gaussian":
        return discretized_gaussian_log_prob(x, decoder_out, log_scale)
    if name == "gaussian":
        return gaussian_log_prob(x, decoder_out, log_scale)
    if name == "bernoulli":
        return bernoulli_log_prob(x, decoder_out)
    raise ValueError(f"unknown likelihood {name!r}; choose one of {LIKELIHOODS}")
