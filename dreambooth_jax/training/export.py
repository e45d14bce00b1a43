"""What a run leaves behind: the trained weights as a diffusers pipeline folder, or LoRA files (diffusers/PEFT
and kohya formats) and optionally the pipeline with the LoRA merged in."""

from __future__ import annotations

import logging
import os

import jax

from dreambooth_jax import lora, parallel
from dreambooth_jax.pipeline import export_pipeline, load_pipeline
from dreambooth_jax.training.specs import ExportSpec

log = logging.getLogger("dreambooth_jax.train")


def pipeline_params(state, lora_config: lora.LoraConfig | None) -> dict:
    """Every network's weights as the pipeline needs them: EMA where kept, LoRA factors merged in."""
    params = dict(state.export_params())
    for part in [k for k in params if k.endswith("_lora")]:
        net = part.removesuffix("_lora")
        params[net] = lora.merge(params[net], params.pop(part), lora_config)
    return params


def export(spec: ExportSpec, pipe, state, lora_config: lora.LoraConfig | None, *, step: int,
           write: bool = True, base: dict | None = None) -> list[str]:
    """Writes the result of `state` (at step `step`) to `spec.output_dir`: the diffusers pipeline, or with
    LoRA the adapter files and, with `spec.merge_lora`, the pipeline with them merged in (into `base`, default
    `merge_base(spec)`). Every process calls it (sharded weights are gathered to the host, leaf by leaf, by
    all processes together); only `write` ones write. Returns the names written in `spec.output_dir` (files
    and folders)."""
    out = spec.output_dir
    if not spec.use_lora:
        params = parallel.host_copy(pipeline_params(state, lora_config))
        if not write:
            return []
        export_pipeline(pipe, out, params=params)
        log.info("exported the pipeline of step %d to %s", step, out)
        return pipeline_files(pipe)
    exported = state.export_params()
    loras = {k.removesuffix("_lora"): parallel.host_copy(v)
             for k, v in exported.items() if k.endswith("_lora")}
    if not write:
        return []
    lora.save_diffusers(out, loras, lora_config)
    lora.save_kohya(os.path.join(out, lora.KOHYA_WEIGHT_NAME), loras, lora_config)
    log.info("exported the LoRA of step %d to %s (diffusers and kohya formats)", step, out)
    written = [lora.WEIGHT_NAME, lora.KOHYA_WEIGHT_NAME]
    if spec.merge_lora:
        base = base or merge_base(spec)
        merged = {**base, **{net: lora.merge(base[net], f, lora_config) for net, f in loras.items()}}
        export_pipeline(pipe, out, params=jax.device_get(merged))
        log.info("exported the pipeline with the LoRA merged in to %s", out)
        written += pipeline_files(pipe)
    return written


def merge_base(spec: ExportSpec) -> dict:
    """What --merge_lora merges into: the fp32 base weights from disk, not the compute-dtype copy trained
    against."""
    return load_pipeline(spec.pretrained_model_name_or_path, revision=spec.revision, variant=spec.variant,
                         vae=spec.pretrained_vae_model_name_or_path, weights="host").params


def pipeline_files(pipe) -> list[str]:
    """The names a saved pipeline consists of in its folder (model_index.json last: the one saying it is
    complete)."""
    return list(pipe.family.files)
