"""Config validation and the launchers' command line (experiments/)."""

import dataclasses
import os
import re
import subprocess
import sys

import pytest
from absl import flags

from experiments import flags as lpc_flags
from experiments import launch
from experiments import (
    sweep as sweep_cli,  # defines the launchers' flags in absl's FLAGS
)
from lpc_jax.training.config import Config, ConfigError, check_resumable

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# --------------------------------------------------------------------------- #
# Config.validate
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("flag,value", [
    ("step_size", 0.0),
    ("step_size", -0.1),
    ("step_size", float("nan")),
    ("step_size", float("inf")),
    ("decay", -0.1),
    ("decay", 1.0),
    ("decay", float("nan")),
    ("num_steps", 0),
    ("warm_start", "bogus"),
    ("algorithm", "bogus"),
    ("dataset", "bogus"),
    ("likelihood", "bogus"),
    ("learning_rate", -1e-3),
    ("learning_rate", 0.0),
    ("learning_rate", float("inf")),
    ("num_epochs", float("inf")),
    ("num_epochs", -1.0),
    ("max_train_examples", -1),
    ("eval_examples", -5),
    ("data_source", "web"),
    ("batch_size", 0),
    ("latent_dim", 0),
    ("eps", 0.0),
    ("num_train_steps", -1),
    ("log_every", 0),
    ("checkpoint_every", 0),
])
def test_validate_names_the_field(flag, value):
    config = Config(**{flag: value})
    with pytest.raises(ConfigError, match=f"^{flag}={re.escape(repr(value))} is invalid: ") as excinfo:
        config.validate()
    assert excinfo.value.field == flag
    assert "--" not in str(excinfo.value)  # library errors name the field; launchers add the --
    assert launch.flag_message(excinfo.value) == f"--{excinfo.value}"


def test_validate_rejects_wrong_types():
    with pytest.raises(ConfigError, match="^step_size='0.1' is invalid"):
        Config(step_size="0.1").validate()


def test_validate_accepts_defaults_and_edge_values():
    assert Config().validate() == Config()
    Config(decay=0.0, num_steps=1, warm_start="none", algorithm="vae", likelihood="bernoulli",
           dataset="celeba", step_size=1e-6, num_train_steps=1, num_epochs=0.0).validate()
    with pytest.raises(ValueError, match="^num_epochs=0.0 is invalid: must be > 0 when num_train_steps is 0"):
        Config(num_epochs=0.0).validate()  # only allowed when num_train_steps > 0


def test_flag_message_adds_dashes_only_to_a_leading_flag_name():
    assert launch.flag_message(ValueError("step_sizes is empty")) == "--step_sizes is empty"
    assert launch.flag_message(ValueError("decays: 0.5 needs")) == "--decays: 0.5 needs"
    for text in ("step 3 produced NaN/Inf", "/runs/x holds a run", "--step_size=0 is invalid", "no_such_flag=1"):
        assert launch.flag_message(ValueError(text)) == text


# --------------------------------------------------------------------------- #
# Flags generated from the Config fields
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def flag_values():
    values = flags.FlagValues()
    lpc_flags.define_flags(values)
    lpc_flags.define_flags(values)  # a second call (a launcher module, then launch.run) is a no-op
    values(["launcher"])
    return values


def test_every_field_has_a_flag_with_help(flag_values):
    names = [f.name for f in dataclasses.fields(Config)]
    assert sorted(flag_values) == sorted(names + ["workdir", "cpu_devices"])
    for f in dataclasses.fields(Config):
        assert f.metadata["help"].strip() and flag_values[f.name].help.endswith(f.metadata["help"]), f.name
        if f.metadata["choices"] is not None:
            assert flag_values[f.name].parser.enum_values == list(f.metadata["choices"]), f.name


def test_flag_defaults_are_config_defaults(flag_values):
    assert lpc_flags.config_from_flags(flag_values) == Config()
    for f in dataclasses.fields(Config):
        value = flag_values[f.name].value
        assert value == f.default and type(value) is type(f.default), f.name
    assert lpc_flags.workdir_from_flags(Config(), flag_values=flag_values) == "runs/fashion_mnist_lpc"
    assert lpc_flags.workdir_from_flags(Config(), "sweep", flag_values) == "runs/fashion_mnist_sweep"


def test_flags_parse_into_config():
    values = flags.FlagValues()
    lpc_flags.define_flags(values)
    values(["launcher", "--step_size=0.5", "--nopreconditioner", "--num_steps=7", "--data_dir=/d",
            "--likelihood=bernoulli", "--num_epochs=3", "--workdir=w"])
    assert lpc_flags.config_from_flags(values) == Config(
        step_size=0.5, preconditioner=False, num_steps=7, data_dir="/d", likelihood="bernoulli", num_epochs=3.0)
    assert lpc_flags.workdir_from_flags(Config(), flag_values=values) == "w"
    values(["launcher", "--decay=1.0"])
    with pytest.raises(ConfigError, match="^decay=1.0 is invalid"):
        lpc_flags.config_from_flags(values)


