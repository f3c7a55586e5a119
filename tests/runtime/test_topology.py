"""Runs move between machines: a checkpoint written on any number of devices or
processes restores, evaluates and resumes on any other.

The matrix: checkpoints written by 1, 2 and 4 forced CPU devices and by 2 real
processes (gloo), read back by 1 device (this process), 4 devices and 2
processes; single runs and sweeps resumed on another topology. The tiny MLP of
tests/tiny_model.py keeps every compile to about a second; the workers are
tests/runtime/test_distributed.py's subprocess launcher with a job list of their own.

What equality holds (README, "Resuming"): a restored state equals the saved one
bitwise on any topology; a run resumed on the topology that saved it ends
bitwise where an uninterrupted run ends (test_distributed, test_faults); on
another topology it continues from the same state (params, Adam state, step,
data position) and ends within float32 all-reduce rounding of it.
"""

import dataclasses
import gc
import json
import os
import re
import shutil

import jax
import numpy as np
import pytest

from lpc_jax.runtime import checkpoints
from lpc_jax.training import restore
from lpc_jax.training.config import Config
from tests.runtime import test_distributed as td

# {"train": [[workdir, steps], ...]}: the data-parallel single run (resumes an existing workdir);
# {"sweep": [[workdir, steps], ...]}: a K = 4 sweep; {"load": [workdir, ...]}: restore each
# newest checkpoint without a template (onto this topology, replicated);
# {"load_run": [workdir, ...]}: restore.load_run; {"write_run": [workdir, config_json]}: a
# checkpoint of the real networks' state (seeded numbers) laid out over every device.
_WORKER = r"""
import dataclasses, json, sys
import jax, numpy as np
args = json.loads(sys.argv[1])
if args["processes"] > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
from lpc_jax.runtime import checkpoints, distributed
from lpc_jax.training import restore, sweep
from tests.runtime import test_distributed as t, test_topology as tt
distributed.initialize(args.get("coordinator", ""), args["processes"], args["process_id"], 60)
out = {"devices": jax.device_count(), "processes": jax.process_count()}
for workdir, steps in args.get("train", []):
    trainer = t.trainer(workdir, steps)
    trainer.fit()
    out["train:" + workdir] = t.flat(distributed.local_copy(trainer.states[0]))
for workdir, steps in args.get("sweep", []):
    _, params = sweep.run_sweep(dataclasses.replace(t.CONFIG, num_train_steps=steps), t.SWEEP_STEP_SIZES[4], [0.5],
                                workdir, model=t.tiny_model(), train_images=t.images(), test_images=t.images()[:0],
                                return_params=True)
    out["sweep:" + workdir] = [t.flat(p) for p in params]
for workdir in args.get("load", []):
    with checkpoints.Checkpointer(workdir) as ckpt:
        out["load:" + workdir] = t.flat(distributed.local_copy(ckpt.restore()))
for workdir in args.get("load_run", []):
    _, _, state = restore.load_run(workdir)
    out["load_run:" + workdir] = tt.digest(state)
if "write_run" in args:
    tt.write_run(*args["write_run"])
if jax.process_index() == 0:
    print("RESULT " + json.dumps(out))
"""

REAL = Config(batch_size=8, latent_dim=8, num_train_steps=10, checkpoint_every=5)  # Fashion-MNIST networks


def launch(devices: int, processes: int = 1, timeout: int = 300, **job) -> dict:
    """Runs ``_WORKER`` in ``processes`` subprocesses with ``devices`` forced CPU devices each."""
    return td._launch(devices, processes, timeout, worker=_WORKER, **job)


def digest(tree) -> dict:
    """{path: (sum, sum of squares)} in float64: compares a big state in a few numbers."""
    return {jax.tree_util.keystr(p): [float(np.sum(np.asarray(a, np.float64))),
                                      float(np.sum(np.square(np.asarray(a, np.float64))))]
            for p, a in jax.tree_util.tree_leaves_with_path(tree)}


