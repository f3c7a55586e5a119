"""Every sampler and metric option against ground truth (issue 22).

Targets with exact answers:

* a correlated, ill-conditioned 3-d Gaussian (variances 4 to 0.04, correlations 0.9 and
  -0.3): ULA's and the underdamped sampler's stationary laws under a constant metric are
  Gaussians whose covariance solves a discrete Lyapunov equation (scipy), MALA's is the
  target itself;
* a 2-d banana, z1 ~ N(0, 1), z2 | z1 ~ N(B z1^2, S^2): exact draws, E z2 = B and
  Var z2 = S^2 + 2 B^2 (checked against quadrature below);
* a 64-d standard normal, where the published preconditioner traps MALA and blows up
  ULA's first step.

Chains start from the law they should keep (the target, or the predicted ULA law), so
after T steps an exact sampler's final states are B independent draws of it and the
Monte Carlo error of a mean or an sd is known in closed form. Gates are 4 standard errors.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.integrate
import scipy.linalg

from lpc_jax.sampling import langevin, mala, samplers, underdamped, warmup

N_SE = 4.0
MU = np.array([1.0, -2.0, 0.5])
SD = np.array([2.0, 1.0, 0.2])
CORR = np.array([[1.0, 0.9, 0.0], [0.9, 1.0, -0.3], [0.0, -0.3, 1.0]])
SIGMA = SD[:, None] * CORR * SD[None, :]
PRECISION = np.linalg.inv(SIGMA)
BANANA_B, BANANA_S = 1.0, 1.0
BANANA_MEAN = np.array([0.0, BANANA_B])
BANANA_SD = np.array([1.0, np.sqrt(BANANA_S**2 + 2 * BANANA_B**2)])


def gaussian_log_prob(z):
    r = z - jnp.asarray(MU, jnp.float32)[None, :]
    return -0.5 * jnp.sum(r * (r @ jnp.asarray(PRECISION, jnp.float32)), axis=-1)


def banana_log_prob(z):
    return -0.5 * z[:, 0] ** 2 - 0.5 * ((z[:, 1] - BANANA_B * z[:, 0] ** 2) / BANANA_S) ** 2


def banana_draws(key, n):
    k1, k2 = jax.random.split(key)
    z1 = jax.random.normal(k1, (n,))
    return jnp.stack([z1, BANANA_B * z1**2 + BANANA_S * jax.random.normal(k2, (n,))], axis=1)


def gaussian_draws(key, n, cov):
    return jnp.asarray(MU[None, :] + np.asarray(jax.random.normal(key, (n, 3))) @ np.linalg.cholesky(cov).T,
                       jnp.float32)


def final_z(name, log_prob, z0, step_size, num_steps, seed=1, **build):
    """The chains' final latents (float64) and the acceptance indicators (T, B) or None."""
    sampler = samplers.build(name, log_prob, **build)
    hp = langevin.hparams(step_size, decay=0.99)
    run = jax.jit(lambda k: langevin.sample_chain(k, sampler.kernel, sampler.init(z0), hp, num_steps))
    state, info = run(jax.random.key(seed))
    accepted = np.asarray(info.is_accepted) if hasattr(info, "is_accepted") else None
    return np.asarray(state.z, np.float64), accepted


def standardised_bias(z, mean, sd):
    """(mean bias in sds, sd ratio - 1, their standard errors) of (N, D) draws ``z``."""
    n = len(z)
    centred = z - z.mean(0)
    var = (centred**2).mean(0)
    se_var = np.sqrt(((centred**4).mean(0) - var**2) / n)  # delta method, any kurtosis
    return (z.mean(0) - mean) / sd, np.sqrt(var) / sd - 1, np.sqrt(var) / sd / np.sqrt(n), se_var / (2 * sd**2)


def assert_law(z, mean, cov):
    """Mean and covariance of (N, D) ``z`` within N_SE standard errors of a Gaussian law's."""
    var = np.diag(cov)
    np.testing.assert_array_less(np.abs(z.mean(0) - mean), N_SE * np.sqrt(var / len(z)))
    se = np.sqrt((np.outer(var, var) + cov**2) / len(z))  # of a sample covariance entry
    np.testing.assert_array_less(np.abs(np.cov(z.T) - cov), N_SE * se)


