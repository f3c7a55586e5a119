"""The chain's cost options: ``theta_grad_every`` (subsampled eq. 8) and ``chain_dtype``."""

import dataclasses
import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lpc_jax.model import chain, networks, steps
from lpc_jax.model.state import Model, create_train_state
from lpc_jax.sampling import langevin
from lpc_jax.training import build
from lpc_jax.training.config import Config, ConfigError
from tests import tiny_model as tiny_nets

T = 5
BATCH = 3


def _record_gradients() -> optax.GradientTransformation:
    # An "optimizer" whose state is the raw gradient it was given: exact, no lr rounding.
    return optax.GradientTransformation(
        lambda params: jax.tree.map(jnp.zeros_like, params),
        lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads))


@pytest.fixture(scope="module")
def setup():
    model = tiny_nets.tiny_model(_record_gradients())
    state = create_train_state(jax.random.key(0), model, tiny_nets.SHAPE, tiny_nets.LATENT)
    x = jax.random.uniform(jax.random.key(1), (BATCH, *tiny_nets.SHAPE), minval=-1, maxval=1)
    return model, state, jnp.round((x + 1) * 127.5) / 127.5 - 1


def _step(model, **kw):
    return jax.jit(functools.partial(steps.lpc_train_step, model=model, num_steps=T, warm_start="jeffreys",
                                     precondition=True, prior_init_batches=0, **kw))


def _gradients(model, state, x, key=jax.random.key(7), **kw):
    new_state, metrics = _step(model, **kw)(state, x, key, langevin.hparams(0.05, decay=0.9, eps=1e-3))
    return new_state.opt_state, metrics


# ---------------------------------------------------------------------- theta_grad_every


@pytest.mark.parametrize("k", [1, 2, 3, 5, 7])
def test_theta_grad_steps_partition_the_chain(k):
    masks = np.stack([np.asarray(chain.theta_grad_steps(T, k, u)) for u in range(k)])
    # Each step t belongs to exactly one phase class, so P(t selected) = 1/k for a uniform phase.
    np.testing.assert_array_equal(masks.sum(0), np.ones(T))
    np.testing.assert_array_equal(np.flatnonzero(masks[k - 1]) + 1, np.arange(k, T + 1, k))  # t = k, 2k, ...


@pytest.mark.parametrize("k", [2, 3, pytest.param(7, marks=pytest.mark.slow)])  # T = 5: k = 2, 3 do not divide T; k = 7 > T
def test_theta_grad_every_is_unbiased_over_the_phase(setup, k):
    # The expectation over the uniform phase, enumerated exactly, equals eq. 8's average (k = 1);
    # the chain, hence the encoder's gradient and every metric, does not depend on k.
    model, state, x = setup
    full, full_metrics = _gradients(model, state, x)
    per_phase = [_gradients(model, state, x, theta_grad_every=k, theta_grad_phase=u) for u in range(k)]
    expected = jax.tree.map(lambda *g: sum(g) / k, *[g["decoder"] for g, _ in per_phase])
    chex.assert_trees_all_close(expected, full["decoder"], rtol=1e-5, atol=1e-5)
    for grads, metrics in per_phase:
        chex.assert_trees_all_equal(grads["encoder"], full["encoder"])
        chex.assert_trees_all_close(metrics, full_metrics, rtol=1e-6)


def test_theta_grad_phase_is_drawn_from_the_step_key(setup):
    model, state, x = setup
    key, k = jax.random.key(7), 3
    k_chain = jax.random.split(key, 4)[3]
    phase = int(jax.random.randint(jax.random.fold_in(k_chain, T), (), 0, k))
    drawn, _ = _gradients(model, state, x, key, theta_grad_every=k)
    fixed, _ = _gradients(model, state, x, key, theta_grad_every=k, theta_grad_phase=phase)
    chex.assert_trees_all_equal(drawn, fixed)


def test_defaults_are_float32_and_every_step(setup):
    model, state, x = setup
    explicit, _ = _gradients(model, state, x, chain_dtype="float32", theta_grad_every=1)
    default, _ = _gradients(model, state, x)
    chex.assert_trees_all_equal(explicit, default)


def test_make_train_step_binds_the_chain_options(setup):
    model, state, x = setup
    config = Config(num_steps=T, warm_start="jeffreys", prior_init_batches=0, theta_grad_every=2,
                    chain_dtype="bfloat16")
    hp = langevin.hparams(0.05, decay=0.9, eps=1e-3)
    bound, _ = jax.jit(build.make_train_step(config, model))(state, x, jax.random.key(7), hp)
    direct, _ = _gradients(model, state, x, theta_grad_every=2, chain_dtype="bfloat16")
    chex.assert_trees_all_equal(bound.opt_state, direct)


# ---------------------------------------------------------------------- chain_dtype


class LinearDecoder(nn.Module):
    """x | z ~ N(W z + b, 0.5^2): a linear-Gaussian model with a Gaussian posterior."""

    @nn.compact
    def __call__(self, z):
        mean = nn.Dense(36)(z).reshape(z.shape[0], *tiny_nets.SHAPE)
        log_scale = self.param("log_scale", nn.initializers.constant(np.log(0.5)), (1,))
        return mean, log_scale.reshape(1, 1, 1, 1)


