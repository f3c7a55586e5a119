"""Shared body of the launchers: flag defaults, the absl main, error exits, train and report.

A dataset launcher is ``launch.run(**DEFAULTS)``; ``experiments/sweep.py`` is
``launch.run(main, **DEFAULTS)`` with a main of its own. Importing this module defines no flags
(``experiments/evaluate.py`` uses its error helpers beside flags of its own);
:func:`run` defines the shared set.
"""

from __future__ import annotations

import logging as py_logging
import re
import sys
from typing import Callable, NoReturn, Sequence

from absl import app, flags, logging

from experiments import flags as lpc_flags
from lpc_jax.runtime import checkpoints, distributed, logs, workdir_lock
from lpc_jax.training import train
from lpc_jax.training.config import Config

FLAGS = flags.FLAGS

# Failures a run reports as `error: ...` and exit status 1: missing data or
# weights (FileNotFoundError), an unreadable checkpoint or one that could not be
# saved (checkpoints.CheckpointSaveError: disk full), a workdir in use by another
# run, a diverged chain (train.DivergenceError is a FloatingPointError), a value
# the library rejects, a log, plot or summary that could not be written (logs.LogWriteError).
RUN_ERRORS = (FileNotFoundError, checkpoints.CheckpointError, workdir_lock.WorkdirLockedError, FloatingPointError,
              ValueError, logs.LogWriteError)


def flag_message(error: Exception) -> str:
    """``error``'s text with a leading flag name written as a flag.

    The library names fields (``step_size=-1.0 is invalid: ...``,
    ``step_sizes is empty``); on the command line the field is ``--step_size``.
    Text that does not start with a defined flag's name followed by ``=``,
    ``:`` or `` is `` is returned unchanged.
    """
    text = str(error)
    name = re.match(r"[a-z_]\w*(?=[=:]| is )", text)
    return f"--{text}" if name and name.group() in FLAGS else text


def usage_error(error: Exception) -> app.UsageError:
    """An absl usage error (usage text, exit status 1) naming the offending ``--flag``."""
    return app.UsageError(flag_message(error))


def exit_with_error(error: Exception) -> NoReturn:
    """Prints ``error: <message>`` (flags as ``--flag``) to stderr and exits with status 1."""
    print(f"error: {flag_message(error)}", file=sys.stderr)
    sys.exit(1)


def run_on_workdir(run_fn: Callable[[], None], workdir: str) -> None:
    """The main of a launcher that reads a finished run: ``workdir`` must be given, and a
    run error (``RUN_ERRORS``) exits with ``error: ...`` instead of a traceback."""
    if not workdir:
        raise app.UsageError("--workdir is required: the directory of a training run")
    try:
        run_fn()
    except RUN_ERRORS as e:
        exit_with_error(e)


def parse_config() -> Config:
    """The validated Config of the parsed flags; a bad value is a usage error naming its flag."""
    try:
        return lpc_flags.config_from_flags()
    except ValueError as e:
        raise usage_error(e) from None


def _drop_orbax_info(record: py_logging.LogRecord) -> bool:
    if "orbax" not in record.pathname:
        return True
    # A full disk is reported once, as checkpoints.CheckpointSaveError: not as orbax's thread tracebacks.
    return record.levelno >= py_logging.WARNING and not checkpoints.is_disk_full(Exception(record.getMessage()))


def absl_main(main_fn: Callable[[], None]) -> Callable[[Sequence[str]], None]:
    """``main_fn`` as an ``app.run`` main: no positional arguments, no orbax INFO lines."""

    def main(argv: Sequence[str]) -> None:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        # Keep the terminal to our progress lines: drop library INFO chatter (orbax).
        logging.get_absl_handler().addFilter(_drop_orbax_info)
        main_fn()

    return main


def init_distributed(config: Config) -> None:
    """Joins a multi-process run (``--coordinator_address``, ``--num_processes``, ``--process_id``)
    before anything touches a device; a bad setting or an unreachable coordinator exits with
    ``error: ...``. One process (the default) does nothing here and uses all its local devices.
    Then logs the devices, with a warning when a GPU is present but JAX runs on the CPU."""
    try:
        distributed.initialize_from_config(config)
    except (ValueError, TimeoutError) as e:
        exit_with_error(e)
    distributed.check_accelerator_used()  # logs the devices; warns if a GPU sits unused


def train_and_report() -> None:
    """The dataset launchers' main: ``train.train_and_evaluate`` under the flags; prints the result."""
    config = parse_config()
    # before anything touches a device; --cpu_devices >= 0 is checked by its flag; applied
    # only when JAX will run on the CPU (distributed.expected_platform)
    distributed.set_cpu_devices(distributed.cpu_devices_for(FLAGS.cpu_devices, config.batch_size,
                                                            config.num_processes))
    init_distributed(config)
    workdir = lpc_flags.workdir_from_flags(config)
    try:  # train_and_evaluate locks the workdir before any data loads
        summary = train.train_and_evaluate(config, workdir)
    except RUN_ERRORS as e:
        exit_with_error(e)
    print(f"samples: {summary['samples_png']}\n"
          f"test ELBO: {summary['test_elbo_nats']:.1f} nats "
          f"({summary['test_elbo_bits_per_dim']:.3f} bits/dim) on {summary['test_examples']} images")
    fd_keys = sorted(k for k in summary if k.startswith(("fd_", "density_", "coverage_")))
    if fd_keys:
        print(f"{summary['eval_samples']} prior samples: "
              + ", ".join(f"{k} {summary[k]:.3f}" for k in fd_keys))


def run(main_fn: Callable[[], None] = train_and_report, /, **defaults) -> None:
    """Defines the shared flags, sets this launcher's defaults, then runs ``main_fn`` under absl.

    Args:
      main_fn: the launcher's work, called with the flags parsed (default: train and report).
      **defaults: flag name -> default value for this launcher (shown by ``--help``).
    """
    lpc_flags.define_flags()
    for name, value in defaults.items():
        FLAGS.set_default(name, value)
    # absl's --help lists only the main module's key flags; the shared flags are
    # defined in experiments.flags, so make them key flags of the launcher too.
    for flag in FLAGS.get_key_flags_for_module(lpc_flags.__name__):
        FLAGS.register_key_flag_for_module(sys.argv[0], flag)
    app.run(absl_main(main_fn))
