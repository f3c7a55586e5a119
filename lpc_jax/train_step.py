"""The LPC and VAE train steps: pure functions, jitted once at the call site.

``lpc_train_step`` is Algorithm 1 with the two typos fixed (see
:mod:`lpc_jax.langevin`): one encoder forward, T steps of the sampler's own
kernel (``langevin.build_kernel(..., with_param_grad=True)``) in a ``lax.scan``,
each taking ONE VJP of log p(x, z; theta) that gives both the drift (grad_z)
and the decoder gradient (grad_theta, eq. 8); grad_theta and the chain's
moments are accumulated in the scan carry so memory does not grow with T; then
one encoder VJP for the summed forward/reverse KL cotangents, and one Adam
update of (theta, phi).

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

from lpc_jax import langevin, models, objectives
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
    return Model(decoder, encoder, log_joint, optax.adam(config.learning_rate), config.likelihood)


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


def lpc_train_step(state: TrainState, x: Array, rng_key: Array, hparams: langevin.LangevinHParams, *,
                   model: Model, num_steps: int, warm_start: str = "jeffreys", precondition: bool = True,
                   prior_scale: float = 1.0, prior_init_batches: int = 50):
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

    Returns:
      ``(new_state, metrics)``; metrics (nats per example): ``log_p_start``,
      ``log_p_end`` (log p(x, z) at z_0 and z_T), ``log_p_chain`` (eq. 8's average,
      the decoder's objective), ``elbo`` (encoder's reparameterised ELBO),
      ``forward_kl`` (eq. 11 cross-entropy), ``drift_norm_start``/``_end``, ``loss``.
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

    # One kernel step takes ONE VJP of log p(x, z; theta): the drift and grad_theta (eq. 8).
    kernel = langevin.build_kernel(lambda p, z: model.log_joint(p, x, z), precondition=precondition,
                                   with_param_grad=True)

    def chain_step(carry, key):
        lstate, g_theta, moments = carry
        lstate, info, g_theta_t = kernel(key, lstate, hparams, theta)
        g_theta = jax.tree.map(jnp.add, g_theta, g_theta_t)
        return (lstate, g_theta, objectives.accumulate_moments(moments, lstate.z)), (
            info.log_prob.mean(), info.drift_norm.mean())

    carry0 = (langevin.init(z0), jax.tree.map(jnp.zeros_like, theta),
              objectives.init_moments(jax.lax.stop_gradient(mean)))
    (lstate, g_theta, moments), (log_p_trace, drift_trace) = jax.lax.scan(
        chain_step, carry0, jax.random.split(k_chain, num_steps))
    # Gradient ascent on (1/T) sum_t mean_b log p(x, z_{t-1}) -> descent direction for Adam.
    g_theta = jax.tree.map(lambda g: -g / (num_steps * batch), g_theta)

    def encoder_loss(mean, variance):
        elbo = objectives.reparameterized_elbo(k_elbo, mean, variance, lambda z: model.log_joint(theta, x, z))
        cross_entropy = objectives.forward_kl_from_moments(mean, variance, moments, num_steps)
        loss = w.reverse_kl * -elbo.mean() + w.forward_kl * cross_entropy.mean()
        return loss, (elbo.mean(), cross_entropy.mean())

    (enc_loss, (elbo, cross_entropy)), cotangent = jax.value_and_grad(
        encoder_loss, argnums=(0, 1), has_aux=True)(mean, variance)
    (g_phi,) = encoder_vjp(cotangent)

    new_state = _apply_grads(state, {"decoder": g_theta, "encoder": g_phi}, model.optimizer)
    log_p_end = model.log_joint(theta, x, lstate.z).mean()
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
    return new_state, metrics


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


def make_train_step(config: Config, model: Model) -> Callable:
    """Binds the static arguments of the step that ``config.algorithm`` selects."""
    if config.algorithm == "vae":
        return functools.partial(vae_train_step, model=model)
    return functools.partial(
        lpc_train_step, model=model, num_steps=config.num_steps, warm_start=config.warm_start,
        precondition=config.preconditioner, prior_scale=config.prior_scale,
        prior_init_batches=config.prior_init_batches)


def elbo_estimate(params, x: Array, rng_key: Array, *, model: Model, num_samples: int = 1) -> Array:
    """Encoder ELBO per example, averaged over ``num_samples`` draws, (B,) nats."""
    mean, variance = model.encoder.apply({"params": params["encoder"]}, x)
    keys = jax.random.split(rng_key, num_samples)
    elbos = jax.vmap(lambda k: objectives.reparameterized_elbo(
        k, mean, variance, lambda z: model.log_joint(params["decoder"], x, z)))(keys)
    return elbos.mean(0)
