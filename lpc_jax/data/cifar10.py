"""CIFAR-10 from the python batches (``cifar-10-batches-py/``, the torchvision layout), no TensorFlow.

``data_batch_1`` .. ``data_batch_5`` (train) and ``test_batch`` are pickled dicts
with ``data`` (n, 3072) uint8, rows of R, G, B 32x32 planes, and ``labels`` (n
ints in 0..9). Pickle can run code on load, so they are read with an unpickler
that resolves only the few numpy names an array needs; a batch of the published
10,000 rows must also have the published md5 (torchvision's list).
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle

import numpy as np

from lpc_jax.data.images import Dataset, DatasetNotFoundError

FOLDER = "cifar-10-batches-py"
SPLITS = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
PUBLISHED_ROWS = 10000  # per batch file
PUBLISHED_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
}
_HINT = ("Download cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html and extract it "
         "(`tar xzf cifar-10-python.tar.gz`) so that DIR/cifar-10-batches-py/ holds data_batch_1..5 and "
         "test_batch; pass --data_dir=DIR.")

# The globals a pickled numpy array needs (numpy 1.x and 2.x module names); nothing else resolves.
_ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a CIFAR-10 batch holds only "
                                         f"dicts, lists, bytes and numpy arrays")
        return super().find_class(module, name)


def read_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
    """One batch file -> ``(images (n, 32, 32, 3) uint8, labels (n,) int64)``.

    Raises:
      DatasetNotFoundError: missing, truncated, not a CIFAR-10 batch (wrong keys,
        shapes or labels), or 10,000 rows with an md5 other than the published one.
    """
    if not os.path.isfile(path):
        raise DatasetNotFoundError(f"CIFAR-10 file {path} not found. {_HINT}")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        batch = _ArrayUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as e:  # noqa: BLE001  (truncated or foreign pickles fail in many ways)
        raise DatasetNotFoundError(f"{path} is truncated or not a CIFAR-10 python batch "
                                   f"({type(e).__name__}: {e}). {_HINT}") from e
    data = batch.get(b"data") if isinstance(batch, dict) else None
    labels = batch.get(b"labels") if isinstance(batch, dict) else None
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DatasetNotFoundError(f"{path} is not a CIFAR-10 batch: expected a dict with b'data' (n, 3072) "
                                   f"uint8, got {type(batch).__name__}. {_HINT}")
    labels = np.asarray(labels if labels is not None else [], np.int64)
    if labels.shape != (data.shape[0],) or (labels.size and (labels.min() < 0 or labels.max() > 9)):
        raise DatasetNotFoundError(f"{path}: {data.shape[0]} images but labels {labels.shape} (must be "
                                   f"{data.shape[0]} ints in 0..9): the file is corrupt. {_HINT}")
    name = os.path.basename(path)
    if data.shape[0] == PUBLISHED_ROWS and name in PUBLISHED_MD5:
        if hashlib.md5(raw).hexdigest() != PUBLISHED_MD5[name]:
            raise DatasetNotFoundError(f"{path} has the published 10,000 rows but not the published md5 "
                                       f"{PUBLISHED_MD5[name]}: it is corrupt or modified. {_HINT}")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), labels


def find(root: str) -> str | None:
    """``root/cifar-10-batches-py`` (or ``root`` itself) when it holds ``test_batch``; else None."""
    for folder in (os.path.join(root, FOLDER), root):
        if os.path.isfile(os.path.join(folder, "test_batch")):
            return folder
    return None


def load(folder: str, split: str) -> Dataset:
    """Reads the ``split`` batches of ``folder`` (a ``cifar-10-batches-py`` directory).

    Returns:
      ``Dataset``: images (N, 32, 32, 3) uint8 and labels (N,) int64; N = 50,000 /
      10,000 for the published train / test split (any size for other files in the
      layout, e.g. test fixtures; every train batch must then have the same size).

    Raises:
      DatasetNotFoundError: a file is missing or bad (:func:`read_batch`), or the
        train batches differ in size.
      ValueError: unknown split.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; CIFAR-10 has 'train' and 'test'")
    parts = [read_batch(os.path.join(folder, name)) for name in SPLITS[split]]
    sizes = sorted({p[0].shape[0] for p in parts})
    if len(sizes) > 1:
        raise DatasetNotFoundError(f"the CIFAR-10 train batches in {folder} have different sizes {sizes}: "
                                   f"some are truncated or from another copy. {_HINT}")
    return Dataset(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
