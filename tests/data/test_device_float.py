"""The batch crosses to the device as uint8 and the jitted step converts it: bitwise sources.to_float."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lpc_jax.data import pipeline, sources
from lpc_jax.sampling import langevin
from lpc_jax.training import build, loop
from lpc_jax.training.config import Config
from tests import tiny_model as tiny


def test_device_conversion_is_bitwise_to_float_over_all_256_values():
    values = np.arange(256, dtype=np.uint8)
    want = sources.to_float(values)
    on_device = jax.jit(pipeline.device_to_float)(jnp.asarray(values))
    assert on_device.dtype == jnp.float32
    assert np.asarray(on_device).tobytes() == want.tobytes()
    batch = np.random.default_rng(0).integers(0, 256, (3, 5, 4, 2), dtype=np.uint8)
    assert np.asarray(jax.jit(pipeline.device_to_float)(batch)).tobytes() == sources.to_float(batch).tobytes()
    floats = jnp.asarray(want)
    assert pipeline.device_to_float(floats) is floats  # a float batch passes as it is


def test_train_step_on_a_uint8_batch_equals_the_step_on_host_floats():
    config = Config(num_steps=2, prior_init_batches=0, batch_size=4)
    model = tiny.tiny_model(optax.adam(1e-3))
    step = jax.jit(build.make_train_step(config, model))
    state = loop.init_state(jax.random.key(0), model, tiny.SHAPE, tiny.LATENT)
    x = np.random.default_rng(1).integers(0, 256, (4, *tiny.SHAPE), dtype=np.uint8)
    hp = langevin.hparams(0.1, 0.9, 1e-8)
    on_device = jax.device_get(step(state, x, jax.random.key(2), hp))
    on_host = jax.device_get(step(state, sources.to_float(x), jax.random.key(2), hp))
    for a, b in zip(jax.tree.leaves(on_device), jax.tree.leaves(on_host)):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
