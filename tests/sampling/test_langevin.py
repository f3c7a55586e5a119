"""The sampler on targets with known answers."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lpc_jax.sampling import langevin, preconditioner
from lpc_jax.training.config import Config

MU = jnp.array([1.0, -2.0, 0.5])
SIGMA = jnp.array([1.0, 0.5, 2.0])


def gaussian_log_prob(z):
    return -0.5 * jnp.sum(((z - MU[None, :]) / SIGMA[None, :]) ** 2, axis=-1)


def run_chains(kernel, hparams, num_chains=20000, num_steps=400, seed=0):
    state = langevin.init(jnp.zeros((num_chains, 3)))
    run = jax.jit(lambda k, s: langevin.sample_chain(k, kernel, s, hparams, num_steps))
    return run(jax.random.key(seed), state)


def ula_stationary_variance(step_size, metric):
    # z' = z - (h / s^2)(z - mu) + sqrt(2h) eta with h = step_size * G:
    # v = (1 - h/s^2)^2 v + 2h  =>  v = 2 s^2 / (2 - h / s^2).
    h = step_size * metric
    return 2 * SIGMA**2 / (2 - h / SIGMA**2)


@pytest.mark.parametrize("step_size", [0.05, 0.2])
def test_ula_gaussian_matches_discretised_stationary_law(step_size):
    kernel = langevin.build_kernel(gaussian_log_prob, precondition=False)
    state, info = run_chains(kernel, langevin.hparams(step_size))
    chex.assert_shape(info.log_prob, (400, 20000))
    chex.assert_shape(info.drift_norm, (400, 20000))
    z = np.asarray(state.z)
    expected_var = np.asarray(ula_stationary_variance(step_size, 1.0))
    np.testing.assert_allclose(z.mean(0), MU, atol=4 * float(np.sqrt(expected_var.max() / z.shape[0])))
    # Relative s.e. of a variance estimate is sqrt(2 / N) ~ 1%; allow 4 s.e.
    np.testing.assert_allclose(z.var(0), expected_var, rtol=0.04)
    if step_size == 0.2:  # the discretisation bias is resolved: 1.1x-ish above sigma^2
        assert np.all(np.abs(z.var(0) / SIGMA**2 - 1) > 0.02)


def test_fixed_metric_gaussian_matches_stationary_law():
    metric = jnp.array([0.5, 0.2, 4.0])
    kernel = langevin.build_kernel(gaussian_log_prob, metric=metric[None, :])
    state, _ = run_chains(kernel, langevin.hparams(0.2), num_steps=600)
    z = np.asarray(state.z)
    np.testing.assert_allclose(z.mean(0), MU, atol=0.05)
    np.testing.assert_allclose(z.var(0), ula_stationary_variance(0.2, metric), rtol=0.04)


def test_adaptive_preconditioner_samples_near_the_target():
    kernel = langevin.build_kernel(gaussian_log_prob, precondition=True)
    state, _ = run_chains(kernel, langevin.hparams(0.01, decay=0.99), num_steps=600)
    z = np.asarray(state.z)
    np.testing.assert_allclose(z.mean(0), MU, atol=0.1)
    # The adaptive metric is not exactly invariant (Gamma term dropped), but the
    # spread must be of the target's order, not collapsed or blown up.
    ratio = z.std(0) / np.asarray(SIGMA)
    assert np.all((ratio > 0.6) & (ratio < 1.5)), ratio


def test_zero_noise_is_gradient_ascent():
    kernel = langevin.build_kernel(gaussian_log_prob, precondition=False, noise=False)
    hp = langevin.hparams(0.1)
    z0 = jax.random.normal(jax.random.key(1), (5, 3))
    state, _ = langevin.sample_chain(jax.random.key(2), kernel, langevin.init(z0), hp, 7)
    z = np.asarray(z0, np.float64)
    for _ in range(7):
        z = z + 0.1 * (-(z - np.asarray(MU)) / np.asarray(SIGMA) ** 2)
    np.testing.assert_allclose(state.z, z, rtol=1e-5, atol=1e-6)
    assert int(state.count) == 7


def test_zero_noise_preconditioned_matches_algorithm_1():
    kernel = langevin.build_kernel(gaussian_log_prob, precondition=True, noise=False)
    hp = langevin.hparams(0.05, decay=0.9, eps=1e-3)
    z0 = jax.random.normal(jax.random.key(3), (4, 3))
    state, _ = langevin.sample_chain(jax.random.key(4), kernel, langevin.init(z0), hp, 5)
    z, m = np.asarray(z0, np.float64), np.zeros((4, 3))
    for t in range(1, 6):
        g = -(z - np.asarray(MU)) / np.asarray(SIGMA) ** 2
        m = 0.9 * m + 0.1 * g * g
        m_hat = np.sqrt(m / (1 - 0.9**t))
        z = z + 0.05 * g / (m_hat + 1e-3)
    np.testing.assert_allclose(state.z, z, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(state.m, m, rtol=1e-4)


def test_noise_variance_is_two_step_size_times_metric():
    # With zero drift, one step adds N(0, 2 * step_size * G); check G from the preconditioner.
    drift = jnp.full((50000, 2), 0.0).at[:, 0].set(2.0).at[:, 1].set(0.5)
    state = langevin.init(jnp.zeros((50000, 2)))
    hp = langevin.hparams(0.1, decay=0.5, eps=1e-8)
    new = langevin.update(jax.random.key(5), state, drift, hp, precondition=True)
    _, metric = preconditioner.update(state.m, drift, state.count, hp.decay, hp.eps)
    np.testing.assert_allclose(metric[0], [0.5, 2.0], rtol=1e-5)  # 1/|g| after bias correction
    noise = np.asarray(new.z - 0.1 * metric * drift)
    np.testing.assert_allclose(noise.var(0), 2 * 0.1 * np.asarray(metric[0]), rtol=0.03)


def test_kernel_does_not_retrace_for_new_hyperparameters():
    kernel = langevin.build_kernel(gaussian_log_prob)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def run(hp, key):
        return langevin.sample_chain(key, kernel, langevin.init(jnp.zeros((4, 3))), hp, 3)[0].z

    for step_size, decay in [(0.1, 0.9), (0.01, 0.0), (0.5, 0.25)]:
        run(langevin.hparams(step_size, decay), jax.random.key(0))


def test_vmap_over_step_sizes():
    kernel = langevin.build_kernel(gaussian_log_prob, precondition=False)
    steps = jnp.array([0.01, 0.1])
    hp = langevin.LangevinHParams(steps, jnp.full(2, 0.9), jnp.full(2, 1e-8))
    run = jax.vmap(lambda h: langevin.sample_chain(
        jax.random.key(0), kernel, langevin.init(jnp.zeros((8, 3))), h, 4)[0].z)
    out = run(hp)
    chex.assert_shape(out, (2, 8, 3))
    single = langevin.sample_chain(jax.random.key(0), kernel, langevin.init(jnp.zeros((8, 3))),
                                   langevin.hparams(0.1), 4)[0].z
    np.testing.assert_allclose(out[1], single, rtol=1e-5, atol=1e-6)


def test_trace_has_chain_shape():
    kernel = langevin.build_kernel(gaussian_log_prob)
    _, infos, zs = langevin.sample_chain(jax.random.key(0), kernel, langevin.init(jnp.zeros((2, 3))),
                                         langevin.hparams(0.1), 6, return_trace=True)
    chex.assert_shape(zs, (6, 2, 3))
    chex.assert_tree_all_finite(infos)


def test_param_grad_kernel_is_the_kernel_plus_the_params_gradient():
    # log p(z; mu, sigma) with the target's parameters as leading arguments.
    def log_prob(params, z):
        mu, sigma = params
        return -0.5 * jnp.sum(((z - mu[None, :]) / sigma[None, :]) ** 2, axis=-1)

    hp = langevin.hparams(0.05, decay=0.9, eps=1e-3)
    state = langevin.init(jax.random.normal(jax.random.key(1), (6, 3)))
    state = langevin.LangevinState(state.z, jnp.full((6, 3), 0.3), jnp.asarray(4, jnp.int32))
    plain = langevin.build_kernel(lambda z: log_prob((MU, SIGMA), z), precondition=True)
    with_grad = langevin.build_kernel(log_prob, precondition=True, with_param_grad=True)
    key = jax.random.key(2)
    new, info = plain(key, state, hp)
    new_g, info_g, (g_mu, g_sigma) = with_grad(key, state, hp, (MU, SIGMA))
    chex.assert_trees_all_equal((new, info), (new_g, info_g))
    # grad of sum_b log p at the pre-move latents: sum_b (z - mu) / s^2 and sum_b (z - mu)^2 / s^3.
    z = np.asarray(state.z, np.float64)
    r = z - np.asarray(MU)
    s = np.asarray(SIGMA, np.float64)
    np.testing.assert_allclose(g_mu, (r / s**2).sum(0), rtol=1e-5)
    np.testing.assert_allclose(g_sigma, (r**2 / s**3).sum(0), rtol=1e-5)
    np.testing.assert_allclose(info_g.drift_norm, np.linalg.norm(-r / s**2, axis=-1), rtol=1e-5)


def test_param_grad_kernel_takes_extra_args_after_params():
    def log_prob(scale, z, shift):
        return -0.5 * scale * jnp.sum((z - shift) ** 2, axis=-1)

    kernel = jax.jit(langevin.build_kernel(log_prob, precondition=False, noise=False, with_param_grad=True))
    z0 = jnp.array([[1.0, 2.0], [0.0, -1.0]])
    state, info, g_scale = kernel(jax.random.key(0), langevin.init(z0), langevin.hparams(0.1), 2.0, 0.5)
    np.testing.assert_allclose(state.z, z0 - 0.1 * 2.0 * (z0 - 0.5), rtol=1e-6)
    np.testing.assert_allclose(info.log_prob, -np.sum((z0 - 0.5) ** 2, axis=-1), rtol=1e-6)
    np.testing.assert_allclose(g_scale, -0.5 * np.sum((z0 - 0.5) ** 2), rtol=1e-6)


def test_hparams_are_float32_scalars_and_traceable():
    hp = langevin.hparams(0.1, decay=0.9, eps=1e-3)
    for value, expected in zip(hp, (0.1, 0.9, 1e-3)):
        chex.assert_shape(value, ())
        assert value.dtype == jnp.float32
        assert value == jnp.float32(expected)
    # No Python-side checks, so the builder works on traced values too.
    traced = jax.jit(langevin.hparams)(0.2, 0.5, 1e-6)
    chex.assert_trees_all_equal(traced, langevin.hparams(0.2, 0.5, 1e-6))


@pytest.mark.parametrize("field,value", [("step_size", 0.0), ("step_size", -1.0), ("decay", 1.0),
                                         ("decay", -0.5), ("eps", 0.0)])
def test_invalid_hparams_are_rejected_by_the_config(field, value):
    with pytest.raises(ValueError, match=field):
        Config(**{field: value}).validate()
