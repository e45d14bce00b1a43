"""Sharded safetensors saving (`safetensors_io.save_sharded`) against huggingface_hub's splitting, which
diffusers' and transformers' `save_pretrained` use: the same shards and index, a bit-exact round trip through
discovery, stale files of an earlier save removed, and the libraries' default shard limits."""

from __future__ import annotations

import inspect
import json

import diffusers
import ml_dtypes
import numpy as np
import torch
import transformers
from huggingface_hub import split_torch_state_dict_into_shards
from huggingface_hub.serialization._base import parse_size_to_int

from dreambooth_jax.families import components
from dreambooth_jax.weights import discovery, safetensors_io

STEM = "diffusion_pytorch_model"
LIMIT = 1200  # bytes: four shards, "big" (2 * 1024 float32 = 8 KB) above it alone, before the one filling


def _tensors() -> dict[str, np.ndarray]:
    """Mixed dtypes and sizes, in a non-sorted order (the fill follows the mapping's order), one tensor
    bigger than `LIMIT` in the middle and a 0-d one."""
    rng = np.random.default_rng(0)
    out = {f"blocks.{i}.weight": rng.standard_normal((8, 16), np.float32) for i in (3, 1, 2, 0)}
    out["big"] = rng.standard_normal((2, 1024), np.float32)
    out["half"] = rng.standard_normal((100,)).astype(np.float16)
    out["brain"] = rng.standard_normal((30, 7)).astype(ml_dtypes.bfloat16)
    out["count"] = np.array(7, np.int64)
    out["a.bias"] = rng.standard_normal((16,), np.float32)
    return out


def _torch(value: np.ndarray) -> torch.Tensor:
    if value.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(value.view(np.uint16).copy()).view(torch.bfloat16)
    return torch.from_numpy(value.copy())


def test_shards_match_huggingface_hub_and_round_trip(tmp_path):
    tensors = _tensors()
    paths = safetensors_io.save_sharded(tensors, str(tmp_path), STEM, max_shard_bytes=LIMIT,
                                        metadata={"format": "pt"})
    as_torch = {k: _torch(v) for k, v in tensors.items()}
    split = split_torch_state_dict_into_shards(as_torch, max_shard_size=LIMIT,
                                               filename_pattern=STEM + "{suffix}.safetensors")
    assert len(split.filename_to_tensors) == 4
    assert [p.split("/")[-1] for p in paths] == list(split.filename_to_tensors)
    index = json.loads((tmp_path / f"{STEM}.safetensors.index.json").read_text())
    assert index == {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
    for path, names in zip(paths, split.filename_to_tensors.values()):
        assert sorted(safetensors_io.load_file(path)) == sorted(names)
        assert safetensors_io.read_metadata(path) == {"format": "pt"}

    state, _ = discovery.load_state_dict(discovery.find_weight_files(str(tmp_path), STEM))
    assert sorted(state) == sorted(tensors)
    for key, value in tensors.items():
        assert state[key].dtype == value.dtype and state[key].shape == value.shape, key
        assert state[key].tobytes() == value.tobytes(), key


def test_resaving_removes_stale_weight_files(tmp_path):
    """Sharded over a single file, fewer shards over more, a single file over shards: each time discovery
    finds exactly the new tensors, and only the new files are there (an fp16 variant beside them stays)."""
    tensors = _tensors()
    variant = tmp_path / f"{STEM}.fp16.safetensors"
    safetensors_io.save_file({"x": np.zeros(3, np.float16)}, str(variant))
    safetensors_io.save_sharded(tensors, str(tmp_path), STEM, max_shard_bytes=10**9)
    for limit in (LIMIT, 2 * LIMIT, 10**9):
        smaller = {k: v + 1 for k, v in tensors.items() if k != "count"}
        paths = safetensors_io.save_sharded(smaller, str(tmp_path), STEM, max_shard_bytes=limit)
        index = [f"{STEM}.safetensors.index.json"] if len(paths) > 1 else []
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            [p.split("/")[-1] for p in paths] + index + [variant.name])
        state, _ = discovery.load_state_dict(discovery.find_weight_files(str(tmp_path), STEM))
        assert sorted(state) == sorted(smaller)
        assert all(np.array_equal(state[k], v) for k, v in smaller.items())
        tensors = smaller
    assert len(paths) == 1 and paths[0].endswith(f"{STEM}.safetensors")


def test_default_shard_limits_are_the_libraries():
    """A diffusers kind shards as `ModelMixin.save_pretrained` does by default, a transformers kind as the
    installed `PreTrainedModel.save_pretrained`."""
    default = lambda fn: parse_size_to_int(inspect.signature(fn).parameters["max_shard_size"].default)  # noqa: E731
    for kind in components.KINDS.values():
        owner = diffusers.ModelMixin if kind.library == "diffusers" else transformers.PreTrainedModel
        assert kind.max_shard_bytes == default(owner.save_pretrained), kind
