"""Fuzzing the IDX reader: damaged files give DatasetNotFoundError or ValueError, nothing else.

``lpc_jax.data.sources.load_idx`` documents ``DatasetNotFoundError`` for a file that is
missing, truncated or not IDX (and ``ValueError`` for a bad split). A seeded loop
damages each of the four Fashion-MNIST files in the ways a disk, a download or a
copy does (random bytes, truncation of the .gz, truncation or random bytes inside
the decompressed IDX, flipped bytes, a rewritten header) and checks that
``load_idx`` either raises one of those two errors quickly, or returns the right
shapes: a damaged file never crashes with another exception, hangs, or loads as
images of another shape. Small copies of the real files (the first 64 examples)
keep each case to milliseconds; a few cases damage the real files themselves.
"""

import gzip
import os
import shutil
import struct
import time

import numpy as np
import pytest

from lpc_jax.data import sources

N = 64  # examples in the small copies
CASES_PER_FILE = 60  # x 4 files = 240 seeded cases
FILES = [name for split in ("train", "test") for name in sources._IDX_FILES[split]]


def _real_dir():
    directory = sources.DEFAULT_IDX_DIR
    if not all(os.path.exists(os.path.join(directory, f)) for f in FILES):
        pytest.skip(f"Fashion-MNIST IDX files not installed in {directory}")
    return directory


def _idx_bytes(array: np.ndarray) -> bytes:
    """An unsigned-byte IDX file of ``array``."""
    return bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape) + array.tobytes()


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """{file name: decompressed IDX bytes} of the first N examples of each real file."""
    real = sources.load_idx("test", _real_dir())
    images, labels = real.images[:N, ..., 0], real.labels[:N].astype(np.uint8)
    out = {}
    for split in ("train", "test"):
        image_file, label_file = sources._IDX_FILES[split]
        out[image_file], out[label_file] = _idx_bytes(images), _idx_bytes(labels)
    return out


def _write_split(directory, small, name, damaged: bytes, *, raw: bool):
    """Writes the split holding ``name``: ``damaged`` in its place (gzipped unless raw), the other file intact."""
    split = next(s for s in ("train", "test") if name in sources._IDX_FILES[s])
    os.makedirs(directory, exist_ok=True)
    for f in sources._IDX_FILES[split]:
        content = damaged if f == name else gzip.compress(small[f], mtime=0)
        if f == name and not raw:
            content = gzip.compress(damaged, mtime=0)
        with open(os.path.join(directory, f), "wb") as out:
            out.write(content)
    return split


def _damage(rng: np.random.Generator, idx: bytes) -> tuple[str, bytes, bool]:
    """One random damage of the decompressed IDX ``idx``: (kind, bytes, raw = already the file's bytes)."""
    gz = gzip.compress(idx, mtime=0)
    kind = rng.choice(["random_file", "truncated_gz", "flipped_gz", "truncated_idx", "random_idx",
                       "random_header", "flipped_idx_header", "reshaped_header"])
    if kind == "random_file":
        return kind, rng.bytes(int(rng.integers(0, 4096))), True
    if kind == "truncated_gz":
        return kind, gz[: int(rng.integers(0, len(gz)))], True
    if kind == "flipped_gz":
        b = bytearray(gz)
        for i in rng.integers(0, len(b), size=int(rng.integers(1, 8))):
            b[i] ^= int(rng.integers(1, 256))
        return kind, bytes(b), True
    if kind == "truncated_idx":
        return kind, idx[: int(rng.integers(0, len(idx)))], False
    if kind == "random_idx":
        return kind, rng.bytes(int(rng.integers(0, 64))), False
    if kind == "random_header":
        header = 4 + 4 * idx[3]
        return kind, rng.bytes(int(rng.integers(0, header + 1))) + idx[header:], False
    if kind == "reshaped_header":  # a well-formed IDX file of other dimensions, same number of bytes
        dims = struct.unpack(f">{idx[3]}I", idx[4 : 4 + 4 * idx[3]])
        if len(dims) == 1:
            new = (dims[0] // 2,) if rng.integers(2) else (dims[0] * 2,)
            payload = idx[4 + 4:][: new[0]] if new[0] < dims[0] else idx[4 + 4:] * 2
        else:
            new = [(dims[0], dims[1] // 2, dims[2] * 2), (dims[0] * 2, dims[1] // 2, dims[2]),
                   (dims[0], dims[2], dims[1] + 4)][int(rng.integers(3))]
            payload = (idx[4 + 12:] * 2)[: int(np.prod(new))]
        return kind, bytes([0, 0, 8, len(new)]) + b"".join(struct.pack(">I", d) for d in new) + payload, False
    b = bytearray(idx)  # flipped_idx_header
    for i in rng.integers(0, 4 + 4 * idx[3], size=int(rng.integers(1, 4))):
        b[i] ^= int(rng.integers(1, 256))
    return kind, bytes(b), False


def _check(directory, split, expect_n):
    start = time.perf_counter()
    try:
        result = sources.load_idx(split, str(directory))
    except (sources.DatasetNotFoundError, ValueError) as e:
        assert str(e), "an error without a message"
        outcome = type(e).__name__
    else:
        # Loaded despite the damage (e.g. a flipped header byte that changes nothing
        # load_idx relies on): then it must have the documented shapes.
        assert result.images.dtype == np.uint8 and result.images.shape == (expect_n, 28, 28, 1)
        assert result.labels.shape == (expect_n,)
        outcome = "loaded"
    assert time.perf_counter() - start < 5.0, "took too long (a hang?)"
    return outcome


@pytest.mark.parametrize("name", FILES)
def test_damaged_idx_files_give_only_documented_errors(small, tmp_path, name):
    rng = np.random.default_rng(FILES.index(name))
    outcomes = {}
    for case in range(CASES_PER_FILE):
        kind, damaged, raw = _damage(rng, small[name])
        directory = tmp_path / f"case{case}"
        split = _write_split(directory, small, name, damaged, raw=raw)
        try:
            outcome = _check(directory, split, N)
        except Exception as e:  # report which damage broke it
            raise AssertionError(f"case {case} ({kind}, {len(damaged)} bytes): {type(e).__name__}: {e}") from e
        outcomes.setdefault(kind, set()).add(outcome)
        shutil.rmtree(directory)
    assert any("DatasetNotFoundError" in o for o in outcomes.values()), outcomes


def test_truncated_real_files(tmp_path):
    real = _real_dir()
    rng = np.random.default_rng(0)
    for name in FILES:
        split = next(s for s in ("train", "test") if name in sources._IDX_FILES[s])
        directory = tmp_path / name
        directory.mkdir()
        for f in sources._IDX_FILES[split]:
            os.symlink(os.path.join(real, f), directory / f)
        os.remove(directory / name)
        with open(os.path.join(real, name), "rb") as f:
            content = f.read()
        cut = int(rng.integers(1, len(content)))
        (directory / name).write_bytes(content[:cut])
        with pytest.raises(sources.DatasetNotFoundError, match=name):
            sources.load_idx(split, str(directory))
