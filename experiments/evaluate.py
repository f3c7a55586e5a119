"""Evaluates a trained run: sample quality (fd_fmnist / FID, KID, density, coverage) and likelihood.

    python -m experiments.evaluate --workdir=runs/fashion_mnist_lpc
    python -m experiments.evaluate --workdir=RUN --num_samples=10000 --inception_weights=auto \\
        --iwae_samples=5000 --iwae_examples=1000 --step=1000

    python -m experiments.evaluate --workdir=RUN --ais_steps=1000 --ais_chains=16 --ais_examples=100

``--ais_steps`` > 0 adds annealed importance sampling of log p(x) from the prior
(:mod:`lpc_jax.evaluation.ais`): the decoder's likelihood without the encoder, a
stochastic lower bound; a cost estimate is printed before it starts and progress
with ETA after each batch.

Writes ``RUN/eval.json`` (every metric, sample counts, feature extractors, timings)
and ``RUN/eval_samples.png`` (generated vs. real test images). Cost on a 2-core
CPU: the IWAE bound costs ~0.3-1 ms per (image x importance sample), so the
default ``--iwae_samples=5000 --iwae_examples=100`` takes ~3-8 minutes; the
classifier metrics on 10,000 samples ~25 s; Inception features at 299x299 (only
with ``--inception_weights``) are far slower on a CPU.
"""

from __future__ import annotations

import json
import os
import time

import jax
from absl import app, flags

from experiments import launch
from lpc_jax.data import sources
from lpc_jax.evaluation import ais, evaluators
from lpc_jax.runtime import logs, periodic, workdir_lock
from lpc_jax.training import restore
from lpc_jax.training.evaluate import evaluate

flags.DEFINE_string("workdir", None, "Run directory written by a launcher (holds config.json, checkpoints/).")
flags.DEFINE_integer("num_samples", 10000, "Generated images, compared with as many real test images.")
flags.DEFINE_string("inception_weights", None, "pytorch-fid Inception weights (.pth/.npz) for fid, "
                    "kid_inception, ...; 'auto' searches $LPC_JAX_FID_INCEPTION, torch hub's cache and "
                    "lpc_jax/assets/. Default: skip Inception metrics.")
flags.DEFINE_integer("iwae_samples", 5000, "Importance samples K of the IWAE log-likelihood bound (0 = skip).")
flags.DEFINE_integer("iwae_examples", 100, "Test images for the IWAE bound (cost ~ K x this).")
flags.DEFINE_integer("elbo_examples", 0, "Test images for the test ELBO (0 = the whole split).")
flags.DEFINE_integer("ais_steps", 0, "AIS intermediate distributions K (0 = no AIS).")
flags.DEFINE_integer("ais_chains", 16, "AIS chains per image (combined by log-mean-exp).")
flags.DEFINE_integer("ais_examples", 100, "Test images that get the AIS estimate (cost ~ K x chains x this).")
flags.DEFINE_integer("ais_batch_size", 25, "Test images per jitted AIS call.")
flags.DEFINE_enum("ais_schedule", "sigmoid", ["sigmoid", "linear"], "AIS inverse-temperature schedule.")
flags.DEFINE_enum("ais_init", "prior", ["prior", "encoder"], "AIS start: the prior or the encoder's q(z|x).")
flags.DEFINE_float("ais_step_size", 0.0, "Fixed MALA step size of AIS; 0 = tuned per image by a pilot pass.")
flags.DEFINE_integer("ais_pilot_chains", 4, "Chains per image of the pilot pass that tunes the step sizes "
                     "(with --ais_step_size=0; its cost ~ K x this).")
flags.DEFINE_integer("step", None, "Checkpoint step to evaluate (default: the newest).")
flags.DEFINE_integer("seed", 0, "Seed of the latents and importance samples.")
flags.DEFINE_integer("kid_subsets", 100, "KID subsets (of up to 1000 images each).")
flags.DEFINE_string("output", "eval.json", "Output file name, relative to --workdir.")

FLAGS = flags.FLAGS


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def main() -> None:
    """Evaluates under the workdir's "eval" lock: one evaluation per run directory at a time.

    It is not the training lock: evaluation may read a run's checkpoints while the
    run trains (read-only, never cleaning or deleting), and writes only its own files.
    """
    if not FLAGS.workdir:
        raise app.UsageError("--workdir is required: the directory of a training run")
    try:
        with workdir_lock.lock(FLAGS.workdir, "evaluate", name="eval", create=False):
            _evaluate()
    except (FileNotFoundError, workdir_lock.WorkdirLockedError) as e:
        launch.exit_with_error(e)


