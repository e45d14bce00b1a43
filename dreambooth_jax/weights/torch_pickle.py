"""Reading PyTorch `.bin` state dicts (`torch.save`'s zip format) with NumPy only: no torch at runtime.

Some Hub repositories (e.g. facebook/dino-vits16) hold only `pytorch_model.bin`. Its `data.pkl` is unpickled
with a restricted unpickler that knows only what a state dict needs (tensor rebuilds, storages, ordered
dicts), so a file cannot run code; the tensors are NumPy views of the storages in the zip, copied out.
"""

from __future__ import annotations

import collections
import pickle
import zipfile

import ml_dtypes
import numpy as np

from dreambooth_jax.errors import UsageError

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class _StorageType:
    def __init__(self, name: str):
        self.dtype = np.dtype(_STORAGE_DTYPES[name])


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    size, stride = tuple(size), tuple(stride)
    ints = all(isinstance(v, int) and not isinstance(v, bool) for v in (offset, *size, *stride))
    if not ints or len(size) != len(stride) or offset < 0 or min((*size, *stride), default=0) < 0:
        raise pickle.UnpicklingError(f"invalid tensor layout: offset {offset!r}, size {size}, stride "
                                     f"{stride}")
    numel = int(np.prod(size, dtype=np.int64))
    # The last element the view reaches must lie inside the storage: a file must not make us read beyond it.
    last = offset + sum((n - 1) * st for n, st in zip(size, stride))
    if numel and last >= len(storage):
        raise pickle.UnpicklingError(f"tensor of size {size}, stride {stride}, offset {offset} reaches past "
                                     f"its storage of {len(storage)} elements")
    if not numel:
        return np.zeros(size, storage.dtype)
    item = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(storage[offset:], shape=size, strides=[st * item for st in stride])
    return np.array(view, order="C")  # a copy: writable, and independent of the archive's bytes


def _rebuild_parameter(data, requires_grad=False, hooks=None):
    return data


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch", "Size"): tuple,
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, source: str):
        super().__init__(file)
        self.archive, self.prefix, self.source = archive, prefix, source
        self.storages: dict[str, np.ndarray] = {}

    def find_class(self, module, name):
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        raise pickle.UnpicklingError(f"{self.source}: refusing to load {module}.{name} (not part of a plain "
                                     "state dict); convert the file to safetensors where torch is installed")

    def persistent_load(self, pid):
        kind, storage_type, key, _location, numel = pid
        if kind != "storage" or not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"{self.source}: unsupported storage {pid!r}")
        if key not in self.storages:
            raw = self.archive.read(f"{self.prefix}/data/{key}")
            self.storages[key] = np.frombuffer(raw, dtype=storage_type.dtype, count=numel)
        return self.storages[key]


def load_file(path: str) -> dict[str, np.ndarray]:
    """A `torch.save`d state dict (zip format, PyTorch >= 1.6) as {name: NumPy array}."""
    if not zipfile.is_zipfile(path):
        raise UsageError(f"{path}: not a zip-format PyTorch checkpoint (legacy pre-1.6 files are not "
                         "supported; convert it to safetensors where torch is installed)")
    with zipfile.ZipFile(path) as archive:
        pkl = next((n for n in archive.namelist() if n.endswith("/data.pkl")), None)
        if pkl is None:
            raise UsageError(f"{path}: no data.pkl in the archive; not a PyTorch checkpoint")
        prefix = pkl[: -len("/data.pkl")]
        order = f"{prefix}/byteorder"
        if order in archive.namelist() and archive.read(order).strip() != b"little":
            raise UsageError(f"{path}: big-endian checkpoints are not supported")
        with archive.open(pkl) as f:
            state = _Unpickler(f, archive, prefix, path).load()
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, np.ndarray) for v in state.values()):
        raise UsageError(f"{path}: expected a state dict of tensors")
    return dict(state)
