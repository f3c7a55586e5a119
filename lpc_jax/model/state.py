"""The train state and the static parts of a run (networks, log joint, optimiser)."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import optax

from lpc_jax.model import networks

Array = jax.Array


class TrainState(flax.struct.PyTreeNode):
    step: Array  # shape=(), int32: SGD steps taken
    params: Any  # {"decoder": theta, "encoder": phi}
    opt_state: Any


class Model(NamedTuple):
    """The static parts of a run: networks, log joint, optimiser."""

    decoder: networks.Decoder
    encoder: networks.Encoder
    log_joint: Callable[[Any, Array, Array], Array]  # (theta, x, z) -> (B,)
    optimizer: optax.GradientTransformation
    likelihood: str = "discretized_gaussian"


def create_train_state(rng_key: Array, model: Model, image_shape, latent_dim: int) -> TrainState:
    """Initialises theta, phi (flax defaults) and the Adam state."""
    k_dec, k_enc = jax.random.split(rng_key)
    params = {
        "decoder": model.decoder.init(k_dec, jnp.zeros((1, latent_dim)))["params"],
        "encoder": model.encoder.init(k_enc, jnp.zeros((1, *image_shape)))["params"],
    }
    return TrainState(jnp.zeros((), jnp.int32), params, model.optimizer.init(params))


def apply_gradients(state: TrainState, grads, optimizer: optax.GradientTransformation) -> TrainState:
    """One optimiser update of ``state.params`` by ``grads`` (descent directions); ``step`` + 1."""
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    return TrainState(state.step + 1, optax.apply_updates(state.params, updates), opt_state)
