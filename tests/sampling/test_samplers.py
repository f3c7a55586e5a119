"""MALA and underdamped Langevin on Gaussian targets with known answers."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from lpc_jax.model import steps
from lpc_jax.model.state import create_train_state
from lpc_jax.sampling import langevin, mala, preconditioner, samplers, underdamped

MU = np.array([1.0, -2.0, 0.5])
SIGMA = np.array([[1.0, 0.6, 0.0], [0.6, 1.0, -0.3], [0.0, -0.3, 0.5]])  # correlated, eigenvalues 0.22-1.64
PRECISION = np.linalg.inv(SIGMA)
NUM_CHAINS = 20000


def gaussian_log_prob(z):
    r = z - jnp.asarray(MU, jnp.float32)[None, :]
    return -0.5 * jnp.sum(r * (r @ jnp.asarray(PRECISION, jnp.float32)), axis=-1)


def final_states(kernel, hparams, init_fn, num_steps, seed=0):
    run = jax.jit(lambda k: langevin.sample_chain(k, kernel, init_fn(jnp.zeros((NUM_CHAINS, 3))),
                                                   hparams, num_steps))
    return run(jax.random.key(seed))


def assert_moments(z, mean, cov, n_se=4.0):
    """Sample mean and covariance of (N, D) ``z`` within ``n_se`` standard errors of the expected."""
    z = np.asarray(z, np.float64)
    var = np.diag(cov)
    np.testing.assert_allclose(z.mean(0), mean, atol=n_se * np.sqrt(var.max() / len(z)))
    # s.e. of a sample covariance entry: sqrt((S_ii S_jj + S_ij^2) / N).
    se = np.sqrt((np.outer(var, var) + cov**2) / len(z))
    np.testing.assert_array_less(np.abs(np.cov(z.T) - cov), n_se * se)


def ula_stationary_cov(step_size):
    # z' = (I - hP) z + ... + sqrt(2h) eta  =>  S = Sigma (I - h P / 2)^{-1}.
    return SIGMA @ np.linalg.inv(np.eye(3) - step_size * PRECISION / 2)


def test_mala_has_no_discretisation_bias_where_ula_has():
    step_size = 0.2  # ULA's variances are 13-29% above the target's here
    hp = langevin.hparams(step_size)
    ula_state, _ = final_states(langevin.build_kernel(gaussian_log_prob, precondition=False), hp, langevin.init, 500)
    mala_state, info = final_states(mala.build_kernel(gaussian_log_prob, precondition=False), hp, mala.init, 500)
    chex.assert_shape(info.acceptance_prob, (500, NUM_CHAINS))
    assert 0.3 < float(info.acceptance_prob[-100:].mean()) < 0.95
    assert_moments(mala_state.z, MU, SIGMA)
    assert_moments(ula_state.z, MU, ula_stationary_cov(step_size))
    # ULA's bias is resolved at this N (> 8 s.e.), MALA's variance is within 4 s.e. of the target.
    ula_ratio = np.asarray(ula_state.z).var(0) / np.diag(SIGMA)
    assert np.all(ula_ratio - 1 > 8 * np.sqrt(2 / NUM_CHAINS)), ula_ratio


def test_mala_with_a_fixed_metric_is_exact():
    metric = jnp.array([[2.0, 0.5, 0.3]])
    kernel = mala.build_kernel(gaussian_log_prob, metric=metric)
    state, info = final_states(kernel, langevin.hparams(0.2), mala.init, 500, seed=1)
    assert 0.3 < float(info.acceptance_prob[-100:].mean()) < 0.95
    assert_moments(state.z, MU, SIGMA)


def test_mala_acceptance_probability_is_the_metropolis_hastings_ratio():
    z0 = 1.5 * jax.random.normal(jax.random.key(1), (64, 3))
    state = langevin.LangevinState(z0, jnp.full((64, 3), 0.4), jnp.asarray(3, jnp.int32))
    hp = langevin.hparams(0.3, decay=0.9, eps=1e-3)
    key = jax.random.key(2)
    new, info = mala.build_kernel(gaussian_log_prob, precondition=True)(key, state, hp)
    proposal = langevin.build_kernel(gaussian_log_prob, precondition=True)(jax.random.split(key)[0], state, hp)[0]
    # Float64 reference: the Gaussian proposal densities with G fixed over the step.
    mu, prec = MU, PRECISION
    log_p = lambda z: -0.5 * np.einsum("bi,ij,bj->b", z - mu, prec, z - mu)
    grad = lambda z: -(z - mu) @ prec
    z, zp = np.asarray(z0, np.float64), np.asarray(proposal.z, np.float64)
    m = 0.9 * 0.4 + 0.1 * grad(z) ** 2
    g = 1 / (np.sqrt(m / (1 - 0.9**4)) + 1e-3)
    log_q = lambda b, a: -np.sum((b - a - 0.3 * g * grad(a)) ** 2 / (4 * 0.3 * g), axis=-1)
    expected = np.minimum(1.0, np.exp(log_p(zp) - log_p(z) + log_q(z, zp) - log_q(zp, z)))
    np.testing.assert_allclose(info.acceptance_prob, expected, rtol=2e-4, atol=1e-6)
    assert 0 < int(info.is_accepted.sum()) < 64  # a per-chain decision, not one for the batch
    chosen = np.where(np.asarray(info.is_accepted)[:, None], zp, z)
    np.testing.assert_array_equal(new.z, chosen.astype(np.float32))
    # The EMA advances whether or not the move is kept, fed the mean squared drift of z and z'.
    np.testing.assert_allclose(new.m, 0.9 * 0.4 + 0.1 * (grad(z) ** 2 + grad(zp) ** 2) / 2, rtol=1e-5)
    old = mala.build_kernel(gaussian_log_prob, precondition=True, adapt_on_proposal=False)(key, state, hp)[0]
    np.testing.assert_allclose(old.m, proposal.m)  # fed g(z) only, as ULA
    assert int(new.count) == 4


def test_mala_at_a_tiny_step_is_the_ula_move():
    state = mala.init(jax.random.normal(jax.random.key(3), (256, 3)))
    hp = langevin.hparams(1e-6)
    key = jax.random.key(4)
    new, info = mala.build_kernel(gaussian_log_prob, precondition=False)(key, state, hp)
    ula, _ = langevin.build_kernel(gaussian_log_prob, precondition=False)(jax.random.split(key)[0], state, hp)
    assert bool(info.is_accepted.all())
    assert float(info.acceptance_prob.min()) > 0.999
    chex.assert_trees_all_equal(new, ula)


def underdamped_stationary_cov(step_size):
    # Velocity Verlet conserves z'P(I - h^2 P / 4)z / 2 + |v|^2 / 2, the O step keeps
    # v ~ N(0, I): for every friction, S = Sigma (I - h^2 P / 4)^{-1}.
    return SIGMA @ np.linalg.inv(np.eye(3) - step_size**2 * PRECISION / 4)


def test_underdamped_closed_form_is_the_stationary_law_of_the_step():
    # Solve the discrete Lyapunov equation of the linear B O B A map for (z, v), per friction.
    h, eye = 0.4, np.eye(3)
    for friction in (0.3, 1.0, 4.0):
        c, s = np.exp(-friction * h), np.sqrt(1 - np.exp(-2 * friction * h))
        v_z, v_v = -c * h / 2 * PRECISION - h / 2 * PRECISION, c * eye  # v' = v_z z + v_v v + s xi
        step = np.block([[eye + h * v_z, h * v_v], [v_z, v_v]])
        noise = np.vstack([h * s * eye, s * eye])
        cov = scipy.linalg.solve_discrete_lyapunov(step, noise @ noise.T)
        np.testing.assert_allclose(cov[:3, :3], underdamped_stationary_cov(h), atol=1e-10)


@pytest.mark.parametrize("step_size,friction", [(0.4, 0.5), (0.4, 2.0), (0.1, 1.0)])
def test_underdamped_matches_its_stationary_law(step_size, friction):
    kernel = underdamped.build_kernel(gaussian_log_prob, precondition=False)
    num_steps = int(60 / step_size)  # 60 time units: many relaxation times at these frictions
    state, info = final_states(kernel, underdamped.hparams(step_size, friction), underdamped.init, num_steps)
    assert_moments(state.z, MU, underdamped_stationary_cov(step_size))
    # Kinetic energy after the O step: 0.5 |v|^2 with v ~ N(0, I), mean D/2, variance D/2.
    ke = np.asarray(info.kinetic_energy[-1])
    np.testing.assert_allclose(ke.mean(), 1.5, atol=4 * np.sqrt(1.5 / NUM_CHAINS))
    if step_size == 0.1:  # h^2 lambda_max / 4 < 1.2%: the target itself within 3%
        np.testing.assert_allclose(np.asarray(state.z).var(0), np.diag(SIGMA), rtol=0.03)


@pytest.mark.parametrize("precondition", [False, True])
def test_underdamped_with_infinite_friction_is_ula_at_half_the_squared_step(precondition):
    h = 0.3
    z0 = jax.random.normal(jax.random.key(5), (16, 3))
    ud = underdamped.build_kernel(gaussian_log_prob, precondition=precondition)
    ula = langevin.build_kernel(gaussian_log_prob, precondition=precondition)
    key = jax.random.key(6)
    ud_state, ud_info = langevin.sample_chain(key, ud, underdamped.init(z0, v=jnp.ones_like(z0)),
                                              underdamped.hparams(h, friction=jnp.inf, decay=0.9), 8)
    ula_state, ula_info = langevin.sample_chain(key, ula, langevin.init(z0), langevin.hparams(h**2 / 2, 0.9), 8)
    np.testing.assert_allclose(ud_state.z, ula_state.z, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ud_state.m, ula_state.m, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ud_info.log_prob, ula_info.log_prob, rtol=1e-5, atol=1e-5)


def test_underdamped_without_noise_is_heavy_ball_ascent():
    h, friction = 0.2, 1.5
    kernel = underdamped.build_kernel(gaussian_log_prob, precondition=False, noise=False)
    z0 = jax.random.normal(jax.random.key(7), (4, 3))
    state, _ = langevin.sample_chain(jax.random.key(8), kernel, underdamped.init(z0),
                                     underdamped.hparams(h, friction), 6)
    z, v, c = np.asarray(z0, np.float64), np.zeros((4, 3)), np.exp(-friction * h)
    for _ in range(6):
        kick = h / 2 * -(z - MU) @ PRECISION
        v = c * (v + kick) + kick
        z = z + h * v
    np.testing.assert_allclose(state.z, z, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(state.v, v, rtol=1e-5, atol=1e-5)


def test_underdamped_does_not_retrace_for_new_hyperparameters():
    kernel = underdamped.build_kernel(gaussian_log_prob)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def run(hp, key):
        return langevin.sample_chain(key, kernel, underdamped.init(jnp.zeros((4, 3))), hp, 3)[0].z

    for step_size, friction in [(0.1, 1.0), (0.5, 0.1), (0.05, 10.0)]:
        run(underdamped.hparams(step_size, friction), jax.random.key(0))


def params_log_prob(params, z):
    mu, scale = params
    return -0.5 * jnp.sum(((z - mu[None, :]) / scale[None, :]) ** 2, axis=-1)


@pytest.mark.parametrize("name", samplers.SAMPLERS)
def test_param_grad_kernel_is_the_kernel_plus_the_params_gradient(name):
    params = (jnp.asarray(MU, jnp.float32), jnp.array([1.0, 0.5, 2.0]))
    plain = samplers.build(name, lambda z: params_log_prob(params, z), friction=0.7)
    with_grad = samplers.build(name, params_log_prob, friction=0.7, with_param_grad=True)
    state = plain.init(jax.random.normal(jax.random.key(9), (6, 3)))
    hp, key = langevin.hparams(0.05, decay=0.9, eps=1e-3), jax.random.key(10)
    new, info = plain.kernel(key, state, hp)
    new_g, info_g, (g_mu, g_scale) = with_grad.kernel(key, state, hp, params)
    chex.assert_trees_all_equal((new, info), (new_g, info_g))
    # The gradient of sum_b log p at the pre-move latents.
    r, s = np.asarray(state.z, np.float64) - MU, np.array([1.0, 0.5, 2.0])
    np.testing.assert_allclose(g_mu, (r / s**2).sum(0), rtol=1e-5)
    np.testing.assert_allclose(g_scale, (r**2 / s**3).sum(0), rtol=1e-5)


def test_registry_binds_friction_and_rejects_unknown_names():
    sampler = samplers.build("underdamped", gaussian_log_prob, precondition=False, friction=0.7)
    direct = underdamped.build_kernel(gaussian_log_prob, precondition=False)
    state = sampler.init(jnp.ones((5, 3)))
    key = jax.random.key(11)
    chex.assert_trees_all_equal(sampler.kernel(key, state, langevin.hparams(0.1, 0.9)),
                                direct(key, state, underdamped.hparams(0.1, 0.7, 0.9)))
    assert isinstance(samplers.build("mala", gaussian_log_prob).init(jnp.ones((5, 3))), langevin.LangevinState)
    with pytest.raises(ValueError, match="sampler"):
        samplers.build("hmc", gaussian_log_prob)


def test_preconditioner_metric_is_shared():
    # The three samplers take their G from langevin.diagonal_metric: the preconditioner's.
    drift = jnp.array([[2.0, 0.5, 1.0]])
    state = langevin.init(jnp.zeros((1, 3)))
    hp = langevin.hparams(0.1, decay=0.5)
    m, g = langevin.diagonal_metric(state, drift, hp, precondition=True)
    chex.assert_trees_all_equal((m, g), preconditioner.update(state.m, drift, state.count, hp.decay, hp.eps))
    np.testing.assert_array_equal(langevin.diagonal_metric(state, drift, hp, precondition=False)[1], jnp.ones((1, 3)))


# --------------------------------------------------------------------------- #
# The LPC train step with each sampler
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def tiny():
    import optax

    from tests import tiny_model

    model = tiny_model.tiny_model(optax.sgd(1.0))  # SGD at lr 1: old - new params is the gradient
    state = create_train_state(jax.random.key(0), model, tiny_model.SHAPE, tiny_model.LATENT)
    x = jax.random.uniform(jax.random.key(1), (3, *tiny_model.SHAPE), minval=-1, maxval=1)
    return model, state, x


@pytest.mark.parametrize("name", samplers.SAMPLERS)
def test_train_step_decoder_gradient_sums_the_samplers_own_chain(tiny, name):
    from lpc_jax.model import objectives

    model, state, x = tiny
    num_steps, hp, key = 5, langevin.hparams(0.05, decay=0.9, eps=1e-3), jax.random.key(2)
    step = jax.jit(lambda s: steps.lpc_train_step(s, x, key, hp, model=model, num_steps=num_steps, sampler=name,
                                               friction=0.7, prior_init_batches=0))
    new_state, metrics = step(state)
    assert ("accept_rate" in metrics) == (name == "mala")
    if name == "mala":
        assert 0.0 <= float(metrics["accept_rate"]) <= 1.0
    # Reference: the standalone kernel, stepped in Python from the train step's start and keys.
    theta = state.params["decoder"]
    k_q, _, _, k_chain = jax.random.split(key, 4)
    mean, variance = model.encoder.apply({"params": state.params["encoder"]}, x)
    sampler = samplers.build(name, lambda th, z: model.log_joint(th, x, z), friction=0.7, with_param_grad=True)
    chain_state, total = sampler.init(objectives.sample_gaussian(k_q, mean, variance)), None
    for k in jax.random.split(k_chain, num_steps):
        chain_state, _, g = sampler.kernel(k, chain_state, hp, theta)
        total = g if total is None else jax.tree.map(jnp.add, total, g)
    expected = jax.tree.map(lambda g: g / (num_steps * x.shape[0]), total)  # the ascent direction, eq. 8
    got = jax.tree.map(jnp.subtract, new_state.params["decoder"], theta)  # SGD(1) on its negative
    # Leaves reach O(10-100) and sum terms of both signs: float32 rounding of a jitted scan
    # against a Python loop stays below 1e-5 of each leaf's largest entry.
    for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
        np.testing.assert_allclose(g, e, rtol=1e-3, atol=1e-5 * float(jnp.abs(e).max()))


@pytest.mark.parametrize("name", ["mala", pytest.param("underdamped", marks=pytest.mark.slow)])
def test_train_step_memory_does_not_grow_with_chain_length(tiny, name):
    import functools



    model, state, x = tiny

    def temp_bytes(num_steps):
        step = jax.jit(functools.partial(steps.lpc_train_step, model=model, num_steps=num_steps, sampler=name))
        compiled = step.lower(state, x, jax.random.key(0), langevin.hparams(0.1)).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    # Only the per-step scalar traces (log p, drift norm, acceptance: 4 bytes each) grow with T;
    # one step's decoder activations and latents alone take ~700 bytes here.
    short, long = temp_bytes(4), temp_bytes(256)
    assert long - short <= 24 * (256 - 4), (short, long)


def test_train_step_samplers_run_with_a_thinned_decoder_gradient(tiny):
    from lpc_jax.model import steps

    model, state, x = tiny
    for name in ("mala", "underdamped"):
        _, metrics = jax.jit(lambda s, n=name: steps.lpc_train_step(
            s, x, jax.random.key(3), langevin.hparams(0.05), model=model, num_steps=6, sampler=name,
            theta_grad_every=3))(state)
        chex.assert_tree_all_finite(metrics)
