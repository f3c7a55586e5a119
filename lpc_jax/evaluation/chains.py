"""Chain diagnostics of a trained model: curves over step sizes, the usable step size, PCA
paths and split R-hat, each with and without preconditioning.

What ``python -m experiments.chain_diagnostics`` reports (the paper's Figs. 1/3/6-8):

* :func:`curves_by_step_size`: log p(x, z_t) - log p(x, z_0) and the drift norm along
  the chains, mean and sd over images, for every step size at once (``vmap``);
* :func:`usable_step_sizes`: per preconditioning setting, the run's step size if its
  chains stayed finite there (for MALA: and accepted at least ``MIN_ACCEPTANCE`` of
  proposals), else the largest step size that did, else the smallest;
* :func:`trajectories_by_setting`: each image's latent path on its own two principal
  components;
* :func:`convergence_by_setting`: split R-hat and ESS (Vehtari et al. 2021, blackjax's
  estimators) from overdispersed chains per image.

Step sizes, chain lengths and keys are arguments; nothing here reads flags.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lpc_jax.model import objectives
from lpc_jax.model.state import Model, TrainState
from lpc_jax.sampling import diagnostics, langevin, samplers

PRECONDITIONING = {"preconditioned": True, "no preconditioning": False}
MIN_ACCEPTANCE = 0.1  # a MALA chain accepting less than this barely moves


class ChainSetup(NamedTuple):
    """A trained model and the sampler its chains run (the run's, or another)."""

    model: Model
    state: TrainState
    sampler: str  # a name of samplers.SAMPLERS
    friction: float  # the underdamped sampler's
    decay: float  # the preconditioner's EMA decay
    eps: float
    warm_start: str  # "none": chains start from the prior, else from q(z | x)
    prior_scale: float

    def build(self, precondition: bool) -> samplers.Sampler:
        """The sampler over z of ``log p(x, z; theta)``, called ``(z, theta, x)``."""
        log_prob = lambda z, theta, x: self.model.log_joint(theta, x, z)
        return samplers.build(self.sampler, log_prob, precondition=precondition, friction=self.friction)

    def hparams(self, step_size: float) -> langevin.LangevinHParams:
        return langevin.hparams(step_size, self.decay, self.eps)


def label(setting: str, step_size: float) -> str:
    """``"preconditioned, step 0.1"``: the key of one curve, path or R-hat set."""
    return f"{setting}, step {step_size:g}"


def chain_starts(setup: ChainSetup, x: jax.Array, rng_key: jax.Array) -> tuple[jax.Array, str]:
    """Chain starts as in training: ``(z0 (B, D), "encoder")`` from q(z | x), or from the prior
    (``"prior"``) for ``warm_start="none"``."""
    mean, variance = setup.model.encoder.apply({"params": setup.state.params["encoder"]}, x)
    if setup.warm_start == "none":
        return setup.prior_scale * jax.random.normal(rng_key, mean.shape, mean.dtype), "prior"
    return objectives.sample_gaussian(rng_key, mean, variance), "encoder"


def curves_by_step_size(setup: ChainSetup, x: jax.Array, z0: jax.Array, step_sizes: Sequence[float], *,
                        num_steps: int, rng_key: jax.Array) -> dict[str, diagnostics.ChainCurves]:
    """``{label(setting, step size): ChainCurves}`` (numpy), every step size in one ``vmap``."""
    hp = langevin.stack_hparams(step_sizes, setup.decay, setup.eps)
    out = {}
    for name, precondition in PRECONDITIONING.items():
        sampler = setup.build(precondition)
        run = jax.jit(lambda k, z, h, th, xx: diagnostics.chain_curves(k, sampler, z, h, th, xx,
                                                                        num_steps=num_steps))
        curves = jax.device_get(run(rng_key, z0, hp, setup.state.params["decoder"], x))
        for i, step_size in enumerate(step_sizes):
            out[label(name, step_size)] = jax.tree.map(lambda a: np.asarray(a[i]), curves)
    return out


def diverged_at(curves: diagnostics.ChainCurves) -> int | None:
    """First step whose batch mean of log p is not finite (a diverged chain), or None."""
    bad = np.flatnonzero(~np.isfinite(curves.delta_log_p_mean))
    return int(bad[0]) if bad.size else None


def usable(curves: diagnostics.ChainCurves) -> bool:
    """The chains stayed finite (and, for MALA, accepted at least ``MIN_ACCEPTANCE`` of proposals)."""
    accepted = curves.acceptance_mean is None or curves.acceptance_mean.mean() >= MIN_ACCEPTANCE
    return diverged_at(curves) is None and accepted


def usable_step_sizes(curves: dict[str, diagnostics.ChainCurves], step_sizes: Sequence[float],
                      run_step_size: float) -> dict[str, float]:
    """Per setting: ``run_step_size`` if :func:`usable`, else the largest usable step size, else the smallest."""
    chosen = {}
    for name in PRECONDITIONING:
        stable = [s for s in step_sizes if usable(curves[label(name, s)])]
        chosen[name] = run_step_size if run_step_size in stable else max(stable) if stable else min(step_sizes)
    return chosen


def trajectories_by_setting(setup: ChainSetup, x: jax.Array, z0: jax.Array, step_sizes: dict[str, float], *,
                            num_steps: int, rng_key: jax.Array) -> tuple[dict, dict]:
    """Per setting, each image's path z_0..z_T on its own 2 principal components (list of (T + 1, 2)
    arrays), and the fraction of the path's variance they explain."""
    paths, explained = {}, {}
    for name, precondition in PRECONDITIONING.items():
        sampler, hp = setup.build(precondition), setup.hparams(step_sizes[name])
        run = jax.jit(lambda k, z, th, xx: diagnostics.trajectories(k, sampler, z, hp, th, xx, num_steps=num_steps))
        zs = np.asarray(run(rng_key, z0, setup.state.params["decoder"], x))
        projections = [diagnostics.pca_project(zs[:, b]) for b in range(zs.shape[1])]
        paths[label(name, step_sizes[name])] = [p for p, _ in projections]
        explained[label(name, step_sizes[name])] = [float(frac.sum()) for _, frac in projections]
    return paths, explained


def convergence_by_setting(setup: ChainSetup, x: jax.Array, step_sizes: dict[str, float], *, num_steps: int,
                           num_chains: int, overdispersion: float, warmup: int, start_key: jax.Array,
                           rng_key: jax.Array) -> tuple[dict, dict]:
    """Split R-hat / ESS summaries and the per-(image, dimension) R-hat, per setting.

    ``num_chains`` chains per image start at encoder mean + ``overdispersion`` x encoder sd x
    N(0, I) (drawn with ``start_key``); the chains run with ``rng_key``; the first ``warmup``
    draws of each are dropped.
    """
    k_start, k_chain = start_key, rng_key
    mean, variance = setup.model.encoder.apply({"params": setup.state.params["encoder"]}, x)
    starts = diagnostics.overdispersed_starts(k_start, mean, variance, num_chains, overdispersion)
    x_rows = jnp.tile(x, (num_chains, 1, 1, 1))
    summaries, rhats = {}, {}
    for name, precondition in PRECONDITIONING.items():
        sampler, hp = setup.build(precondition), setup.hparams(step_sizes[name])
        run = jax.jit(lambda k, s, th, xx: diagnostics.chain_draws(k, sampler, s, hp, th, xx, num_steps=num_steps))
        draws = run(k_chain, starts, setup.state.params["decoder"], x_rows)
        rhat, ess = jax.jit(diagnostics.convergence_statistics, static_argnums=1)(draws, warmup)
        summaries[label(name, step_sizes[name])] = {"step_size": step_sizes[name], "draws_per_chain": num_steps - warmup,
                                                    **diagnostics.convergence_summary(rhat, ess)}
        rhats[label(name, step_sizes[name])] = np.asarray(rhat)
    return summaries, rhats


def curve_summary(curves: dict[str, diagnostics.ChainCurves]) -> dict:
    """Per curve: where it diverged (or None), its final log p gain (mean, sd, nats), drift norms,
    and MALA's mean acceptance."""
    return {name: {"diverged_at_step": diverged_at(c),
                   "delta_log_p_final_mean": float(c.delta_log_p_mean[-1]),
                   "delta_log_p_final_sd": float(c.delta_log_p_sd[-1]),
                   "drift_norm_start": float(c.drift_norm_mean[0]),
                   "drift_norm_final": float(c.drift_norm_mean[-1]),
                   **({} if c.acceptance_mean is None else {"acceptance_mean": float(c.acceptance_mean.mean())})}
            for name, c in curves.items()}
