"""LoRA (Hu et al. 2021) as a parameter transform on the existing Flax modules, and its file formats.

The base params are never touched: the LoRA factors live in their own tree, {'/'-joined Flax module path:
{'A': [in, rank], 'B': [rank, out]}}, and `apply` runs the unchanged module with every targeted `nn.Dense`
intercepted (`nn.intercept_methods`) to add `scale * (x @ A) @ B`. The factors travel as a separate variable
collection, so Flax threads them through `nn.remat` and any other lifted transform like the params.

    lora_params = init_lora(params, UNET_TARGETS, LoraConfig(rank=4), rng)
    out = apply(unet, params, lora_params, config, latents, t, context)     # train: grad w.r.t. lora_params
    save_diffusers("out/", {"unet": lora_params}, config)   # StableDiffusionPipeline.load_lora_weights("out/")
    pipe = load_pipeline(base, lora="out/")                  # merged: W + scale * A @ B

Two file layouts: diffusers/PEFT (`unet.<module>.lora_A.weight` [rank, in], `.lora_B.weight` [out, rank]) and
kohya-ss / A1111 / ComfyUI (`lora_unet_<module_with_underscores>.lora_down.weight`, `.lora_up.weight`,
`.alpha`). Both are read back exactly by `load_file`.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
import struct
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from dreambooth_jax import convert, safetensors_io

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # diffusers' train_dreambooth_lora defaults
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' name; `load_lora_weights(folder)` looks for it
KOHYA_WEIGHT_NAME = "lora_kohya.safetensors"

_COLLECTION = "lora"  # the variable collection that carries the factors into `module.apply`
_DROPOUT_RNG = "lora_dropout"
_META_KEY = "dreambooth_jax_lora"  # our LoraConfig, so that our own files load back exactly
_DIFFUSERS_META_KEY = "lora_adapter_metadata"  # diffusers >= 0.34: per-component PEFT LoraConfig kwargs
_TEXT_PREFIX = "text_model."  # transformers' CLIP submodule; diffusers strips it when the model lacks it
_KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}
_KOHYA_SDXL_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
# Splitting a kohya name back into Flax module names: list items (`down_blocks_0`), then the names that
# contain '_' themselves, then any run without '_'. Covers every Dense of our UNet and CLIP (tested).
_KNOWN_NAMES = ("mid_block", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj", "to_q", "to_k", "to_v",
                "proj_in", "proj_out", "time_emb_proj", "time_embedding", "add_embedding", "linear_1",
                "linear_2", "text_projection", "conv_shortcut")
_NAME_RE = re.compile(
    "(" + "|".join([rf"{a}_\d+" for a in sorted(convert.LIST_ATTRIBUTES, key=len, reverse=True)]
                   + sorted(_KNOWN_NAMES, key=len, reverse=True) + [r"[^_]+"]) + ")(?:_|$)"
)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """rank r, alpha (None -> r, i.e. scale 1) and dropout on the LoRA input; the update is (alpha / r) A B."""

    rank: int = 4
    alpha: float | None = None
    dropout: float = 0.0

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if self.alpha is not None and self.alpha <= 0:
            raise ValueError(f"LoRA alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")

    @property
    def scale(self) -> float:
        return (self.rank if self.alpha is None else self.alpha) / self.rank


def _torch_name(key: str) -> str:
    """'down_blocks_0/.../to_out_0' -> 'down_blocks.0....to_out.0' (the PyTorch module name)."""
    return convert.torch_key((*key.split("/"), "kernel"))[: -len(".weight")]


def _flax_key(torch_name: str) -> str:
    return re.sub(r"\.(\d+)(?=\.|$)", r"_\1", torch_name).replace(".", "/")


def target_paths(params, targets: Sequence[str]) -> list[tuple[str, ...]]:
    """Module paths of the Dense layers whose PyTorch name ends with one of `targets` (whole components).

    E.g. 'to_out.0' matches 'down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0'. Raises a
    ValueError listing the available Dense names when nothing matches.
    """
    if isinstance(targets, str):
        targets = (targets,)
    found, names = [], set()
    for path, leaf in traverse_util.flatten_dict(params).items():
        if path[-1] != "kernel" or len(leaf.shape) != 2:
            continue
        name = _torch_name("/".join(path[:-1]))
        names.add(re.sub(r"^.*?([^.]+(\.\d+)?)$", r"\1", name))
        if any(name == t or name.endswith("." + t) for t in targets):
            found.append(path[:-1])
    if not found:
        raise ValueError(f"no Dense layer matches the LoRA targets {list(targets)}; available layer names: "
                         f"{', '.join(sorted(names)[:20])}")
    return found


def init_lora(params, targets: Sequence[str], config: LoraConfig, rng) -> dict:
    """A float32 LoRA tree for `targets`: A ~ U(+-1/sqrt(in)) (PEFT's kaiming-uniform, a=sqrt(5)), B = 0."""
    flat = traverse_util.flatten_dict(params)
    out = {}
    for i, path in enumerate(target_paths(params, targets)):
        d_in, d_out = flat[(*path, "kernel")].shape
        bound = 1.0 / np.sqrt(d_in)
        a = jax.random.uniform(jax.random.fold_in(rng, i), (d_in, config.rank), jnp.float32, -bound, bound)
        out["/".join(path)] = {"A": a, "B": jnp.zeros((config.rank, d_out), jnp.float32)}
    return out


def check(base_params, lora_params) -> None:
    """Raises a ValueError naming the layer when a LoRA layer is not a Dense of the model or mis-shaped."""
    flat = traverse_util.flatten_dict(base_params)
    for key, ab in lora_params.items():
        kernel = flat.get((*key.split("/"), "kernel"))
        a, b = ab["A"], ab["B"]
        if kernel is None or len(kernel.shape) != 2:
            raise ValueError(f"LoRA layer {_torch_name(key)!r} is not a Linear layer of this model "
                             "(a LoRA for another architecture?)")
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0] or (a.shape[0], b.shape[1]) != kernel.shape:
            raise ValueError(
                f"LoRA layer {_torch_name(key)!r}: A {tuple(a.shape)} @ B {tuple(b.shape)} does not fit the "
                f"model's [in, out] = {tuple(kernel.shape)} (a LoRA for another architecture?)")


