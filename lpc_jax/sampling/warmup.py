"""A fixed diagonal metric estimated in a warm-up: the exact alternative to the adaptive one.

Langevin dynamics with a constant metric G, z' = z + h G g + sqrt(2 h G) eta, leaves its
target invariant up to ULA's discretisation bias, and MALA with a constant G is exact
(:mod:`lpc_jax.sampling.mala`). The Adam-style metric of
:mod:`lpc_jax.sampling.preconditioner` changes along each chain and is neither. This
module runs a warm-up chain with any kernel (the adaptive one included), estimates each
latent's variance from its draws, and returns it as the metric for the chain that follows
(Stan's and blackjax's diagonal inverse mass matrix, ``window_adaptation``; for a
Gaussian with diagonal covariance, G = Sigma makes G P = I: every coordinate is sampled
at the same rate)::

    warm = mala.build_kernel(log_prob_fn, precondition="adam")
    state, metric = warmup.estimate_metric(key1, warm, mala.init(z0), hparams, 200)
    kernel = mala.build_kernel(log_prob_fn, metric=metric)           # exact from here on
    state, infos = langevin.sample_chain(key2, kernel, state, hparams, num_steps)

The variances are blackjax's Welford estimator (``blackjax.adaptation.mass_matrix``) per
chain, pooled over chains with Chan et al.'s formula when the chains share one target, and
regularised as Stan does: ``n / (n + 5) * var + 1e-3 * 5 / (n + 5)`` (latent units^2).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

Array = jax.Array

STAN_SHRINKAGE = (5.0, 1e-3)  # pseudo-count and the variance it pulls towards (Stan's warm-up)


def estimate_metric(rng_key: Array, kernel: Callable, state, hparams, num_steps: int, *args,
                    pool_chains: bool = True) -> tuple[object, Array]:
    """Runs ``num_steps`` warm-up steps and returns ``(state, metric)``.

    Args:
      rng_key: PRNG key, split into one key per step.
      kernel: ``kernel(key, state, hparams, *args) -> (state, info)`` of any sampler here;
        ``state.z`` is (B, D).
      state: the chain state to start from.
      hparams: the kernel's hyperparameters.
      num_steps: static warm-up length n >= 2; every step's z_t is one draw.
      *args: passed to the log density.
      pool_chains: static; True (chains with one target, e.g. a standalone sampler):
        one variance per coordinate from all B * n draws, shape (1, D). False (each row
        its own target, e.g. one posterior per image): a variance per chain, (B, D).

    Returns:
      ``(state, metric)``: the state after the warm-up and the regularised variances, a
      diagonal metric G in latent units^2, (1, D) or (B, D), float32.

    Raises:
      ValueError: ``num_steps < 2`` (a variance needs two draws).
    """
    if num_steps < 2:
        raise ValueError(f"num_steps={num_steps} is invalid: a variance needs a warm-up of at least 2 steps")
    # Imported here: importing blackjax starts JAX's backends, which a launcher must be able
    # to configure (distributed.set_cpu_devices) after importing lpc_jax.
    from blackjax.adaptation.mass_matrix import welford_algorithm

    w_init, w_update, w_final = welford_algorithm(is_diagonal_matrix=True)
    batch, dim = state.z.shape
    welford0 = jax.vmap(lambda _: w_init(dim))(jnp.arange(batch))

    def body(carry, key):
        state, welford = carry
        state, _ = kernel(key, state, hparams, *args)
        return (state, jax.vmap(w_update)(welford, state.z)), None

    (state, welford), _ = jax.lax.scan(body, (state, welford0), jax.random.split(rng_key, num_steps))
    if pool_chains:
        # Chan et al.: M2 of the union = sum of the chains' M2 + n * spread of their means.
        means = welford.mean
        m2 = welford.m2.sum(0) + num_steps * jnp.sum((means - means.mean(0, keepdims=True)) ** 2, axis=0)
        variance, count = (m2 / (batch * num_steps - 1))[None, :], batch * num_steps
    else:
        variance, count = jax.vmap(w_final)(welford)[0], num_steps
    pseudo, target = STAN_SHRINKAGE
    return state, (count / (count + pseudo) * variance + target * pseudo / (count + pseudo)).astype(jnp.float32)
