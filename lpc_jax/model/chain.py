"""The chain engine of the LPC train step (Algorithm 1, lines 4-10).

:func:`run_chain` runs T steps of a sampler's kernel in one ``lax.scan``, each ONE
VJP of log p(x, z; theta) giving the drift and the decoder gradient (eq. 8), with
grad_theta and the chain's moments accumulated in the carry (memory flat in T).
:func:`chain_log_joint` is log p as the chain evaluates it (float32 or a bf16
decoder), :func:`theta_grad_steps` the steps that take grad_theta when only every
k-th does, and :func:`run_chain_data_parallel` the same chain under ``shard_map``
(each device its rows' chains, one all-reduce after the T steps).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from lpc_jax.model import likelihoods, objectives
from lpc_jax.model.state import Model
from lpc_jax.sampling import langevin, preconditioner, samplers

Array = jax.Array


CHAIN_DTYPES = ("float32", "bfloat16")
# The chain's diagonal metric G (issue 22; docs/results.md, "The preconditioner against ground truth").
METRICS = ("auto", *preconditioner.FORMS, "encoder", "none")


def chain_metric(metric: str, precondition: bool, variance: Array) -> tuple[bool | str, Array | None]:
    """The samplers' ``(precondition, metric)`` arguments for the train step's ``metric`` choice.

    Args:
      metric: one of ``METRICS``. ``auto``: what ``precondition`` has always meant (True: the
        published Adam-style metric ``adam_paper``; False: G = 1). ``adam_paper`` / ``adam``:
        that adaptive form (:mod:`lpc_jax.sampling.preconditioner`). ``encoder``: the
        amortised posterior's variance sigma_q^2(x), per example and constant over the chain
        (MALA stays exact, ULA keeps only its discretisation bias). ``none``: G = 1.
      precondition: read only for ``auto``.
      variance: (B, D) the encoder's variance; no gradient flows through the metric.

    Returns:
      ``(precondition, fixed metric (B, D) or None)`` for :func:`lpc_jax.sampling.samplers.build`.

    Raises:
      ValueError: ``metric`` is not one of ``METRICS``.
    """
    if metric == "auto":
        return bool(precondition), None
    if metric in preconditioner.FORMS:
        return metric, None
    if metric == "encoder":
        return False, jax.lax.stop_gradient(variance)
    if metric == "none":
        return False, None
    raise ValueError(f"metric={metric!r} is invalid: choose one of {list(METRICS)}")


def chain_log_joint(model: Model, x: Array, *, prior_scale: float = 1.0,
                    chain_dtype: str = "float32") -> Callable[[Any, Array], Array]:
    """log p(x, z; theta) as the chain evaluates it: ``(theta, z (B, D)) -> (B,)`` nats, float32.

    ``float32``: ``model.log_joint`` itself. ``bfloat16``: the decoder runs in bf16 (its
    params, all but ``log_scale``, and z cast to bf16, so the decoder's VJP, i.e. the
    drift's and grad_theta's convolutions, is bf16); its output is cast back to float32
    and the likelihood and the prior are evaluated in float32 (bf16's spacing near 1 is
    2^-7, coarser than the 8-bit pixel grid's 2/255). The gradients w.r.t. theta and z
    come back float32 (the casts' transposes). This variant rebuilds the log joint from
    ``model.decoder``, ``model.likelihood`` and ``prior_scale``, as
    ``networks.make_log_joint`` builds ``model.log_joint``.

    Raises:
      ValueError: ``chain_dtype`` is not one of ``CHAIN_DTYPES``.
    """
    if chain_dtype == "float32":
        return lambda theta, z: model.log_joint(theta, x, z)
    if chain_dtype != "bfloat16":
        raise ValueError(f"chain_dtype={chain_dtype!r} is invalid: choose one of {list(CHAIN_DTYPES)}")
    low = lambda a: a.astype(jnp.bfloat16)

    def log_joint(theta, z):
        theta = {name: p if name == "log_scale" else jax.tree.map(low, p) for name, p in theta.items()}
        mean, log_scale = model.decoder.apply({"params": theta}, low(z))
        log_px = likelihoods.observation_log_prob(
            model.likelihood, x, mean.astype(jnp.float32), log_scale.astype(jnp.float32))
        return log_px + likelihoods.normal_prior_log_prob(z, prior_scale)

    return log_joint


def theta_grad_steps(num_steps: int, theta_grad_every: int, phase: Array) -> Array:
    """Which chain steps accumulate grad_theta: (T,) bool, True at t = phase + 1, phase + 1 + k, ...

    With t = 1..T the chain step and ``phase`` u uniform on {0, ..., k - 1}, every
    step is selected with probability 1/k, so weighting each selected step by k/T
    (not 1 / number selected) keeps the estimate of eq. 8's average
    (1/T) sum_t grad_theta log p(x, z_{t-1}) unbiased for every T, divisible by k or not.
    """
    return (jnp.arange(num_steps) - phase) % theta_grad_every == 0


def selected_steps(k_chain: Array, num_steps: int, theta_grad_every: int, phase: Array | int | None):
    """``theta_grad_steps`` at ``phase``, or at a phase drawn uniformly from ``fold_in(k_chain, T)``
    (a key disjoint from the T chain keys ``split(k_chain, T)``); None when k = 1."""
    if theta_grad_every == 1:
        return None
    if phase is None:
        phase = jax.random.randint(jax.random.fold_in(k_chain, num_steps), (), 0, theta_grad_every)
    return theta_grad_steps(num_steps, theta_grad_every, phase)


class Chain(NamedTuple):
    """What the train step needs from the chain (paper Algorithm 1, lines 4-10)."""

    state: langevin.LangevinState  # after T steps
    grad_theta: Any  # sum over the selected steps of grad_theta sum_b log p(x_b, z_{t-1,b})
    moments: objectives.ChainMoments  # of z_1..z_T, for the forward KL (eq. 11)
    log_p_trace: Array  # (T,) mean_b log p(x, z_{t-1}), nats
    drift_trace: Array  # (T,) mean_b |grad_z log p(x, z_{t-1})|
    accept_trace: Array | None = None  # (T,) mean_b acceptance probability (MALA only)


def run_chain(log_joint: Callable, theta, z0: Array, center: Array, hparams: langevin.LangevinHParams,
              keys: Array, *, precondition: bool | str, selected: Array | None, sampler: str = "ula",
              friction: float = 1.0, metric: Array | None = None, axis_name: str | None = None) -> Chain:
    """T Langevin steps in a ``lax.scan``; ``selected`` (T,) bool or None (every step).

    ``precondition`` and ``metric`` (a fixed (B, D) metric, e.g. the encoder's variance) are
    the samplers' (:func:`chain_metric`).

    A selected step is ONE VJP of log p w.r.t. (theta, z): the drift and grad_theta
    (eq. 8). An unselected one, under ``lax.cond``, is a VJP w.r.t. z only, so XLA drops
    the decoder's kernel-gradient convolutions. Under ``vmap`` with a batched
    ``selected`` the cond becomes a select and both branches run.

    With ``axis_name`` (under ``shard_map``, the batch's rows split over that axis) each
    shard runs its rows' chains, with the unsharded chain's noise, and sums its own
    grad_theta; the sum over shards (a ``psum``) and the traces' batch means (a
    ``pmean``) are taken once, after the loop.
    """
    build = functools.partial(samplers.build, sampler, precondition=precondition, metric=metric,
                              friction=friction, axis_name=axis_name)
    init, kernel = build(log_joint, with_param_grad=True)
    z_kernel = build(lambda z: log_joint(theta, z)).kernel
    # Varying over the shards, theta's cotangent stays each shard's own: the VJP of a
    # replicated theta would all-reduce it inside the loop, on every step.
    theta_shard = theta if axis_name is None else jax.lax.pcast(theta, axis_name, to="varying")

    def with_theta(key, lstate, g_theta):
        lstate, info, g_theta_t = kernel(key, lstate, hparams, theta_shard)
        return lstate, info, jax.tree.map(jnp.add, g_theta, g_theta_t)

    def z_only(key, lstate, g_theta):
        return *z_kernel(key, lstate, hparams), g_theta

    def chain_step(carry, xs):
        lstate, g_theta, moments = carry
        if selected is None:
            lstate, info, g_theta = with_theta(xs, lstate, g_theta)
        else:
            lstate, info, g_theta = jax.lax.cond(xs[1], with_theta, z_only, xs[0], lstate, g_theta)
        return (lstate, g_theta, objectives.accumulate_moments(moments, lstate.z)), (
            info.log_prob.mean(), info.drift_norm.mean(),
            info.acceptance_prob.mean() if hasattr(info, "acceptance_prob") else None)

    carry0 = (init(z0), jax.tree.map(jnp.zeros_like, theta_shard), objectives.init_moments(center))
    (lstate, g_theta, moments), traces = jax.lax.scan(
        chain_step, carry0, keys if selected is None else (keys, selected))
    if axis_name is not None:  # equal shards: the mean of the shards' batch means is the batch mean
        g_theta = jax.lax.psum(g_theta, axis_name)
        traces = jax.tree.map(lambda t: jax.lax.pmean(t, axis_name), traces)
    return Chain(lstate, g_theta, moments, *traces)


class ChainInputs(NamedTuple):
    """The traced arguments of one batch's chain, in the order :func:`run_chain_data_parallel` splits them."""

    theta: Any  # decoder params (replicated)
    x: Array  # (B, H, W, C) images (rows)
    z0: Array  # (B, D) starting latents (rows)
    center: Array  # (B, D) the encoder mean, the moments' centre (rows)
    hparams: langevin.LangevinHParams  # (replicated)
    keys: Array  # (T,) chain step keys (replicated)
    selected: Array | None  # (T,) bool or None (replicated)
    metric: Array | None = None  # (B, D) fixed diagonal metric or None (rows)


def run_chain_data_parallel(mesh: jax.sharding.Mesh, run: Callable[..., Chain], inputs: ChainInputs, *,
                            init: Callable) -> Chain:
    """``run(inputs, axis_name=...)`` under ``shard_map`` over ``mesh``'s one axis.

    The rows of ``x``, ``z0``, ``center`` and ``metric`` (and of the chain state and moments it
    returns) are split over the axis; theta, hparams, keys, ``selected`` and the
    returned grad_theta and traces are replicated. ``init`` is the sampler's, for
    the state's layout: its per-chain fields are rows, its step count is replicated.
    """
    (axis,) = mesh.axis_names
    rows, whole = P(axis), P()
    state_specs = jax.tree.map(lambda a: whole if a.ndim == 0 else rows, jax.eval_shape(init, inputs.z0))
    return jax.shard_map(
        functools.partial(run, axis_name=axis), mesh=mesh,
        in_specs=(ChainInputs(whole, rows, rows, rows, whole, whole, whole, rows),),
        out_specs=Chain(state_specs, whole, rows, whole, whole, whole),
    )(inputs)


def check_mesh(mesh: jax.sharding.Mesh, batch: int) -> None:
    """Raises ValueError unless ``mesh`` is 1-D and its device count divides ``batch``."""
    if len(mesh.axis_names) != 1:
        raise ValueError(f"mesh has axes {mesh.axis_names}: the chain shards its batch over a 1-D mesh "
                         "(distributed.mesh())")
    if batch % mesh.size:
        raise ValueError(f"batch of {batch} rows cannot be split evenly over the mesh's {mesh.size} devices: "
                         f"use a batch size that is a multiple of {mesh.size}, or a smaller mesh")
