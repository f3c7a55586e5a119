"""Sweep Langevin step sizes and preconditioner decays in one compiled program.

    python -m experiments.sweep --dataset=fashion_mnist \\
        --step_sizes=0.001,0.01,0.1,0.5 --decays=0,0.25,0.99 \\
        --num_train_steps=500 --num_steps=20 --metric=elbo --workdir=runs/sweep

Every member (step_size x decay) trains its own networks on the same batches,
with the keys of a separate run with ``--seed`` (see :mod:`lpc_jax.training.sweep`): member
k ends where ``python -m experiments.fashion_mnist --step_size=.. --decay=..``
with the same other flags would (up to float32 rounding). ``--decays`` may hold
``off`` (no preconditioner; compiled as a second program). All the launchers'
flags apply; ``--step_size``/``--decay`` are replaced by the lists.

Writes to ``--workdir`` (default ``runs/<dataset>_sweep``): ``sweep_results.json``,
``sweep_results.md`` (one row per member), ``sweep_<metric>.png`` (metric vs step
size, log axis, one line per decay) and ``sweep_metrics.jsonl``.
"""

from __future__ import annotations

from absl import app, flags

from experiments import flags as lpc_flags
from experiments import launch
from lpc_jax.runtime import distributed
from lpc_jax.training import sweep

flags.DEFINE_string("step_sizes", "0.001,0.01,0.1,0.5", "Comma-separated Langevin step sizes (each > 0).")
flags.DEFINE_string("decays", None, "Comma-separated preconditioner decays in [0, 1); 'off' adds members "
                    "without the preconditioner. Default: --decay (or 'off' with --nopreconditioner).")
flags.DEFINE_string("metric", "elbo", f"Metric to rank and plot: one of {sorted(sweep.METRICS)} "
                    "('fd' = classifier-space Frechet distance, e.g. fd_fmnist; costs ~2000 samples per member).")
flags.DEFINE_enum("sweep_mode", sweep.DEFAULT_MODE, list(sweep.MODES),
                  "How a device runs its members: vmap (batched), map (lax.map, one after another) or auto "
                  "(vmap on GPU/TPU, map on CPU). The members are spread over all local devices either way.")
lpc_flags.define_flags()  # the launchers' flags, so that importing this module gives the whole command line

FLAGS = flags.FLAGS

DEFAULTS = dict(
    dataset="fashion_mnist",
    algorithm="lpc",
    warm_start="jeffreys",
    num_steps=20,
    num_train_steps=500,
    log_every=25,
)


def _parse_list(flag: str, text: str | None, allow_off: bool = False) -> list:
    """Comma-separated numbers (and 'off' if allowed) -> list; UsageError naming a non-number.

    Only parses: whether each value is a valid step size or decay is for
    ``sweep.resolve_members`` (that is, ``Config.validate``) to say.
    """
    items = [t.strip() for t in (text or "").split(",") if t.strip()]
    out = []
    for item in items:
        if allow_off and item.lower() == sweep.OFF:
            out.append(sweep.OFF)
            continue
        try:
            out.append(float(item))
        except ValueError:
            raise app.UsageError(f"--{flag}={text!r}: {item!r} is not a number"
                                 + (" or 'off'" if allow_off else "")) from None
    return out


def parse_sweep_flags():
    """(config, step_sizes, decays, metric) from the parsed flags, all validated.

    Raises:
      app.UsageError: naming the offending ``--flag``.
    """
    config = launch.parse_config()
    if config.algorithm != "lpc":
        raise app.UsageError(f"--algorithm={config.algorithm!r}: a Langevin step-size sweep needs --algorithm=lpc")
    step_sizes = _parse_list("step_sizes", FLAGS.step_sizes)
    decays = None if FLAGS.decays is None else _parse_list("decays", FLAGS.decays, allow_off=True)
    metric = FLAGS.metric
    if metric not in sweep.METRICS:
        raise app.UsageError(f"--metric={metric!r} is invalid: choose one of {sorted(sweep.METRICS)}")
    try:
        sweep.resolve_members(config, step_sizes, decays)
    except ValueError as e:
        raise launch.usage_error(e) from None
    return config, step_sizes, decays, metric


def main() -> None:
    config, step_sizes, decays, metric = parse_sweep_flags()
    workdir = lpc_flags.workdir_from_flags(config, run_name="sweep")
    distributed.set_cpu_devices(distributed.cpu_devices_for(FLAGS.cpu_devices))  # before any device is touched
    launch.init_distributed(config)  # a sweep runs in one process: more are refused with a message
    try:
        summary = sweep.run_sweep(config, step_sizes, decays, workdir, metric=metric, mode=FLAGS.sweep_mode)
    except launch.RUN_ERRORS as e:  # includes evaluation.NoFeatureExtractorError (a ValueError)
        launch.exit_with_error(e)
    print(sweep.results_markdown(summary))
    print(f"results: {workdir}/sweep_results.json, {workdir}/sweep_results.md\nplot: {summary['plot_png']}")


if __name__ == "__main__":
    launch.run(main, **DEFAULTS)