def _linear_gaussian_posterior(theta, x):
    """Mean (D,) and precision (D, D) of p(z | x) for the LinearDecoder, prior N(0, I)."""
    w, b = np.asarray(theta["Dense_0"]["kernel"], np.float64), np.asarray(theta["Dense_0"]["bias"], np.float64)
    inv_var = 1.0 / 0.5**2
    precision = np.eye(w.shape[0]) + inv_var * w @ w.T
    return np.linalg.solve(precision, inv_var * w @ (np.asarray(x, np.float64).reshape(-1) - b)), precision


def test_bfloat16_chain_on_a_gaussian_target():
    """The chain in bf16 samples the linear-Gaussian posterior.

    Stated tolerance: driven by the same noise as the float32 chain, the bf16 chain's
    sample mean is within 0.01 posterior standard deviations of the float32 chain's
    and its sample variances within 1% of them (measured: 0.003 sd and 0.1%); the float32 chain matches ULA's exact
    stationary law (mean, and covariance 2 (P (2 I - h P))^-1) within Monte Carlo error.
    """
    decoder, num_chains, step_size = LinearDecoder(), 16384, 0.005
    model = Model(decoder, None, networks.make_log_joint(decoder, "gaussian"), None, likelihood="gaussian")
    theta = decoder.init(jax.random.key(0), jnp.zeros((1, tiny_nets.LATENT)))["params"]
    x1 = jax.random.uniform(jax.random.key(1), (1, *tiny_nets.SHAPE), minval=-1, maxval=1)
    mu, precision = _linear_gaussian_posterior(theta, x1)
    eigval, eigvec = np.linalg.eigh(precision)
    ula_cov = eigvec @ np.diag(2.0 / (eigval * (2.0 - step_size * eigval))) @ eigvec.T
    sd = np.sqrt(np.diag(ula_cov))
    x = jnp.broadcast_to(x1, (num_chains, *tiny_nets.SHAPE))

    def final_z(chain_dtype):
        log_joint = chain.chain_log_joint(model, x, chain_dtype=chain_dtype)
        kernel = langevin.build_kernel(lambda z: log_joint(theta, z), precondition=False)
        state, info = jax.jit(lambda: langevin.sample_chain(
            jax.random.key(2), kernel, langevin.init(jnp.zeros((num_chains, tiny_nets.LATENT))),
            langevin.hparams(step_size), 800))()
        assert state.z.dtype == state.m.dtype == info.log_prob.dtype == info.drift_norm.dtype == jnp.float32
        return np.asarray(state.z, np.float64)

    z32, z16 = final_z("float32"), final_z("bfloat16")
    np.testing.assert_array_less(np.abs(z32.mean(0) - mu), 4.5 * sd / np.sqrt(num_chains))
    np.testing.assert_allclose(np.cov(z32.T), ula_cov, atol=4.5 * np.sqrt(2.0 / num_chains) * sd.max() ** 2)
    np.testing.assert_array_less(np.abs(z16.mean(0) - z32.mean(0)), 0.01 * sd)
    np.testing.assert_allclose(z16.var(0), z32.var(0), rtol=0.01)


def test_bfloat16_train_step_runs_the_decoder_in_bf16(setup):
    model, state, x = setup
    step = _step(model, chain_dtype="bfloat16")
    hp = langevin.hparams(0.05, decay=0.9, eps=1e-3)
    assert "bf16" in step.lower(state, x, jax.random.key(7), hp).as_text()
    low, low_metrics = _gradients(model, state, x, chain_dtype="bfloat16")
    full, full_metrics = _gradients(model, state, x)
    for g in jax.tree.leaves(low):
        assert g.dtype == jnp.float32
    # bf16 keeps ~3 significant digits: the decoder gradient agrees to ~1% in norm.
    for a, b in zip(jax.tree.leaves(low["decoder"]), jax.tree.leaves(full["decoder"])):
        assert float(jnp.linalg.norm(a - b)) <= 0.02 * float(jnp.linalg.norm(b))
    chex.assert_trees_all_close(low_metrics, full_metrics, rtol=0.01)


def test_chain_log_joint_float32_is_the_models_log_joint(setup):
    model, state, x = setup
    z = jax.random.normal(jax.random.key(3), (BATCH, tiny_nets.LATENT))
    theta = state.params["decoder"]
    chex.assert_trees_all_equal(chain.chain_log_joint(model, x)(theta, z), model.log_joint(theta, x, z))
    with pytest.raises(ValueError, match="chain_dtype='float16'"):
        chain.chain_log_joint(model, x, chain_dtype="float16")


@pytest.mark.parametrize("field,value", [("chain_dtype", "float16"), ("theta_grad_every", 0)])
def test_config_rejects(field, value):
    with pytest.raises(ConfigError, match=f"{field}="):
        dataclasses.replace(Config(), **{field: value}).validate()