def _interceptor(config: LoraConfig, scale, dropout: bool):
    def intercept(next_fun, args, kwargs, context):
        y = next_fun(*args, **kwargs)
        module = context.module
        if (context.method_name != "__call__" or not isinstance(module, nn.Dense)
                or not module.has_variable(_COLLECTION, "A")):
            return y
        # The LoRA branch runs in float32 whatever the compute dtype (it is small: rank columns), then is
        # cast to the Dense output's dtype, like PEFT under autocast.
        h = (args[0] if args else kwargs["inputs"]).astype(jnp.float32)
        if dropout:
            keep = jax.random.bernoulli(module.make_rng(_DROPOUT_RNG), 1.0 - config.dropout, h.shape)
            h = jnp.where(keep, h / (1.0 - config.dropout), 0.0)
        a, b = module.get_variable(_COLLECTION, "A"), module.get_variable(_COLLECTION, "B")
        delta = (h @ a.astype(jnp.float32)) @ b.astype(jnp.float32)
        return y + (scale * config.scale * delta).astype(y.dtype)

    return intercept


def apply(module, base_params, lora_params, config: LoraConfig, *args, method=None, dropout_rng=None,
          scale: float = 1.0, **kwargs):
    """`module.apply({'params': base_params}, *args, method=method, **kwargs)` with LoRA on the targeted Denses.

    Each Dense whose path is a key of `lora_params` computes y = dense(x) + scale * config.scale *
    dropout(x) @ A @ B, the LoRA branch in float32 and cast to y's dtype. Dropout only when `dropout_rng` is
    given and config.dropout > 0 (a mask per layer and call). Works under jit, grad (w.r.t. `lora_params`)
    and `nn.remat`: the factors enter as the variable collection 'lora', nested like the params.
    """
    check(base_params, lora_params)
    nested = traverse_util.unflatten_dict({(*k.split("/"), n): v for k, ab in lora_params.items()
                                           for n, v in ab.items()})
    use_dropout = dropout_rng is not None and config.dropout > 0
    rngs = dict(kwargs.pop("rngs", None) or {}, **({_DROPOUT_RNG: dropout_rng} if use_dropout else {}))
    with nn.intercept_methods(_interceptor(config, scale, use_dropout)):
        return module.apply({"params": base_params, _COLLECTION: nested}, *args, method=method,
                            rngs=rngs or None, **kwargs)


