"""Unadjusted overdamped Langevin sampler over batched latents (paper eq. 5, 18-19).

The sampler knows only a log density. One step, for every chain in the batch:

    g   = grad_z log p(z_{t-1})                       (the drift)
    G   = 1, or the Adam-style metric of lpc_jax.sampling.preconditioner
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

With ``with_param_grad=True`` the log density also takes leading parameters,
``log_prob_fn(params, z, *args) -> (B,)``, and the kernel returns their
gradient from the same VJP that gives the drift (no second backward pass)::

    kernel = langevin.build_kernel(log_joint_fn, with_param_grad=True)
    state, info, grad_params = kernel(rng_key, state, hparams, params, *args)

``grad_params`` is the gradient of sum_b log p(z_b; params) w.r.t. ``params``
at the latents the drift was taken at (before the move); the LPC train step
sums it over the chain (eq. 8).

Inside ``jax.shard_map`` with the batch's rows sharded in equal blocks over a mesh
axis, pass that axis as ``axis_name``: each shard then draws the whole batch's noise
from the same key and keeps its own rows (:func:`draw_rows`), so the sharded chain
takes exactly the unsharded one's noise (the LPC train step's data-parallel chain,
:func:`lpc_jax.model.steps.lpc_train_step` with a ``mesh``).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lpc_jax.sampling import preconditioner

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
    """Builds float32 ``LangevinHParams``, each of shape ().

    Values are not checked here (they may be traced); ``Config.validate`` in
    :mod:`lpc_jax.training.config` is where step size, decay and eps are checked.
    """
    f = lambda v: jnp.asarray(v, jnp.float32)
    return LangevinHParams(f(step_size), f(decay), f(eps))


def stack_hparams(step_sizes: Sequence[float], decays: float | Sequence[float] = 0.99,
                  eps: float = 1e-8) -> LangevinHParams:
    """``LangevinHParams`` with (K,) float32 fields, for ``vmap`` over K settings.

    Member k equals ``hparams(step_sizes[k], decays[k], eps)``; a scalar ``decays``
    is shared by every member.

    Raises:
      ValueError: ``decays`` is a sequence of another length than ``step_sizes``.
    """
    step_sizes = [float(s) for s in np.ravel(step_sizes)]
    decays = [float(d) for d in np.ravel(decays)]
    if len(decays) == 1:
        decays = decays * len(step_sizes)
    if len(step_sizes) != len(decays):
        raise ValueError(f"need one decay per step size (or one for all); got {len(step_sizes)} step sizes "
                         f"and {len(decays)} decays")
    f = lambda v: jnp.asarray(v, jnp.float32)
    return LangevinHParams(f(step_sizes), f(decays), f([eps] * len(step_sizes)))


def init(z: Array) -> LangevinState:
    """Chain state at ``z`` (B, D) with an empty second-moment estimate."""
    return LangevinState(z, preconditioner.init(z), jnp.zeros((), jnp.int32))


def draw_rows(draw: Callable[..., Array], rng_key: Array, shape: tuple[int, ...], dtype=jnp.float32,
              axis_name: str | None = None) -> Array:
    """``draw(rng_key, shape, dtype)`` for a batch's rows, e.g. ``jax.random.normal``.

    Args:
      draw: a ``jax.random`` sampler taking ``(key, shape, dtype)``.
      rng_key: PRNG key, the same on every shard.
      shape: ``(B, ...)``, B the rows this shard holds.
      dtype: the draw's dtype.
      axis_name: None outside ``shard_map``; inside it, the mesh axis the batch is
        sharded over, in equal blocks of B rows in axis-index order (``P(axis_name)``).
        Each shard then draws all ``axis_size * B`` rows and keeps its block, so its
        rows are bit for bit those of the unsharded draw (an extra
        ``(axis_size - 1) * B`` rows of noise per step: (B, D) normals cost microseconds
        next to a decoder VJP).

    Returns:
      ``shape`` array of ``dtype``.
    """
    if axis_name is None:
        return draw(rng_key, shape, dtype)
    rows = shape[0]
    full = draw(rng_key, (rows * jax.lax.axis_size(axis_name), *shape[1:]), dtype)
    return jax.lax.dynamic_slice_in_dim(full, jax.lax.axis_index(axis_name) * rows, rows)


def update(rng_key: Array, state: LangevinState, drift: Array, hparams: LangevinHParams, *,
           precondition: bool | str = True, noise: bool = True, metric: Array | None = None,
           axis_name: str | None = None) -> LangevinState:
    """The Langevin transition given the drift at ``state.z`` (eqs. 18-19).

    The kernels of :func:`build_kernel` are this update after one VJP; a caller
    that already has the drift may call it directly.

    Args:
      rng_key: PRNG key for the noise eta.
      state: current state; ``state.z`` is (B, D).
      drift: (B, D) grad_z log p at ``state.z``.
      hparams: step size, decay, eps (traced).
      precondition: static; the Adam-style metric G (True = ``adam_paper``, or a form of
        :data:`lpc_jax.sampling.preconditioner.FORMS`), False: G = 1.
      noise: static; False gives (preconditioned) gradient ascent, eq. 1.
      metric: optional fixed diagonal metric G, broadcastable to (B, D); it
        replaces the adaptive preconditioner (``precondition`` is then ignored).
      axis_name: static; the batch's mesh axis under ``shard_map`` (:func:`draw_rows`).

    Returns:
      The next ``LangevinState``.
    """
    m, metric = diagonal_metric(state, drift, hparams, precondition=precondition, metric=metric)
    z = state.z + hparams.step_size * metric * drift
    if noise:
        eta = draw_rows(jax.random.normal, rng_key, drift.shape, drift.dtype, axis_name)
        z = z + jnp.sqrt(2.0 * hparams.step_size * metric) * eta
    return LangevinState(z, m, state.count + 1)


def build_kernel(log_prob_fn: Callable[..., Array], precondition: bool | str = True, noise: bool = True,
                 metric: Array | None = None, *, with_param_grad: bool = False,
                 axis_name: str | None = None) -> Callable:
    """Returns the Langevin kernel for ``log_prob_fn``.

    Args:
      log_prob_fn: ``log_prob_fn(z, *args) -> (B,)``, differentiable in ``z``
        (B, D); with ``with_param_grad``, ``log_prob_fn(params, z, *args) -> (B,)``,
        differentiable in ``params`` (any pytree) and ``z``.
      precondition: static; Adam-style diagonal metric (section 1.3; True = ``adam_paper``, or
        a form name, :mod:`lpc_jax.sampling.preconditioner`) or G = 1 (False).
      noise: static; set False for plain (preconditioned) gradient ascent.
      metric: optional fixed diagonal metric G (see :func:`update`).
      with_param_grad: static; the kernel also returns the gradient w.r.t. ``params``.
      axis_name: static; the batch's mesh axis when the kernel runs under ``shard_map``
        (:func:`draw_rows`); ``grad_params`` is then this shard's rows' sum.

    Returns:
      ``kernel(rng_key, state, hparams, *args) -> (state, info)``, or with
      ``with_param_grad``, ``kernel(rng_key, state, hparams, params, *args) ->
      (state, info, grad_params)`` where ``grad_params`` (same tree as
      ``params``) is the gradient of sum_b log p(z_b; params) at the pre-move
      ``state.z``, from the same VJP as the drift.
    """

    preconditioner.resolve(precondition)  # an unknown form fails here, not when traced
    def transition(rng_key, state, hparams, log_prob, drift, log_prob_at):
        del log_prob_at  # ULA needs the density only where the drift was taken
        new_state = update(rng_key, state, drift, hparams, precondition=precondition, noise=noise, metric=metric,
                           axis_name=axis_name)
        return new_state, LangevinInfo(log_prob, jnp.linalg.norm(drift, axis=-1))

    return kernel_from_transition(transition, log_prob_fn, with_param_grad=with_param_grad)


def sample_chain(rng_key: Array, kernel: Callable, state: LangevinState, hparams: LangevinHParams,
                 num_steps: int, *args, return_trace: bool = False):
    """Runs ``num_steps`` kernel steps in a ``lax.scan`` over pre-split keys.

    Args:
      rng_key: PRNG key, split into one key per step.
      kernel: from :func:`build_kernel` (without ``with_param_grad``).
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


