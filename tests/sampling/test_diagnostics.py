"""Chain diagnostics on Gaussian targets and synthetic draws with known answers."""

import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lpc_jax import plotting
from lpc_jax.sampling import diagnostics, langevin, samplers

split_rhat = jax.jit(diagnostics.split_rhat)
effective_sample_size = jax.jit(diagnostics.effective_sample_size)
convergence_statistics = jax.jit(diagnostics.convergence_statistics, static_argnums=1)

MU = jnp.array([1.0, -2.0, 0.5])
SCALE = jnp.array([1.0, 0.5, 2.0])


def gaussian_log_prob(z, shift):
    return -0.5 * jnp.sum(((z - MU[None, :] - shift) / SCALE[None, :]) ** 2, axis=-1)


def ar1_draws(key, rho, shape, offsets=0.0):
    """Stationary AR(1) chains z_n = rho z_{n-1} + sqrt(1 - rho^2) e_n, unit variance; (C, N, ...)."""
    noise = jax.random.normal(key, shape)

    def step(z, e):
        z = rho * z + np.sqrt(1 - rho**2) * e
        return z, z

    _, zs = jax.lax.scan(step, noise[:, 0], jnp.swapaxes(noise, 0, 1))
    return jnp.swapaxes(zs, 0, 1) + offsets


def test_mixed_chains_have_rhat_near_one_and_full_ess():
    draws = jax.random.normal(jax.random.key(0), (4, 1000, 50))  # iid: perfectly mixed
    rhat = split_rhat(draws)
    ess = effective_sample_size(draws)
    chex.assert_shape((rhat, ess), ((50,), (50,)))
    assert float(jnp.abs(rhat - 1).max()) < 0.01
    # ESS of iid draws is the number of draws (4000), up to estimation noise.
    np.testing.assert_allclose(float(jnp.median(ess)), 4000, rtol=0.1)


def test_ess_of_an_ar1_chain_is_n_times_1_minus_rho_over_1_plus_rho():
    rho = 0.8
    draws = ar1_draws(jax.random.key(1), rho, (8, 4000, 20))
    expected = 8 * 4000 * (1 - rho) / (1 + rho)  # 3556
    np.testing.assert_allclose(float(jnp.median(effective_sample_size(draws))), expected, rtol=0.1)
    assert float(split_rhat(draws).max()) < 1.01


def test_chains_stuck_apart_have_large_rhat():
    offsets = jnp.array([0.0, 0.0, 3.0, 3.0])[:, None, None]  # two modes, never crossed
    draws = ar1_draws(jax.random.key(2), 0.5, (4, 500, 10), offsets)
    # Between-chain variance 2.25 against within 1: R-hat = sqrt(1 + ~(4/3) 2.25) ~ 2.
    assert float(split_rhat(draws).min()) > 1.5


def test_split_rhat_catches_a_trend_that_plain_rhat_misses():
    # Every chain drifts the same way: equal chain means, so plain R-hat is ~1,
    # but the first and second halves disagree.
    trend = jnp.linspace(-2.0, 2.0, 400)[None, :, None]
    draws = jax.random.normal(jax.random.key(3), (4, 400, 10)) + trend
    import blackjax.diagnostics

    plain = blackjax.diagnostics.potential_scale_reduction(draws, chain_axis=0, sample_axis=1)
    assert float(plain.max()) < 1.02
    assert float(split_rhat(draws).min()) > 1.3


def test_split_chains_halves_and_drops_the_middle_draw():
    draws = jnp.arange(2 * 5).reshape(2, 5)  # chains [0..4], [5..9]
    np.testing.assert_array_equal(diagnostics.split_chains(draws), [[0, 1], [5, 6], [3, 4], [8, 9]])


def test_batched_statistics_equal_per_parameter_ones():
    draws = ar1_draws(jax.random.key(4), 0.3, (4, 200, 3, 5))
    rhat, ess = split_rhat(draws), effective_sample_size(draws)
    chex.assert_shape((rhat, ess), ((3, 5), (3, 5)))
    np.testing.assert_allclose(rhat[1, 2], split_rhat(draws[:, :, 1, 2]), rtol=1e-6)
    np.testing.assert_allclose(ess[2, 4], effective_sample_size(draws[:, :, 2, 4]), rtol=1e-5)


def test_convergence_summary_counts_and_excludes_undefined_parameters():
    draws = jax.random.normal(jax.random.key(5), (4, 101, 6))
    draws = draws.at[:, :, 5].add(jnp.array([0.0, 0.0, 5.0, 5.0])[:, None])  # one stuck parameter
    draws = draws.at[0, 60, 4].set(jnp.nan)  # one diverged draw
    s = diagnostics.convergence_summary(*convergence_statistics(draws, 1))
    assert s["num_params"] == 6 and s["num_undefined"] == 1
    assert s["frac_rhat_below"] == pytest.approx(4 / 6)
    assert s["rhat_max"] > 2 and s["rhat_median"] < 1.05
    assert 0 < s["ess_min"] < s["ess_median"]


