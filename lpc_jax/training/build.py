"""A run's Config bound to the library: the model it builds and the train step it runs.

The one place where ``Config`` meets the model group (which never sees it).
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import optax

from lpc_jax.data import sources
from lpc_jax.model import networks, steps
from lpc_jax.model.state import Model
from lpc_jax.training.config import Config


def build_model(config: Config) -> Model:
    """The networks of ``config.dataset``'s image shape (Table 2), the log joint and Adam.

    ``config.conv_impl`` picks the networks' convolutions (``model.convolutions``); the
    parameter tree is the same for every choice, so a checkpoint moves between them.
    """
    shape = sources.image_shape(config.dataset)
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


def make_train_step(config: Config, model: Model, mesh: jax.sharding.Mesh | None = None) -> Callable:
    """Binds the static arguments of the step that ``config.algorithm`` selects.

    ``mesh``: the data-parallel mesh of a single run (``lpc_train_step``'s; the VAE step
    has no chain and leaves its partitioning to XLA).
    """
    if config.algorithm == "vae":
        return functools.partial(steps.vae_train_step, model=model)
    return functools.partial(
        steps.lpc_train_step, model=model, num_steps=config.num_steps, warm_start=config.warm_start,
        precondition=config.preconditioner, prior_scale=config.prior_scale,
        prior_init_batches=config.prior_init_batches, chain_dtype=config.chain_dtype,
        theta_grad_every=config.theta_grad_every, sampler=config.sampler, friction=config.friction, mesh=mesh)
