"""End-to-end behaviour of lpc_jax.training.train.train_and_evaluate on mocked TFDS data.

Tiny settings throughout (28x28 mock Fashion-MNIST, 32 images, batch 8, T = 2):
one epoch is 4 SGD steps. The expensive part is compiling the train step; every
run here shares one LPC configuration, so a persistent compilation cache turns
all but the first compile into cache hits.
"""

import dataclasses
import gc
import json
import math
import os
import shutil

import chex
import jax
import numpy as np
import pytest

from lpc_jax.data import sources
from lpc_jax.model.state import create_train_state
from lpc_jax.runtime import checkpoints
from lpc_jax.training import build, loop, train
from lpc_jax.training.config import Config

tfds = pytest.importorskip("tensorflow_datasets")

NUM_EXAMPLES = 32  # per mocked split
BASE = Config(dataset="fashion_mnist", data_source="tfds", batch_size=8, num_steps=2,
              num_epochs=1.0, eval_examples=16, log_every=1, checkpoint_every=2,
              prior_init_batches=1, latent_dim=40)
STEPS = NUM_EXAMPLES // BASE.batch_size  # 4: one epoch


@pytest.fixture(scope="module", autouse=True)
def _compilation_cache(tmp_path_factory):
    from jax.experimental.compilation_cache import compilation_cache as cc

    if jax.config.jax_compilation_cache_dir:  # already configured (e.g. conftest): use it
        yield
        return
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
    cc.reset_cache()
    try:
        yield
    finally:
        jax.config.update("jax_compilation_cache_dir", None)
        cc.reset_cache()


@pytest.fixture(scope="module", autouse=True)
def _mock_tfds():
    # Random but deterministic examples from the builders' feature specs; no
    # TensorFlow, no prepared data, nothing downloads.
    with tfds.testing.mock_data(num_examples=NUM_EXAMPLES, policy=tfds.testing.MockPolicy.USE_CODE):
        yield


def _snapshot(directory) -> dict:
    """{relative path: bytes} of every file under ``directory``."""
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = f.read()
    return out


def _latest_step(workdir):
    with checkpoints.Checkpointer(workdir) as ckpt:
        return ckpt.latest_step()


