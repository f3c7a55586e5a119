"""The loop's NaN/Inf check runs on device and is read one step late: no step waits for the host, and
divergence still stops a single run at the step that diverged (a sweep records it), the last good
checkpoint untouched. Tiny MLP model (tests/tiny_model.py); a NaN is injected into step k's metrics."""

import dataclasses
import os

import jax.numpy as jnp
import pytest

from lpc_jax.runtime import checkpoints, writers
from lpc_jax.training import loop, sweep, train
from tests.runtime import test_distributed as td

CONFIG = dataclasses.replace(td.CONFIG, num_train_steps=6, log_every=100, checkpoint_every=2)


def poisoned(step_fn, at_call: int, calls: list, member=None):
    """``step_fn`` whose ``at_call``-th call returns NaN metrics (for one member of a stacked group)."""
    def step(state, x, key, hparams):
        calls.append(1)
        state, metrics = step_fn(state, x, key, hparams)
        if len(calls) == at_call:
            nan = jnp.nan if member is None else jnp.zeros_like(metrics["elbo"]).at[member].set(jnp.nan)
            metrics = {**metrics, "elbo": metrics["elbo"] + nan}
        return state, metrics
    return step


def _snapshot(directory):
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                out[os.path.relpath(os.path.join(root, name), directory)] = f.read()
    return out


def test_nan_at_step_k_stops_the_run_naming_k_with_the_checkpoint_untouched(tmp_path):
    k, calls = 3, []
    run = loop.setup(CONFIG, str(tmp_path), model=td.tiny_model(), train_images=td.images(),
                     test_images=td.images()[:0])
    keys = loop.run_keys(CONFIG.seed)
    group = train.make_group(CONFIG, run.model, keys)
    group = group._replace(step_fn=poisoned(group.step_fn, k, calls))
    trainer = loop.Trainer(run, [group], [loop.init_state(keys.init, run.model, run.image_shape, CONFIG.latent_dim)],
                           [loop.Member({}, keys)], log_file="metrics.jsonl",
                           config_file=("config.json", CONFIG.to_json()),
                           on_checkpoint=lambda step: saved.update({step: _snapshot(tmp_path / "checkpoints")}))
    saved = {}
    with pytest.raises(train.DivergenceError, match=f"step {k} produced NaN/Inf") as excinfo:
        trainer.fit()
    assert f"last good checkpoint (2) in {tmp_path / 'checkpoints'} is untouched" in str(excinfo.value)
    assert len(calls) == k + 1  # step k + 1 was queued before step k's check was read: nobody waited
    assert list(saved) == [2] and _snapshot(tmp_path / "checkpoints") == saved[2]  # step 2, byte for byte
    with checkpoints.Checkpointer(str(tmp_path)) as ckpt:
        assert ckpt.latest_step() == 2


def test_nan_in_one_sweep_member_is_recorded_at_its_step(tmp_path, monkeypatch):
    k, calls = 3, []
    jit = sweep.jit_sweep_step
    monkeypatch.setattr(sweep, "jit_sweep_step", lambda *a, **kw: poisoned(jit(*a, **kw), k, calls, member=1))
    summary = sweep.run_sweep(CONFIG, td.SWEEP_STEP_SIZES[4], [0.5], str(tmp_path), model=td.tiny_model(),
                              train_images=td.images(), test_images=td.images()[:0])
    assert [m["diverged_at_step"] for m in summary["members"]] == [None, k, None, None]
    assert summary["steps"] == CONFIG.num_train_steps
    # one TensorBoard run per member, holding the logged training scalars
    for i in range(4):
        tags = writers.scalars_of(str(tmp_path / "tensorboard" / f"member_{i}"))
        assert "steps_per_s" in tags and [s for s, _ in tags["examples_per_s"]] == [6]
        assert ("elbo" in tags) == (i != 1)
        assert [s for s, _ in tags["test/step_size"]] == [6]  # the final results, at the last step


def test_training_scalars_reach_tensorboard(tmp_path):
    config = dataclasses.replace(CONFIG, num_train_steps=4, log_every=1)
    t = td.trainer(str(tmp_path), 4)
    t.run = t.run._replace(config=config)
    t.fit()
    tags = writers.scalars_of(str(tmp_path / "tensorboard"))
    for name in ("elbo", "loss", "steps_per_s", "examples_per_s"):
        assert [s for s, _ in tags[name]] == [1, 2, 3, 4], name
    rows = [line for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and "steps_per_s" not in rows[0]  # the JSON-lines log keeps its columns


def test_a_sweep_whose_members_all_diverge_stops_at_that_step(tmp_path, monkeypatch):
    """Read one step late, the last divergence still ends the sweep at its step (not one later)."""
    k, calls = 3, []
    jit = sweep.jit_sweep_step
    monkeypatch.setattr(sweep, "jit_sweep_step", lambda *a, **kw: poisoned(jit(*a, **kw), k, calls))
    summary = sweep.run_sweep(CONFIG, td.SWEEP_STEP_SIZES[4], [0.5], str(tmp_path), model=td.tiny_model(),
                              train_images=td.images(), test_images=td.images()[:0])
    assert [m["diverged_at_step"] for m in summary["members"]] == [k] * 4
    assert summary["steps"] == k and len(calls) == k + 1
    with checkpoints.Checkpointer(str(tmp_path)) as ckpt:
        assert ckpt.latest_step() == 2  # no checkpoint after the last divergence
