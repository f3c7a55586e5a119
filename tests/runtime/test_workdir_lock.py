"""A run directory nothing can corrupt: the workdir lock, full disks, retention, broken run state.

Tiny sweeps (MLP networks on 6x6x1 images, 2 members, batch 3, T = 2, 6 SGD
steps, a checkpoint every 2) go through the same loop as every run
(:class:`lpc_jax.training.loop.Trainer`). Other processes are real subprocesses: a lock
holder, the launchers.
"""

import dataclasses
import errno
import gc
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap

import chex
import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from lpc_jax.model import networks
from lpc_jax.runtime import checkpoints, workdir_lock
from lpc_jax.sampling import langevin
from lpc_jax.training import loop, sweep, train
from lpc_jax.training.config import Config
from tests import tiny_model as tiny

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = Config(num_steps=2, batch_size=3, latent_dim=tiny.LATENT, prior_init_batches=1, num_train_steps=6,
                log_every=1, checkpoint_every=2, learning_rate=1e-2, eval_examples=3)
GRID = ([0.01, 0.03], ["off"])
IMAGES = np.asarray(jax.random.randint(jax.random.key(5), (12, *tiny.SHAPE), 0, 256), np.uint8)
TIMING = ("examples_per_s", "wall_s", "train_wall_s")


@pytest.fixture(scope="module")
def model():
    return tiny.tiny_model(optax.adam(CONFIG.learning_rate))


def run_sweep(model, workdir, config=CONFIG, **kw):
    return sweep.run_sweep(config, *GRID, str(workdir), model=model, train_images=IMAGES,
                           test_images=IMAGES[:3], return_params=True, **kw)


@pytest.fixture(scope="module")
def straight(model, tmp_path_factory):
    """An uninterrupted sweep: the reference."""
    workdir = tmp_path_factory.mktemp("straight")
    summary, params = run_sweep(model, workdir)
    return workdir, summary, params


def snapshot(directory) -> dict:
    """{relative path: bytes} of every file under ``directory``, except the (empty when
    released) lock files, which the lock creates and keeps by design."""
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            if name.startswith(".run.lock") and os.path.getsize(os.path.join(root, name)) == 0:
                continue
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = f.read()
    return out


def rows(workdir) -> list[dict]:
    """sweep_metrics.jsonl without its timing fields."""
    with open(os.path.join(workdir, "sweep_metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in f]


def steps(workdir) -> list[int]:
    return sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())


def assert_same_as(workdir, summary, params, straight):
    want_dir, want, want_params = straight
    chex.assert_trees_all_equal(params, want_params)  # bitwise
    assert summary["members"] == want["members"]
    assert rows(workdir) == rows(want_dir)  # every step logged once, same values


@pytest.fixture
def half(model, tmp_path):
    """A sweep stopped after step 4 (checkpoints 2 and 4): the run to finish."""
    run_sweep(model, tmp_path, dataclasses.replace(CONFIG, num_train_steps=4))
    return tmp_path


# --------------------------------------------------------------------------- #
# The lock
# --------------------------------------------------------------------------- #


HOLDER = textwrap.dedent("""
    import sys, time
    from lpc_jax.runtime import workdir_lock
    with workdir_lock.lock(sys.argv[1], sys.argv[2]):
        print("locked", flush=True)
        time.sleep(600)
""")


@pytest.fixture
def holder(tmp_path):
    """Starts another process holding the run lock of a directory; yields (directory, Popen)."""
    procs = []

    def start(directory, purpose="train"):
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(directory), purpose], cwd=REPO,
                                stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "locked"
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def test_second_run_fails_at_once_naming_the_holder(model, holder, tmp_path):
    proc = holder(tmp_path, "train")
    with pytest.raises(workdir_lock.WorkdirLockedError) as excinfo:
        run_sweep(model, tmp_path)
    msg = str(excinfo.value)
    assert f"pid {proc.pid} on host {socket.gethostname()}" in msg and "train run" in msg, msg
    assert str(tmp_path) in msg and "started " in msg and "--workdir" in msg, msg
    assert excinfo.value.holder["pid"] == proc.pid
    assert sorted(os.listdir(tmp_path)) == [".run.lock"]  # nothing written, nothing loaded into it

    # The training loop itself takes the lock too (library callers without a launcher).
    run = loop.setup(CONFIG, str(tmp_path), model=model, train_images=IMAGES, test_images=IMAGES[:0])
    group = loop.Group((0,), lambda *args: pytest.fail("trained"), jax.random.key(0), langevin.hparams(0.1, 0.9))
    trainer = loop.Trainer(run, [group], [None], [loop.Member({}, loop.run_keys(0))], log_file="log.jsonl",
                           config_file=("c.json", "{}"))
    with pytest.raises(workdir_lock.WorkdirLockedError, match=f"pid {proc.pid}"):
        trainer.fit()
    assert sorted(os.listdir(tmp_path)) == [".run.lock"]


