"""Reads PyTorch ``state_dict`` checkpoints into NumPy arrays, without torch.

Both formats of ``torch.save`` are parsed: the zip format of torch >= 1.6
(``<dir>/data.pkl`` plus one file per storage under ``<dir>/data/``) and the
older "legacy" pickle stream (magic number, protocol version, system info,
the pickled object, then the storages' raw bytes). A restricted unpickler
builds only ``OrderedDict``s and strided NumPy views of storages: any other
global a pickle references (``os.system``, a module class, ...) is refused, so
an untrusted file cannot execute code. ``.npz`` files with the same key names
are read with ``np.load(allow_pickle=False)``.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import zipfile
from typing import Any

import numpy as np

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": "bfloat16", "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


class _StorageType:
    """Stand-in for ``torch.<X>Storage`` classes referenced by a checkpoint's pickle."""

    def __init__(self, name: str):
        self.name = name
        self.itemsize = 2 if name == "BFloat16Storage" else np.dtype(_STORAGE_DTYPES[name]).itemsize

    def decode(self, raw: bytes) -> np.ndarray:
        if self.name == "BFloat16Storage":
            return (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32)
        return np.frombuffer(raw, np.dtype(_STORAGE_DTYPES[self.name]).newbyteorder("<"))


class _Storage:
    """A storage referenced by the pickle; its bytes are attached after unpickling."""

    def __init__(self, storage_type: _StorageType, key: str):
        self.type, self.key, self.array = storage_type, key, None


class _TensorRef:
    """What ``_rebuild_tensor_v2`` returns: a strided view into a storage, materialised later."""

    def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

    def materialise(self) -> np.ndarray:
        flat = self.storage.array
        if flat is None:
            raise ValueError(f"checkpoint has no data for storage {self.storage.key!r}")
        if any(s == 0 for s in self.size):
            return np.zeros(self.size, flat.dtype)
        last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
        if self.offset < 0 or last >= flat.shape[0]:
            raise ValueError(f"tensor view (offset {self.offset}, size {self.size}, stride {self.stride}) "
                             f"runs past storage {self.storage.key!r} of {flat.shape[0]} elements")
        view = np.lib.stride_tricks.as_strided(
            flat[self.offset :], shape=self.size, strides=[s * flat.itemsize for s in self.stride])
        return np.array(view, dtype=view.dtype.newbyteorder("="))  # own, writable, native order


def _rebuild_tensor_v2(storage, storage_offset, size, stride, *unused):
    del unused  # requires_grad, backward_hooks[, metadata]
    return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_tensor(storage, storage_offset, size, stride):  # torch < 0.4 checkpoints
    return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_parameter(data_, requires_grad=False, backward_hooks=None):
    del requires_grad, backward_hooks
    return data_


class _TorchUnpickler(pickle.Unpickler):
    """Unpickler that allows only what a ``state_dict`` of plain tensors needs."""

    def __init__(self, file, legacy: bool):
        super().__init__(file)
        self.legacy = legacy
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if (module, name) == ("torch._utils", "_rebuild_tensor"):
            return _rebuild_tensor
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return _rebuild_parameter
        if module in ("torch", "torch.cuda") and name in _STORAGE_DTYPES:  # cuda: saved from GPU
            return _StorageType(name)
        raise pickle.UnpicklingError(
            f"checkpoint references {module}.{name}, which this torch-free reader does not allow; "
            f"only state_dicts of plain tensors are supported. Convert the file to .npz on a "
            f"machine with torch (np.savez(path, **{{k: v.numpy() for k, v in sd.items()}})).")

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        storage_type, key = pid[1], str(pid[2])
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unsupported storage type {storage_type!r}")
        if self.legacy and len(pid) > 5 and pid[5] is not None:
            raise pickle.UnpicklingError("legacy checkpoints with storage views are not supported")
        if key not in self.storages:
            self.storages[key] = _Storage(storage_type, key)
        return self.storages[key]


class _NoGlobalsUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"unexpected global {module}.{name} in checkpoint header")


def _materialise(obj: Any, path: str) -> dict[str, np.ndarray]:
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state_dict")
    out = {}
    for key, value in obj.items():
        if not isinstance(value, _TensorRef):
            raise ValueError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
        out[str(key)] = value.materialise()
    return out


def _read_zip_checkpoint(path: str) -> dict[str, np.ndarray]:
    with zipfile.ZipFile(path) as zf:
        pkl = [n for n in zf.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pkl) != 1:
            raise ValueError(f"{path} is a zip but not a torch checkpoint (no single <dir>/data.pkl)")
        prefix = pkl[0][: -len("data.pkl")]
        if prefix + "byteorder" in zf.namelist() and zf.read(prefix + "byteorder").strip() != b"little":
            raise ValueError(f"{path}: big-endian torch checkpoints are not supported")
        unpickler = _TorchUnpickler(io.BytesIO(zf.read(pkl[0])), legacy=False)
        obj = unpickler.load()
        for key, storage in unpickler.storages.items():
            name = f"{prefix}data/{key}"
            try:
                raw = zf.read(name)
            except KeyError:
                raise ValueError(f"{path}: storage file {name} is missing") from None
            usable = len(raw) - len(raw) % storage.type.itemsize
            storage.array = storage.type.decode(raw[:usable])
    return _materialise(obj, path)


def _read_legacy_checkpoint(path: str) -> dict[str, np.ndarray]:
    with open(path, "rb") as f:
        header = _NoGlobalsUnpickler(f)
        if header.load() != _LEGACY_MAGIC:
            raise ValueError(f"{path} is neither a zip nor a legacy torch checkpoint (bad magic number)")
        if header.load() != _LEGACY_PROTOCOL:
            raise ValueError(f"{path}: unsupported legacy torch protocol version")
        sys_info = header.load()
        if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
            raise ValueError(f"{path}: big-endian torch checkpoints are not supported")
        unpickler = _TorchUnpickler(f, legacy=True)
        obj = unpickler.load()
        keys = _NoGlobalsUnpickler(f).load()
        for key in keys:
            storage = unpickler.storages.get(str(key))
            if storage is None:
                raise ValueError(f"{path}: storage {key!r} listed but never referenced")
            numel = int.from_bytes(f.read(8), "little", signed=True)
            raw = f.read(numel * storage.type.itemsize)
            if numel < 0 or len(raw) != numel * storage.type.itemsize:
                raise ValueError(f"{path} is truncated (storage {key!r})")
            storage.array = storage.type.decode(raw)
    return _materialise(obj, path)


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """Reads a torch ``state_dict`` checkpoint (zip or legacy format) or an ``.npz``, without torch.

    Args:
      path: ``.pth``/``.pt`` written by ``torch.save(state_dict)``, or ``.npz``
        whose keys are the state_dict's keys.

    Returns:
      ``{torch key: NumPy array}`` in torch layout and dtype.

    Raises:
      FileNotFoundError: no such file.
      ValueError: the file is not a readable state_dict.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        if path.endswith(".npz"):
            with np.load(path, allow_pickle=False) as npz:
                return {k: npz[k] for k in npz.files}
        if zipfile.is_zipfile(path):
            return _read_zip_checkpoint(path)
        return _read_legacy_checkpoint(path)
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, OSError, KeyError, TypeError) as e:
        raise ValueError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e


def convert_checkpoint_to_npz(src: str, dst: str) -> None:
    """Writes the tensors of a torch checkpoint ``src`` to ``dst`` (.npz, same key names)."""
    np.savez(dst, **read_state_dict(src))
