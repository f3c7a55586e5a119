"""Config validation and the launchers' command line (experiments/)."""

import dataclasses
import os
import re
import subprocess
import sys

import pytest

from lpc_jax import config as config_lib
from lpc_jax.config import Config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
def test_validate_names_the_flag(flag, value):
    config = Config(**{flag: value})
    with pytest.raises(ValueError, match=f"--{flag}=") as excinfo:
        config.validate()
    assert repr(value) in str(excinfo.value)


def test_validate_accepts_defaults_and_edge_values():
    assert Config().validate() == Config()
    Config(decay=0.0, num_steps=1, warm_start="none", algorithm="vae", likelihood="bernoulli",
           dataset="celeba", step_size=1e-6, num_train_steps=1, num_epochs=0.0).validate()
    with pytest.raises(ValueError, match="--num_epochs="):
        Config(num_epochs=0.0).validate()  # only allowed when num_train_steps > 0


def test_config_json_round_trip_ignores_unknown_keys():
    config = Config(dataset="cifar10", latent_dim=7, obs_scale=0.5, data_dir="/x")
    assert Config.from_json(config.to_json()) == config
    text = config.to_json()[:-1] + ', "from_a_newer_version": 1}'
    assert Config.from_json(text) == config


def test_check_resumable():
    saved = Config()
    config_lib.check_resumable(saved, dataclasses.replace(saved, step_size=0.5, num_train_steps=9), "p")
    with pytest.raises(ValueError, match="--latent_dim: saved 40, now 8") as excinfo:
        config_lib.check_resumable(saved, dataclasses.replace(saved, latent_dim=8), "wd/config.json")
    assert "wd/config.json" in str(excinfo.value) and "--workdir" in str(excinfo.value)


# --------------------------------------------------------------------------- #
# The launcher, as a user runs it
# --------------------------------------------------------------------------- #

BAD_FLAGS = {
    "step_size": ["--step_size=-1"],
    "decay": ["--decay=1.5"],
    "num_steps": ["--num_steps=0"],
    "warm_start": ["--warm_start=bogus"],
    "dataset": ["--dataset=bogus"],
}


def _launch(args, workdir):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               JAX_PLATFORMS="cpu")
    return subprocess.Popen(
        [sys.executable, "-m", "experiments.fashion_mnist", *args, f"--workdir={workdir}"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    """Runs every bad-flag case and --help concurrently (each is an interpreter start)."""
    root = tmp_path_factory.mktemp("launch")
    cases = {**BAD_FLAGS, "help": ["--help"]}
    procs = {name: (_launch(args, root / name), root / name) for name, args in cases.items()}
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
    assert f"--{flag}" in err, err[-2000:]
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
