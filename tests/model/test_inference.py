"""Tests of lpc_jax.model.inference on probabilistic PCA, where every posterior is Gaussian and known.

The "image" is 2 x 3 x 1 (D = 6 pixels), the latent d = 2, the decoder
x | z ~ N(W z + b, sigma^2 I) (likelihood "gaussian"), the prior N(0, I).
Hiding the second row leaves x_v (3 pixels): p(z | x_v) = N(mu, S) with
S = (I + W_v^T W_v / sigma^2)^-1, mu = S W_v^T (x_v - b_v) / sigma^2, so the decoded
hidden pixels W_h z + b_h of exact posterior samples have mean W_h mu + b_h and
covariance W_h S W_h^T.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lpc_jax.model import inference, networks
from lpc_jax.model.state import Model

SHAPE, LATENT, SIGMA = (2, 3, 1), 2, 0.2
W = np.array([[1.0, 0.3], [0.5, -0.8], [-0.4, 0.9], [0.8, 0.6], [-0.7, 0.2], [0.1, -1.0]], np.float32) * 0.3
B_VEC = np.array([0.1, -0.2, 0.05, 0.0, 0.2, -0.1], np.float32)


class LinearDecoder(nn.Module):
    @nn.compact
    def __call__(self, z):
        w = self.param("w", lambda *_: jnp.asarray(W), W.shape)
        b = self.param("b", lambda *_: jnp.asarray(B_VEC), B_VEC.shape)
        mean = (z @ w.T + b[None]).reshape(z.shape[0], *SHAPE)
        return mean, jnp.full((1, 1, 1, 1), math.log(SIGMA), jnp.float32)


class ZeroEncoder(nn.Module):  # a deliberately poor warm start: the chain must do the work
    @nn.compact
    def __call__(self, x):
        return jnp.zeros((x.shape[0], LATENT)), jnp.ones((x.shape[0], LATENT))


@pytest.fixture(scope="module")
def ppca():
    decoder = LinearDecoder()
    model = Model(decoder, ZeroEncoder(), networks.make_log_joint(decoder, "gaussian"), optax.sgd(0.0),
                  likelihood="gaussian")
    params = {"decoder": {"w": jnp.asarray(W), "b": jnp.asarray(B_VEC)}, "encoder": {}}
    return model, params


def test_inpainting_samples_have_the_exact_conditional_mean_and_variance(ppca):
    model, params = ppca
    x = jnp.asarray([[0.3, -0.1, 0.2, 0.0, 0.0, 0.0], [-0.2, 0.1, -0.3, 0.0, 0.0, 0.0]]).reshape(2, *SHAPE)
    visible = jnp.asarray([[1, 1, 1], [0, 0, 0]])
    out = jax.jit(lambda k: inference.inpaint(k, params, model, x, visible, num_samples=4000, num_steps=200,
                                              step_size=0.1))(jax.random.key(0))
    assert out.samples.shape == (4000, 2, *SHAPE) and out.log_p_trace.shape == (200, 4000, 2)
    assert 0.4 < float(out.acceptance[-10:].mean()) < 1.0
    w_v, w_h, b_v, b_h = W[:3], W[3:], B_VEC[:3], B_VEC[3:]
    s = np.linalg.inv(np.eye(LATENT) + w_v.T @ w_v / SIGMA**2)
    hidden = np.asarray(out.samples).reshape(4000, 2, 6)[..., 3:]  # (S, B, 3)
    for i in range(2):
        mu = s @ w_v.T @ (np.asarray(x[i]).ravel()[:3] - b_v) / SIGMA**2
        exact_mean, exact_var = w_h @ mu + b_h, np.diag(w_h @ s @ w_h.T)
        se_mean = np.sqrt(exact_var / 4000)
        np.testing.assert_array_less(np.abs(hidden[:, i].mean(0) - exact_mean), 4 * se_mean)
        # the sample variance's standard error is ~ var sqrt(2 / S) = 2.2 % of it
        np.testing.assert_allclose(hidden[:, i].var(0), exact_var, rtol=0.1)
    # the visible pixels' reconstruction: also from the posterior, so close to x_v (sigma = 0.2)
    assert float(jnp.mean(jnp.abs(out.samples[:, :, 0] - x[None, :, 0]))) < 0.3


def test_masked_log_joint_is_the_visible_pixels_likelihood(ppca):
    model, params = ppca
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, *SHAPE)), jnp.float32)
    z = jnp.asarray(np.random.default_rng(1).normal(size=(3, LATENT)), jnp.float32)
    everything = inference.masked_log_joint(model, x, jnp.ones(SHAPE[:2]))(params["decoder"], z)
    np.testing.assert_allclose(everything, model.log_joint(params["decoder"], x, z), rtol=1e-5)
    visible = jnp.asarray([[1, 0, 1], [0, 0, 1]])
    mean = (np.asarray(z) @ W.T + B_VEC).reshape(3, *SHAPE)
    keep = np.asarray(visible, bool)
    r = (np.asarray(x) - mean)[:, keep, 0] / SIGMA
    expected = (np.sum(-0.5 * r * r - math.log(SIGMA) - 0.5 * math.log(2 * math.pi), axis=1)
                - 0.5 * np.sum(np.asarray(z) ** 2 + math.log(2 * math.pi), axis=1))
    got = inference.masked_log_joint(model, x, visible)(params["decoder"], z)
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_reconstruct_and_denoise_shapes_and_errors(ppca):
    model, params = ppca
    x = jnp.zeros((2, *SHAPE))
    rec = inference.reconstruct(jax.random.key(0), params, model, x, num_steps=5, step_size=0.01, num_samples=3)
    assert rec.start.shape == (2, *SHAPE) and rec.samples.shape == (3, 2, *SHAPE) and rec.z.shape == (3, 2, LATENT)
    den = inference.denoise(jax.random.key(0), params, model, x, 0.3, num_samples=2, num_steps=5, step_size=0.01,
                            sampler="ula")
    assert den.log_p_trace.shape == (5, 2, 2) and den.acceptance is None
    with pytest.raises(ValueError, match="noise_sigma"):
        inference.noisy_log_joint(model, x, -1.0)
    with pytest.raises(ValueError, match="num_steps"):
        inference.reconstruct(jax.random.key(0), params, model, x, num_steps=0, step_size=0.01)
