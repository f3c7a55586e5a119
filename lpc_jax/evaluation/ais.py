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

Not blackjax's tempered SMC: it resamples between temperatures (no independent
per-chain weights for a per-image standard error), fixes the path to prior x
likelihood^lambda, runs one target at a time and has no reverse pass for BDMC.

Memory is flat in K (one ``lax.scan``); the chains of a batch's images are one
(C * B, D) batch of MALA chains, each carrying log f and its gradient at its point,
so a temperature costs one decoder VJP (at the proposal).
"""

from __future__ import annotations

import functools
import math
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lpc_jax.data import sources
from lpc_jax.model.state import Model
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
    """The AIS recursion along ``betas`` (increasing: AIS; decreasing: reverse AIS): returns
    ``(z (C, B, D), log_w (C, B), acceptance (K,), used_step_sizes (K, B))``.

    Args:
      keys: (K,) PRNG keys, one per transition.
      z0: (C, B, D) starting latents (from p_0 for AIS, from the posterior for reverse AIS).
      betas: (K + 1,) the path's inverse temperatures, betas[0] where z0 is.
      step_sizes: (K, B) MALA step size of the transition at betas[k + 1], per image.
      log_target_fn, log_init_fn: (C, B, D) -> (C, B) log f and log p_0, nats.
      num_mcmc_steps: static; MALA steps per temperature.
      adapt: pilot only, ``(target_acceptance, rate)``: each image's next step size is h exp(rate
        (mean acceptance - target)) from ``step_sizes[0]`` (the weights are then NOT unbiased).
    """
    num_chains, batch, _ = z0.shape
    rows = lambda a: a.reshape(num_chains * batch, *a.shape[2:])
    unrows = lambda a: a.reshape(num_chains, batch, *a.shape[1:])

    def value_and_drift(fn, z_rows):  # (N,) log density and (N, D) its gradient, one VJP
        value, vjp_fn = jax.vjp(lambda z: rows(fn(unrows(z))), z_rows)
        return value, vjp_fn(jnp.ones_like(value))[0]

    def step(carry, xs):
        (z, log_f, grad_f, log_w, h_next), (key, beta_prev, beta, h) = carry, xs  # rows: (N, D), (N,)
        h = h_next if adapt is not None else h
        log_w = log_w + (beta - beta_prev) * (unrows(log_f) - log_init_fn(unrows(z)))
        metric = jnp.broadcast_to(h[None, :, None], (num_chains, batch, 1)).reshape(num_chains * batch, 1)
        accept, chain = jnp.zeros((batch,), z.dtype), (z, log_f, grad_f)
        for key_m in jax.random.split(key, num_mcmc_steps):
            chain, prob = _mala_on_path(key_m, chain, beta, metric, value_and_drift, (log_target_fn, log_init_fn))
            accept = accept + unrows(prob).mean(0) / num_mcmc_steps
        if adapt is not None:
            h_next = h * jnp.exp(adapt[1] * (accept - adapt[0]))
        return (*chain, log_w, h_next), (accept.mean(), h)

    log_f0, grad_f0 = value_and_drift(log_target_fn, rows(z0))
    carry0 = (rows(z0), log_f0, grad_f0, jnp.zeros((num_chains, batch), z0.dtype), step_sizes[0])
    (z, _, _, log_w, _), (acceptance, used) = jax.lax.scan(step, carry0, (keys, betas[:-1], betas[1:], step_sizes))
    return unrows(z), log_w, acceptance, used


def _mala_on_path(key, chain, beta, metric, value_and_drift, fns):
    """One MALA step (:mod:`lpc_jax.sampling.mala`'s move and ratio, G = h, unit step) on f_beta =
    p_0^(1 - beta) f^beta from ``chain`` = (z (N, D) rows, log f, grad log f at z); returns the
    next chain and the (N,) acceptance probabilities."""
    (z, log_f, grad_f), (key_move, key_accept) = chain, jax.random.split(key)
    mix = lambda f, p0: beta * f + (1.0 - beta) * p0
    log_0, grad_0 = value_and_drift(fns[1], z)
    log_p, drift, hp = mix(log_f, log_0), mix(grad_f, grad_0), langevin.hparams(1.0)
    moved = langevin.update(key_move, langevin.init(z), drift, hp, precondition=False, metric=metric).z
    (log_f_new, grad_f_new), (log_0_new, grad_0_new) = value_and_drift(fns[0], moved), value_and_drift(fns[1], moved)
    log_p_new, drift_new = mix(log_f_new, log_0_new), mix(grad_f_new, grad_0_new)
    log_alpha = (log_p_new - log_p + mala.log_proposal_density(z, moved, drift_new, metric, hp.step_size)
                 - mala.log_proposal_density(moved, z, drift, metric, hp.step_size))
    prob = jnp.where(jnp.isnan(log_alpha), 0.0, jnp.exp(jnp.minimum(log_alpha, 0.0)))  # NaN: a rejection
    accept = jax.random.uniform(key_accept, prob.shape, prob.dtype) < prob
    pick = lambda new, old: jnp.where(accept.reshape(-1, *([1] * (new.ndim - 1))), new, old)
    return (pick(moved, z), pick(log_f_new, log_f), pick(grad_f_new, grad_f)), prob


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
    if not isinstance(h, jax.core.Tracer) and not bool(jnp.all(h > 0)):  # traced: checked by the caller
        raise ValueError("AIS step sizes must be > 0 (tune them with tune_step_sizes)")
    return h


def _run_path(rng_key, log_joint_fn, init, betas, h, *, num_chains, z0=None, **kw):
    """:func:`_anneal` from ``z0`` (C, B, D), or from C draws of p_0 = N(init_mean, init_std^2)."""
    init_mean, init_std = init
    if z0 is None:
        k_init, rng_key = jax.random.split(rng_key)
        eps = jax.random.normal(k_init, (num_chains, *init_mean.shape), init_mean.dtype)
        z0 = init_mean[None] + init_std[None] * eps
    log_p0 = lambda z: diagonal_gaussian_log_prob(z, init_mean[None], init_std[None])
    return _anneal(jax.random.split(rng_key, len(betas) - 1), z0, betas, h, jax.vmap(log_joint_fn), log_p0, **kw)


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

    Each call compiles anew (``log_joint_fn`` is usually a fresh closure); inside a jitted
    function taking the data as arguments (as :func:`ais_per_image`) it compiles once.

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
        z, log_w, acc, _ = _run_path(rng_key, log_joint_fn, (init_mean, init_std), betas, h,
                                     num_chains=num_chains, num_mcmc_steps=num_mcmc_steps)
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
        z0 = jnp.broadcast_to(posterior_z, (num_chains, *init_mean.shape))
        z, log_w, acc, _ = _run_path(rng_key, log_joint_fn, (init_mean, init_std), betas, h,
                                     num_chains=num_chains, z0=z0, num_mcmc_steps=num_mcmc_steps)
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
    Its weights are discarded: run :func:`ais_log_likelihood` with the returned schedule
    and a fresh key, so the step sizes do not depend on the chains that form the estimate.

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
        return _run_path(rng_key, log_joint_fn, (init_mean, init_std), betas, h0, num_chains=num_chains,
                         adapt=(target_acceptance, rate))[3]

    return run(rng_key, init_mean, init_std)


# ---- A trained model's test images, in batches of one compiled shape. ----

class AISOptions(NamedTuple):
    """Settings of :func:`ais_per_image` (static: each value compiles its own program)."""

    num_steps: int = 1000  # K intermediate distributions
    num_chains: int = 16  # C chains per image
    schedule_name: str = "sigmoid"
    init: str = "prior"  # "prior": p_0 = N(0, prior_scale^2 I); "encoder": p_0 = q(z | x)
    prior_scale: float = 1.0  # the run's prior_scale (Config.prior_scale)
    step_size: float = 0.0  # fixed MALA step size; 0 = tune per image in a pilot pass
    pilot_chains: int = 4  # chains per image of the pilot pass
    target_acceptance: float = 0.6  # the pilot's target MALA acceptance


@functools.partial(jax.jit, static_argnames=("model", "options"))
def _ais_batch(params: Any, x: Array, rng_key: Array, latents: Array | None, *, model: Model,
               options: AISOptions) -> tuple[Array, ...]:
    log_joint = lambda z: model.log_joint(params["decoder"], x, z)
    if options.init == "encoder":
        mean, variance = model.encoder.apply({"params": params["encoder"]}, x)
        std = jnp.sqrt(variance)
    else:
        z_shape = latents.shape if latents is not None else jax.eval_shape(
            model.encoder.apply, {"params": params["encoder"]}, x)[0].shape
        mean, std = jnp.zeros(z_shape, jnp.float32), jnp.full(z_shape, options.prior_scale, jnp.float32)
    k_pilot, k_run = jax.random.split(rng_key)
    kw = dict(num_steps=options.num_steps, schedule_name=options.schedule_name)
    h = options.step_size
    if h == 0.0:
        h = tune_step_sizes(k_pilot, log_joint, mean, std, num_chains=options.pilot_chains,
                            target_acceptance=options.target_acceptance, **kw)
    if latents is None:
        r = ais_log_likelihood(k_run, log_joint, mean, std, num_chains=options.num_chains, step_size=h, **kw)
    else:
        r = reverse_ais_log_likelihood(k_run, log_joint, mean, std, latents, num_chains=options.num_chains,
                                       step_size=h, **kw)
    return r.log_marginal, r.stderr, r.ess, r.acceptance


def check_options(options: AISOptions) -> None:
    """Raises ValueError, naming the bad field, unless ``options`` can run."""
    if options.init not in ("prior", "encoder"):
        raise ValueError(f"AIS init must be 'prior' or 'encoder'; got {options.init!r}")
    if options.step_size < 0 or options.prior_scale <= 0 or options.pilot_chains < 1:
        raise ValueError(f"need step_size >= 0 (0 = pilot), prior_scale > 0, pilot_chains >= 1; got "
                         f"{options.step_size}, {options.prior_scale}, {options.pilot_chains}")
    schedule(options.schedule_name, options.num_steps)  # raises on a bad schedule or K
    if options.num_chains < 1:
        raise ValueError(f"AIS needs num_chains >= 1; got {options.num_chains}")


def ais_per_image(params: Any, model: Model, images: np.ndarray, rng_key: Array, *,
                  options: AISOptions = AISOptions(), batch_size: int = 25, latents: np.ndarray | None = None,
                  progress: Callable[[int, int], None] | None = None) -> dict[str, np.ndarray]:
    """AIS estimate of log p(x) of each image under a trained decoder (nats).

    Batch ``i`` holds images ``[i B, (i + 1) B)`` zero-padded to B rows (one compiled
    shape) and uses key ``fold_in(rng_key, i)``; each batch runs the pilot pass (when
    ``options.step_size`` is 0) and then the estimate, with the pilot's step sizes fixed.

    Args:
      params: ``{'decoder', 'encoder'}`` params; model: the run's Model.
      images: (N, H, W, C) uint8 images.
      rng_key: PRNG key.
      options: :class:`AISOptions`.
      batch_size: images per jitted call (B C chains run together).
      latents: optional (N, D) exact posterior samples (the latents that generated
        simulated ``images``): then reverse AIS, an upper bound, is run instead.
      progress: called as ``progress(images_done, N)`` before the first batch (0) and after each.

    Returns:
      ``{"log_marginal", "stderr", "ess"}`` each (N,) float64, and ``"acceptance"``
      (K,), the mean acceptance per temperature over the batches.

    Raises:
      ValueError: bad options, batch size, or ``latents`` not (N, D).
    """
    check_options(options)
    n = images.shape[0]
    if batch_size < 1 or n < 1:
        raise ValueError(f"need batch_size >= 1 and at least one image; got {batch_size}, {n}")
    if latents is not None and (latents.ndim != 2 or latents.shape[0] != n):
        raise ValueError(f"latents must be (N, D) with N = {n} images; got {latents.shape}")
    batch_size = min(batch_size, n)
    outs, accs = [], []
    if progress is not None:
        progress(0, n)
    for i, start in enumerate(range(0, n, batch_size)):
        x = sources.to_float(images[start:start + batch_size])
        valid = x.shape[0]
        pad = lambda a: np.concatenate([a, np.zeros((batch_size - valid, *a.shape[1:]), a.dtype)])
        z = None if latents is None else jnp.asarray(pad(np.asarray(latents[start:start + batch_size])))
        out = _ais_batch(params, jnp.asarray(pad(x)), jax.random.fold_in(rng_key, i), z, model=model, options=options)
        outs.append([np.asarray(a, np.float64)[:valid] for a in out[:3]])
        accs.append(np.asarray(out[3], np.float64))
        if progress is not None:
            progress(start + valid, n)
    cat = [np.concatenate(parts) for parts in zip(*outs)]
    return {"log_marginal": cat[0], "stderr": cat[1], "ess": cat[2], "acceptance": np.mean(accs, axis=0)}


def estimate_seconds(params: Any, model: Model, images: np.ndarray, *, options: AISOptions,
                     batch_size: int = 25) -> float:
    """Seconds :func:`ais_per_image` will take on ``images``, from one timed log-joint VJP.

    A MALA step costs one VJP of log p(x, z) per row (at the proposal; the chain
    caches it at its point); the pilot adds the same per pilot chain. Compilation
    is not included.
    """
    n = images.shape[0]
    batch_size = min(batch_size, n)
    x = jnp.asarray(np.repeat(sources.to_float(images[:1]), batch_size * options.num_chains, axis=0))
    z_dim = jax.eval_shape(model.encoder.apply, {"params": params["encoder"]}, x[:1])[0].shape[-1]
    vjp = jax.jit(lambda z: jax.grad(lambda z: model.log_joint(params["decoder"], x, z).sum())(z))
    z = jnp.zeros((x.shape[0], z_dim), jnp.float32)
    vjp(z).block_until_ready()
    t = time.perf_counter()
    vjp(z).block_until_ready()
    seconds_per_row_step = (time.perf_counter() - t) * 1.1 / x.shape[0]
    pilot = options.pilot_chains if options.step_size == 0.0 else 0
    num_batches = -(-n // batch_size)
    rows = num_batches * batch_size * (options.num_chains + pilot)
    return seconds_per_row_step * rows * options.num_steps