def diagonal_metric(state: LangevinState, drift: Array, hparams: LangevinHParams, *,
                    precondition: bool | str = True, metric: Array | None = None) -> tuple[Array, Array]:
    """The diagonal metric G of one step, and the updated second-moment estimate.

    Shared by every sampler built on this module (:func:`update`,
    :mod:`lpc_jax.sampling.mala`, :mod:`lpc_jax.sampling.underdamped`), so that all of them
    precondition alike.

    Args:
      state: any chain state with fields ``m`` (B, D) and ``count`` () int32.
      drift: (B, D) grad_z log p at ``state.z``.
      hparams: any hparams with fields ``decay`` and ``eps``.
      precondition: static; the Adam-style metric of :mod:`lpc_jax.sampling.preconditioner`
        (True: ``adam_paper``, the published form; or a form name, ``adam`` / ``adam_paper``),
        False: G = 1.
      metric: optional fixed G, broadcastable to (B, D); it wins over ``precondition``.

    Returns:
      ``(m, G)``, each (B, D): ``m`` advanced by one EMA step when the adaptive
      preconditioner is on (else ``state.m`` unchanged), and G in latent units^2
      per unit drift.
    """
    if metric is not None:
        return state.m, jnp.broadcast_to(metric, drift.shape)
    form = preconditioner.resolve(precondition)
    if form is not None:
        return preconditioner.update(state.m, drift, state.count, hparams.decay, hparams.eps, form)
    return state.m, jnp.ones_like(drift)


