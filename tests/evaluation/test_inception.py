"""Tests of lpc_jax.evaluation.inception (shapes, layer semantics, key mapping) and lpc_jax.evaluation.torch_checkpoint.

No real weights are needed: random tensors with the FID Inception's key names
and shapes are written as .npz, as a torch zip checkpoint and as a legacy torch
checkpoint (both produced here with ``pickle``, no torch), then read back.
"""

import collections
import io
import pickle
import zipfile

import jax.numpy as jnp
import numpy as np
import pytest

from lpc_jax.evaluation import inception, torch_checkpoint

# --------------------------------------------------------------------------- #
# Writing torch-format checkpoints without torch
# --------------------------------------------------------------------------- #


class _Global:
    """Pickled as a GLOBAL reference ``module.name`` (e.g. torch.FloatStorage)."""

    def __init__(self, module, name):
        self.module, self.name = module, name

    def __call__(self, *args):  # pickle requires reduce functions to be callable
        raise NotImplementedError


_FLOAT_STORAGE = _Global("torch", "FloatStorage")
_LONG_STORAGE = _Global("torch", "LongStorage")
_REBUILD = _Global("torch._utils", "_rebuild_tensor_v2")


class _Storage:
    def __init__(self, key, array):
        self.key, self.array = key, array


class _Tensor:
    """Pickles like a torch tensor: _rebuild_tensor_v2(storage, offset, size, stride, ...)."""

    def __init__(self, storage, offset, shape, stride):
        self.storage, self.offset, self.shape, self.stride = storage, offset, shape, stride

    def __reduce__(self):
        return (_REBUILD, (self.storage, self.offset, self.shape, self.stride, False, collections.OrderedDict()))


class _TorchPickler(pickle._Pickler):  # the pure-Python pickler lets save() be overridden
    def __init__(self, file, legacy):
        super().__init__(file, protocol=2)
        self.legacy = legacy

    def save(self, obj, save_persistent_id=True):
        if isinstance(obj, _Global):
            self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
            return
        super().save(obj, save_persistent_id)

    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            kind = _LONG_STORAGE if obj.array.dtype == np.int64 else _FLOAT_STORAGE
            pid = ("storage", kind, obj.key, "cpu", obj.array.size)
            return pid + (None,) if self.legacy else pid
        return None


