"""Observation likelihoods and the latent prior, as pure log-density functions.

Every function returns log densities in nats, summed over all but the batch
axis: inputs ``(B, ...)`` give an output of shape ``(B,)``, float32.

Pixels are 8-bit values scaled to [-1, 1] (pixel k -> 2k/255 - 1), so
neighbouring pixel values are 2/255 apart and each bin has half-width 1/255.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

_HALF_BIN = 1.0 / 255.0
# float32(log(2 pi)) as a literal: jnp at import time would start the XLA backend before
# jax.distributed.initialize could run (lpc_jax/runtime/distributed.py).
_LOG_2PI = 1.8378770351409912
_SQRT_HALF = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327
_TAIL = -10.0  # below this the upper bin end's CDF is rescaled by exp(hi^2 / 2) (as log_ndtr's series cut)
_TINY = 1.1754944e-38  # smallest normal float32

# float32 erfc as Cephes' erfcf (and XLA's float32 erfc, from which these are copied):
# erfc(z) = 1 - z E(z^2) for z < 1, exp(-z^2) / z * P(1 / z^2) for 1 <= z < 2, ... R(1 / z^2) from 2.
_ERF_E = (7.85386146e-05, -0.000801019371, 0.00518832775, -0.0268538129, 0.112835854, -0.37612626, 1.12837911)
_ERFC_P = (0.0232682, -0.138703942, 0.368742466, -0.582473278, 0.621000469, -0.494451523, 0.340488,
           -0.274112701, 0.563825965)
_ERFC_R = (-10.477664, 12.9772, -7.49551868, 2.92101908, -1.01526523, 0.42184633, -0.282076746, 0.564189494)


def _sum_event(x: Array) -> Array:
    return x.reshape(x.shape[0], -1).sum(-1)


def _horner(coefs: tuple[float, ...], t: Array) -> Array:
    p = coefs[0]
    for c in coefs[1:]:
        p = p * t + c
    return p


def _tail_and_half(v: Array, e: Array) -> tuple[Array, Array]:
    """``(T, H)`` for ``v = |u| >= 0`` given ``e = exp(-u^2 / 2) k``: ``T = Phi(-v) k`` and
    ``H = 1/2 - T`` (used only where k = 1).

    ``Phi(-v) = erfc(v / sqrt 2) / 2`` with erfc as float32 Cephes/XLA evaluates it, except
    that the ``exp(-z^2)`` of its tail branches is the caller's ``e``, the Gaussian density
    (times sqrt(2 pi)) the gradient needs anyway: one ``exp`` per bin end serves both, and a
    rescaled ``e`` (factor ``k``) keeps ``T`` representable far below the float32 range.
    Below z = 1, ``H = erf(z) / 2`` is the polynomial itself (no cancellation near the mean).
    """
    z = v * _SQRT_HALF
    half_erf = 0.5 * z * _horner(_ERF_E, z * z)
    r = 1.0 / v
    y = 2.0 * r * r  # 1 / z^2
    big = (e * r * _SQRT_HALF) * jnp.where(z < 2.0, _horner(_ERFC_P, y), _horner(_ERFC_R, y))
    small = z < 1.0
    return jnp.where(small, 0.5 - half_erf, big), jnp.where(small, half_erf, 0.5 - big)


def _log_mass_and_grads(x: Array, mean: Array, inv_scale: Array, grads: bool = True):
    """Per-pixel log mass of its bin and, with ``grads``, d log P / d mean and d log P / d log_scale.

    Works on flattened (B, N) views (``inv_scale`` (1 or B, N)): XLA:CPU then vectorises
    along N rather than along a channel axis of 3 or 1. With the standardised ends
    a = (x - 1/255 - mean) / sigma, b = (x + 1/255 - mean) / sigma (a = -inf at x = -1,
    b = +inf at x = 1), P = Phi(b) - Phi(a) is formed from upper-tail masses T = Phi(-|u|)
    only: T_a - T_b above the mean (a > 0), T_b - T_a below it (b < 0), H_a + H_b across it.
    When even the upper end of the mirrored bin lies below -10 (hi = b, or -a when a > 0),
    both ends are rescaled by exp(hi^2 / 2) (through e = exp(-(u - hi)(u + hi) / 2)) and
    log P gets the -hi^2 / 2 back, so saturated pixels far from the mean stay finite.
    d log P / d a = -N(a) / P, d log P / d b = N(b) / P, with N / P = e / (sqrt(2 pi) q).
    """
    a0 = (x - _HALF_BIN - mean) * inv_scale
    b0 = (x + _HALF_BIN - mean) * inv_scale
    a = jnp.where(x < -1.0 + _HALF_BIN, -jnp.inf, a0)
    b = jnp.where(x > 1.0 - _HALF_BIN, jnp.inf, b0)
    above = a > 0
    hi = jnp.where(above, -a, b)
    c = jnp.where(hi < _TAIL, hi, 0.0)
    e_a = jnp.exp(-0.5 * (a - c) * (a + c))
    e_b = jnp.exp(-0.5 * (b - c) * (b + c))
    t_a, h_a = _tail_and_half(jnp.abs(a), e_a)
    t_b, h_b = _tail_and_half(jnp.abs(b), e_b)
    q = jnp.where(above, t_a - t_b, jnp.where(b < 0, t_b - t_a, h_a + h_b))  # P exp(c^2 / 2)
    inv_q = 1.0 / jnp.maximum(q, _TINY)
    # log P from 1 / q (one rounding): q is then formed once; the where()s on isnan are
    # no-ops that end the fusions feeding the sums (XLA:CPU otherwise pulls their
    # elementwise producers into the reduction and materialises every operand).
    log_p = jnp.where(jnp.isnan(inv_q), inv_q, -jnp.log(inv_q) - 0.5 * c * c)
    if not grads:
        return log_p
    w = _INV_SQRT_2PI * inv_q
    d_mean = (e_a - e_b) * w * inv_scale
    d_log_scale = (a0 * e_a - b0 * e_b) * w
    return log_p, d_mean, jnp.where(jnp.isnan(w), w, d_log_scale)


def _flat(x: Array, mean: Array, log_scale: Array):
    """(B, N) views of ``x``, ``mean`` and ``exp(-log_scale)`` broadcast to (1 or B, N)."""
    ls = jnp.reshape(log_scale, (1,) * (x.ndim - jnp.ndim(log_scale)) + jnp.shape(log_scale))
    inv_scale = jnp.exp(-jnp.broadcast_to(ls, ls.shape[:1] + x.shape[1:])).reshape(ls.shape[0], -1)
    return x.reshape(x.shape[0], -1), mean.reshape(mean.shape[0], -1), inv_scale


def _log_scale_axes(shape: tuple[int, ...], ls_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Non-batch axes of ``shape`` along which ``log_scale`` is broadcast."""
    ls = (1,) * (len(shape) - len(ls_shape)) + tuple(ls_shape)
    return tuple(i for i in range(1, len(shape)) if ls[i] == 1 and shape[i] != 1)


