"""Chain diagnostics of a trained run: log p and drift along chains, PCA paths, split R-hat.

    python -m experiments.chain_diagnostics --workdir=runs/fashion_mnist_lpc
    python -m experiments.chain_diagnostics --workdir=RUN --num_steps=1000 --step_sizes=0.01,0.1 \\
        --sampler=mala

Writes into ``RUN/diagnostics/``:

* ``chain_curves.png`` (the paper's Figs. 3/7/8): log p(x, z_t) - log p(x, z_0) and
  the drift norm against t, mean +- sd over ``--num_images`` test images, with and
  without preconditioning, for each of ``--step_sizes`` and the run's step size;
  chains start from the encoder as in training (from the prior if the run
  trained with ``warm_start=none``);
* ``pca_trajectories.png`` (Figs. 1/6): the latent paths of ``--trajectory_images``
  test images on their two principal components, with and without
  preconditioning, each at the run's step size if its chains stayed finite
  there (for MALA: and accepted >= 10% of proposals), else at the largest of
  ``--step_sizes`` that did;
* ``rhat.png``: split R-hat per (image, latent dimension) from ``--num_chains``
  chains per image started at encoder mean + ``--overdispersion`` x encoder sd
  x N(0, I), at the same step sizes as the paths;
* ``diagnostics.json`` (summary: settings, final curve values, R-hat / ESS
  summaries, timings) and ``chain_curves.json`` (the full curves).
"""

from __future__ import annotations

import json
import os
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments import launch
from lpc_jax import plotting
from lpc_jax.data import sources
from lpc_jax.model import objectives
from lpc_jax.model.state import Model, TrainState
from lpc_jax.runtime import logs
from lpc_jax.sampling import diagnostics, langevin, samplers
from lpc_jax.training import restore
from lpc_jax.training.config import Config

flags.DEFINE_string("workdir", None, "Run directory written by a launcher (holds config.json, checkpoints/).")
flags.DEFINE_integer("num_steps", 300, "Chain length T (longer than training's is the point).")
flags.DEFINE_list("step_sizes", ["0.001", "0.01", "0.1"], "Step sizes of the chain curves (the run's is added); "
                  "the PCA paths and R-hat use the run's, or the largest usable one if the run's diverges.")
flags.DEFINE_integer("num_images", 32, "Test images for the chain curves.")
flags.DEFINE_integer("trajectory_images", 4, "Test images whose latent paths are projected (PCA).")
flags.DEFINE_integer("rhat_images", 16, "Test images for split R-hat and ESS.")
flags.DEFINE_integer("num_chains", 4, "Independent chains per image for split R-hat (>= 2; >= 4 advised).")
flags.DEFINE_float("overdispersion", 3.0, "R-hat chains start at encoder mean + this x encoder sd x N(0, I).")
flags.DEFINE_float("warmup_fraction", 0.5, "Leading fraction of each R-hat chain discarded as warm-up.")
flags.DEFINE_enum("sampler", None, samplers.SAMPLERS, "Sampler (default: the run's).")
flags.DEFINE_float("friction", None, "Underdamped friction (default: the run's).")
flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
flags.DEFINE_integer("seed", 0, "Seed of the chains.")

FLAGS = flags.FLAGS
PRECONDITIONING = {"preconditioned": True, "no preconditioning": False}


def _check_flags() -> None:
    checks = [("num_steps", FLAGS.num_steps >= 4, "needs >= 4 (split R-hat halves the kept draws)"),
              ("num_chains", FLAGS.num_chains >= 2, "needs >= 2 chains per image for R-hat"),
              ("warmup_fraction", 0.0 <= FLAGS.warmup_fraction < 1.0, "must lie in [0, 1)"),
              ("step_sizes", all(float(s) > 0 for s in FLAGS.step_sizes), "must all be > 0"),
              ("num_images", min(FLAGS.num_images, FLAGS.trajectory_images, FLAGS.rhat_images) >= 1,
               "num_images, trajectory_images and rhat_images must be >= 1")]
    for name, ok, need in checks:
        if not ok:
            raise ValueError(f"{name}={getattr(FLAGS, name)!r} is invalid: {need}")


