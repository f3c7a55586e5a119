"""The datasets and where each is read from: Debian's IDX files, prepared TFDS data, or the files users have.

One output format: ``uint8`` images of shape ``(N, H, W, C)``, converted to
``float32`` in [-1, 1] (:func:`to_float`, the scaling the discretised Gaussian
likelihood expects, SPEC section 2) on the device by the train step. Training
reads through :func:`open_images`: small datasets are held in memory, big ones
(CelebA, a folder of images, a TFDS split) stay on disk and
:func:`lpc_jax.data.pipeline.step_batches` (grain) decodes each batch ahead of
its step in worker threads; ``cache=DIR`` decodes a lazy split once into a
memory-mapped ``.npy`` (:mod:`lpc_jax.data.cache`).

* ``idx``: the four ``*-ubyte.gz`` files that Debian's ``dataset-fashion-mnist``
  package installs in ``/usr/share/datasets/fashion-mnist/``. Nothing downloads.
* ``tfds``: ``tfds.data_source`` over data already prepared in ``data_dir``
  (no TensorFlow needed to read it, but it is needed to prepare it).
* ``files``: the files torchvision and Kaggle users have (CIFAR-10 python
  batches, SVHN ``.mat``, CelebA JPEGs in a folder or zip;
  :mod:`lpc_jax.data.discover` says where it looks), and ``folder``, any folder
  of JPEG/PNG images (:mod:`lpc_jax.data.folder`).
* ``auto``: Fashion-MNIST from IDX, MNIST from TFDS; CIFAR-10, SVHN and CelebA
  from the first search root holding a TFDS-prepared copy or the files.
"""

from __future__ import annotations

import gzip
import os
import zlib
from typing import Any, NamedTuple

import numpy as np

from lpc_jax.data import cache as data_cache
from lpc_jax.data import discover, folder
from lpc_jax.data.images import (
    Dataset,
    DatasetNotFoundError,
    LazyImages,
    celeba_crop,
    row_indices,
)

DEFAULT_IDX_DIR = "/usr/share/datasets/fashion-mnist"

# name -> (tfds name, image shape after preprocessing)
DATASETS = {
    "fashion_mnist": ("fashion_mnist", (28, 28, 1)),
    "mnist": ("mnist", (28, 28, 1)),
    "cifar10": ("cifar10", (32, 32, 3)),
    "svhn": ("svhn_cropped", (32, 32, 3)),
    "celeba": ("celeb_a", (64, 64, 3)),
    "folder": (None, (64, 64, 3)),  # any folder of JPEG/PNG; (S, S, 3) for image_size S
}
SOURCES = ("auto", "idx", "tfds", "files")
FOLDER_SIZES = (32, 64)  # the square sizes of Table 2's networks

_IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


__all__ = ["DATASETS", "Dataset", "DatasetNotFoundError", "LazyImages", "image_shape", "load", "open_images",
           "to_float"]


