"""A one-time decode cache: a lazy split written once as a memory-mapped uint8 ``.npy``.

``<stem>.npy`` holds the preprocessed ``(N, H, W, C)`` uint8 rows and ``<stem>.json``
the fingerprint of their source (file names and sizes, or zip CRCs, and the
preprocessing; :meth:`lpc_jax.data.images.LazyImages.fingerprint`). A later run,
or another process, whose source has the same fingerprint maps the file
(``np.load(mmap_mode="r")``: pages are shared by every process on the host and
read on demand); any other fingerprint rebuilds it. Writers take an exclusive
``fcntl`` lock on ``<stem>.lock`` and publish with an atomic rename, so processes
started together build it once and never see a half-written file.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os

import numpy as np

from lpc_jax.data.images import DatasetNotFoundError, LazyImages

CHUNK = 1024  # rows decoded per write


def _matches(stem: str, fp: str, shape: tuple[int, ...]) -> np.ndarray | None:
    """The mapped cache if ``stem.npy`` is complete and its sidecar's fingerprint is ``fp``; else None."""
    try:
        with open(stem + ".json") as f:
            meta = json.load(f)
        if meta.get("fingerprint") != fp or tuple(meta.get("shape", ())) != tuple(shape):
            return None
        array = np.load(stem + ".npy", mmap_mode="r")
    except (OSError, ValueError):
        return None
    return array if array.shape == tuple(shape) and array.dtype == np.uint8 else None


@contextlib.contextmanager
def _locked(path: str):
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def cached(images: LazyImages, stem: str, *, num_threads: int = 4, log=print) -> np.ndarray:
    """``images`` as a read-only memory-mapped uint8 array, building ``stem.npy`` on first use.

    Args:
      images: a lazy split (``shape``, ``read_rows``, ``fingerprint``).
      stem: path without extension of the cache files (its folder is created).
      num_threads: decoding threads while building.
      log: called with one line when the cache is built.

    Returns:
      ``np.memmap`` of ``images.shape`` uint8 equal to ``np.asarray(images)``.

    Raises:
      DatasetNotFoundError: the folder is not writable (the message names ``--data_cache``).
    """
    fp, shape = images.fingerprint(), tuple(images.shape)
    found = _matches(stem, fp, shape)
    if found is not None:
        return found
    try:
        os.makedirs(os.path.dirname(stem) or ".", exist_ok=True)
        with _locked(stem + ".lock"):
            found = _matches(stem, fp, shape)  # another process may have built it while we waited
            if found is not None:
                return found
            log(f"building the data cache {stem}.npy ({shape[0]} images, {np.prod(shape) / 2**30:.2f} GiB), once")
            tmp = f"{stem}.npy.tmp{os.getpid()}"
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
            for start in range(0, shape[0], CHUNK):
                rows = np.arange(start, min(start + CHUNK, shape[0]))
                out[start : start + len(rows)] = images.read_rows(rows, num_threads=num_threads)
            out.flush()
            del out
            os.replace(tmp, stem + ".npy")
            with open(stem + ".json.tmp", "w") as f:
                json.dump({"fingerprint": fp, "shape": list(shape), "dtype": "uint8", "source": repr(images)}, f)
            os.replace(stem + ".json.tmp", stem + ".json")
    except PermissionError as e:
        raise DatasetNotFoundError(f"cannot write the data cache {stem}.npy ({e}); pass --data_cache=DIR, a "
                              f"writable folder, or --data_cache='' to read without a cache.") from e
    return np.load(stem + ".npy", mmap_mode="r")