def ula_law(step_size, metric):
    """Stationary covariance of z' = z + h G g + sqrt(2 h G) eta on the Gaussian."""
    g = np.diag(metric)
    return scipy.linalg.solve_discrete_lyapunov(np.eye(3) - step_size * g @ PRECISION, 2 * step_size * g)


def underdamped_law(step_size, metric, friction):
    """Stationary z covariance of the B O B A map (lpc_jax.sampling.underdamped) on the Gaussian."""
    h, g, eye, zero = step_size, np.diag(metric), np.eye(3), np.zeros((3, 3))
    kick = np.block([[eye, zero], [-0.5 * h * g @ PRECISION, eye]])
    c = np.exp(-friction * h)
    o_step = np.block([[eye, zero], [zero, c * eye]])
    drift = np.block([[eye, h * eye], [zero, eye]])
    after_noise = drift @ kick
    noise = np.block([[zero, zero], [zero, (1 - c * c) * g]])
    cov = scipy.linalg.solve_discrete_lyapunov(after_noise @ o_step @ kick, after_noise @ noise @ after_noise.T)
    return cov[:3, :3]


# --------------------------------------------------------------------------- #
# Exact ground truth and the fixed-metric options
# --------------------------------------------------------------------------- #


def test_banana_moments_are_those_of_quadrature():
    density = lambda z2, z1: np.exp(-0.5 * z1**2 - 0.5 * ((z2 - BANANA_B * z1**2) / BANANA_S) ** 2)
    moment = lambda f: scipy.integrate.dblquad(lambda z2, z1: f(z1, z2) * density(z2, z1), -10, 10, -30, 130)[0]
    norm = moment(lambda z1, z2: 1.0)
    mean2 = moment(lambda z1, z2: z2) / norm
    var2 = moment(lambda z1, z2: z2**2) / norm - mean2**2
    np.testing.assert_allclose([mean2, np.sqrt(var2)], [BANANA_MEAN[1], BANANA_SD[1]], rtol=1e-6)


METRICS = {"none": None, "diag": SD**2, "skewed": np.array([0.5, 2.0, 0.01])}


@pytest.mark.parametrize("metric", sorted(METRICS))
def test_ula_with_a_constant_metric_keeps_its_predicted_law(metric):
    g = np.ones(3) if METRICS[metric] is None else METRICS[metric]
    step_size = 0.9 / np.max(np.linalg.eigvals(np.diag(g) @ PRECISION).real)  # stable: h lambda_max < 2
    cov = ula_law(step_size, g)
    z0 = gaussian_draws(jax.random.key(0), 20000, cov)
    metric_arg = None if METRICS[metric] is None else jnp.asarray(g, jnp.float32)[None, :]
    z, _ = final_z("ula", gaussian_log_prob, z0, step_size, 200, precondition=False, metric=metric_arg)
    assert_law(z, MU, cov)
    # The discretisation bias is resolved: the target's own covariance fails the same gate.
    with pytest.raises(AssertionError):
        assert_law(z, MU, SIGMA)


@pytest.mark.parametrize("metric,friction", [("none", 1.0), ("diag", 0.5), ("skewed", 5.0)])
def test_underdamped_with_a_constant_metric_keeps_its_predicted_law(metric, friction):
    g = np.ones(3) if METRICS[metric] is None else METRICS[metric]
    step_size = 1.6 / np.sqrt(np.max(np.linalg.eigvals(np.diag(g) @ PRECISION).real))  # h^2 lambda_max / 4 = 0.64
    cov = underdamped_law(step_size, g, friction)
    z0 = gaussian_draws(jax.random.key(0), 20000, cov)
    metric_arg = None if METRICS[metric] is None else jnp.asarray(g, jnp.float32)[None, :]
    # Velocities start at 0, not at their stationary law: 300 steps at friction >= 0.5 forget them.
    z, _ = final_z("underdamped", gaussian_log_prob, z0, step_size, 300, precondition=False, metric=metric_arg,
                   friction=friction)
    assert_law(z, MU, cov)
    with pytest.raises(AssertionError):
        assert_law(z, MU, SIGMA)