def kernel_from_transition(transition: Callable, log_prob_fn: Callable[..., Array], *,
                           with_param_grad: bool = False) -> Callable:
    """A kernel that takes ONE VJP at ``state.z`` and hands its results to ``transition``.

    The common body of every sampler here (ULA, :mod:`lpc_jax.sampling.mala`,
    :mod:`lpc_jax.sampling.underdamped`): chains are independent rows, so one VJP with a
    ones cotangent gives every chain's drift, its log density and the
    chain-summed params gradient from a single forward and backward pass.

    Args:
      transition: ``transition(rng_key, state, hparams, log_prob, drift,
        log_prob_at) -> (state, info)``, with ``log_prob`` (B,) and ``drift``
        (B, D) at ``state.z``, and ``log_prob_at(z) -> (B,)`` the log density
        under the same params and args (for a sampler that needs it elsewhere,
        e.g. at a proposal).
      log_prob_fn: as in :func:`build_kernel`.
      with_param_grad: static; as in :func:`build_kernel`.

    Returns:
      ``kernel(rng_key, state, hparams, *args) -> (state, info)``, or with
      ``with_param_grad``, ``kernel(rng_key, state, hparams, params, *args) ->
      (state, info, grad_params)``, ``grad_params`` taken at the pre-move ``state.z``.
    """
    log_prob_of = log_prob_fn if with_param_grad else (lambda params, z, *args: log_prob_fn(z, *args))

    def param_grad_kernel(rng_key, state, hparams, params, *args):
        log_prob, vjp_fn = jax.vjp(lambda p, z: log_prob_of(p, z, *args), params, state.z)
        grad_params, drift = vjp_fn(jnp.ones_like(log_prob))
        new_state, info = transition(rng_key, state, hparams, log_prob, drift,
                                     lambda z: log_prob_of(params, z, *args))
        return new_state, info, grad_params

    if with_param_grad:
        return param_grad_kernel

    def kernel(rng_key, state, hparams, *args):
        new_state, info, _ = param_grad_kernel(rng_key, state, hparams, (), *args)
        return new_state, info

    return kernel
