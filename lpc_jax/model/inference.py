"""Inference on new images with a trained decoder: "sample as you infer" (Zahid et al. 2024, section 3).

The chain that trains LPC is a posterior sampler in its own right. Given images x and
a log density over latents built from the decoder, each function below warm-starts
the chain at the encoder's mean and runs T Langevin steps (:mod:`lpc_jax.sampling`):

* :func:`reconstruct`: p(z | x), decoded; the encoder-mean decode beside it.
* :func:`inpaint`: p(z | x_visible), the likelihood of the visible pixels only
  (:func:`masked_log_joint`); several chains per image give several completions.
* :func:`denoise`: p(z | x + sigma eps) under the noisy-observation model
  x_noisy | z ~ N(mean(z), s^2 + sigma^2) per pixel (:func:`noisy_log_joint`).

Each returns the decoded means and the per-chain log density along the chain,
log p(x, z_{t-1}) of the density the chain targets, (T, ...) nats. With
``sampler="mala"`` (the default, no preconditioner) the chain is exact: its
stationary law is the posterior at any step size.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from lpc_jax.model import likelihoods, networks
from lpc_jax.model.state import Model
from lpc_jax.sampling import langevin, samplers

Array = jax.Array


class Inference(NamedTuple):
    """Decoded chain output for B images and S chains each."""

    start: Array  # (B, H, W, C) decoder mean at the encoder mean (the warm start), in [-1, 1]
    samples: Array  # (S, B, H, W, C) decoder means at the chains' final latents, in [-1, 1]
    log_p_trace: Array  # (T, S, B) log density of the chain's target at z_{t-1}, nats
    z: Array  # (S, B, D) final latents
    acceptance: Array | None  # (T,) mean MALA acceptance probability, None for other samplers


def pixel_log_probs(likelihood: str, x: Array, mean: Array, log_scale: Array) -> Array:
    """Per-pixel log p(x_hw | z), summed over channels: (B, H, W, C) -> (B, H, W) nats.

    Each pixel is evaluated as a 1 x 1 image by :func:`lpc_jax.model.likelihoods.observation_log_prob`,
    so every likelihood (discretised Gaussian, Gaussian, Bernoulli) is supported exactly.
    """
    b, h, w, c = x.shape
    flat = lambda a: a.reshape(b * h * w, 1, 1, c)
    return likelihoods.observation_log_prob(likelihood, flat(x), flat(mean), log_scale).reshape(b, h, w)


def masked_log_joint(model: Model, x: Array, visible: Array, *, prior_scale: float = 1.0) -> Callable:
    """``(theta, z (B, D)) -> (B,)``: log p(x_visible | z) + log p(z), nats.

    Args:
      model: the run's Model (``decoder`` and ``likelihood``).
      x: (B, H, W, C) images in [-1, 1]; hidden pixels' values are ignored.
      visible: (H, W) or (B, H, W) bool/0-1 mask, 1 where the pixel is observed.
      prior_scale: the run's prior standard deviation.
    """
    mask = jnp.broadcast_to(jnp.asarray(visible, jnp.float32), x.shape[:3])

    def log_joint(theta, z):
        mean, log_scale = model.decoder.apply({"params": theta}, z)
        log_px = jnp.sum(mask * pixel_log_probs(model.likelihood, x, mean, log_scale), axis=(1, 2))
        return log_px + likelihoods.normal_prior_log_prob(z, prior_scale)

    return log_joint


def noisy_log_joint(model: Model, x_noisy: Array, noise_sigma: float, *, prior_scale: float = 1.0) -> Callable:
    """``(theta, z) -> (B,)``: log p(x_noisy | z) + log p(z) with x_noisy = x + sigma eps, nats.

    The decoder's per-pixel Gaussian N(mean, s^2) convolved with the noise is
    N(mean, s^2 + sigma^2): the likelihood's scale is inflated accordingly (for the
    discretised Gaussian this is the same inflation on its bins, an approximation).

    Raises:
      ValueError: a Bernoulli likelihood (no additive-noise model) or sigma < 0.
    """
    if model.likelihood == "bernoulli":
        raise ValueError("denoising needs a Gaussian-family likelihood; this model's is 'bernoulli'")
    if noise_sigma < 0:
        raise ValueError(f"noise_sigma must be >= 0 (pixel units of [-1, 1]); got {noise_sigma}")

    def log_joint(theta, z):
        mean, log_scale = model.decoder.apply({"params": theta}, z)
        log_scale = 0.5 * jnp.log(jnp.exp(2.0 * log_scale) + noise_sigma**2)
        log_px = likelihoods.observation_log_prob(model.likelihood, x_noisy, mean, log_scale)
        return log_px + likelihoods.normal_prior_log_prob(z, prior_scale)

    return log_joint


def run_chain(rng_key: Array, log_joint: Callable, theta: Any, z0: Array, *, num_steps: int, step_size: float,
              sampler: str = "mala", precondition: bool = False) -> tuple[Array, Array, Array | None]:
    """``num_steps`` steps of ``sampler`` on ``log_joint(theta, .)`` from ``z0`` (S, B, D).

    Returns:
      ``(z (S, B, D), log_p_trace (T, S, B) nats, acceptance (T,) or None)``.

    Raises:
      ValueError: unknown sampler, num_steps < 1 or step_size <= 0.
    """
    if num_steps < 1 or step_size <= 0:
        raise ValueError(f"need num_steps >= 1 and step_size > 0; got {num_steps}, {step_size}")
    s, b, d = z0.shape
    log_prob = lambda z_rows: jax.vmap(lambda z: log_joint(theta, z))(z_rows.reshape(s, b, d)).reshape(s * b)
    init, kernel = samplers.build(sampler, log_prob, precondition=precondition)
    state, infos = langevin.sample_chain(rng_key, kernel, init(z0.reshape(s * b, d)), langevin.hparams(step_size),
                                         num_steps)
    acceptance = infos.acceptance_prob.mean(axis=1) if hasattr(infos, "acceptance_prob") else None
    return state.z.reshape(s, b, d), infos.log_prob.reshape(num_steps, s, b), acceptance


def _infer(rng_key: Array, params: Any, model: Model, x_enc: Array, log_joint: Callable, *, num_samples: int,
           **chain_kw) -> Inference:
    """Warm start at the encoder mean of ``x_enc``, S chains per image, decoded."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1; got {num_samples}")
    mean, _ = model.encoder.apply({"params": params["encoder"]}, x_enc)
    z0 = jnp.broadcast_to(mean[None], (num_samples, *mean.shape))
    z, trace, acceptance = run_chain(rng_key, log_joint, params["decoder"], z0, **chain_kw)
    decode = lambda z: networks.decode_mean(model.decoder, params["decoder"], z, model.likelihood)
    samples = decode(z.reshape(-1, z.shape[-1])).reshape(num_samples, *x_enc.shape)
    return Inference(decode(mean), samples, trace, z, acceptance)


