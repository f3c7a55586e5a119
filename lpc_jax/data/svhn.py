"""SVHN (cropped digits) from ``train_32x32.mat`` / ``test_32x32.mat`` (scipy.io), no TensorFlow.

Each file holds ``X`` (32, 32, 3, N) uint8 and ``y`` (N, 1) with labels 1..10,
10 meaning the digit 0. A file with the published row count (73,257 train,
26,032 test) must also have the published md5 (torchvision's list).
"""

from __future__ import annotations

import hashlib
import os

import numpy as np

from lpc_jax.data.images import Dataset, DatasetNotFoundError

FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat"}
PUBLISHED_ROWS = {"train": 73257, "test": 26032}
PUBLISHED_MD5 = {"train": "e26dedcc434d2e4c54c9b2d4a06d8373", "test": "eb5a983be6a315427106f1b164d9cef3"}
_HINT = ("Download train_32x32.mat and test_32x32.mat from http://ufldl.stanford.edu/housenumbers/ into "
         "DIR (or DIR/svhn/) and pass --data_dir=DIR.")


def find(root: str) -> str | None:
    """The folder of ``root`` (``root`` or ``root/svhn``) holding ``test_32x32.mat``; else None."""
    for folder in (root, os.path.join(root, "svhn")):
        if os.path.isfile(os.path.join(folder, FILES["test"])):
            return folder
    return None


def _md5(path: str) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load(folder: str, split: str) -> Dataset:
    """Reads ``folder/<split>_32x32.mat``.

    Returns:
      ``Dataset``: images (N, 32, 32, 3) uint8 and labels (N,) int64 in 0..9.

    Raises:
      DatasetNotFoundError: missing, truncated or not an SVHN file (no ``X``/``y`` of
        the right shapes, labels outside 1..10), or the published row count with
        another md5.
      ValueError: unknown split.
    """
    if split not in FILES:
        raise ValueError(f"unknown split {split!r}; SVHN has 'train' and 'test' (extra is not read)")
    path = os.path.join(folder, FILES[split])
    if not os.path.isfile(path):
        raise DatasetNotFoundError(f"SVHN file {path} not found. {_HINT}")
    import scipy.io

    try:
        mat = scipy.io.loadmat(path, variable_names=["X", "y"])
    except Exception as e:  # noqa: BLE001  (scipy raises ValueError, OSError, MatReadError, ...)
        raise DatasetNotFoundError(f"{path} is truncated or not a MATLAB file ({type(e).__name__}: {e}). "
                                   f"{_HINT}") from e
    x, y = mat.get("X"), mat.get("y")
    if x is None or y is None or x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3):
        got = "no X/y" if x is None or y is None else f"X {x.shape} {x.dtype}"
        raise DatasetNotFoundError(f"{path} is not an SVHN 32x32 file: expected X (32, 32, 3, N) uint8 and y, "
                                   f"got {got}. {_HINT}")
    labels = np.asarray(y, np.int64).reshape(-1)
    n = x.shape[3]
    if labels.shape != (n,) or (n and (labels.min() < 1 or labels.max() > 10)):
        raise DatasetNotFoundError(f"{path}: {n} images but y {y.shape} (must be {n} labels in 1..10): the file "
                                   f"is corrupt. {_HINT}")
    if n == PUBLISHED_ROWS[split] and _md5(path) != PUBLISHED_MD5[split]:
        raise DatasetNotFoundError(f"{path} has the published {n} rows but not the published md5 "
                                   f"{PUBLISHED_MD5[split]}: it is corrupt or modified. {_HINT}")
    return Dataset(np.ascontiguousarray(x.transpose(3, 0, 1, 2)), labels % 10)