def image_shape(name: str, image_size: int | None = None) -> tuple[int, int, int]:
    """``(H, W, C)`` of dataset ``name``; ``(S, S, 3)`` for ``folder`` with ``image_size`` S (default 64).

    Raises:
      ValueError: unknown dataset, or an ``image_size`` for another dataset than
        ``folder`` that is not its own size, or a folder size Table 2 lacks.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    shape = DATASETS[name][1]
    if name == "folder" and image_size:
        if image_size not in FOLDER_SIZES:
            raise ValueError(f"image_size={image_size} is invalid: the networks (Table 2) take {FOLDER_SIZES}")
        return (image_size, image_size, 3)
    if image_size and image_size != shape[0]:
        raise ValueError(f"image_size={image_size} is invalid: {name} is {shape[0]}x{shape[1]}; image_size "
                         f"applies to --dataset=folder")
    return shape


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
    return celeba_crop(image) if name == "celeba" else image


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
        return row_indices(key, self)

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


class _Resolved(NamedTuple):
    source: str  # "idx", "tfds" or "files"
    data_dir: str | None  # where to read: IDX folder, TFDS data_dir, or the files' root
    where: Any = None  # "files": what the reader's find returned


def _resolve(name: str, source: str, data_dir: str | None) -> _Resolved:
    """Which reader serves ``name`` from ``source``, and where (searching for ``auto`` / ``files``)."""
    image_shape(name)
    if source not in SOURCES:
        raise ValueError(f"unknown data source {source!r}; choose one of {list(SOURCES)}")
    if name == "folder":
        if source not in ("auto", "files"):
            raise ValueError(f"--dataset=folder reads image files: use --data_source=files (or auto), not {source!r}")
        if not data_dir:
            raise DatasetNotFoundError("--dataset=folder needs --data_dir=DIR, a folder of .jpg/.jpeg/.png images "
                                       "(searched recursively; 10% held out for test by a hash of the name).")
        return _Resolved("files", data_dir)
    if source == "auto":
        if name == "fashion_mnist":
            return _Resolved("idx", data_dir)
        if name not in discover.FILE_DATASETS:
            return _Resolved("tfds", data_dir)
    if source == "idx":
        if name not in ("fashion_mnist", "mnist"):
            raise ValueError(f"source 'idx' only serves fashion_mnist and mnist, not {name!r}")
        return _Resolved("idx", data_dir)
    if source == "tfds":
        return _Resolved("tfds", data_dir)
    found = discover.locate(name, DATASETS[name][0], data_dir, allow_tfds=source == "auto")
    return _Resolved(found.kind, found.root, found.where)


def _open(name: str, split: str, resolved: _Resolved, max_examples: int | None,
          image_size: int | None) -> tuple[Any, np.ndarray | None]:
    """``(images, labels or None)``: lazy for TFDS, CelebA files and folders, in memory otherwise."""
    if resolved.source == "tfds":
        return open_tfds(name, split, resolved.data_dir, max_examples), None
    if resolved.source == "idx":
        ds = load_idx(split, resolved.data_dir)
        return ds.images[:max_examples], ds.labels[:max_examples]
    if name == "folder":
        return folder.open_split(resolved.data_dir, split, image_shape(name, image_size)[0], max_examples), None
    return discover.read_files(name, resolved.where, split, max_examples)


def open_images(name: str, split: str, source: str = "auto", data_dir: str | None = None,
                max_examples: int | None = None, *, image_size: int | None = None, cache: str | None = None,
                num_threads: int = 4) -> np.ndarray | LazyImages:
    """The images of ``name``/``split`` for the training pipeline, read as late as possible.

    Small datasets (IDX, CIFAR-10, SVHN) are read into an ``(N, H, W, C)`` uint8
    array; TFDS splits, CelebA files and image folders open lazily
    (:class:`LazyImages`, :class:`TfdsImages`). Arguments and errors as :func:`load`, and:

    Args:
      cache: decode a lazy split once into a memory-mapped ``.npy``
        (:func:`lpc_jax.data.cache.cached`) in this folder, or ``"auto"`` for
        ``<data root>/lpc_jax_cache``; None or ``""``: no cache. In-memory splits ignore it.
      num_threads: decoding threads while the cache is built.
    """
    resolved = _resolve(name, source, data_dir)
    images, _ = _open(name, split, resolved, max_examples, image_size)
    if not cache or not isinstance(images, LazyImages):
        return images
    directory = os.path.join(resolved.data_dir or ".", "lpc_jax_cache") if cache == "auto" else cache
    stem = os.path.join(directory, f"{name}-{split}-" + "x".join(str(d) for d in images.shape))
    return data_cache.cached(images, stem, num_threads=num_threads)


def load(name: str, split: str, source: str = "auto", data_dir: str | None = None,
         max_examples: int | None = None, *, image_size: int | None = None) -> Dataset:
    """Loads ``name``/``split`` into memory from ``source`` (``auto``, ``idx``, ``tfds`` or ``files``).

    Args:
      name: one of ``DATASETS``.
      split: ``"train"`` or ``"test"`` (CelebA also ``"validation"``).
      source: where to read (the module docstring); ``auto`` and ``files`` search
        the roots of :func:`lpc_jax.data.discover.search_roots`.
      data_dir: the IDX folder, the TFDS data_dir, or the first root to search
        (the image folder itself for ``folder``).
      max_examples: at most the first this many examples.
      image_size: ``folder`` only: the side S of the (S, S, 3) images (32 or 64).

    Returns:
      ``Dataset``: images ``(N, *image_shape(name, image_size))`` uint8, labels
      (N,) int64 (-1 where the dataset has none: CelebA, folders).

    Raises:
      DatasetNotFoundError: the data is not there or not valid; the message lists
        what was searched and what is accepted.
      ValueError: unknown dataset, split or source, or a source that does not serve ``name``.
    """
    resolved = _resolve(name, source, data_dir)
    images, labels = _open(name, split, resolved, max_examples, image_size)
    if isinstance(images, TfdsImages):
        return Dataset(*images._read(np.arange(len(images))))
    images = np.asarray(images)
    return Dataset(images, np.full((len(images),), -1, np.int64) if labels is None else labels)


def to_float(images: np.ndarray) -> np.ndarray:
    """uint8 in [0, 255] -> float32 in [-1, 1] (pixel k maps to 2k/255 - 1)."""
    return images.astype(np.float32) * (2.0 / 255.0) - 1.0


