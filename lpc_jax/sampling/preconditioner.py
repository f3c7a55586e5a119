"""Adam-style diagonal preconditioner for Langevin dynamics (paper section 1.3).

The metric is built from an exponential moving average of the squared drift,
with Adam's bias correction (Algorithm 1, lines 7-8):

    m_t     = decay * m_{t-1} + (1 - decay) * g_t**2        (elementwise)
    m_hat_t = sqrt(m_t / (1 - decay**t))
    G_t     = 1 / (m_hat_t + eps)

``G_t`` multiplies both the drift and the noise variance of the Langevin update
(see :mod:`lpc_jax.sampling.langevin`). With ``decay = 0`` the EMA keeps only the current
drift, so ``G = 1 / (|g| + eps)``; the paper's "beta = 0 (no preconditioning)"
means the preconditioner switched off (``G = 1``), which is a separate, static
choice in :func:`lpc_jax.sampling.langevin.build_kernel`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def init(z: Array) -> Array:
    """Zero second-moment estimate, same shape and dtype as the latents (B, D)."""
    return jnp.zeros_like(z)


def update(m: Array, drift: Array, count: Array, decay: Array, eps: Array) -> tuple[Array, Array]:
    """One EMA step and the resulting diagonal metric.

    Args:
      m: (B, D) second-moment estimate m_{t-1}.
      drift: (B, D) drift g_t = grad_z log p(x, z_{t-1}).
      count: () int32, t - 1 (the number of updates already made).
      decay: () EMA decay beta in [0, 1).
      eps: () positive constant added to m_hat, in drift units.

    Returns:
      ``(m_t, G_t)``, each (B, D); G_t has units of 1 / drift.
    """
    m = decay * m + (1.0 - decay) * drift * drift
    t = (count + 1).astype(m.dtype)
    m_hat = jnp.sqrt(m / (1.0 - decay**t))
    return m, 1.0 / (m_hat + eps)
