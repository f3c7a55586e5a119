"""What every reader shares: the dataset types, the lazy image array, decoding and preprocessing.

The readers (:mod:`lpc_jax.data.cifar10`, ``svhn``, ``celeba``, ``folder``) and
:mod:`lpc_jax.data.sources` import this module and nothing else of the package.
"""

from __future__ import annotations

import hashlib
import io
import json
from typing import Iterable, NamedTuple

import numpy as np

CELEBA_CROP = 140  # CelebA: centre 140x140 of the 218x178 aligned image, resized to 64x64 (the TFDS path's)


class DatasetNotFoundError(FileNotFoundError):
    """The dataset's files are missing or unreadable; the message says how to fix it."""


class Dataset(NamedTuple):
    images: np.ndarray  # (N, H, W, C) uint8
    labels: np.ndarray  # (N,) int64; -1 where the dataset has no labels


def celeba_crop(image: np.ndarray) -> np.ndarray:
    """(218, 178, 3) uint8 -> (64, 64, 3) uint8: centre 140x140 crop, Pillow BOX resize.

    The preprocessing of CelebA on every source (TFDS, folder, zip), so the same
    JPEG gives the same pixels whichever way it was read.
    """
    from PIL import Image

    h, w = image.shape[:2]
    top, left = (h - CELEBA_CROP) // 2, (w - CELEBA_CROP) // 2
    crop = image[top : top + CELEBA_CROP, left : left + CELEBA_CROP]
    return np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize((64, 64), Image.BOX))


def square_resize(image: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (size, size, 3) uint8: the centred largest square, Pillow BICUBIC resize."""
    from PIL import Image

    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    crop = np.ascontiguousarray(image[top : top + side, left : left + side])
    if side == size:
        return crop
    return np.asarray(Image.fromarray(crop).resize((size, size), Image.BICUBIC))


def decode_rgb(data: bytes, name: str, *, exif: bool = True) -> np.ndarray:
    """JPEG/PNG bytes -> (H, W, 3) uint8 (grey, palette, alpha and CMYK converted to RGB).

    ``exif``: apply the EXIF orientation (photos); CelebA's reader turns it off to
    decode exactly as TFDS's Pillow path does.

    Raises:
      DatasetNotFoundError: ``data`` is not an image Pillow can decode; names ``name``.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            if exif:
                image = ImageOps.exif_transpose(image)
            return np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DatasetNotFoundError(f"cannot decode image {name}: {type(e).__name__}: {e}. The file is truncated "
                                   f"or not a JPEG/PNG: replace or delete it (and any --data_cache built "
                                   f"from it).") from e


def fingerprint(entries: Iterable[tuple[str, int]], **extra) -> str:
    """sha256 hex of ``(name, size)`` pairs and ``extra`` (JSON): what a cache is checked against."""
    h = hashlib.sha256(json.dumps(extra, sort_keys=True).encode())
    for name, size in entries:
        h.update(f"{name}\0{size}\n".encode())
    return h.hexdigest()


class LazyImages:
    """A read-only ``(N, H, W, C)`` uint8 array whose rows are read and decoded when indexed.

    Subclasses set ``name`` and ``shape`` and implement :meth:`read_one` (row ``i``
    -> ``(H, W, C)`` uint8). ``images[i]`` is one image, ``images[idx]`` (an index
    array) and ``images[a:b]`` stack ``(k, H, W, C)``; ``np.asarray(images)`` reads
    all, more than ``chunk`` rows in ``num_threads`` grain threads.
    """

    dtype = np.dtype(np.uint8)
    ndim = 4
    name: str
    shape: tuple[int, int, int, int]

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, shape={self.shape})"

    def read_one(self, index: int) -> np.ndarray:
        raise NotImplementedError

    def fingerprint(self) -> str:
        """What the rows depend on (file names, sizes, preprocessing), for :mod:`lpc_jax.data.cache`."""
        raise NotImplementedError

    def read_rows(self, indices: np.ndarray, num_threads: int = 4, chunk: int = 256) -> np.ndarray:
        """``(k, H, W, C)`` uint8 rows ``indices`` (1-d), in order; big reads in grain threads."""
        if len(indices) <= chunk or num_threads < 1:
            return self._read_chunk(indices)
        import grain

        chunks = [indices[i : i + chunk] for i in range(0, len(indices), chunk)]
        options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2 * num_threads)
        return np.concatenate(list(grain.MapDataset.source(chunks).map(self._read_chunk).to_iter_dataset(options)))

    def _read_chunk(self, indices: np.ndarray) -> np.ndarray:
        out = np.empty((len(indices), *self.shape[1:]), np.uint8)
        for j, i in enumerate(indices):
            out[j] = self.read_one(int(i))
        return out

    def _indices(self, key) -> np.ndarray:
        return row_indices(key, self)

    def __getitem__(self, key) -> np.ndarray:
        indices = self._indices(key)
        return self.read_rows(indices.reshape(-1)).reshape(*indices.shape, *self.shape[1:])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        images = self[:]
        return images if dtype is None else images.astype(dtype)


def row_indices(key, rows) -> np.ndarray:
    """The row indices ``key`` (an int, a slice or an integer array, negatives from the end)
    selects from ``rows`` (anything with ``len``), as an int array of ``key``'s shape.

    Raises:
      TypeError: ``key`` is a boolean or non-integer array.
      IndexError: an index is outside ``[-len(rows), len(rows))``.
    """
    if isinstance(key, slice):
        return np.arange(*key.indices(len(rows)))
    indices = np.asarray(key)
    if indices.dtype == bool or not np.issubdtype(indices.dtype, np.integer):
        raise TypeError(f"{type(rows).__name__} takes an int, a slice or an integer index array, not {key!r}")
    indices = np.where(indices < 0, indices + len(rows), indices)
    if indices.size and (indices.min() < 0 or indices.max() >= len(rows)):
        raise IndexError(f"index out of range for {rows!r}")
    return indices
