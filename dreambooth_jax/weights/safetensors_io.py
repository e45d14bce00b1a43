"""Reading and writing `.safetensors` files with NumPy only (no torch), bf16 included.

The format is small enough to own: 8 bytes of little-endian header length, a JSON header mapping each
tensor name to {dtype, shape, data_offsets}, then the raw bytes. Owning it gives bfloat16 through
`ml_dtypes` (which the safetensors NumPy API lacks), memory-mapped reads, and errors that name the file
and the tensor when a download was cut short. `save_sharded` writes a component's weights as
diffusers' / transformers' `save_pretrained` do: one file, or shards and their index.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Mapping

import ml_dtypes
import numpy as np

from dreambooth_jax import fileio
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


def shard_plan(tensors: Mapping[str, np.ndarray], max_shard_bytes: int) -> list[list[str]]:
    """The names of each shard, filled greedily in the mapping's order as huggingface_hub's
    `split_state_dict_into_shards_factory` does (which diffusers' and transformers' `save_pretrained` use), so
    that the same tensors in the same order get the same shard boundaries: a tensor that would tip the
    current shard over the limit starts a new one, and a tensor bigger than the limit gets a shard of its own
    (placed before the shard being filled, as there)."""
    shards: list[list[str]] = []
    current: list[str] = []
    current_size = 0
    for name, tensor in tensors.items():
        size = np.asarray(tensor).nbytes
        if size > max_shard_bytes:
            shards.append([name])
            continue
        if current_size + size > max_shard_bytes:
            shards.append(current)
            current, current_size = [], 0
        current.append(name)
        current_size += size
    if current or not shards:
        shards.append(current)
    return shards


def save_sharded(tensors: Mapping[str, np.ndarray], folder: str, stem: str, *, max_shard_bytes: int,
                 metadata: Mapping[str, str] | None = None,
                 index_metadata: Mapping | None = None) -> list[str]:
    """Writes `tensors` as the weights `stem` of `folder`, as `save_pretrained` names them, and returns the
    paths of the weight files written.

    When they fit in `max_shard_bytes`: `{stem}.safetensors` alone. Otherwise (see `shard_plan`)
    `{stem}-00001-of-0000N.safetensors` ... and `{stem}.safetensors.index.json` = {"metadata": {"total_size":
    bytes, **index_metadata}, "weight_map": {name: shard file}}. `metadata` is every file's safetensors
    header metadata. Weight files of the same stem left by an earlier save (the single file when now sharded,
    other shards, the index when now unsharded) are removed afterwards, so that discovery never finds two
    checkpoints; the new files are complete before the old go. Variants (`{stem}.fp16.safetensors`) stay.
    """
    shards = shard_plan(tensors, max_shard_bytes)
    if len(shards) == 1:
        names = [f"{stem}.safetensors"]
    else:
        names = [f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    paths = [os.path.join(folder, name) for name in names]
    for path, shard in zip(paths, shards):
        save_file({name: tensors[name] for name in shard}, path, metadata)
    index_path = os.path.join(folder, f"{stem}.safetensors.index.json")
    if len(shards) > 1:
        total = sum(np.asarray(t).nbytes for t in tensors.values())
        fileio.write_json(index_path, {
            "metadata": {**(index_metadata or {}), "total_size": total},
            "weight_map": {name: file for file, shard in zip(names, shards) for name in shard}})
    _remove_stale(folder, stem, keep={*names, *([os.path.basename(index_path)] if len(shards) > 1 else [])})
    return paths


def _remove_stale(folder: str, stem: str, keep: set[str]) -> None:
    """Removes the weight files of `stem` in `folder` (single, shards, index) other than `keep`."""
    stale = re.compile(rf"{re.escape(stem)}(-\d{{5}}-of-\d{{5}})?\.safetensors(\.index\.json)?")
    for name in os.listdir(folder):
        if name not in keep and stale.fullmatch(name) and os.path.isfile(os.path.join(folder, name)):
            os.remove(os.path.join(folder, name))
