"""Inference on test images with a trained run: reconstruction, inpainting, denoising.

    python -m experiments.infer --workdir=runs/fashion_mnist_lpc
    python -m experiments.infer --workdir=RUN --num_images=8 --num_samples=4 --num_steps=300 \\
        --noise_sigma=0.4 --outdir=docs/figures

Writes four PNGs to ``--outdir`` (default ``RUN/infer``; :mod:`lpc_jax.model.inference`):

* ``infer_reconstruction.png``: per test image (row) the image, the decoder mean at
  the encoder's mean, after the run's own chain (its sampler, step size and T), and
  after ``--num_steps`` exact MALA steps on p(z | x);
* ``infer_inpainting.png``: the image, its visible half (the bottom half hidden,
  shown grey), and ``--num_samples`` completions: MALA chains on the visible pixels'
  likelihood only;
* ``infer_denoising.png``: the image, the image plus N(0, sigma^2) noise, the
  encoder's guess, and ``--num_samples`` samples of p(z | noisy image);
* ``infer_log_p.png``: each image's log density along the chain, per task.
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from matplotlib.figure import Figure

from experiments import launch
from lpc_jax import plotting
from lpc_jax.data import sources
from lpc_jax.model import inference
from lpc_jax.training import restore

flags.DEFINE_string("workdir", None, "Run directory written by a launcher (holds config.json, checkpoints/).")
flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
flags.DEFINE_integer("num_images", 8, "Test images (rows of each grid).")
flags.DEFINE_integer("first_image", 0, "Index of the first test image.")
flags.DEFINE_integer("num_samples", 4, "Posterior samples (chains) per image for inpainting and denoising.")
flags.DEFINE_integer("num_steps", 300, "MALA steps of the inference chains.")
flags.DEFINE_float("step_size", 0.002, "MALA step size (latent units^2 per unit drift; exact at any value).")
flags.DEFINE_float("recon_step_size", 0.0005, "MALA step size of reconstruction (p(z | x) of a whole image "
                   "is sharper than the inpainting and denoising posteriors).")
flags.DEFINE_float("noise_sigma", 0.4, "Denoising: std of the added Gaussian noise, in [-1, 1] pixel units.")
flags.DEFINE_integer("seed", 0, "Seed of the chains and the noise.")
flags.DEFINE_string("outdir", None, "Where the PNGs go (default: WORKDIR/infer).")

FLAGS = flags.FLAGS


def _rows(*columns: np.ndarray) -> np.ndarray:
    """Columns of (B, H, W, C) images -> (B * num_columns, H, W, C), row-major per image."""
    return np.stack([np.asarray(c) for c in columns], axis=1).reshape(-1, *columns[0].shape[1:])


def _plot_log_p(traces: dict[str, np.ndarray], path: str) -> str:
    """One panel per task: each image's log p along the chain (mean over its chains), nats."""
    fig = Figure(figsize=(4.0 * len(traces), 3.2), dpi=100)
    for i, (name, trace) in enumerate(traces.items()):
        ax = fig.add_subplot(1, len(traces), i + 1)
        per_image = trace.mean(axis=1)  # (T, S, B) -> (T, B)
        ax.plot(np.arange(1, per_image.shape[0] + 1), per_image, lw=0.8)
        ax.set_xscale("log")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("chain step t")
        ax.set_ylabel("log p(x, z_{t-1}) [nats]" if i == 0 else "")
    fig.tight_layout()
    return plotting.save_figure(fig, path)


def _run() -> None:
    t0 = time.time()
    config, model, state = restore.load_run(FLAGS.workdir, FLAGS.step)
    params, outdir = state.params, FLAGS.outdir or os.path.join(FLAGS.workdir, "infer")
    test = sources.load(config.dataset, "test", config.data_source, config.data_dir).images
    x = jnp.asarray(sources.to_float(test[FLAGS.first_image:FLAGS.first_image + FLAGS.num_images]))
    k_own, k_rec, k_inp, k_noise, k_den = jax.random.split(jax.random.key(FLAGS.seed), 5)
    chain = dict(num_steps=FLAGS.num_steps, step_size=FLAGS.step_size, prior_scale=config.prior_scale)
    print(f"inference on {x.shape[0]} test images of {config.dataset} with {FLAGS.workdir} (step "
          f"{int(state.step)}): {FLAGS.num_steps} MALA steps x {FLAGS.num_samples} chains per task", flush=True)

    own = jax.jit(lambda k: inference.reconstruct(
        k, params, model, x, num_steps=config.num_steps, step_size=config.step_size, prior_scale=config.prior_scale,
        sampler=config.sampler, precondition=config.preconditioner))(k_own)
    rec = jax.jit(lambda k: inference.reconstruct(
        k, params, model, x, **{**chain, "step_size": FLAGS.recon_step_size}))(k_rec)
    title = (f"test image | encoder mean | run's chain ({config.sampler}, T={config.num_steps}) | "
             f"MALA T={FLAGS.num_steps}")
    paths = [plotting.save_image_grid(_rows(x, rec.start, own.samples[0], rec.samples[0]),
                                      os.path.join(outdir, "infer_reconstruction.png"), ncols=4, title=title)]

    visible = jnp.arange(x.shape[1])[:, None] < x.shape[1] // 2  # top half observed, (H, 1)
    visible = jnp.broadcast_to(visible, x.shape[1:3])
    inp = jax.jit(lambda k: inference.inpaint(k, params, model, x, visible, num_samples=FLAGS.num_samples,
                                              **chain))(k_inp)
    shown = jnp.where(visible[None, :, :, None], x, 0.0)
    paths.append(plotting.save_image_grid(
        _rows(x, shown, *inp.samples), os.path.join(outdir, "infer_inpainting.png"), ncols=2 + FLAGS.num_samples,
        title=f"test image | top half seen | {FLAGS.num_samples} completions (MALA T={FLAGS.num_steps})"))

    noisy = x + FLAGS.noise_sigma * jax.random.normal(k_noise, x.shape)
    den = jax.jit(lambda k: inference.denoise(k, params, model, noisy, FLAGS.noise_sigma,
                                              num_samples=FLAGS.num_samples, **chain))(k_den)
    paths.append(plotting.save_image_grid(
        _rows(x, jnp.clip(noisy, -1, 1), den.start, *den.samples), os.path.join(outdir, "infer_denoising.png"),
        ncols=3 + FLAGS.num_samples,
        title=f"test image | + N(0, {FLAGS.noise_sigma}^2) | encoder | {FLAGS.num_samples} posterior samples"))

    paths.append(_plot_log_p({"reconstruction: log p(x, z)": np.asarray(rec.log_p_trace),
                              "inpainting: log p(x_visible, z)": np.asarray(inp.log_p_trace),
                              "denoising: log p(x_noisy, z)": np.asarray(den.log_p_trace)},
                             os.path.join(outdir, "infer_log_p.png")))
    for name, out in (("reconstruction", rec), ("inpainting", inp), ("denoising", den)):
        print(f"  {name}: mean log p {float(out.log_p_trace[0].mean()):.1f} -> "
              f"{float(out.log_p_trace[-1].mean()):.1f} nats, MALA acceptance "
              f"{float(out.acceptance.mean()):.2f}", flush=True)
    print("wrote " + ", ".join(paths) + f" in {time.time() - t0:.1f}s")


def main() -> None:
    launch.run_on_workdir(_run, FLAGS.workdir)


if __name__ == "__main__":
    flags.mark_flag_as_required("workdir")
    app.run(launch.absl_main(main))
