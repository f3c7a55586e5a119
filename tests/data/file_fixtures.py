"""Tiny datasets in the torchvision / Kaggle layouts, made from real Fashion-MNIST images.

Each writer takes ``(N, 28, 28)`` uint8 images, replicates them to RGB, pads or
resizes them to the dataset's size and writes the files as the published sets
lay them out. They return the ``(N, H, W, 3)`` uint8 images written, to compare
the readers' output with.
"""

from __future__ import annotations

import os
import pickle
import zipfile

import numpy as np
from PIL import Image

from lpc_jax.data import sources


def fashion_mnist(n: int, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(images (n, 28, 28) uint8, labels (n,) int64)``: real Fashion-MNIST train images (Debian's IDX files)."""
    ds = sources.load("fashion_mnist", "train", "idx", max_examples=offset + n)
    return ds.images[offset:, :, :, 0], ds.labels[offset:]


def rgb32(images: np.ndarray) -> np.ndarray:
    """(n, 28, 28) -> (n, 32, 32, 3): replicated to RGB, the green and blue planes shifted so the channels
    differ (a reader that swaps planes fails), padded by 2 pixels of 0."""
    rgb = np.stack([images, 255 - images, images // 2], axis=-1)
    return np.pad(rgb, ((0, 0), (2, 2), (2, 2), (0, 0)))


def write_cifar10(root: str, images: np.ndarray, labels: np.ndarray, *, per_batch: int, num_test: int) -> dict:
    """``root/cifar-10-batches-py``: five train batches of ``per_batch`` rows, then ``test_batch``."""
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    rgb = rgb32(images)
    planes = rgb.transpose(0, 3, 1, 2).reshape(len(rgb), 3072)  # R, G, B planes, as published
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    starts = [i * per_batch for i in range(5)] + [5 * per_batch]
    sizes = [per_batch] * 5 + [num_test]
    for name, start, size in zip(names, starts, sizes):
        batch = {b"batch_label": name.encode(), b"labels": [int(v) for v in labels[start : start + size]],
                 b"data": planes[start : start + size], b"filenames": [b"x.png"] * size}
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(batch, f, protocol=2)  # the published files are protocol-2 pickles
    n_train = 5 * per_batch
    return {"train": rgb[:n_train], "test": rgb[n_train : n_train + num_test], "folder": folder,
            "train_labels": labels[:n_train], "test_labels": labels[n_train : n_train + num_test]}


def write_svhn(root: str, images: np.ndarray, labels: np.ndarray, *, num_train: int) -> dict:
    """``root/train_32x32.mat`` and ``root/test_32x32.mat``: X (32, 32, 3, N) uint8, y (N, 1) with 10 for 0."""
    import scipy.io

    os.makedirs(root, exist_ok=True)
    rgb = rgb32(images)
    y = np.where(labels == 0, 10, labels).astype(np.uint8)[:, None]
    for split, rows in (("train", slice(0, num_train)), ("test", slice(num_train, None))):
        scipy.io.savemat(os.path.join(root, f"{split}_32x32.mat"),
                         {"X": np.ascontiguousarray(rgb[rows].transpose(1, 2, 3, 0)), "y": y[rows]})
    return {"train": rgb[:num_train], "test": rgb[num_train:], "train_labels": labels[:num_train] % 10,
            "test_labels": labels[num_train:]}


def celeba_like(images: np.ndarray) -> np.ndarray:
    """(n, 28, 28) -> (n, 218, 178, 3): RGB as :func:`rgb32`, resized (nearest) to CelebA's aligned size."""
    rgb = np.stack([images, 255 - images, images // 2], axis=-1)
    return np.stack([np.asarray(Image.fromarray(im).resize((178, 218), Image.NEAREST)) for im in rgb])


def write_celeba(root: str, images: np.ndarray, partition: list[int], *, layout: str) -> dict:
    """CelebA JPEGs ``000001.jpg``... and their partition file in ``layout``:

    ``torchvision`` (``root/celeba/img_align_celeba/`` + ``list_eval_partition.txt``),
    ``zip`` (``root/celeba/img_align_celeba.zip``, not extracted) or ``kaggle``
    (``root/img_align_celeba/img_align_celeba/`` + ``list_eval_partition.csv``).
    Returns ``{"names", "pixels" (decoded JPEGs, (n, 218, 178, 3)), "source" (before JPEG)}``.
    """
    big = celeba_like(images)
    names = [f"{i + 1:06d}.jpg" for i in range(len(big))]
    blobs = []
    for im in big:
        path = os.path.join(root, "_tmp.jpg")
        os.makedirs(root, exist_ok=True)
        Image.fromarray(im).save(path, quality=95)
        with open(path, "rb") as f:
            blobs.append(f.read())
        os.remove(path)
    base = os.path.join(root, "img_align_celeba") if layout == "kaggle" else os.path.join(root, "celeba")
    if layout == "zip":
        os.makedirs(base, exist_ok=True)
        with zipfile.ZipFile(os.path.join(base, "img_align_celeba.zip"), "w") as z:
            for name, blob in zip(names, blobs):
                z.writestr(f"img_align_celeba/{name}", blob)
    else:
        folder = os.path.join(base, "img_align_celeba")
        os.makedirs(folder, exist_ok=True)
        for name, blob in zip(names, blobs):
            with open(os.path.join(folder, name), "wb") as f:
                f.write(blob)
    if layout == "kaggle":
        with open(os.path.join(root, "list_eval_partition.csv"), "w") as f:
            f.write("image_id,partition\n" + "".join(f"{n},{p}\n" for n, p in zip(names, partition)))
    else:
        with open(os.path.join(base, "list_eval_partition.txt"), "w") as f:
            f.write("".join(f"{n} {p}\n" for n, p in zip(names, partition)))
    import io

    pixels = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in blobs])
    return {"names": names, "blobs": blobs, "pixels": pixels, "source": big}


def write_folder(root: str, images: np.ndarray) -> list[str]:
    """An image folder: PNGs (lossless) of the RGB images at 40x48, in two subfolders."""
    rgb = np.stack([images, 255 - images, images // 2], axis=-1)
    names = []
    for i, im in enumerate(rgb):
        name = f"{'ab'[i % 2]}/img{i:03d}.png"
        os.makedirs(os.path.join(root, name[0]), exist_ok=True)
        Image.fromarray(im).resize((40, 48), Image.NEAREST).save(os.path.join(root, name))
        names.append(name)
    return sorted(names)
