"""Reading and writing `.safetensors` files with NumPy only (no torch), bf16 included.

The format is small enough to own: 8 bytes of little-endian header length, a JSON header mapping each
tensor name to {dtype, shape, data_offsets}, then the raw bytes. Owning it gives bfloat16 through
`ml_dtypes` (which the safetensors NumPy API lacks), memory-mapped reads, and errors that name the file
and the tensor when a download was cut short.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping

import ml_dtypes
import numpy as np

from dreambooth_jax.errors import UsageError

_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}


class SafetensorsError(UsageError):
    """A safetensors file that cannot be read: truncated, corrupt, or of an unsupported dtype."""


def read_header(path: str) -> tuple[dict, int]:
    """Returns (header without `__metadata__`, offset of the data section)."""
    header, data_start, _ = _read(path)
    return header, data_start


def _read(path: str) -> tuple[dict, int, dict]:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw_len = f.read(8)
        if len(raw_len) < 8:
            raise SafetensorsError(f"{path}: file is truncated ({size} bytes; not a safetensors file)")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > size - 8:
            raise SafetensorsError(f"{path}: header length {header_len} exceeds the file size {size}; "
                                   "truncated?")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SafetensorsError(f"{path}: corrupt safetensors header ({e})") from e
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + header_len
    data_len = max((v["data_offsets"][1] for v in header.values()), default=0)
    if data_start + data_len > size:
        raise SafetensorsError(
            f"{path}: file is truncated: the header declares {data_start + data_len} bytes but the file has "
            f"{size}. Re-download or re-save it."
        )
    return header, data_start, metadata


def read_metadata(path: str) -> dict[str, str]:
    """The file's `__metadata__` (string to string; empty if it has none)."""
    return _read(path)[2]


def load_file(path: str) -> dict[str, np.ndarray]:
    """Loads every tensor of a safetensors file as a read-only NumPy array (memory-mapped)."""
    header, data_start = read_header(path)
    out = {}
    mm = np.memmap(path, dtype=np.uint8, mode="r") if header else None
    for name, info in header.items():
        dtype = _DTYPES.get(info["dtype"])
        if dtype is None:
            raise SafetensorsError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
            raise SafetensorsError(f"{path}: tensor {name!r} byte size does not match shape {shape}")
        out[name] = mm[data_start + begin : data_start + end].view(dtype).reshape(shape)
    return out


def save_file(tensors: Mapping[str, np.ndarray], path: str,
              metadata: Mapping[str, str] | None = None) -> None:
    """Writes tensors to `path` atomically (a temporary file renamed into place)."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    arrays = []
    for name in sorted(tensors):
        arr = np.require(tensors[name], requirements="C")  # not ascontiguousarray: it makes 0-d arrays 1-d
        if arr.dtype not in _NAMES:
            raise SafetensorsError(f"cannot save tensor {name!r} of dtype {arr.dtype}")
        header[name] = {"dtype": _NAMES[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        arrays.append(arr)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data section 8-byte aligned, as the reference writer does
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for arr in arrays:
            f.write(arr.tobytes())
    os.replace(tmp, path)