def test_lock_is_reentrant_and_leaves_no_holder_behind(tmp_path):
    with workdir_lock.lock(str(tmp_path), "train") as record:
        assert record["pid"] == os.getpid() and record["purpose"] == "train"
        assert workdir_lock.holder(str(tmp_path)) == record
        with workdir_lock.lock(str(tmp_path / "."), "sweep") as inner:  # same file: shared, not a deadlock
            assert inner is record
        assert workdir_lock.holder(str(tmp_path)) == record  # still held by the outer block
        with workdir_lock.lock(str(tmp_path), "evaluate", name="eval"):  # another lock of the directory
            pass
    assert workdir_lock.holder(str(tmp_path)) == {}
    with open(workdir_lock.lock_file(str(tmp_path))) as f:
        assert f.read() == ""  # released cleanly: no stale record
    with pytest.raises(FileNotFoundError, match="does not exist"):
        with workdir_lock.lock(str(tmp_path / "missing"), "evaluate", create=False):
            pass
    assert not (tmp_path / "missing").exists()


def test_stale_lock_of_a_killed_holder_is_taken_over_with_a_warning(holder, tmp_path, monkeypatch):
    proc = holder(tmp_path, "sweep")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    warnings = []
    monkeypatch.setattr(workdir_lock.logging, "warning", lambda fmt, *args: warnings.append(fmt % args))
    with workdir_lock.lock(str(tmp_path), "train") as record:
        assert record["pid"] == os.getpid()
    assert len(warnings) == 1 and "stale lock" in warnings[0], warnings
    assert f"pid {proc.pid} on host {socket.gethostname()}" in warnings[0] and "sweep run" in warnings[0]