def _ais_cost_and_progress(state, model, test_images, options: evaluators.EvalOptions):
    """Prints AIS's cost estimate (from one timed decoder VJP) and returns its progress printer."""
    ais_options = options.ais_options()
    images = test_images[:options.ais_examples]
    seconds = ais.estimate_seconds(state.params, model, images, options=ais_options,
                                   batch_size=options.ais_batch_size)
    pilot = (f"a pilot pass of {options.ais_pilot_chains} chains tunes the step sizes" if options.ais_step_size == 0
             else "fixed step size")
    print(f"AIS: {len(images)} images x {options.ais_chains} chains x K={options.ais_steps} MALA steps "
          f"({pilot}): estimated {periodic.format_time(seconds)} on this machine, plus compilation", flush=True)
    meter = None

    def progress(done: int, total: int) -> None:
        nonlocal meter
        if done == 0:  # AIS starts (after the other evaluators): the meter starts here
            meter = periodic.ReportProgress(start_step=0, num_total=total)
            return
        p = meter(done)
        print(f"  AIS {done}/{total} images | {periodic.format_time(p.wall_s)} elapsed | "
              f"ETA {periodic.format_time(p.eta_s)}", flush=True)

    return progress


def _evaluate() -> None:
    t0 = time.time()
    workdir = FLAGS.workdir
    try:
        config, model, state = restore.load_run(workdir, FLAGS.step)
        print(f"evaluating {workdir} (step {int(state.step)}, {config.algorithm} on {config.dataset}): "
              f"{FLAGS.num_samples} samples, IWAE K={FLAGS.iwae_samples} on {FLAGS.iwae_examples} images"
              + (f", AIS K={FLAGS.ais_steps} x {FLAGS.ais_chains} chains on {FLAGS.ais_examples} images"
                 if FLAGS.ais_steps > 0 else ""),
              flush=True)
        test_images = sources.load(config.dataset, "test", config.data_source, config.data_dir,
                                   image_size=config.image_size or None).images
        options = evaluators.EvalOptions(
            inception_weights=FLAGS.inception_weights, iwae_samples=FLAGS.iwae_samples,
            iwae_examples=FLAGS.iwae_examples, elbo_examples=FLAGS.elbo_examples, kid_subsets=FLAGS.kid_subsets,
            ais_steps=FLAGS.ais_steps, ais_chains=FLAGS.ais_chains, ais_examples=FLAGS.ais_examples,
            ais_batch_size=FLAGS.ais_batch_size, ais_schedule=FLAGS.ais_schedule, ais_init=FLAGS.ais_init,
            ais_prior_scale=config.prior_scale, ais_step_size=FLAGS.ais_step_size,
            ais_pilot_chains=FLAGS.ais_pilot_chains)
        if FLAGS.ais_steps > 0:
            options = options._replace(ais_progress=_ais_cost_and_progress(state, model, test_images, options))
        result = evaluate(
            config, model, state, num_samples=FLAGS.num_samples, rng_key=jax.random.key(FLAGS.seed),
            options=options, samples_png=os.path.join(workdir, "eval_samples.png"), test_images=test_images)
    except launch.RUN_ERRORS as e:  # FileNotFoundError: no run, no dataset, no Inception weights
        launch.exit_with_error(e)
    result.update({"workdir": os.path.abspath(workdir), "seed": FLAGS.seed,
                   "total_wall_s": time.time() - t0})
    out_path = os.path.join(workdir, FLAGS.output)
    try:  # complete or absent, also on a full disk
        logs.write_atomic(out_path, json.dumps(result, indent=2, allow_nan=True) + "\n")
    except logs.LogWriteError as e:
        launch.exit_with_error(e)

    skip = {"feature_extractors", "notes", "timings_s", "workdir", "samples_png", "ais_per_image_nats",
            "iwae_per_image_nats"}
    for key, value in result.items():
        if key not in skip:
            print(f"  {key}: {_fmt(value)}")
    for name, desc in result["feature_extractors"].items():
        print(f"  features[{name}]: {desc}")
    for note in result["notes"]:
        print(f"  note: {note}")
    print("  timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in result["timings_s"].items()))
    print(f"wrote {out_path} and {result['samples_png']} in {result['total_wall_s']:.1f}s")


if __name__ == "__main__":
    flags.mark_flag_as_required("workdir")
    app.run(launch.absl_main(main))
