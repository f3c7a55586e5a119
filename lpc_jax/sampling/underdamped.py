"""Underdamped (kinetic) Langevin dynamics over batched latents, with the LPC metric.

The diffusion, in velocity form with the diagonal metric G as inverse mass:

    dz = v dt,    dv = G grad log p(z) dt - friction * v dt + sqrt(2 * friction * G) dW

leaves p(z) N(v; 0, G) invariant for fixed G. It is discretised by the OBABO
splitting (Bussi & Parrinello 2007) with the step boundary moved to after the
position update, so that each step takes its one gradient at z_{t-1}, where
ULA takes it (and where the LPC train step wants the params gradient, eq. 8).
With h the step size (a time step) and c = exp(-friction * h):

    B:  v <- v + (h/2) G g(z_{t-1})
    O:  v <- c v + sqrt((1 - c^2) G) xi,    xi ~ N(0, I)     (O(h) = O(h/2) O(h/2))
    B:  v <- v + (h/2) G g(z_{t-1})
    A:  z_t = z_{t-1} + h v

The z sequence is exactly OBABO's (the two O(h/2) of consecutive OBABO steps
merge into one O(h)). What follows, and what ``tests/sampling/test_samplers.py`` checks:

* friction -> infinity (c = 0): z_t = z_{t-1} + (h^2/2) G g + h sqrt(G) xi, which is
  the ULA move of :mod:`lpc_jax.sampling.langevin` at step size h^2 / 2, noise for noise;
* Gaussian target N(mu, Sigma) (precision P) with G = 1: for every friction the
  stationary z covariance is Sigma (I - h^2 P / 4)^{-1} (velocity Verlet conserves
  a shadow quadratic energy; the O step preserves N(0, G)), i.e. ULA's law at
  step size h^2 / 2; the velocity after the O step is exactly N(0, G), so the
  kinetic energy reported there has stationary mean D / 2 nats.

With the adaptive preconditioner, G_t comes from the drift at z_{t-1} and is
held fixed within the step; v carries over between steps as it is (the
metric's own drift term is dropped, as for ULA). ``noise=False`` gives
heavy-ball momentum ascent (v <- c v in the O step).

API as :mod:`lpc_jax.sampling.langevin`, with a velocity in the state and ``friction`` in
the (traced) hparams::

    kernel = underdamped.build_kernel(log_prob_fn, precondition=False)
    state = underdamped.init(z0)                          # v = 0
    state, info = kernel(rng_key, state, underdamped.hparams(0.3, friction=1.0), *args)
    state, infos = langevin.sample_chain(rng_key, kernel, state, hparams, num_steps, *args)
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from lpc_jax.sampling import langevin, preconditioner

Array = jax.Array


class UnderdampedState(NamedTuple):
    z: Array  # (B, D) current latents
    v: Array  # (B, D) velocity dz/dt, latent units per unit time (after the last B half-kick)
    m: Array  # (B, D) EMA of the squared drift (zeros when not preconditioning)
    count: Array  # shape=(), int32: steps taken


class UnderdampedInfo(NamedTuple):
    log_prob: Array  # (B,) log p(z_{t-1}) in nats, where the drift was taken
    drift_norm: Array  # (B,) L2 norm of the drift at z_{t-1}
    kinetic_energy: Array  # (B,) 0.5 sum_d v_d^2 / G_d after the O step, nats


class UnderdampedHParams(NamedTuple):
    step_size: Array  # shape=(), time step h > 0
    decay: Array  # shape=(), beta in [0, 1), preconditioner EMA decay
    eps: Array  # shape=(), > 0, added to m_hat
    friction: Array  # shape=(), friction >= 0, per unit time


def hparams(step_size: float, friction: float = 1.0, decay: float = 0.99, eps: float = 1e-8) -> UnderdampedHParams:
    """Builds float32 ``UnderdampedHParams``, each of shape () (unchecked: they may be traced)."""
    f = lambda v: jnp.asarray(v, jnp.float32)
    return UnderdampedHParams(f(step_size), f(decay), f(eps), f(friction))


def from_langevin(hparams: langevin.LangevinHParams, friction: float | Array) -> UnderdampedHParams:
    """``LangevinHParams`` (step size, decay, eps) plus a friction, e.g. for the LPC train step."""
    return UnderdampedHParams(*hparams, jnp.asarray(friction, hparams.step_size.dtype))


def init(z: Array, v: Array | None = None) -> UnderdampedState:
    """Chain state at ``z`` (B, D) with velocity ``v`` (default 0) and an empty moment estimate."""
    v = jnp.zeros_like(z) if v is None else v
    return UnderdampedState(z, v, preconditioner.init(z), jnp.zeros((), jnp.int32))


def update(rng_key: Array, state: UnderdampedState, drift: Array, hparams: UnderdampedHParams, *,
           precondition: bool | str = True, noise: bool = True, metric: Array | None = None,
           axis_name: str | None = None):
    """One B O B A step given the drift at ``state.z`` (see the module docstring).

    Args:
      rng_key: PRNG key for the O step's xi.
      state: current state; ``state.z`` and ``state.v`` are (B, D).
      drift: (B, D) grad_z log p at ``state.z``.
      hparams: step size h, decay, eps, friction (traced).
      precondition, noise, metric, axis_name: as in :func:`lpc_jax.sampling.langevin.update`.

    Returns:
      ``(next_state, kinetic_energy)``, the latter (B,) nats, after the O step.
    """
    m, g_metric = langevin.diagonal_metric(state, drift, hparams, precondition=precondition, metric=metric)
    kick = 0.5 * hparams.step_size * g_metric * drift
    c = jnp.exp(-hparams.friction * hparams.step_size)
    v = c * (state.v + kick)
    if noise:
        xi = langevin.draw_rows(jax.random.normal, rng_key, drift.shape, drift.dtype, axis_name)
        v = v + jnp.sqrt((1.0 - c * c) * g_metric) * xi
    kinetic_energy = 0.5 * jnp.sum(v * v / g_metric, axis=-1)
    v = v + kick
    return UnderdampedState(state.z + hparams.step_size * v, v, m, state.count + 1), kinetic_energy


def build_kernel(log_prob_fn: Callable[..., Array], precondition: bool | str = True, noise: bool = True,
                 metric: Array | None = None, *, with_param_grad: bool = False,
                 axis_name: str | None = None) -> Callable:
    """Returns the underdamped Langevin kernel for ``log_prob_fn``.

    Args and returns as :func:`lpc_jax.sampling.langevin.build_kernel`, with
    ``UnderdampedState``, ``UnderdampedHParams`` and ``UnderdampedInfo``; with
    ``with_param_grad``, ``grad_params`` is taken at the pre-move ``state.z``
    from the same VJP as the drift; ``axis_name`` as there.
    """

    preconditioner.resolve(precondition)  # an unknown form fails here, not when traced
    def transition(rng_key, state, hparams, log_prob, drift, log_prob_at):
        del log_prob_at
        new_state, kinetic_energy = update(rng_key, state, drift, hparams, precondition=precondition,
                                           noise=noise, metric=metric, axis_name=axis_name)
        return new_state, UnderdampedInfo(log_prob, jnp.linalg.norm(drift, axis=-1), kinetic_energy)

    return langevin.kernel_from_transition(transition, log_prob_fn, with_param_grad=with_param_grad)
