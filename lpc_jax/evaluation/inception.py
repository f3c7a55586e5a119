"""FID Inception-v3 in Flax linen, and the mapping of pytorch-fid's weights onto it.

The network is the "FID Inception" of Heusel et al. 2017 ("GANs Trained by a
Two Time-Scale Update Rule Converge to a Local Nash Equilibrium"), i.e.
TensorFlow's 2015-12-05 Inception-v3 graph as ported by pytorch-fid
(github.com/mseitzer/pytorch-fid): torchvision's Inception-v3 (Szegedy et al.
2016) with the ``FIDInceptionA/C/E_1/E_2`` patches:

* the 3x3 average pools of the A, C and E_1 blocks ignore padded zeros
  (``count_include_pad=False``, TensorFlow's behaviour);
* the pool branch of the last block (``Mixed_7c``, E_2) max-pools instead of
  average-pooling.

Features are the 2048-d global average pool ("pool3") after ``Mixed_7c``.
Preprocessing follows pytorch-fid: bilinear resize to 299x299 with
``align_corners=False`` and no antialiasing (``F.interpolate``), inputs in
[-1, 1]; grayscale images are tiled to 3 channels. (FID values from this
pipeline match pytorch-fid's, which differ slightly from the original
TensorFlow code because TF resized differently.)

Weights: pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (a torch
``state_dict``), read without torch by :mod:`lpc_jax.evaluation.torch_checkpoint` (which
also accepts a ``.npz`` with the same key names). Layout conversion: conv
kernels OIHW -> HWIO; ``bn.weight/bias`` -> ``scale/bias``;
``bn.running_mean/var`` -> ``batch_stats`` ``mean/var``; ``fc.*`` (the
1008-way classifier) and ``*.num_batches_tracked`` are ignored.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from lpc_jax.data import sources
from lpc_jax.evaluation import sample_metrics, torch_checkpoint

Variables = dict[str, Any]

FID_WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   + FID_WEIGHTS_FILENAME)
WEIGHTS_ENV_VAR = "LPC_JAX_FID_INCEPTION"
FEATURE_DIM = 2048
INPUT_SIZE = 299
MIN_INPUT_SIZE = 75  # smallest size whose Mixed_7a output is still >= 1x1
_BN_EPS = 1e-3  # torchvision BasicConv2d


def default_weight_paths() -> list[str]:
    """Where :func:`load_fid_inception` looks when no path is given, in order.

    ``$LPC_JAX_FID_INCEPTION``, torch hub's cache (where pytorch-fid downloads
    the file), and ``lpc_jax/assets/``.
    """
    paths = []
    if os.environ.get(WEIGHTS_ENV_VAR):
        paths.append(os.environ[WEIGHTS_ENV_VAR])
    torch_home = os.environ.get("TORCH_HOME", os.path.join(os.path.expanduser("~"), ".cache", "torch"))
    paths.append(os.path.join(torch_home, "hub", "checkpoints", FID_WEIGHTS_FILENAME))
    paths.append(os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", FID_WEIGHTS_FILENAME))
    return paths


# --------------------------------------------------------------------------- #
# Network
# --------------------------------------------------------------------------- #


class BasicConv2d(nn.Module):
    """torchvision's BasicConv2d: Conv (no bias) -> BatchNorm (eps 1e-3, running stats) -> ReLU.

    ``padding`` is PyTorch's symmetric (pad_h, pad_w). NHWC in, NHWC out.
    """

    features: int
    kernel: tuple[int, int]
    stride: int = 1
    padding: tuple[int, int] = (0, 0)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        ph, pw = self.padding
        x = nn.Conv(self.features, self.kernel, (self.stride, self.stride),
                    padding=((ph, ph), (pw, pw)), use_bias=False, name="conv")(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=_BN_EPS, name="bn")(x)
        return nn.relu(x)


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
    """3x3 stride-1 average pool, pad 1, padded zeros not counted (TF / FID blocks)."""
    return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool(x: jax.Array, stride: int, pad: int = 0) -> jax.Array:
    """3x3 max pool with PyTorch's floor-mode output size (padding with -inf)."""
    return nn.max_pool(x, (3, 3), (stride, stride), padding=((pad, pad), (pad, pad)))


