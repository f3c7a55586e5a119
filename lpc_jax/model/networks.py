"""The paper's networks (appendix A.1, Table 2) and the log joint log p(x, z; theta).

Layer arguments follow Table 2's PyTorch convention ``(features, kernel, stride,
padding)`` with defaults kernel 4, stride 2, padding 1. Output sizes:

* Decoder, transposed convolutions ``out = (in - 1) * stride - 2 * padding + kernel``:
  64x64: 1 -> 4 -> 8 -> 16 -> 32 -> 64;  32x32: 1 -> 4 -> 8 -> 16 -> 16 -> 32.
* Encoder, convolutions ``out = floor((in + 2 * padding - kernel) / stride) + 1``:
  64x64: 64 -> 22 -> 11 -> 5 -> 2 -> 1;  32x32: 32 -> 16 -> 8 -> 4 -> 2 -> 1;
  28x28: 28 -> 14 -> 7 -> 3 -> 2 -> 1.

**28x28 fix.** Table 2's 28x28 generator as printed gives 1 -> 4 -> 8 -> 16 -> 18 -> 36,
not 28. The smallest change that lands on 28 is one kernel size: the first transposed
convolution uses kernel 3 instead of 4 for 28x28 images, giving
1 -> 3 -> 6 -> 12 -> 14 -> 28 (the printed fourth layer, kernel 3 / stride 1 /
padding 0, is kept). Every other layer is as printed.

The decoder's last layer outputs ``C`` channels (the image's), not always 3.
The likelihood's scale sigma is either fixed (``obs_scale > 0``) or learned per
channel (``obs_scale = None``): a parameter ``log_scale`` of shape (C,), initialised
at ``log(init_obs_scale)``.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lpc_jax.model import convolutions, likelihoods

Array = jax.Array

SOFTPLUS_BETA = 0.3  # Table 2: softplus(beta=0.3) on the encoder's variance output


def softplus_beta(x: Array, beta: float = SOFTPLUS_BETA) -> Array:
    """PyTorch's ``Softplus(beta)``: log(1 + exp(beta x)) / beta."""
    return jax.nn.softplus(beta * x) / beta


def _decoder_layers(image_shape: Sequence[int]) -> list[tuple[int, int, int, int]]:
    """(features, kernel, stride, padding) of each transposed conv, Table 2."""
    h, w, c = image_shape
    if (h, w) == (64, 64):
        fourth, first_kernel = (32, 4, 2, 1), 4
    elif (h, w) == (32, 32):
        fourth, first_kernel = (32, 3, 1, 1), 4
    elif (h, w) == (28, 28):
        fourth, first_kernel = (32, 3, 1, 0), 3  # the documented 28x28 fix
    else:
        raise ValueError(f"unsupported image shape {tuple(image_shape)}; Table 2 covers 64x64, 32x32 and 28x28")
    return [(64, first_kernel, 1, 0), (64, 4, 2, 1), (32, 4, 2, 1), fourth, (c, 4, 2, 1)]


def _encoder_layers(image_shape: Sequence[int]) -> list[tuple[int, int, int, int]]:
    h, w, _ = image_shape
    if (h, w) == (64, 64):
        first = (32, 3, 3, 1)
    elif (h, w) in ((32, 32), (28, 28)):
        first = (32, 4, 2, 1)
    else:
        raise ValueError(f"unsupported image shape {tuple(image_shape)}; Table 2 covers 64x64, 32x32 and 28x28")
    fourth = (64, 3, 2, 1) if (h, w) == (28, 28) else (64, 4, 2, 1)
    return [first, (32, 4, 2, 1), (64, 4, 2, 1), fourth, (256, 4, 2, 1)]


class Decoder(nn.Module):
    """Generative network p(x | z; theta), Table 2 (left column).

    Attributes:
      image_shape: (H, W, C), one of 64x64, 32x32, 28x28.
      obs_scale: fixed likelihood scale, or None to learn ``log_scale`` per channel.
      init_obs_scale: initial value of the learned scale.
      conv_impl: the transposed convolutions' implementation, one of
        ``convolutions.CONV_IMPLS`` (``"auto"``: the CPU-tuned layers on CPU, XLA's own
        on GPU/TPU, by the platform the program is lowered for); every choice has
        the same parameters.

    Call: ``z`` (B, latent_dim) float32 -> ``(mean, log_scale)``, mean (B, H, W, C)
    (logits for the Bernoulli likelihood), log_scale (1, 1, 1, C).
    """

    image_shape: Sequence[int]
    obs_scale: float | None = None
    init_obs_scale: float = 0.1
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, z: Array) -> tuple[Array, Array]:
        convolutions.check_impl(self.conv_impl)
        h = nn.silu(nn.Dense(256)(z))
        h = h[:, None, None, :]
        specs = _decoder_layers(self.image_shape)
        for i, (features, kernel, stride, padding) in enumerate(specs):
            h = convolutions.ConvTranspose(features, kernel, stride, padding, self.conv_impl)(h)
            if i < len(specs) - 1:
                h = nn.silu(h)
        c = self.image_shape[-1]
        if self.obs_scale is None:
            log_scale = self.param("log_scale", nn.initializers.constant(jnp.log(self.init_obs_scale)), (c,))
        else:
            log_scale = jnp.full((c,), jnp.log(self.obs_scale), jnp.float32)  # float32 also under a bf16 decoder
        return h, log_scale.reshape(1, 1, 1, c)