def write_run(workdir: str, config_json: str) -> None:
    """A run directory as train.py leaves it (config.json, checkpoint 5) with seeded numbers in its state,
    each array replicated over every device of every process: what a data-parallel run saves."""
    from lpc_jax.data import sources
    from lpc_jax.model.state import create_train_state
    from lpc_jax.training import build

    config = Config.from_json(config_json)
    model = build.build_model(config)
    abstract = jax.eval_shape(lambda: create_train_state(jax.random.key(0), model,
                                                         sources.image_shape(config.dataset), config.latent_dim))
    rng, sharding = np.random.default_rng(0), checkpoints.replicated()
    state = jax.tree.map(lambda s: jax.make_array_from_callback(
        s.shape, sharding, lambda idx, v=rng.standard_normal(s.shape).astype(s.dtype): v[idx]), abstract)
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json())
    with checkpoints.Checkpointer(workdir, max_to_keep=1) as ckpt:
        ckpt.save(5, state)


def norm(flat: dict) -> dict:
    """``flat``'s keys by names alone (a restored tree is dicts and lists, the trainer's a TrainState)."""
    return {"/".join(k for k in re.split(r"[\[\]'.]+", key) if k): v for key, v in flat.items()}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Written by 1 device (this process), 2 devices and 2 processes: the tiny single run stopped at
    step 2 (``d1``, ``d2``, ``p2``), a real-network run directory (``real_d2``, ``real_p2``) and,
    on 2 devices, a K = 4 sweep stopped at step 2 (``sweep``, two members per device)."""
    if jax.device_count() != 1:
        pytest.skip("this process must have one device: run the suite without forced devices")
    tmp = tmp_path_factory.mktemp("saved")
    t = td.trainer(str(tmp / "d1"), 2)
    t.fit()
    runs = {"d1": norm(td.flat(t.states[0]))}
    out = launch(2, train=[[str(tmp / "d2"), 2]], write_run=[str(tmp / "real_d2"), REAL.to_json()],
                 sweep=[[str(tmp / "sweep"), 2]])
    runs["d2"] = norm(out["train:" + str(tmp / "d2")])
    out = launch(1, 2, train=[[str(tmp / "p2"), 2]], write_run=[str(tmp / "real_p2"), REAL.to_json()])
    runs["p2"] = norm(out["train:" + str(tmp / "p2")])
    return tmp, runs


@pytest.fixture(scope="module")
def moved(saved, tmp_path_factory):
    """Read back by 4 devices and by 2 processes: every checkpoint restored, ``real_d2`` through
    load_run, and resumed to step 4 (``p2`` on 4 devices, ``d1`` in 2 processes)."""
    tmp, runs = saved
    to = tmp_path_factory.mktemp("moved")
    for name in ("p2", "d1"):
        shutil.copytree(tmp / name, to / name)
    loads = [str(tmp / name) for name in runs]
    four = launch(4, load=loads, load_run=[str(tmp / "real_d2")], train=[[str(to / "p2"), 4]])
    two = launch(1, 2, load=loads, train=[[str(to / "d1"), 4]])
    return to, four, two


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The tiny run trained straight to step 4 on one device."""
    t = td.trainer(str(tmp_path_factory.mktemp("straight")), 4)
    t.fit()
    return norm(td.flat(t.states[0]))


def test_a_checkpoint_restores_bitwise_on_any_topology(saved, moved):
    tmp, runs = saved
    _, four, two = moved
    for name, state in runs.items():
        with checkpoints.Checkpointer(str(tmp / name)) as ckpt:  # on 1 device, here
            assert norm(td.flat(ckpt.restore())) == state, name
        assert norm(four["load:" + str(tmp / name)]) == state, (name, "4 devices")
        assert norm(two["load:" + str(tmp / name)]) == state, (name, "2 processes")


def test_load_run_reads_a_run_trained_on_other_devices(saved, moved):
    tmp, _ = saved
    _, four, _ = moved
    config, _, state = restore.load_run(str(tmp / "real_d2"))  # README's evaluate, in a plain process
    assert config == REAL.validate()
    assert all(a.sharding.device_set == {jax.local_devices()[0]} for a in jax.tree.leaves(state))
    want = digest(state)
    assert digest(restore.load_run(str(tmp / "real_p2"))[2]) == want  # the same seeded numbers
    assert four["load_run:" + str(tmp / "real_d2")] == want


