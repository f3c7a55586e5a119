"""The jitted LPC step against a plain Python loop of Algorithm 1 (typos fixed)."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lpc_jax.model import objectives, steps
from lpc_jax.model.state import create_train_state
from lpc_jax.sampling import langevin
from lpc_jax.training import build
from lpc_jax.training.config import Config
from tests import tiny_model as tiny_nets

SHAPE = (28, 28, 1)
BATCH = 3
T = 4


LATENT, TINY_SHAPE = tiny_nets.LATENT, tiny_nets.SHAPE


def sgd_model(lr=1.0, tiny=True):
    # SGD with lr 1 makes "old params - new params" the raw gradient.
    if not tiny:
        return build.build_model(Config(dataset="fashion_mnist"))._replace(optimizer=optax.sgd(lr))
    return tiny_nets.tiny_model(optax.sgd(lr))


def images(shape, key=1):
    x = jax.random.uniform(jax.random.key(key), (BATCH, *shape), minval=-1, maxval=1)
    return jnp.round((x + 1) * 127.5) / 127.5 - 1  # on the 8-bit grid


@pytest.fixture(scope="module")
def setup():
    model = sgd_model()
    state = create_train_state(jax.random.key(0), model, TINY_SHAPE, LATENT)
    return model, state, images(TINY_SHAPE)


@pytest.fixture(scope="module")
def paper_setup():
    model = sgd_model(tiny=False)
    state = create_train_state(jax.random.key(0), model, SHAPE, 40)
    return model, state, images(SHAPE)


def reference_algorithm_1(model, params, x, rng_key, hp, *, step, warm_start, precondition,
                          prior_init_batches, num_steps=T, theta_grad_every=1, phase=0):
    """Algorithm 1 as a Python loop: returns (g_theta, g_phi, chain samples z_1..z_T).

    With ``theta_grad_every`` k > 1, g_theta sums k/T times the gradient at the steps
    t = phase + 1, phase + 1 + k, ... only.
    """
    theta, phi = params["decoder"], params["encoder"]
    w = objectives.weights(warm_start)
    k_q, k_prior, k_elbo, k_chain = jax.random.split(rng_key, 4)
    chain_keys = jax.random.split(k_chain, num_steps)
    mean, var = model.encoder.apply({"params": phi}, x)
    use_prior = warm_start == "none" or step < prior_init_batches
    z = (jax.random.normal(k_prior, mean.shape) if use_prior
         else mean + jnp.sqrt(var) * jax.random.normal(k_q, mean.shape))
    mean_log_joint = lambda p, z: model.log_joint(p, x, z).mean()
    g_theta = jax.tree.map(jnp.zeros_like, theta)
    m = jnp.zeros_like(z)
    zs = []
    for t in range(1, num_steps + 1):
        if (t - 1 - phase) % theta_grad_every == 0:
            g_theta = jax.tree.map(lambda a, b: a + b * theta_grad_every / num_steps, g_theta,
                                   jax.grad(mean_log_joint)(theta, z))
        g = jax.grad(lambda z: model.log_joint(theta, x, z).sum())(z)
        if precondition:
            m = hp.decay * m + (1 - hp.decay) * g * g
            G = 1.0 / (jnp.sqrt(m / (1 - hp.decay**t)) + hp.eps)
        else:
            G = jnp.ones_like(g)
        z = z + hp.step_size * G * g + jnp.sqrt(2 * hp.step_size * G) * jax.random.normal(chain_keys[t - 1], g.shape)
        zs.append(z)
    zs = jnp.stack(zs)

    def forward_loss(phi):
        mean, var = model.encoder.apply({"params": phi}, x)
        return -jnp.mean(jax.vmap(lambda z: objectives.gaussian_log_prob(z, mean, var))(zs))

    def reverse_loss(phi):
        mean, var = model.encoder.apply({"params": phi}, x)
        return -objectives.reparameterized_elbo(k_elbo, mean, var, lambda z: model.log_joint(theta, x, z)).mean()

    def encoder_loss(phi):
        return w.forward_kl * forward_loss(phi) + w.reverse_kl * reverse_loss(phi)

    return g_theta, jax.grad(encoder_loss)(phi), (forward_loss, reverse_loss, encoder_loss)


def jitted_grads(model, state, x, rng_key, hp, **kw):
    step = jax.jit(functools.partial(steps.lpc_train_step, model=model, num_steps=T, **kw))
    new_state, metrics = step(state, x, rng_key, hp)
    grads = jax.tree.map(lambda a, b: a - b, state.params, new_state.params)
    return grads, new_state, metrics


@pytest.mark.parametrize("warm_start,precondition,step,prior_init,networks", [
    ("jeffreys", True, 0, 50, "tiny"),  # prior initialisation during the first batches
    ("jeffreys", True, 60, 50, "tiny"),  # encoder warm start afterwards
    ("forward_kl", False, 0, 0, "tiny"),
    ("reverse_kl", True, 0, 0, "tiny"),
    ("none", False, 0, 0, "tiny"),
    pytest.param("jeffreys", True, 60, 50, "paper", marks=pytest.mark.slow),  # Table 2 networks, 28x28x1 (-m slow)
])
def test_accumulated_gradients_equal_python_loop(setup, paper_setup, warm_start, precondition, step, prior_init,
                                                 networks):
    model, state, x = setup if networks == "tiny" else paper_setup
    state = state.replace(step=jnp.asarray(step, jnp.int32))
    hp = langevin.hparams(0.01, decay=0.9, eps=1e-3)
    key = jax.random.key(7)
    grads, new_state, metrics = jitted_grads(model, state, x, key, hp, warm_start=warm_start,
                                             precondition=precondition, prior_init_batches=prior_init)
    g_theta, g_phi, _ = reference_algorithm_1(model, state.params, x, key, hp, step=step, warm_start=warm_start,
                                              precondition=precondition, prior_init_batches=prior_init)
    # The step descends on -log p: its decoder gradient is minus the ascent direction.
    chex.assert_trees_all_close(grads["decoder"], jax.tree.map(jnp.negative, g_theta), rtol=2e-4, atol=1e-4)
    chex.assert_trees_all_close(grads["encoder"], g_phi, rtol=2e-4, atol=1e-4)
    assert int(new_state.step) == step + 1
    chex.assert_tree_all_finite(metrics)
    for value in metrics.values():
        chex.assert_shape(value, ())


@pytest.mark.parametrize("theta_grad_every,phase,networks", [
    (2, 0, "tiny"), (3, 2, "tiny"), (5, 1, "tiny"),  # T = 4: 5 > T selects one step
    pytest.param(2, 1, "paper", marks=pytest.mark.slow),
])
def test_subsampled_decoder_gradient_equals_python_loop(setup, paper_setup, theta_grad_every, phase, networks):
    model, state, x = setup if networks == "tiny" else paper_setup
    state = state.replace(step=jnp.asarray(60, jnp.int32))
    hp = langevin.hparams(0.01, decay=0.9, eps=1e-3)
    key = jax.random.key(7)
    kw = dict(warm_start="jeffreys", precondition=True, prior_init_batches=50)
    grads, _, _ = jitted_grads(model, state, x, key, hp, theta_grad_every=theta_grad_every,
                               theta_grad_phase=phase, **kw)
    g_theta, g_phi, _ = reference_algorithm_1(model, state.params, x, key, hp, step=60,
                                              theta_grad_every=theta_grad_every, phase=phase, **kw)
    chex.assert_trees_all_close(grads["decoder"], jax.tree.map(jnp.negative, g_theta), rtol=2e-4, atol=1e-4)
    chex.assert_trees_all_close(grads["encoder"], g_phi, rtol=2e-4, atol=1e-4)


# The step's ``metric`` choice -> the kernel's (precondition, metric) given the encoder's variance.
CHAIN_METRICS = {
    "auto": lambda variance: dict(precondition=True),  # precondition=True: the published form
    "adam_paper": lambda variance: dict(precondition="adam_paper"),
    "adam": lambda variance: dict(precondition="adam"),
    "encoder": lambda variance: dict(precondition=False, metric=variance),
    "none": lambda variance: dict(precondition=False),
}


@pytest.mark.parametrize("metric", list(CHAIN_METRICS))
def test_chain_is_the_langevin_kernel(setup, metric):
    # The step's chain, rebuilt from the sampler's own kernel and sample_chain with the
    # step's keys, gives the same per-step log densities, drifts and samples.
    model, state, x = setup
    hp = langevin.hparams(0.05, decay=0.9, eps=1e-3)
    key = jax.random.key(5)
    _, metrics = jax.jit(functools.partial(
        steps.lpc_train_step, model=model, num_steps=T, warm_start="forward_kl", precondition=True,
        prior_init_batches=0, metric=metric))(state, x, key, hp)

    theta = state.params["decoder"]
    k_q, _, _, k_chain = jax.random.split(key, 4)
    mean, variance = model.encoder.apply({"params": state.params["encoder"]}, x)
    z0 = objectives.sample_gaussian(k_q, mean, variance)
    kernel = langevin.build_kernel(lambda z: model.log_joint(theta, x, z), **CHAIN_METRICS[metric](variance))
    final, infos, zs = jax.jit(lambda z: langevin.sample_chain(
        k_chain, kernel, langevin.init(z), hp, T, return_trace=True))(z0)
    assert int(final.count) == T
    cross_entropy = -jax.vmap(lambda z: objectives.gaussian_log_prob(z, mean, variance))(zs).mean()
    expected = {
        "log_p_start": infos.log_prob[0].mean(),
        "log_p_chain": infos.log_prob.mean(),
        "log_p_end": model.log_joint(theta, x, final.z).mean(),
        "drift_norm_start": infos.drift_norm[0].mean(),
        "drift_norm_end": infos.drift_norm[-1].mean(),
        "forward_kl": cross_entropy,
    }
    chex.assert_trees_all_close({k: metrics[k] for k in expected}, expected, rtol=1e-5, atol=1e-5)


def test_chain_metric_choices_differ_and_the_config_binds_them(setup):
    # Each metric is its own chain (the test above would pass if the step ignored ``metric``
    # only were all chains equal), and Config.chain_metric reaches the step.
    model, state, x = setup
    hp = langevin.hparams(0.05, decay=0.9, eps=1e-3)
    ends = {}
    for metric in ("auto", "adam", "encoder", "none"):
        step = build.make_train_step(Config(chain_metric=metric, num_steps=T, prior_init_batches=0), model)
        ends[metric] = float(jax.jit(step)(state, x, jax.random.key(5), hp)[1]["log_p_end"])
    assert len(set(ends.values())) == 4, ends
    with pytest.raises(ValueError, match="metric"):
        steps.lpc_train_step(state, x, jax.random.key(5), hp, model=model, num_steps=T, metric="fisher")
    with pytest.raises(ValueError, match="nopreconditioner"):
        Config(chain_metric="adam", preconditioner=False).validate()
    Config(chain_metric="encoder", preconditioner=False).validate()  # not an Adam-style metric: allowed


@pytest.mark.parametrize("warm_start", ["forward_kl", "reverse_kl", "jeffreys"])
def test_encoder_objective_moves_phi_downhill(setup, warm_start):
    _, state, x = setup
    model = sgd_model(lr=1e-3)
    hp = langevin.hparams(0.01, decay=0.9, eps=1e-3)
    key = jax.random.key(11)
    kw = dict(warm_start=warm_start, precondition=True, prior_init_batches=0)
    _, new_state, _ = jitted_grads(model, state, x, key, hp, **kw)
    _, _, (forward_loss, reverse_loss, encoder_loss) = reference_algorithm_1(
        model, state.params, x, key, hp, step=0, **kw)
    old, new = state.params["encoder"], new_state.params["encoder"]
    assert float(encoder_loss(new)) < float(encoder_loss(old))
    if warm_start == "forward_kl":  # cross-entropy of the chain samples under q falls
        assert float(forward_loss(new)) < float(forward_loss(old))
    if warm_start == "reverse_kl":  # the reparameterised ELBO rises
        assert float(reverse_loss(new)) < float(reverse_loss(old))


def test_none_leaves_encoder_untouched(setup):
    model, state, x = setup
    grads, _, _ = jitted_grads(model, state, x, jax.random.key(3), langevin.hparams(0.01),
                               warm_start="none", precondition=True, prior_init_batches=0)
    chex.assert_trees_all_equal(grads["encoder"], jax.tree.map(jnp.zeros_like, grads["encoder"]))


def test_new_step_size_does_not_recompile(setup):
    model, state, x = setup
    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(state, x, key, hp):
        return steps.lpc_train_step(state, x, key, hp, model=model, num_steps=2)

    for step_size, decay in [(0.1, 0.99), (0.001, 0.25), (0.5, 0.0)]:
        state, _ = step(state, x, jax.random.key(0), langevin.hparams(step_size, decay))


def _temp_bytes(model, state, x, num_steps):
    step = jax.jit(functools.partial(steps.lpc_train_step, model=model, num_steps=num_steps), donate_argnums=0)
    compiled = step.lower(state, x, jax.random.key(0), langevin.hparams(0.1)).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_memory_does_not_grow_with_chain_length(paper_setup):
    model, state, x = paper_setup
    short, long = _temp_bytes(model, state, x, 5), _temp_bytes(model, state, x, 200)
    assert long <= 1.05 * short, (short, long)


def test_vae_step_improves_elbo_on_a_fixed_batch(setup):
    _, state, x = setup
    model = sgd_model()._replace(optimizer=optax.adam(1e-2))
    state = create_train_state(jax.random.key(0), model, TINY_SHAPE, LATENT)
    step = jax.jit(functools.partial(steps.vae_train_step, model=model))
    elbos = []
    for i in range(40):
        state, metrics = step(state, x, jax.random.key(i))
        elbos.append(float(metrics["elbo"]))
    assert np.mean(elbos[-5:]) > np.mean(elbos[:5]) + 5  # nats per example


def test_lr_warmdown_is_constant_then_linear_to_zero():
    config = Config(learning_rate=0.3, num_train_steps=10, lr_warmdown=0.3)
    schedule = build.learning_rate(config)
    # n = 3 decaying updates after 7 constant ones: counts 0..9 are the 10 updates.
    expected = [0.3] * 8 + [0.2, 0.1, 0.0]
    np.testing.assert_allclose([float(schedule(c)) for c in range(11)], expected, rtol=1e-6, atol=1e-7)
    assert build.learning_rate(Config(learning_rate=0.3)) == 0.3  # 0 keeps Adam's plain float lr


def test_lr_warmdown_scales_adam_updates():
    # Adam's first update is -lr * sign(g) (up to eps): with N = 1 and f = 1 the only
    # update uses the full lr; with N = 4, f = 0.5 the 4th update uses lr / 2.
    params = {"w": jnp.array([1.0, -2.0])}
    grads = {"w": jnp.array([0.5, -0.25])}
    for config, count, scale in [(Config(learning_rate=0.1, num_train_steps=1, lr_warmdown=1.0), 0, 1.0),
                                 (Config(learning_rate=0.1, num_train_steps=4, lr_warmdown=0.5), 3, 0.5)]:
        opt = optax.adam(build.learning_rate(config))
        state = opt.init(params)
        for _ in range(count):  # advance the schedule's count with zero gradients
            _, state = opt.update(jax.tree.map(jnp.zeros_like, grads), state)
        mu, nu = state[0].mu, state[0].nu
        updates, _ = opt.update(grads, state)
        b1, b2, k = 0.9, 0.999, count + 1
        m = jax.tree.map(lambda m, g: (b1 * m + (1 - b1) * g) / (1 - b1 ** k), mu, grads)
        v = jax.tree.map(lambda v, g: (b2 * v + (1 - b2) * g * g) / (1 - b2 ** k), nu, grads)
        want = jax.tree.map(lambda m, v: -0.1 * scale * m / (jnp.sqrt(v) + 1e-8), m, v)
        np.testing.assert_allclose(updates["w"], want["w"], rtol=1e-5)


def test_lr_warmdown_needs_fixed_step_count():
    from lpc_jax.training.config import ConfigError
    with pytest.raises(ConfigError, match="lr_warmdown.*num_train_steps"):
        Config(lr_warmdown=0.2).validate()
    with pytest.raises(ConfigError, match="lr_warmdown"):
        Config(lr_warmdown=1.5, num_train_steps=10).validate()
