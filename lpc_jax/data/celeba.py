"""CelebA (aligned, 178x218 JPEGs) from a folder or the unextracted zip, read lazily; no TensorFlow.

Accepted layouts under a root ``R`` (the first found wins):

* torchvision: ``R/celeba/img_align_celeba/*.jpg`` or ``R/celeba/img_align_celeba.zip``,
  with ``R/celeba/list_eval_partition.txt`` (``000001.jpg 0``);
* Kaggle: ``R/img_align_celeba/img_align_celeba/*.jpg`` with ``R/list_eval_partition.csv``
  (``image_id,partition``);
* ``R`` itself as the ``celeba`` folder above.

Partition 0 is train (162,770 images), 1 validation (19,867), 2 test (19,962).
Each image is preprocessed as on the TFDS path (:func:`lpc_jax.data.images.celeba_crop`).
"""

from __future__ import annotations

import csv
import os
import threading
import zipfile

import numpy as np

from lpc_jax.data.images import (
    DatasetNotFoundError,
    LazyImages,
    celeba_crop,
    decode_rgb,
    fingerprint,
)

SPLITS = {"train": 0, "validation": 1, "test": 2}
PUBLISHED = {0: 162770, 1: 19867, 2: 19962}  # images per partition; 202,599 in all
_HINT = ("Download img_align_celeba.zip and list_eval_partition.txt (CelebA's 'Align&Cropped Images' and "
         "'Eval' folders, https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html, or Kaggle's "
         "jessicali9530/celeba-dataset) into DIR/celeba/ and pass --data_dir=DIR; the zip need not be "
         "extracted.")


def find(root: str) -> tuple[str, str] | None:
    """``(images, partition_file)`` of the first accepted layout under ``root``; ``images`` is a
    folder of JPEGs or a zip. None when ``root`` holds no layout."""
    for base in (os.path.join(root, "celeba"), root):
        partition = next((p for p in (os.path.join(base, "list_eval_partition.txt"),
                                      os.path.join(base, "list_eval_partition.csv")) if os.path.isfile(p)), None)
        if partition is None:
            continue
        for images in (os.path.join(base, "img_align_celeba", "img_align_celeba"),
                       os.path.join(base, "img_align_celeba")):
            if os.path.isdir(images):
                return images, partition
        for name in ("img_align_celeba.zip", "archive.zip"):
            if os.path.isfile(os.path.join(base, name)):
                return os.path.join(base, name), partition
    return None


def read_partition(path: str) -> dict[str, int]:
    """``{file name: partition}`` from ``list_eval_partition.txt`` (``name p``) or ``.csv`` (``name,p``).

    Raises:
      DatasetNotFoundError: a malformed line, a partition outside 0..2, a name listed
        twice, or the full 202,599 names with split sizes other than the published ones.
    """
    with open(path, newline="") as f:
        rows = list(csv.reader(f)) if path.endswith(".csv") else [line.split() for line in f]
    if rows and rows[0][:1] == ["image_id"]:
        rows = rows[1:]
    out: dict[str, int] = {}
    for number, row in enumerate(rows, 1):
        if not row:
            continue
        if len(row) != 2 or row[1].strip() not in ("0", "1", "2"):
            raise DatasetNotFoundError(f"{path} line {number} is {' '.join(row)!r}, not '<name>.jpg <0|1|2>': "
                                       f"not a CelebA partition file. {_HINT}")
        name = row[0].strip()
        if name in out:
            raise DatasetNotFoundError(f"{path} lists {name} twice: the file is corrupt. {_HINT}")
        out[name] = int(row[1])
    if not out:
        raise DatasetNotFoundError(f"{path} is empty. {_HINT}")
    counts = {p: sum(v == p for v in out.values()) for p in PUBLISHED}
    if len(out) == sum(PUBLISHED.values()) and counts != PUBLISHED:
        raise DatasetNotFoundError(f"{path} lists the 202,599 CelebA images but splits them {counts}, not "
                                   f"the published {PUBLISHED}. {_HINT}")
    return out


