"""Input pipeline: offline Fashion-MNIST IDX files and prepared TFDS datasets.

Two sources, one output format: ``uint8`` images of shape ``(N, H, W, C)``,
batched by :func:`batches` / :func:`step_batches` into ``float32`` arrays in
[-1, 1] (the scaling the discretised Gaussian likelihood expects, SPEC section 2).
Training reads through :func:`open_images`: IDX files are held in memory, a TFDS
split stays on disk (:class:`TfdsImages`) and :func:`step_batches` (grain,
:mod:`lpc_jax.data.pipeline`) decodes each batch ahead of its step in worker threads.

* ``idx``: the four ``*-ubyte.gz`` files that Debian's ``dataset-fashion-mnist``
  package installs in ``/usr/share/datasets/fashion-mnist/``. Nothing downloads.
* ``tfds``: ``tfds.data_source`` over data already prepared in ``data_dir``
  (no TensorFlow needed to read it). CelebA, CIFAR-10 and SVHN must be prepared
  on a connected machine first; :class:`DatasetNotFoundError` says how.
"""

from __future__ import annotations

import gzip
import os
import zlib
from typing import Any, NamedTuple

import numpy as np

DEFAULT_IDX_DIR = "/usr/share/datasets/fashion-mnist"

# name -> (tfds name, image shape after preprocessing)
DATASETS = {
    "fashion_mnist": ("fashion_mnist", (28, 28, 1)),
    "mnist": ("mnist", (28, 28, 1)),
    "cifar10": ("cifar10", (32, 32, 3)),
    "svhn": ("svhn_cropped", (32, 32, 3)),
    "celeba": ("celeb_a", (64, 64, 3)),
}

_IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


class DatasetNotFoundError(FileNotFoundError):
    """The dataset's files are missing or unreadable; the message says how to fix it."""


class Dataset(NamedTuple):
    images: np.ndarray  # (N, H, W, C) uint8
    labels: np.ndarray  # (N,) int64; -1 where the dataset has no labels


