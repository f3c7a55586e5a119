"""Bidirectional Monte Carlo (Grosse et al. 2015) on images simulated from a trained decoder.

    python -m experiments.bdmc --workdir=RUN --num_images=10 --ais_chains=4 --ais_steps=100,300,1000

Draws z ~ p(z) and x ~ p(x | z) (the discretised Gaussian's 8-bit bins), so that z
is an exact sample of p(z | x); then, for each K, forward AIS from the prior (a
stochastic lower bound on log p(x)) and reverse AIS from z (an upper bound)
(:mod:`lpc_jax.evaluation.ais`). The gap between them bounds the error of the
forward estimate on data like the model's own. Writes ``RUN/bdmc.json`` and
``RUN/bdmc.png`` (bounds against K), or under ``--outdir``.
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
from lpc_jax.evaluation import ais
from lpc_jax.runtime import logs
from lpc_jax.training import restore

flags.DEFINE_string("workdir", None, "Run directory (config.json, checkpoints/).")
flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
flags.DEFINE_integer("num_images", 10, "Simulated images.")
flags.DEFINE_list("ais_steps", ["100", "300", "1000"], "Values of K, the number of intermediate distributions.")
flags.DEFINE_integer("ais_chains", 4, "Chains per image and direction.")
flags.DEFINE_integer("batch_size", 10, "Images per jitted call.")
flags.DEFINE_integer("seed", 0, "Seed of the simulated data and the chains.")
flags.DEFINE_string("outdir", None, "Where bdmc.json and bdmc.png go (default: --workdir).")

FLAGS = flags.FLAGS


def simulate(rng_key, params, model, num_images: int, latent_dim: int, prior_scale: float):
    """(z (N, D) float32, x (N, H, W, C) uint8): z ~ N(0, s^2 I), x ~ the decoder's 8-bit pmf at z."""
    if model.likelihood != "discretized_gaussian":
        raise ValueError(f"BDMC here simulates 8-bit images: needs likelihood 'discretized_gaussian', "
                         f"not {model.likelihood!r}")
    k_z, k_x = jax.random.split(rng_key)
    z = prior_scale * jax.random.normal(k_z, (num_images, latent_dim))
    mean, log_scale = model.decoder.apply({"params": params["decoder"]}, z)
    x = mean + jnp.exp(log_scale) * jax.random.normal(k_x, mean.shape)
    # The discretised Gaussian's bins: width 2/255 around k * 2/255 - 1, the edge bins open.
    return np.asarray(z), np.asarray(jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255)).astype(np.uint8)


def _plot(rows: list[dict], path: str) -> str:
    fig = Figure(figsize=(4.5, 3.2), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    ks = [r["ais_steps"] for r in rows]
    for key, label in (("upper_nats", "reverse AIS (upper bound)"), ("lower_nats", "forward AIS (lower bound)")):
        ax.errorbar(ks, [r[key] for r in rows], yerr=[r[key.replace("nats", "stderr_nats")] for r in rows],
                    marker="o", capsize=3, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("K (intermediate distributions)")
    ax.set_ylabel("mean log p(x) [nats]")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return plotting.save_figure(fig, path)


def _run() -> None:
    t0 = time.time()
    config, model, state = restore.load_run(FLAGS.workdir, FLAGS.step)
    z, x = simulate(jax.random.key(FLAGS.seed), state.params, model, FLAGS.num_images, config.latent_dim,
                    config.prior_scale)
    rows = []
    for k in [int(v) for v in FLAGS.ais_steps]:
        options = ais.AISOptions(num_steps=k, num_chains=FLAGS.ais_chains, prior_scale=config.prior_scale)
        key = jax.random.fold_in(jax.random.key(FLAGS.seed + 1), k)
        t = time.time()
        lower = ais.ais_per_image(state.params, model, x, key, options=options, batch_size=FLAGS.batch_size)
        upper = ais.ais_per_image(state.params, model, x, key, options=options, batch_size=FLAGS.batch_size,
                                  latents=z)
        gap = upper["log_marginal"] - lower["log_marginal"]
        se = lambda a: float(np.std(a) / np.sqrt(len(a)))
        rows.append({"ais_steps": k, "lower_nats": float(lower["log_marginal"].mean()),
                     "lower_stderr_nats": se(lower["log_marginal"]),
                     "upper_nats": float(upper["log_marginal"].mean()), "upper_stderr_nats": se(upper["log_marginal"]),
                     "gap_nats": float(gap.mean()), "gap_stderr_nats": se(gap),
                     "acceptance_forward": float(lower["acceptance"].mean()),
                     "acceptance_reverse": float(upper["acceptance"].mean()), "wall_s": time.time() - t})
        print("  " + ", ".join(f"{a}={b:.4g}" if isinstance(b, float) else f"{a}={b}" for a, b in rows[-1].items()),
              flush=True)
    outdir = FLAGS.outdir or FLAGS.workdir
    result = {"workdir": os.path.abspath(FLAGS.workdir), "step": int(state.step), "num_images": FLAGS.num_images,
              "ais_chains": FLAGS.ais_chains, "seed": FLAGS.seed, "rows": rows, "wall_s": time.time() - t0}
    os.makedirs(outdir, exist_ok=True)
    logs.write_json(os.path.join(outdir, "bdmc.json"), result, indent=2)  # complete or absent
    print(f"wrote {os.path.join(outdir, 'bdmc.json')} and {_plot(rows, os.path.join(outdir, 'bdmc.png'))}")


def main() -> None:
    launch.run_on_workdir(_run, FLAGS.workdir)


if __name__ == "__main__":
    flags.mark_flag_as_required("workdir")
    app.run(launch.absl_main(main))
