"""Fault injection on real Fashion-MNIST runs through the launchers (slow).

* ``kill -9`` at >= 5 seeded random moments (while starting, between steps, and
  while orbax writes a checkpoint), each followed by a rerun of the same command,
  until the run completes. The result must equal an uninterrupted run's bitwise:
  the final checkpoint's arrays, ``metrics.jsonl`` / ``sweep_metrics.jsonl`` and
  ``summary.json`` / ``sweep_results.json``, every field compared exactly except
  the timing fields (``wall_s``, ``examples_per_s``, ``train_wall_s_this_run``,
  ``train_wall_s``), which measure the machine, and the paths of written files,
  which name the run directory.
* A real full disk: the run's workdir on a 12 MB tmpfs (as root only; skipped
  otherwise) fails at its third checkpoint with one clear message and exit
  status 1, keeps its earlier checkpoints and resumes on a larger disk to the
  uninterrupted result.

Every run shares one persistent compilation cache, so only the first compiles.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import chex
import numpy as np
import pytest

from lpc_jax.data import sources
from lpc_jax.runtime import checkpoints

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 16
FLAGS = [f"--num_train_steps={STEPS}", "--max_train_examples=256", "--batch_size=16", "--num_steps=2",
         "--eval_examples=64", "--eval_samples=0", "--fd_every=0", "--checkpoint_every=2", "--log_every=1",
         "--prior_init_batches=1", "--keep_checkpoints=2"]
SWEEP_FLAGS = ["--step_sizes=0.01,0.03", "--decays=0.99", "--metric=elbo"]
TIMING = {"wall_s", "examples_per_s", "train_wall_s_this_run", "train_wall_s"}
PATHS = {"samples_png", "plot_png"}
KILLS = 6  # >= 5 kills that land


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    if not os.path.isdir(sources.DEFAULT_IDX_DIR):
        pytest.skip("needs the Fashion-MNIST IDX files")
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("xla_cache")),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PLATFORMS="cpu")
    return env


def command(module, workdir, extra=()):
    return [sys.executable, "-m", module, f"--workdir={workdir}", *FLAGS, *extra]


def run_to_end(cmd, env):
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def _log_lines(path):
    try:
        with open(path) as f:
            return f.read().count("\n")
    except FileNotFoundError:
        return 0


def _saving(ckpt_dir):
    try:
        return any(checkpoints.TMP_SUFFIX in name for name in os.listdir(ckpt_dir))
    except FileNotFoundError:
        return False


def run_with_kills(cmd, workdir, log_name, env, seed):
    """Reruns ``cmd`` after each of KILLS kill -9s at seeded random moments, then once to the end.

    Returns the list of (moment, what happened) of the kills.
    """
    rng = np.random.default_rng(seed)
    # Moments: one while starting up, two while orbax writes a checkpoint, the rest
    # a random time after a random logged step.
    plan = ["startup", "saving", "saving"] + ["after_step"] * (KILLS - 3)
    rng.shuffle(plan)
    log, ckpt_dir, kills = os.path.join(workdir, log_name), os.path.join(workdir, "checkpoints"), []
    for moment in plan:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        t0, target = time.time(), _log_lines(log) + int(rng.integers(1, 4))
        delay = float(rng.uniform(0, 0.3)) if moment == "after_step" else float(rng.uniform(0.5, 4.0))
        fired, clear_seen = None, False  # a save's temporary, once the last kill's leftover was cleaned
        while proc.poll() is None and time.time() < t0 + 600:
            if moment == "startup" and time.time() > t0 + delay:
                fired = f"{delay:.2f} s after the start"
            elif moment == "saving" and (saving := _saving(ckpt_dir)) and clear_seen:
                fired = "while a checkpoint was being written"
            elif moment == "saving" and not saving:
                clear_seen = True
            elif moment == "after_step" and _log_lines(log) >= target:
                time.sleep(delay)
                fired = f"{delay:.2f} s after logged row {target}"
            if fired:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.001 if moment == "saving" else 0.01)
        proc.wait()
        stderr = proc.stderr.read().decode()
        proc.stderr.close()
        if fired and proc.returncode == -signal.SIGKILL:
            kills.append((moment, fired, _log_lines(log)))
        else:  # finished (or failed) before the moment came
            assert proc.returncode == 0, stderr[-3000:]
            break
    run_to_end(cmd, env)
    return kills


def _strip(row: dict) -> dict:
    return {k: (os.path.basename(v) if k in PATHS else v) for k, v in row.items() if k not in TIMING}


def jsonl(path):
    with open(path) as f:
        return [_strip(json.loads(line)) for line in f]


def final_arrays(workdir, item):
    """The newest checkpoint's arrays (and a sweep's record), restored without a template onto this
    process's one device: the launchers trained on one device per core."""
    with checkpoints.Checkpointer(workdir) as ckpt:
        assert ckpt.latest_step() == STEPS
        return ckpt.restore(with_meta=item == "state")


