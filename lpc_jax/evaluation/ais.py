"""Annealed importance sampling (AIS) of log p(x), and its reverse for bidirectional Monte Carlo.

AIS (Neal 2001, "Annealed importance sampling") estimates the normaliser Z = p(x)
of the unnormalised posterior f(z) = p(x, z) by moving each chain along the
geometric path between an initial distribution p_0(z) (normalised, easy to sample:
the prior, or the encoder's q(z|x)) and f,

    f_beta(z) = p_0(z)^(1 - beta) f(z)^beta,        0 = beta_0 < beta_1 < ... < beta_K = 1,

    z_0 ~ p_0;   for k = 1..K:   log w += (beta_k - beta_{k-1}) (log f(z) - log p_0(z));
                                  z ~ T_k(z, .),   T_k leaving f_{beta_k} invariant,

so that E[w] = Z exactly and, over C independent chains per image,
log (1/C) sum_c w_c is a stochastic lower bound on log p(x) (Jensen). T_k is one
(or more) Metropolis-adjusted Langevin steps (:mod:`lpc_jax.sampling.mala`) with a
fixed diagonal metric h_k (the step size of temperature k, per image): exact MH
transitions, so the estimate has no discretisation bias. Step sizes must not
adapt inside the estimating run (that breaks E[w] = Z); :func:`tune_step_sizes`
adapts them in a separate pilot pass whose schedule is then held fixed.

Run backwards from an exact posterior sample (beta from 1 to 0), the same
recursion gives E[w_rev] = 1 / Z, hence a stochastic UPPER bound
-log (1/C) sum_c w_rev,c on log p(x). On data simulated from the model, the
latent that generated x is an exact posterior sample, so the forward and reverse
estimates sandwich log p(x): bidirectional Monte Carlo (Grosse, Ghahramani &
Adams 2015, "Sandwiching the marginal likelihood using bidirectional Monte
Carlo"; applied to decoder-based models by Wu, Burda, Salakhutdinov & Grosse 2017).

Schedules: linear, or sigmoidal (Grosse, Maddison & Salakhutdinov 2013; Wu et al.
2017, section 4): beta_k = (s(delta (2k/K - 1)) - s(-delta)) / (s(delta) - s(-delta)).

Why not blackjax's tempered SMC: it resamples particles between temperatures (SMC,
not independent AIS chains, so no per-chain weights for a per-image standard error),
its path is fixed to prior x likelihood^lambda (no encoder start), it runs
one target at a time (images would be an outer vmap of whole particle systems) and
it has no reverse pass for BDMC. The recursion above is ten lines on top of the
package's tested MALA kernel.

Memory is flat in K (one ``lax.scan`` over the schedule); the chains of all the
images of a batch are one (C * B, D) batch of MALA chains.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lpc_jax.sampling import langevin, mala

Array = jax.Array

SCHEDULES = ("sigmoid", "linear")
_LOG_2PI = math.log(2.0 * math.pi)


class AISResult(NamedTuple):
    """One AIS (or reverse AIS) run over a batch of B images with C chains each."""

    log_weights: Array  # (C, B) log w of each chain, nats
    log_marginal: Array  # (B,) log-mean-exp of the weights over chains: the estimate of log p(x), nats
    stderr: Array  # (B,) delta-method standard error of log_marginal, nats
    ess: Array  # (B,) effective sample size of the chains' weights, in [1, C]
    acceptance: Array  # (K,) mean MALA acceptance probability at each temperature
    z: Array  # (C, B, D) the chains' final latents


def schedule(name: str, num_steps: int, delta: float = 4.0) -> Array:
    """The K + 1 inverse temperatures 0 = beta_0 < ... < beta_K = 1, (K + 1,) float32.

    Args:
      name: ``"sigmoid"`` (dense at both ends, Grosse et al. 2013) or ``"linear"``.
      num_steps: K >= 1 intermediate distributions (transitions).
      delta: steepness of the sigmoid schedule (> 0); ignored by ``linear``.

    Raises:
      ValueError: unknown name, K < 1 or delta <= 0.
    """
    if name not in SCHEDULES:
        raise ValueError(f"unknown AIS schedule {name!r}; choose one of {SCHEDULES}")
    if num_steps < 1:
        raise ValueError(f"AIS needs num_steps >= 1 intermediate distributions; got {num_steps}")
    t = np.linspace(0.0, 1.0, num_steps + 1)
    if name == "linear":
        return jnp.asarray(t, jnp.float32)
    if delta <= 0:
        raise ValueError(f"the sigmoid schedule needs delta > 0; got {delta}")
    s = 1.0 / (1.0 + np.exp(-delta * (2.0 * t - 1.0)))
    betas = (s - s[0]) / (s[-1] - s[0])
    betas[0], betas[-1] = 0.0, 1.0
    return jnp.asarray(betas, jnp.float32)


def diagonal_gaussian_log_prob(z: Array, mean: Array, std: Array) -> Array:
    """log N(z; mean, diag(std^2)), (..., D) -> (...) nats."""
    r = (z - mean) / std
    return -0.5 * jnp.sum(r * r + _LOG_2PI + 2.0 * jnp.log(std), axis=-1)


def log_mean_exp_stats(log_weights: Array) -> tuple[Array, Array, Array]:
    """(C, B) log weights -> (B,) log-mean-exp, delta-method standard error, ESS.

    With w_c / mean(w) = u_c, se(log mean w) ~= std(u) / sqrt(C) (the delta method) and
    ESS = (sum w)^2 / sum w^2. A single chain has se = nan (it cannot be estimated).
    """
    num_chains = log_weights.shape[0]
    lme = jax.nn.logsumexp(log_weights, axis=0) - math.log(num_chains)
    u = jnp.exp(log_weights - lme[None])
    se = jnp.std(u, axis=0, ddof=1) / math.sqrt(num_chains) if num_chains > 1 else jnp.full_like(lme, jnp.nan)
    ess = jnp.sum(u, axis=0) ** 2 / jnp.sum(u * u, axis=0)
    return lme, se, ess


def _anneal(keys: Array, z0: Array, betas: Array, step_sizes: Array, log_target_fn: Callable[[Array], Array],
            log_init_fn: Callable[[Array], Array], *, num_mcmc_steps: int = 1,
            adapt: tuple[float, float] | None = None):
    """The AIS recursion along ``betas`` (increasing: AIS; decreasing: reverse AIS).

    Args:
      keys: (K,) PRNG keys, one per transition.
      z0: (C, B, D) starting latents (from p_0 for AIS, from the posterior for reverse AIS).
      betas: (K + 1,) the path's inverse temperatures, betas[0] where z0 is.
      step_sizes: (K, B) MALA step size of the transition at betas[k + 1], per image.
      log_target_fn, log_init_fn: (C, B, D) -> (C, B) log f and log p_0, nats.
      num_mcmc_steps: static; MALA steps per temperature.
      adapt: pilot only, ``(target_acceptance, rate)``: the step size of the next
        temperature is multiplied by exp(rate (mean acceptance - target)), per image,
        and ``step_sizes[0]`` is only the start (the weights are then NOT unbiased).

    Returns:
      ``(z (C, B, D), log_w (C, B), acceptance (K,), used_step_sizes (K, B))``.
    """
    num_chains, batch, dim = z0.shape
    hp = langevin.hparams(1.0)  # the step size is the fixed metric G = h_k (per image)
    rows = lambda a: a.reshape(num_chains * batch, *a.shape[2:])
    unrows = lambda a: a.reshape(num_chains, batch, *a.shape[1:])

    def log_path(z_rows, beta):
        z = unrows(z_rows)
        return rows((1.0 - beta) * log_init_fn(z) + beta * log_target_fn(z))

    def step(carry, xs):
        z, log_w, h_next = carry
        key, beta_prev, beta, h = xs
        h = h_next if adapt is not None else h
        log_w = log_w + (beta - beta_prev) * (log_target_fn(z) - log_init_fn(z))
        metric = jnp.broadcast_to(h[None, :, None], (num_chains, batch, 1)).reshape(num_chains * batch, 1)
        kernel = mala.build_kernel(log_path, precondition=False, metric=metric)
        state = mala.init(rows(z))
        accept = jnp.zeros((batch,), z.dtype)
        for key_m in jax.random.split(key, num_mcmc_steps):
            state, info = kernel(key_m, state, hp, beta)
            accept = accept + unrows(info.acceptance_prob).mean(0) / num_mcmc_steps
        if adapt is not None:
            h_next = h * jnp.exp(adapt[1] * (accept - adapt[0]))
        return (unrows(state.z), log_w, h_next), (accept.mean(), h)

    carry0 = (z0, jnp.zeros((num_chains, batch), z0.dtype), step_sizes[0])
    (z, log_w, _), (acceptance, used) = jax.lax.scan(step, carry0, (keys, betas[:-1], betas[1:], step_sizes))
    return z, log_w, acceptance, used


def _check(init_mean: Array, init_std: Array, num_steps: int, num_chains: int) -> tuple[Array, Array]:
    init_mean, init_std = jnp.asarray(init_mean), jnp.asarray(init_std)
    if init_mean.ndim != 2:
        raise ValueError(f"init_mean must be (B, D); got shape {init_mean.shape}")
    try:
        init_std = jnp.broadcast_to(init_std, init_mean.shape)
    except ValueError:
        raise ValueError(f"init_std {init_std.shape} does not broadcast to init_mean's {init_mean.shape}") from None
    if num_steps < 1 or num_chains < 1:
        raise ValueError(f"AIS needs num_steps >= 1 and num_chains >= 1; got {num_steps}, {num_chains}")
    return init_mean, init_std


def _step_schedule(step_size, num_steps: int, batch: int) -> Array:
    """``step_size`` broadcast to (K, B), one per transition and image; raises if not positive."""
    h = jnp.asarray(step_size, jnp.float32)
    if h.ndim == 1 and h.shape[0] == num_steps:
        h = h[:, None]
    try:
        h = jnp.broadcast_to(h, (num_steps, batch))
    except ValueError:
        raise ValueError(f"step_size of shape {h.shape} must be a scalar, (K,) = ({num_steps},) or "
                         f"(K, B) = ({num_steps}, {batch})") from None
    if not isinstance(h, jax.core.Tracer) and not bool(jnp.all(h > 0)):
        raise ValueError("AIS step sizes must be > 0 (tune them with tune_step_sizes)")
    return h


def _log_fns(log_joint_fn: Callable[[Array], Array], init_mean: Array, init_std: Array):
    log_target = jax.vmap(log_joint_fn)  # (C, B, D) -> (C, B)
    log_init = lambda z: diagonal_gaussian_log_prob(z, init_mean[None], init_std[None])
    return log_target, log_init


def ais_log_likelihood(rng_key: Array, log_joint_fn: Callable[[Array], Array], init_mean: Array,
                       init_std: Array, *, num_steps: int, num_chains: int, step_size=0.05,
                       schedule_name: str = "sigmoid", num_mcmc_steps: int = 1) -> AISResult:
    """AIS estimate of log p(x) for a batch of B images, C chains each (a stochastic lower bound).

    Args:
      rng_key: PRNG key.
      log_joint_fn: z (B, D) -> (B,) log p(x, z) in nats for the fixed batch of x
        (vmapped over the chains).
      init_mean, init_std: (B, D) mean and standard deviation (broadcastable) of the
        diagonal Gaussian p_0 the chains start from: the prior (0, prior_scale) or the
        encoder's (mean, sqrt(variance)).
      num_steps: K, the number of intermediate distributions (static).
      num_chains: C independent chains per image (static).
      step_size: MALA step size h (latent units^2 per unit drift), a scalar, (K,) per
        temperature or (K, B) per temperature and image (from :func:`tune_step_sizes`);
        fixed during the run.
      schedule_name: ``"sigmoid"`` or ``"linear"`` (:func:`schedule`).
      num_mcmc_steps: MALA steps per temperature (static).

    Returns:
      :class:`AISResult`; ``log_marginal`` (B,) nats.

    Raises:
      ValueError: bad shapes, counts or non-positive step sizes.
    """
    init_mean, init_std = _check(init_mean, init_std, num_steps, num_chains)
    betas = schedule(schedule_name, num_steps)
    h = _step_schedule(step_size, num_steps, init_mean.shape[0])

    @jax.jit
    def run(rng_key, init_mean, init_std, h):
        k_init, k_chain = jax.random.split(rng_key)
        eps = jax.random.normal(k_init, (num_chains, *init_mean.shape), init_mean.dtype)
        log_target, log_init = _log_fns(log_joint_fn, init_mean, init_std)
        z, log_w, acc, _ = _anneal(jax.random.split(k_chain, num_steps), init_mean[None] + init_std[None] * eps,
                                   betas, h, log_target, log_init, num_mcmc_steps=num_mcmc_steps)
        return AISResult(log_w, *log_mean_exp_stats(log_w), acc, z)

    return run(rng_key, init_mean, init_std, h)


def reverse_ais_log_likelihood(rng_key: Array, log_joint_fn: Callable[[Array], Array], init_mean: Array,
                               init_std: Array, posterior_z: Array, *, num_steps: int, num_chains: int,
                               step_size=0.05, schedule_name: str = "sigmoid",
                               num_mcmc_steps: int = 1) -> AISResult:
    """Reverse AIS from exact posterior samples: a stochastic UPPER bound on log p(x) (BDMC).

    The path of :func:`ais_log_likelihood` run from beta = 1 to 0, starting every
    chain of image b at ``posterior_z[b]`` (or ``posterior_z[c, b]``), which must be an
    exact sample of p(z | x_b) (e.g. the latent that generated a simulated x_b).
    ``step_size`` is given per FORWARD transition, as in :func:`ais_log_likelihood`;
    temperature beta_k keeps its step size, beta_0 takes beta_1's.

    Returns:
      :class:`AISResult` whose ``log_marginal`` is -log (1/C) sum_c w_rev,c >= log p(x)
      in expectation, ``log_weights`` the reverse chains' log w_rev (C, B).
    """
    init_mean, init_std = _check(init_mean, init_std, num_steps, num_chains)
    posterior_z = jnp.asarray(posterior_z)
    if posterior_z.shape[-2:] != init_mean.shape:
        raise ValueError(f"posterior_z must be (B, D) or (C, B, D) with (B, D) = {init_mean.shape}; "
                         f"got {posterior_z.shape}")
    betas = schedule(schedule_name, num_steps)[::-1]
    h = _step_schedule(step_size, num_steps, init_mean.shape[0])
    h = jnp.concatenate([h[:-1][::-1], h[:1]])

    @jax.jit
    def run(rng_key, init_mean, init_std, posterior_z, h):
        log_target, log_init = _log_fns(log_joint_fn, init_mean, init_std)
        z0 = jnp.broadcast_to(posterior_z, (num_chains, *init_mean.shape))
        z, log_w, acc, _ = _anneal(jax.random.split(rng_key, num_steps), z0, betas, h, log_target, log_init,
                                   num_mcmc_steps=num_mcmc_steps)
        lme, se, ess = log_mean_exp_stats(log_w)
        return AISResult(log_w, -lme, se, ess, acc, z)

    return run(rng_key, init_mean, init_std, posterior_z, h)


def tune_step_sizes(rng_key: Array, log_joint_fn: Callable[[Array], Array], init_mean: Array, init_std: Array,
                    *, num_steps: int, num_chains: int, initial_step_size: float = 0.05,
                    schedule_name: str = "sigmoid", target_acceptance: float = 0.6, rate: float = 1.0) -> Array:
    """A pilot AIS pass that adapts the step size along the schedule; returns it fixed, (K, B).

    At each temperature the pilot takes one MALA step per chain at the current step
    size h (per image) and sets the next temperature's h to h exp(rate (a - target)),
    a the image's mean acceptance over its chains (a Robbins-Monro step on log h).
    The pilot's weights are discarded: run :func:`ais_log_likelihood` with the
    returned schedule and a fresh key, so that its step sizes do not depend on the
    chains whose weights form the estimate.

    Raises:
      ValueError: as :func:`ais_log_likelihood`, or a target outside (0, 1).
    """
    init_mean, init_std = _check(init_mean, init_std, num_steps, num_chains)
    if not 0.0 < target_acceptance < 1.0 or initial_step_size <= 0 or rate <= 0:
        raise ValueError(f"need 0 < target_acceptance < 1, initial_step_size > 0 and rate > 0; got "
                         f"{target_acceptance}, {initial_step_size}, {rate}")
    betas = schedule(schedule_name, num_steps)
    h0 = jnp.full((num_steps, init_mean.shape[0]), initial_step_size, jnp.float32)

    @jax.jit
    def run(rng_key, init_mean, init_std):
        k_init, k_chain = jax.random.split(rng_key)
        eps = jax.random.normal(k_init, (num_chains, *init_mean.shape), init_mean.dtype)
        log_target, log_init = _log_fns(log_joint_fn, init_mean, init_std)
        *_, used = _anneal(jax.random.split(k_chain, num_steps), init_mean[None] + init_std[None] * eps, betas, h0,
                           log_target, log_init, adapt=(target_acceptance, rate))
        return used

    return run(rng_key, init_mean, init_std)
