"""Sweep Langevin step sizes and preconditioner decays in one compiled program.

    python -m experiments.sweep --dataset=fashion_mnist \\
        --step_sizes=0.001,0.01,0.1,0.5 --decays=0,0.25,0.99 \\
        --num_train_steps=500 --num_steps=20 --metric=elbo --workdir=runs/sweep

Every member (step_size x decay) trains its own networks on the same batches,
with the keys of a separate run with ``--seed`` (see :mod:`lpc_jax.sweep`): member
k ends where ``python -m experiments.fashion_mnist --step_size=.. --decay=..``
with the same other flags would (up to float32 rounding). ``--decays`` may hold
``off`` (no preconditioner; compiled as a second program). All the launchers'
flags apply; ``--step_size``/``--decay`` are replaced by the lists.

Writes to ``--workdir`` (default ``runs/<dataset>_sweep``): ``sweep_results.json``,
``sweep_results.md`` (one row per member), ``sweep_<metric>.png`` (metric vs step
size, log axis, one line per decay) and ``sweep_metrics.jsonl``.
"""

from __future__ import annotations

import math
import sys

from absl import app, flags, logging

from experiments import flags as lpc_flags  # noqa: F401  (defines the shared flags)
from lpc_jax import data, sweep

flags.DEFINE_string("step_sizes", "0.001,0.01,0.1,0.5", "Comma-separated Langevin step sizes (each > 0).")
flags.DEFINE_string("decays", None, "Comma-separated preconditioner decays in [0, 1); 'off' adds members "
                    "without the preconditioner. Default: --decay (or 'off' with --nopreconditioner).")
flags.DEFINE_string("metric", "elbo", f"Metric to rank and plot: one of {sorted(sweep.METRICS)} "
                    "('fd' = classifier-space Frechet distance, e.g. fd_fmnist; costs ~2000 samples per member).")

FLAGS = flags.FLAGS

DEFAULTS = dict(
    dataset="fashion_mnist",
    algorithm="lpc",
    warm_start="jeffreys",
    num_steps=20,
    num_train_steps=500,
    log_every=25,
)


def _parse_floats(flag: str, text: str | None, allow_off: bool = False) -> list:
    """Comma-separated numbers (and 'off' if allowed) -> list; UsageError naming the flag."""
    if text is None or not text.strip():
        raise app.UsageError(f"--{flag} is empty: give comma-separated values, e.g. --{flag}=0.01,0.1")
    out = []
    for item in (t.strip() for t in text.split(",")):
        if allow_off and item.lower() == sweep.OFF:
            out.append(sweep.OFF)
            continue
        try:
            v = float(item)
        except ValueError:
            raise app.UsageError(f"--{flag}={text!r}: {item!r} is not a number"
                                 + (" or 'off'" if allow_off else "")) from None
        if not math.isfinite(v):
            raise app.UsageError(f"--{flag}={text!r}: {item!r} is not finite")
        out.append(v)
    return out


def parse_sweep_flags():
    """(config, step_sizes, decays, metric) from the parsed flags, all validated."""
    try:
        config = lpc_flags.config_from_flags()
    except ValueError as e:
        raise app.UsageError(str(e))
    if config.algorithm != "lpc":
        raise app.UsageError(f"--algorithm={config.algorithm!r}: a Langevin step-size sweep needs --algorithm=lpc")
    step_sizes = _parse_floats("step_sizes", FLAGS.step_sizes)
    decays = None if FLAGS.decays is None else _parse_floats("decays", FLAGS.decays, allow_off=True)
    metric = FLAGS.metric
    if metric not in sweep.METRICS:
        raise app.UsageError(f"--metric={metric!r} is invalid: choose one of {sorted(sweep.METRICS)}")
    try:
        sweep.resolve_members(config, step_sizes, decays)
    except ValueError as e:
        raise app.UsageError(str(e))
    return config, step_sizes, decays, metric


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config, step_sizes, decays, metric = parse_sweep_flags()
    workdir = FLAGS.workdir or f"runs/{config.dataset}_sweep"
    try:
        summary = sweep.run_sweep(config, step_sizes, decays, workdir, metric=metric)
    except (data.DatasetNotFoundError, ValueError) as e:  # includes NoFeatureExtractorError
        logging.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(sweep.results_markdown(summary))
    print(f"results: {workdir}/sweep_results.json, {workdir}/sweep_results.md\nplot: {summary['plot_png']}")


if __name__ == "__main__":
    for _name, _value in DEFAULTS.items():
        FLAGS.set_default(_name, _value)
    for _flag in FLAGS.get_key_flags_for_module(lpc_flags.__name__):
        FLAGS.register_key_flag_for_module(sys.argv[0], _flag)
    app.run(main)
