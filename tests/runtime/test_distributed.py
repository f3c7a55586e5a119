"""lpc_jax.runtime.distributed: data-parallel runs, two-process runs and sweeps across devices equal one device.

Forced CPU devices need ``XLA_FLAGS=--xla_force_host_platform_device_count=N``
before jax is imported, so those runs are subprocesses (``python -c _WORKER``);
two processes talk through ``jax.distributed`` with gloo CPU collectives. The
reference runs are in this process (one device). Tiny MLP networks (6x6x1
images, batch 8, latent 5, T = 3) keep every compile to about a second.
"""

import functools
import json
import os
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lpc_jax.model import steps
from lpc_jax.model.state import create_train_state
from lpc_jax.runtime import distributed
from lpc_jax.sampling import langevin
from lpc_jax.training import build, loop, sweep, train
from lpc_jax.training.config import Config, ConfigError
from tests import tiny_model as tiny

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = Config(batch_size=8, num_steps=3, latent_dim=tiny.LATENT, prior_init_batches=1, num_train_steps=4,
                log_every=1, checkpoint_every=2, learning_rate=1e-2, data_threads=0)
SWEEP_STEP_SIZES = {4: [0.01, 0.03, 0.1, 0.3], 6: [0.01, 0.02, 0.03, 0.1, 0.2, 0.3]}  # K -> grid (decay 0.5)

# One worker, three jobs: {"train": [[workdir, num_train_steps], ...]} runs train.make_group's
# data-parallel Trainer in order (a second entry with the same workdir resumes it),
# {"sweeps": [K, ...]} runs sweep.run_sweep per K; {"bad_batch": B} tries a batch the devices cannot split;
# {"chains": true} runs chain_cases() and sharded_draws().
_WORKER = r"""
import json, os, sys
import jax
args = json.loads(sys.argv[1])
if args["processes"] > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
from lpc_jax.runtime import distributed
from lpc_jax.training import loop, sweep, train
from tests.runtime import test_distributed as t
distributed.initialize(args.get("coordinator", ""), args["processes"], args["process_id"], 60)
out = {"devices": jax.device_count(), "processes": jax.process_count()}
for workdir, steps in args.get("train", []):
    trainer = t.trainer(workdir, steps)
    trainer.fit()
    out[workdir] = t.flat(trainer.member_params(0))
    x = trainer.groups[0].placement.put_batch(t.images()[: 8 // jax.process_count()])
    out["batch_devices"], out["local_rows"] = len(x.sharding.device_set), [s.data.shape[0] for s in x.addressable_shards]
for k in args.get("sweeps", []):
    summary, params = sweep.run_sweep(t.CONFIG, t.SWEEP_STEP_SIZES[k], [0.5], os.path.join(args["workdir"], str(k)),
                                      model=t.tiny_model(), train_images=t.images(), test_images=t.images()[:0],
                                      return_params=True)
    out[f"sweep_{k}"] = {"params": [t.flat(p) for p in params], "mode": summary["mode"],
                         "member_devices": distributed.member_devices(k)}
if args.get("chains"):
    out["chains"], out["draws"], out["bad_meshes"] = t.chain_cases(), t.sharded_draws(), t.bad_meshes()
if "bad_batch" in args:
    try:
        distributed.data_parallel(args["bad_batch"])
        out["bad_batch"] = "accepted"
    except ValueError as e:
        out["bad_batch"] = str(e)
if jax.process_index() == 0:
    print("RESULT " + json.dumps(out))
"""


def tiny_model():
    return tiny.tiny_model(optax.adam(CONFIG.learning_rate))


def images(n=32):
    return np.random.default_rng(0).integers(0, 256, (n, *tiny.SHAPE), dtype=np.uint8)


def flat(tree) -> dict:
    """{path: nested list} of a pytree of arrays (JSON-able)."""
    return {jax.tree_util.keystr(p): np.asarray(a).tolist() for p, a in jax.tree_util.tree_leaves_with_path(tree)}