def merge(base_params, lora_params, config: LoraConfig, scale: float = 1.0) -> dict:
    """`base_params` with W <- W + scale * config.scale * A @ B on every LoRA layer (sum in float32, stored
    in W's dtype). Pure jnp, jit-able; the input tree is not modified."""
    check(base_params, lora_params)
    flat = dict(traverse_util.flatten_dict(base_params))
    for key, ab in lora_params.items():
        path = (*key.split("/"), "kernel")
        w = flat[path]
        delta = jnp.asarray(ab["A"], jnp.float32) @ jnp.asarray(ab["B"], jnp.float32)
        flat[path] = (w.astype(jnp.float32) + scale * config.scale * delta).astype(w.dtype)
    return traverse_util.unflatten_dict(flat)


# ---------------------------------------------------------------------------------------------------- files


def _module_names(component: str, key: str) -> str:
    if component not in COMPONENTS:
        raise ValueError(f"unknown LoRA component {component!r}; expected one of {COMPONENTS}")
    return ("" if component == "unet" else _TEXT_PREFIX) + _torch_name(key)


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
    version; the PEFT adapter metadata (diffusers >= 0.34) says so too (r = lora_alpha). Our LoraConfig is kept
    in the metadata so `load_file` un-bakes B: exact when config.scale is a power of two (alpha = rank,
    2 * rank, ...), else within an ulp of float32.
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
    prefixes = _KOHYA_SDXL_PREFIXES if "text_encoder_2" in loras else _KOHYA_PREFIXES
    alpha = np.asarray(config.rank if config.alpha is None else config.alpha, np.float32)
    tensors = {}
    for component, tree in loras.items():
        for key, ab in tree.items():
            name = prefixes[component] + _module_names(component, key).replace(".", "_")
            tensors[f"{name}.lora_down.weight"] = _torch_layout(ab["A"])
            tensors[f"{name}.lora_up.weight"] = _torch_layout(ab["B"])
            tensors[f"{name}.alpha"] = alpha
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(config.rank),
                "ss_network_alpha": str(float(alpha)), _META_KEY: json.dumps(dataclasses.asdict(config))}
    path = _file_in(path, KOHYA_WEIGHT_NAME)
    safetensors_io.save_file(tensors, path, metadata)
    return path


def _read_metadata(path: str) -> dict:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)).get("__metadata__") or {}


def _parse_diffusers(state: dict, meta: dict, source: str) -> dict:
    """{(component, flax key): (A [in, r], B [r, out], scale)} of a diffusers/PEFT-layout file."""
    adapter = json.loads(meta.get(_DIFFUSERS_META_KEY) or "{}")
    out = {}
    for k in state:
        m = re.match(r"^([a-z_0-9]+)\.(.+)\.lora_A\.weight$", k)
        if not m:
            if not re.match(r"^.+\.lora_B\.weight$", k):
                raise ValueError(f"{source}: unsupported LoRA tensor {k!r} (only PEFT-style lora_A/lora_B "
                                 "Linear factors are supported)")
            continue
        component, name = m.groups()
        if component not in COMPONENTS:
            raise ValueError(f"{source}: tensor {k!r} belongs to no known component {COMPONENTS}")
        b = state.get(f"{component}.{name}.lora_B.weight")
        if b is None:
            raise ValueError(f"{source}: {k!r} has no matching lora_B")
        r = adapter.get(f"{component}.r")
        scale = adapter.get(f"{component}.lora_alpha", r) / r if r else 1.0
        out[component, _flax_key(name.removeprefix(_TEXT_PREFIX))] = (state[k].T, b.T, scale)
    return out


