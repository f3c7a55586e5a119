"""Unadjusted overdamped Langevin sampler over batched latents (paper eq. 5, 18-19).

The sampler knows only a log density. One step, for every chain in the batch:

    g   = grad_z log p(z_{t-1})                       (the drift)
    G   = 1, or the Adam-style metric of lpc_jax.preconditioner
    z_t = z_{t-1} + step_size * G * g + sqrt(2 * step_size * G) * eta,   eta ~ N(0, I)

This is the Euler-Maruyama discretisation of dZ = G grad log p dt + sqrt(2G) dW
with the curvature term Gamma dropped, as in the paper. Algorithm 1 as printed
omits the ``z_{t-1} +`` and gives the noise covariance as ``2 * step_size * m_hat``;
both are typos: the diffusion with metric G needs noise covariance
``2 * step_size * G`` with G = 1 / (m_hat + eps), which is what is implemented.

Blackjax-style API::

    kernel = langevin.build_kernel(log_prob_fn, precondition=True)
    state = langevin.init(z0)
    state, info = kernel(rng_key, state, hparams, *args)     # one step
    state, infos = langevin.sample_chain(rng_key, kernel, state, hparams, num_steps, *args)

``log_prob_fn(z, *args) -> (B,)`` is any differentiable batched log density;
each row of ``z`` (B, D) is an independent chain. ``hparams`` holds traced
arrays, so one compiled program serves (and ``vmap`` sweeps) every value.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from lpc_jax import preconditioner

Array = jax.Array


class LangevinState(NamedTuple):
    z: Array  # (B, D) current latents
    m: Array  # (B, D) EMA of the squared drift (zeros when not preconditioning)
    count: Array  # shape=(), int32: steps taken


class LangevinInfo(NamedTuple):
    log_prob: Array  # (B,) log p(z_{t-1}) in nats, where the drift was taken
    drift_norm: Array  # (B,) L2 norm of the drift grad_z log p(z_{t-1})


class LangevinHParams(NamedTuple):
    step_size: Array  # shape=(), gamma > 0, latent units^2 per unit drift
    decay: Array  # shape=(), beta in [0, 1), preconditioner EMA decay
    eps: Array  # shape=(), > 0, added to m_hat


def hparams(step_size: float, decay: float = 0.99, eps: float = 1e-8) -> LangevinHParams:
    """Builds float32 ``LangevinHParams``; raises ValueError on invalid values."""
    if not step_size > 0:
        raise ValueError(f"step_size must be > 0, got {step_size}")
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"decay must lie in [0, 1), got {decay}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    f = lambda v: jnp.asarray(v, jnp.float32)
    return LangevinHParams(f(step_size), f(decay), f(eps))


def init(z: Array) -> LangevinState:
    """Chain state at ``z`` (B, D) with an empty second-moment estimate."""
    return LangevinState(z, preconditioner.init(z), jnp.zeros((), jnp.int32))


def update(rng_key: Array, state: LangevinState, drift: Array, hparams: LangevinHParams,
           precondition: bool, noise: bool = True, metric: Array | None = None) -> LangevinState:
    """The Langevin transition given the drift at ``state.z``.

    Split from the kernel so a caller that already has the drift (the LPC train
    step gets it from the same VJP as the decoder gradient) reuses it.

    Args:
      rng_key: PRNG key for the noise eta.
      state: current state; ``state.z`` is (B, D).
      drift: (B, D) grad_z log p at ``state.z``.
      hparams: step size, decay, eps (traced).
      precondition: static; use the Adam-style metric G, else G = 1.
      noise: static; False gives (preconditioned) gradient ascent, eq. 1.
      metric: optional fixed diagonal metric G, broadcastable to (B, D); it
        replaces the adaptive preconditioner (``precondition`` is then ignored).

    Returns:
      The next ``LangevinState``.
    """
    if metric is not None:
        m, metric = state.m, jnp.broadcast_to(metric, drift.shape)
    elif precondition:
        m, metric = preconditioner.update(state.m, drift, state.count, hparams.decay, hparams.eps)
    else:
        m, metric = state.m, jnp.ones_like(drift)
    z = state.z + hparams.step_size * metric * drift
    if noise:
        eta = jax.random.normal(rng_key, drift.shape, drift.dtype)
        z = z + jnp.sqrt(2.0 * hparams.step_size * metric) * eta
    return LangevinState(z, m, state.count + 1)


def build_kernel(log_prob_fn: Callable[..., Array], precondition: bool = True,
                 noise: bool = True, metric: Array | None = None) -> Callable:
    """Returns ``kernel(rng_key, state, hparams, *args) -> (state, info)``.

    Args:
      log_prob_fn: ``log_prob_fn(z, *args) -> (B,)``, differentiable in ``z`` (B, D).
      precondition: static; Adam-style diagonal metric (section 1.3) or G = 1.
      noise: static; set False for plain (preconditioned) gradient ascent.
      metric: optional fixed diagonal metric G (see :func:`update`).
    """

    def kernel(rng_key, state: LangevinState, hparams: LangevinHParams, *args):
        # Chains are independent rows, so one VJP with a ones cotangent gives
        # every chain's drift and its log density from a single forward pass.
        log_prob, vjp_fn = jax.vjp(lambda z: log_prob_fn(z, *args), state.z)
        (drift,) = vjp_fn(jnp.ones_like(log_prob))
        new_state = update(rng_key, state, drift, hparams, precondition, noise, metric)
        return new_state, LangevinInfo(log_prob, jnp.linalg.norm(drift, axis=-1))

    return kernel


def sample_chain(rng_key: Array, kernel: Callable, state: LangevinState, hparams: LangevinHParams,
                 num_steps: int, *args, return_trace: bool = False):
    """Runs ``num_steps`` kernel steps in a ``lax.scan`` over pre-split keys.

    Args:
      rng_key: PRNG key, split into one key per step.
      kernel: from :func:`build_kernel`.
      state: initial state.
      hparams: step size, decay, eps.
      num_steps: static chain length T.
      *args: passed to the log density.
      return_trace: also return the latents after every step, (T, B, D); memory
        grows with T, so use it only for diagnostics (PCA trajectories).

    Returns:
      ``(final_state, infos)`` with ``infos`` fields stacked to (T, B); with
      ``return_trace``, ``(final_state, infos, zs)``.
    """
    keys = jax.random.split(rng_key, num_steps)

    def body(state, key):
        state, info = kernel(key, state, hparams, *args)
        return state, (info, state.z) if return_trace else info

    state, out = jax.lax.scan(body, state, keys)
    if return_trace:
        return state, out[0], out[1]
    return state, out
