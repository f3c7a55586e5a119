"""lpc_jax.evaluation.chains: chain diagnostics of a trained model, and the usable step size."""

import jax
import numpy as np
import optax
import pytest

from lpc_jax.evaluation import chains
from lpc_jax.model.state import create_train_state
from lpc_jax.sampling import diagnostics
from tests import tiny_model as tiny


def _curves(log_p_final: float, acceptance: float | None = None) -> diagnostics.ChainCurves:
    delta = np.array([0.0, 1.0, log_p_final])
    return diagnostics.ChainCurves(delta, np.zeros(3), np.ones(3), np.zeros(3),
                                   None if acceptance is None else np.full(3, acceptance))


def _all(settings: dict[float, diagnostics.ChainCurves]) -> dict:
    return {chains.label(name, s): c for name in chains.PRECONDITIONING for s, c in settings.items()}


def test_the_runs_step_size_when_usable_else_the_largest_usable_else_the_smallest():
    sizes = [0.001, 0.01, 0.1, 1.0]
    finite = _all({s: _curves(2.0) for s in sizes})
    assert chains.usable_step_sizes(finite, sizes, 0.01) == {name: 0.01 for name in chains.PRECONDITIONING}
    diverged = _all({0.001: _curves(2.0), 0.01: _curves(np.nan), 0.1: _curves(3.0), 1.0: _curves(np.inf)})
    assert chains.usable_step_sizes(diverged, sizes, 0.01) == {name: 0.1 for name in chains.PRECONDITIONING}
    none = _all({s: _curves(np.nan) for s in sizes})
    assert chains.usable_step_sizes(none, sizes, 0.1) == {name: 0.001 for name in chains.PRECONDITIONING}


def test_a_mala_chain_that_barely_accepts_is_not_usable():
    assert chains.usable(_curves(1.0, acceptance=chains.MIN_ACCEPTANCE))
    assert not chains.usable(_curves(1.0, acceptance=0.5 * chains.MIN_ACCEPTANCE))
    assert chains.diverged_at(_curves(np.nan)) == 2 and chains.diverged_at(_curves(1.0)) is None


@pytest.mark.parametrize("warm_start", ["reverse_kl", "none"])
def test_diagnostics_of_a_tiny_model_cover_every_setting_and_step_size(warm_start):
    model = tiny.tiny_model(optax.adam(1e-3))
    state = create_train_state(jax.random.key(0), model, tiny.SHAPE, tiny.LATENT)
    setup = chains.ChainSetup(model, state, "ula", 1.0, 0.9, 1e-8, warm_start, 1.0)
    x = jax.random.uniform(jax.random.key(1), (3, *tiny.SHAPE), minval=-1, maxval=1)
    z0, start = chains.chain_starts(setup, x, jax.random.key(2))
    assert z0.shape == (3, tiny.LATENT) and start == ("prior" if warm_start == "none" else "encoder")
    sizes = [0.001, 0.01]
    curves = chains.curves_by_step_size(setup, x, z0, sizes, num_steps=6, rng_key=jax.random.key(3))
    assert sorted(curves) == sorted(chains.label(n, s) for n in chains.PRECONDITIONING for s in sizes)
    assert all(c.delta_log_p_mean.shape == (6,) and c.delta_log_p_mean[0] == 0.0 for c in curves.values())
    chosen = chains.usable_step_sizes(curves, sizes, 0.01)
    paths, explained = chains.trajectories_by_setting(setup, x, z0, chosen, num_steps=6, rng_key=jax.random.key(4))
    assert all(len(p) == 3 and p[0].shape[1] == 2 for p in paths.values())
    assert all(0.0 <= f <= 1.0 + 1e-6 for fracs in explained.values() for f in fracs)
    summaries, rhats = chains.convergence_by_setting(setup, x, chosen, num_steps=8, num_chains=2, overdispersion=3.0,
                                                     warmup=4, start_key=jax.random.key(5), rng_key=jax.random.key(6))
    assert set(summaries) == set(rhats) and all(r.shape == (3, tiny.LATENT) for r in rhats.values())
    assert all(s["draws_per_chain"] == 4 for s in summaries.values())
    summary = chains.curve_summary(curves)
    assert all(v["diverged_at_step"] is None for v in summary.values())
