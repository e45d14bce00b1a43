"""The kinds of component folder a pipeline holds, and how each is built, loaded and saved.

A kind is what a folder stores, whatever family uses it: `unet`, `vae`, `clip_text` (transformers'
`CLIPTextModel`), `clip_text_projection` (`CLIPTextModelWithProjection`), `t5` (`T5EncoderModel`, Flux's
second text encoder), `flux_transformer` (`FluxTransformer2DModel`). A family names its folders and their
kinds; `load_folder` / `save_folder` read and write one folder as diffusers / transformers do.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import transformers

from dreambooth_jax import fileio
from dreambooth_jax.errors import MissingFileError, UnsupportedError, UsageError
from dreambooth_jax.kernels import choose
from dreambooth_jax.models import clip, flux, t5, unet, vae
from dreambooth_jax.weights import convert, discovery, safetensors_io

_DTYPES = {"fp32": np.float32, "float32": np.float32, "fp16": np.float16, "float16": np.float16,
           "bf16": jnp.bfloat16, "bfloat16": jnp.bfloat16}
WEIGHTS = ("device", "host", "none")


def parse_dtype(dtype) -> Any:
    """'bf16' / 'fp16' / 'fp32' (or a dtype) -> a NumPy/JAX dtype; None stays None."""
    if dtype is None or not isinstance(dtype, str):
        return dtype
    if dtype not in _DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


# `save_pretrained`'s default `max_shard_size`, so that a folder we save is split as the library splits it:
# diffusers' ModelMixin "10GB"; transformers' PreTrainedModel "50GB" from 5.0 ("5GB" in 4.x). Decimal units,
# as huggingface_hub's `parse_size_to_int` reads them.
SHARD_LIMITS = {"diffusers": 10 * 10**9,
                "transformers": (50 if int(transformers.__version__.split(".")[0]) >= 5 else 5) * 10**9}


@dataclasses.dataclass(frozen=True)
class Kind:
    """How one kind of component folder is stored: weight file stem, key prefixes, the class named in
    configs."""

    stem: str
    library: str
    class_name: str
    load_prefix: str | None = None  # stripped on load when present
    to_flax: tuple = ()  # key renames on load (`convert.rename_keys`), beyond `convert.torch_key`'s
    to_torch: tuple = ()  # and on save
    ignored: tuple = clip.IGNORED_KEYS  # checkpoint keys without a param (buffers, tied copies)
    tokenizer: str | None = None  # the transformers tokenizer class of a text encoder's tokenizer folder
    # the file sets a tokenizer folder of this kind holds, any one complete set (the fast tokenizer's first)
    tokenizer_files: tuple[tuple[str, ...], ...] = ()
    max_shard_bytes: int | None = None  # the weights' shard size on save; None: the library's (SHARD_LIMITS)

    def __post_init__(self):
        if self.max_shard_bytes is None:
            object.__setattr__(self, "max_shard_bytes", SHARD_LIMITS[self.library])

    @property
    def is_text_encoder(self) -> bool:
        return self.library == "transformers"


_CLIP_TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"))
KINDS = {
    "unet": Kind("diffusion_pytorch_model", "diffusers", "UNet2DConditionModel"),
    "vae": Kind("diffusion_pytorch_model", "diffusers", "AutoencoderKL"),
    "clip_text": Kind("model", "transformers", "CLIPTextModel", "text_model.", tokenizer="CLIPTokenizer",
                      tokenizer_files=_CLIP_TOKENIZER_FILES),
    "clip_text_projection": Kind("model", "transformers", "CLIPTextModelWithProjection", "text_model.",
                                 tokenizer="CLIPTokenizer", tokenizer_files=_CLIP_TOKENIZER_FILES),
    # T5TokenizerFast, as diffusers' Flux pipelines name it: the tokenizer.json one in transformers 4 and 5
    "t5": Kind("model", "transformers", "T5EncoderModel", None, t5.TORCH_TO_FLAX, t5.FLAX_TO_TORCH,
               t5.IGNORED_KEYS, tokenizer="T5TokenizerFast",
               tokenizer_files=(("tokenizer.json",), ("spiece.model",))),
    "flux_transformer": Kind("diffusion_pytorch_model", "diffusers", "FluxTransformer2DModel"),
}


def _text_save_prefix(with_projection: bool) -> str:
    # transformers 5 writes `CLIPTextModel` keys without `text_model.` (it is the base-model prefix) but keeps
    # it for `CLIPTextModelWithProjection`; transformers 4 writes it for both. Write what the installed one
    # writes, so that the files are exactly what it would have saved.
    return "" if int(transformers.__version__.split(".")[0]) >= 5 and not with_projection else "text_model."


def _check_kind(kind: str) -> Kind:
    if kind not in KINDS:
        raise UsageError(f"unknown component kind {kind!r}; expected one of {', '.join(KINDS)}")
    return KINDS[kind]


# kind -> (config dataclass, Flax module, abstract params of a config) of the kinds built from one config
_MODELS = {
    "unet": (unet.UNetConfig, unet.UNet2DConditionModel, unet.abstract_params),
    "vae": (vae.VAEConfig, vae.AutoencoderKL, vae.abstract_params),
    "t5": (t5.T5Config, t5.T5EncoderModel, t5.abstract_params),
    "flux_transformer": (flux.FluxConfig, flux.FluxTransformer2DModel, flux.abstract_params),
}


def load_tokenizer(folder: str, kind: str):
    """The tokenizer of a text encoder of `kind` from its folder (`tokenizer.json`, or the slow files:
    CLIP's `vocab.json` + `merges.txt`, T5's `spiece.model`). A folder without either is refused: transformers
    would build a near-empty tokenizer from it and every prompt would become unknown tokens."""
    spec = _check_kind(kind)
    if not os.path.isdir(folder):
        raise MissingFileError(f"missing tokenizer folder {folder}")
    present = [files for files in spec.tokenizer_files
               if all(os.path.isfile(os.path.join(folder, f)) for f in files)]
    if not present:
        wanted = " or ".join(" + ".join(files) for files in spec.tokenizer_files)
        raise MissingFileError(f"{folder}: no tokenizer files ({wanted}); an incomplete download?")
    if present[0] == ("spiece.model",) and importlib.util.find_spec("sentencepiece") is None:
        raise UsageError(f"{folder} holds only spiece.model, which needs the `sentencepiece` package: "
                         "pip install sentencepiece, or add the fast tokenizer's tokenizer.json")
    return getattr(transformers, spec.tokenizer).from_pretrained(folder)


def module_for(kind: str, cfg, **options):
    """The Flax module of `kind` for its config dataclass; `options` it has no field for (remat in a VAE,
    the fused norm in CLIP or T5) are dropped."""
    _check_kind(kind)
    if kind in _MODELS:
        cls = _MODELS[kind][1]
    else:
        cls = clip.CLIPTextModelWithProjection if kind == "clip_text_projection" else clip.CLIPTextModel
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(cfg, **{k: v for k, v in options.items() if k in fields})


def build_module(kind: str, config_dict: dict, source: str, **options):
    """(module, abstract params) of a component of `kind` from its config dict."""
    _check_kind(kind)
    try:
        if kind in _MODELS:
            config_cls, _, abstract_params = _MODELS[kind]
            cfg = config_cls.from_diffusers_config(config_dict)
            return module_for(kind, cfg, **options), abstract_params(cfg)
        cfg = clip.CLIPTextConfig.from_diffusers_config(config_dict)
        if "WithProjection" in str(config_dict.get("architectures")):
            kind = "clip_text_projection"
        with_projection = kind == "clip_text_projection"
        return module_for(kind, cfg, **options), clip.abstract_params(cfg, with_projection=with_projection)
    except UsageError as e:
        raise type(e)(f"{source}: {e}") from e


def load_folder(folder: str, kind: str, *, dtype=jnp.float32, param_dtype=None, variant=None,
                attention_impl: str = "auto", remat: bool = False, fused_norm: str | bool = "auto",
                weights: str = "device"):
    """Loads one component folder of `kind` -> (module, params).

    Args:
      folder: the component folder (holding `config.json` and the safetensors).
      kind: a key of `KINDS`.
      dtype: compute dtype of the module.
      attention_impl, fused_norm: which kernels the module runs, see `load_pipeline`.
      param_dtype: dtype of the returned params (default: `dtype`); every float dtype round-trips exactly
        through float32.
      weights: where the params go: 'device' (JAX arrays on the default device), 'host' (NumPy arrays, for the
        caller to place, e.g. sharded), 'none' (`jax.ShapeDtypeStruct`s from the config alone; the weight
        files are not read).
    """
    if weights not in WEIGHTS:
        raise UsageError(f"weights={weights!r}: expected one of {', '.join(WEIGHTS)}")
    spec = _check_kind(kind)
    dtype = parse_dtype(dtype)
    param_dtype = parse_dtype(param_dtype) or dtype
    if kind == "t5" and np.dtype(dtype) == np.float16:
        # T5's feed-forward outputs exceed fp16's range (transformers keeps its `wo` in fp32 for that)
        raise UnsupportedError("T5 does not compute in fp16 (its activations overflow): use bf16 or fp32")
    config_path = os.path.join(folder, "config.json")
    config_dict = fileio.read_json(config_path)
    options = dict(dtype=dtype, param_dtype=param_dtype,
                   attention_impl=choose.check_attention(attention_impl), remat=remat,
                   fused_norm=choose.check_fused_norm(fused_norm))
    module, abstract = build_module(kind, config_dict, config_path, **options)
    if weights == "none":
        return module, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, param_dtype), abstract)
    state, source = discovery.load_state_dict(discovery.find_weight_files(folder, spec.stem, variant))
    state = convert.normalize_state_dict(state, strip_prefix=spec.load_prefix)
    state = convert.rename_keys(state, spec.to_flax)
    params = convert.state_dict_to_params(state, abstract, dtype=param_dtype, source=source,
                                          ignore=spec.ignored)
    return module, params if weights == "host" else jax.tree.map(jnp.asarray, params)


def kind_of(module) -> str:
    """The kind of a built module (what `save_folder` writes it as)."""
    for kind, (_, cls, _) in _MODELS.items():
        if isinstance(module, cls):
            return kind
    return "clip_text_projection" if isinstance(module, clip.CLIPTextModelWithProjection) else "clip_text"


def save_folder(folder: str, module, params, *, dtype=None) -> None:
    """Writes `config.json` + the safetensors weights of one component, as diffusers/transformers name them:
    one file, or shards and their index beyond the kind's `max_shard_bytes` (stale weight files of an
    earlier save removed)."""
    kind = kind_of(module)
    spec = KINDS[kind]
    os.makedirs(folder, exist_ok=True)
    if kind == "t5":
        config, prefix = module.config.to_diffusers_config(), ""
    elif spec.is_text_encoder:
        with_projection = kind == "clip_text_projection"
        config = module.config.to_diffusers_config(with_projection=with_projection)
        prefix = _text_save_prefix(with_projection)
    else:
        config = module.config.to_diffusers_config()
        prefix = ""
    state = convert.params_to_state_dict(jax.device_get(params), dtype=parse_dtype(dtype))
    # The prefix belongs to the `text_model` submodule only, not to the projection beside it.
    state = {k if k.startswith("text_projection.") else prefix + k: v for k, v in state.items()}
    state = convert.rename_keys(state, spec.to_torch)
    # Shards fill in key order: numeric block order (`blocks.2` before `blocks.10`) keeps each shard a run of
    # consecutive blocks, as torch's module order does (whose exact order the params do not keep).
    state = {k: state[k] for k in sorted(state, key=_natural_key)}
    # transformers 5 also records the parameter count in a sharded index; diffusers does not.
    index_metadata = ({"total_parameters": sum(int(v.size) for v in state.values())}
                      if spec.is_text_encoder else None)
    safetensors_io.save_sharded(state, folder, spec.stem, max_shard_bytes=spec.max_shard_bytes,
                                metadata={"format": "pt"}, index_metadata=index_metadata)
    fileio.write_json(os.path.join(folder, "config.json"), config)


def _natural_key(key: str) -> tuple:
    """'a.10.b' -> (('a', 0), ('', 10), ('b', 0)): list indices compare as numbers."""
    return tuple(("", int(part)) if part.isdigit() else (part, 0) for part in key.split("."))
