"""Metropolis-adjusted Langevin (MALA) over batched latents, with the LPC metric.

One step, for every chain (row) of ``z`` (B, D), with h the step size:

    g, G      = grad_z log p(z), the diagonal metric of langevin.diagonal_metric
    z'        = z + h G g + sqrt(2 h G) eta                 (the ULA move, langevin.update)
    log q(b | a) = -sum_d (b - a - h G g(a))_d^2 / (4 h G_d)     (+ a constant that cancels)
    log alpha = log p(z') - log p(z) + log q(z | z') - log q(z' | z)
    z_t       = z' with probability min(1, alpha), else z   (one coin per chain)

G is held fixed within the step, so the two proposal densities share it and
their normalising constants cancel. With G fixed across steps (G = 1, or a
``metric`` passed in) the chain leaves p exactly invariant: unlike ULA it has
no discretisation bias at any step size, only a lower acceptance rate. With the
adaptive preconditioner, G_t is built from the drift at z_{t-1}; the chain is then
adaptive MCMC and exactly invariant only while G stays put (its stationary bias on
ground-truth targets: ``docs/results.md``).

What the EMA is fed (``adapt_on_proposal``). Fed only the drift at z_{t-1}, a chain
that rejects feeds the same drift again and again, so its metric converges to
1 / |g(z)| at a point where that may be huge (near a mode, |g| ~ 0): the proposal's
noise grows, it is rejected again, and the chain is stuck for good (issue 22: on a
64-d standard normal at step 0.3, 99.6% of chains never accept). With
``adapt_on_proposal=True`` (the default) the step's EMA input is the mean of the
squared drifts at z_{t-1} and at the proposal z': G_t is still built from m_{t-1}
and g(z_{t-1}) alone (so the proposal density is as above), but the state carries
m_t = decay m_{t-1} + (1 - decay) (g(z_{t-1})^2 + g(z')^2) / 2. A proposal thrown far
has a large drift, so a rejection now shrinks the next metric: negative feedback.

API as :mod:`lpc_jax.sampling.langevin` (same state, hparams and chain loop)::

    kernel = mala.build_kernel(log_prob_fn, precondition=False)
    state = mala.init(z0)                                # a langevin.LangevinState
    state, info = kernel(rng_key, state, hparams, *args)  # info.acceptance_prob (B,)
    state, infos = langevin.sample_chain(rng_key, kernel, state, hparams, num_steps, *args)

Cost per step: the VJP at z_{t-1} that ULA takes (drift, log p and, with
``with_param_grad``, the params gradient at the chain's current point, as in
eq. 8) plus one forward pass and z-gradient at the proposal. Caching the
proposal's drift would save the first only when the params gradient is not
wanted; the LPC train step wants it at z_{t-1}, so nothing is cached.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from lpc_jax.sampling import langevin, preconditioner

Array = jax.Array

init = langevin.init
hparams = langevin.hparams


class MALAInfo(NamedTuple):
    log_prob: Array  # (B,) log p(z_{t-1}) in nats, where the drift was taken
    drift_norm: Array  # (B,) L2 norm of the drift at z_{t-1}
    acceptance_prob: Array  # (B,) min(1, alpha) in [0, 1]
    is_accepted: Array  # (B,) bool: the chain moved to its proposal


def log_proposal_density(to: Array, start: Array, drift: Array, metric: Array, step_size: Array) -> Array:
    """log q(to | start) of the ULA move, up to the constant that cancels in alpha.

    Args:
      to, start: (B, D) latents.
      drift: (B, D) grad_z log p at ``start``.
      metric: (B, D) diagonal G, the same for both directions of a step.
      step_size: () h.

    Returns:
      (B,) -sum_d (to - start - h G drift)_d^2 / (4 h G_d), nats.
    """
    r = to - start - step_size * metric * drift
    return -jnp.sum(r * r / (4.0 * step_size * metric), axis=-1)


def build_kernel(log_prob_fn: Callable[..., Array], precondition: bool | str = True, metric: Array | None = None, *,
                 adapt_on_proposal: bool = True, with_param_grad: bool = False,
                 axis_name: str | None = None) -> Callable:
    """Returns the MALA kernel for ``log_prob_fn``.

    Args:
      log_prob_fn: as in :func:`lpc_jax.sampling.langevin.build_kernel`.
      precondition: static; Adam-style diagonal metric (held fixed within a step; True =
        ``adam_paper``, or a form of :mod:`lpc_jax.sampling.preconditioner`) or G = 1 (False).
      metric: optional fixed diagonal metric G, broadcastable to (B, D); wins over ``precondition``.
      adapt_on_proposal: static; with an adaptive metric, feed the EMA the mean squared drift of
        z_{t-1} and the proposal (see the module docstring); False feeds g(z_{t-1})^2 only, as the
        ULA chain does (a MALA chain can then trap itself).
      with_param_grad: static; the kernel also returns the gradient w.r.t. ``params``
        at the pre-move ``state.z``, from the same VJP as the drift.
      axis_name: static; the batch's mesh axis under ``shard_map`` (:func:`lpc_jax.sampling.langevin.draw_rows`):
        the proposal noise and the acceptance uniforms are the unsharded chain's.

    There is no ``noise`` switch: a deterministic proposal has no Metropolis
    correction (use ``langevin.build_kernel(noise=False)`` for gradient ascent).

    Returns:
      ``kernel(rng_key, state, hparams, *args) -> (state, MALAInfo)``, or with
      ``with_param_grad``, ``kernel(rng_key, state, hparams, params, *args) ->
      (state, MALAInfo, grad_params)``; ``state`` is a ``LangevinState``.
    """

    adaptive = metric is None and preconditioner.resolve(precondition) is not None

    def transition(rng_key, state, hparams, log_prob, drift, log_prob_at):
        key_move, key_accept = jax.random.split(rng_key)
        m, g_metric = langevin.diagonal_metric(state, drift, hparams, precondition=precondition, metric=metric)
        moved = langevin.update(key_move, langevin.LangevinState(state.z, m, state.count), drift, hparams,
                                metric=g_metric, axis_name=axis_name)
        proposal_log_prob, vjp_fn = jax.vjp(log_prob_at, moved.z)
        (proposal_drift,) = vjp_fn(jnp.ones_like(proposal_log_prob))
        log_alpha = (proposal_log_prob - log_prob
                     + log_proposal_density(state.z, moved.z, proposal_drift, g_metric, hparams.step_size)
                     - log_proposal_density(moved.z, state.z, drift, g_metric, hparams.step_size))
        # A NaN ratio (a proposal where log p is not finite) is a rejection.
        acceptance_prob = jnp.where(jnp.isnan(log_alpha), 0.0, jnp.exp(jnp.minimum(log_alpha, 0.0)))
        uniform = langevin.draw_rows(jax.random.uniform, key_accept, log_alpha.shape, log_alpha.dtype, axis_name)
        accept = uniform < acceptance_prob
        z = jnp.where(accept[:, None], moved.z, state.z)
        if adaptive and adapt_on_proposal:
            m = preconditioner.ema(state.m, 0.5 * (drift * drift + proposal_drift * proposal_drift), hparams.decay)
        info = MALAInfo(log_prob, jnp.linalg.norm(drift, axis=-1), acceptance_prob, accept)
        return moved._replace(z=z, m=m), info

    return langevin.kernel_from_transition(transition, log_prob_fn, with_param_grad=with_param_grad)
