"""Flax param trees <-> PyTorch-style state dicts (diffusers / transformers key names), without torch.

Our Flax submodule names mirror the PyTorch attribute paths (`down_blocks_0/resnets_1/conv1`), so the
mapping is declarative: a `_N` suffix on a list attribute becomes `.N`, the leaf name is renamed
(`kernel`/`scale`/`embedding` <-> `weight`) and kernels change layout (Linear: transpose; Conv:
OIHW <-> HWIO). Loading is driven by the model's abstract param tree, so every missing, surplus or
mis-shaped tensor is reported by name.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping

import ml_dtypes
import numpy as np
from flax import traverse_util

from dreambooth_jax.errors import UsageError

# PyTorch attributes that are `nn.ModuleList`/`nn.Sequential`: their Flax twins are named `<attr>_<i>`.
# Every other `_<digits>` suffix (`linear_1`, `conv_norm_out`) is part of the attribute name itself.
LIST_ATTRIBUTES = frozenset(
    {"down_blocks", "up_blocks", "resnets", "attentions", "transformer_blocks", "single_transformer_blocks",
     "downsamplers", "upsamplers", "layers", "to_out", "net"}
)
_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "embedding": "weight"}
_LIST_RE = re.compile(r"^(.*)_(\d+)$")

# Old diffusers VAE checkpoints (e.g. Stable Diffusion 1.x on the Hub) name the mid-block attention
# projections like the pre-0.14 `AttentionBlock`; diffusers renames them on load, and so do we.
_DEPRECATED_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_DEPRECATED_RE = re.compile(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")


class ConversionError(UsageError):
    """A checkpoint that does not fit the model: missing, surplus or mis-shaped tensors."""


def is_floating(value) -> bool:
    """True for float arrays, bfloat16 included (NumPy does not count ml_dtypes' bfloat16 as floating)."""
    return np.issubdtype(value.dtype, np.floating) or value.dtype == ml_dtypes.bfloat16


def torch_key(path: tuple[str, ...]) -> str:
    """The PyTorch state-dict key of a Flax param path, e.g. ('to_out_0', 'kernel') -> 'to_out.0.weight'."""
    parts = []
    for name in path[:-1]:
        m = _LIST_RE.match(name)
        parts.append(f"{m.group(1)}.{m.group(2)}" if m and m.group(1) in LIST_ATTRIBUTES else name)
    parts.append(_LEAF_TO_TORCH.get(path[-1], path[-1]))
    return ".".join(parts)


def to_flax_layout(path: tuple[str, ...], weight: np.ndarray) -> np.ndarray:
    """PyTorch layout -> Flax layout for the param at `path`."""
    if path[-1] == "kernel":
        if weight.ndim == 2:  # Linear [out, in] -> Dense [in, out]
            return weight.T
        if weight.ndim == 4:  # Conv [O, I, H, W] -> [H, W, I, O]
            return weight.transpose(2, 3, 1, 0)
    return weight


def to_torch_layout(path: tuple[str, ...], param: np.ndarray) -> np.ndarray:
    """Flax layout -> PyTorch layout for the param at `path` (inverse of `to_flax_layout`)."""
    if path[-1] == "kernel":
        if param.ndim == 2:
            return param.T
        if param.ndim == 4:
            return param.transpose(3, 2, 0, 1)
    return param


def normalize_state_dict(state: Mapping[str, np.ndarray], *, strip_prefix: str | None = None) -> dict:
    """Applies the renames diffusers/transformers apply on load (prefix, deprecated attention names)."""
    out = {}
    for key, value in state.items():
        if strip_prefix and key.startswith(strip_prefix):
            key = key[len(strip_prefix) :]
        m = _DEPRECATED_RE.match(key)
        if m:
            key = f"{m.group(1)}.{_DEPRECATED_ATTENTION_NAMES[m.group(2)]}.{m.group(3)}"
            if value.ndim == 4 and value.shape[2:] == (1, 1):  # 1x1-conv-shaped linear weights
                value = value[:, :, 0, 0]
        out[key] = value
    return out


def rename_keys(state: Mapping[str, np.ndarray], renames: Iterable[tuple]) -> dict:
    """`state` with each key rewritten by `renames` ((regex, replacement), applied in order): for models
    whose checkpoint names are not our Flax paths by `torch_key` alone (ViT's `encoder.layer.N`, T5's
    `encoder.block.N.layer.M`)."""
    out = {}
    for key, value in state.items():
        for pattern, repl in renames:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


def state_dict_to_params(
    state: Mapping[str, np.ndarray],
    abstract_params: Mapping,
    *,
    dtype=None,
    source: str = "checkpoint",
    ignore: Iterable[str] = (),
    cast: Callable[[np.ndarray, np.dtype], np.ndarray] | None = None,
) -> dict:
    """Builds a Flax param tree shaped like `abstract_params` from a PyTorch state dict.

    Args:
      state: key -> array, PyTorch names and layouts (already `normalize_state_dict`-ed).
      abstract_params: the model's params or their `jax.eval_shape`; gives every path and shape.
      dtype: cast floating params to this dtype; None keeps the checkpoint's dtype (bit-exact).
      source: the file name used in error messages.
      ignore: regexes of state-dict keys that may be present without a Flax twin (buffers).

    Returns:
      A nested dict of NumPy arrays with the structure of `abstract_params`.
    """
    flat = traverse_util.flatten_dict(dict(abstract_params))
    ignore_res = [re.compile(p) for p in ignore]
    used, missing, mismatched, out = set(), [], [], {}
    for path, leaf in flat.items():
        key = torch_key(path)
        if key not in state:
            missing.append(key)
            continue
        used.add(key)
        value = to_flax_layout(path, np.asarray(state[key]))
        if tuple(value.shape) != tuple(leaf.shape):
            mismatched.append(f"{key}: checkpoint {tuple(state[key].shape)} vs model (torch layout) "
                              f"{tuple(to_torch_layout(path, np.empty(leaf.shape, np.int8)).shape)}")
            continue
        if dtype is not None and is_floating(value):
            value = value.astype(dtype)
        out[path] = value
    surplus = sorted(k for k in state if k not in used and not any(r.search(k) for r in ignore_res))
    problems = []
    if missing:
        problems.append(f"missing tensors ({len(missing)}): "
                        f"{', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}")
    if mismatched:
        problems.append("shape mismatch:\n    " + "\n    ".join(mismatched[:10]))
    if surplus:
        problems.append(
            f"unexpected tensors ({len(surplus)}), probably an architecture option the config does not "
            f"describe: {', '.join(surplus[:10])}{' ...' if len(surplus) > 10 else ''}"
        )
    if problems:
        raise ConversionError(f"{source} does not match the model:\n  " + "\n  ".join(problems))
    return traverse_util.unflatten_dict(out)


def params_to_state_dict(params: Mapping, *, dtype=None) -> dict[str, np.ndarray]:
    """Flax param tree -> PyTorch state dict (NumPy arrays, contiguous), optionally cast to `dtype`."""
    out = {}
    for path, value in traverse_util.flatten_dict(dict(params)).items():
        value = np.asarray(value)
        if dtype is not None and is_floating(value):
            value = value.astype(dtype)
        out[torch_key(path)] = np.ascontiguousarray(to_torch_layout(path, value))
    return out
