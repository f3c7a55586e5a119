"""Shared body of the dataset launchers: parse flags, train, report."""

from __future__ import annotations

import logging as py_logging
import sys

from absl import app, flags, logging

from experiments import flags as lpc_flags  # noqa: F401  (defines the flags)
from lpc_jax import checkpoints, data, train


def run(**defaults) -> None:
    """Sets flag defaults for one dataset, then runs ``train_and_evaluate``."""
    for name, value in defaults.items():
        flags.FLAGS.set_default(name, value)
    # absl's --help lists only the main module's key flags; the shared flags are
    # defined in experiments.flags, so make them key flags of the launcher too.
    for flag in flags.FLAGS.get_key_flags_for_module(lpc_flags.__name__):
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)

    def main(argv):
        # Keep the terminal to our progress lines: drop library INFO chatter (orbax).
        logging.get_absl_handler().addFilter(
            lambda r: r.levelno >= py_logging.WARNING or "orbax" not in r.pathname)
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        try:
            config = lpc_flags.config_from_flags()
        except ValueError as e:
            raise app.UsageError(str(e))
        workdir = lpc_flags.workdir_from_flags(config)
        try:
            summary = train.train_and_evaluate(config, workdir)
        except (data.DatasetNotFoundError, checkpoints.CheckpointError, train.DivergenceError, ValueError) as e:
            logging.error("%s", e)
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)
        print(f"samples: {summary['samples_png']}\n"
              f"test ELBO: {summary['test_elbo_nats']:.1f} nats "
              f"({summary['test_elbo_bits_per_dim']:.3f} bits/dim) on {summary['test_examples']} images")

    app.run(main)
