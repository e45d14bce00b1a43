"""LoRA files: the diffusers/PEFT and kohya-ss layouts, read and written with NumPy (no torch).

    save_diffusers("out/", {"unet": lora_params}, config)  # diffusers: pipe.load_lora_weights("out/")
    loras, config = load_lora_file("out/")                  # either layout
    pipe = load_pipeline(base, lora="out/")                 # merged: W + scale * A @ B

diffusers/PEFT: `unet.<module>.lora_A.weight` [rank, in], `.lora_B.weight` [out, rank]. kohya-ss / A1111 /
ComfyUI: `lora_unet_<module_with_underscores>.lora_down.weight`, `.lora_up.weight`, `.alpha`. Both are read
back exactly by `load_lora_file`. kohya's SDXL files name the UNet's modules as the original (LDM/SGM) UNet
does (`lora_unet_input_blocks_4_1_...`, `middle_block_1_...`, `output_blocks_0_1_...`); `load_lora_file` reads
those too, given the UNet config that says which diffusers block each numbered LDM block is (`apply_file`
passes it).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re

import numpy as np

from dreambooth_jax.errors import MissingFileError, UnsupportedError, UsageError
from dreambooth_jax.lora.transform import LoraConfig, flax_key, merge, torch_name
from dreambooth_jax.weights import convert, safetensors_io

# The components a LoRA file may adapt, named as diffusers names pipeline folders: the denoiser, and text
# encoders `text_encoder`, then `text_encoder_<n>` for n = 2, 3, ... (CLIP models, whose modules sit under
# `text_model.`).
_COMPONENT_RE = re.compile(r"^(unet|transformer|text_encoder(_[2-9])?)$")
WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' name; `load_lora_weights(folder)` looks for it
KOHYA_WEIGHT_NAME = "lora_kohya.safetensors"
_META_KEY = "dreambooth_jax_lora"  # our LoraConfig, so that our own files load back exactly
_DIFFUSERS_META_KEY = "lora_adapter_metadata"  # diffusers >= 0.34: per-component PEFT LoraConfig kwargs
_TEXT_PREFIX = "text_model."  # transformers' CLIP submodule; diffusers strips it when the model lacks it
_KOHYA_DENOISER = "lora_unet_"  # kohya's name for the denoiser, UNet or not
_KOHYA_TEXT_RE = re.compile(r"^lora_te(\d?)_")
# Splitting a kohya name back into Flax module names: list items (`down_blocks_0`), then the names that
# contain '_' themselves, then any run without '_'. Covers every Dense of our UNet and CLIP (tested).
_KNOWN_NAMES = ("mid_block", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj", "to_q", "to_k", "to_v",
                "proj_in", "proj_out", "time_emb_proj", "time_embedding", "add_embedding", "linear_1",
                "linear_2", "text_projection", "conv_shortcut")
_NAME_RE = re.compile(
    "(" + "|".join([rf"{a}_\d+" for a in sorted(convert.LIST_ATTRIBUTES, key=len, reverse=True)]
                   + sorted(_KNOWN_NAMES, key=len, reverse=True) + [r"[^_]+"]) + ")(?:_|$)"
)
# kohya's SDXL UNet names (sd-scripts trains its own LDM/SGM UNet): a numbered block, then the module inside
# it.
_LDM_RE = re.compile(
    r"^(input_blocks_\d+_\d+|middle_block_\d+|output_blocks_\d+_\d+|time_embed_\d+|label_emb_0_\d+)(?:_(.+))?$")
# The one Linear of an LDM ResBlock (in_layers_2, out_layers_3 and skip_connection are convs, rejected
# anyway).
_LDM_RESNET_LINEARS = {"emb_layers_1": "time_emb_proj"}


def _ldm_unet_blocks(config) -> dict[str, str]:
    """LDM/SGM UNet module names -> our module paths ('input_blocks_4_1' -> 'down_blocks_1/attentions_0') for
    a `UNetConfig`: the block numbering depends on layers_per_block and on which blocks have attentions."""
    layers, last = config.per_block("layers_per_block"), config.num_blocks - 1
    table = {"time_embed_0": "time_embedding/linear_1", "time_embed_2": "time_embedding/linear_2",
             "label_emb_0_0": "add_embedding/linear_1", "label_emb_0_2": "add_embedding/linear_2",
             "middle_block_0": "mid_block/resnets_0", "middle_block_1": "mid_block/attentions_0",
             "middle_block_2": "mid_block/resnets_1"}
    n = 1  # input_blocks_0 is conv_in
    for i, kind in enumerate(config.down_block_types):
        for j in range(layers[i]):
            table[f"input_blocks_{n}_0"] = f"down_blocks_{i}/resnets_{j}"
            if kind.startswith("CrossAttn"):
                table[f"input_blocks_{n}_1"] = f"down_blocks_{i}/attentions_{j}"
            n += 1
        if i < last:
            table[f"input_blocks_{n}_0"] = f"down_blocks_{i}/downsamplers_0"
            n += 1
    n = 0
    for i, kind in enumerate(config.up_block_types):
        attention = kind.startswith("CrossAttn")
        for j in range(layers[last - i] + 1):
            table[f"output_blocks_{n}_0"] = f"up_blocks_{i}/resnets_{j}"
            if attention:
                table[f"output_blocks_{n}_1"] = f"up_blocks_{i}/attentions_{j}"
            n += 1
        if i < last:  # the upsampler follows the last resnet (and attention) of the block: index 1 or 2
            table[f"output_blocks_{n - 1}_{1 + attention}"] = f"up_blocks_{i}/upsamplers_0"
    return table


def _ldm_key(match: re.Match, unet_config, source: str, tensor: str) -> str:
    """Our flax key of an LDM-named kohya UNet module (`match` of `_LDM_RE` on the name after
    'lora_unet_')."""
    if unet_config is None:
        raise UsageError(f"{source}: {tensor!r} has the LDM/SGM UNet names of kohya's SDXL LoRAs; mapping "
                         "them to diffusers' modules needs the UNet config: load_lora_file(path, "
                         "unet_config=pipe.unet.config) (apply_file and load_pipeline(lora=...) pass it)")
    block, inner = match.groups()
    ours = _ldm_unet_blocks(unet_config).get(block)
    if ours is None:
        raise UsageError(f"{source}: {tensor!r}: this UNet has no LDM block {block!r} (layers_per_block="
                         f"{unet_config.layers_per_block}, down_block_types={unet_config.down_block_types}); "
                         "the LoRA is for another architecture")
    inner = _LDM_RESNET_LINEARS.get(inner, inner)
    return "/".join([ours, *_NAME_RE.findall(inner or "")])


def _is_text_encoder(component: str) -> bool:
    return component.startswith("text_encoder")


def _check_component(component: str, source: str = "") -> None:
    if not _COMPONENT_RE.match(component):
        raise UsageError(f"{source}{': ' if source else ''}unknown LoRA component {component!r}; expected "
                         "the denoiser ('unet', 'transformer') or a text encoder ('text_encoder', "
                         "'text_encoder_<n>')")


def _text_encoder_name(i: int) -> str:
    """diffusers' folder name of a pipeline's text encoder number i (1-based)."""
    return "text_encoder" if i == 1 else f"text_encoder_{i}"


def _kohya_prefix(component: str, loras: dict) -> str:
    """kohya's prefix: `lora_unet_` for the denoiser; `lora_te_` for the text encoder of a one-encoder model,
    `lora_te1_`, `lora_te2_` ... where the file adapts a second encoder (as sd-scripts names SDXL's)."""
    if not _is_text_encoder(component):
        return _KOHYA_DENOISER
    several = any(_is_text_encoder(c) and c != "text_encoder" for c in loras)
    number = 1 if component == "text_encoder" else int(component.rsplit("_", 1)[1])
    return f"lora_te{number}_" if several else "lora_te_"


def _module_names(component: str, key: str) -> str:
    _check_component(component)
    return (_TEXT_PREFIX if _is_text_encoder(component) else "") + torch_name(key)


def _torch_layout(x) -> np.ndarray:
    """[in, r] / [r, out] -> PyTorch's [r, in] / [out, r], contiguous (safetensors' NumPy writer would store a
    transposed view in memory order, i.e. untransposed)."""
    return np.ascontiguousarray(np.asarray(x, np.float32).T)


def _file_in(path: str, name: str) -> str:
    """`path` itself when it names a `.safetensors` file, else `path/name` (a folder, created if needed)."""
    if not path.endswith(".safetensors"):
        path = os.path.join(path, name)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return path


def save_diffusers(path: str, loras: dict, config: LoraConfig) -> str:
    """Writes the diffusers/PEFT layout for `load_lora_weights`; returns the file.

    A `path` not ending in `.safetensors` is a folder, which gets `pytorch_lora_weights.safetensors`. Keys:
    'unet.<module>.lora_A.weight' [rank, in] and '.lora_B.weight' [out, rank]; text encoders
    'text_encoder.text_model.<module>...' (diffusers drops 'text_model.' for transformers-5 models that lack
    it). config.scale is baked into lora_B, so the file is exact under diffusers' default alpha = rank in any
    version; the PEFT adapter metadata (diffusers >= 0.34) says so too (r = lora_alpha). Our LoraConfig is
    kept in the metadata so `load_lora_file` un-bakes B: exact when config.scale is a power of two (alpha =
    rank, 2 * rank, ...), else within an ulp of float32.
    """
    tensors, meta = {}, {}
    for component, tree in loras.items():
        names = []
        for key, ab in tree.items():
            name = _module_names(component, key)
            names.append(name.removeprefix(_TEXT_PREFIX))  # suffix-matched by PEFT, with or without it
            b = (np.asarray(ab["B"], np.float64) * config.scale).astype(np.float32)
            tensors[f"{component}.{name}.lora_A.weight"] = _torch_layout(ab["A"])
            tensors[f"{component}.{name}.lora_B.weight"] = _torch_layout(b)
        meta.update({f"{component}.r": config.rank, f"{component}.lora_alpha": config.rank,
                     f"{component}.target_modules": sorted(names)})
    path = _file_in(path, WEIGHT_NAME)
    metadata = {"format": "pt", _DIFFUSERS_META_KEY: json.dumps(meta, sort_keys=True),
                _META_KEY: json.dumps(dataclasses.asdict(config))}
    safetensors_io.save_file(tensors, path, metadata)
    return path


def save_kohya(path: str, loras: dict, config: LoraConfig) -> str:
    """Writes the kohya-ss / A1111 / ComfyUI layout (`lora_kohya.safetensors` if `path` is a folder).

    `lora_unet_<diffusers module name, '.' -> '_'>` (as sd-scripts names SD 1.x/2.x layers; SDXL UNets keep
    these diffusers names too, which diffusers and ComfyUI read), `lora_te_text_model_...` (SDXL:
    `lora_te1_`/`lora_te2_`), each with lora_down [rank, in], lora_up [out, rank] and a scalar alpha.
    """
    alpha = np.asarray(config.rank if config.alpha is None else config.alpha, np.float32)
    tensors = {}
    for component, tree in loras.items():
        for key, ab in tree.items():
            name = _kohya_prefix(component, loras) + _module_names(component, key).replace(".", "_")
            tensors[f"{name}.lora_down.weight"] = _torch_layout(ab["A"])
            tensors[f"{name}.lora_up.weight"] = _torch_layout(ab["B"])
            tensors[f"{name}.alpha"] = alpha
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(config.rank),
                "ss_network_alpha": str(float(alpha)), _META_KEY: json.dumps(dataclasses.asdict(config))}
    path = _file_in(path, KOHYA_WEIGHT_NAME)
    safetensors_io.save_file(tensors, path, metadata)
    return path


