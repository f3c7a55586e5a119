"""Likelihood bounds on held-out images: the test ELBO and the IWAE bound (nats, bits/dim).

* :func:`iwae_log_likelihood`: the importance-weighted bound on log p(x) for a
  batch (Burda et al. 2016, "Importance Weighted Autoencoders"), JAX, memory flat
  in the number of samples.
* :func:`test_elbo`: the single-sample ELBO of a held-out set, the one held-out
  ELBO that training, sweeps and evaluation report.
* :func:`iwae_bound`: the IWAE bound of each image of a set, the encoder as proposal.
* :func:`bits_per_dim`: nats per image -> bits per dimension.

Every bound runs its matmuls and convolutions at ``precision="highest"`` (true float32
on GPU/TPU, where the default is TF32 / bf16 passes): the discretised likelihood
resolves pixel bins of half-width 1/255, and the numbers are compared across runs and
machines. On the CPU float32 is float32 either way.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from lpc_jax.data import sources
from lpc_jax.model import objectives
from lpc_jax.model.state import Model

Array = jax.Array
Params = Any

_LOG_2PI = math.log(2.0 * math.pi)
PRECISION = "highest"  # the bounds' matmul / convolution precision


def _at_eval_precision(fn: Callable) -> Callable:
    """``fn`` traced under ``jax.default_matmul_precision(PRECISION)``."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with jax.default_matmul_precision(PRECISION):
            return fn(*args, **kwargs)
    return wrapped


def iwae_log_likelihood(
    rng_key: Array,
    log_joint_fn: Callable[[Array], Array],
    encoder_mean: Array,
    encoder_variance: Array,
    num_samples: int = 5000,
    chunk_size: int = 500,
) -> Array:
    """Importance-weighted lower bound on log p(x) (Burda et al. 2016).

    L_K = log (1/K) sum_k p(x, z_k) / q(z_k | x),  z_k ~ q = N(mean, diag(variance)),

    a lower bound on log p(x) that tightens monotonically (in expectation)
    with K and is exact for any K when q is the true posterior.

    The K samples are processed ``chunk_size`` at a time (``log_joint_fn``
    is vmapped over the samples of a chunk) inside a ``lax.scan`` that carries
    a running logsumexp, so memory is O(chunk_size * B * D) whatever K is.
    Sample k always uses key ``split(rng_key, K)[k]``, so the result does not
    depend on ``chunk_size``.

    Each call compiles the whole computation once (``log_joint_fn`` is
    usually a fresh closure per batch). To evaluate many batches with one
    compilation, jit a wrapper that takes the data as arguments, e.g.
    ``jax.jit(lambda key, params, x, m, v: iwae_log_likelihood(key,
    lambda z: log_joint(params, x, z), m, v))``; nested inside ``jit`` this
    function just traces.

    Args:
      rng_key: PRNG key.
      log_joint_fn: maps z of shape (B, D) to (B,) log p(x, z) in nats for
        the fixed batch of x being evaluated.
      encoder_mean: (B, D) proposal means.
      encoder_variance: (B, D) proposal variances (> 0; not checked under jit).
      num_samples: K >= 1.
      chunk_size: samples per vmapped evaluation of ``log_joint_fn`` (>= 1);
        a last partial chunk is evaluated separately.

    Returns:
      (B,) float log-likelihood bound in nats.

    Raises:
      ValueError: shape mismatch, or non-positive ``num_samples``/``chunk_size``.
    """
    encoder_mean = jnp.asarray(encoder_mean)
    encoder_variance = jnp.asarray(encoder_variance)
    if encoder_mean.ndim != 2 or encoder_mean.shape != encoder_variance.shape:
        raise ValueError(
            f"encoder_mean and encoder_variance must both be (B, D); got "
            f"{encoder_mean.shape} and {encoder_variance.shape}"
        )
    if num_samples < 1 or chunk_size < 1:
        raise ValueError(f"num_samples and chunk_size must be >= 1; got {num_samples}, {chunk_size}")
    chunk_size = min(chunk_size, num_samples)
    impl = functools.partial(_iwae_impl, log_joint_fn, num_samples, chunk_size)
    with jax.default_matmul_precision(PRECISION):
        return jax.jit(impl)(rng_key, encoder_mean, encoder_variance)


