"""Chain diagnostics: log p and drift along chains, PCA trajectories, split R-hat and ESS.

The paper's Figs. 3, 7 and 8 plot log p(x, z_t) - log p(x, z_0) and the drift
norm |grad_z log p(x, z_t)| along chains started from the encoder; Figs. 1 and 6
project latent trajectories onto two principal components. Convergence is
measured the Stan way: split R-hat (Gelman et al. 2013, BDA3 section 11.4;
not rank-normalised) and the effective sample size (Geyer's initial monotone
sequence), per latent dimension, from several chains per image started from
overdispersed points. Both statistics are blackjax's
(``blackjax.diagnostics``); this module runs the chains, splits them and
summarises.

Like the samplers, these functions know only a log density ``log_prob_fn(z,
*args) -> (B,)`` through a :class:`lpc_jax.sampling.samplers.Sampler`; they never
call ``jit`` (the caller does).
"""

from __future__ import annotations

from typing import NamedTuple

import blackjax.diagnostics
import jax
import jax.numpy as jnp
import numpy as np

from lpc_jax.sampling import langevin, samplers

Array = jax.Array

RHAT_THRESHOLD = 1.01  # the usual "converged" cut for split R-hat (Vehtari et al. 2021)


class ChainCurves(NamedTuple):
    """Per-step statistics over a batch of chains, each (..., T): step t is z_t, t = 0..T-1."""

    delta_log_p_mean: Array  # mean_b [log p(z_t) - log p(z_0)], nats
    delta_log_p_sd: Array  # sd over the batch, nats
    drift_norm_mean: Array  # mean_b |grad_z log p(z_t)|, nats per latent unit
    drift_norm_sd: Array
    acceptance_mean: Array | None = None  # mean_b acceptance probability (MALA only)


def chain_curves(rng_key: Array, sampler: samplers.Sampler, z0: Array, hparams: langevin.LangevinHParams,
                 *args, num_steps: int) -> ChainCurves:
    """Runs ``num_steps`` sampler steps from ``z0`` (B, D); mean and sd of log p and drift over B.

    ``hparams`` fields may carry a leading axis (S,) (see :func:`stack_hparams`):
    the chains are then run for every step size (``vmap``) and each curve is (S, T).
    """

    def curves(hp):
        _, infos = langevin.sample_chain(rng_key, sampler.kernel, sampler.init(z0), hp, num_steps, *args)
        delta = infos.log_prob - infos.log_prob[:1]
        accept = getattr(infos, "acceptance_prob", None)
        return ChainCurves(delta.mean(-1), delta.std(-1), infos.drift_norm.mean(-1), infos.drift_norm.std(-1),
                           None if accept is None else accept.mean(-1))

    if jnp.ndim(hparams.step_size) == 0:
        return curves(hparams)
    return jax.vmap(curves)(hparams)


def trajectories(rng_key: Array, sampler: samplers.Sampler, z0: Array, hparams: langevin.LangevinHParams,
                 *args, num_steps: int) -> Array:
    """The latents z_0..z_T of chains started at ``z0`` (B, D): (T + 1, B, D)."""
    _, _, zs = langevin.sample_chain(rng_key, sampler.kernel, sampler.init(z0), hparams, num_steps, *args,
                                     return_trace=True)
    return jnp.concatenate([z0[None], zs])