@jax.custom_vjp
def _discretized_log_prob(x: Array, mean: Array, log_scale: Array) -> Array:
    """(B, ...) -> (B,) nats; ``x``, ``mean`` of one shape, ``log_scale`` broadcastable to it."""
    return _log_mass_and_grads(*_flat(x, mean, log_scale), grads=False).sum(-1)


def _discretized_log_prob_fwd(x, mean, log_scale):
    """The forward pass also forms the per-pixel d/d mean and the per-example sums of
    d/d log_scale: the backward pass only scales them by the (B,) cotangent."""
    log_p, d_mean, d_log_scale = _log_mass_and_grads(*_flat(x, mean, log_scale))
    ls_shape = jnp.shape(log_scale)
    d_log_scale = d_log_scale.reshape(x.shape).sum(_log_scale_axes(x.shape, ls_shape), keepdims=True)
    return log_p.sum(-1), (d_mean.reshape(x.shape), d_log_scale, ls_shape)


def _discretized_log_prob_bwd(res, g):
    d_mean, d_log_scale, ls_shape = res
    g = g.reshape((-1,) + (1,) * (d_mean.ndim - 1))
    d_mean = d_mean * g
    return -d_mean, d_mean, _unbroadcast(d_log_scale * g, ls_shape)


_discretized_log_prob.defvjp(_discretized_log_prob_fwd, _discretized_log_prob_bwd)


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
    its own bin's mass, from upper-tail normal masses (no cancellation of two CDFs
    near 1), rescaled in the far tail so saturated pixels far from the mean stay
    finite; the gradient is written by hand from the same values (d log P / d a, b are
    density / mass ratios) and formed in the forward pass (``_log_mass_and_grads``).

    Args:
      x: (B, H, W, C) pixels in [-1, 1] on the 8-bit grid.
      mean: (B, H, W, C) Gaussian means (any real value).
      log_scale: log standard deviation, broadcastable to ``x`` (e.g. (C,)).

    Returns:
      (B,) log p(x | mean, scale) in nats.
    """
    shape = jnp.broadcast_shapes(jnp.shape(x), jnp.shape(mean), jnp.shape(log_scale))
    x, mean = jnp.broadcast_to(x, shape), jnp.broadcast_to(mean, shape)
    return _discretized_log_prob(*_vary_alike(x, mean, log_scale))


def _vary_alike(*arrays: Array) -> tuple[Array, ...]:
    """Under ``shard_map``: every array marked as varying over each mesh axis any of them varies over.

    A custom VJP's backward pass must give each cotangent its primal's type; a
    replicated ``log_scale`` beside a sharded batch would get a per-shard cotangent.
    With the explicit ``pcast`` the cotangent's sum over the shards is its transpose,
    taken only where a caller differentiates w.r.t. the replicated value. Outside
    ``shard_map`` nothing varies and the arrays are returned as they are.
    """
    varying = [jax.typeof(a).manual_axis_type.varying for a in arrays]
    axes = frozenset().union(*varying)
    return tuple(a if v == axes else jax.lax.pcast(a, tuple(sorted(axes - v)), to="varying")
                 for a, v in zip(arrays, varying))


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