def image_shape(name: str) -> tuple[int, int, int]:
    """Returns ``(H, W, C)`` of dataset ``name``; raises ValueError if unknown."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    return DATASETS[name][1]


def _read_idx(path: str, expected_ndim: int) -> np.ndarray:
    hint = (
        "Reinstall the package (`apt-get update && apt-get install --reinstall "
        "dataset-fashion-mnist`) or point --data_dir at a directory with the four "
        "Fashion-MNIST *-ubyte.gz files."
    )
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:  # zlib.error: corrupt deflate data
        raise DatasetNotFoundError(f"cannot read IDX file {path}: {e}. {hint}") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DatasetNotFoundError(f"{path} is not an unsigned-byte IDX file. {hint}")
    ndim = raw[3]
    if ndim != expected_ndim:
        raise DatasetNotFoundError(f"{path}: expected {expected_ndim} dims, header says {ndim}. {hint}")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    if len(raw) - offset != int(np.prod(dims)):
        raise DatasetNotFoundError(
            f"{path} is truncated or corrupt: header promises {dims} "
            f"({int(np.prod(dims))} bytes), file has {len(raw) - offset}. {hint}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims)


def load_idx(split: str, data_dir: str | None = None) -> Dataset:
    """Reads Fashion-MNIST (or MNIST) from IDX files.

    Args:
      split: ``"train"`` (60,000 images) or ``"test"`` (10,000 images).
      data_dir: directory of the ``*-ubyte.gz`` files; default
        ``/usr/share/datasets/fashion-mnist`` (Debian's ``dataset-fashion-mnist``).

    Returns:
      ``Dataset`` with ``images`` (N, 28, 28, 1) uint8 and ``labels`` (N,) int64.

    Raises:
      DatasetNotFoundError: a file is missing, truncated or not IDX; the message
        names the install command.
      ValueError: unknown split.
    """
    if split not in _IDX_FILES:
        raise ValueError(f"unknown split {split!r}; choose 'train' or 'test'")
    data_dir = data_dir or DEFAULT_IDX_DIR
    image_file, label_file = (os.path.join(data_dir, f) for f in _IDX_FILES[split])
    for path in (image_file, label_file):
        if not os.path.exists(path):
            raise DatasetNotFoundError(
                f"Fashion-MNIST file {path} not found. Install the offline copy with "
                f"`apt-get update && apt-get install dataset-fashion-mnist` (as root), "
                f"or pass --data_dir=DIR holding {', '.join(_IDX_FILES[split])}."
            )
    images = _read_idx(image_file, 3)[..., None]
    if images.shape[1:] != (28, 28, 1):
        raise DatasetNotFoundError(f"{image_file} holds {images.shape[1]}x{images.shape[2]} images; Fashion-MNIST's "
                                   f"are 28x28: the file is corrupt or from another dataset.")
    labels = _read_idx(label_file, 1).astype(np.int64)
    if images.shape[0] != labels.shape[0]:
        raise DatasetNotFoundError(
            f"{image_file} has {images.shape[0]} images but {label_file} has "
            f"{labels.shape[0]} labels; the files are from different sets."
        )
    return Dataset(images, labels)


def _preprocess_tfds(name: str, image: np.ndarray) -> np.ndarray:
    """Center-crops CelebA (218x178) to 140x140 and resizes to 64x64; others as is."""
    if name != "celeba":
        return image
    h, w = image.shape[:2]
    top, left = (h - 140) // 2, (w - 140) // 2
    crop = image[top : top + 140, left : left + 140]
    from PIL import Image  # Pillow comes with matplotlib

    return np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize((64, 64), Image.BOX))


class TfdsImages:
    """Lazy random access to a prepared TFDS split: reads and decodes only the rows asked for.

    Looks like a read-only ``(N, H, W, C)`` uint8 array to the pipeline:
    ``images[i]`` is one ``(H, W, C)`` image, ``images[idx]`` (an index array)
    and ``images[a:b]`` stack ``(k, H, W, C)``; ``np.asarray(images)`` reads
    all. Each image is preprocessed as :func:`_preprocess_tfds` (CelebA's centre
    crop and resize). Nothing is held in memory but the TFDS source itself.
    """

    dtype = np.dtype(np.uint8)
    ndim = 4

    def __init__(self, name: str, source: Any, num_examples: int):
        self.name = name
        self.source = source
        self.shape = (int(num_examples), *image_shape(name))

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"TfdsImages({self.name!r}, shape={self.shape})"

    def _read(self, indices: np.ndarray, num_threads: int = 4,
              chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """``(images (k, H, W, C) uint8, labels (k,) int64, -1 where unlabelled)``.

        More than ``chunk`` rows are read in chunks by ``num_threads`` grain threads.
        """
        if len(indices) <= chunk or num_threads < 1:
            return self._read_chunk(indices)
        import grain

        chunks = [indices[i : i + chunk] for i in range(0, len(indices), chunk)]
        options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2 * num_threads)
        parts = list(grain.MapDataset.source(chunks).map(self._read_chunk).to_iter_dataset(options))
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def _read_chunk(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out = np.empty((len(indices), *self.shape[1:]), np.uint8)
        labels = np.full((len(indices),), -1, np.int64)
        for j, i in enumerate(indices):
            example = self.source[int(i)]
            out[j] = _preprocess_tfds(self.name, np.asarray(example["image"]))
            if "label" in example:
                labels[j] = int(example["label"])
        return out, labels

    def _indices(self, key) -> np.ndarray:
        if isinstance(key, slice):
            return np.arange(*key.indices(len(self)))
        indices = np.asarray(key)
        if indices.dtype == bool or not np.issubdtype(indices.dtype, np.integer):
            raise TypeError(f"TfdsImages takes an int, a slice or an integer index array, not {key!r}")
        indices = np.where(indices < 0, indices + len(self), indices)
        if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"index out of range for {self!r}")
        return indices

    def __getitem__(self, key) -> np.ndarray:
        indices = self._indices(key)
        images = self._read(indices.reshape(-1))[0]
        return images.reshape(*indices.shape, *self.shape[1:])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        images = self[:]
        return images if dtype is None else images.astype(dtype)

    def labels(self, key=slice(None)) -> np.ndarray:
        """The labels of rows ``key``, int64; -1 where the dataset has none (CelebA)."""
        indices = self._indices(key)
        return self._read(indices.reshape(-1))[1].reshape(indices.shape)


def open_tfds(name: str, split: str, data_dir: str | None = None,
              max_examples: int | None = None) -> TfdsImages:
    """Opens a prepared TFDS dataset for lazy reading (``tfds.data_source``, no TensorFlow).

    Only the split's index is opened; images are read and decoded when indexed.

    Args:
      name: one of ``DATASETS`` (``celeba`` maps to ``celeb_a``, ``svhn`` to
        ``svhn_cropped``).
      split: ``"train"`` or ``"test"``.
      data_dir: TFDS data directory; default TFDS's own (``~/tensorflow_datasets``).
      max_examples: expose at most the first this many examples.

    Returns:
      :class:`TfdsImages` of shape ``(N, *image_shape(name))`` uint8.

    Raises:
      DatasetNotFoundError: the dataset is not prepared in ``data_dir``; the message
        gives the command to prepare it on a machine with internet access.
    """
    import tensorflow_datasets as tfds

    image_shape(name)
    tfds_name = DATASETS[name][0]
    try:
        source = tfds.data_source(tfds_name, split=split, data_dir=data_dir, download=False)
    except Exception as e:  # tfds raises AssertionError / DatasetNotFoundError variants
        raise DatasetNotFoundError(
            f"TFDS dataset {tfds_name!r} (split {split!r}) is not prepared in "
            f"{data_dir or '~/tensorflow_datasets'}: {type(e).__name__}: {e}. This machine "
            f"cannot download it. On a connected machine run `pip install tensorflow "
            f"tensorflow-datasets && tfds build {tfds_name} --file_format=array_record --data_dir=DIR`, copy DIR here "
            f"and pass --data_dir=DIR."
        ) from e
    n = len(source) if max_examples is None else min(len(source), max_examples)
    return TfdsImages(name, source, n)


def load_tfds(name: str, split: str, data_dir: str | None = None, max_examples: int | None = None) -> Dataset:
    """Reads a prepared TFDS dataset into memory (:func:`open_tfds`, then every row).

    Args:
      name, split, data_dir, max_examples: as :func:`open_tfds`.

    Returns:
      ``Dataset`` with images (N, H, W, C) uint8 at the shape of ``image_shape(name)``.

    Raises:
      DatasetNotFoundError: the dataset is not prepared in ``data_dir``; the message
        gives the command to prepare it on a machine with internet access.
    """
    images = open_tfds(name, split, data_dir, max_examples)
    everything = np.arange(len(images))
    return Dataset(*images._read(everything))


def open_images(name: str, split: str, source: str = "auto", data_dir: str | None = None,
                max_examples: int | None = None) -> np.ndarray | TfdsImages:
    """The images of ``name``/``split`` for the training pipeline, read as late as possible.

    IDX files (small) are read into an ``(N, H, W, C)`` uint8 array; a TFDS
    dataset is opened lazily as :class:`TfdsImages`. Arguments and errors as :func:`load`.
    """
    image_shape(name)
    if source == "auto":
        source = "idx" if name == "fashion_mnist" else "tfds"
    if source == "tfds":
        return open_tfds(name, split, data_dir, max_examples)
    return load(name, split, source, data_dir, max_examples).images


def load(name: str, split: str, source: str = "auto", data_dir: str | None = None,
         max_examples: int | None = None) -> Dataset:
    """Loads ``name``/``split`` from ``source`` (``idx``, ``tfds`` or ``auto``).

    ``auto`` reads Fashion-MNIST from the IDX files and everything else from TFDS.
    """
    image_shape(name)
    if source == "auto":
        source = "idx" if name == "fashion_mnist" else "tfds"
    if source == "idx":
        if name not in ("fashion_mnist", "mnist"):
            raise ValueError(f"source 'idx' only serves fashion_mnist and mnist, not {name!r}")
        ds = load_idx(split, data_dir)
        if max_examples is not None:
            ds = Dataset(ds.images[:max_examples], ds.labels[:max_examples])
        return ds
    if source == "tfds":
        return load_tfds(name, split, data_dir, max_examples)
    raise ValueError(f"unknown data source {source!r}; choose 'auto', 'idx' or 'tfds'")


def to_float(images: np.ndarray) -> np.ndarray:
    """uint8 in [0, 255] -> float32 in [-1, 1] (pixel k maps to 2k/255 - 1)."""
    return images.astype(np.float32) * (2.0 / 255.0) - 1.0


