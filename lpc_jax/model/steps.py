"""The LPC and VAE train steps: pure functions, jitted once at the call site.

``lpc_train_step`` is Algorithm 1 with the two typos fixed (see
:mod:`lpc_jax.sampling.langevin`): one encoder forward, T steps of the sampler's own
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

import jax
import jax.numpy as jnp

from lpc_jax.model import chain, objectives
from lpc_jax.model.state import Model, TrainState, apply_gradients
from lpc_jax.sampling import langevin, samplers

Array = jax.Array


def lpc_train_step(state: TrainState, x: Array, rng_key: Array, hparams: langevin.LangevinHParams, *,
                   model: Model, num_steps: int, warm_start: str = "jeffreys", precondition: bool = True,
                   prior_scale: float = 1.0, prior_init_batches: int = 50, chain_dtype: str = "float32",
                   theta_grad_every: int = 1, theta_grad_phase: Array | int | None = None,
                   sampler: str = "ula", friction: float = 1.0, metric: str = "auto",
                   mesh: jax.sharding.Mesh | None = None):
    """One LPC SGD step on batch ``x`` (Algorithm 1, eqs. 5, 8, 11, 16, 17).

    Args:
      state: current ``TrainState``.
      x: (B, H, W, C) float32 images in [-1, 1].
      rng_key: PRNG key of this step (e.g. ``fold_in(seed_key, step)``).
      hparams: Langevin step size, decay, eps (traced: no recompilation).
      model: networks and optimiser (static).
      num_steps: chain length T (static).
      warm_start: ``none``, ``forward_kl``, ``reverse_kl`` or ``jeffreys`` (static).
      precondition: Adam-style metric on the drift (static), read for ``metric="auto"`` only.
      prior_scale: prior standard deviation, for prior initialisation.
      prior_init_batches: chains start from the prior while ``state.step`` is below this.
      chain_dtype: ``float32`` or ``bfloat16``, the decoder's precision in the chain (static,
        :func:`lpc_jax.model.chain.chain_log_joint`); chain state, likelihood, accumulators, updates stay float32.
      theta_grad_every: k >= 1 (static): grad_theta only on the steps of :func:`lpc_jax.model.chain.theta_grad_steps`,
        weighted k/T (unbiased for eq. 8's average), the others take the drift only; 1 is eq. 8.
      theta_grad_phase: their phase in [0, k) (int32, may be traced); None draws it uniformly.
      sampler, friction: ``ula``, ``mala`` or ``underdamped`` (static), the latter's friction.
      metric: static; the chain's diagonal metric, one of :data:`lpc_jax.model.chain.METRICS`
        (``auto``: ``precondition``'s; ``encoder``: sigma_q^2(x), fixed per chain).
      mesh: static; a 1-D mesh holding equal blocks of ``x``'s rows: with more than one device
        the chain runs under ``shard_map`` (each device its rows' chains, the unsharded noise,
        one all-reduce of grad_theta after the T steps; the ``mesh=None`` result up to float32
        summation order). None (or one device): the chain as written, partitioned by XLA.

    Returns:
      ``(new_state, metrics)``; metrics (nats per example): ``log_p_start``,
      ``log_p_end`` (log p(x, z) at z_0 and z_T), ``log_p_chain`` (eq. 8's average,
      the decoder's objective), ``elbo`` (encoder's reparameterised ELBO),
      ``forward_kl`` (eq. 11 cross-entropy), ``drift_norm_start``/``_end``, ``loss``.

    Raises:
      ValueError: ``mesh`` has more than one axis, or its device count does not divide the batch.
    """
    theta, phi = state.params["decoder"], state.params["encoder"]
    k_q, k_prior, k_elbo, k_chain = jax.random.split(rng_key, 4)
    (mean, variance), encoder_vjp = jax.vjp(lambda p: model.encoder.apply({"params": p}, x), phi)
    z0 = _chain_start(state.step, mean, variance, (k_q, k_prior), warm_start=warm_start, prior_scale=prior_scale,
                      prior_init_batches=prior_init_batches)
    selected = chain.selected_steps(k_chain, num_steps, theta_grad_every, theta_grad_phase)
    chain_precondition, fixed_metric = chain.chain_metric(metric, precondition, variance)

    def run(inputs: chain.ChainInputs, axis_name: str | None = None) -> chain.Chain:
        log_joint = chain.chain_log_joint(model, inputs.x, prior_scale=prior_scale, chain_dtype=chain_dtype)
        return chain.run_chain(log_joint, inputs.theta, inputs.z0, inputs.center, inputs.hparams, inputs.keys,
                               precondition=chain_precondition, selected=inputs.selected, sampler=sampler,
                               friction=friction, metric=inputs.metric, axis_name=axis_name)

    inputs = chain.ChainInputs(theta, x, z0, jax.lax.stop_gradient(mean), hparams,
                               jax.random.split(k_chain, num_steps), selected, fixed_metric)
    if mesh is None or mesh.size == 1:
        result = run(inputs)
    else:
        chain.check_mesh(mesh, x.shape[0])
        init = samplers.build(sampler, model.log_joint, friction=friction).init
        result = chain.run_chain_data_parallel(mesh, run, inputs, init=init)
    # Gradient ascent on (1/T) sum_t mean_b log p(x, z_{t-1}) -> descent direction for Adam.
    scale = num_steps * x.shape[0] if selected is None else num_steps * x.shape[0] / theta_grad_every
    g_theta = jax.tree.map(lambda g: -g / scale, result.grad_theta)

    def encoder_loss(mean, variance):
        elbo = objectives.reparameterized_elbo(k_elbo, mean, variance, lambda z: model.log_joint(theta, x, z))
        cross_entropy = objectives.forward_kl_from_moments(mean, variance, result.moments, num_steps)
        w = objectives.weights(warm_start)
        loss = w.reverse_kl * -elbo.mean() + w.forward_kl * cross_entropy.mean()
        return loss, (elbo.mean(), cross_entropy.mean())

    (enc_loss, (elbo, cross_entropy)), cotangent = jax.value_and_grad(
        encoder_loss, argnums=(0, 1), has_aux=True)(mean, variance)
    (g_phi,) = encoder_vjp(cotangent)
    new_state = apply_gradients(state, {"decoder": g_theta, "encoder": g_phi}, model.optimizer)
    log_p_end = model.log_joint(theta, x, result.state.z).mean()
    return new_state, _chain_metrics(result, log_p_end, enc_loss, elbo, cross_entropy)


def _chain_start(step: Array, mean: Array, variance: Array, keys: tuple[Array, Array], *, warm_start: str,
                 prior_scale: float, prior_init_batches: int) -> Array:
    """z_0 (B, D): a draw from q(z | x), or from the prior while ``step < prior_init_batches``
    (always, without a warm start); no gradient flows through it. ``keys``: (q's, the prior's)."""
    k_q, k_prior = keys
    z_q = objectives.sample_gaussian(k_q, mean, variance)
    z_prior = prior_scale * jax.random.normal(k_prior, mean.shape, mean.dtype)
    z0 = z_prior if warm_start == "none" else jnp.where(step < prior_init_batches, z_prior, z_q)
    return jax.lax.stop_gradient(z0)


def _chain_metrics(result: chain.Chain, log_p_end: Array, enc_loss: Array, elbo: Array,
                   cross_entropy: Array) -> dict[str, Array]:
    log_p_trace, drift_trace = result.log_p_trace, result.drift_trace
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
    if result.accept_trace is not None:
        metrics["accept_rate"] = result.accept_trace.mean()
    return metrics


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
    return apply_gradients(state, grads, model.optimizer), {"loss": loss, "elbo": elbo}


def elbo_estimate(params, x: Array, rng_key: Array, *, model: Model, num_samples: int = 1) -> Array:
    """Encoder ELBO per example, averaged over ``num_samples`` draws, (B,) nats."""
    mean, variance = model.encoder.apply({"params": params["encoder"]}, x)
    keys = jax.random.split(rng_key, num_samples)
    elbos = jax.vmap(lambda k: objectives.reparameterized_elbo(
        k, mean, variance, lambda z: model.log_joint(params["decoder"], x, z)))(keys)
    return elbos.mean(0)
