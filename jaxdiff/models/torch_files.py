"""Reading the tensors of a PyTorch file (``torch.save`` state dict or a TorchScript archive) without PyTorch.

Both are zip archives: ``<root>/data.pkl`` is a pickle whose tensors refer, by persistent id, to raw little-endian
storages ``<root>/data/<key>``. Only the classes a tensor file needs are resolved (tensors, storages, ordered dicts,
TorchScript module objects); anything else in the pickle is refused, so reading a file runs no code from it.
"""

from __future__ import annotations

import collections
import os
import pickle
import zipfile

import numpy as np

from jaxdiff.errors import CheckpointError, MissingFileError

__all__ = [
    "read_tensors",
]

_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class _StorageType:
    def __init__(self, dtype):
        self.dtype = np.dtype(dtype)


class _ScriptObject:
    """A TorchScript module in the pickle: its attributes (parameters, buffers, submodules) as set by BUILD."""

    def __setstate__(self, state):
        self.state = state if isinstance(state, dict) else {}


def _rebuild_tensor(storage, offset, size, stride, *_unused):
    """The tensor ``size``/``stride`` views in ``storage`` from ``offset``, copied; refused if the view would reach
    outside the storage (a crafted or corrupt file: ``as_strided`` itself checks nothing)."""
    itemsize = storage.dtype.itemsize
    size, stride = tuple(int(n) for n in size), tuple(int(n) for n in stride)
    if len(size) != len(stride) or any(n < 0 for n in size) or any(s < 0 for s in stride) or offset < 0:
        raise pickle.UnpicklingError(f"A tensor with size {size}, stride {stride}, offset {offset}: not a valid view.")
    if 0 in size:
        return np.zeros(size, storage.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))  # the furthest element read
    if last >= len(storage):
        raise pickle.UnpicklingError(
            f"A tensor of size {size} (stride {stride}, offset {offset}) reads element {last} of a storage of "
            f"{len(storage)}: the file is corrupt or crafted."
        )
    if not size:
        return storage[offset].copy()
    view = np.lib.stride_tricks.as_strided(
        storage[offset:], shape=tuple(size), strides=tuple(s * itemsize for s in stride)
    )
    return np.array(view)


def _rebuild_parameter(data, *_unused):
    return data


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, root: str):
        super().__init__(file)
        self._archive, self._root, self._storages = archive, root, {}

    def find_class(self, module, name):
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module.startswith("__torch__"):
            return _ScriptObject
        if module == "torch.jit._pickle" and name.startswith("build_"):  # typed lists of TorchScript attributes
            return lambda items: items
        if module == "torch.jit._pickle" and name == "restore_type_tag":
            return lambda value, _tag: value
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a tensor file; refusing to load it.")

    def persistent_load(self, pid):
        kind, storage_type, key, _location, _numel = pid
        if kind != "storage":
            raise pickle.UnpicklingError(f"Unknown persistent id {kind!r}.")
        if key not in self._storages:
            raw = self._archive.read(f"{self._root}/data/{key}")
            self._storages[key] = np.frombuffer(raw, storage_type.dtype)
        return self._storages[key]


def _flatten(obj, prefix: str, out: dict[str, np.ndarray]) -> None:
    if isinstance(obj, np.ndarray):
        out[prefix] = obj
    elif isinstance(obj, _ScriptObject):
        for k, v in obj.state.items():
            if k != "training":
                _flatten(v, f"{prefix}.{k}" if prefix else k, out)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)


def read_tensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of a PyTorch zip file as ``{dotted name: numpy array}`` (a state dict's keys, or a TorchScript
    module's attribute paths such as ``net.layers.conv.weight``).

    Raises:
      FileNotFoundError: no such file.
      ValueError: the file is not a PyTorch zip archive (or is truncated).
    """
    if not os.path.isfile(path):
        raise MissingFileError(f"No such file: {path}")
    with open(path, "rb") as f:
        if f.read(1) == b"\x80" and not zipfile.is_zipfile(path):  # a bare pickle stream: torch.save before 1.6
            raise CheckpointError(
                f"{path} is in PyTorch's legacy (pre-1.6) format, which jaxdiff does not read (reading it safely needs "
                "its storages' layout). Re-save it once as a zip file: `torch.save(torch.load(old), new)`."
            )
    pkl = None
    try:
        with zipfile.ZipFile(path) as archive:
            pkl = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
            if pkl:
                with archive.open(pkl[0]) as f:
                    obj = _Unpickler(f, archive, pkl[0].rsplit("/", 1)[0]).load()
    except Exception as e:  # a damaged archive or pickle fails in many ways (CRC, names, opcodes, versions, bounds)
        raise CheckpointError(
            f"{path} is not a readable PyTorch zip file ({type(e).__name__}: {e}); download it again."
        ) from e
    if not pkl:
        raise CheckpointError(f"{path} holds no data.pkl: not a PyTorch file saved with torch.save/torch.jit.save.")
    out: dict[str, np.ndarray] = {}
    _flatten(obj, "", out)
    return out
