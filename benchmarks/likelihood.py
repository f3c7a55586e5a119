"""Discretised-Gaussian likelihood: value and gradient, previous vs current formulation.

    python -m benchmarks.likelihood              # both shapes, 9 interleaved rounds
    python -m benchmarks.likelihood --rounds 15
    python -m benchmarks.likelihood --chain      # also the real train step's chain, old vs new

Measures, for Fashion-MNIST's shape (64, 28, 28, 1) and CelebA's (64, 64, 64, 3), the
milliseconds of one jitted ``value_and_grad`` of sum_b log p(x_b | mean_b, scale) w.r.t.
(mean, log_scale): what every Langevin chain step evaluates through the likelihood.
``mean`` and ``log_scale`` (shape (1, 1, 1, C)) are the paper decoder's output at
initialisation for a N(0, I) latent batch, ``x`` the benchmark batch of
``benchmarks.harness`` (random 8-bit images, or Fashion-MNIST when installed).
"old" is ``_reference`` below: the formulation ``lpc_jax.model.likelihoods`` used before,
copied verbatim (log Phi of both mirrored bin ends, a custom VJP per pixel); "new" is
``likelihoods.discretized_gaussian_log_prob``. Programs are compiled ahead of time and
timed in interleaved rounds (the machine may be shared); each figure is the median over
rounds of the best of ``--calls`` calls. Standalone calls also pay for their temporary
buffers (fresh pages every call); inside the chain's loop those are allocated once, so
use ``benchmarks.chain`` for the cost per chain step.

``--chain`` also compiles the real ``lpc_train_step`` (``benchmarks.harness``'s setting:
Jeffreys, preconditioned, batch 64) at its two chain lengths per shape, once with a log
joint built on each formulation (passed to the step's model, nothing patched), and
times the four programs in the same rounds: the marginal ms per chain step, old and new.

Printed: one row per shape and formulation, the ratio new / old, then as the LAST line
one JSON object: ``{shape}_old_ms``, ``{shape}_new_ms``, ``{shape}_ratio``, with
``--chain`` ``chain_step_ms_{old,new}_{shape}`` and ``chain_step_ratio_{shape}``, and ``device``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
from jax import lax

from benchmarks import harness
from lpc_jax.model import likelihoods
from lpc_jax.training import build

Array = jax.Array

# --- the previous formulation, verbatim (lpc_jax/model/likelihoods.py before this change), but for
# the helpers and constants the module still has, which it takes from there ---

_HALF_BIN, _SQRT_HALF, _LOG_2PI = likelihoods._HALF_BIN, likelihoods._SQRT_HALF, likelihoods._LOG_2PI
_sum_event, _unbroadcast = likelihoods._sum_event, likelihoods._unbroadcast
_LOG_SQRT_2PI = 0.5 * _LOG_2PI
_LOG_NDTR_LOWER = -10.0  # as jax.scipy.special.log_ndtr for float32


def _log_ndtr_and_hazard(x: Array) -> tuple[Array, Array]:
    """``(log Phi(x), N(x) / Phi(x))``, float32: one ``erfc``, one ``log``, one ``exp``.

    From x = -10 up, Phi(x) = erfc(-x / sqrt 2) / 2 directly (for x > 0 from
    t = Phi(-x) as 1 - t, whose log is then accurate to float32 rounding in
    absolute terms, as in ``jax.scipy.special.log_ndtr``). Below -10, where ``erfc``
    loses precision and then underflows, ``log_ndtr``'s order-3 asymptotic series
    Phi(x) = N(x) / (-x) * (1 - x^-2 + 3 x^-4 - 15 x^-6) takes over; it gives the
    hazard N / Phi = -x / series without subtracting two large logs.
    """
    t = 0.5 * lax.erfc(jnp.abs(x) * _SQRT_HALF)  # Phi(-|x|)
    xs = jnp.minimum(x, _LOG_NDTR_LOWER)
    inv_x2 = 1.0 / (xs * xs)
    series_over_x = (1.0 - inv_x2 * (1.0 - inv_x2 * (3.0 - 15.0 * inv_x2))) / -xs
    in_tail = x < _LOG_NDTR_LOWER
    cdf = jnp.where(x < 0, t, 1.0 - t)
    log_cdf = jnp.log(jnp.where(in_tail, series_over_x, cdf)) + jnp.where(in_tail, -0.5 * xs * xs - _LOG_SQRT_2PI, 0.0)
    hazard = jnp.where(in_tail, 1.0 / series_over_x, jnp.exp(-0.5 * x * x - _LOG_SQRT_2PI) / cdf)
    return log_cdf, hazard


def _bin_edges(x: Array, mean: Array, log_scale: Array):
    """Standardised bin edges ``(a, b)``, ``a = (x - 1/255 - mean) / sigma``, ``b`` likewise
    with ``+ 1/255``; the edge bins (x = -1, x = 1) get a = -inf, b = +inf."""
    inv_scale = jnp.exp(-log_scale)
    a = (x - _HALF_BIN - mean) * inv_scale
    b = (x + _HALF_BIN - mean) * inv_scale
    return jnp.where(x < -1.0 + _HALF_BIN, -jnp.inf, a), jnp.where(x > 1.0 - _HALF_BIN, jnp.inf, b)


def _log_mass_parts(x: Array, mean: Array, log_scale: Array):
    """Per-pixel log mass of its bin and what its derivative needs.

    A bin above the mean (a > 0) is mirrored, Phi(b) - Phi(a) = Phi(-a) - Phi(-b),
    so that P = Phi(hi) - Phi(lo) with both terms lower-tail CDFs (lo <= 0), and
    log P = log Phi(hi) + log(1 - r), r = Phi(lo) / Phi(hi) = exp(log Phi(lo) - log Phi(hi)).
    Returns ``(log_p, (flip, r, hazard_lo, hazard_hi))``, all (B, H, W, C).
    """
    a, b = _bin_edges(x, mean, log_scale)
    flip = a > 0
    log_lo, hazard_lo = _log_ndtr_and_hazard(jnp.where(flip, -b, a))
    log_hi, hazard_hi = _log_ndtr_and_hazard(jnp.where(flip, -a, b))
    log_r = jnp.minimum(log_lo - log_hi, -1e-30)
    return log_hi + jnp.log(-jnp.expm1(log_r)), (flip, jnp.exp(log_r), hazard_lo, hazard_hi)


@jax.custom_vjp
def _discretized_log_mass(x: Array, mean: Array, log_scale: Array) -> Array:
    """Per-pixel log mass of its bin, (B, H, W, C) -> (B, H, W, C) nats."""
    return _log_mass_parts(x, mean, log_scale)[0]


def _discretized_log_mass_fwd(x, mean, log_scale):
    log_p, parts = _log_mass_parts(x, mean, log_scale)
    return log_p, (x, mean, log_scale, parts)


def _discretized_log_mass_bwd(res, g):
    """d log P / d hi = hazard(hi) / (1 - r), d log P / d lo = -hazard(lo) r / (1 - r);
    an infinite end (edge bin) has r = 0 or hazard 0 and contributes nothing. mean and
    log_scale enter through a, b = (x -+ 1/255 - mean) exp(-log_scale)."""
    x, mean, log_scale, (flip, r, hazard_lo, hazard_hi) = res
    d_hi = hazard_hi / (1.0 - r) * g
    d_lo = jnp.where(r > 0, -hazard_lo * r / (1.0 - r), 0.0) * g
    d_a, d_b = jnp.where(flip, -d_hi, d_lo), jnp.where(flip, -d_lo, d_hi)
    inv_scale = jnp.exp(-log_scale)
    d_x = (d_a + d_b) * inv_scale
    # d a / d log_scale = -a; with the finite a, b (d_a = 0 where a is the -inf end).
    d_scale = -((x - _HALF_BIN - mean) * d_a + (x + _HALF_BIN - mean) * d_b) * inv_scale
    return d_x, _unbroadcast(-d_x, jnp.shape(mean)), _unbroadcast(d_scale, jnp.shape(log_scale))


_discretized_log_mass.defvjp(_discretized_log_mass_fwd, _discretized_log_mass_bwd)


def _reference(x: Array, mean: Array, log_scale: Array) -> Array:
    """``likelihoods.discretized_gaussian_log_prob`` as it was: same arguments, (B,) nats."""
    shape = jnp.broadcast_shapes(jnp.shape(x), jnp.shape(mean), jnp.shape(log_scale))
    x, mean = jnp.broadcast_to(x, shape), jnp.broadcast_to(mean, shape)
    return _sum_event(_discretized_log_mass(x, mean, log_scale))


# --- benchmark ---


def _value_and_grad(log_prob):
    return lambda x, mean, log_scale: jax.value_and_grad(
        lambda m, s: log_prob(x, m, s).sum(), argnums=(0, 1))(mean, log_scale)


def _inputs(shape: str):
    config, model, state, x, _ = harness.setup(harness.SHAPES[shape])
    z = jax.random.normal(jax.random.key(3), (config.batch_size, config.latent_dim))
    mean, log_scale = jax.jit(model.decoder.apply)({"params": state.params["decoder"]}, z)
    return x, mean, log_scale


def _time(programs: dict, args, rounds: int, calls: int) -> dict:
    times = {name: [] for name in programs}
    for _ in range(rounds):
        for name, fn in programs.items():
            best = float("inf")
            for _ in range(calls):
                t0 = time.perf_counter()
                jax.block_until_ready(fn(*args))
                best = min(best, 1e3 * (time.perf_counter() - t0))
            times[name].append(best)
    return {name: statistics.median(t) for name, t in times.items()}


def _with_likelihood(log_prob):
    """A step builder whose model's log joint uses ``log_prob(x, mean, log_scale)`` for the pixels
    (the benchmark setting's discretised Gaussian and N(0, I) prior, as ``networks.make_log_joint``)."""
    def make_step(config, model, mesh):
        def log_joint(theta, x, z):
            mean, log_scale = model.decoder.apply({"params": theta}, z)
            return log_prob(x, mean, log_scale) + likelihoods.normal_prior_log_prob(z, config.prior_scale)
        return build.make_train_step(config, model._replace(log_joint=log_joint), mesh)
    return make_step


def chain_section(out: dict, shape: str, rounds: int) -> None:
    """Marginal ms per chain step of the real train step, old vs new likelihood, same rounds."""
    marginal = harness.chain_step_ms(shape, {"old": _with_likelihood(_reference),
                                             "new": _with_likelihood(likelihoods.discretized_gaussian_log_prob)},
                                     rounds)
    t_short, t_long = harness.CHAIN_T[shape]
    print(f"{shape}  real train step, marginal ms per chain step (T = {t_short} vs {t_long})")
    for name in ("old", "new"):
        print(f"  {name:<4} {marginal[name]:9.3f} ms")
    print(f"  new / old {marginal['new'] / marginal['old']:9.3f}")
    out.update({f"chain_step_ms_old_{shape}": marginal["old"], f"chain_step_ms_new_{shape}": marginal["new"],
                f"chain_step_ratio_{shape}": marginal["new"] / marginal["old"]})


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--calls", type=int, default=5)
    p.add_argument("--chain", action="store_true",
                   help="also time the real train step's chain with each formulation (a few minutes)")
    args = p.parse_args(argv)
    out = {}
    for shape in ("28x28x1", "64x64x3"):
        inputs = _inputs(shape)
        programs = {name: jax.jit(_value_and_grad(f)).lower(*inputs).compile()
                    for name, f in (("old", _reference), ("new", likelihoods.discretized_gaussian_log_prob))}
        for fn in programs.values():
            jax.block_until_ready(fn(*inputs))
        ms = _time(programs, inputs, args.rounds, args.calls)
        print(f"{shape}  value_and_grad w.r.t. (mean, log_scale), batch 64, log_scale {tuple(inputs[2].shape)}")
        for name in programs:
            print(f"  {name:<4} {ms[name]:9.3f} ms")
        print(f"  new / old {ms['new'] / ms['old']:9.3f}")
        out.update({f"{shape}_old_ms": ms["old"], f"{shape}_new_ms": ms["new"], f"{shape}_ratio": ms["new"] / ms["old"]})
    if args.chain:
        for shape in ("28x28x1", "64x64x3"):
            chain_section(out, shape, max(3, args.rounds // 2))
    out["device"] = str(jax.devices()[0].device_kind)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