def _parse_diffusers(state: dict, meta: dict, source: str) -> dict:
    """{(component, flax key): (A [in, r], B [r, out], scale)} of a diffusers/PEFT-layout file."""
    adapter = json.loads(meta.get(_DIFFUSERS_META_KEY) or "{}")
    out = {}
    for k in state:
        m = re.match(r"^([a-z_0-9]+)\.(.+)\.lora_A\.weight$", k)
        if not m:
            if not re.match(r"^.+\.lora_B\.weight$", k):
                raise UsageError(f"{source}: unsupported LoRA tensor {k!r} (only PEFT-style lora_A/lora_B "
                                 "Linear factors are supported)")
            continue
        component, name = m.groups()
        _check_component(component, f"{source}: tensor {k!r}")
        b = state.get(f"{component}.{name}.lora_B.weight")
        if b is None:
            raise UsageError(f"{source}: {k!r} has no matching lora_B")
        r = adapter.get(f"{component}.r")
        scale = adapter.get(f"{component}.lora_alpha", r) / r if r else 1.0
        out[component, flax_key(name.removeprefix(_TEXT_PREFIX))] = (state[k].T, b.T, scale)
    return out


def _parse_kohya(state: dict, source: str, unet_config) -> dict:
    """{(component, flax key): (A, B, scale)} of a kohya-layout file (scale = alpha / rank, 1 without alpha).
    LDM-named UNet modules (kohya's SDXL files) need `unet_config`."""
    out = {}
    for k in state:
        name, _, leaf = k.partition(".")
        if leaf in ("lora_up.weight", "alpha"):
            continue
        text = _KOHYA_TEXT_RE.match(name)
        if leaf != "lora_down.weight" or not (text or name.startswith(_KOHYA_DENOISER)) or state[k].ndim != 2:
            raise UsageError(f"{source}: unsupported LoRA tensor {k!r} {tuple(state[k].shape)} (only Linear "
                             "lora_down/lora_up/alpha are supported)")
        if text:
            component, rest = _text_encoder_name(int(text.group(1) or 1)), name[text.end():]
            rest = rest.removeprefix(_TEXT_PREFIX.replace(".", "_"))
        else:
            component, rest = "unet", name[len(_KOHYA_DENOISER):]
        if f"{name}.lora_up.weight" not in state:
            raise UsageError(f"{source}: {k!r} has no matching lora_up")
        a, b = state[k].T, state[f"{name}.lora_up.weight"].T
        alpha = state.get(f"{name}.alpha")
        scale = float(np.asarray(alpha).reshape(-1)[0]) / a.shape[1] if alpha is not None else 1.0
        ldm = component == "unet" and _LDM_RE.match(rest)
        key = _ldm_key(ldm, unet_config, source, k) if ldm else "/".join(_NAME_RE.findall(rest))
        out[component, key] = (a, b, scale)
    return out