class CelebAFiles(LazyImages):
    """CelebA split rows read and decoded on demand from a JPEG folder or a zip (not extracted).

    ``shape`` is ``(N, 64, 64, 3)``; row ``i`` is the ``i``-th name of the split in
    the partition file's order (file-name order for the published file, as TFDS's).
    """

    def __init__(self, images: str, names: list[str], *, members: dict[str, zipfile.ZipInfo] | None = None):
        self.name, self.source, self.names, self.members = "celeba", images, names, members
        self.shape = (len(names), 64, 64, 3)
        self._local = threading.local()  # one open zip per reading thread

    def _bytes(self, index: int) -> bytes:
        name = self.names[index]
        if self.members is None:
            with open(os.path.join(self.source, name), "rb") as f:
                return f.read()
        archive = getattr(self._local, "zip", None)
        if archive is None:
            archive = self._local.zip = zipfile.ZipFile(self.source)
        return archive.read(self.members[name])

    def read_one(self, index: int) -> np.ndarray:
        name = self.names[index]
        image = decode_rgb(self._bytes(index), f"{self.source}:{name}", exif=False)
        if image.shape[0] < 140 or image.shape[1] < 140:
            raise DatasetNotFoundError(f"{self.source}:{name} is {image.shape[1]}x{image.shape[0]}; aligned CelebA "
                                       f"images are 178x218 (at least 140x140 is needed). {_HINT}")
        return celeba_crop(image)

    def fingerprint(self) -> str:
        if self.members is None:
            entries = ((n, os.path.getsize(os.path.join(self.source, n))) for n in self.names)
        else:
            entries = ((n, f"{self.members[n].file_size}:{self.members[n].CRC}") for n in self.names)
        return fingerprint(entries, dataset="celeba", shape=self.shape, preprocess="crop140-box64")


def _zip_members(path: str) -> dict[str, zipfile.ZipInfo]:
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, OSError) as e:
        raise DatasetNotFoundError(f"{path} is truncated or not a zip file ({e}). {_HINT}") from e
    return {os.path.basename(i.filename): i for i in infos if i.filename.lower().endswith(".jpg")}


def open_split(images: str, partition_file: str, split: str, max_examples: int | None = None) -> CelebAFiles:
    """Opens ``split`` of CelebA for lazy reading, checking the files before any is decoded.

    Args:
      images: a folder of the JPEGs or a zip of them (any folder inside), from :func:`find`.
      partition_file: ``list_eval_partition.txt`` or ``.csv``.
      split: ``"train"``, ``"validation"`` or ``"test"``.
      max_examples: expose at most the first this many images.

    Returns:
      :class:`CelebAFiles` of shape ``(N, 64, 64, 3)`` uint8.

    Raises:
      DatasetNotFoundError: a bad partition file (:func:`read_partition`), a split
        with no images, images of the split missing from the folder or zip, or an
        unreadable first image.
      ValueError: unknown split.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; CelebA has {sorted(SPLITS)}")
    partition = read_partition(partition_file)
    names = sorted(n for n, p in partition.items() if p == SPLITS[split])
    if not names:
        raise DatasetNotFoundError(f"{partition_file} assigns no image to the {split} split "
                                   f"(partition {SPLITS[split]}). {_HINT}")
    members = _zip_members(images) if images.endswith(".zip") else None
    present = set(members) if members is not None else set(os.listdir(images))
    missing = [n for n in names if n not in present]
    if missing:
        raise DatasetNotFoundError(f"{len(missing)} of the {len(names)} {split} images listed in {partition_file} "
                                   f"are not in {images} (e.g. {missing[:3]}): the download is incomplete or "
                                   f"the partition file is from another copy. {_HINT}")
    files = CelebAFiles(images, names[:max_examples] if max_examples else names, members=members)
    files.read_one(0)  # an unreadable file fails here, before training
    return files
