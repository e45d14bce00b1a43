"""Loading a whole diffusers pipeline folder into Flax, and saving one back that diffusers loads.

    pipe = load_pipeline("runwayml/stable-diffusion-v1-5", dtype=jnp.bfloat16)
    pipe.unet.apply({"params": pipe.params["unet"]}, latents, t, text_embeddings)
    save_pipeline(pipe, "out/")   # StableDiffusionPipeline.from_pretrained("out/") works
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile

import jax.numpy as jnp

from dreambooth_jax import families, fileio
from dreambooth_jax import lora as lora_lib
from dreambooth_jax.errors import UsageError
from dreambooth_jax.families import components
from dreambooth_jax.families.components import WEIGHTS, parse_dtype
from dreambooth_jax.weights import discovery, hub

__all__ = ["WEIGHTS", "Pipeline", "export_pipeline", "load_component", "load_pipeline", "parse_dtype",
           "save_pipeline"]


def load_component(folder: str, name: str, **options):
    """Loads one component folder named as in a pipeline (`unet`, `vae`, `text_encoder`, ...)
    -> (module, params); options as `families.components.load_folder`."""
    return components.load_folder(folder, families.kind_of_folder(name, folder), **options)


@dataclasses.dataclass
class Pipeline:
    """A loaded pipeline of one model family: its Flax modules, their params, tokenizers, scheduler config.

    `params` is one pytree {component folder: params} so that it can be passed whole to jitted functions and
    sharded at once. The components and tokenizers are also attributes by their folder names (`pipe.unet`,
    `pipe.text_encoder`, `pipe.tokenizer`, ...: those of `family.components` and `family.tokenizers`).
    """

    family: families.Family
    modules: dict
    tokenizers: dict
    scheduler_config: dict
    params: dict
    model_index: dict = dataclasses.field(default_factory=dict)
    source: str = ""
    # Compiled programs (e.g. the sampler's, per scheduler and step count), so a second call does not
    # recompile.
    cache: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    def __getattr__(self, name: str):
        for table in ("modules", "tokenizers"):
            found = self.__dict__.get(table, {})
            if name in found:
                return found[name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    @property
    def denoiser(self):
        return self.modules[self.family.denoiser]

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.modules[self.family.vae].config.block_out_channels) - 1)

    def with_modules(self, **modules) -> Pipeline:
        """A copy whose named modules are replaced (e.g. the same networks with other kernels)."""
        return dataclasses.replace(self, modules={**self.modules, **modules}, cache={})


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
        folder or a Hub id (e.g. 'madebyollin/sdxl-vae-fp16-fix', SDXL's VAE fine-tuned not to overflow in
        fp16); saved with the pipeline by `save_pipeline`.
      weights: 'device', 'host' or 'none' (configs and tokenizers only: the params are shapes); see
        `load_component`.
    """
    root = hub.resolve(name_or_path, revision=revision, variant=variant, token=token, cache_dir=cache_dir,
                       weights=weights != "none", folders=families.weight_folders(),
                       skip=("vae",) if vae else ())
    index = fileio.read_json(os.path.join(root, "model_index.json"))
    family = families.for_class_name(index.get("_class_name"), f"{root}/model_index.json")
    options = dict(dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl, fused_norm=fused_norm,
                   weights=weights)
    folders = {name: os.path.join(root, name) for name in family.components}
    variants = dict.fromkeys(family.components, variant)
    if vae:  # its own weights: of `variant` where it has that variant, else its plain ones
        folders[family.vae] = hub.resolve_component(vae, family.vae, variant=variant, token=token,
                                                    cache_dir=cache_dir, weights=weights != "none")
        stem = components.KINDS[family.components[family.vae]].stem
        variants[family.vae] = variant if discovery.has_variant(folders[family.vae], stem, variant) else None
    # the small files first: a missing tokenizer or scheduler is reported before gigabytes of weights load
    tokenizers = {name: components.load_tokenizer(os.path.join(root, name), family.components[encoder])
                  for name, encoder in zip(family.tokenizers, family.text_encoders)}
    scheduler_config = fileio.read_json(os.path.join(root, "scheduler", "scheduler_config.json"))
    modules, params = {}, {}
    for name, kind in family.components.items():
        modules[name], params[name] = components.load_folder(
            folders[name], kind, remat=remat and name == family.denoiser, variant=variants[name], **options)
    pipe = Pipeline(
        family=family.specialize(family, modules),
        modules=modules,
        tokenizers=tokenizers,
        scheduler_config=scheduler_config,
        params=params,
        model_index=index,
        source=name_or_path,
    )
    if lora:
        if weights == "none":
            raise UsageError("lora= merges into loaded weights: it needs weights='device' or 'host'")
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
    for name, module in pipe.modules.items():
        components.save_folder(os.path.join(out_dir, name), module, params[name], dtype=dtype)
    for name, tok in pipe.tokenizers.items():
        tok.save_pretrained(os.path.join(out_dir, name))
    os.makedirs(os.path.join(out_dir, "scheduler"), exist_ok=True)
    fileio.write_json(os.path.join(out_dir, "scheduler", "scheduler_config.json"), pipe.scheduler_config)
    fileio.write_json(os.path.join(out_dir, "model_index.json"), _model_index(pipe))
    return out_dir


def _model_index(pipe: Pipeline) -> dict:
    family = pipe.family
    index = {k: v for k, v in pipe.model_index.items() if not isinstance(v, list)}
    index["_class_name"] = family.pipeline_class
    for name, module in pipe.modules.items():
        kind = components.KINDS[components.kind_of(module)]
        index[name] = [kind.library, kind.class_name]
    for name, encoder in zip(family.tokenizers, family.text_encoders):  # the class diffusers names for it
        index[name] = ["transformers", components.KINDS[components.kind_of(pipe.modules[encoder])].tokenizer]
    index["scheduler"] = ["diffusers", pipe.scheduler_config.get("_class_name", "PNDMScheduler")]
    for name in family.absent_components:
        index[name] = [None, None]
    index.update(family.index_flags)
    return index


def export_pipeline(pipe: Pipeline, out_dir: str, *, params: dict | None = None, dtype=None) -> str:
    """`save_pipeline` into `out_dir` without ever leaving a half-written pipeline there.

    Everything is written to a temporary folder beside the target first; then each component replaces its
    old version, `model_index.json` last (so a folder with a `model_index.json` is always complete). Other
    content of `out_dir` (checkpoints, logs) is left alone.
    """
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
