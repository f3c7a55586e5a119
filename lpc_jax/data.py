"""Input pipeline: offline Fashion-MNIST IDX files and prepared TFDS datasets.

Two sources, one output format: ``uint8`` images of shape ``(N, H, W, C)`` held
in host memory, batched by :func:`batches` into ``float32`` arrays in [-1, 1]
(the scaling the discretised Gaussian likelihood expects, SPEC section 2).

* ``idx``: the four ``*-ubyte.gz`` files that Debian's ``dataset-fashion-mnist``
  package installs in ``/usr/share/datasets/fashion-mnist/``. Nothing downloads.
* ``tfds``: ``tfds.data_source`` over data already prepared in ``data_dir``
  (no TensorFlow needed to read it). CelebA, CIFAR-10 and SVHN must be prepared
  on a connected machine first; :class:`DatasetNotFoundError` says how.
"""

from __future__ import annotations

import gzip
import os
from typing import Iterator, NamedTuple

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
    except (OSError, EOFError) as e:
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


def load_tfds(name: str, split: str, data_dir: str | None = None, max_examples: int | None = None) -> Dataset:
    """Reads a prepared TFDS dataset with ``tfds.data_source`` (no TensorFlow).

    Args:
      name: one of ``DATASETS`` (``celeba`` maps to ``celeb_a``, ``svhn`` to
        ``svhn_cropped``).
      split: ``"train"`` or ``"test"``.
      data_dir: TFDS data directory; default TFDS's own (``~/tensorflow_datasets``).
      max_examples: read at most this many examples (for smoke runs).

    Returns:
      ``Dataset`` with images (N, H, W, C) uint8 at the shape of ``image_shape(name)``.

    Raises:
      DatasetNotFoundError: the dataset is not prepared in ``data_dir``; the message
        gives the command to prepare it on a machine with internet access.
    """
    import tensorflow_datasets as tfds

    tfds_name, shape = DATASETS[name][0], image_shape(name)
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
    images = np.empty((n, *shape), np.uint8)
    labels = np.full((n,), -1, np.int64)
    for i in range(n):
        example = source[i]
        images[i] = _preprocess_tfds(name, np.asarray(example["image"]))
        if "label" in example:
            labels[i] = int(example["label"])
    return Dataset(images, labels)


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


def epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffle of epoch ``epoch``: a permutation of ``range(num_examples)``, (N,) int64.

    It depends only on ``(seed, epoch)``, so a resumed run sees the same batches as
    an uninterrupted one. Batch ``i`` of the epoch is ``order[i * B : (i + 1) * B]``
    (full batches only), in :func:`batches`, :func:`step_batches` and any loop that
    also needs the labels.
    """
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def step_batches(images: np.ndarray, batch_size: int, seed: int, start_step: int,
                 num_steps: int) -> Iterator[tuple[int, np.ndarray]]:
    """Yields ``(step, batch)`` for SGD steps ``start_step .. num_steps - 1``.

    Step ``s`` gets batch ``s % steps_per_epoch`` of epoch ``s // steps_per_epoch``
    in :func:`epoch_order`, so a run resumed at ``start_step`` sees exactly the
    batches an uninterrupted run would. Only the batches yielded are converted.
    """
    steps_per_epoch = images.shape[0] // batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"batch_size {batch_size} exceeds the {images.shape[0]} examples")
    for step in range(start_step, num_steps):
        epoch, index = divmod(step, steps_per_epoch)
        if step == start_step or index == 0:
            order = epoch_order(images.shape[0], seed, epoch)
        yield step, to_float(images[order[index * batch_size : (index + 1) * batch_size]])


def batches(images: np.ndarray, batch_size: int, seed: int, epoch: int) -> Iterator[np.ndarray]:
    """Yields the shuffled full batches of one epoch (:func:`epoch_order`) as float32 in [-1, 1].

    The last partial batch is dropped.
    """
    order = epoch_order(images.shape[0], seed, epoch)
    for i in range(images.shape[0] // batch_size):
        yield to_float(images[order[i * batch_size : (i + 1) * batch_size]])