class Setup(NamedTuple):
    """The trained run and the sampler the diagnostics run."""

    config: Config
    model: Model
    state: TrainState
    sampler: str
    friction: float

    def build(self, precondition: bool) -> samplers.Sampler:
        log_prob = lambda z, theta, x: self.model.log_joint(theta, x, z)
        return samplers.build(self.sampler, log_prob, precondition=precondition, friction=self.friction)

    def hparams(self, step_size: float) -> langevin.LangevinHParams:
        return langevin.hparams(step_size, self.config.decay, self.config.eps)


def _curve_step_sizes(config: Config) -> list[float]:
    """--step_sizes plus the run's own step size, ascending."""
    return sorted({float(s) for s in FLAGS.step_sizes} | {float(config.step_size)})


def _curves(setup: Setup, x: jax.Array, z0: jax.Array) -> dict:
    """Chain curves for every step size, with and without preconditioning: label -> ChainCurves (numpy)."""
    step_sizes = _curve_step_sizes(setup.config)
    hp = langevin.stack_hparams(step_sizes, setup.config.decay, setup.config.eps)
    out = {}
    for name, precondition in PRECONDITIONING.items():
        sampler = setup.build(precondition)
        run = jax.jit(lambda k, z, h, th, xx: diagnostics.chain_curves(k, sampler, z, h, th, xx,
                                                                        num_steps=FLAGS.num_steps))
        curves = jax.device_get(run(jax.random.key(FLAGS.seed + 1), z0, hp, setup.state.params["decoder"], x))
        for i, step_size in enumerate(step_sizes):
            out[f"{name}, step {step_size:g}"] = jax.tree.map(lambda a: np.asarray(a[i]), curves)
    return out


MIN_ACCEPTANCE = 0.1  # a MALA chain accepting less than this barely moves


def _usable(c: diagnostics.ChainCurves) -> bool:
    """The chains stayed finite (and, for MALA, accepted at least MIN_ACCEPTANCE of proposals)."""
    return _diverged_at(c) is None and (c.acceptance_mean is None or c.acceptance_mean.mean() >= MIN_ACCEPTANCE)


def _stable_step_sizes(setup: Setup, curves: dict) -> dict[str, float]:
    """Per setting: the run's step size if usable (:func:`_usable`), else the largest usable one, else the smallest."""
    chosen = {}
    for name in PRECONDITIONING:
        sizes = _curve_step_sizes(setup.config)
        stable = [s for s in sizes if _usable(curves[f"{name}, step {s:g}"])]
        run_size = float(setup.config.step_size)
        chosen[name] = run_size if run_size in stable else max(stable) if stable else min(sizes)
    return chosen


def _trajectories(setup: Setup, x: jax.Array, z0: jax.Array, step_sizes: dict) -> tuple[dict, dict]:
    """Per setting, each image's path z_0..z_T on its own 2 principal components, and their explained variance."""
    paths, explained = {}, {}
    for name, precondition in PRECONDITIONING.items():
        sampler, hp = setup.build(precondition), setup.hparams(step_sizes[name])
        run = jax.jit(lambda k, z, th, xx: diagnostics.trajectories(k, sampler, z, hp, th, xx,
                                                                     num_steps=FLAGS.num_steps))
        zs = np.asarray(run(jax.random.key(FLAGS.seed + 2), z0, setup.state.params["decoder"], x))
        label = f"{name}, step {step_sizes[name]:g}"
        projections = [diagnostics.pca_project(zs[:, b]) for b in range(zs.shape[1])]
        paths[label] = [p for p, _ in projections]
        explained[label] = [float(frac.sum()) for _, frac in projections]
    return paths, explained


