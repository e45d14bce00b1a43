"""Finding and reading the weight files of one diffusers/transformers component folder."""

from __future__ import annotations

import glob
import os
import re

import numpy as np

from dreambooth_jax.errors import MissingFileError
from dreambooth_jax.fileio import read_json
from dreambooth_jax.weights import safetensors_io, torch_pickle

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def _variant_of(filename: str) -> str | None:
    """'diffusion_pytorch_model.fp16.safetensors' -> 'fp16'; index files and shards too."""
    name = os.path.basename(filename)
    name = re.sub(r"-\d{5}-of-\d{5}", "", name)
    name = name.replace(".safetensors.index.", ".").replace(".safetensors", "").replace(".json", "")
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else None


def has_variant(folder: str, stem: str, variant: str | None) -> bool:
    """Whether `folder` holds weight files `stem` of `variant` (e.g.
    'diffusion_pytorch_model.fp16.safetensors')."""
    return variant is not None and any(_variant_of(f) == variant
                                       for f in glob.glob(os.path.join(folder, f"{stem}*")))


def find_weight_files(folder: str, stem: str, variant: str | None = None) -> list[str]:
    """The safetensors files holding the weights `stem` (`model`/`diffusion_pytorch_model`) in `folder`.

    A sharded checkpoint is read through its `*.safetensors.index*.json`. Without safetensors, the PyTorch
    `.bin` file(s) of the same weights are returned (read without torch). Raises a clear error when nothing
    usable is there.
    """
    candidates = sorted(glob.glob(os.path.join(folder, f"{stem}*.safetensors")))
    indexes = sorted(glob.glob(os.path.join(folder, f"{stem}*.safetensors.index*.json")))
    pick = lambda files: [f for f in files if _variant_of(f) == variant]  # noqa: E731
    for index in pick(indexes):
        shards = sorted(set(read_json(index)["weight_map"].values()))
        paths = [os.path.join(folder, s) for s in shards]
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise MissingFileError(f"{index} lists shards that are missing: {', '.join(missing)}")
        return paths
    single = [f for f in pick(candidates) if not re.search(r"-\d{5}-of-\d{5}", f)]
    if single:
        return single[:1]
    pickled = _pickled_weight_files(folder, stem, variant)
    if pickled:
        return pickled
    pickles = [f for f in os.listdir(folder) if f.endswith(_PICKLE_SUFFIXES)] if os.path.isdir(folder) else []
    if pickles:
        raise MissingFileError(
            f"{folder} holds only PyTorch pickle weights in a form dreambooth_jax does not read "
            f"({', '.join(sorted(pickles))}). Convert once where torch is installed, e.g. "
            "`Model.from_pretrained(folder).save_pretrained(folder, safe_serialization=True)`."
        )
    if variant and [f for f in candidates if _variant_of(f) is None]:
        raise MissingFileError(f"{folder}: no '{variant}' variant of {stem}.safetensors (drop "
                               f"variant={variant!r}?)")
    raise MissingFileError(f"{folder}: no {stem}{'.' + variant if variant else ''}.safetensors weights found")


def _pickled_weight_files(folder: str, stem: str, variant: str | None) -> list[str]:
    """`pytorch_model[.variant].bin` (or its shards, via the `.bin.index.json`) when there is no safetensors
    file: read without torch by `torch_pickle`."""
    base, tag = ("pytorch_model" if stem == "model" else stem), (f".{variant}" if variant else "")
    name = f"{base}{tag}.bin"
    index = os.path.join(folder, f"{base}.bin.index{tag}.json")  # transformers' names: x.bin.index.fp16.json
    if os.path.isfile(index):
        paths = [os.path.join(folder, s) for s in sorted(set(read_json(index)["weight_map"].values()))]
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise MissingFileError(f"{index} lists shards that are missing: {', '.join(missing)}")
        return paths
    return [os.path.join(folder, name)] if os.path.isfile(os.path.join(folder, name)) else []


def load_state_dict(files: list[str]) -> tuple[dict[str, np.ndarray], str]:
    """Merges the tensors of `files` (safetensors, or PyTorch `.bin`); returns (state dict, a source name for
    messages)."""
    state: dict[str, np.ndarray] = {}
    for path in files:
        read = torch_pickle.load_file if path.endswith(".bin") else safetensors_io.load_file
        state.update(read(path))
    return state, files[0] if len(files) == 1 else f"{os.path.dirname(files[0])} ({len(files)} shards)"
