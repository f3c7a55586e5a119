"""Each dataset launcher trains on a directory in each file layout, with TensorFlow and TFDS unimportable."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from lpc_jax.data import sources
from tests.data import file_fixtures as fx

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = pytest.mark.skipif(not os.path.isdir(sources.DEFAULT_IDX_DIR),
                                reason="needs Debian's dataset-fashion-mnist (the fixtures' real pixels)")

# Block both imports: the files path must not need them.
_NO_TF = ("import runpy, sys; sys.modules['tensorflow'] = None; sys.modules['tensorflow_datasets'] = None; "
          "sys.argv[0] = {module!r}; runpy.run_module({module!r}, run_name='__main__')")
_TINY = ["--num_train_steps=2", "--batch_size=8", "--num_steps=1", "--eval_examples=8", "--eval_samples=0",
         "--fd_every=0", "--prior_init_batches=1", "--log_every=1", "--checkpoint_every=2", "--cpu_devices=1",
         "--data_threads=2"]


def _fixtures(root: str) -> dict[str, tuple[str, list[str]]]:
    """``{case: (launcher module, extra flags)}`` with the fixture of each written under ``root``."""
    images, labels = fx.fashion_mnist(40)
    fx.write_cifar10(os.path.join(root, "cifar"), images, labels, per_batch=4, num_test=8)
    fx.write_svhn(os.path.join(root, "svhn"), images[:24], labels[:24], num_train=16)
    fx.write_celeba(os.path.join(root, "celeba_zip"), images[:24], [0] * 16 + [1] * 2 + [2] * 6, layout="zip")
    fx.write_celeba(os.path.join(root, "kaggle"), images[:24], [0] * 16 + [1] * 2 + [2] * 6, layout="kaggle")
    fx.write_folder(os.path.join(root, "folder"), images)
    return {
        "cifar10": ("experiments.cifar10", [f"--data_dir={root}/cifar"]),
        "svhn": ("experiments.svhn", [f"--data_dir={root}/svhn", "--data_source=files"]),
        "celeba_zip_cached": ("experiments.celeba", [f"--data_dir={root}/celeba_zip", "--data_cache=auto"]),
        "celeba_kaggle": ("experiments.celeba", [f"--data_dir={root}/kaggle"]),
        "folder32": ("experiments.folder", [f"--data_dir={root}/folder", "--image_size=32"]),
    }


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("layouts"))
    return root, _fixtures(root)


def _launch(root: str, module: str, flags: list[str], workdir: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HOME": root, "JAX_PLATFORMS": "cpu"}
    env.pop("LPC_JAX_DATA_DIR", None)
    env.pop("TFDS_DATA_DIR", None)
    return subprocess.run([sys.executable, "-c", _NO_TF.format(module=module), *_TINY, *flags,
                           f"--workdir={workdir}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


# About a minute each on a shared 2-core CPU: one runs by default, all with -m slow (CI runs both).
@pytest.mark.parametrize("case", [
    "cifar10", pytest.param("celeba_zip_cached", marks=pytest.mark.slow),
    pytest.param("svhn", marks=pytest.mark.slow), pytest.param("celeba_kaggle", marks=pytest.mark.slow),
    pytest.param("folder32", marks=pytest.mark.slow)])
def test_launcher_trains_on_the_files(layouts, case):
    root, cases = layouts
    module, flags = cases[case]
    workdir = os.path.join(root, "runs", case)
    proc = _launch(root, module, flags, workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "test ELBO" in proc.stdout
    with open(os.path.join(workdir, "summary.json")) as f:
        summary = json.load(f)
    assert summary["step"] == 2 and np.isfinite(summary["test_elbo_nats"])
    if case != "folder32":
        assert summary["test_examples"] == (6 if case.startswith("celeba") else 8)
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["loss"]) for r in rows)
    if case == "celeba_zip_cached":
        cache = os.path.join(root, "celeba_zip", "lpc_jax_cache")
        assert sorted(os.listdir(cache)) == ["celeba-test-6x64x64x3.json", "celeba-test-6x64x64x3.lock",
                                             "celeba-test-6x64x64x3.npy", "celeba-train-16x64x64x3.json",
                                             "celeba-train-16x64x64x3.lock", "celeba-train-16x64x64x3.npy"]


def test_launcher_without_data_lists_layouts_and_paths(tmp_path):
    env = {**os.environ, "HOME": str(tmp_path), "JAX_PLATFORMS": "cpu"}
    env.pop("LPC_JAX_DATA_DIR", None)
    env.pop("TFDS_DATA_DIR", None)
    proc = subprocess.run([sys.executable, "-c", _NO_TF.format(module="experiments.celeba"), *_TINY,
                           f"--workdir={tmp_path}/run"], cwd=str(tmp_path), env={**env, "PYTHONPATH": REPO},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    # absl's device line may come first; the error is one block, from its "error:" line to the end
    assert "\nerror: cannot find dataset 'celeba'" in "\n" + proc.stderr, proc.stderr[-2000:]
    assert "ROOT/celeba/img_align_celeba.zip + celeba/list_eval_partition.txt" in proc.stderr
    assert f"{tmp_path}/tensorflow_datasets   (does not exist)" in proc.stderr