def resolve_file(path: str) -> str:
    """A LoRA file, or the folder holding `pytorch_lora_weights.safetensors` (or `lora_kohya.safetensors`)."""
    if os.path.isdir(path):
        for name in (WEIGHT_NAME, KOHYA_WEIGHT_NAME):
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        raise MissingFileError(f"{path}: no {WEIGHT_NAME} or {KOHYA_WEIGHT_NAME} in this folder")
    if not os.path.isfile(path):
        raise MissingFileError(f"no LoRA file {path}")
    return path


def load_lora_file(path: str, unet_config=None) -> tuple[dict, LoraConfig]:
    """Reads a diffusers- or kohya-layout LoRA file -> ({component: LoRA tree}, LoraConfig).

    Our own files come back exactly (their LoraConfig is in the metadata; see `save_diffusers` for the one
    inexact case). Foreign files: alpha from the kohya `.alpha` tensors or diffusers' adapter
    metadata; modules whose rank or alpha differ from the most common have their own scale folded into B.
    kohya SDXL files with LDM/SGM UNet names (`lora_unet_input_blocks_4_1_...`) are mapped to our modules
    through `unet_config` (the pipeline's `UNetConfig`); without it they raise `UsageError`.
    """
    path = resolve_file(path)
    state = {k: np.asarray(v) for k, v in safetensors_io.load_file(path).items()}
    meta = safetensors_io.read_metadata(path)
    if not state:
        raise UsageError(f"{path}: empty LoRA file")
    if all(k.startswith("lora_") for k in state):
        modules = _parse_kohya(state, path, unet_config)
    elif any(k.endswith(".lora_A.weight") for k in state):
        modules = _parse_diffusers(state, meta, path)
    else:
        raise UsageError(f"{path}: not a LoRA file in the diffusers (lora_A/lora_B) or kohya "
                         f"(lora_down/lora_up) layout; keys like {', '.join(sorted(state)[:3])}")
    if _META_KEY in meta:
        config = LoraConfig(**json.loads(meta[_META_KEY]))
    else:
        counts = collections.Counter((a.shape[1], s) for a, _, s in modules.values())
        rank, scale = counts.most_common(1)[0][0]
        config = LoraConfig(rank=rank, alpha=None if scale == 1 else scale * rank)
    loras: dict = {}
    for (component, key), (a, b, scale) in modules.items():
        if scale != config.scale:
            b = (b.astype(np.float64) * scale / config.scale).astype(np.float32)
        loras.setdefault(component, {})[key] = {"A": np.ascontiguousarray(a, np.float32),
                                                "B": np.ascontiguousarray(b, np.float32)}
    return loras, config


def apply_file(pipe, path: str, scale: float = 1.0):
    """A copy of `pipe` with the LoRA file merged into its params (`scale` multiplies the LoRA update)."""
    loras, config = load_lora_file(path, pipe.denoiser.config)
    params = dict(pipe.params)
    for component, tree in loras.items():
        if component == "unet" and "unet" not in params:  # kohya's `lora_unet_` names any denoiser
            raise UnsupportedError(f"{path}: a kohya-layout LoRA for a {pipe.family.name} pipeline; kohya / "
                                   "BFL names (lora_unet_double_blocks_...) are read for UNets only: use "
                                   "the diffusers layout (transformer.<module>.lora_A.weight)")
        if component not in params:
            raise UsageError(f"{path}: has a LoRA for {component!r}, which this pipeline lacks")
        try:
            params[component] = merge(params[component], tree, config, scale)
        except UsageError as e:
            raise UsageError(f"{path}: {component}: {e}") from e
    return dataclasses.replace(pipe, params=params)