@pytest.mark.parametrize("metric", sorted(METRICS))
def test_mala_with_a_constant_metric_keeps_the_gaussian(metric):
    g = np.ones(3) if METRICS[metric] is None else METRICS[metric]
    step_size = 1.5 / np.max(np.linalg.eigvals(np.diag(g) @ PRECISION).real)  # ULA's bias is large here
    z0 = gaussian_draws(jax.random.key(0), 20000, SIGMA)
    metric_arg = None if METRICS[metric] is None else jnp.asarray(g, jnp.float32)[None, :]
    z, accepted = final_z("mala", gaussian_log_prob, z0, step_size, 200, precondition=False, metric=metric_arg)
    assert 0.3 < accepted.mean() < 0.99
    assert_law(z, MU, SIGMA)


def banana_bias(name, step_size, num_steps=300, num_chains=8000, **build):
    z0 = banana_draws(jax.random.key(0), num_chains)
    z, accepted = final_z(name, banana_log_prob, z0, step_size, num_steps, **build)
    assert np.isfinite(z).all()
    return (*standardised_bias(z, BANANA_MEAN, BANANA_SD), accepted)


def test_mala_on_the_banana_is_exact_with_g_1_and_with_a_warm_up_metric():
    # G = 1.
    mean_bias, sd_bias, se_mean, se_sd, _ = banana_bias("mala", 0.1, precondition=False)
    np.testing.assert_array_less(np.abs(mean_bias), N_SE * se_mean)
    np.testing.assert_array_less(np.abs(sd_bias), N_SE * se_sd)
    # The metric of a warm-up run with the adaptive preconditioner, then fixed.
    z0 = banana_draws(jax.random.key(0), 8000)
    hp = langevin.hparams(0.1, decay=0.99)
    adaptive = mala.build_kernel(banana_log_prob, precondition="adam")
    state, metric = jax.jit(lambda k: warmup.estimate_metric(k, adaptive, mala.init(z0), hp, 100))(
        jax.random.key(2))
    np.testing.assert_allclose(metric[0], BANANA_SD**2, rtol=0.25)  # the warm-up's own (biased) chain
    exact = mala.build_kernel(banana_log_prob, metric=metric)
    # Restart from exact draws: the fixed metric's chain must keep them.
    state, info = jax.jit(lambda k: langevin.sample_chain(k, exact, mala.init(z0), hp, 300))(jax.random.key(3))
    mean_bias, sd_bias, se_mean, se_sd = standardised_bias(np.asarray(state.z, np.float64), BANANA_MEAN, BANANA_SD)
    np.testing.assert_array_less(np.abs(mean_bias), N_SE * se_mean)
    np.testing.assert_array_less(np.abs(sd_bias), N_SE * se_sd)
    assert 0.5 < float(info.acceptance_prob.mean()) < 0.99


# --------------------------------------------------------------------------- #
# The adaptive (Adam-style) metric: biased, but bounded and never stuck
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("name", ["ula", "mala", "underdamped"])
def test_adam_metric_on_the_banana_is_biased_within_a_bound(name):
    # A quarter of the default step (the underdamped sampler: its ULA-equivalent time step).
    step_size = 0.025 if name != "underdamped" else float(np.sqrt(2 * 0.025))
    mean_bias, sd_bias, se_mean, se_sd, accepted = banana_bias(name, step_size, precondition="adam")
    # Bounded: within 0.3 sd in the mean and 30% in the sd (docs/results.md has the figures;
    # the published form's underdamped chain is 43% too wide in z2 here, and fails this).
    np.testing.assert_array_less(np.abs(mean_bias), 0.3)
    np.testing.assert_array_less(np.abs(sd_bias), 0.3)
    if name == "mala":
        assert (accepted.sum(0) > 0).all()
        # ...but not exact: the Metropolis correction does not remove the adaptation's bias.
        assert np.abs(sd_bias).max() > N_SE * se_sd.max()


def standard_normal_mala(form, step_sizes, *, adapt_on_proposal=True, num_chains=300, num_steps=300, dim=64):
    """Acceptance (K,) and the share of chains that never accept (K,), one row per step size."""
    kernel = mala.build_kernel(lambda z: -0.5 * jnp.sum(z * z, axis=-1), precondition=form,
                               adapt_on_proposal=adapt_on_proposal)
    z0 = jax.random.normal(jax.random.key(0), (num_chains, dim))
    run = lambda hp: langevin.sample_chain(jax.random.key(1), kernel, mala.init(z0), hp, num_steps)[1]
    info = jax.jit(jax.vmap(run))(langevin.stack_hparams(step_sizes, 0.99))
    accepted = np.asarray(info.is_accepted)
    return accepted.mean((1, 2)), (accepted.sum(1) == 0).mean(-1)