def networks_log_joint(model: Model, theta: Any, x: Array, z: Array, prior_scale: float) -> Array:
    """log p(x | z) + log N(z; 0, prior_scale^2 I), (B,) nats (``model.log_joint`` at any prior scale)."""
    mean, log_scale = model.decoder.apply({"params": theta}, z)
    return (likelihoods.observation_log_prob(model.likelihood, x, mean, log_scale)
            + likelihoods.normal_prior_log_prob(z, prior_scale))


def reconstruct(rng_key: Array, params: Any, model: Model, x: Array, *, num_steps: int, step_size: float,
                num_samples: int = 1, prior_scale: float = 1.0, sampler: str = "mala",
                precondition: bool = False) -> Inference:
    """Reconstructions of ``x`` (B, H, W, C) in [-1, 1]: encoder mean, and after T chain steps on p(z | x)."""
    log_joint = lambda theta, z: networks_log_joint(model, theta, x, z, prior_scale)
    return _infer(rng_key, params, model, x, log_joint, num_samples=num_samples, num_steps=num_steps,
                  step_size=step_size, sampler=sampler, precondition=precondition)


def inpaint(rng_key: Array, params: Any, model: Model, x: Array, visible: Array, *, num_samples: int,
            num_steps: int, step_size: float, prior_scale: float = 1.0, sampler: str = "mala",
            precondition: bool = False) -> Inference:
    """Completions of ``x`` from its ``visible`` pixels: S posterior samples of p(z | x_visible) per image.

    The encoder sees the image with hidden pixels set to 0 (mid-grey) for its warm
    start only; the chain's target ignores the hidden pixels (:func:`masked_log_joint`).
    """
    mask = jnp.broadcast_to(jnp.asarray(visible, x.dtype), x.shape[:3])[..., None]
    log_joint = masked_log_joint(model, x, visible, prior_scale=prior_scale)
    return _infer(rng_key, params, model, x * mask, log_joint, num_samples=num_samples, num_steps=num_steps,
                  step_size=step_size, sampler=sampler, precondition=precondition)


def denoise(rng_key: Array, params: Any, model: Model, x_noisy: Array, noise_sigma: float, *, num_samples: int,
            num_steps: int, step_size: float, prior_scale: float = 1.0, sampler: str = "mala",
            precondition: bool = False) -> Inference:
    """Clean estimates of ``x_noisy`` = x + sigma eps: S samples of p(z | x_noisy) per image, decoded."""
    log_joint = noisy_log_joint(model, x_noisy, noise_sigma, prior_scale=prior_scale)
    return _infer(rng_key, params, model, x_noisy, log_joint, num_samples=num_samples, num_steps=num_steps,
                  step_size=step_size, sampler=sampler, precondition=precondition)
