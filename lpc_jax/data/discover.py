"""Where a dataset is on disk: the roots searched, the layouts accepted, and the error when none is found.

Roots, in order: ``--data_dir``, ``$LPC_JAX_DATA_DIR``, ``$TFDS_DATA_DIR``,
``~/tensorflow_datasets``, ``./data``, ``~/data`` (missing ones skipped). In each
root a TFDS-prepared copy is tried first (``source="auto"``), then the file
layouts of :data:`LAYOUTS`; the first match wins.
"""

from __future__ import annotations

import glob
import os
from typing import Any, NamedTuple

import numpy as np

from lpc_jax.data import celeba, cifar10, svhn
from lpc_jax.data.images import DatasetNotFoundError

ENV_VAR = "LPC_JAX_DATA_DIR"

# The file layouts each reader accepts under a root, for the error message and the README.
LAYOUTS = {
    "celeba": [
        "celeba/img_align_celeba/*.jpg + celeba/list_eval_partition.txt   (torchvision)",
        "celeba/img_align_celeba.zip + celeba/list_eval_partition.txt     (torchvision, zip not extracted)",
        "img_align_celeba/img_align_celeba/*.jpg + list_eval_partition.csv (Kaggle)",
        "img_align_celeba/*.jpg (or img_align_celeba.zip) + list_eval_partition.txt (the root is the celeba folder)",
    ],
    "cifar10": ["cifar-10-batches-py/data_batch_1..5 + test_batch   (python version, torchvision)",
                "data_batch_1..5 + test_batch                      (the root is cifar-10-batches-py)"],
    "svhn": ["train_32x32.mat + test_32x32.mat   (torchvision, scipy.io)",
             "svhn/train_32x32.mat + svhn/test_32x32.mat"],
}
_FINDERS = {"celeba": celeba.find, "cifar10": cifar10.find, "svhn": svhn.find}
FILE_DATASETS = tuple(sorted(_FINDERS))


class Found(NamedTuple):
    kind: str  # "tfds" or "files"
    root: str  # the root it was found in (a TFDS data_dir for "tfds")
    where: Any  # "files": what the reader's find returned


def search_roots(data_dir: str | None) -> list[str]:
    """The roots searched for a dataset, in order, expanded and without repeats (missing ones kept)."""
    candidates = [data_dir, os.environ.get(ENV_VAR), os.environ.get("TFDS_DATA_DIR"), "~/tensorflow_datasets",
                  "./data", "~/data"]
    out = []
    for c in candidates:
        if c:
            path = os.path.abspath(os.path.expanduser(c))
            if path not in out:
                out.append(path)
    return out


def tfds_prepared(root: str, tfds_name: str) -> bool:
    """True if ``root`` holds a TFDS-prepared ``tfds_name`` (``<name>/[<config>/]<version>/dataset_info.json``)."""
    base = os.path.join(root, tfds_name)
    return bool(glob.glob(os.path.join(base, "*", "dataset_info.json"))
                or glob.glob(os.path.join(base, "*", "*", "dataset_info.json")))


def locate(name: str, tfds_name: str, data_dir: str | None, *, allow_tfds: bool = True) -> Found:
    """The first root holding ``name`` (TFDS-prepared, when allowed, then files).

    Raises:
      DatasetNotFoundError: found nowhere; the message lists every accepted layout
        and every path searched.
      ValueError: ``name`` has no file reader.
    """
    if name not in _FINDERS:
        raise ValueError(f"source 'files' reads {list(FILE_DATASETS)} (and --dataset=folder), not {name!r}")
    roots = search_roots(data_dir)
    for root in roots:
        if not os.path.isdir(root):
            continue
        if allow_tfds and tfds_prepared(root, tfds_name):
            return Found("tfds", root, None)
        where = _FINDERS[name](root)
        if where is not None:
            return Found("files", root, where)
    raise DatasetNotFoundError(not_found_message(name, tfds_name, roots, allow_tfds=allow_tfds))


def not_found_message(name: str, tfds_name: str, roots: list[str], *, allow_tfds: bool = True) -> str:
    """What was searched and what would have been accepted, with where to get the files."""
    searched = "\n".join(f"  {r}{'' if os.path.isdir(r) else '   (does not exist)'}" for r in roots)
    layouts = [*LAYOUTS[name]]
    if allow_tfds:
        layouts.append(f"{tfds_name}/<version>/   (TFDS-prepared; needs TensorFlow to prepare: on a connected "
                       f"machine `pip install tensorflow tensorflow-datasets && tfds build {tfds_name} "
                       f"--file_format=array_record --data_dir=DIR`, then copy DIR here)")
    accepted = "\n".join(f"  ROOT/{layout}" for layout in layouts)
    hint = {"celeba": celeba._HINT, "cifar10": cifar10._HINT, "svhn": svhn._HINT}[name]
    return (f"cannot find dataset {name!r}. Paths searched (--data_dir, ${ENV_VAR}, $TFDS_DATA_DIR, "
            f"~/tensorflow_datasets, ./data, ~/data):\n{searched}\nAccepted layouts, under any of them as ROOT:\n"
            f"{accepted}\n{hint}")


def read_files(name: str, where: Any, split: str, max_examples: int | None = None) -> tuple[Any, np.ndarray | None]:
    """``(images, labels)`` of ``split`` from the files :func:`locate` found.

    CIFAR-10 and SVHN load into uint8 arrays (labels int64); CelebA opens lazily
    (:class:`lpc_jax.data.celeba.CelebAFiles`, labels None).
    """
    if name == "celeba":
        return celeba.open_split(*where, split, max_examples), None
    ds = (cifar10 if name == "cifar10" else svhn).load(where, split)
    return ds.images[:max_examples], ds.labels[:max_examples]
