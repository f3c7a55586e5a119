"""Encoder (warm-start) objectives and the reparameterised ELBO (paper section 1.2).

All functions work on the encoder's outputs ``mean``, ``variance`` (B, D), so
the encoder runs forward once per train step and its VJP is applied once to
the summed cotangent of every objective.

* ``forward_kl`` (eq. 11): cross-entropy of the chain's samples under q,
  -(1/T) sum_t log q(z_t | x). It depends on the chain only through the first
  two moments of z_t, which the chain accumulates in constant memory;
  :func:`forward_kl_from_moments` rebuilds the exact average from them.
* ``reverse_kl`` (eq. 16): the negative reparameterised ELBO with the decoder
  held fixed, whose phi-gradient is the reverse-KL gradient.
* ``jeffreys`` (eq. 17, Algorithm 1): half of each.
* ``none``: no encoder objective; chains start from the prior.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array

WARM_STARTS = ("none", "forward_kl", "reverse_kl", "jeffreys")
_LOG_2PI = math.log(2.0 * math.pi)


class ObjectiveWeights(NamedTuple):
    forward_kl: float
    reverse_kl: float


def weights(warm_start: str) -> ObjectiveWeights:
    """Weights of the forward and reverse KL gradients for ``warm_start``.

    Raises:
      ValueError: ``warm_start`` is not one of ``WARM_STARTS``.
    """
    table = {
        "none": ObjectiveWeights(0.0, 0.0),
        "forward_kl": ObjectiveWeights(1.0, 0.0),
        "reverse_kl": ObjectiveWeights(0.0, 1.0),
        "jeffreys": ObjectiveWeights(0.5, 0.5),
    }
    if warm_start not in table:
        raise ValueError(f"unknown warm_start objective {warm_start!r}; choose one of {WARM_STARTS}")
    return table[warm_start]


def sample_gaussian(rng_key: Array, mean: Array, variance: Array) -> Array:
    """z = mean + sqrt(variance) * eps, eps ~ N(0, I); (B, D) -> (B, D)."""
    return mean + jnp.sqrt(variance) * jax.random.normal(rng_key, mean.shape, mean.dtype)


def gaussian_log_prob(z: Array, mean: Array, variance: Array) -> Array:
    """log N(z; mean, diag(variance)), (B, D) -> (B,) nats."""
    return -0.5 * jnp.sum((z - mean) ** 2 / variance + jnp.log(variance) + _LOG_2PI, axis=-1)


def reparameterized_elbo(rng_key: Array, mean: Array, variance: Array,
                         log_joint_fn: Callable[[Array], Array]) -> Array:
    """Single-sample ELBO log p(x, z) - log q(z | x), z ~ q (reparameterised), (B,) nats.

    Args:
      rng_key: PRNG key for the sample.
      mean, variance: (B, D) encoder outputs.
      log_joint_fn: ``z (B, D) -> (B,)`` log p(x, z) for the batch's x.
    """
    z = sample_gaussian(rng_key, mean, variance)
    return log_joint_fn(z) - gaussian_log_prob(z, mean, variance)


class ChainMoments(NamedTuple):
    """Sums over the chain of d_t = z_t - center and d_t**2, each (B, D)."""

    center: Array
    sum_d: Array
    sum_d2: Array


def init_moments(center: Array) -> ChainMoments:
    return ChainMoments(center, jnp.zeros_like(center), jnp.zeros_like(center))


def accumulate_moments(moments: ChainMoments, z: Array) -> ChainMoments:
    d = z - moments.center
    return ChainMoments(moments.center, moments.sum_d + d, moments.sum_d2 + d * d)


def forward_kl_from_moments(mean: Array, variance: Array, moments: ChainMoments, num_steps: int) -> Array:
    """Cross-entropy -(1/T) sum_t log q(z_t | x) from the chain's moments, (B,) nats.

    Equals the per-step average of eq. 11 exactly (up to float rounding):
    (1/T) sum_t (z_t - mu)^2 = S2/T - 2 (mu - c) S1/T + (mu - c)^2 with
    S1, S2 the sums of d_t = z_t - c and d_t^2. Centering at c (the encoder
    mean, held constant) avoids cancellation.
    """
    shift = mean - moments.center
    mean_sq = moments.sum_d2 / num_steps - 2.0 * shift * moments.sum_d / num_steps + shift * shift
    return 0.5 * jnp.sum(mean_sq / variance + jnp.log(variance) + _LOG_2PI, axis=-1)