class Encoder(nn.Module):
    """Warm-start / encoder network q(z | x; phi), Table 2 (right column).

    Call: ``x`` (B, H, W, C) in [-1, 1] -> ``(mean, variance)``, each (B, latent_dim);
    the variance is ``softplus_beta(raw, 0.3)`` (strictly positive). ``conv_impl`` as
    in :class:`Decoder`.
    """

    image_shape: Sequence[int]
    latent_dim: int = 40
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: Array) -> tuple[Array, Array]:
        convolutions.check_impl(self.conv_impl)
        h = x
        for features, kernel, stride, padding in _encoder_layers(self.image_shape):
            h = nn.silu(convolutions.Conv(features, kernel, stride, padding, self.conv_impl)(h))
        h = h.reshape(h.shape[0], -1)
        out = nn.Dense(2 * self.latent_dim)(h)
        mean, raw = jnp.split(out, 2, axis=-1)
        return mean, softplus_beta(raw) + 1e-6


def gaussian_log_prob_diag(z: Array, mean: Array, variance: Array) -> Array:
    """log N(z; mean, diag(variance)), (B, D) -> (B,) nats."""
    return likelihoods.gaussian_log_prob(z, mean, 0.5 * jnp.log(variance))


def make_log_joint(decoder: Decoder, likelihood: str = "discretized_gaussian",
                   prior_scale: float = 1.0) -> Callable[[dict, Array, Array], Array]:
    """Builds ``log_joint(params, x, z) -> (B,)``: log p(x | z; theta) + log p(z), nats.

    Args:
      decoder: the generative network.
      likelihood: one of ``likelihoods.LIKELIHOODS``.
      prior_scale: standard deviation of the N(0, prior_scale^2 I) prior.

    The returned function takes decoder ``params`` (the variables' ``params``
    collection), ``x`` (B, H, W, C) in [-1, 1] and ``z`` (B, D).

    Raises:
      ValueError: unknown likelihood (at build time).
    """
    if likelihood not in likelihoods.LIKELIHOODS:
        raise ValueError(f"unknown likelihood {likelihood!r}; choose one of {likelihoods.LIKELIHOODS}")

    def log_joint(params, x: Array, z: Array) -> Array:
        mean, log_scale = decoder.apply({"params": params}, z)
        log_px = likelihoods.observation_log_prob(likelihood, x, mean, log_scale)
        return log_px + likelihoods.normal_prior_log_prob(z, prior_scale)

    return log_joint


@functools.partial(jax.jit, static_argnums=(0, 3))
def decode_mean(decoder: Decoder, params, z: Array, likelihood: str = "discretized_gaussian") -> Array:
    """Mean image in [-1, 1] for display, (B, D) -> (B, H, W, C).

    Gaussian likelihoods: the decoder mean, clipped; Bernoulli: 2 sigmoid(logits) - 1.
    """
    out, _ = decoder.apply({"params": params}, z)
    if likelihood == "bernoulli":
        return 2.0 * jax.nn.sigmoid(out) - 1.0
    return jnp.clip(out, -1.0, 1.0)


def sample_prior(decoder: Decoder, decoder_params, rng_key: Array, num_samples: int, *, latent_dim: int,
                 prior_scale: float = 1.0, likelihood: str = "discretized_gaussian",
                 batch_size: int = 500) -> np.ndarray:
    """Decoder means of z ~ N(0, prior_scale^2 I), in batches of one shape.

    Batch ``i`` decodes ``z = prior_scale * normal(fold_in(rng_key, i), (B, latent_dim))``
    with ``B = min(batch_size, num_samples)``; every batch has that shape (one
    compilation) and the surplus of the last one is dropped, so the result
    depends on ``batch_size``.

    Args:
      decoder: the generative network.
      decoder_params: its params (``state.params['decoder']``).
      rng_key: PRNG key of the latents.
      num_samples: N >= 0.
      latent_dim: D.
      prior_scale: standard deviation of the prior.
      likelihood: one of ``likelihoods.LIKELIHOODS`` (see :func:`decode_mean`).
      batch_size: latents decoded per call, >= 1.

    Returns:
      (N, H, W, C) float32 in [-1, 1] (Bernoulli: 2 sigmoid(logits) - 1).
    """
    if num_samples < 0 or batch_size < 1:
        raise ValueError(f"need num_samples >= 0 and batch_size >= 1; got {num_samples}, {batch_size}")
    batch_size = min(batch_size, max(num_samples, 1))
    outs = []
    for i in range(-(-num_samples // batch_size)):
        z = prior_scale * jax.random.normal(jax.random.fold_in(rng_key, i), (batch_size, latent_dim))
        outs.append(np.asarray(decode_mean(decoder, decoder_params, z, likelihood)))
    if not outs:
        z = jax.ShapeDtypeStruct((1, latent_dim), jnp.float32)
        shape = jax.eval_shape(lambda z: decode_mean(decoder, decoder_params, z, likelihood), z).shape
        return np.zeros((0, *shape[1:]), np.float32)
    return np.concatenate(outs)[:num_samples].astype(np.float32, copy=False)