def test_mala_chains_from_overdispersed_starts_converge_and_ula_at_a_tiny_step_does_not():
    # 8 "images", each its own Gaussian target (shifted means); 4 chains per image.
    shift = jnp.linspace(-1.0, 1.0, 8)[:, None] * jnp.ones((1, 3))
    mean, variance = MU[None, :] + shift, jnp.broadcast_to(SCALE**2, (8, 3))
    starts = diagnostics.overdispersed_starts(jax.random.key(6), mean, variance, 4)
    chex.assert_shape(starts, (4, 8, 3))
    assert bool((jnp.std(starts - mean[None], axis=(0, 1)) / SCALE > 2).all())  # wider than the target
    shift_rows = jnp.tile(shift, (4, 1))

    def summary(name, step_size, num_steps):
        sampler = samplers.build(name, gaussian_log_prob, precondition=False)
        run = jax.jit(lambda k: diagnostics.chain_draws(k, sampler, starts, langevin.hparams(step_size), shift_rows,
                                                        num_steps=num_steps))
        draws = run(jax.random.key(7))
        chex.assert_shape(draws, (4, num_steps, 8, 3))
        return diagnostics.convergence_summary(*convergence_statistics(draws, num_steps // 2))

    mixed = summary("mala", 0.5, 2000)
    assert mixed["rhat_max"] < 1.05 and mixed["rhat_median"] < 1.01, mixed
    assert mixed["ess_min"] > 100
    stuck = summary("ula", 1e-4, 200)  # barely moves from its overdispersed start
    assert stuck["rhat_median"] > 1.5 and stuck["frac_rhat_below"] == 0.0, stuck


def test_chain_curves_vmap_over_step_sizes_equals_separate_runs():
    sampler = samplers.build("ula", gaussian_log_prob, precondition=False)
    z0 = 3.0 * jax.random.normal(jax.random.key(8), (16, 3))
    shift = jnp.zeros((16, 3))
    hp = langevin.stack_hparams([0.01, 0.1], decays=0.9)
    curves = diagnostics.chain_curves(jax.random.key(9), sampler, z0, hp, shift, num_steps=30)
    chex.assert_shape(list(curves[:4]), [(2, 30)] * 4)
    assert curves.acceptance_mean is None
    np.testing.assert_array_equal(curves.delta_log_p_mean[:, 0], 0.0)  # t = 0 is z_0 itself
    single = diagnostics.chain_curves(jax.random.key(9), sampler, z0, langevin.hparams(0.1, 0.9), shift,
                                      num_steps=30)
    chex.assert_trees_all_close(jax.tree.map(lambda a: a[1], curves), single, rtol=1e-5, atol=1e-4)
    # From an overdispersed start the chain climbs: log p rises, the drift shrinks.
    assert float(curves.delta_log_p_mean[1, -1]) > 5.0
    assert float(curves.drift_norm_mean[1, -1]) < 0.5 * float(curves.drift_norm_mean[1, 0])


def test_chain_curves_report_mala_acceptance():
    sampler = samplers.build("mala", gaussian_log_prob, precondition=False)
    curves = diagnostics.chain_curves(jax.random.key(10), sampler, jnp.zeros((8, 3)), langevin.hparams(0.1),
                                      jnp.zeros((8, 3)), num_steps=5)
    chex.assert_shape(curves.acceptance_mean, (5,))
    assert bool(((curves.acceptance_mean >= 0) & (curves.acceptance_mean <= 1)).all())


def test_trajectories_start_at_z0():
    sampler = samplers.build("underdamped", gaussian_log_prob)
    z0 = jax.random.normal(jax.random.key(11), (2, 3))
    zs = diagnostics.trajectories(jax.random.key(12), sampler, z0, langevin.hparams(0.1), jnp.zeros((2, 3)),
                                  num_steps=7)
    chex.assert_shape(zs, (8, 2, 3))
    np.testing.assert_array_equal(zs[0], z0)


def test_pca_recovers_a_plane_and_skips_diverged_rows():
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.normal(size=(6, 2)))[0]  # an orthonormal plane in 6-D
    coords = rng.normal(size=(200, 2)) * [3.0, 1.0]
    points = coords @ basis.T + 5.0
    projected, explained = diagnostics.pca_project(np.vstack([points, np.full((1, 6), np.nan)]))
    np.testing.assert_allclose(explained.sum(), 1.0, rtol=1e-10)
    assert explained[0] > explained[1]
    # Distances within the plane are preserved by the projection.
    d = lambda a: np.linalg.norm(a[:, None] - a[None], axis=-1)
    np.testing.assert_allclose(d(projected[:200]), d(coords), atol=1e-8)
    assert np.isnan(projected[200]).all()


def test_diagnostic_figures_are_written(tmp_path):
    t = np.arange(20.0)
    curves = {"a": {"p": (t, np.ones(20)), "q": (np.exp(-t / 5), 0.1 * np.ones(20))},
              "b": {"p": (np.where(t > 10, np.nan, t**3), t), "q": (np.ones(20), np.ones(20))}}
    paths = {"a": [np.cumsum(np.ones((21, 2)), 0)] * 3, "b": [np.zeros((21, 2))] * 3}
    rhats = {"a": np.linspace(1.0, 1.3, 50), "b": np.array([1.0, np.nan, 40.0])}
    out = [plotting.plot_chain_curves(curves, str(tmp_path / "c.png"), "t", dashed=("b",), log_panels=("q",)),
           plotting.plot_pca_trajectories(paths, str(tmp_path / "p.png"), ["x", "y", "z"]),
           plotting.plot_rhat_histogram(rhats, str(tmp_path / "r.png"))]
    for path in out:
        assert os.path.getsize(path) > 1000
