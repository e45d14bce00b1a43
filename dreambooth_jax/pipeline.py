"""Loading a whole diffusers pipeline folder into Flax, and saving one back that diffusers loads.

    pipe = load_pipeline("runwayml/stable-diffusion-v1-5", dtype=jnp.bfloat16)
    pipe.unet.apply({"params": pipe.params["unet"]}, latents, t, text_embeddings)
    save_pipeline(pipe, "out/")   # StableDiffusionPipeline.from_pretrained("out/") works
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dreambooth_jax import fileio
from dreambooth_jax.errors import MissingFileError, UsageError
from dreambooth_jax.kernels import choose
from dreambooth_jax.models import clip, unet, vae
from dreambooth_jax.weights import convert, discovery, hub, safetensors_io

_DTYPES = {"fp32": np.float32, "float32": np.float32, "fp16": np.float16, "float16": np.float16,
           "bf16": jnp.bfloat16, "bfloat16": jnp.bfloat16}
_PIPELINE_CLASSES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")


def parse_dtype(dtype) -> Any:
    """'bf16' / 'fp16' / 'fp32' (or a dtype) -> a NumPy/JAX dtype; None stays None."""
    if dtype is None or not isinstance(dtype, str):
        return dtype
    if dtype not in _DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


@dataclasses.dataclass(frozen=True)
class _Component:
    """How one component folder is stored: weight file stem, key prefixes, the class named in configs."""

    stem: str
    library: str
    class_name: str
    load_prefix: str | None = None  # stripped on load when present
    save_prefix: str = ""


def _text_save_prefix(with_projection: bool) -> str:
    # transformers 5 writes `CLIPTextModel` keys without `text_model.` (it is the base-model prefix) but keeps
    # it for `CLIPTextModelWithProjection`; transformers 4 writes it for both. Write what the installed one
    # writes, so that the files are exactly what it would have saved.
    import transformers

    return "" if int(transformers.__version__.split(".")[0]) >= 5 and not with_projection else "text_model."


_COMPONENTS = {
    "unet": _Component("diffusion_pytorch_model", "diffusers", "UNet2DConditionModel"),
    "vae": _Component("diffusion_pytorch_model", "diffusers", "AutoencoderKL"),
    "text_encoder": _Component("model", "transformers", "CLIPTextModel", "text_model."),
    "text_encoder_2": _Component("model", "transformers", "CLIPTextModelWithProjection", "text_model."),
}


def _build_module(name: str, config_dict: dict, source: str, **options):
    """(module, abstract params) of component `name` from its config dict."""
    try:
        if name == "unet":
            cfg = unet.UNetConfig.from_diffusers_config(config_dict)
            return unet.UNet2DConditionModel(cfg, **options), unet.abstract_params(cfg)
        options.pop("remat", None)
        if name == "vae":
            cfg = vae.VAEConfig.from_diffusers_config(config_dict)
            return vae.AutoencoderKL(cfg, **options), vae.abstract_params(cfg)
        options.pop("fused_norm", None)  # no GroupNorm in CLIP
        cfg = clip.CLIPTextConfig.from_diffusers_config(config_dict)
        with_projection = name == "text_encoder_2" or "WithProjection" in str(config_dict.get("architectures"))
        cls = clip.CLIPTextModelWithProjection if with_projection else clip.CLIPTextModel
        return cls(cfg, **options), clip.abstract_params(cfg, with_projection=with_projection)
    except UsageError as e:
        raise type(e)(f"{source}: {e}") from e


WEIGHTS = ("device", "host", "none")


def load_component(folder: str, name: str, *, dtype=jnp.float32, param_dtype=None, variant=None,
                   attention_impl: str = "auto", remat: bool = False, fused_norm: str | bool = "auto",
                   weights: str = "device"):
    """Loads one component folder (`unet`, `vae`, `text_encoder`, `text_encoder_2`) -> (module, params).

    Args:
      folder: the component folder (holding `config.json` and the safetensors).
      dtype: compute dtype of the module.
      attention_impl, fused_norm: which kernels the module runs, see `load_pipeline`.
      param_dtype: dtype of the returned params (default: `dtype`); None-like 'keep' is not offered since
        every float dtype round-trips exactly through float32.
      weights: where the params go: 'device' (JAX arrays on the default device), 'host' (NumPy arrays, for the
        caller to place, e.g. sharded), 'none' (`jax.ShapeDtypeStruct`s from the config alone; the weight files
        are not read).
    """
    if weights not in WEIGHTS:
        raise UsageError(f"weights={weights!r}: expected one of {', '.join(WEIGHTS)}")
    if name not in _COMPONENTS:
        raise UsageError(f"unknown component {name!r}; expected one of {', '.join(_COMPONENTS)}")
    spec = _COMPONENTS[name]
    dtype = parse_dtype(dtype)
    param_dtype = parse_dtype(param_dtype) or dtype
    config_path = os.path.join(folder, "config.json")
    config_dict = fileio.read_json(config_path)
    options = dict(dtype=dtype, param_dtype=param_dtype, attention_impl=choose.check_attention(attention_impl),
                   remat=remat, fused_norm=choose.check_fused_norm(fused_norm))
    module, abstract = _build_module(name, config_dict, config_path, **options)
    if weights == "none":
        return module, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, param_dtype), abstract)
    state, source = discovery.load_state_dict(discovery.find_weight_files(folder, spec.stem, variant))
    state = convert.normalize_state_dict(state, strip_prefix=spec.load_prefix)
    params = convert.state_dict_to_params(state, abstract, dtype=param_dtype, source=source,
                                          ignore=clip.IGNORED_KEYS)
    return module, params if weights == "host" else jax.tree.map(jnp.asarray, params)


def save_component(folder: str, name: str, module, params, *, dtype=None) -> None:
    """Writes `config.json` + the safetensors file of one component, as diffusers/transformers name them."""
    spec = _COMPONENTS[name]
    os.makedirs(folder, exist_ok=True)
    if name in ("unet", "vae"):
        config = module.config.to_diffusers_config()
        prefix = ""
    else:
        with_projection = isinstance(module, clip.CLIPTextModelWithProjection)
        config = module.config.to_diffusers_config(with_projection=with_projection)
        prefix = _text_save_prefix(with_projection)
    state = convert.params_to_state_dict(jax.device_get(params), dtype=parse_dtype(dtype))
    # The prefix belongs to the `text_model` submodule only, not to the projection beside it.
    state = {k if k.startswith("text_projection.") else prefix + k: v for k, v in state.items()}
    metadata = {"format": "pt"}
    safetensors_io.save_file(state, os.path.join(folder, f"{spec.stem}.safetensors"), metadata)
    fileio.write_json(os.path.join(folder, "config.json"), config)


@dataclasses.dataclass
class Pipeline:
    """A loaded Stable Diffusion (1.x/2.x) or SDXL pipeline: Flax modules, their params, tokenizers.

    `params` is one pytree {'unet', 'vae', 'text_encoder'[, 'text_encoder_2']} so that it can be passed
    whole to jitted functions and sharded at once.
    """

    unet: unet.UNet2DConditionModel
    vae: vae.AutoencoderKL
    text_encoder: clip.CLIPTextModel
    tokenizer: Any
    scheduler_config: dict
    params: dict
    text_encoder_2: clip.CLIPTextModelWithProjection | None = None
    tokenizer_2: Any = None
    model_index: dict = dataclasses.field(default_factory=dict)
    source: str = ""
    # Compiled programs (e.g. the sampler's, per scheduler and step count), so a second call does not recompile.
    cache: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


def _load_tokenizer(folder: str):
    from transformers import CLIPTokenizer

    if not os.path.isdir(folder):
        raise MissingFileError(f"missing tokenizer folder {folder}")
    return CLIPTokenizer.from_pretrained(folder)


def load_pipeline(name_or_path: str, *, dtype=jnp.float32, param_dtype=None, revision: str | None = None,
                  variant: str | None = None, token=None, cache_dir: str | None = None,
                  attention_impl: str = "auto", remat: bool = False, fused_norm: str | bool = "auto",
                  lora: str | None = None, lora_scale: float = 1.0, vae: str | None = None,
                  weights: str = "device") -> Pipeline:
    """Loads a diffusers pipeline folder, or a Hub repository id, into a `Pipeline`.

    Args:
      name_or_path: a local folder with `model_index.json`, or a Hub id (`stabilityai/stable-diffusion-2-1`).
      dtype: compute dtype ('fp32', 'bf16', 'fp16' or a dtype).
      param_dtype: params dtype (default: `dtype`); train with bf16 compute and fp32 params.
      revision, variant, token, cache_dir: as in diffusers' `from_pretrained` (Hub ids only, except variant).
      attention_impl: "auto" (default: the fastest that applies per call, `dreambooth_jax.kernels.choose`),
        or one of "einsum", "dot_product" (XLA), "cudnn", "pallas" to force one.
      remat: gradient checkpointing in the UNet.
      fused_norm: "auto" (default: on for GPU and TPU), "on" or "off" (or a bool): GroupNorm (+ SiLU) in the
        UNet and VAE as one Pallas kernel (`dreambooth_jax.kernels.group_norm`).
      lora: a LoRA file (diffusers or kohya layout) or a folder with `pytorch_lora_weights.safetensors`,
        merged into the params (`dreambooth_jax.lora.apply_file`); lora_scale multiplies its update.
      vae: another VAE instead of the pipeline's own: a model folder, a pipeline folder (its `vae/`), a bucket
        folder or a Hub id (e.g. 'madebyollin/sdxl-vae-fp16-fix', SDXL's VAE fine-tuned not to overflow in fp16);
        saved with the pipeline by `save_pipeline`.
      weights: 'device', 'host' or 'none' (configs and tokenizers only: the params are shapes); see
        `load_component`.
    """
    root = hub.resolve(name_or_path, revision=revision, variant=variant, token=token, cache_dir=cache_dir,
                       weights=weights != "none", skip=("vae",) if vae else ())
    index = fileio.read_json(os.path.join(root, "model_index.json"))
    class_name = index.get("_class_name")
    if class_name not in _PIPELINE_CLASSES:
        raise UsageError(f"{root}/model_index.json: pipeline class {class_name!r} is not supported "
                         f"(supported: {', '.join(_PIPELINE_CLASSES)})")
    options = dict(dtype=dtype, param_dtype=param_dtype, variant=variant, attention_impl=attention_impl,
                   fused_norm=fused_norm, weights=weights)
    names = ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if class_name.endswith("XLPipeline") else [])
    modules, params = {}, {}
    folders = {name: os.path.join(root, name) for name in names}
    variants = dict.fromkeys(names, variant)
    if vae:  # its own weights: of `variant` where it has that variant, else its plain ones
        folders["vae"] = hub.resolve_component(vae, "vae", variant=variant, token=token, cache_dir=cache_dir,
                                               weights=weights != "none")
        variants["vae"] = variant if discovery.has_variant(folders["vae"], _COMPONENTS["vae"].stem, variant) else None
    for name in names:
        modules[name], params[name] = load_component(folders[name], name, remat=remat and name == "unet",
                                                     **{**options, "variant": variants[name]})
    sdxl = "text_encoder_2" in modules
    pipe = Pipeline(
        unet=modules["unet"],
        vae=modules["vae"],
        text_encoder=modules["text_encoder"],
        tokenizer=_load_tokenizer(os.path.join(root, "tokenizer")),
        scheduler_config=fileio.read_json(os.path.join(root, "scheduler", "scheduler_config.json")),
        params=params,
        text_encoder_2=modules.get("text_encoder_2"),
        tokenizer_2=_load_tokenizer(os.path.join(root, "tokenizer_2")) if sdxl else None,
        model_index=index,
        source=name_or_path,
    )
    if lora:
        if weights != "device":
            raise UsageError("lora= merges into loaded weights: it needs weights='device'")
        from dreambooth_jax import lora as lora_lib

        return lora_lib.apply_file(pipe, lora, lora_scale)
    return pipe


def save_pipeline(pipe: Pipeline, out_dir: str, *, dtype=None, params: dict | None = None) -> str:
    """Writes `pipe` as a diffusers pipeline folder (`from_pretrained`-loadable); returns `out_dir`.

    Args:
      dtype: 'fp32', 'fp16' or 'bf16' for the saved weights (default: the params' own dtype).
      params: params to save instead of `pipe.params` (e.g. fine-tuned ones), same structure.
    """
    params = pipe.params if params is None else params
    os.makedirs(out_dir, exist_ok=True)
    components = {"unet": pipe.unet, "vae": pipe.vae, "text_encoder": pipe.text_encoder}
    if pipe.is_sdxl:
        components["text_encoder_2"] = pipe.text_encoder_2
    for name, module in components.items():
        save_component(os.path.join(out_dir, name), name, module, params[name], dtype=dtype)
    tokenizers = {"tokenizer": pipe.tokenizer, "tokenizer_2": pipe.tokenizer_2}
    for name, tok in tokenizers.items():
        if tok is not None:
            tok.save_pretrained(os.path.join(out_dir, name))
    os.makedirs(os.path.join(out_dir, "scheduler"), exist_ok=True)
    fileio.write_json(os.path.join(out_dir, "scheduler", "scheduler_config.json"), pipe.scheduler_config)
    fileio.write_json(os.path.join(out_dir, "model_index.json"), _model_index(pipe, components))
    return out_dir


def _model_index(pipe: Pipeline, components: dict) -> dict:
    index = {k: v for k, v in pipe.model_index.items() if not isinstance(v, list)}
    index["_class_name"] = "StableDiffusionXLPipeline" if pipe.is_sdxl else "StableDiffusionPipeline"
    for name in components:
        index[name] = [_COMPONENTS[name].library, _COMPONENTS[name].class_name]
    for name in ("tokenizer", "tokenizer_2") if pipe.is_sdxl else ("tokenizer",):
        index[name] = ["transformers", "CLIPTokenizer"]
    index["scheduler"] = ["diffusers", pipe.scheduler_config.get("_class_name", "PNDMScheduler")]
    # We carry no safety checker / image encoder; declare them absent so diffusers does not look for them.
    extras = ("feature_extractor", "image_encoder") if pipe.is_sdxl else ("safety_checker", "feature_extractor",
                                                                          "image_encoder")
    for name in extras:
        index[name] = [None, None]
    if not pipe.is_sdxl:
        index["requires_safety_checker"] = False
    return index


def export_pipeline(pipe: Pipeline, out_dir: str, *, params: dict | None = None, dtype=None) -> str:
    """`save_pipeline` into `out_dir` without ever leaving a half-written pipeline there.

    Everything is written to a temporary folder beside the target first; then each component replaces its
    old version, `model_index.json` last (so a folder with a `model_index.json` is always complete). Other
    content of `out_dir` (checkpoints, logs) is left alone.
    """
    import shutil
    import tempfile

    os.makedirs(out_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".export-", dir=out_dir)
    try:
        save_pipeline(pipe, tmp, dtype=dtype, params=params)
        index = os.path.join(out_dir, "model_index.json")
        if os.path.exists(index):
            os.remove(index)  # the old pipeline is incomplete from here until the new index lands
        for name in sorted(os.listdir(tmp)):
            if name == "model_index.json":
                continue
            target = os.path.join(out_dir, name)
            if os.path.isdir(target):
                shutil.rmtree(target)
            os.replace(os.path.join(tmp, name), target)
        os.replace(os.path.join(tmp, "model_index.json"), index)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
