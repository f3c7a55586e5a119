"""The LPC and VAE train steps: pure functions, jitted once at the call site.

``lpc_train_step`` is Algorithm 1 with the two typos fixed (see
:mod:`lpc_jax.langevin`): one encoder forward, T steps of the sampler's own
kernel (``langevin.build_kernel(..., with_param_grad=True)``) in a ``lax.scan``,
each taking ONE VJP of log p(x, z; theta) that gives both the drift (grad_z)
and the decoder gradient (grad_theta, eq. 8); grad_theta and the chain's
moments are accumulated in the scan carry so memory does not grow with T; then
one encoder VJP for the summed forward/reverse KL cotangents, and one Adam
update of (theta, phi).

Two static options cut the chain's cost: ``theta_grad_every=k`` takes grad_theta on
every k-th step only (a random phase, weight k/T: unbiased for eq. 8's average), the
other steps a VJP w.r.t. z alone; ``chain_dtype="bfloat16"`` runs the decoder's VJP in
bf16 with everything else float32.

Given a ``mesh`` (a data-parallel run over several devices) the chain runs under
``shard_map``: each device runs its rows' chains and sums its own grad_theta, with one
all-reduce after the T steps, where XLA's partitioning of the step would all-reduce on
every step (``benchmarks/RESULTS.md``).

``vae_train_step`` trains the very same networks with the reparameterised ELBO.

Both have signature ``step(state, x, rng_key, hparams) -> (state, metrics)``
once their static arguments are bound with ``functools.partial``; ``x`` is
(B, H, W, C) float32 in [-1, 1], metrics are float32 scalars (nats per example).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from lpc_jax import langevin, likelihoods, models, objectives, samplers
from lpc_jax.config import Config

Array = jax.Array


class TrainState(flax.struct.PyTreeNode):
    step: Array  # shape=(), int32: SGD steps taken
    params: Any  # {"decoder": theta, "encoder": phi}
    opt_state: Any


class Model(NamedTuple):
    """The static parts of a run: networks, log joint, optimiser."""

    decoder: models.Decoder
    encoder: models.Encoder
    log_joint: Callable[[Any, Array, Array], Array]  # (theta, x, z) -> (B,)
    optimizer: optax.GradientTransformation
    likelihood: str = "discretized_gaussian"


def build_model(config: Config) -> Model:
    from lpc_jax import data

    shape = data.image_shape(config.dataset)
    decoder = models.Decoder(shape, obs_scale=config.obs_scale or None, init_obs_scale=config.init_obs_scale)
    encoder = models.Encoder(shape, latent_dim=config.latent_dim)
    log_joint = models.make_log_joint(decoder, config.likelihood, config.prior_scale)
    return Model(decoder, encoder, log_joint, optax.adam(learning_rate(config)), config.likelihood)


def learning_rate(config: Config) -> float | optax.Schedule:
    """Adam's learning rate: ``config.learning_rate``, constant, or with ``lr_warmdown = f > 0``
    constant for the first ``N - n`` updates and then linear to 0 over the last
    ``n = max(1, round(f * N))``, N = ``config.num_train_steps``.
    """
    if config.lr_warmdown == 0:
        return config.learning_rate
    total = config.num_train_steps
    n = max(1, round(config.lr_warmdown * total))
    return optax.linear_schedule(config.learning_rate, 0.0, transition_steps=n, transition_begin=total - n)


def create_train_state(rng_key: Array, model: Model, image_shape, latent_dim: int) -> TrainState:
    """Initialises theta, phi (flax defaults) and the Adam state."""
    k_dec, k_enc = jax.random.split(rng_key)
    params = {
        "decoder": model.decoder.init(k_dec, jnp.zeros((1, latent_dim)))["params"],
        "encoder": model.encoder.init(k_enc, jnp.zeros((1, *image_shape)))["params"],
    }
    return TrainState(jnp.zeros((), jnp.int32), params, model.optimizer.init(params))


def _apply_grads(state: TrainState, grads, optimizer) -> TrainState:
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    return TrainState(state.step + 1, optax.apply_updates(state.params, updates), opt_state)


CHAIN_DTYPES = ("float32", "bfloat16")


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
    ``models.make_log_joint`` builds ``model.log_joint``.

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


def _selected_steps(k_chain: Array, num_steps: int, theta_grad_every: int, phase: Array | int | None):
    """``theta_grad_steps`` at ``phase``, or at a phase drawn uniformly from ``fold_in(k_chain, T)``
    (a key disjoint from the T chain keys ``split(k_chain, T)``); None when k = 1."""
    if theta_grad_every == 1:
        return None
    if phase is None:
        phase = jax.random.randint(jax.random.fold_in(k_chain, num_steps), (), 0, theta_grad_every)
    return theta_grad_steps(num_steps, theta_grad_every, phase)


class _Chain(NamedTuple):
    """What the train step needs from the chain (paper Algorithm 1, lines 4-10)."""

    state: langevin.LangevinState  # after T steps
    grad_theta: Any  # sum over the selected steps of grad_theta sum_b log p(x_b, z_{t-1,b})
    moments: objectives.ChainMoments  # of z_1..z_T, for the forward KL (eq. 11)
    log_p_trace: Array  # (T,) mean_b log p(x, z_{t-1}), nats
    drift_trace: Array  # (T,) mean_b |grad_z log p(x, z_{t-1})|
    accept_trace: Array | None = None  # (T,) mean_b acceptance probability (MALA only)


def _run_chain(log_joint: Callable, theta, z0: Array, center: Array, hparams: langevin.LangevinHParams,
               keys: Array, *, precondition: bool, selected: Array | None, sampler: str = "ula",
               friction: float = 1.0, axis_name: str | None = None) -> _Chain:
    """T Langevin steps in a ``lax.scan``; ``selected`` (T,) bool or None (every step).

    A selected step is ONE VJP of log p w.r.t. (theta, z): the drift and grad_theta
    (eq. 8). An unselected one, under ``lax.cond``, is a VJP w.r.t. z only, so XLA drops
    the decoder's kernel-gradient convolutions. Under ``vmap`` with a batched
    ``selected`` the cond becomes a select and both branches run.

    With ``axis_name`` (under ``shard_map``, the batch's rows split over that axis) each
    shard runs its rows' chains, with the unsharded chain's noise, and sums its own
    grad_theta; the sum over shards (a ``psum``) and the traces' batch means (a
    ``pmean``) are taken once, after the loop.
    """
    build = functools.partial(samplers.build, sampler, precondition=precondition, friction=friction,
                              axis_name=axis_name)
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
    return _Chain(lstate, g_theta, moments, *traces)


def _run_chain_data_parallel(mesh: jax.sharding.Mesh, run_chain: Callable, theta, x: Array, z0: Array,
                             center: Array, hparams: langevin.LangevinHParams, keys: Array,
                             selected: Array | None, init: Callable) -> _Chain:
    """``run_chain(theta, x, z0, center, hparams, keys, selected, axis_name)`` under ``shard_map``.

    The rows of ``x``, ``z0`` and ``center`` (and of the chain state and moments it
    returns) are split over ``mesh``'s one axis; theta, hparams, keys, ``selected`` and
    the returned grad_theta and traces are replicated. ``init`` is the sampler's, for
    the state's layout: its per-chain fields are rows, its step count is replicated.
    """
    (axis,) = mesh.axis_names
    rows, whole = P(axis), P()
    state_specs = jax.tree.map(lambda a: whole if a.ndim == 0 else rows, jax.eval_shape(init, z0))
    return jax.shard_map(
        functools.partial(run_chain, axis_name=axis), mesh=mesh,
        in_specs=(whole, rows, rows, rows, whole, whole, whole),
        out_specs=_Chain(state_specs, whole, rows, whole, whole, whole),
    )(theta, x, z0, center, hparams, keys, selected)


def lpc_train_step(state: TrainState, x: Array, rng_key: Array, hparams: langevin.LangevinHParams, *,
                   model: Model, num_steps: int, warm_start: str = "jeffreys", precondition: bool = True,
                   prior_scale: float = 1.0, prior_init_batches: int = 50, chain_dtype: str = "float32",
                   theta_grad_every: int = 1, theta_grad_phase: Array | int | None = None,
                   sampler: str = "ula", friction: float = 1.0, mesh: jax.sharding.Mesh | None = None):
    """One LPC SGD step on batch ``x`` (Algorithm 1, eqs. 5, 8, 11, 16, 17).

    Args:
      state: current ``TrainState``.
      x: (B, H, W, C) float32 images in [-1, 1].
      rng_key: PRNG key of this step (e.g. ``fold_in(seed_key, step)``).
      hparams: Langevin step size, decay, eps (traced: no recompilation).
      model: networks and optimiser (static).
      num_steps: chain length T (static).
      warm_start: ``none``, ``forward_kl``, ``reverse_kl`` or ``jeffreys`` (static).
      precondition: Adam-style metric on the drift (static).
      prior_scale: prior standard deviation, for prior initialisation.
      prior_init_batches: chains start from the prior while ``state.step`` is below this.
      chain_dtype: ``float32`` or ``bfloat16``, the decoder's precision in the chain (static,
        :func:`chain_log_joint`); chain state, likelihood, accumulators, updates stay float32.
      theta_grad_every: k >= 1 (static): grad_theta only on the steps of :func:`theta_grad_steps`,
        weighted k/T (unbiased for eq. 8's average), the others take the drift only; 1 is eq. 8.
      theta_grad_phase: their phase in [0, k) (int32, may be traced); None draws it uniformly.
      sampler: ``ula``, ``mala`` or ``underdamped`` (static; :mod:`lpc_jax.samplers`).
      friction: the underdamped sampler's friction.
      mesh: static; a 1-D mesh whose devices hold equal blocks of ``x``'s rows (the
        launchers' ``distributed.data_parallel``). With more than one device the chain
        runs under ``shard_map``: each device runs its rows' chains, with the same noise
        as unsharded, and sums its own grad_theta, all-reduced once after the T steps
        instead of on every step as XLA's automatic partitioning does. The result is
        the ``mesh=None`` one up to float32 summation order. None (or one device): the
        chain as written, partitioned (if at all) by XLA.

    Returns:
      ``(new_state, metrics)``; metrics (nats per example): ``log_p_start``,
      ``log_p_end`` (log p(x, z) at z_0 and z_T), ``log_p_chain`` (eq. 8's average,
      the decoder's objective), ``elbo`` (encoder's reparameterised ELBO),
      ``forward_kl`` (eq. 11 cross-entropy), ``drift_norm_start``/``_end``, ``loss``.

    Raises:
      ValueError: ``mesh`` has more than one axis, or its device count does not divide the batch.
    """
    w = objectives.weights(warm_start)
    theta, phi = state.params["decoder"], state.params["encoder"]
    k_q, k_prior, k_elbo, k_chain = jax.random.split(rng_key, 4)
    batch = x.shape[0]

    (mean, variance), encoder_vjp = jax.vjp(lambda p: model.encoder.apply({"params": p}, x), phi)
    z_q = objectives.sample_gaussian(k_q, mean, variance)
    z_prior = prior_scale * jax.random.normal(k_prior, mean.shape, mean.dtype)
    if warm_start == "none":
        z0 = z_prior
    else:
        z0 = jnp.where(state.step < prior_init_batches, z_prior, z_q)
    z0 = jax.lax.stop_gradient(z0)

    selected = _selected_steps(k_chain, num_steps, theta_grad_every, theta_grad_phase)

    def run_chain(theta, x, z0, center, hparams, keys, selected, axis_name=None):
        return _run_chain(chain_log_joint(model, x, prior_scale=prior_scale, chain_dtype=chain_dtype), theta, z0,
                          center, hparams, keys, precondition=precondition, selected=selected, sampler=sampler,
                          friction=friction, axis_name=axis_name)

    chain_args = (theta, x, z0, jax.lax.stop_gradient(mean), hparams, jax.random.split(k_chain, num_steps), selected)
    if mesh is None or mesh.size == 1:
        chain = run_chain(*chain_args)
    else:
        _check_mesh(mesh, batch)
        init = samplers.build(sampler, model.log_joint, friction=friction).init
        chain = _run_chain_data_parallel(mesh, run_chain, *chain_args, init=init)
    # Gradient ascent on (1/T) sum_t mean_b log p(x, z_{t-1}) -> descent direction for Adam.
    scale = num_steps * batch if selected is None else num_steps * batch / theta_grad_every
    g_theta = jax.tree.map(lambda g: -g / scale, chain.grad_theta)

    def encoder_loss(mean, variance):
        elbo = objectives.reparameterized_elbo(k_elbo, mean, variance, lambda z: model.log_joint(theta, x, z))
        cross_entropy = objectives.forward_kl_from_moments(mean, variance, chain.moments, num_steps)
        loss = w.reverse_kl * -elbo.mean() + w.forward_kl * cross_entropy.mean()
        return loss, (elbo.mean(), cross_entropy.mean())

    (enc_loss, (elbo, cross_entropy)), cotangent = jax.value_and_grad(
        encoder_loss, argnums=(0, 1), has_aux=True)(mean, variance)
    (g_phi,) = encoder_vjp(cotangent)

    new_state = _apply_grads(state, {"decoder": g_theta, "encoder": g_phi}, model.optimizer)
    log_p_end = model.log_joint(theta, x, chain.state.z).mean()
    log_p_trace, drift_trace = chain.log_p_trace, chain.drift_trace
    metrics = {
        "loss": -log_p_trace.mean() + enc_loss,
        "log_p_chain": log_p_trace.mean(),
        "log_p_start": log_p_trace[0],
        "log_p_end": log_p_end,
        "elbo": elbo,
        "forward_kl": cross_entropy,
        "drift_norm_start": drift_trace[0],
        "drift_norm_end": drift_trace[-1],
    }
    if chain.accept_trace is not None:
        metrics["accept_rate"] = chain.accept_trace.mean()
    return new_state, metrics


def _check_mesh(mesh: jax.sharding.Mesh, batch: int) -> None:
    if len(mesh.axis_names) != 1:
        raise ValueError(f"mesh has axes {mesh.axis_names}: the chain shards its batch over a 1-D mesh "
                         "(distributed.mesh())")
    if batch % mesh.size:
        raise ValueError(f"batch of {batch} rows cannot be split evenly over the mesh's {mesh.size} devices: "
                         f"use a batch size that is a multiple of {mesh.size}, or a smaller mesh")


def vae_train_step(state: TrainState, x: Array, rng_key: Array, hparams=None, *, model: Model):
    """One VAE SGD step: the reparameterised ELBO w.r.t. both theta and phi.

    Same signature as :func:`lpc_train_step`; ``hparams`` is ignored.
    Metrics: ``loss`` (-ELBO) and ``elbo``, nats per example.
    """
    del hparams

    def loss_fn(params):
        mean, variance = model.encoder.apply({"params": params["encoder"]}, x)
        elbo = objectives.reparameterized_elbo(
            rng_key, mean, variance, lambda z: model.log_joint(params["decoder"], x, z)).mean()
        return -elbo, elbo

    (loss, elbo), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return _apply_grads(state, grads, model.optimizer), {"loss": loss, "elbo": elbo}


def make_train_step(config: Config, model: Model, mesh: jax.sharding.Mesh | None = None) -> Callable:
    """Binds the static arguments of the step that ``config.algorithm`` selects.

    ``mesh``: the data-parallel mesh of a single run (``lpc_train_step``'s; the VAE step
    has no chain and leaves its partitioning to XLA).
    """
    if config.algorithm == "vae":
        return functools.partial(vae_train_step, model=model)
    return functools.partial(
        lpc_train_step, model=model, num_steps=config.num_steps, warm_start=config.warm_start,
        precondition=config.preconditioner, prior_scale=config.prior_scale,
        prior_init_batches=config.prior_init_batches, chain_dtype=config.chain_dtype,
        theta_grad_every=config.theta_grad_every, sampler=config.sampler, friction=config.friction, mesh=mesh)


def elbo_estimate(params, x: Array, rng_key: Array, *, model: Model, num_samples: int = 1) -> Array:
    """Encoder ELBO per example, averaged over ``num_samples`` draws, (B,) nats."""
    mean, variance = model.encoder.apply({"params": params["encoder"]}, x)
    keys = jax.random.split(rng_key, num_samples)
    elbos = jax.vmap(lambda k: objectives.reparameterized_elbo(
        k, mean, variance, lambda z: model.log_joint(params["decoder"], x, z)))(keys)
    return elbos.mean(0)
