"""Small CNN classifier for 28x28x1 images, and its feature space for ``fd_fmnist``.

``fd_fmnist`` is the Frechet distance (Heusel et al. 2017's FID formula,
:func:`lpc_jax.evaluation.sample_metrics.frechet_distance`) between Gaussian fits of the
classifier's 128-d penultimate-layer features. It is an *offline* stand-in for
FID on Fashion-MNIST, with numbers on its own scale: never report it as "FID".

The weights are trained by ``python -m experiments.train_classifier`` and
shipped in ``lpc_jax/assets/``: ``<prefix>.msgpack`` (the Flax params,
``flax.serialization.msgpack_serialize``) and ``<prefix>.json`` (test accuracy,
seed, epochs, feature dim, SHA-256 of the weights file).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

from lpc_jax.data import sources
from lpc_jax.evaluation import sample_metrics

Params = Any

FEATURE_DIM = 128
NUM_CLASSES = 10
IMAGE_SHAPE = (28, 28, 1)
ASSETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")

# name -> file prefix in ASSETS_DIR
PRETRAINED = {
    "fashion_mnist": "fmnist_classifier",
    "mnist": "mnist_classifier",
}


class CNN(nn.Module):
    """Conv(16)-pool-Conv(32)-pool-Conv(64)-pool-Dense(128)-Dense(10), ReLU, 3x3 convs.

    Input (N, 28, 28, 1) float32 in [-1, 1]. ``__call__`` returns
    ``(logits (N, 10), features (N, 128))``; the features are the post-ReLU
    activations of the 128-unit penultimate layer. 98k parameters (~0.4 MB),
    small enough to train in minutes on two CPU cores.
    """

    feature_dim: int = FEATURE_DIM
    num_classes: int = NUM_CLASSES

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        for i, width in enumerate((16, 32, 64)):
            x = nn.relu(nn.Conv(width, (3, 3), padding="SAME", name=f"conv{i}")(x))
            x = nn.max_pool(x, (2, 2), (2, 2))  # 28 -> 14 -> 7 -> 3
        x = x.reshape(x.shape[0], -1)
        feats = nn.relu(nn.Dense(self.feature_dim, name="fc")(x))
        logits = nn.Dense(self.num_classes, name="head")(feats)
        return logits, feats


class Pretrained(NamedTuple):
    params: Params
    info: dict  # contents of the .json: test_accuracy, seed, num_epochs, feature_dim, ...


def init_params(rng: jax.Array) -> Params:
    """Random initial params of :class:`CNN`."""
    return CNN().init(rng, jnp.zeros((1, *IMAGE_SHAPE), jnp.float32))["params"]


def prepare_images(images: np.ndarray) -> np.ndarray:
    """Checks and converts images to float32 (N, 28, 28, 1) in [-1, 1].

    Accepts uint8 (0..255, converted with :func:`lpc_jax.data.sources.to_float`) or
    floats already in [-1, 1]; (N, 28, 28) is given a channel axis.
    """
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    if images.shape[1:] != IMAGE_SHAPE:
        raise ValueError(f"images must be (N, 28, 28, 1) or (N, 28, 28); got {images.shape}")
    if images.dtype == np.uint8:
        return sources.to_float(images)
    if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"images must be uint8 or float in [-1, 1]; got dtype {images.dtype}")
    return images.astype(np.float32, copy=False)


@jax.jit
def _apply(params: Params, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    return CNN().apply({"params": params}, x)


def _batched(params: Params, images: np.ndarray, batch_size: int, index: int) -> np.ndarray:
    """Runs the jitted net over fixed-size batches (last one padded); output ``index``."""
    x = prepare_images(images)
    n = x.shape[0]
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    outs = []
    for start in range(0, n, batch_size):
        batch = x[start : start + batch_size]
        valid = batch.shape[0]
        if valid < batch_size and n > batch_size:  # keep one compiled shape
            batch = np.concatenate([batch, np.zeros((batch_size - valid, *IMAGE_SHAPE), np.float32)])
        outs.append(np.asarray(_apply(params, batch)[index])[:valid])
    if not outs:
        return np.zeros((0, FEATURE_DIM if index else NUM_CLASSES), np.float32)
    return np.concatenate(outs)


def features(params: Params, images: np.ndarray, batch_size: int = 1000) -> np.ndarray:
    """Penultimate-layer embeddings.

    Args:
      params: classifier params (e.g. ``load_pretrained().params``).
      images: (N, 28, 28, 1) or (N, 28, 28); uint8 or float32 in [-1, 1].
      batch_size: images per jitted call.

    Returns:
      (N, 128) float32 features (post-ReLU).
    """
    return _batched(params, images, batch_size, 1)


def logits(params: Params, images: np.ndarray, batch_size: int = 1000) -> np.ndarray:
    """(N, 10) float32 class logits; inputs as for :func:`features`."""
    return _batched(params, images, batch_size, 0)


def accuracy(params: Params, images: np.ndarray, labels: np.ndarray, batch_size: int = 1000) -> float:
    """Top-1 accuracy in [0, 1] of the classifier on ``images`` with int ``labels`` (N,)."""
    labels = np.asarray(labels)
    if labels.shape != (np.asarray(images).shape[0],):
        raise ValueError(f"labels must be (N,) matching images; got {labels.shape}")
    return float((logits(params, images, batch_size).argmax(-1) == labels).mean())


def asset_paths(name: str) -> tuple[str, str]:
    """``(weights .msgpack path, metadata .json path)`` of the shipped classifier ``name``."""
    if name not in PRETRAINED:
        raise ValueError(f"unknown classifier {name!r}; choose one of {sorted(PRETRAINED)}")
    prefix = os.path.join(ASSETS_DIR, PRETRAINED[name])
    return prefix + ".msgpack", prefix + ".json"


def save_pretrained(params: Params, info: dict, name: str = "fashion_mnist") -> tuple[str, str]:
    """Writes params and ``info`` (+ weights SHA-256, feature dim) to the asset files."""
    weights_path, info_path = asset_paths(name)
    os.makedirs(os.path.dirname(weights_path), exist_ok=True)
    blob = serialization.msgpack_serialize(jax.tree_util.tree_map(np.asarray, serialization.to_state_dict(params)))
    with open(weights_path, "wb") as f:
        f.write(blob)
    info = {**info, "feature_dim": FEATURE_DIM, "weights_file": os.path.basename(weights_path),
            "weights_sha256": hashlib.sha256(blob).hexdigest()}
    with open(info_path, "w") as f:
        json.dump(info, f, indent=2, sort_keys=True)
        f.write("\n")
    return weights_path, info_path


def load_pretrained(name: str = "fashion_mnist") -> Pretrained:
    """Loads the classifier weights shipped in ``lpc_jax/assets/``.

    Args:
      name: ``"fashion_mnist"`` (shipped) or ``"mnist"`` (only if trained with
        ``--dataset=mnist`` and the MNIST IDX files).

    Returns:
      ``Pretrained(params, info)``.

    Raises:
      FileNotFoundError: an asset file is missing; the message gives the
        command that recreates it.
      ValueError: a file is corrupt (checksum, msgpack or parameter-shape mismatch).
    """
    weights_path, info_path = asset_paths(name)
    remedy = (f"Recreate it with `python -m experiments.train_classifier --dataset={name}` "
              f"(run from the repository root).")
    for path in (weights_path, info_path):
        if not os.path.exists(path):
            raise FileNotFoundError(f"classifier file {path} not found. {remedy}")
    try:
        with open(info_path) as f:
            info = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"classifier metadata {info_path} is unreadable: {e}. {remedy}") from e
    with open(weights_path, "rb") as f:
        blob = f.read()
    expected_sha = info.get("weights_sha256")
    if expected_sha is not None and hashlib.sha256(blob).hexdigest() != expected_sha:
        raise ValueError(f"{weights_path} does not match the SHA-256 in {info_path}; "
                         f"the file is corrupt or from another run. {remedy}")
    try:
        state = serialization.msgpack_restore(blob)
    except Exception as e:  # msgpack raises several unrelated exception types
        raise ValueError(f"{weights_path} is not a valid Flax msgpack file: {e}. {remedy}") from e
    template = jax.eval_shape(init_params, jax.random.key(0))
    try:
        params = serialization.from_state_dict(template, state)
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{weights_path} does not hold CNN params: {e}. {remedy}") from e
    mismatched = _shape_mismatches(template, params)
    if mismatched:
        raise ValueError(f"{weights_path}: parameter shapes differ from CNN at {mismatched}. {remedy}")
    params = jax.tree_util.tree_map(lambda p: jnp.asarray(p, jnp.float32), params)
    return Pretrained(params, info)


def _shape_mismatches(template: Params, params: Params) -> list[str]:
    """Paths of leaves whose shape differs from ``template`` (or a count mismatch)."""
    t_leaves = jax.tree_util.tree_leaves_with_path(template)
    p_leaves = jax.tree_util.tree_leaves(params)
    if len(t_leaves) != len(p_leaves):
        return [f"{len(p_leaves)} arrays, expected {len(t_leaves)}"]
    return [jax.tree_util.keystr(path) for (path, t), p in zip(t_leaves, p_leaves)
            if tuple(np.shape(p)) != tuple(t.shape)]


@functools.lru_cache(maxsize=2)
def _cached_pretrained(name: str) -> Pretrained:
    return load_pretrained(name)


def fd_fmnist(images_a: np.ndarray, images_b: np.ndarray, params: Params | None = None,
              batch_size: int = 1000) -> float:
    """``fd_fmnist``: Frechet distance between two image sets in classifier feature space.

    The FID formula (Heusel et al. 2017) applied to the 128-d penultimate
    features of the shipped Fashion-MNIST classifier instead of Inception
    pool3 features. Values are not comparable to FID.

    Args:
      images_a: (N, 28, 28[, 1]) uint8 or float32 in [-1, 1], N >= 2.
      images_b: (M, 28, 28[, 1]) likewise.
      params: classifier params; default the shipped Fashion-MNIST weights.
      batch_size: images per jitted call.

    Returns:
      Squared Frechet distance (float, squared feature units).
    """
    if params is None:
        params = _cached_pretrained("fashion_mnist").params
    return sample_metrics.fd_from_features(features(params, images_a, batch_size),
                                    features(params, images_b, batch_size))
