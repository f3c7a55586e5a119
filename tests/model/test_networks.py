"""Table 2 networks, likelihoods and the log joint."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from lpc_jax.model import convolutions, likelihoods, networks


@pytest.mark.parametrize("shape", [(28, 28, 1), (32, 32, 3), (64, 64, 3)])
def test_network_shapes(shape):
    decoder, encoder = networks.Decoder(shape), networks.Encoder(shape)
    z, x = jnp.zeros((2, 40)), jnp.zeros((2, *shape))
    dec_vars = decoder.init(jax.random.key(0), z)
    mean, log_scale = decoder.apply(dec_vars, z)
    chex.assert_shape(mean, (2, *shape))
    chex.assert_shape(log_scale, (1, 1, 1, shape[-1]))
    mu, var = encoder.apply(encoder.init(jax.random.key(1), x), x)
    chex.assert_shape([mu, var], (2, 40))
    assert bool(jnp.all(var > 0))
    log_joint = networks.make_log_joint(decoder)
    chex.assert_shape(log_joint(dec_vars["params"], x, z), (2,))


def test_unsupported_shape_raises():
    with pytest.raises(ValueError, match="unsupported image shape"):
        networks.Decoder((30, 30, 1)).init(jax.random.key(0), jnp.zeros((1, 40)))


def test_softplus_beta_matches_pytorch_definition():
    x = jnp.linspace(-20, 20, 41)
    np.testing.assert_allclose(networks.softplus_beta(x, 0.3), np.log1p(np.exp(0.3 * np.asarray(x))) / 0.3, rtol=1e-5)


def test_log_joint_is_per_example():
    decoder = networks.Decoder((28, 28, 1))
    params = decoder.init(jax.random.key(0), jnp.zeros((1, 40)))["params"]
    log_joint = networks.make_log_joint(decoder)
    x = jnp.round(jax.random.uniform(jax.random.key(1), (4, 28, 28, 1), minval=-1, maxval=1) * 127.5) / 127.5
    z = jax.random.normal(jax.random.key(2), (4, 40))
    batched = log_joint(params, x, z)
    single = jnp.concatenate([log_joint(params, x[i : i + 1], z[i : i + 1]) for i in range(4)])
    np.testing.assert_allclose(batched, single, rtol=1e-5)


PIXELS = jnp.arange(256, dtype=jnp.float32) * (2 / 255) - 1


@pytest.mark.parametrize("mean,scale", [(0.0, 0.1), (0.9, 0.01), (-1.0, 0.5), (3.0, 0.05), (-0.3, 1e-3), (0.0, 5.0)])
def test_discretized_gaussian_is_a_distribution_over_256_values(mean, scale):
    x = PIXELS.reshape(256, 1, 1, 1)
    log_p = likelihoods.discretized_gaussian_log_prob(x, jnp.full_like(x, mean), jnp.log(jnp.full((1, 1, 1, 1), scale)))
    chex.assert_shape(log_p, (256,))
    assert bool(jnp.all(jnp.isfinite(log_p)))
    np.testing.assert_allclose(np.exp(np.asarray(log_p, np.float64)).sum(), 1.0, atol=2e-4)


def test_discretized_gaussian_matches_scipy_and_is_stable_at_edges():
    mean, scale = 0.2, 0.3
    x = PIXELS.reshape(256, 1, 1, 1)
    got = likelihoods.discretized_gaussian_log_prob(x, jnp.full_like(x, mean), jnp.log(jnp.full((1, 1, 1, 1), scale)))
    xs = np.asarray(PIXELS, np.float64)
    upper = np.where(xs > 1 - 1e-3, np.inf, xs + 1 / 255)
    lower = np.where(xs < -1 + 1e-3, -np.inf, xs - 1 / 255)
    want = np.log(stats.norm.cdf(upper, mean, scale) - stats.norm.cdf(lower, mean, scale))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # Far from the mean (30+ sigma) a naive log(cdf - cdf) is -inf; log-space stays finite,
    # matching the Gaussian tail asymptotics, and so do its gradients.
    far = lambda m: likelihoods.discretized_gaussian_log_prob(
        jnp.full((1, 1, 1, 1), 0.5), jnp.full((1, 1, 1, 1), m), jnp.log(jnp.full((1, 1, 1, 1), 0.01)))[0]
    assert np.isfinite(float(far(-0.5))) and float(far(-0.5)) < -4000
    assert np.isfinite(float(jax.grad(far)(-0.5)))
    edge = lambda m: likelihoods.discretized_gaussian_log_prob(
        jnp.full((1, 1, 1, 1), 1.0), jnp.full((1, 1, 1, 1), m), jnp.log(jnp.full((1, 1, 1, 1), 0.01)))[0]
    np.testing.assert_allclose(float(edge(2.0)), 0.0, atol=1e-6)  # right edge bin takes the tail
    assert np.isfinite(float(jax.grad(edge)(-1.0)))


def test_gaussian_prior_and_bernoulli():
    z = jnp.array([[0.0, 1.0], [2.0, -1.0]])
    np.testing.assert_allclose(likelihoods.normal_prior_log_prob(z, 2.0),
                               stats.norm.logpdf(np.asarray(z), 0, 2).sum(-1), rtol=1e-6)
    x = jnp.array([[1.0, -1.0]])
    logits = jnp.array([[0.5, 0.5]])
    want = np.log(1 / (1 + np.exp(-0.5))) + np.log(1 - 1 / (1 + np.exp(-0.5)))
    np.testing.assert_allclose(likelihoods.bernoulli_log_prob(x, logits), [want], rtol=1e-6)
    with pytest.raises(ValueError, match="unknown likelihood"):
        networks.make_log_joint(networks.Decoder((28, 28, 1)), "poisson")


def test_sample_prior_key_schedule_range_and_batching():
    decoder = networks.Decoder((28, 28, 1))
    params = decoder.init(jax.random.key(0), jnp.zeros((1, 40)))["params"]
    key = jax.random.key(3)
    imgs = networks.sample_prior(decoder, params, key, 25, latent_dim=40, prior_scale=0.5, batch_size=10)
    assert imgs.shape == (25, 28, 28, 1) and imgs.dtype == np.float32
    assert np.all(imgs >= -1) and np.all(imgs <= 1)
    # Batch i decodes prior_scale * normal(fold_in(key, i), (batch_size, latent_dim)); the surplus is dropped.
    z2 = 0.5 * jax.random.normal(jax.random.fold_in(key, 2), (10, 40))
    np.testing.assert_array_equal(imgs[20:], np.asarray(networks.decode_mean(decoder, params, z2))[:5])
    np.testing.assert_array_equal(
        networks.sample_prior(decoder, params, key, 10, latent_dim=40, prior_scale=0.5, batch_size=10), imgs[:10])
    logits, _ = decoder.apply({"params": params}, jax.random.normal(jax.random.fold_in(key, 0), (4, 40)))
    bern = networks.sample_prior(decoder, params, key, 4, latent_dim=40, likelihood="bernoulli")
    np.testing.assert_allclose(bern, 2 * jax.nn.sigmoid(np.asarray(logits)) - 1, atol=1e-6)
    assert networks.sample_prior(decoder, params, key, 0, latent_dim=40).shape == (0, 28, 28, 1)
    with pytest.raises(ValueError, match="num_samples >= 0 and batch_size >= 1"):
        networks.sample_prior(decoder, params, key, 4, latent_dim=40, batch_size=0)


@pytest.mark.parametrize("shape", [(28, 28, 1)])  # every layer kind; 64x64's in test_layers, per layer
def test_conv_impls_share_parameters_outputs_and_gradients(shape):
    """The CPU-tuned layers, XLA's own and "auto" (tuned here, on the CPU): the same
    parameter tree from the same key (a checkpoint moves between them), and the same
    log joint, encoder outputs and gradients to float32 rounding."""
    x = jnp.round(jax.random.uniform(jax.random.key(1), (2, *shape), minval=-1, maxval=1) * 127.5) / 127.5
    z = jax.random.normal(jax.random.key(2), (2, 40))
    cot = jax.random.normal(jax.random.key(3), (2, 40))
    results = {}
    for impl in convolutions.CONV_IMPLS:
        decoder, encoder = networks.Decoder(shape, conv_impl=impl), networks.Encoder(shape, conv_impl=impl)
        theta = decoder.init(jax.random.key(0), z)["params"]
        phi = encoder.init(jax.random.key(0), x)["params"]
        log_joint = networks.make_log_joint(decoder)

        @jax.jit
        def run(theta, phi):
            value, grads = jax.value_and_grad(lambda t, z: log_joint(t, x, z).sum(), argnums=(0, 1))(theta, z)
            enc, vjp = jax.vjp(lambda p, x: encoder.apply({"params": p}, x)[0], phi, x)
            return value, grads, enc, vjp(cot)

        with jax.default_matmul_precision("highest"):
            results[impl] = (theta, phi), run(theta, phi)
    (params, out), (params_xla, out_xla), (params_auto, out_auto) = (results[i] for i in ("tuned", "xla", "auto"))
    chex.assert_trees_all_equal(params, params_xla, params_auto)
    chex.assert_trees_all_equal(out, out_auto)  # auto is the tuned layers on the CPU
    chex.assert_trees_all_close(out, out_xla, rtol=2e-5, atol=2e-5 * float(jnp.abs(out[0])))
    for got, want in zip(jax.tree.leaves(out_xla[1:]), jax.tree.leaves(out[1:])):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * float(np.abs(want).max()))


def test_xla_convolutions_allow_forward_mode_autodiff():
    decoder = networks.Decoder((28, 28, 1), conv_impl="xla")
    z = jnp.ones((1, 40))
    theta = decoder.init(jax.random.key(0), z)["params"]
    mean, tangent = jax.jvp(lambda z: decoder.apply({"params": theta}, z)[0], (z,), (z,))
    chex.assert_shape([mean, tangent], (1, 28, 28, 1))
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(lambda z: networks.Decoder((28, 28, 1), conv_impl="tuned").apply({"params": theta}, z)[0], (z,), (z,))


def test_unknown_conv_impl_raises():
    with pytest.raises(ValueError, match=r"conv_impl='cudnn' is invalid: choose one of \['auto', 'tuned', 'xla'\]"):
        networks.Decoder((28, 28, 1), conv_impl="cudnn").init(jax.random.key(0), jnp.zeros((1, 40)))
    with pytest.raises(ValueError, match="conv_impl='cudnn' is invalid"):
        networks.Encoder((28, 28, 1), conv_impl="cudnn").init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