def _final_state(workdir, config=BASE):
    """The newest checkpoint of ``workdir``, restored into a fresh TrainState."""
    model = build.build_model(config)
    template = create_train_state(jax.random.key(0), model, sources.image_shape(config.dataset),
                                     config.latent_dim)
    with checkpoints.Checkpointer(workdir) as ckpt:
        return ckpt.restore(template)


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _assert_same_training(workdir, reference_workdir):
    """Same final TrainState (exactly) and the same logged losses per step."""
    got, want = _final_state(workdir), _final_state(reference_workdir)
    assert int(got.step) == int(want.step) == STEPS
    chex.assert_trees_all_equal(got.params, want.params)
    chex.assert_trees_all_equal(got.opt_state, want.opt_state)
    want_rows = {r["step"]: r for r in _rows(reference_workdir)}
    for row in _rows(workdir):
        for key in ("loss", "elbo", "log_p_start", "log_p_end"):
            np.testing.assert_allclose(row[key], want_rows[row["step"]][key], rtol=1e-6, err_msg=key)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted one-epoch LPC run: the reference for everything below."""
    workdir = str(tmp_path_factory.mktemp("straight"))
    logged = []
    summary = train.train_and_evaluate(BASE, workdir, on_log=lambda step, row: logged.append(step))
    return workdir, summary, logged


@pytest.fixture
def copy_of_straight(straight, tmp_path):
    workdir = str(tmp_path / "copy")
    shutil.copytree(straight[0], workdir)
    return workdir


# --------------------------------------------------------------------------- #
# What a run leaves behind
# --------------------------------------------------------------------------- #


def _assert_run_outputs(workdir, summary, config, metric_keys):
    for name in ("config.json", "metrics.jsonl", "samples.png", "curves.png", "summary.json"):
        assert os.path.isfile(os.path.join(workdir, name)), name
    for name in ("samples.png", "curves.png"):
        with open(os.path.join(workdir, name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", name
    with open(os.path.join(workdir, "config.json")) as f:
        assert Config.from_json(f.read()) == config

    steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
    assert steps[-1] == STEPS and set(steps) <= {2, 4}  # every 2 steps, newest 2 kept

    rows = _rows(workdir)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # log_every=1
    for row in rows:
        for key in ("step", "examples_per_s", *metric_keys):
            assert key in row, (key, row)
            assert math.isfinite(row[key]), (key, row)
        assert row["examples_per_s"] > 0
    assert rows[-1]["epoch"] == pytest.approx(1.0)

    with open(os.path.join(workdir, "summary.json")) as f:
        on_disk = json.load(f)
    assert on_disk == summary
    assert summary["step"] == STEPS
    assert summary["test_examples"] == config.eval_examples
    assert math.isfinite(summary["test_elbo_nats"]) and summary["test_elbo_nats"] < 0
    dims = 28 * 28 * 1
    assert summary["test_elbo_bits_per_dim"] == pytest.approx(
        -summary["test_elbo_nats"] / (dims * math.log(2.0)))


def test_lpc_run_writes_everything(straight):
    workdir, summary, logged = straight
    _assert_run_outputs(workdir, summary, BASE,
                        ("loss", "elbo", "log_p_start", "log_p_end", "log_p_chain", "forward_kl"))
    assert logged == list(range(1, STEPS + 1))  # on_log sees every logged step
    state = _final_state(workdir)
    assert int(state.step) == STEPS
    assert set(state.params) == {"decoder", "encoder"}


def test_vae_run_writes_everything(tmp_path):
    config = dataclasses.replace(BASE, algorithm="vae")
    summary = train.train_and_evaluate(config, str(tmp_path))
    _assert_run_outputs(str(tmp_path), summary, config, ("loss", "elbo"))
    row = _rows(str(tmp_path))[0]
    assert row["loss"] == pytest.approx(-row["elbo"])
    assert "log_p_start" not in row  # no Langevin chain in a VAE step


# --------------------------------------------------------------------------- #
# Resuming
# --------------------------------------------------------------------------- #


def test_resume_matches_straight_run(straight, tmp_path):
    workdir = str(tmp_path)
    half = train.train_and_evaluate(dataclasses.replace(BASE, num_train_steps=STEPS // 2), workdir)
    assert half["step"] == STEPS // 2 and _latest_step(workdir) == STEPS // 2
    full = train.train_and_evaluate(dataclasses.replace(BASE, num_train_steps=STEPS), workdir)
    assert full["step"] == STEPS
    _assert_same_training(workdir, straight[0])
    assert [r["step"] for r in _rows(workdir)] == list(range(1, STEPS + 1))  # no step twice
    assert full["test_elbo_nats"] == pytest.approx(straight[1]["test_elbo_nats"], rel=1e-6)


def test_interrupt_in_on_log_saves_and_resumes(straight, tmp_path):
    workdir = str(tmp_path)

    def interrupt(step, row):
        if step == 3:  # after step 2's checkpoint, before the next one
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train.train_and_evaluate(BASE, workdir, on_log=interrupt)
    assert _latest_step(workdir) == 3  # saved on the way out
    assert not os.path.exists(os.path.join(workdir, "summary.json"))
    summary = train.train_and_evaluate(BASE, workdir)  # resumes mid-epoch at step 3
    assert summary["step"] == STEPS
    _assert_same_training(workdir, straight[0])


def test_interrupt_during_a_step_saves_and_resumes(straight, tmp_path, monkeypatch):
    # Ctrl-C usually lands while the host waits for a step's result, i.e. after
    # the step was dispatched with the old state's buffers donated. Simulate it
    # by raising from the host's fetch of step 3's check (log_every=1: each step is
    # fetched at once), with no checkpoint yet.
    workdir = str(tmp_path)
    config = dataclasses.replace(BASE, checkpoint_every=STEPS)
    calls = []
    fetch = loop.fetch

    def interrupted(tree):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return fetch(tree)

    monkeypatch.setattr(loop, "fetch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train.train_and_evaluate(config, workdir)
    monkeypatch.setattr(loop, "fetch", fetch)
    assert _latest_step(workdir) == 3  # step 3 had finished; its result was kept
    assert os.listdir(os.path.join(workdir, "checkpoints")) == ["3"]
    train.train_and_evaluate(config, workdir)
    _assert_same_training(workdir, straight[0])


def test_resume_with_another_model_fails_before_training(copy_of_straight):
    before = _snapshot(copy_of_straight)
    for flag, value in (("latent_dim", 8), ("algorithm", "vae")):
        config = dataclasses.replace(BASE, **{flag: value}, num_train_steps=2 * STEPS)
        with pytest.raises(ValueError, match=f"--{flag}: saved") as excinfo:
            train.train_and_evaluate(config, copy_of_straight)
        assert "--workdir" in str(excinfo.value)
        assert _snapshot(copy_of_straight) == before  # not even config.json rewritten


# --------------------------------------------------------------------------- #
# Failure modes that must not damage the last good checkpoint
# --------------------------------------------------------------------------- #


def test_divergence_raises_and_keeps_checkpoint(copy_of_straight):
    ckpt_dir = os.path.join(copy_of_straight, "checkpoints")
    before = _snapshot(ckpt_dir)
    metrics_before = _snapshot(copy_of_straight)["metrics.jsonl"]
    # A Langevin step of 1e30 throws z to ~1e30, so log p(x, z) overflows at
    # once. The step size is a traced hyper-parameter: no recompilation.
    config = dataclasses.replace(BASE, step_size=1e30, num_train_steps=STEPS + 2)
    with pytest.raises(train.DivergenceError, match=f"step {STEPS + 1} produced NaN/Inf") as excinfo:
        train.train_and_evaluate(config, copy_of_straight)
    assert "--step_size" in str(excinfo.value)
    assert isinstance(excinfo.value, FloatingPointError)
    assert _latest_step(copy_of_straight) == STEPS
    assert _snapshot(ckpt_dir) == before  # same files, same bytes
    assert _snapshot(copy_of_straight)["metrics.jsonl"] == metrics_before  # no NaN rows logged


def _truncate_arrays(step_dir):
    d = os.path.join(step_dir, "default", "ocdbt.process_0", "d")
    for name in os.listdir(d):
        with open(os.path.join(d, name), "r+b") as f:
            f.truncate(16)


def _garble_metadata(step_dir):
    for name in ("_METADATA", "manifest.ocdbt"):
        with open(os.path.join(step_dir, "default", name), "wb") as f:
            f.write(b"\x00garbage\xff" * 8)


# Orbax's failed async reads leave asyncio tasks whose exceptions nobody
# retrieves ("Event loop is closed"); collect them here, not in a later test.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("corrupt", [_truncate_arrays, _garble_metadata])
def test_corrupt_checkpoint_raises_and_deletes_nothing(copy_of_straight, corrupt):
    step_dir = os.path.join(copy_of_straight, "checkpoints", str(STEPS))
    corrupt(step_dir)
    before = _snapshot(copy_of_straight)
    with pytest.raises(checkpoints.CheckpointError) as excinfo:
        train.train_and_evaluate(BASE, copy_of_straight)
    msg = str(excinfo.value)
    assert os.path.join(copy_of_straight, "checkpoints") in msg and f"/{STEPS}" in msg, msg
    assert "cannot be restored" in msg and "--workdir" in msg and "Nothing was deleted" in msg, msg
    assert _snapshot(copy_of_straight) == before
    del excinfo
    gc.collect()