def _convergence(setup: Setup, x: jax.Array, step_sizes: dict) -> tuple[dict, dict]:
    """Split R-hat / ESS summaries and the per-parameter R-hat, per preconditioning setting."""
    mean, variance = setup.model.encoder.apply({"params": setup.state.params["encoder"]}, x)
    starts = diagnostics.overdispersed_starts(jax.random.key(FLAGS.seed + 3), mean, variance, FLAGS.num_chains,
                                              FLAGS.overdispersion)
    x_rows = jnp.tile(x, (FLAGS.num_chains, 1, 1, 1))
    warmup = int(FLAGS.warmup_fraction * FLAGS.num_steps)
    summaries, rhats = {}, {}
    for name, precondition in PRECONDITIONING.items():
        sampler, hp = setup.build(precondition), setup.hparams(step_sizes[name])
        run = jax.jit(lambda k, s, th, xx: diagnostics.chain_draws(k, sampler, s, hp, th, xx,
                                                                    num_steps=FLAGS.num_steps))
        draws = run(jax.random.key(FLAGS.seed + 4), starts, setup.state.params["decoder"], x_rows)
        rhat, ess = jax.jit(diagnostics.convergence_statistics, static_argnums=1)(draws, warmup)
        label = f"{name}, step {step_sizes[name]:g}"
        summaries[label] = {"step_size": step_sizes[name], "draws_per_chain": FLAGS.num_steps - warmup,
                            **diagnostics.convergence_summary(rhat, ess)}
        rhats[label] = np.asarray(rhat)
    return summaries, rhats


def _diverged_at(c) -> int | None:
    """First step whose batch mean of log p is not finite (a diverged chain), or None."""
    bad = np.flatnonzero(~np.isfinite(c.delta_log_p_mean))
    return int(bad[0]) if bad.size else None


def _curve_summary(curves: dict) -> dict:
    return {label: {"diverged_at_step": _diverged_at(c),
                    "delta_log_p_final_mean": float(c.delta_log_p_mean[-1]),
                    "delta_log_p_final_sd": float(c.delta_log_p_sd[-1]),
                    "drift_norm_start": float(c.drift_norm_mean[0]),
                    "drift_norm_final": float(c.drift_norm_mean[-1]),
                    **({} if c.acceptance_mean is None else {"acceptance_mean": float(c.acceptance_mean.mean())})}
            for label, c in curves.items()}


def _write_figures(out_dir: str, curves: dict, paths: dict, rhats: dict, title: str) -> list[str]:
    drift = "|grad_z log p(x, z_t)|"
    panels = {label: {"log p(x, z_t) - log p(x, z_0) (nats)": (c.delta_log_p_mean, c.delta_log_p_sd),
                      drift: (c.drift_norm_mean, c.drift_norm_sd)}
              for label, c in curves.items()}
    dashed = tuple(label for label in curves if label.startswith("no preconditioning"))
    num_images = len(next(iter(paths.values())))
    return [
        plotting.plot_chain_curves(panels, os.path.join(out_dir, "chain_curves.png"), title, dashed=dashed,
                                   log_panels=(drift,)),
        plotting.plot_pca_trajectories(paths, os.path.join(out_dir, "pca_trajectories.png"),
                                       [f"test image {i}" for i in range(num_images)], title),
        plotting.plot_rhat_histogram(rhats, os.path.join(out_dir, "rhat.png"), diagnostics.RHAT_THRESHOLD, title),
    ]


def _load_images(config: Config) -> jax.Array:
    n = max(FLAGS.num_images, FLAGS.trajectory_images, FLAGS.rhat_images)
    ds = sources.load(config.dataset, "test", config.data_source, config.data_dir, max_examples=n)
    return jnp.asarray(sources.to_float(ds.images[:n]))


def _starts(setup: Setup, x: jax.Array) -> tuple[jax.Array, str]:
    """Chain starts as in training: a draw from q(z | x), or from the prior for warm_start=none."""
    config, key = setup.config, jax.random.key(FLAGS.seed)
    if config.warm_start == "none":
        return config.prior_scale * jax.random.normal(key, (x.shape[0], config.latent_dim)), "prior"
    mean, variance = setup.model.encoder.apply({"params": setup.state.params["encoder"]}, x)
    return objectives.sample_gaussian(key, mean, variance), "encoder"