def _as_torch_objects(state_dict, transpose_first=None):
    """state_dict of arrays -> (OrderedDict of _Tensor, {key: storage array}).

    ``transpose_first`` names one tensor stored non-contiguously (transposed
    storage with swapped strides, and a nonzero offset) to exercise strided views.
    """
    tensors, storages = collections.OrderedDict(), {}
    for i, (name, arr) in enumerate(state_dict.items()):
        key = str(i)
        arr = np.asarray(arr)
        if name == transpose_first:
            base = np.concatenate([np.zeros(3, arr.dtype), np.ascontiguousarray(arr.T).ravel()])
            stride = tuple(reversed([s // arr.itemsize for s in np.ascontiguousarray(arr.T).strides]))
            storages[key] = base
            tensors[name] = _Tensor(_Storage(key, base), 3, arr.shape, stride)
        else:
            contiguous = np.array(arr, order="C")  # (ascontiguousarray would make 0-d arrays 1-d)
            flat = contiguous.ravel()
            storages[key] = flat
            stride = tuple(s // arr.itemsize for s in contiguous.strides)
            tensors[name] = _Tensor(_Storage(key, flat), 0, arr.shape, stride)
    tensors._metadata = collections.OrderedDict([("", {"version": 1})])  # like torch's state_dict
    return tensors, storages


def write_torch_zip(path, state_dict, transpose_first=None):
    """Writes ``state_dict`` in torch's zip format (torch >= 1.6): archive/data.pkl + archive/data/<key>."""
    tensors, storages = _as_torch_objects(state_dict, transpose_first)
    buf = io.BytesIO()
    _TorchPickler(buf, legacy=False).dump(tensors)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", buf.getvalue())
        zf.writestr("archive/byteorder", "little")
        for key, arr in storages.items():
            zf.writestr(f"archive/data/{key}", arr.astype(arr.dtype.newbyteorder("<")).tobytes())
        zf.writestr("archive/version", "3\n")


def write_torch_legacy(path, state_dict, transpose_first=None):
    """Writes ``state_dict`` in torch's legacy (< 1.6) pickle-stream format."""
    tensors, storages = _as_torch_objects(state_dict, transpose_first)
    with open(path, "wb") as f:
        pickle.dump(0x1950A86A20F9469CFC6C, f, protocol=2)
        pickle.dump(1001, f, protocol=2)
        pickle.dump({"protocol_version": 1001, "little_endian": True,
                     "type_sizes": {"short": 2, "int": 4, "long": 4}}, f, protocol=2)
        _TorchPickler(f, legacy=True).dump(tensors)
        keys = sorted(storages)
        pickle.dump(keys, f, protocol=2)
        for key in keys:
            f.write(int(storages[key].size).to_bytes(8, "little"))
            f.write(storages[key].tobytes())


# --------------------------------------------------------------------------- #
# Fixtures
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def state_dict():
    """Random FID-Inception state_dict (torch layout) plus the extras a real file holds."""
    rng = np.random.default_rng(0)
    sd = {}
    for key, shape in inception.expected_state_dict_shapes().items():
        if key.endswith("conv.weight"):  # He init keeps activations O(1) through 94 layers
            sd[key] = (rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[1:]))).astype(np.float32)
        elif key.endswith("running_var"):
            sd[key] = rng.uniform(0.5, 2.0, shape).astype(np.float32)
        elif key.endswith("bn.weight"):
            sd[key] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        else:
            sd[key] = (0.1 * rng.standard_normal(shape)).astype(np.float32)
    sd["Conv2d_1a_3x3.bn.num_batches_tracked"] = np.array(0, np.int64)
    sd["fc.weight"] = rng.standard_normal((1008, 64)).astype(np.float32)  # real: (1008, 2048)
    sd["fc.bias"] = np.zeros(1008, np.float32)
    return sd


@pytest.fixture(scope="module")
def variables(state_dict):
    return inception.state_dict_to_variables(state_dict)


# --------------------------------------------------------------------------- #
# Checkpoint reading and key mapping
# --------------------------------------------------------------------------- #


def test_expected_keys_cover_the_fid_network():
    shapes = inception.expected_state_dict_shapes()
    assert len(shapes) == 94 * 5  # 94 BasicConv2d, each conv.weight + 4 batch-norm tensors
    assert shapes["Conv2d_1a_3x3.conv.weight"] == (32, 3, 3, 3)
    assert shapes["Mixed_6b.branch7x7_2.conv.weight"] == (128, 128, 1, 7)
    assert shapes["Mixed_7c.branch_pool.conv.weight"] == (192, 2048, 1, 1)
    assert shapes["Mixed_7c.branch3x3dbl_3b.bn.running_var"] == (384,)


@pytest.mark.parametrize("fmt", ["npz", "zip", "legacy"])
def test_read_state_dict_roundtrip(tmp_path, state_dict, fmt):
    path = str(tmp_path / ("w.npz" if fmt == "npz" else "w.pth"))
    transposed = "Mixed_5b.branch1x1.conv.weight"
    if fmt == "npz":
        np.savez(path, **state_dict)
    elif fmt == "zip":
        write_torch_zip(path, state_dict, transpose_first=transposed)
    else:
        write_torch_legacy(path, state_dict, transpose_first=transposed)
    loaded = torch_checkpoint.read_state_dict(path)
    assert set(loaded) == set(state_dict)
    for key, value in state_dict.items():
        assert loaded[key].dtype == value.dtype and loaded[key].shape == value.shape, key
        np.testing.assert_array_equal(loaded[key], value, err_msg=key)
    converted = str(tmp_path / "converted.npz")
    torch_checkpoint.convert_checkpoint_to_npz(path, converted)
    again = torch_checkpoint.read_state_dict(converted)
    assert set(again) == set(state_dict)
    for key, value in state_dict.items():
        np.testing.assert_array_equal(again[key], value, err_msg=key)


def test_load_fid_inception_from_torch_zip_maps_layouts(tmp_path, state_dict):
    path = str(tmp_path / inception.FID_WEIGHTS_FILENAME)
    write_torch_zip(path, state_dict)
    variables = inception.load_fid_inception(path)
    conv = variables["params"]["Mixed_6c"]["branch7x7dbl_3"]["conv"]["kernel"]
    torch_w = state_dict["Mixed_6c.branch7x7dbl_3.conv.weight"]  # OIHW (160, 160, 1, 7)
    np.testing.assert_array_equal(np.asarray(conv), torch_w.transpose(2, 3, 1, 0))
    bn = variables["params"]["Conv2d_4a_3x3"]["bn"]
    stats = variables["batch_stats"]["Conv2d_4a_3x3"]["bn"]
    np.testing.assert_array_equal(np.asarray(bn["scale"]), state_dict["Conv2d_4a_3x3.bn.weight"])
    np.testing.assert_array_equal(np.asarray(bn["bias"]), state_dict["Conv2d_4a_3x3.bn.bias"])
    np.testing.assert_array_equal(np.asarray(stats["mean"]), state_dict["Conv2d_4a_3x3.bn.running_mean"])
    np.testing.assert_array_equal(np.asarray(stats["var"]), state_dict["Conv2d_4a_3x3.bn.running_var"])
    # And back again.
    back = inception.variables_to_state_dict(variables)
    for key, value in back.items():
        np.testing.assert_array_equal(value, state_dict[key], err_msg=key)


def test_missing_weights_error_says_what_to_fetch(tmp_path, monkeypatch):
    monkeypatch.setenv(inception.WEIGHTS_ENV_VAR, str(tmp_path / "nope.pth"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(inception, "default_weight_paths",
                        lambda: [str(tmp_path / "nope.pth"), str(tmp_path / "torch" / "x.pth")])
    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05-6726825d.pth") as err:
        inception.load_fid_inception()
    assert inception.FID_WEIGHTS_URL in str(err.value)
    with pytest.raises(FileNotFoundError, match="github.com/mseitzer/pytorch-fid"):
        inception.load_fid_inception(str(tmp_path / "also_missing.pth"))


def test_wrong_or_malicious_checkpoints_are_rejected(tmp_path, state_dict):
    wrong = dict(state_dict)
    del wrong["Mixed_7c.branch1x1.conv.weight"]
    wrong["head.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match="missing keys.*Mixed_7c.branch1x1.conv.weight"):
        inception.state_dict_to_variables(wrong)
    bad_shape = dict(state_dict)
    bad_shape["Conv2d_1a_3x3.conv.weight"] = np.zeros((32, 1, 3, 3), np.float32)
    with pytest.raises(ValueError, match="wrong shapes"):
        inception.state_dict_to_variables(bad_shape)
    # A pickle that would call os.system must not be executed.
    evil = tmp_path / "evil.pth"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("archive/data.pkl", b"cos\nsystem\n(S'echo pwned'\ntR.")
    with pytest.raises(ValueError, match="does not allow"):
        torch_checkpoint.read_state_dict(str(evil))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        torch_checkpoint.read_state_dict(str(garbage))


# --------------------------------------------------------------------------- #
# Network semantics
# --------------------------------------------------------------------------- #


def test_features_shape_on_grayscale_at_reduced_resolution(variables):
    images = np.random.default_rng(1).integers(0, 256, (3, 28, 28, 1)).astype(np.uint8)
    # 75x75 is the smallest input Inception-v3 accepts; real FID uses 299.
    feats = inception.inception_features(variables, images, batch_size=2, size=75)
    assert feats.shape == (3, inception.FEATURE_DIM) and feats.dtype == np.float32
    assert np.all(np.isfinite(feats)) and np.all(feats >= 0)  # pool of ReLU outputs
    # Grayscale is tiled: an explicit 3-channel copy gives the same features.
    rgb = np.repeat(images, 3, axis=-1)
    np.testing.assert_allclose(inception.inception_features(variables, rgb, batch_size=2, size=75),
                               feats, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=">= 75"):
        inception.inception_features(variables, images, size=64)


def test_basic_conv2d_matches_torch_semantics():
    """Conv (OIHW weights, stride, padding) + eval BatchNorm (eps 1e-3) + ReLU against NumPy."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 9, 8, 3)).astype(np.float32)
    w = rng.standard_normal((4, 3, 3, 2)).astype(np.float32)  # OIHW, kernel (3, 2)
    gamma, beta = rng.uniform(0.5, 1.5, 4), rng.standard_normal(4)
    mean, var = rng.standard_normal(4), rng.uniform(0.5, 2.0, 4)
    stride, (ph, pw) = 2, (1, 0)
    module = inception.BasicConv2d(4, (3, 2), stride=stride, padding=(ph, pw))
    variables = {"params": {"conv": {"kernel": jnp.asarray(w.transpose(2, 3, 1, 0))},
                            "bn": {"scale": jnp.asarray(gamma, jnp.float32), "bias": jnp.asarray(beta, jnp.float32)}},
                 "batch_stats": {"bn": {"mean": jnp.asarray(mean, jnp.float32), "var": jnp.asarray(var, jnp.float32)}}}
    got = np.asarray(module.apply(variables, x))

    xp = np.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
    out_h, out_w = (xp.shape[1] - 3) // stride + 1, (xp.shape[2] - 2) // stride + 1
    ref = np.zeros((2, out_h, out_w, 4))
    for i in range(out_h):
        for j in range(out_w):
            patch = xp[:, i * stride : i * stride + 3, j * stride : j * stride + 2, :]  # (N, kh, kw, C)
            ref[:, i, j, :] = np.einsum("nhwc,ochw->no", patch, w)
    ref = np.maximum((ref - mean) / np.sqrt(var + 1e-3) * gamma + beta, 0.0)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_fid_pools_follow_tensorflow_padding():
    x = jnp.arange(16, dtype=jnp.float32).reshape(1, 4, 4, 1)
    avg = np.asarray(inception._avg_pool_3x3(x))[0, :, :, 0]
    assert avg[0, 0] == pytest.approx((0 + 1 + 4 + 5) / 4)  # zeros from padding not counted
    assert avg[1, 1] == pytest.approx(np.mean([0, 1, 2, 4, 5, 6, 8, 9, 10]))
    mx = np.asarray(inception._max_pool(-x, 1, 1))[0, :, :, 0]
    assert mx[0, 0] == 0.0  # -inf padding, so a negative map is not clipped at 0


def _torch_bilinear_1d(n_in, n_out):
    """Interpolation matrix of F.interpolate(mode='bilinear', align_corners=False) along one axis."""
    m = np.zeros((n_out, n_in))
    scale = n_in / n_out
    for i in range(n_out):
        src = max((i + 0.5) * scale - 0.5, 0.0)
        i0 = int(np.floor(src))
        i1 = min(i0 + 1, n_in - 1)
        lam = src - i0
        m[i, i0] += 1 - lam
        m[i, i1] += lam
    return m


@pytest.mark.parametrize("n_in,n_out", [(28, 299), (9, 5)])
def test_resize_matches_torch_bilinear(n_in, n_out):
    img = np.random.default_rng(3).uniform(-1, 1, (1, n_in, n_in, 1)).astype(np.float32)
    got = np.asarray(inception.preprocess(jnp.asarray(img), size=n_out))
    assert got.shape == (1, n_out, n_out, 3)
    m = _torch_bilinear_1d(n_in, n_out)
    ref = m @ img[0, :, :, 0] @ m.T
    for c in range(3):
        np.testing.assert_allclose(got[0, :, :, c], ref, atol=1e-5)
