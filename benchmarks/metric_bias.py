"""Every sampler and metric option against ground truth: the figures of docs/results.md (issue 22).

    python -m benchmarks.metric_bias                 # all three tables (a few minutes on 2 CPU cores)
    python -m benchmarks.metric_bias --tables=bias   # one of them: bias, stuck, first_step

``bias``: the stationary bias of each sampler (ula, mala, underdamped) under each metric
(``none``: G = 1; ``adam_paper``: Algorithm 1's Adam-style metric as printed; ``adam``: its
EMA started at the prior moment 1; ``warmup``: the fixed diagonal metric of a 100-step
warm-up, ``lpc_jax.sampling.warmup.estimate_metric``), on targets with exact draws and
moments: the banana z1 ~ N(0, 1), z2 | z1 ~ N(z1^2, 1) (E z2 = 1, sd z2 = sqrt 3), and
Neal's funnel v ~ N(0, 3^2), x_i | v ~ N(0, e^v), i = 1..4 (reported for v only).
Chains start from exact draws and run T steps at decay 0.99; each row is the worst
coordinate's |mean bias| in target sds, its sd ratio - 1, the Monte Carlo s.e. of each,
MALA's acceptance and its share of chains that never accepted. The underdamped sampler
runs at the time step whose ULA equivalent h^2 / 2 is the row's step.

``stuck``: MALA on a 64-d standard normal (1,000 chains from exact draws, 500 steps,
decay 0.99): acceptance and the share of chains that never accept, plain and with each
adaptive form, with the EMA fed the current drift only (the code before issue 22) and
the current and proposed drifts (now).

``first_step``: |z_1| after one step of size 0.03 from |z_0| ~ 8e-6 on the same target.

``lpc_first_step`` (with ``--workdir`` of a Fashion-MNIST LPC run, ``--step`` its checkpoint):
on 512 test images, z_0 ~ q(z | x) as the train step draws it, the first chain step's noise
sd per coordinate, sqrt(2 h G_1) at the run's step size h, under each metric; the share of
coordinates where it exceeds the prior sd (prior_scale) and the encoder's posterior sd, and
the median drift |g| per coordinate; and the run's own chain's log p gain per chain step,
(log_p_end - log_p_start) / T averaged over the rows of its metrics.jsonl from SGD step 500
on (nats per example, the training batches').
"""

from __future__ import annotations

import argparse
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from lpc_jax.sampling import langevin, mala, samplers, warmup

NUM_CHAINS, NUM_STEPS, DECAY = 4000, 300, 0.99


def banana_log_prob(z):
    return -0.5 * z[:, 0] ** 2 - 0.5 * (z[:, 1] - z[:, 0] ** 2) ** 2


def banana_draws(key, n):
    k1, k2 = jax.random.split(key)
    z1 = jax.random.normal(k1, (n,))
    return jnp.stack([z1, z1**2 + jax.random.normal(k2, (n,))], axis=1)


def funnel_log_prob(z):
    v, x = z[:, 0], z[:, 1:]
    return -0.5 * (v / 3.0) ** 2 - 0.5 * jnp.sum(x * x, axis=-1) * jnp.exp(-v) - 0.5 * x.shape[1] * v


def funnel_draws(key, n):
    k1, k2 = jax.random.split(key)
    v = 3.0 * jax.random.normal(k1, (n, 1))
    return jnp.concatenate([v, jnp.exp(v / 2) * jax.random.normal(k2, (n, 4))], axis=1)


TARGETS = {  # log density, exact draws, true mean and sd of the coordinates reported, step sizes
    "banana": (banana_log_prob, banana_draws, np.array([0.0, 1.0]), np.array([1.0, math.sqrt(3.0)]), (0.1, 0.025)),
    "funnel": (funnel_log_prob, funnel_draws, np.array([0.0]), np.array([3.0]), (0.01,)),
}


def run(name, log_prob, z0, step_size, option, key):
    """Final latents (float64) and MALA's acceptance indicators (T, B) (or None)."""
    if name == "underdamped":
        step_size = math.sqrt(2 * step_size)
    hp = langevin.hparams(step_size, decay=DECAY)
    build = dict(precondition=False) if option in ("none", "warmup") else dict(precondition=option)
    if option == "warmup":
        warm = samplers.build(name, log_prob, precondition="adam")
        _, metric = jax.jit(lambda k: warmup.estimate_metric(k, warm.kernel, warm.init(z0), hp, 100))(key)
        build["metric"] = metric
    sampler = samplers.build(name, log_prob, **build)
    state, info = jax.jit(lambda k: langevin.sample_chain(k, sampler.kernel, sampler.init(z0), hp, NUM_STEPS))(
        jax.random.fold_in(key, 1))
    return np.asarray(state.z, np.float64), (np.asarray(info.is_accepted) if name == "mala" else None)


def bias_table() -> list[dict]:
    rows = []
    for target, (log_prob, draws, mean, sd, step_sizes) in TARGETS.items():
        z0 = draws(jax.random.key(0), NUM_CHAINS)
        k = len(mean)
        for step_size in step_sizes:
            for name in samplers.SAMPLERS:
                for option in ("none", "adam_paper", "adam", "warmup"):
                    z, accepted = run(name, log_prob, z0, step_size, option, jax.random.key(1))
                    z = z[:, :k]
                    finite = np.isfinite(z).all(1)
                    z = z[finite]
                    c = z - z.mean(0)
                    var = (c**2).mean(0)
                    row = dict(target=target, step=step_size, sampler=name, metric=option,
                               mean_bias=float(np.abs((z.mean(0) - mean) / sd).max()),
                               sd_bias=float((np.sqrt(var) / sd - 1)[np.argmax(np.abs(np.sqrt(var) / sd - 1))]),
                               se_mean=float((np.sqrt(var) / sd).max() / np.sqrt(len(z))),
                               se_sd=float((np.sqrt(((c**4).mean(0) - var**2) / len(z)) / (2 * sd**2)).max()),
                               diverged=float(1 - finite.mean()))
                    if accepted is not None:
                        row.update(acceptance=float(accepted.mean()), stuck=float((accepted.sum(0) == 0).mean()))
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    return rows