def test_launcher_defaults_are_fields_and_valid():
    from experiments import celeba, cifar10, fashion_mnist, svhn

    for module in (celeba, cifar10, fashion_mnist, svhn, sweep_cli):
        assert set(module.DEFAULTS) <= {f.name for f in dataclasses.fields(Config)}, module.__name__
        dataclasses.replace(Config(), **module.DEFAULTS).validate()


def test_config_json_round_trip_ignores_unknown_keys():
    config = Config(dataset="cifar10", latent_dim=7, obs_scale=0.5, data_dir="/x")
    assert Config.from_json(config.to_json()) == config
    text = config.to_json()[:-1] + ', "from_a_newer_version": 1}'
    assert Config.from_json(text) == config


def test_check_resumable():
    saved = Config()
    check_resumable(saved, dataclasses.replace(saved, step_size=0.5, num_train_steps=9), "p")
    with pytest.raises(ValueError, match="--latent_dim: saved 40, now 8") as excinfo:
        check_resumable(saved, dataclasses.replace(saved, latent_dim=8), "wd/config.json")
    assert "wd/config.json" in str(excinfo.value) and "--workdir" in str(excinfo.value)


# --------------------------------------------------------------------------- #
# The launchers, as a user runs them
# --------------------------------------------------------------------------- #

# flag -> arguments to experiments.fashion_mnist that give it a bad value.
BAD_FLAGS = {
    "step_size": ["--step_size=-1"],
    "decay": ["--decay=1.5"],
    "num_steps": ["--num_steps=0"],
    "warm_start": ["--warm_start=bogus"],
    "dataset": ["--dataset=bogus"],
    "learning_rate": ["--learning_rate=nan"],
    "num_epochs": ["--num_epochs=0"],
}
# Cases of the sweep launcher, which shares the flags and main of launch.py.
SWEEP_CASES = {
    "sweep_help": ["--help"],
    "sweep_step_sizes": ["--step_sizes=0.1,-1"],
}


def _launch(args, workdir, module="experiments.fashion_mnist"):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               JAX_PLATFORMS="cpu")
    return subprocess.Popen(
        [sys.executable, "-m", module, *args, f"--workdir={workdir}"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    """Runs every bad-flag case and --help concurrently (each is an interpreter start)."""
    root = tmp_path_factory.mktemp("launch")
    cases = {**BAD_FLAGS, "help": ["--help"], **SWEEP_CASES}
    procs = {name: (_launch(args, root / name, "experiments.sweep" if name in SWEEP_CASES else
                            "experiments.fashion_mnist"), root / name) for name, args in cases.items()}
    results = {}
    for name, (proc, workdir) in procs.items():
        try:
            out, err = proc.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"launcher with {cases[name]} hung:\n{err[-2000:]}")
        results[name] = (proc.returncode, out, err, workdir)
    return results


@pytest.mark.parametrize("flag", sorted(BAD_FLAGS))
def test_launcher_rejects_bad_flag(launches, flag):
    rc, out, err, workdir = launches[flag]
    assert rc != 0, out + err
    # The error line itself (the usage text above it lists every flag): "--decay=1.5 is
    # invalid: ..." from Config.validate, "flag --dataset=bogus: ..." from an enum flag.
    assert re.search(rf"^(FATAL Flags parsing error: flag )?--{flag}=", err, re.M), err[-2000:]
    assert "Traceback" not in err, err[-3000:]
    assert not os.path.exists(workdir), f"{workdir} was created for an invalid run"


def test_launcher_help_lists_flags(launches):
    rc, out, err, workdir = launches["help"]
    assert rc in (0, 1), err[-2000:]  # absl exits 1 after --help
    assert "Traceback" not in err, err[-3000:]
    for flag in ("--step_size", "--decay", "--num_steps", "--warm_start", "--workdir", "--data_dir"):
        assert flag in out, out
    # The launcher's own default (experiments/fashion_mnist.py), not Config's 300.
    from experiments import fashion_mnist

    want = fashion_mnist.DEFAULTS["num_steps"]
    assert want != Config().num_steps
    assert re.search(rf"--num_steps: .*\n\s+\(default: '{want}'\)", out), out
    assert not os.path.exists(workdir)


def test_sweep_launcher_shares_the_flags(launches):
    rc, out, err, workdir = launches["sweep_help"]
    assert rc in (0, 1) and "Traceback" not in err, err[-3000:]
    for flag in ("--step_sizes", "--decays", "--metric", "--step_size", "--num_steps", "--workdir"):
        assert flag in out, out
    want = sweep_cli.DEFAULTS["num_steps"]
    assert re.search(rf"--num_steps: .*\n\s+\(default: '{want}'\)", out), out
    rc, out, err, workdir = launches["sweep_step_sizes"]
    assert rc != 0 and "Traceback" not in err, err[-3000:]
    assert re.search(r"^--step_sizes?[=:] ?-1.0 is invalid", err, re.M), err[-2000:]
    assert not os.path.exists(workdir)
