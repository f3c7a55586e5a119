"""Chain diagnostics of a trained run: log p and drift along chains, PCA paths, split R-hat.

    python -m experiments.chain_diagnostics --workdir=runs/fashion_mnist_lpc
    python -m experiments.chain_diagnostics --workdir=RUN --num_steps=1000 --step_sizes=0.01,0.1 \\
        --sampler=mala

The diagnostics themselves are :mod:`lpc_jax.evaluation.chains`; this launcher reads
flags, loads the run and writes the figures and JSON. Writes into ``RUN/diagnostics/``:

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

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments import launch
from lpc_jax import plotting
from lpc_jax.data import sources
from lpc_jax.evaluation import chains
from lpc_jax.runtime import logs
from lpc_jax.sampling import diagnostics, samplers
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


def _curve_step_sizes(config: Config) -> list[float]:
    """--step_sizes plus the run's own step size, ascending."""
    return sorted({float(s) for s in FLAGS.step_sizes} | {float(config.step_size)})


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
    ds = sources.load(config.dataset, "test", config.data_source, config.data_dir, max_examples=n,
                      image_size=config.image_size or None)
    return jnp.asarray(sources.to_float(ds.images[:n]))


def _load() -> tuple[Config, chains.ChainSetup, jax.Array]:
    """The run, its sampler (flags override the run's config) and the test images; errors exit."""
    try:
        _check_flags()
        config, model, state = restore.load_run(FLAGS.workdir, FLAGS.step)
        images = _load_images(config)
    except launch.RUN_ERRORS as e:
        launch.exit_with_error(e)
    sampler = FLAGS.sampler or getattr(config, "sampler", "ula")
    friction = FLAGS.friction if FLAGS.friction is not None else getattr(config, "friction", 1.0)
    setup = chains.ChainSetup(model, state, sampler, friction, config.decay, config.eps, config.warm_start,
                              config.prior_scale)
    return config, setup, images


def _timed(timings: dict, name: str, fn):
    t = time.time()
    out = fn()
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
    config, setup, x = _load()
    step, sizes, seed, steps = int(setup.state.step), _curve_step_sizes(config), FLAGS.seed, FLAGS.num_steps
    print(f"chain diagnostics of {FLAGS.workdir} (step {step}): {setup.sampler}, T={steps}, "
          f"step sizes {sizes}", flush=True)
    z0, start = chains.chain_starts(setup, x, jax.random.key(seed))
    n, k = FLAGS.num_images, FLAGS.trajectory_images
    curves = _timed(timings, "curves", lambda: chains.curves_by_step_size(
        setup, x[:n], z0[:n], sizes, num_steps=steps, rng_key=jax.random.key(seed + 1)))
    step_sizes = chains.usable_step_sizes(curves, sizes, float(config.step_size))
    paths, explained = _timed(timings, "trajectories", lambda: chains.trajectories_by_setting(
        setup, x[:k], z0[:k], step_sizes, num_steps=steps, rng_key=jax.random.key(seed + 2)))
    convergence, rhats = _timed(timings, "convergence", lambda: chains.convergence_by_setting(
        setup, x[:FLAGS.rhat_images], step_sizes, num_steps=steps, num_chains=FLAGS.num_chains,
        overdispersion=FLAGS.overdispersion, warmup=int(FLAGS.warmup_fraction * steps),
        start_key=jax.random.key(seed + 3), rng_key=jax.random.key(seed + 4)))

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
        "start": start, "num_images": n, "step_sizes": sizes,
        "run_step_size": config.step_size, "decay": config.decay, "eps": config.eps, "seed": FLAGS.seed,
        "curves": chains.curve_summary(curves),
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