def _load() -> tuple[Setup, jax.Array]:
    """The run, its sampler (flags override the run's config) and the test images; errors exit."""
    try:
        _check_flags()
        config, model, state = restore.load_run(FLAGS.workdir, FLAGS.step)
        images = _load_images(config)
    except launch.RUN_ERRORS as e:
        launch.exit_with_error(e)
    sampler = FLAGS.sampler or getattr(config, "sampler", "ula")
    friction = FLAGS.friction if FLAGS.friction is not None else getattr(config, "friction", 1.0)
    return Setup(config, model, state, sampler, friction), images


def _timed(timings: dict, name: str, fn, *args):
    t = time.time()
    out = fn(*args)
    timings[name] = time.time() - t
    return out


def _write_json(out_dir: str, summary: dict, curves: dict) -> str:
    path = os.path.join(out_dir, "diagnostics.json")  # each file complete or absent (logs.write_atomic)
    logs.write_atomic(path, json.dumps(summary, indent=2, allow_nan=True) + "\n")
    logs.write_json(os.path.join(out_dir, "chain_curves.json"), {
        label: {k: None if v is None else np.asarray(v).tolist() for k, v in c._asdict().items()}
        for label, c in curves.items()}, allow_nan=True)
    return path


def main() -> None:
    t0, timings = time.time(), {}
    setup, x = _load()
    config, step = setup.config, int(setup.state.step)
    print(f"chain diagnostics of {FLAGS.workdir} (step {step}): {setup.sampler}, T={FLAGS.num_steps}, "
          f"step sizes {_curve_step_sizes(config)}", flush=True)
    z0, start = _starts(setup, x)
    n, k = FLAGS.num_images, FLAGS.trajectory_images
    curves = _timed(timings, "curves", _curves, setup, x[:n], z0[:n])
    step_sizes = _stable_step_sizes(setup, curves)
    paths, explained = _timed(timings, "trajectories", _trajectories, setup, x[:k], z0[:k], step_sizes)
    convergence, rhats = _timed(timings, "convergence", _convergence, setup, x[:FLAGS.rhat_images], step_sizes)

    out_dir = os.path.join(FLAGS.workdir, "diagnostics")
    title = f"{config.dataset} {config.algorithm}, step {step}, {setup.sampler}, T={FLAGS.num_steps}"
    try:  # a full disk: one error line naming the file
        with logs.disk_errors(out_dir):
            figures = _write_figures(out_dir, curves, paths, rhats, title)
    except logs.LogWriteError as e:
        launch.exit_with_error(e)
    summary = {
        "workdir": os.path.abspath(FLAGS.workdir), "checkpoint_step": step, "sampler": setup.sampler,
        "friction": setup.friction if setup.sampler == "underdamped" else None, "num_steps": FLAGS.num_steps,
        "start": start, "num_images": n, "step_sizes": _curve_step_sizes(config),
        "run_step_size": config.step_size, "decay": config.decay, "eps": config.eps, "seed": FLAGS.seed,
        "curves": _curve_summary(curves),
        "trajectory_step_sizes": step_sizes,  # per setting: the run's if usable, else the largest usable
        "pca_explained_variance": explained,  # label -> per image, fraction of variance on the 2 PCs
        "convergence": {"images": FLAGS.rhat_images, "chains_per_image": FLAGS.num_chains,
                        "start": f"encoder mean + {FLAGS.overdispersion:g} sd x N(0, I)",
                        "warmup_draws": int(FLAGS.warmup_fraction * FLAGS.num_steps), **convergence},
        "figures": figures, "timings_s": {**timings, "total": time.time() - t0},
    }
    try:
        path = _write_json(out_dir, summary, curves)
    except logs.LogWriteError as e:
        launch.exit_with_error(e)
    for name, s in convergence.items():
        print(f"  {name}: split R-hat max {s['rhat_max']:.3f}, median {s['rhat_median']:.3f}, "
              f"{s['frac_rhat_below']:.0%} < {s['rhat_threshold']}; ESS min {s['ess_min']:.1f}, "
              f"median {s['ess_median']:.1f}; {s['num_undefined']} undefined")
    print(f"wrote {path} and {len(figures)} figures in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    flags.mark_flag_as_required("workdir")
    app.run(launch.absl_main(main))
