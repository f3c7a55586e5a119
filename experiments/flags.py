"""The flag set every launcher shares: one flag per ``Config`` field, plus ``--workdir``.

The flags are generated from ``dataclasses.fields(Config)``: name, default,
help text and choices all come from the field (``lpc_jax/training/config.py``), so a new
field is a new flag. Each dataset launcher only changes defaults.
"""

from __future__ import annotations

import dataclasses
import typing

from absl import flags

from lpc_jax.training.config import Config

FLAGS = flags.FLAGS

_DEFINE = {
    str: flags.DEFINE_string,
    int: flags.DEFINE_integer,
    float: flags.DEFINE_float,
    bool: flags.DEFINE_bool,
}


def _flag_type(hint) -> type:
    """The type a flag parses to: ``str | None`` -> ``str``; ``int`` -> ``int``."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
    """Defines ``--<field>`` for every Config field, ``--workdir`` and ``--cpu_devices`` in ``flag_values``.

    A field with ``choices`` becomes an enum flag; otherwise the field's type
    picks the flag type (``bool`` gives ``--field``/``--nofield``). A second
    call on the same ``flag_values`` does nothing.
    """
    fields = dataclasses.fields(Config)
    if all(f.name in flag_values for f in fields) and "workdir" in flag_values:
        return
    hints = typing.get_type_hints(Config)
    for f in fields:
        help_text, choices = f.metadata["help"], f.metadata["choices"]
        if choices is not None:
            flags.DEFINE_enum(f.name, f.default, list(choices), help_text, flag_values=flag_values)
        else:
            _DEFINE[_flag_type(hints[f.name])](f.name, f.default, help_text, flag_values=flag_values)
    flags.DEFINE_string("workdir", None, "Output directory; rerun with the same one to resume. "
                        "Default: runs/<dataset>_<algorithm>.", flag_values=flag_values)
    flags.DEFINE_integer("cpu_devices", 0, "Split the host CPU into this many JAX devices: a single run shards "
                         "its batch over them (data parallel), a sweep spreads its members over them. 0 = one "
                         "per CPU core (for a single run, the most that divide --batch_size), 1 = the whole CPU "
                         "as one device. No effect on GPU/TPU, whose devices are used as they are.",
                         lower_bound=0, flag_values=flag_values)


def config_from_flags(flag_values: flags.FlagValues = FLAGS) -> Config:
    """The validated Config of the parsed flags; ``config.ConfigError`` names a bad field."""
    values = {f.name: flag_values[f.name].value for f in dataclasses.fields(Config)}
    return Config(**values).validate()


def workdir_from_flags(config: Config, run_name: str | None = None,
                       flag_values: flags.FlagValues = FLAGS) -> str:
    """``--workdir``, or ``runs/<dataset>_<run_name>`` (``run_name`` defaults to the algorithm)."""
    return flag_values.workdir or f"runs/{config.dataset}_{run_name or config.algorithm}"