@pytest.mark.parametrize("form", [False, "adam", "adam_paper"])
def test_mala_chains_never_stick_where_plain_mala_accepts_half(form):
    step_sizes = [0.05, 0.3]  # plain MALA: acceptance 0.97 and 0.64 (0.48 at 0.4)
    acceptance, stuck = standard_normal_mala(form, step_sizes)
    np.testing.assert_array_equal(stuck, 0.0)
    np.testing.assert_array_less(0.5, acceptance)


def test_mala_fed_only_its_current_drift_traps_itself():
    # The mechanism the proposal's drift removes (issue 22): a rejection feeds the same
    # small drift again, the metric 1 / |g| grows, the next proposal is thrown further.
    acceptance, stuck = standard_normal_mala("adam_paper", [0.05, 0.3], adapt_on_proposal=False)
    assert stuck[1] > 0.9 and acceptance[1] < 0.01
    assert stuck[0] > 0.02


@pytest.mark.slow
@pytest.mark.parametrize("form", ["adam", "adam_paper"])
def test_mala_never_sticks_over_the_whole_step_range(form):
    step_sizes = [0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3]
    plain, _ = standard_normal_mala(False, step_sizes, num_chains=1000, num_steps=500)
    assert (plain >= 0.5).all()
    _, stuck = standard_normal_mala(form, step_sizes, num_chains=1000, num_steps=500)
    np.testing.assert_array_equal(stuck, 0.0)


@pytest.mark.parametrize("name", ["ula", "mala", "underdamped"])
def test_first_step_from_the_mode_is_bounded_with_the_adam_form(name):
    # 64-d standard normal, started at |z| ~ 8e-6: the drift is ~1e-6 per coordinate.
    z0 = 1e-6 * jax.random.normal(jax.random.key(0), (1000, 64))
    lp = lambda z: -0.5 * jnp.sum(z * z, axis=-1)
    step_size = 0.03 if name != "underdamped" else float(np.sqrt(2 * 0.03))
    norms = {}
    for form in ("adam", "adam_paper"):
        sampler = samplers.build(name, lp, precondition=form)
        hp = langevin.hparams(step_size, decay=0.99)
        state, _ = sampler.kernel(jax.random.key(1), sampler.init(z0), hp)
        norms[form] = np.linalg.norm(np.asarray(state.z), axis=-1)
    # G_1 <= 1 / sqrt(0.99): |z_1| ~ sqrt(2 * 0.03 * 64) = 1.96 (a chi with 64 dof).
    assert norms["adam"].max() < 3.0
    if name != "mala":  # the published form: G_1 = 1 / |g_1| ~ 1e6, |z_1| in the thousands
        assert np.median(norms["adam_paper"]) > 100
    else:  # MALA rejects that move: the chain stays at the mode
        assert np.median(norms["adam_paper"]) < 1e-4


def test_warm_up_metric_is_the_targets_variance():
    z0 = gaussian_draws(jax.random.key(0), 2000, SIGMA)
    kernel = mala.build_kernel(gaussian_log_prob, metric=jnp.asarray(SD**2, jnp.float32)[None, :])
    hp = langevin.hparams(0.05)
    _, pooled = warmup.estimate_metric(jax.random.key(1), kernel, mala.init(z0), hp, 50)
    _, per_chain = warmup.estimate_metric(jax.random.key(1), kernel, mala.init(z0), hp, 50, pool_chains=False)
    assert pooled.shape == (1, 3) and per_chain.shape == (2000, 3)
    np.testing.assert_allclose(pooled[0], SD**2, rtol=0.1)
    with pytest.raises(ValueError, match="at least 2"):
        warmup.estimate_metric(jax.random.key(1), kernel, mala.init(z0), hp, 1)


def test_unknown_preconditioner_form_is_rejected():
    with pytest.raises(ValueError, match="adam_paper"):
        underdamped.build_kernel(gaussian_log_prob, precondition="adagrad")
