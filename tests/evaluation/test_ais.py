"""Tests of lpc_jax.evaluation.ais against exact answers.

Probabilistic PCA, p(z) = N(0, I_d), p(x | z) = N(W z + b, sigma^2 I_D), has the
closed-form marginal log N(x; b, W W^T + sigma^2 I) and a Gaussian posterior,
so AIS, reverse AIS (BDMC) and the IWAE bound can all be judged against the truth.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import multivariate_normal

from lpc_jax.evaluation import ais, bounds

D_LATENT, D_OBS, SIGMA, NUM_POINTS = 4, 10, 0.3, 6


class PPCA:
    """A fixed PPCA model and held-out points drawn from it."""

    def __init__(self, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.w = jnp.asarray(rng.normal(size=(D_OBS, D_LATENT)), jnp.float32)
        self.b = jnp.asarray(rng.normal(size=D_OBS), jnp.float32)
        cov = self.w @ self.w.T + SIGMA**2 * jnp.eye(D_OBS)
        self.x = jnp.asarray(rng.multivariate_normal(np.asarray(self.b), np.asarray(cov), size=NUM_POINTS),
                             jnp.float32)
        self.exact = jnp.asarray(multivariate_normal.logpdf(np.asarray(self.x, np.float64), np.asarray(self.b, np.float64),
                                                          np.asarray(cov, np.float64)), jnp.float32)  # (B,) nats
        precision = jnp.eye(D_LATENT) + self.w.T @ self.w / SIGMA**2
        self.post_cov = jnp.linalg.inv(precision)
        self.post_mean = (self.x - self.b[None]) @ self.w @ self.post_cov / SIGMA**2  # (B, d)
        self.mean_field_var = jnp.broadcast_to(1.0 / jnp.diag(precision), self.post_mean.shape)

    def log_joint(self, z):
        r = (self.x - z @ self.w.T - self.b[None]) / SIGMA
        log_lik = -0.5 * jnp.sum(r * r + math.log(2 * math.pi) + 2 * math.log(SIGMA), axis=-1)
        return log_lik - 0.5 * jnp.sum(z * z + math.log(2 * math.pi), axis=-1)

    def posterior_sample(self, key):
        eps = jax.random.normal(key, self.post_mean.shape)
        return self.post_mean + eps @ jnp.linalg.cholesky(self.post_cov).T


@pytest.fixture(scope="module")
def ppca():
    return PPCA()


_RUNS = {}


def _ais(ppca, num_steps, num_chains=16, seed=0, reverse=False):
    """The AIS (or reverse AIS) result at these settings, computed once per module."""
    args = (num_steps, num_chains, seed, reverse)
    if args not in _RUNS:
        _RUNS[args] = _run_ais(ppca, *args)
    return _RUNS[args]


def _run_ais(ppca, num_steps, num_chains, seed, reverse):
    prior = (jnp.zeros((NUM_POINTS, D_LATENT)), 1.0)
    h = ais.tune_step_sizes(jax.random.key(100 + seed), ppca.log_joint, *prior, num_steps=num_steps,
                            num_chains=num_chains, initial_step_size=0.02)
    if reverse:
        z = ppca.posterior_sample(jax.random.key(200 + seed))
        return ais.reverse_ais_log_likelihood(jax.random.key(seed), ppca.log_joint, *prior, z,
                                              num_steps=num_steps, num_chains=num_chains, step_size=h)
    return ais.ais_log_likelihood(jax.random.key(seed), ppca.log_joint, *prior, num_steps=num_steps,
                                  num_chains=num_chains, step_size=h)


def test_schedules():
    lin = np.asarray(ais.schedule("linear", 4))
    np.testing.assert_allclose(lin, [0.0, 0.25, 0.5, 0.75, 1.0], atol=1e-7)
    sig = np.asarray(ais.schedule("sigmoid", 100))
    assert sig[0] == 0.0 and sig[-1] == 1.0 and np.all(np.diff(sig) > 0)
    assert np.diff(sig)[0] < np.diff(sig)[50]  # denser near the ends than in the middle
    for bad in [dict(name="cosine", num_steps=4), dict(name="linear", num_steps=0),
                dict(name="sigmoid", num_steps=4, delta=0.0)]:
        with pytest.raises(ValueError):
            ais.schedule(**bad)


def test_ais_matches_ppca_marginal_within_its_standard_error(ppca):
    result = _ais(ppca, num_steps=400)
    error = np.asarray(result.log_marginal - ppca.exact)
    stderr = np.asarray(result.stderr)
    assert np.all(stderr > 0) and np.all(stderr < 0.5)
    assert np.all(np.abs(error) <= 3.0 * stderr + 0.02), (error, stderr)
    assert result.log_weights.shape == (16, NUM_POINTS) and result.z.shape == (16, NUM_POINTS, D_LATENT)
    assert result.acceptance.shape == (400,) and 0.3 < float(result.acceptance[-100:].mean()) < 0.9


def test_ais_gap_shrinks_with_num_steps(ppca):
    gaps = [float(jnp.mean(ppca.exact - _ais(ppca, num_steps=k).log_marginal)) for k in (10, 40, 400)]
    assert gaps[0] > gaps[1] > gaps[2] and gaps[0] > 5.0 and abs(gaps[2]) < 0.15, gaps


def test_ais_beats_iwae_at_equal_samples(ppca):
    # The IWAE proposal a mean-field encoder would learn: the exact posterior mean and the
    # mean-field variances 1 / diag(precision) (under-dispersed for a correlated posterior).
    # It gets 3 K C samples: three log-joint evaluations per VJP of AIS's K steps x C chains.
    num_steps, num_chains = 400, 16
    iwae = bounds.iwae_log_likelihood(jax.random.key(7), ppca.log_joint, ppca.post_mean, ppca.mean_field_var,
                                      num_samples=3 * num_steps * num_chains)
    result = _ais(ppca, num_steps=num_steps, num_chains=num_chains)
    assert float(jnp.mean(result.log_marginal)) > float(jnp.mean(iwae)) + 0.1
    assert float(jnp.mean(iwae)) < float(jnp.mean(ppca.exact))


def test_bdmc_sandwiches_ppca_marginal_and_gap_shrinks(ppca):
    gaps = []
    for k in (10, 400):
        lower, upper = _ais(ppca, num_steps=k), _ais(ppca, num_steps=k, reverse=True)
        lo, up, ex = (float(jnp.mean(a)) for a in (lower.log_marginal, upper.log_marginal, ppca.exact))
        tol = 3.0 * float(jnp.sqrt(jnp.mean(lower.stderr**2 + upper.stderr**2) / NUM_POINTS)) + 0.02
        assert lo <= ex + tol and up >= ex - tol, (lo, ex, up)
        gaps.append(up - lo)
    assert gaps[0] > 5.0 and abs(gaps[1]) < 0.3, gaps  # the gap's Monte Carlo noise is ~0.1 nats


def test_weights_are_unbiased_for_the_marginal():
    # E[w] = p(x) exactly, at any K: with K = 3 (a poor path) the mean of w / p(x) over
    # 4096 chains is 1 within its Monte Carlo error, though E[log w] is well below log p(x).
    x = jnp.asarray([[1.5]], jnp.float32)
    log_joint = lambda z: (-0.5 * jnp.sum((x - z) ** 2, -1) / 0.25 - 0.5 * jnp.sum(z * z, -1)
                           - math.log(2 * math.pi) - math.log(0.5))
    exact = float(multivariate_normal.logpdf(1.5, 0.0, 1.25))
    result = ais.ais_log_likelihood(jax.random.key(3), log_joint, jnp.zeros((1, 1)), 1.0, num_steps=3,
                                    num_chains=4096, step_size=0.3)
    ratio = np.exp(np.asarray(result.log_weights[:, 0], np.float64) - exact)
    assert abs(ratio.mean() - 1.0) < 4.0 * ratio.std() / math.sqrt(ratio.size)
    assert float(jnp.mean(result.log_weights)) < exact - 0.05


def test_bad_inputs_raise_before_running(ppca):
    prior = (jnp.zeros((NUM_POINTS, D_LATENT)), 1.0)
    with pytest.raises(ValueError, match="num_steps >= 1"):
        ais.ais_log_likelihood(jax.random.key(0), ppca.log_joint, *prior, num_steps=0, num_chains=2)
    with pytest.raises(ValueError, match="must be > 0"):
        ais.ais_log_likelihood(jax.random.key(0), ppca.log_joint, *prior, num_steps=4, num_chains=2,
                               step_size=-0.1)
    with pytest.raises(ValueError, match="step_size of shape"):
        ais.ais_log_likelihood(jax.random.key(0), ppca.log_joint, *prior, num_steps=4, num_chains=2,
                               step_size=jnp.ones(3))
    with pytest.raises(ValueError, match="init_mean must be"):
        ais.ais_log_likelihood(jax.random.key(0), ppca.log_joint, jnp.zeros(4), 1.0, num_steps=4, num_chains=2)
    with pytest.raises(ValueError, match="posterior_z"):
        ais.reverse_ais_log_likelihood(jax.random.key(0), ppca.log_joint, *prior, jnp.zeros((2, 3)),
                                       num_steps=4, num_chains=2)
    with pytest.raises(ValueError, match="target_acceptance"):
        ais.tune_step_sizes(jax.random.key(0), ppca.log_joint, *prior, num_steps=4, num_chains=2,
                            target_acceptance=1.5)


def test_ais_per_image_on_a_model_and_the_ais_evaluator():
    import optax

    from lpc_jax.evaluation import evaluators
    from lpc_jax.model.state import create_train_state
    from tests import tiny_model as tiny

    model = tiny.tiny_model(optax.adam(1e-3))
    params = create_train_state(jax.random.key(0), model, tiny.SHAPE, tiny.LATENT).params
    images = np.random.default_rng(0).integers(0, 256, size=(5, *tiny.SHAPE), dtype=np.uint8)
    options = ais.AISOptions(num_steps=20, num_chains=4)  # as the evaluator below builds it: one compile
    seen = []
    out = ais.ais_per_image(params, model, images, jax.random.key(1), options=options, batch_size=2,
                            progress=lambda done, total: seen.append((done, total)))
    assert seen == [(0, 5), (2, 5), (4, 5), (5, 5)]  # the last batch is padded, its padding dropped
    assert out["log_marginal"].shape == out["stderr"].shape == (5,) and out["acceptance"].shape == (20,)
    assert np.all(np.isfinite(out["log_marginal"])) and np.all((out["ess"] >= 1) & (out["ess"] <= 4 + 1e-6))
    upper = ais.ais_per_image(params, model, images, jax.random.key(1), options=options, batch_size=2,
                              latents=np.zeros((5, tiny.LATENT), np.float32))
    assert upper["log_marginal"].shape == (5,) and np.all(np.isfinite(upper["log_marginal"]))
    assert ais.estimate_seconds(params, model, images, options=options, batch_size=2) > 0

    opts = evaluators.EvalOptions(ais_steps=20, ais_chains=4, ais_examples=3, ais_batch_size=2)
    assert "ais" in evaluators.default_evaluators(opts)
    assert "ais" not in evaluators.default_evaluators(evaluators.EvalOptions())
    bound = evaluators.make_evaluators(["ais"], "fashion_mnist", opts, images)
    metrics = bound["ais"](params, model, images, images, jax.random.key(2))
    assert metrics["ais_examples"] == 3 and len(metrics["ais_per_image_nats"]) == 3
    dims = int(np.prod(tiny.SHAPE))
    assert metrics["ais_bits_per_dim"] == pytest.approx(-metrics["ais_log_likelihood_nats"] / (dims * math.log(2)))
    assert metrics["ais_pilot_chains"] == 4 and opts.ais_options() == options  # the same settings, one compile
    assert opts._replace(ais_pilot_chains=2).ais_options().pilot_chains == 2
    with pytest.raises(ValueError, match="init"):
        evaluators.make_evaluators(["ais"], "fashion_mnist", opts._replace(ais_init="posterior"), images)
    with pytest.raises(ValueError, match="pilot_chains >= 1"):
        evaluators.make_evaluators(["ais"], "fashion_mnist", opts._replace(ais_pilot_chains=0), images)