def _parse_kohya(state: dict, source: str) -> dict:
    """{(component, flax key): (A, B, scale)} of a kohya-layout file (scale = alpha / rank, 1 without alpha)."""
    prefix_of = {**{v: k for k, v in _KOHYA_PREFIXES.items()}, "lora_te1_": "text_encoder"}
    out = {}
    for k in state:
        name, _, leaf = k.partition(".")
        if leaf in ("lora_up.weight", "alpha"):
            continue
        prefix = next((p for p in sorted(prefix_of, key=len, reverse=True) if name.startswith(p)), None)
        if leaf != "lora_down.weight" or prefix is None or state[k].ndim != 2:
            raise ValueError(f"{source}: unsupported LoRA tensor {k!r} {tuple(state[k].shape)} (only Linear "
                             "lora_down/lora_up/alpha are supported)")
        component, rest = prefix_of[prefix], name[len(prefix):]
        if component != "unet":
            rest = rest.removeprefix(_TEXT_PREFIX.replace(".", "_"))
        if f"{name}.lora_up.weight" not in state:
            raise ValueError(f"{source}: {k!r} has no matching lora_up")
        a, b = state[k].T, state[f"{name}.lora_up.weight"].T
        alpha = state.get(f"{name}.alpha")
        scale = float(np.asarray(alpha).reshape(-1)[0]) / a.shape[1] if alpha is not None else 1.0
        out[component, "/".join(_NAME_RE.findall(rest))] = (a, b, scale)
    return out


def resolve_file(path: str) -> str:
    """A LoRA file, or the folder holding `pytorch_lora_weights.safetensors` (or `lora_kohya.safetensors`)."""
    if os.path.isdir(path):
        for name in (WEIGHT_NAME, KOHYA_WEIGHT_NAME):
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        raise FileNotFoundError(f"{path}: no {WEIGHT_NAME} or {KOHYA_WEIGHT_NAME} in this folder")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no LoRA file {path}")
    return path


def load_file(path: str) -> tuple[dict, LoraConfig]:
    """Reads a diffusers- or kohya-layout LoRA file -> ({component: LoRA tree}, LoraConfig).

    Our own files come back exactly (their LoraConfig is in the metadata; see `save_diffusers` for the one
    inexact case). Foreign files: alpha from the kohya `.alpha` tensors or diffusers' adapter
    metadata; modules whose rank or alpha differ from the most common have their own scale folded into B.
    """
    path = resolve_file(path)
    state = {k: np.asarray(v) for k, v in safetensors_io.load_file(path).items()}
    meta = _read_metadata(path)
    if not state:
        raise ValueError(f"{path}: empty LoRA file")
    if all(k.startswith("lora_") for k in state):
        modules = _parse_kohya(state, path)
    elif any(k.endswith(".lora_A.weight") for k in state):
        modules = _parse_diffusers(state, meta, path)
    else:
        raise ValueError(f"{path}: not a LoRA file in the diffusers (lora_A/lora_B) or kohya (lora_down/lora_up) "
                         f"layout; keys like {', '.join(sorted(state)[:3])}")
    if _META_KEY in meta:
        config = LoraConfig(**json.loads(meta[_META_KEY]))
    else:
        rank, scale = collections.Counter((a.shape[1], s) for a, _, s in modules.values()).most_common(1)[0][0]
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
    loras, config = load_file(path)
    params = dict(pipe.params)
    for component, tree in loras.items():
        if component not in params:
            raise ValueError(f"{path}: has a LoRA for {component!r}, which this pipeline lacks")
        try:
            params[component] = merge(params[component], jax.tree.map(jnp.asarray, tree), config, scale)
        except ValueError as e:
            raise ValueError(f"{path}: {component}: {e}") from e
    return dataclasses.replace(pipe, params=params)
