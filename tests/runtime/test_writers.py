"""lpc_jax.runtime.writers and logs: TensorBoard event files read back; every file complete or absent on a
full disk (a real size-limited tmpfs, as root)."""

import json
import os
import shutil
import subprocess

import numpy as np
import pytest

from lpc_jax.runtime import logs, writers


def test_tensorboard_scalars_and_images_read_back(tmp_path):
    w = writers.MultiWriter([writers.JsonlWriter(str(tmp_path / "m.jsonl"), {"member": 1}, skip=("rate",)),
                             writers.TensorBoardWriter(str(tmp_path / "tb"))])
    for step in (1, 2):
        w.write_scalars(step, {"elbo": -10.0 * step, "rate": 3.5, "fd": None, "name": "x"})
    w.write_images(2, {"grid": np.full((4, 6, 1), 0.5)})
    w.close()
    assert writers.scalars_of(str(tmp_path / "tb")) == {"elbo": [(1, -10.0), (2, -20.0)], "rate": [(1, 3.5), (2, 3.5)]}
    images = [v for e in writers.read_events(str(tmp_path / "tb")) for v in e.summary.value if v.HasField("image")]
    assert [(v.tag, v.image.height, v.image.width) for v in images] == [("grid", 4, 6)]
    rows = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert rows == [{"step": 1, "member": 1, "elbo": -10.0, "fd": None, "name": "x"},
                    {"step": 2, "member": 1, "elbo": -20.0, "fd": None, "name": "x"}]


@pytest.fixture
def full_disk(tmp_path):
    """A 1 MiB tmpfs, filled up but for a few bytes."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a size-limited tmpfs needs root")
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {out.stderr.strip()}")
    try:
        (mount_point / "log.jsonl").write_text('{"step": 1}\n')
        (mount_point / "summary.json").write_text('{"old": true}')
        with open(mount_point / "filler", "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError:
                pass
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_a_full_disk_leaves_every_file_complete_or_absent(full_disk):
    big = "x" * 200_000
    with pytest.raises(logs.LogWriteError, match="no space left on device") as excinfo:
        logs.append_lines(str(full_disk / "log.jsonl"), [json.dumps({"step": 2, "pad": big}) + "\n"])
    assert excinfo.value.disk_full and str(full_disk / "log.jsonl") in str(excinfo.value)
    assert "same --workdir" in str(excinfo.value) and "nothing was deleted" in str(excinfo.value)
    assert (full_disk / "log.jsonl").read_text() == '{"step": 1}\n'  # cut back to the last complete line
    with pytest.raises(logs.LogWriteError, match="no space left on device"):
        logs.write_json(str(full_disk / "summary.json"), {"pad": big})
    assert (full_disk / "summary.json").read_text() == '{"old": true}'  # the old file, whole
    with pytest.raises(logs.LogWriteError, match="no space left on device"):
        with logs.atomic_path(str(full_disk / "samples.png")) as tmp, open(tmp, "w") as f:
            f.write(big)
            f.flush()
    with pytest.raises(logs.LogWriteError):
        w = writers.TensorBoardWriter(str(full_disk / "tb"))
        w.write_scalars(1, {f"m{i}": 1.0 for i in range(20_000)})
    assert sorted(os.listdir(full_disk)) == ["filler", "log.jsonl", "summary.json", "tb"] or \
        sorted(os.listdir(full_disk)) == ["filler", "log.jsonl", "summary.json"]  # no temporaries