class InceptionA(nn.Module):
    """FIDInceptionA (Mixed_5b/c/d): 64 + 64 + 96 + pool_features channels."""

    pool_features: int

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv2d(64, (1, 1), name="branch1x1")(x)
        b5 = BasicConv2d(48, (1, 1), name="branch5x5_1")(x)
        b5 = BasicConv2d(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
        b3 = BasicConv2d(64, (1, 1), name="branch3x3dbl_1")(x)
        b3 = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
        b3 = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
        bp = BasicConv2d(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    """InceptionB (Mixed_6a, grid 35 -> 17): 384 + 96 + C_in channels."""

    @nn.compact
    def __call__(self, x):
        b3 = BasicConv2d(384, (3, 3), stride=2, name="branch3x3")(x)
        bd = BasicConv2d(64, (1, 1), name="branch3x3dbl_1")(x)
        bd = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = BasicConv2d(96, (3, 3), stride=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool(x, 2)], axis=-1)


class InceptionC(nn.Module):
    """FIDInceptionC (Mixed_6b..e): factorised 7x7 convs, 4 x 192 channels."""

    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c7 = self.channels_7x7
        b1 = BasicConv2d(192, (1, 1), name="branch1x1")(x)
        b7 = BasicConv2d(c7, (1, 1), name="branch7x7_1")(x)
        b7 = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = BasicConv2d(c7, (1, 1), name="branch7x7dbl_1")(x)
        bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = BasicConv2d(192, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    """InceptionD (Mixed_7a, grid 17 -> 8): 320 + 192 + C_in channels."""

    @nn.compact
    def __call__(self, x):
        b3 = BasicConv2d(192, (1, 1), name="branch3x3_1")(x)
        b3 = BasicConv2d(320, (3, 3), stride=2, name="branch3x3_2")(b3)
        b7 = BasicConv2d(192, (1, 1), name="branch7x7x3_1")(x)
        b7 = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = BasicConv2d(192, (3, 3), stride=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool(x, 2)], axis=-1)


class InceptionE(nn.Module):
    """FIDInceptionE_1 (Mixed_7b, avg pool) / FIDInceptionE_2 (Mixed_7c, max pool): 2048 channels."""

    use_max_pool: bool

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv2d(320, (1, 1), name="branch1x1")(x)
        b3 = BasicConv2d(384, (1, 1), name="branch3x3_1")(x)
        b3 = jnp.concatenate([
            BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
            BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3),
        ], axis=-1)
        bd = BasicConv2d(448, (1, 1), name="branch3x3dbl_1")(x)
        bd = BasicConv2d(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate([
            BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
            BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd),
        ], axis=-1)
        pooled = _max_pool(x, 1, 1) if self.use_max_pool else _avg_pool_3x3(x)
        bp = BasicConv2d(192, (1, 1), name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
    """FID Inception-v3 up to pool3.

    Input (N, H, W, 3) float32 in [-1, 1], H, W >= 75 (299 for real FID).
    Output (N, 2048) float32 pool3 features. Module names match the torch
    ``state_dict`` keys (``Conv2d_1a_3x3``, ``Mixed_5b.branch1x1``, ...).
    """

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = BasicConv2d(32, (3, 3), stride=2, name="Conv2d_1a_3x3")(x)
        x = BasicConv2d(32, (3, 3), name="Conv2d_2a_3x3")(x)
        x = BasicConv2d(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
        x = _max_pool(x, 2)
        x = BasicConv2d(80, (1, 1), name="Conv2d_3b_1x1")(x)
        x = BasicConv2d(192, (3, 3), name="Conv2d_4a_3x3")(x)
        x = _max_pool(x, 2)
        x = InceptionA(32, name="Mixed_5b")(x)
        x = InceptionA(64, name="Mixed_5c")(x)
        x = InceptionA(64, name="Mixed_5d")(x)
        x = InceptionB(name="Mixed_6a")(x)
        x = InceptionC(128, name="Mixed_6b")(x)
        x = InceptionC(160, name="Mixed_6c")(x)
        x = InceptionC(160, name="Mixed_6d")(x)
        x = InceptionC(192, name="Mixed_6e")(x)
        x = InceptionD(name="Mixed_7a")(x)
        x = InceptionE(use_max_pool=False, name="Mixed_7b")(x)
        x = InceptionE(use_max_pool=True, name="Mixed_7c")(x)
        return x.mean(axis=(1, 2))


@functools.lru_cache(maxsize=1)
def _variable_shapes_cached() -> Variables:
    return jax.eval_shape(
        lambda: FIDInceptionV3().init(jax.random.key(0), jnp.zeros((1, MIN_INPUT_SIZE, MIN_INPUT_SIZE, 3))))


def variable_shapes() -> Variables:
    """``{'params': ..., 'batch_stats': ...}`` of ShapeDtypeStructs (Flax layout), no compute."""
    return jax.tree_util.tree_map(lambda s: s, _variable_shapes_cached())


# --------------------------------------------------------------------------- #
# Preprocessing and features
# --------------------------------------------------------------------------- #


def preprocess(images: jax.Array, size: int = INPUT_SIZE) -> jax.Array:
    """Tiles grayscale to RGB and resizes like pytorch-fid.

    Bilinear, half-pixel centres (``align_corners=False``), no antialiasing,
    which is what ``torch.nn.functional.interpolate(mode='bilinear')`` does.

    Args:
      images: (N, H, W, C) float32 in [-1, 1], C in {1, 3}.
      size: output height and width (299 for FID; >= 75).

    Returns:
      (N, size, size, 3) float32 in [-1, 1].
    """
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images must be (N, H, W, 1 or 3); got {images.shape}")
    if images.shape[-1] == 1:
        images = jnp.repeat(images, 3, axis=-1)
    if images.shape[1:3] == (size, size):
        return images
    return jax.image.resize(images, (images.shape[0], size, size, 3), "bilinear", antialias=False)


@functools.partial(jax.jit, static_argnames="size")
def _forward(variables: Variables, images: jax.Array, size: int) -> jax.Array:
    return FIDInceptionV3().apply(variables, preprocess(images, size))


def _as_float_images(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images must be (N, H, W), (N, H, W, 1) or (N, H, W, 3); got {images.shape}")
    if images.dtype == np.uint8:
        return sources.to_float(images)
    if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"images must be uint8 or float in [-1, 1]; got dtype {images.dtype}")
    return images.astype(np.float32, copy=False)


def inception_features(variables: Variables, images: np.ndarray, batch_size: int = 50,
                       size: int = INPUT_SIZE) -> np.ndarray:
    """Pool3 features of the FID Inception, batched and jitted.

    Args:
      variables: from :func:`load_fid_inception`.
      images: (N, H, W[, C]) with C in {1, 3}; uint8 (0..255) or float32 in
        [-1, 1]. (pytorch-fid takes [0, 1] and maps it to [-1, 1]; here images
        are already on the [-1, 1] scale of :func:`lpc_jax.data.sources.to_float`.)
      batch_size: images per jitted call (the last batch is zero-padded).
      size: resize target; keep 299 for FID (smaller only for tests).

    Returns:
      (N, 2048) float32.
    """
    if size < MIN_INPUT_SIZE:
        raise ValueError(f"size must be >= {MIN_INPUT_SIZE} for Inception-v3; got {size}")
    x = _as_float_images(images)
    n = x.shape[0]
    outs = []
    for start in range(0, n, batch_size):
        batch = x[start : start + batch_size]
        valid = batch.shape[0]
        if valid < batch_size and n > batch_size:
            batch = np.concatenate([batch, np.zeros((batch_size - valid, *batch.shape[1:]), np.float32)])
        outs.append(np.asarray(_forward(variables, batch, size))[:valid])
    return np.concatenate(outs) if outs else np.zeros((0, FEATURE_DIM), np.float32)


def fid(variables: Variables, images_a: np.ndarray, images_b: np.ndarray, batch_size: int = 50) -> float:
    """FID (Heusel et al. 2017) between two image sets, via pool3 features at 299x299.

    Use >= 10,000 images per set for numbers comparable to the literature
    (FID is biased upwards for small sets).
    """
    return sample_metrics.fd_from_features(inception_features(variables, images_a, batch_size),
                                    inception_features(variables, images_b, batch_size))


# --------------------------------------------------------------------------- #
# torch state_dict <-> Flax variables
# --------------------------------------------------------------------------- #


def _torch_name(flat_key: tuple[str, ...]) -> str:
    """Flax flat key ('params', ..., 'conv', 'kernel') -> torch state_dict key."""
    collection, *module, leaf = flat_key
    rename = {("params", "kernel"): "weight", ("params", "scale"): "weight", ("params", "bias"): "bias",
              ("batch_stats", "mean"): "running_mean", ("batch_stats", "var"): "running_var"}
    if (collection, leaf) not in rename:
        raise ValueError(f"unexpected Flax variable {'/'.join(flat_key)}")
    return ".".join([*module, rename[(collection, leaf)]])


def _to_torch_layout(flat_key: tuple[str, ...], value: np.ndarray) -> np.ndarray:
    return np.transpose(value, (3, 2, 0, 1)) if flat_key[-1] == "kernel" else value  # HWIO -> OIHW


def _from_torch_layout(flat_key: tuple[str, ...], value: np.ndarray) -> np.ndarray:
    return np.transpose(value, (2, 3, 1, 0)) if flat_key[-1] == "kernel" else value  # OIHW -> HWIO


def expected_state_dict_shapes() -> dict[str, tuple[int, ...]]:
    """torch key -> shape (torch layout) of every tensor the network needs."""
    flat = traverse_util.flatten_dict(variable_shapes())
    return {_torch_name(k): tuple(np.shape(_to_torch_layout(k, np.empty(v.shape, np.uint8))))
            for k, v in flat.items()}


def _ignored(key: str) -> bool:
    return key.startswith(("fc.", "AuxLogits.")) or key.endswith(".num_batches_tracked")


def state_dict_to_variables(state_dict: dict[str, np.ndarray]) -> Variables:
    """Maps a pytorch-fid ``state_dict`` (NumPy arrays, torch layout) to Flax variables.

    Raises:
      ValueError: missing keys, unexpected keys (other than ``fc.*``,
        ``AuxLogits.*`` and ``*.num_batches_tracked``) or shape mismatches,
        listing the offending names.
    """
    flat_shapes = traverse_util.flatten_dict(variable_shapes())
    names = {k: _torch_name(k) for k in flat_shapes}
    missing = sorted(set(names.values()) - set(state_dict))
    unexpected = sorted(k for k in set(state_dict) - set(names.values()) if not _ignored(k))
    if missing or unexpected:
        raise ValueError(
            f"not an FID Inception-v3 state_dict: {len(missing)} missing keys {missing[:5]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:5]}. Expected pytorch-fid's "
            f"{FID_WEIGHTS_FILENAME}.")
    flat = {}
    bad = []
    for k, shape in flat_shapes.items():
        value = _from_torch_layout(k, np.asarray(state_dict[names[k]], np.float32))
        if value.shape != tuple(shape.shape):
            bad.append(f"{names[k]}: {np.shape(state_dict[names[k]])}")
        flat[k] = jnp.asarray(value)
    if bad:
        raise ValueError(f"state_dict tensors with wrong shapes (torch layout): {bad[:5]}")
    return traverse_util.unflatten_dict(flat)


def variables_to_state_dict(variables: Variables) -> dict[str, np.ndarray]:
    """Inverse of :func:`state_dict_to_variables` (torch key names and layout, float32)."""
    return {_torch_name(k): np.ascontiguousarray(_to_torch_layout(k, np.asarray(v, np.float32)))
            for k, v in traverse_util.flatten_dict(variables).items()}


def load_fid_inception(path: str | None = None) -> Variables:
    """Loads the FID Inception weights as Flax variables.

    Args:
      path: the checkpoint (``.pth`` or ``.npz``). Default: the first existing
        file of :func:`default_weight_paths` (``$LPC_JAX_FID_INCEPTION``, torch
        hub's cache, ``lpc_jax/assets/``).

    Returns:
      ``{'params': ..., 'batch_stats': ...}`` for :class:`FIDInceptionV3`.

    Raises:
      FileNotFoundError: no weights file; the message says which file to get
        and where to put it (this machine cannot download it).
      ValueError: the file is not the FID Inception state_dict.
    """
    candidates = [path] if path is not None else default_weight_paths()
    found = next((p for p in candidates if os.path.isfile(p)), None)
    if found is None:
        raise FileNotFoundError(
            f"FID Inception weights not found (looked in: {', '.join(candidates)}). Nothing is "
            f"downloaded at run time. On a connected machine fetch {FID_WEIGHTS_FILENAME} "
            f"(pytorch-fid's weights, ~92 MB) from {FID_WEIGHTS_URL} , e.g. `wget {FID_WEIGHTS_URL}`, "
            f"copy it here and pass its path, set ${WEIGHTS_ENV_VAR}=/path/to/it, or place it in "
            f"{candidates[-1] if path is None else 'lpc_jax/assets/'}.")
    return state_dict_to_variables(torch_checkpoint.read_state_dict(found))