def trainer(workdir: str, steps: int) -> loop.Trainer:
    """train.py's single run (data-parallel group) of the tiny model, ``steps`` SGD steps."""
    import dataclasses

    config = dataclasses.replace(CONFIG, num_train_steps=steps)
    run = loop.setup(config, workdir, model=tiny_model(), train_images=images(), test_images=images()[:0])
    keys = loop.run_keys(config.seed)
    return loop.Trainer(run, [train.make_group(config, run.model, keys)],
                        [loop.init_state(keys.init, run.model, run.image_shape, config.latent_dim)],
                        [loop.Member({}, keys)], log_file="metrics.jsonl", config_file=("config.json", config.to_json()))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch(devices: int, processes: int = 1, timeout: int = 300, worker: str = _WORKER, **job) -> dict:
    """Runs ``worker`` (python source that prints ``RESULT <json>``) with ``job`` as its JSON
    argument, in ``processes`` subprocesses with ``devices`` forced CPU devices each."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO,
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
           # the session's compilation cache (conftest): a resumed run's step compiles once
           "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir or "",
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-c", worker, json.dumps(
                {**job, "processes": processes, "process_id": i, "coordinator": f"localhost:{port}" if processes > 1
                 else ""})], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(processes)]
    outs = [p.communicate(timeout=timeout) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    line = [ln for ln in outs[0][0].splitlines() if ln.startswith("RESULT ")]
    assert line, outs[0]
    return json.loads(line[0][len("RESULT "):])


def assert_close(got: dict, want: dict, rtol: float, atol: float):
    assert got.keys() == want.keys()
    for name in want:
        g, w = np.asarray(got[name], np.float64), np.asarray(want[name], np.float64)
        err, scale = np.max(np.abs(g - w)), np.max(np.abs(w))
        assert err <= atol + rtol * scale, f"{name}: max diff {err} (scale {scale})"


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    """The reference: the same run in this process, on its one device."""
    if jax.device_count() != 1:
        pytest.skip("the reference needs one device: run the suite without forced devices")
    t = trainer(str(tmp_path_factory.mktemp("one_device")), CONFIG.num_train_steps)
    t.fit()
    return flat(t.member_params(0))


# --------------------------------------------------------------------------- #
# Data parallel: 4 local devices, and 2 processes x 2 devices
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def four_devices(tmp_path_factory):
    """One process with 4 forced CPU devices: a data-parallel run, a bad batch, sweeps of K = 4 and 6."""
    tmp = tmp_path_factory.mktemp("four_devices")
    out = _launch(4, train=[[str(tmp / "dp"), CONFIG.num_train_steps]], bad_batch=6, sweeps=[4, 6],
                  workdir=str(tmp), chains=True)
    return tmp, out


def test_four_devices_equal_one(one_device, four_devices):
    tmp, out = four_devices
    assert out["devices"] == 4 and out["batch_devices"] == 4 and out["local_rows"] == [2] * 4  # split 4 ways
    # Same global batch and keys; only the gradient's summation order differs (all-reduce).
    assert_close(out[str(tmp / "dp")], one_device, 1e-4, 1e-5)
    assert "batch_size=6 is invalid" in out["bad_batch"] and "multiple of 4" in out["bad_batch"]
    rows = [json.loads(r) for r in (tmp / "dp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]


@pytest.mark.slow  # two real processes train; tests/runtime/test_topology.py moves runs between 1 and 2 processes by default
def test_two_processes_equal_one(one_device, tmp_path):
    straight = str(tmp_path / "straight")
    out = _launch(2, processes=2, train=[[straight, 4]])
    assert (out["devices"], out["processes"], out["batch_devices"]) == (4, 2, 4)
    assert out["local_rows"] == [2, 2]  # process 0 reads and holds 2 x 2 of the 8 rows
    assert_close(out[straight], one_device, 1e-4, 1e-5)
    rows = [json.loads(r)["step"] for r in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert rows == [1, 2, 3, 4]  # written once (process 0), not once per process
    assert sorted(os.listdir(tmp_path / "straight" / "checkpoints")) == ["2", "4"]


@pytest.mark.slow
def test_two_processes_resume_exactly(tmp_path):
    """A 2-process run stopped at step 2 and resumed from its orbax checkpoint ends bitwise
    where an uninterrupted 2-process run ends (~80 s on 2 loaded cores)."""
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    out = _launch(2, processes=2, train=[[straight, 4], [resumed, 2], [resumed, 4]])
    assert out[resumed] == out[straight]
    assert sorted(os.listdir(tmp_path / "resumed" / "checkpoints")) == ["2", "4"]


# --------------------------------------------------------------------------- #
# The data-parallel chain: shard_map, one all-reduce after the loop
# --------------------------------------------------------------------------- #


CHAIN_CASES = {"ula": {}, "ula_k2": {"theta_grad_every": 2}, "mala": {"sampler": "mala"},
               "underdamped": {"sampler": "underdamped"}, "ula_bf16": {"chain_dtype": "bfloat16"},
               "ula_encoder_metric": {"metric": "encoder"},
               "mala_encoder_metric": {"sampler": "mala", "metric": "encoder"}}


def loop_all_reduces(hlo: str) -> int:
    """All-reduces in compiled HLO text inside a while loop's body (or anything it calls)."""
    import re

    computations = dict(re.findall(r"^(?:ENTRY )?%(\S+) .*?\{\n(.*?)^\}", hlo, re.M | re.S))
    todo = re.findall(r"\bbody=%([\w.\-]+)", hlo)
    seen = set()
    while todo:
        name = todo.pop()
        if name not in seen and name in computations:
            seen.add(name)
            todo += re.findall(r"%([\w.\-]+)", computations[name])
    return sum(computations[name].count(" all-reduce(") for name in seen)


