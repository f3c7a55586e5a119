"""Any folder of JPEG/PNG images as a dataset: centre-cropped, resized, split by a hash of the name.

Every ``*.jpg``, ``*.jpeg`` and ``*.png`` under the folder (recursively, hidden
folders skipped) is one example, ordered by its relative path. An image goes to
the test split when ``crc32(relative path) % 100 < TEST_PERCENT``, so the split of a
file never changes as files are added or removed.
"""

from __future__ import annotations

import os
import zlib

import numpy as np

from lpc_jax.data.images import (
    DatasetNotFoundError,
    LazyImages,
    decode_rgb,
    fingerprint,
    square_resize,
)

EXTENSIONS = (".jpg", ".jpeg", ".png")
TEST_PERCENT = 10


def is_test(relative_path: str) -> bool:
    """True when the image at ``relative_path`` (``/``-separated) is held out for the test split."""
    return zlib.crc32(relative_path.encode("utf-8")) % 100 < TEST_PERCENT


def list_images(root: str) -> list[str]:
    """The relative paths (``/``-separated, sorted) of the JPEG/PNG files under ``root``."""
    out = []
    for directory, subdirs, files in os.walk(root, followlinks=True):
        subdirs[:] = [d for d in subdirs if not d.startswith(".")]
        rel = os.path.relpath(directory, root)
        out += [f if rel == "." else f"{rel}/{f}".replace(os.sep, "/")
                for f in files if f.lower().endswith(EXTENSIONS) and not f.startswith(".")]
    return sorted(out)


class FolderImages(LazyImages):
    """The images of a folder split, decoded, centre-cropped and resized to ``(size, size, 3)`` on demand."""

    def __init__(self, root: str, names: list[str], size: int):
        self.name, self.root, self.names, self.size = "folder", root, names, size
        self.shape = (len(names), size, size, 3)

    def read_one(self, index: int) -> np.ndarray:
        path = os.path.join(self.root, self.names[index])
        with open(path, "rb") as f:
            return square_resize(decode_rgb(f.read(), path), self.size)

    def fingerprint(self) -> str:
        entries = ((n, os.path.getsize(os.path.join(self.root, n))) for n in self.names)
        return fingerprint(entries, dataset="folder", shape=self.shape, preprocess="square-bicubic")


def open_split(root: str, split: str, size: int, max_examples: int | None = None) -> FolderImages:
    """Opens the ``split`` images of folder ``root`` for lazy reading at ``size`` x ``size``.

    Raises:
      DatasetNotFoundError: ``root`` is not a folder, holds no JPEG/PNG, the split is
        empty (too few images), or its first image cannot be decoded.
      ValueError: unknown split or a size < 1.
    """
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}; a folder dataset has 'train' and 'test'")
    if size < 1:
        raise ValueError(f"image size must be >= 1, got {size}")
    if not os.path.isdir(root):
        raise DatasetNotFoundError(f"--dataset=folder reads the images of --data_dir, and {root!r} is not a "
                                   f"folder. Pass --data_dir=DIR, a folder of .jpg/.jpeg/.png files.")
    every = list_images(root)
    if not every:
        raise DatasetNotFoundError(f"{root} holds no .jpg, .jpeg or .png file (searched recursively). Pass "
                                   f"--data_dir=DIR, a folder of your images.")
    names = [n for n in every if is_test(n) == (split == "test")]
    if not names:
        raise DatasetNotFoundError(f"the {split} split of {root} is empty: {len(every)} image(s) and "
                                   f"{TEST_PERCENT}% go to test by a hash of the name; add more images.")
    images = FolderImages(root, names[:max_examples] if max_examples else names, size)
    images.read_one(0)  # an unreadable file fails here, before training
    return images