def _iwae_impl(log_joint_fn: Callable[[Array], Array], num_samples: int, chunk_size: int,
               rng_key: Array, encoder_mean: Array, encoder_variance: Array) -> Array:
    """Body of :func:`iwae_log_likelihood` (arguments already validated)."""
    dtype = jnp.result_type(encoder_mean.dtype, jnp.float32)
    mean = encoder_mean.astype(dtype)
    std = jnp.sqrt(encoder_variance.astype(dtype))
    log_norm = -0.5 * jnp.sum(_LOG_2PI + jnp.log(encoder_variance.astype(dtype)), axis=-1)  # (B,)

    def chunk_lse(keys: Array) -> Array:
        """logsumexp over the chunk's samples of log w = log p(x, z) - log q(z|x); (B,)."""
        eps = jax.vmap(lambda k: jax.random.normal(k, mean.shape, dtype))(keys)  # (C, B, D)
        z = mean[None] + std[None] * eps
        log_q = log_norm[None] - 0.5 * jnp.sum(eps * eps, axis=-1)  # (C, B)
        log_p = jax.vmap(log_joint_fn)(z)  # (C, B)
        if log_p.shape != log_q.shape:
            raise ValueError(f"log_joint_fn must map (B, D) -> (B,); got output {log_p.shape[1:]}")
        return jax.nn.logsumexp(log_p.astype(dtype) - log_q, axis=0)

    keys = jax.random.split(rng_key, num_samples)
    num_full = num_samples // chunk_size
    full_keys = keys[: num_full * chunk_size].reshape(num_full, chunk_size, *keys.shape[1:])

    def body(lse: Array, chunk_keys: Array) -> tuple[Array, None]:
        return jnp.logaddexp(lse, chunk_lse(chunk_keys)), None

    init = jnp.full(mean.shape[:1], -jnp.inf, dtype)
    lse, _ = jax.lax.scan(body, init, full_keys)
    if num_samples % chunk_size:
        lse = jnp.logaddexp(lse, chunk_lse(keys[num_full * chunk_size :]))
    return lse - math.log(num_samples)


def bits_per_dim(log_likelihood_nats: Array | np.ndarray | float, num_dims: int) -> Array:
    """Converts a log-likelihood in nats to bits per dimension: -ll / (D ln 2).

    No rescaling term is added: the models' discretised Gaussian likelihood
    (:mod:`lpc_jax.model.likelihoods`) already assigns a probability *mass* to each
    of the 256 8-bit bins of every pixel, so log p(x) is the log-probability of
    the 8-bit image itself and is invariant to the [-1, 1] scaling of pixels.
    (A continuous density on rescaled data would need the log-Jacobian of the
    scaling added first.)

    Args:
      log_likelihood_nats: log p(x) in nats, any shape (e.g. (B,)).
      num_dims: D, the number of pixel dimensions (H * W * C), > 0.

    Returns:
      Bits per dimension, same shape as the input (>= 0 for a pmf).
    """
    if num_dims <= 0:
        raise ValueError(f"num_dims must be positive; got {num_dims}")
    return -jnp.asarray(log_likelihood_nats) / (num_dims * math.log(2.0))


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
        x = sources.to_float(images[start : start + batch_size])
        valid = x.shape[0]
        out.append(np.asarray(fn(_pad(x, batch_size), jax.random.fold_in(rng_key, i)))[:valid])
    return np.concatenate(out) if out else np.zeros((0,), np.float32)


@functools.partial(jax.jit, static_argnames=("model",))
@_at_eval_precision
def _elbo_batch(params: Params, x: jax.Array, key: jax.Array, *, model: Model) -> jax.Array:
    mean, variance = model.encoder.apply({"params": params["encoder"]}, x)
    return objectives.reparameterized_elbo(key, mean, variance, lambda z: model.log_joint(params["decoder"], x, z))


def elbo_per_image(params: Params, model: Model, images: np.ndarray, rng_key: jax.Array,
                    batch_size: int = 500) -> np.ndarray:
    """Single-sample encoder ELBO of each image, (N,) float32 nats (schedule of :func:`test_elbo`)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    return _map_batches(lambda x, k: _elbo_batch(params, x, k, model=model), images, batch_size, rng_key)


def test_elbo(params: Params, model: Model, images: np.ndarray, rng_key: jax.Array, *,
              batch_size: int = 500) -> dict:
    """Mean single-sample ELBO of held-out images, in nats per image and bits/dim.

    The ELBO is log p(x, z) - log q(z | x) with one reparameterised sample
    z ~ q(z | x) (:func:`lpc_jax.model.objectives.reparameterized_elbo`, section 1.2).
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
      float (:func:`lpc_jax.bits_per_dim` of that mean, D = H * W * C),
      "test_examples": N}``.
    """
    if images.shape[0] < 1:
        raise ValueError("test_elbo needs at least one image; got an empty array")
    elbo = float(np.mean(elbo_per_image(params, model, images, rng_key, batch_size), dtype=np.float64))
    dims = int(np.prod(images.shape[1:]))
    return {"test_elbo_nats": elbo, "test_elbo_bits_per_dim": float(bits_per_dim(elbo, dims)),
            "test_examples": int(images.shape[0])}


@functools.partial(jax.jit, static_argnames=("model", "num_samples", "chunk_size"))
@_at_eval_precision
def _iwae_batch(params: Params, x: jax.Array, key: jax.Array, *, model: Model, num_samples: int,
                chunk_size: int) -> jax.Array:
    mean, variance = model.encoder.apply({"params": params["encoder"]}, x)
    return iwae_log_likelihood(key, lambda z: model.log_joint(params["decoder"], x, z), mean, variance,
                                       num_samples, chunk_size)


def iwae_bound(params: Params, model: Model, images: np.ndarray, rng_key: jax.Array, *,
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
