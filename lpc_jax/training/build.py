"""A run's Config bound to the library: the model it builds and the train step it runs.

The one place where ``Config`` meets the model group (which never sees it).
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import optax

from lpc_jax.data import pipeline, sources
from lpc_jax.model import networks, steps
from lpc_jax.model.state import Model
from lpc_jax.training.config import Config


def build_model(config: Config) -> Model:
    """The networks of ``config.dataset``'s image shape (Table 2), the log joint and Adam.

    ``config.conv_impl`` picks the networks' convolutions (``model.convolutions``); the
    parameter tree is the same for every choice, so a checkpoint moves between them.
    """
    shape = sources.image_shape(config.dataset, config.image_size or None)
    decoder = networks.Decoder(shape, obs_scale=config.obs_scale or None, init_obs_scale=config.init_obs_scale,
                               conv_impl=config.conv_impl)
    encoder = networks.Encoder(shape, latent_dim=config.latent_dim, conv_impl=config.conv_impl)
    log_joint = networks.make_log_joint(decoder, config.likelihood, config.prior_scale)
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


def open_images(config: Config, split: str, max_examples: int | None = None):
    """The ``split`` images of ``config.dataset`` as the run reads them (:func:`sources.open_images`
    with the run's source, data_dir, image_size and data_cache): uint8 ``(N, H, W, C)``,
    in memory or lazy."""
    return sources.open_images(config.dataset, split, config.data_source, config.data_dir, max_examples,
                               image_size=config.image_size or None, cache=config.data_cache or None,
                               num_threads=max(config.data_threads, 1))


def make_train_step(config: Config, model: Model, mesh: jax.sharding.Mesh | None = None) -> Callable:
    """Binds the static arguments of the step that ``config.algorithm`` selects.

    The step takes the batch ``x`` as the pipeline yields it, uint8 ``(B, H, W, C)``,
    and converts it to float32 in [-1, 1] on the device (:func:`pipeline.device_to_float`,
    bitwise ``sources.to_float``); a float32 batch is used as it is.

    ``mesh``: the data-parallel mesh of a single run (``lpc_train_step``'s; the VAE step
    has no chain and leaves its partitioning to XLA).
    """
    return _float_batch(_bind_step(config, model, mesh))


def _float_batch(step: Callable) -> Callable:
    """``step`` taking a uint8 batch, converted on the device (inside the caller's jit)."""

    @functools.wraps(step)
    def wrapped(state, x, rng_key, hparams=None):
        return step(state, pipeline.device_to_float(jax.numpy.asarray(x)), rng_key, hparams)

    return wrapped


def _bind_step(config: Config, model: Model, mesh: jax.sharding.Mesh | None) -> Callable:
    if config.algorithm == "vae":
        return functools.partial(steps.vae_train_step, model=model)
    return functools.partial(
        steps.lpc_train_step, model=model, num_steps=config.num_steps, warm_start=config.warm_start,
        precondition=config.preconditioner, prior_scale=config.prior_scale,
        prior_init_batches=config.prior_init_batches, chain_dtype=config.chain_dtype,
        theta_grad_every=config.theta_grad_every, sampler=config.sampler, friction=config.friction,
        metric=config.chain_metric, mesh=mesh)