def chain_cases() -> dict:
    """In a process with several devices, per CHAIN_CASES entry: one LPC step on a batch
    sharded over all of them, the chain under shard_map (``mesh``) and partitioned by XLA
    (``mesh=None``): new params and Adam moments, metrics, and the all-reduces inside loops
    of each program."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = distributed.mesh()
    x = jax.device_put(jnp.asarray(images(8), jnp.float32) / 127.5 - 1.0, NamedSharding(mesh, P(distributed.AXIS)))
    state = create_train_state(jax.random.key(0), _MODEL, tiny.SHAPE, tiny.LATENT)
    key, hp = jax.random.key(3), langevin.hparams(0.1, 0.9, 1e-8)
    out = {}
    for name, kw in CHAIN_CASES.items():
        out[name] = {}
        for variant, step_mesh in (("shard_map", mesh), ("gspmd", None)):
            step = jax.jit(functools.partial(steps.lpc_train_step, model=_MODEL, num_steps=3, prior_init_batches=0,
                                             mesh=step_mesh, **kw))
            compiled = step.lower(state, x, key, hp).compile()
            new_state, metrics = compiled(state, x, key, hp)
            out[name][variant] = {"params": flat(new_state.params), "adam": flat(new_state.opt_state),
                                  "metrics": flat(metrics),
                                  "loop_all_reduces": loop_all_reduces(compiled.as_text())}
    return out


def sharded_draws() -> dict:
    """Under shard_map with ``axis_name``: each sampler's 5-step chain on a Gaussian target, and
    ``draw_rows`` itself, against the same unsharded: True where equal bit for bit."""
    from jax.sharding import PartitionSpec as P

    from lpc_jax.sampling import samplers

    mesh, rows = distributed.mesh(), P(distributed.AXIS)
    key, hp = jax.random.key(7), langevin.hparams(0.2, 0.9, 1e-8)
    z0 = jax.random.normal(jax.random.key(8), (8, 3))
    log_prob = lambda z: -0.5 * jnp.sum(z * z * jnp.array([1.0, 4.0, 0.25]), axis=-1)

    def chain(name, z0, axis_name=None):
        sampler = samplers.build(name, log_prob, friction=0.7, axis_name=axis_name)
        return langevin.sample_chain(key, sampler.kernel, sampler.init(z0), hp, 5)[0].z

    out = {}
    for name in ("ula", "mala", "underdamped"):
        sharded = jax.jit(jax.shard_map(functools.partial(chain, name, axis_name=distributed.AXIS), mesh=mesh,
                                        in_specs=rows, out_specs=rows))(z0)
        out[name] = bool(np.array_equal(sharded, jax.jit(functools.partial(chain, name))(z0)))
    draw = jax.shard_map(lambda k: langevin.draw_rows(jax.random.normal, k, (2, 3), axis_name=distributed.AXIS),
                         mesh=mesh, in_specs=P(), out_specs=rows)
    out["draw_rows"] = bool(np.array_equal(jax.jit(draw)(key), jax.random.normal(key, (8, 3))))
    return out


def bad_meshes() -> dict:
    """The errors of ``lpc_train_step`` given a mesh its batch cannot be split over: 6 rows on
    4 devices, and a 2-D mesh."""
    from jax.sharding import Mesh

    state = create_train_state(jax.random.key(0), _MODEL, tiny.SHAPE, tiny.LATENT)
    meshes = {"rows": (distributed.mesh(), 6), "axes": (Mesh(np.asarray(jax.devices()).reshape(2, -1), ("a", "b")), 8)}
    out = {}
    for name, (mesh, batch) in meshes.items():
        try:
            jax.eval_shape(functools.partial(steps.lpc_train_step, model=_MODEL, num_steps=2, mesh=mesh), state,
                           jnp.zeros((batch, *tiny.SHAPE)), jax.random.key(1), langevin.hparams(0.1))
            out[name] = "accepted"
        except ValueError as e:
            out[name] = str(e)
    return out


def test_sharded_chain_rejects_a_mesh_it_cannot_split_over(four_devices):
    errors = four_devices[1]["bad_meshes"]
    assert "batch of 6 rows cannot be split evenly over the mesh's 4 devices" in errors["rows"]
    assert "multiple of 4" in errors["rows"]
    assert "mesh has axes ('a', 'b')" in errors["axes"] and "1-D mesh" in errors["axes"]


@pytest.mark.parametrize("case", list(CHAIN_CASES))
def test_sharded_chain_equals_partitioned_chain_with_one_all_reduce(case, four_devices):
    """The chain under shard_map gives XLA's partitioned chain's step up to float32
    summation order, and all-reduces nothing inside its loop (XLA's does, every step)."""
    got = four_devices[1]["chains"][case]
    assert got["shard_map"]["loop_all_reduces"] == 0
    assert got["gspmd"]["loop_all_reduces"] > 0
    # bf16 decoder VJPs of 2-row shards round their sums (spacing 2^-7) unlike those of the whole batch
    rtol = 1e-2 if case.endswith("bf16") else 1e-4
    assert_close(got["shard_map"]["metrics"], got["gspmd"]["metrics"], rtol / 10, 1e-5)
    assert_close(got["shard_map"]["params"], got["gspmd"]["params"], rtol, 1e-5)
    assert_close(got["shard_map"]["adam"], got["gspmd"]["adam"], rtol, 1e-8)  # mu, nu: the gradient's scale


def test_sharded_chains_draw_the_unsharded_noise(four_devices):
    assert four_devices[1]["draws"] == {"ula": True, "mala": True, "underdamped": True, "draw_rows": True}


# --------------------------------------------------------------------------- #
# Sweeps: members on devices
# --------------------------------------------------------------------------- #


_MODEL = tiny_model()
_STEP = jax.jit(build.make_train_step(CONFIG, _MODEL))  # step size and decay are traced: one compile


def _separate_run(step_size: float, steps: int = CONFIG.num_train_steps) -> dict:
    """A single run of the tiny model with the sweep member's step size (decay 0.5), one device."""
    keys = loop.run_keys(CONFIG.seed)
    state = loop.init_state(keys.init, _MODEL, tiny.SHAPE, CONFIG.latent_dim)
    step, hp = _STEP, langevin.hparams(step_size, 0.5, CONFIG.eps)
    from lpc_jax.data import pipeline

    for i, x in pipeline.step_batches(images(), CONFIG.batch_size, CONFIG.seed, 0, steps):
        state, _ = step(state, jnp.asarray(x), jax.random.fold_in(keys.step, i), hp)
    return flat(state.params)


@pytest.mark.parametrize("k", [4, 6])
def test_sweep_members_on_devices_equal_separate_runs(k, four_devices):
    out = four_devices[1][f"sweep_{k}"]
    assert out["mode"] == "map"  # auto on CPU
    assert out["member_devices"] == {4: 4, 6: 3}[k]  # one member per device; two on each of 3
    assert len(out["params"]) == k
    for step_size, got in zip(SWEEP_STEP_SIZES[k], out["params"]):
        assert_close(got, _separate_run(step_size), 1e-6, 1e-7)


def test_auto_mode():
    assert sweep.resolve_mode("auto", "cpu") == "map"
    assert sweep.resolve_mode("auto", "gpu") == sweep.resolve_mode("auto", "tpu") == "vmap"
    assert sweep.resolve_mode("vmap", "cpu") == "vmap"
    with pytest.raises(ValueError, match="sweep mode 'pmap' is invalid"):
        sweep.resolve_mode("pmap")


# --------------------------------------------------------------------------- #
# Bad input: clear errors, no hang
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("address,n,pid,match", [
    ("localhost:1234", 2, 2, r"process_id=2 is invalid: it must lie in \[0, 2\)"),
    ("localhost:1234", 2, -1, r"process_id=-1 is invalid"),
    ("", 2, 0, "coordinator_address is empty but num_processes=2"),
    ("localhost", 2, 0, "coordinator_address='localhost' is invalid: expected host:port"),
    ("localhost:1234", 0, 0, "num_processes=0 is invalid"),
])
def test_process_args_are_checked(address, n, pid, match):
    with pytest.raises(ValueError, match=match):
        distributed.initialize(address, n, pid, timeout_s=1)
    assert not jax.distributed.is_initialized()


def test_config_checks_the_process_id():
    with pytest.raises(ConfigError, match=r"process_id=3 is invalid: must lie in \[0, 2\)"):
        Config(coordinator_address="h:1", num_processes=2, process_id=3).validate()
    with pytest.raises(ConfigError, match="coordinator_address='' is invalid"):
        Config(num_processes=2).validate()


def test_unreachable_coordinator_times_out_with_a_message():
    port = _free_port()  # nothing listens there
    t0 = time.perf_counter()
    with pytest.raises(distributed.CoordinatorUnreachableError, match=f"cannot reach the coordinator at "
                       f"localhost:{port} within 1 s.*--process_id=0"):
        distributed.initialize(f"localhost:{port}", 2, 1, timeout_s=1)
    assert time.perf_counter() - t0 < 10
    assert not jax.distributed.is_initialized()


def test_single_process_placement():
    p = distributed.data_parallel(8)
    x = p.put_batch(np.zeros((8, 2), np.float32))
    assert x.sharding == p.batch and x.shape == (8, 2) and (p.shard_index, p.shard_count) == (0, 1)
    assert distributed.member_devices(6, 4) == 3 and distributed.member_devices(7, 4) == 1
    assert distributed.member_devices(8, 4) == 4 and distributed.member_devices(2, 4) == 2


def test_set_cpu_devices_splits_the_cpu_before_the_backend_starts():
    code = ("import jax\nfrom lpc_jax.runtime import distributed\ndistributed.set_cpu_devices(3)\n"
            "print('DEVICES', jax.device_count())\n"
            "try:\n    distributed.set_cpu_devices(2)\nexcept RuntimeError as e:\n    print('LATE', 'before' in str(e))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**env, "JAX_PLATFORMS": "cpu"},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "DEVICES 3" in proc.stdout and "LATE True" in proc.stdout
    with pytest.raises(ValueError, match="cpu_devices=0 is invalid"):
        distributed.set_cpu_devices(0)


@pytest.mark.parametrize("requested,batch_size,num_processes,cores,expected", [
    (0, 64, 1, 2, 2),  # one per core
    (0, 63, 1, 2, 1),  # an odd batch cannot be split: the whole CPU as one device
    (0, 60, 1, 8, 6),  # the most devices <= cores that divide the batch
    (0, 64, 2, 4, 4),  # 32 rows per process, 4 cores each
    (0, 66, 4, 4, 1),  # 66 rows do not split over 4 processes: data_parallel will say so
    (0, None, 1, 5, 5),  # a sweep: all cores
    (3, 64, 1, 2, 3),  # asked for: as asked (data_parallel checks the batch)
])
def test_cpu_devices_for(requested, batch_size, num_processes, cores, expected):
    assert distributed.cpu_devices_for(requested, batch_size, num_processes, cores) == expected


def test_cpu_devices_for_rejects_a_negative_count():
    with pytest.raises(ValueError, match="cpu_devices=-1 is invalid"):
        distributed.cpu_devices_for(-1, 64)