def pca_project(points: np.ndarray, num_components: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Projects (N, D) ``points`` onto the leading principal components of their finite rows.

    Rows with a non-finite entry (a diverged chain) do not enter the fit and
    project to NaN.

    Returns:
      ``(projected (N, k), explained (k,))``: coordinates about the finite
      points' mean, and each component's fraction of their total variance.
    """
    points = np.asarray(points, np.float64)
    finite = np.isfinite(points).all(axis=1)
    if not finite.any():
        return np.full((len(points), num_components), np.nan), np.full(num_components, np.nan)
    mean = points[finite].mean(0)
    _, s, vt = np.linalg.svd(points[finite] - mean, full_matrices=False)
    total = float((s**2).sum()) or 1.0
    return (points - mean) @ vt[:num_components].T, s[:num_components] ** 2 / total


def overdispersed_starts(rng_key: Array, mean: Array, variance: Array, num_chains: int,
                         scale: float = 3.0) -> Array:
    """``num_chains`` starts per row: mean + scale * sd * xi, xi ~ N(0, I); (B, D) -> (C, B, D).

    With ``scale`` > 1 the starts are spread wider than the encoder's q(z | x),
    which approximates the posterior, as split R-hat needs (Gelman & Rubin 1992).
    """
    xi = jax.random.normal(rng_key, (num_chains, *mean.shape), mean.dtype)
    return mean[None] + scale * jnp.sqrt(variance)[None] * xi


def chain_draws(rng_key: Array, sampler: samplers.Sampler, starts: Array, hparams: langevin.LangevinHParams,
                *args, num_steps: int) -> Array:
    """Runs C independent chains per row from ``starts`` (C, B, D); draws (C, T, B, D).

    The C x B chains run as one batch of rows ``c * B + b``: ``args`` must hold
    per-row data for C * B rows (e.g. the images tiled C times, ``jnp.tile``).
    """
    num_chains, batch, dim = starts.shape
    zs = trajectories(rng_key, sampler, starts.reshape(num_chains * batch, dim), hparams, *args,
                      num_steps=num_steps)[1:]
    return zs.reshape(num_steps, num_chains, batch, dim).swapaxes(0, 1)


def split_chains(draws: Array) -> Array:
    """(C, N, ...) -> (2C, N // 2, ...): first and second halves as separate chains (odd N drops the middle draw)."""
    half = draws.shape[1] // 2
    return jnp.concatenate([draws[:, :half], draws[:, draws.shape[1] - half:]], axis=0)


def split_rhat(draws: Array) -> Array:
    """Split R-hat of (C, N, ...) draws (chains, draws per chain, then any shape): shape (...)."""
    return blackjax.diagnostics.potential_scale_reduction(split_chains(draws), chain_axis=0, sample_axis=1)


def effective_sample_size(draws: Array) -> Array:
    """ESS of (C, N, ...) draws, from the split chains as Stan does: shape (...), in draws."""
    return blackjax.diagnostics.effective_sample_size(split_chains(draws), chain_axis=0, sample_axis=1)


def convergence_statistics(draws: Array, warmup: int = 0) -> tuple[Array, Array]:
    """``(split R-hat, ESS)`` of (C, N, ...) draws after dropping ``warmup`` (static) draws per chain.

    Each has shape (...); jit it at the call site (``static_argnums=1``).
    """
    kept = draws[:, warmup:]
    return split_rhat(kept), effective_sample_size(kept)


def convergence_summary(rhat: Array, ess: Array, threshold: float = RHAT_THRESHOLD) -> dict:
    """Summary of per-parameter split R-hat and ESS (any equal shapes).

    Returns:
      A JSON-ready dict: ``rhat_max`` (the worst), ``rhat_median``,
      ``frac_rhat_below`` (fraction of parameters with R-hat < ``threshold``),
      ``ess_min``, ``ess_median`` (draws), ``num_params``, ``num_undefined``
      (parameters with a non-finite draw, e.g. a diverged chain: left out of the
      max, min and medians, counted as not below the threshold) and ``rhat_threshold``.
    """
    rhat = np.asarray(rhat, np.float64).ravel()
    ess = np.asarray(ess, np.float64).ravel()
    defined = np.isfinite(rhat) & np.isfinite(ess)
    stat = lambda fn, v: float(fn(v[defined])) if defined.any() else float("nan")
    return {
        "rhat_max": stat(np.max, rhat),
        "rhat_median": stat(np.median, rhat),
        "frac_rhat_below": float(np.mean(rhat < threshold)),
        "ess_min": stat(np.min, ess),
        "ess_median": stat(np.median, ess),
        "num_params": int(rhat.size),
        "num_undefined": int((~defined).sum()),
        "rhat_threshold": threshold,
    }