def test_a_single_run_resumes_on_another_topology(saved, moved, straight, tmp_path):
    """Stopped at step 2, resumed to step 4 elsewhere (2 devices -> 1, 2 processes -> 4 devices,
    1 device -> 2 processes): the uninterrupted run's state up to all-reduce rounding, every step
    logged once."""
    tmp, _ = saved
    to, four, two = moved
    shutil.copytree(tmp / "d2", tmp_path / "d2")
    t = td.trainer(str(tmp_path / "d2"), 4)
    t.fit()
    got = {"d2": norm(td.flat(t.states[0])), "p2": norm(four["train:" + str(to / "p2")]),
           "d1": norm(two["train:" + str(to / "d1")])}
    for name, workdir in (("d2", tmp_path / "d2"), ("p2", to / "p2"), ("d1", to / "d1")):
        assert got[name]["step"] == straight["step"] == 4
        assert got[name]["opt_state/0/count"] == 4  # Adam's step count went on from 2
        td.assert_close(got[name], straight, 1e-4, 1e-5)
        rows = [json.loads(r)["step"] for r in (workdir / "metrics.jsonl").read_text().splitlines()]
        assert rows == [1, 2, 3, 4], (name, rows)


def test_a_sweep_resumes_with_its_members_on_other_devices(saved, tmp_path):
    """A K = 4 sweep stopped at step 2 on 2 devices (two members each) resumes on 1 device and ends
    where the sweep that ran straight on 1 device ends."""
    from lpc_jax.training import sweep

    tmp, _ = saved
    config = dataclasses.replace(td.CONFIG, num_train_steps=4)
    kw = dict(model=td.tiny_model(), train_images=td.images(), test_images=td.images()[:0], return_params=True)
    _, want = sweep.run_sweep(config, td.SWEEP_STEP_SIZES[4], [0.5], str(tmp_path / "straight"), **kw)
    workdir = tmp_path / "moved"
    shutil.copytree(tmp / "sweep", workdir)
    assert json.loads((workdir / "sweep_results.json").read_text())["steps"] == 2
    summary, got = sweep.run_sweep(config, td.SWEEP_STEP_SIZES[4], [0.5], str(workdir), **kw)
    assert summary["steps"] == 4
    for g, w in zip(got, want):
        td.assert_close(td.flat(g), td.flat(w), 1e-4, 1e-5)


def test_a_model_mismatch_names_the_arrays_and_deletes_nothing(saved, tmp_path):
    """config.json no longer describes the saved networks: the message names the arrays, not corruption."""
    tmp, _ = saved
    workdir = tmp_path / "other"
    shutil.copytree(tmp / "real_d2", workdir)
    with open(workdir / "config.json") as f:
        config = json.load(f)
    config["latent_dim"] = 16  # config.json no longer describes the saved networks
    (workdir / "config.json").write_text(json.dumps(config))
    before = sorted(os.listdir(workdir / "checkpoints" / "5"))
    with pytest.raises(checkpoints.CheckpointError) as excinfo:
        restore.load_run(str(workdir))
    msg = str(excinfo.value)
    assert f"checkpoint {workdir}/checkpoints/5 cannot be restored" in msg, msg
    assert "another model or config" in msg and "saved (8," in msg and "expected (16," in msg, msg
    assert "Nothing was deleted" in msg and "corrupt" not in msg, msg
    assert sorted(os.listdir(workdir / "checkpoints" / "5")) == before


# Orbax's failed async reads leave asyncio tasks whose exceptions nobody retrieves
# ("Event loop is closed"); collect them here, not in a later test (as test_train does).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", ["missing_metadata", "missing_data", "truncated_data"])
def test_a_damaged_file_is_named(saved, tmp_path, damage):
    tmp, runs = saved
    workdir = tmp_path / "damaged"
    shutil.copytree(tmp / "d2", workdir)
    item = workdir / "checkpoints" / "2" / "default"
    if damage == "missing_metadata":
        os.remove(item / "_METADATA")
        named = str(item / "_METADATA")
    else:
        data = sorted((item / "ocdbt.process_0" / "d").iterdir())
        for path in data:
            if damage == "missing_data":
                os.remove(path)
            else:
                os.truncate(path, 16)
        named = "is missing, truncated or unreadable"
    with pytest.raises(checkpoints.CheckpointError) as excinfo:
        with checkpoints.Checkpointer(str(workdir)) as ckpt:
            ckpt.restore()
    msg = str(excinfo.value)
    assert f"{workdir}/checkpoints/2 cannot be restored" in msg and named in msg, msg
    if damage != "missing_metadata":  # the data file tensorstore names, else the step's directory
        assert any(str(path) in msg for path in data) or f"a data file under {workdir}/checkpoints/2" in msg, msg
    assert "corrupt" not in msg, msg
    assert "Nothing was deleted" in msg, msg
    del excinfo
    gc.collect()