def stuck_table() -> list[dict]:
    rows = []
    log_prob = lambda z: -0.5 * jnp.sum(z * z, axis=-1)
    z0 = jax.random.normal(jax.random.key(0), (1000, 64))
    step_sizes = [0.05, 0.1, 0.2, 0.3, 0.4]
    for option, feed in (("none", True), ("adam_paper", False), ("adam_paper", True), ("adam", False), ("adam", True)):
        kernel = mala.build_kernel(log_prob, precondition=False if option == "none" else option,
                                   adapt_on_proposal=feed)
        chain = lambda hp: langevin.sample_chain(jax.random.key(1), kernel, mala.init(z0), hp, 500)[1].is_accepted
        accepted = np.asarray(jax.jit(jax.vmap(chain))(langevin.stack_hparams(step_sizes, DECAY)))
        for i, h in enumerate(step_sizes):
            row = dict(metric=option, proposal_drift_fed=feed, step=h, acceptance=float(accepted[i].mean()),
                       stuck=float((accepted[i].sum(0) == 0).mean()))
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def first_step_table() -> list[dict]:
    rows = []
    log_prob = lambda z: -0.5 * jnp.sum(z * z, axis=-1)
    z0 = 1e-6 * jax.random.normal(jax.random.key(0), (1000, 64))
    for name in samplers.SAMPLERS:
        for option in ("adam_paper", "adam"):
            sampler = samplers.build(name, log_prob, precondition=option)
            h = 0.03 if name != "underdamped" else math.sqrt(0.06)
            state, _ = sampler.kernel(jax.random.key(1), sampler.init(z0), langevin.hparams(h, DECAY))
            norms = np.linalg.norm(np.asarray(state.z), axis=-1)
            row = dict(sampler=name, metric=option, z0_norm=float(np.linalg.norm(z0, axis=-1).mean()),
                       z1_norm_median=float(np.median(norms)), z1_norm_max=float(norms.max()))
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def lpc_first_step_table(workdir: str, step: int | None) -> list[dict]:
    from lpc_jax.data import sources
    from lpc_jax.model import objectives
    from lpc_jax.runtime import logs
    from lpc_jax.sampling import preconditioner
    from lpc_jax.training import restore

    config, model, state = restore.load_run(workdir, step)
    x = jnp.asarray(sources.to_float(sources.load(config.dataset, "test", max_examples=512).images))
    mean, variance = model.encoder.apply({"params": state.params["encoder"]}, x)
    z0 = objectives.sample_gaussian(jax.random.key(0), mean, variance)
    drift = jax.grad(lambda z: model.log_joint(state.params["decoder"], x, z).sum())(z0)
    zero, decay, eps = jnp.zeros((), jnp.int32), jnp.float32(config.decay), jnp.float32(config.eps)
    metrics = {form: preconditioner.update(jnp.zeros_like(drift), drift, zero, decay, eps, form)[1]
               for form in preconditioner.FORMS}
    metrics.update(encoder=variance, none=jnp.ones_like(drift))
    logged = [r for r in logs.read_metrics(os.path.join(workdir, "metrics.jsonl"))
              if r.get("step", 0) >= 500 and "log_p_end" in r and "log_p_start" in r]
    gain = float(np.mean([r["log_p_end"] - r["log_p_start"] for r in logged]) / config.num_steps) if logged else None
    own = {"auto": "adam_paper" if config.preconditioner else "none"}.get(config.chain_metric, config.chain_metric)
    rows = []
    for name, g in metrics.items():
        noise_sd = np.asarray(jnp.sqrt(2 * config.step_size * g))
        row = dict(metric=name, run_metric=own, step_size=config.step_size, checkpoint=int(state.step),
                   run_log_p_gain_per_chain_step=gain,
                   median_abs_drift=float(np.median(np.abs(np.asarray(drift)))),
                   median_noise_sd=float(np.median(noise_sd)),
                   share_noise_above_prior_sd=float((noise_sd > config.prior_scale).mean()),
                   share_noise_above_posterior_sd=float((noise_sd > np.sqrt(np.asarray(variance))).mean()))
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tables", default="bias,stuck,first_step")
    parser.add_argument("--workdir", default=None, help="an LPC run, for --tables=lpc_first_step")
    parser.add_argument("--step", type=int, default=None, help="its checkpoint (default: the newest)")
    args = parser.parse_args()
    if "lpc_first_step" in args.tables:  # the launchers' device split, which the checkpoint was written with
        from lpc_jax.runtime import distributed

        distributed.set_cpu_devices(distributed.cpu_devices_for(0, 64))
    for name in args.tables.split(","):
        if name == "lpc_first_step":
            lpc_first_step_table(args.workdir, args.step)
        else:
            {"bias": bias_table, "stuck": stuck_table, "first_step": first_step_table}[name]()


if __name__ == "__main__":
    main()
