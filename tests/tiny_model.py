"""A two-layer MLP encoder/decoder pair with the interface of the Table 2 networks.

Used where a test needs the training maths, not the convolutions: it compiles in
about a second.
"""

import flax.linen as nn
import jax.numpy as jnp
import optax

from lpc_jax.model import networks
from lpc_jax.model.state import Model

SHAPE = (6, 6, 1)
LATENT = 5


class TinyDecoder(nn.Module):
    @nn.compact
    def __call__(self, z):
        h = nn.silu(nn.Dense(16)(z))
        mean = nn.Dense(36)(h).reshape(z.shape[0], *SHAPE)
        return mean, self.param("log_scale", nn.initializers.constant(-1.0), (1,)).reshape(1, 1, 1, 1)


class TinyEncoder(nn.Module):
    @nn.compact
    def __call__(self, x):
        out = nn.Dense(2 * LATENT)(nn.silu(nn.Dense(16)(x.reshape(x.shape[0], -1))))
        mean, raw = jnp.split(out, 2, axis=-1)
        return mean, networks.softplus_beta(raw) + 1e-6


def tiny_model(optimizer: optax.GradientTransformation) -> Model:
    decoder = TinyDecoder()
    return Model(decoder, TinyEncoder(), networks.make_log_joint(decoder), optimizer)
