"""Evaluates a trained run: sample quality (fd_fmnist / FID, KID, density, coverage) and likelihood.

    python -m experiments.evaluate --workdir=runs/fashion_mnist_lpc
    python -m experiments.evaluate --workdir=RUN --num_samples=10000 --inception_weights=auto \\
        --iwae_samples=5000 --iwae_examples=1000 --step=1000

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
from lpc_jax.evaluation import evaluators
from lpc_jax.runtime import logs, workdir_lock
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


def _evaluate() -> None:
    t0 = time.time()
    workdir = FLAGS.workdir
    try:
        config, model, state = restore.load_run(workdir, FLAGS.step)
        print(f"evaluating {workdir} (step {int(state.step)}, {config.algorithm} on {config.dataset}): "
              f"{FLAGS.num_samples} samples, IWAE K={FLAGS.iwae_samples} on {FLAGS.iwae_examples} images",
              flush=True)
        result = evaluate(
            config, model, state, num_samples=FLAGS.num_samples, rng_key=jax.random.key(FLAGS.seed),
            options=evaluators.EvalOptions(
                inception_weights=FLAGS.inception_weights, iwae_samples=FLAGS.iwae_samples,
                iwae_examples=FLAGS.iwae_examples, elbo_examples=FLAGS.elbo_examples,
                kid_subsets=FLAGS.kid_subsets),
            samples_png=os.path.join(workdir, "eval_samples.png"))
    except launch.RUN_ERRORS as e:  # FileNotFoundError: no run, no dataset, no Inception weights
        launch.exit_with_error(e)
    result.update({"workdir": os.path.abspath(workdir), "seed": FLAGS.seed,
                   "total_wall_s": time.time() - t0})
    out_path = os.path.join(workdir, FLAGS.output)
    try:  # complete or absent, also on a full disk
        logs.write_atomic(out_path, json.dumps(result, indent=2, allow_nan=True) + "\n")
    except logs.LogWriteError as e:
        launch.exit_with_error(e)

    skip = {"feature_extractors", "notes", "timings_s", "workdir", "samples_png"}
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