def _launch(module, workdir, *flags):
    return subprocess.run([sys.executable, "-m", module, f"--workdir={workdir}", *flags], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # starts the launchers as processes; the lock itself is tested above
def test_launchers_refuse_a_workdir_in_use(straight, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(straight[0], workdir)
    before = snapshot(workdir)
    with workdir_lock.lock(str(workdir), "train"):  # this test process is the first run
        before[".run.lock"] = snapshot(workdir)[".run.lock"]
        for module in ("experiments.fashion_mnist", "experiments.sweep"):
            out = _launch(module, workdir, "--num_train_steps=1")
            assert out.returncode == 1, (module, out.stderr[-2000:])
            errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
            assert len(errors) == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
            assert f"is in use by another train run, pid {os.getpid()} on host {socket.gethostname()}" in errors[0]
        # Evaluation reads while training writes: the run lock does not stop it (this
        # directory holds a sweep, not a single run, hence the error after the lock).
        out = _launch("experiments.evaluate", workdir)
        assert out.returncode == 1 and "config.json not found" in out.stderr, out.stderr[-2000:]
        with workdir_lock.lock(str(workdir), "evaluate", name="eval"):  # but one evaluation at a time
            out = _launch("experiments.evaluate", workdir)
            assert out.returncode == 1, out.stderr[-2000:]
            assert f"in use by another evaluate run, pid {os.getpid()}" in out.stderr, out.stderr[-2000:]
        assert snapshot(workdir) == {**before, ".eval.lock": b""}  # the first run is unharmed


# --------------------------------------------------------------------------- #
# Disk full
# --------------------------------------------------------------------------- #


def _assert_disk_full_message(msg, directory, step, last_good):
    assert f"could not save the checkpoint of step {step} in {directory}" in msg, msg
    assert "no space left on device" in msg, msg
    assert (f"last good checkpoint, step {last_good}, is kept" if last_good else "No earlier checkpoint") in msg
    assert "rerun the same command with the same --workdir" in msg and "--keep_checkpoints" in msg, msg


def test_disk_full_during_a_save_keeps_the_last_checkpoint_and_resumes(model, straight, tmp_path, monkeypatch):
    real_save = ocp.CheckpointManager.save

    def save(self, step, *args, **kwargs):
        if step == 4:  # orbax has begun writing step 4 when the disk fills up
            partial = os.path.join(str(self.directory), f"4{checkpoints.TMP_SUFFIX}", "state")
            os.makedirs(partial)
            with open(os.path.join(partial, "half_written"), "wb") as f:
                f.write(b"\0" * 100)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", save)
    with pytest.raises(checkpoints.CheckpointSaveError) as excinfo:
        run_sweep(model, tmp_path)
    ckpt_dir = os.path.join(str(tmp_path), "checkpoints")
    _assert_disk_full_message(str(excinfo.value), ckpt_dir, 4, 2)
    assert excinfo.value.disk_full and excinfo.value.step == 4 and excinfo.value.last_good == 2
    assert sorted(os.listdir(ckpt_dir)) == ["2"]  # the temporary is gone, step 2 kept
    kept = snapshot(ckpt_dir)

    monkeypatch.setattr(ocp.CheckpointManager, "save", real_save)
    with checkpoints.Checkpointer(str(tmp_path)) as ckpt:
        assert ckpt.latest_step() == 2
    assert snapshot(ckpt_dir) == kept  # a reader changes nothing
    summary, params = run_sweep(model, tmp_path)  # space freed: rerun resumes from step 2
    assert_same_as(tmp_path, summary, params, straight)


def test_a_save_that_cannot_fit_is_refused_before_writing(model, straight, half, monkeypatch):
    ckpt_dir = os.path.join(str(half), "checkpoints")
    kept = snapshot(ckpt_dir)
    monkeypatch.setattr(checkpoints, "free_bytes", lambda directory: 1000)  # less than step 4 took
    real_save = ocp.CheckpointManager.save
    monkeypatch.setattr(ocp.CheckpointManager, "save", lambda *a, **k: pytest.fail("orbax was asked to write"))
    with pytest.raises(checkpoints.CheckpointSaveError) as excinfo:
        run_sweep(model, half)
    _assert_disk_full_message(str(excinfo.value), ckpt_dir, 6, 4)
    assert "0.0 MiB free, step 4 took" in str(excinfo.value)
    assert snapshot(ckpt_dir) == kept
    monkeypatch.undo()
    assert ocp.CheckpointManager.save is real_save
    summary, params = run_sweep(model, half)
    assert_same_as(half, summary, params, straight)


def test_orbax_disk_full_errors_are_recognised():
    # What orbax raised on a full 12 MB tmpfs (tensorstore's ENOSPC), and Python's own.
    orbax_error = ValueError('RESOURCE_EXHAUSTED: Error writing "params.decoder.kernel/0.0.0.0" in OCDBT database '
                             'at local file "/x/checkpoints/6.orbax-checkpoint-tmp/": Failed to write 1313611 bytes '
                             "to file 16: No space left on device [os_error_code='28']")
    assert checkpoints.is_disk_full(orbax_error)
    assert checkpoints.is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    try:
        try:
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
        except OSError as e:
            raise RuntimeError("save failed") from e
    except RuntimeError as wrapped:
        assert checkpoints.is_disk_full(wrapped)
    assert not checkpoints.is_disk_full(ValueError("shape mismatch"))
    assert not checkpoints.is_disk_full(OSError(errno.EACCES, "Permission denied"))


def test_launcher_reports_a_save_error_in_one_line(monkeypatch, capsys):
    from experiments import launch

    error = checkpoints.CheckpointSaveError("could not save ...", step=4, last_good=2, disk_full=True)
    assert isinstance(error, launch.RUN_ERRORS)
    with pytest.raises(SystemExit) as excinfo:
        launch.exit_with_error(error)
    assert excinfo.value.code == 1 and capsys.readouterr().err == "error: could not save ...\n"


# --------------------------------------------------------------------------- #
# Retention and leftovers
# --------------------------------------------------------------------------- #


def test_keep_checkpoints_is_orbax_retention(model, straight, tmp_path):
    assert Config().keep_checkpoints == 3
    with pytest.raises(ValueError, match="keep_checkpoints=0 is invalid"):
        dataclasses.replace(CONFIG, keep_checkpoints=0).validate()
    config = dataclasses.replace(CONFIG, checkpoint_every=1, keep_checkpoints=2)
    summary, params = run_sweep(model, tmp_path, config)
    assert steps(tmp_path) == [5, 6]
    assert_same_as(tmp_path, summary, params, straight)


def test_leftovers_of_a_killed_run_are_cleaned_and_resume_is_exact(model, straight, half):
    # A kill during step 6's save, and one while a log row was being written.
    leftover = half / "checkpoints" / f"6{checkpoints.TMP_SUFFIX}"
    os.makedirs(leftover / "state")
    (leftover / "state" / "manifest.ocdbt").write_bytes(b"\0" * 10)
    with open(half / "sweep_metrics.jsonl", "a") as f:
        f.write('{"step": 5, "member": 0, "elb')
    with checkpoints.Checkpointer(str(half)) as ckpt:  # a reader (evaluation) leaves it alone
        assert ckpt.latest_step() == 4
    assert leftover.exists()
    summary, params = run_sweep(model, half)
    assert not leftover.exists() and steps(half) == [2, 4, 6]
    assert_same_as(half, summary, params, straight)


def test_a_reader_creates_nothing(tmp_path):
    with checkpoints.Checkpointer(str(tmp_path)) as ckpt:
        assert ckpt.latest_step() is None
        with pytest.raises(checkpoints.CheckpointError, match="read-only"):
            ckpt.save(1, {"x": np.zeros(3)})
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------- #
# Broken run state: a clear error, nothing deleted
# --------------------------------------------------------------------------- #


def test_truncated_sweep_config_is_a_clear_error(model, half):
    path = half / "sweep_config.json"
    path.write_bytes(path.read_bytes()[:40])
    before = snapshot(half)
    with pytest.raises(ValueError, match="sweep_config.json is truncated or not a sweep config") as excinfo:
        run_sweep(model, half)
    assert "Nothing was changed" in str(excinfo.value) and "--workdir" in str(excinfo.value)
    assert snapshot(half) == before


def test_truncated_run_config_is_a_clear_error(tmp_path):
    # A single run on the real IDX data (a few images): the config is checked before any compile.
    config = Config(max_train_examples=64, eval_examples=16, num_train_steps=2)
    (tmp_path / "config.json").write_text(config.to_json()[:50])
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match="config.json is truncated or not a run config") as excinfo:
        train.train_and_evaluate(config, str(tmp_path))
    assert str(tmp_path / "config.json") in str(excinfo.value) and "Nothing was changed" in str(excinfo.value)
    assert snapshot(tmp_path) == before


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("missing", ["state/manifest.ocdbt", "state/_METADATA", "meta/metadata", "state/d"])
def test_checkpoint_with_a_missing_file_is_a_clear_error(model, half, missing):
    target = half / "checkpoints" / "4" / missing
    if target.is_dir():  # the array data
        for name in os.listdir(target):
            os.remove(target / name)
    else:
        os.remove(target)
    before = snapshot(half)
    with pytest.raises(checkpoints.CheckpointError) as excinfo:
        run_sweep(model, half)
    msg = str(excinfo.value)
    assert f"{half / 'checkpoints'}/4 cannot be restored" in msg and "Nothing was deleted" in msg, msg
    assert snapshot(half) == before
    del excinfo
    gc.collect()  # orbax's failed async reads: their unretrieved exceptions surface here, not in a later test


@pytest.mark.parametrize("missing", ["commit_success.txt", "_CHECKPOINT_METADATA"])
def test_checkpoint_missing_only_bookkeeping_still_resumes_exactly(model, straight, half, missing):
    # Orbax's own records beside the arrays: restoring does not need them.
    os.remove(half / "checkpoints" / "4" / missing)
    summary, params = run_sweep(model, half)
    assert steps(half) == [2, 4, 6]  # nothing deleted
    assert_same_as(half, summary, params, straight)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_checkpoint_of_another_model_is_a_clear_error(half):
    other = tiny.tiny_model(optax.adam(CONFIG.learning_rate))
    other = other._replace(decoder=WideDecoder(), log_joint=networks.make_log_joint(WideDecoder()))
    before = snapshot(half)
    with pytest.raises(checkpoints.CheckpointError, match="written by another model or config") as excinfo:
        run_sweep(other, half)
    msg = str(excinfo.value)
    assert "Dense_0/kernel: saved (2, 5, 16) float32, expected (2, 5, 32) float32" in msg, msg  # what differs
    assert "Nothing was deleted" in msg and "corrupt" not in msg, msg
    assert snapshot(half) == before
    del excinfo
    gc.collect()


class WideDecoder(tiny.TinyDecoder):
    """The tiny decoder with 32 hidden units instead of 16: another model, same config."""

    @tiny.nn.compact
    def __call__(self, z):
        h = tiny.nn.silu(tiny.nn.Dense(32)(z))
        mean = tiny.nn.Dense(36)(h).reshape(z.shape[0], *tiny.SHAPE)
        return mean, self.param("log_scale", tiny.nn.initializers.constant(-1.0), (1,)).reshape(1, 1, 1, 1)