def assert_same_run(got, want, log_name, result_name, item):
    chex.assert_trees_all_equal(final_arrays(got, item), final_arrays(want, item))  # bitwise
    got_rows, want_rows = jsonl(os.path.join(got, log_name)), jsonl(os.path.join(want, log_name))
    assert got_rows == want_rows  # every step once, same values
    with open(os.path.join(got, result_name)) as f, open(os.path.join(want, result_name)) as g:
        assert _strip(json.load(f)) == _strip(json.load(g))
    assert not any(checkpoints.TMP_SUFFIX in n for n in os.listdir(os.path.join(got, "checkpoints")))


@pytest.fixture(scope="module")
def reference(env, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("reference") / "run")
    run_to_end(command("experiments.fashion_mnist", workdir), env)
    return workdir


def test_kill_9_at_random_moments_then_rerun_equals_an_uninterrupted_run(env, reference, tmp_path):
    workdir = str(tmp_path / "run")
    kills = run_with_kills(command("experiments.fashion_mnist", workdir), workdir, "metrics.jsonl", env, seed=0)
    print("kills:", kills)
    assert len(kills) >= 5 and any(m == "saving" for m, _, _ in kills), kills
    assert_same_run(workdir, reference, "metrics.jsonl", "summary.json", "default")


def test_evaluate_reads_a_run_trained_on_other_devices(env, reference, tmp_path):
    """README's evaluate command after command 1: the run trained on one device per core, evaluate
    runs in a process with one device."""
    workdir = str(tmp_path / "run")
    shutil.copytree(reference, workdir)
    out = run_to_end([sys.executable, "-m", "experiments.evaluate", f"--workdir={workdir}", "--num_samples=200",
                      "--iwae_examples=2", "--iwae_samples=10"],
                     {**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"})
    with open(os.path.join(workdir, "eval.json")) as f:
        result = json.load(f)
    assert result["workdir"] == os.path.abspath(workdir), result
    assert f"step {STEPS}" in out.stdout, out.stdout[-2000:]


def test_kill_9_a_sweep_at_random_moments_then_rerun_equals_an_uninterrupted_sweep(env, tmp_path):
    want, got = str(tmp_path / "reference"), str(tmp_path / "run")
    run_to_end(command("experiments.sweep", want, SWEEP_FLAGS), env)
    kills = run_with_kills(command("experiments.sweep", got, SWEEP_FLAGS), got, "sweep_metrics.jsonl", env,
                           seed=1)
    print("kills:", kills)
    assert len(kills) >= 5 and any(m == "saving" for m, _, _ in kills), kills
    assert_same_run(got, want, "sweep_metrics.jsonl", "sweep_results.json", "state")


@pytest.fixture
def small_disk(tmp_path):
    """A 12 MB tmpfs (two of this run's 5.6 MB checkpoints fit, a third does not)."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a size-limited tmpfs needs root")
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mount_point)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {out.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_real_full_disk_fails_clearly_keeps_checkpoints_and_resumes(env, reference, small_disk, tmp_path):
    workdir = str(small_disk / "run")
    out = subprocess.run(command("experiments.fashion_mnist", workdir), cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 1, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    ckpt_dir = os.path.join(workdir, "checkpoints")
    msg = errors[0]
    assert f"could not save the checkpoint of step 6 in {ckpt_dir}: no space left on device" in msg, msg
    assert "The last good checkpoint, step 4, is kept" in msg and "same --workdir" in msg, msg
    assert sorted(os.listdir(ckpt_dir)) == ["2", "4"]  # nothing partial left, nothing good deleted

    moved = str(tmp_path / "moved")  # "move the run to a larger disk", rerun there
    shutil.copytree(workdir, moved)
    run_to_end(command("experiments.fashion_mnist", moved), env)
    assert_same_run(moved, reference, "metrics.jsonl", "summary.json", "default")


def test_real_orbax_disk_full_error_is_mapped_and_cleaned(small_disk, monkeypatch):
    # Past the free-space check (patched away), orbax itself hits ENOSPC mid-write.
    monkeypatch.setattr(checkpoints, "free_bytes", lambda directory: 1 << 40)
    state = {"w": np.random.default_rng(0).integers(0, 256, (5, 1 << 20), dtype=np.uint8)}  # 5 MiB, incompressible
    with checkpoints.Checkpointer(str(small_disk), max_to_keep=3) as ckpt:
        ckpt.save(1, state)
        with pytest.raises(checkpoints.CheckpointSaveError) as excinfo:
            for step in range(2, 5):
                ckpt.save(step, state)
    assert excinfo.value.disk_full and excinfo.value.last_good == excinfo.value.step - 1
    assert "no space left on device" in str(excinfo.value)
    names = sorted(os.listdir(small_disk / "checkpoints"))
    assert names == [str(s) for s in range(1, excinfo.value.step)], names  # no temporary left
    with checkpoints.Checkpointer(str(small_disk)) as ckpt:
        np.testing.assert_array_equal(ckpt.restore(state)["w"], state["w"])
