"""Stable Diffusion XL: two CLIP text encoders, a pooled embedding and per-picture size and crop ids.

As diffusers' `StableDiffusionXLPipeline` and `train_dreambooth_lora_sdxl.py` compute them: the context is
both encoders' penultimate hidden states concatenated on the feature axis, the pooled embedding the second
encoder's projected one, and `time_ids` = (original height, width, crop top, left, target height, width) per
example.
"""

from __future__ import annotations

import jax.numpy as jnp

from dreambooth_jax.diffusion.conditioning import tokenize_with_mask
from dreambooth_jax.errors import UsageError
from dreambooth_jax.families.base import Family
from dreambooth_jax.lora.transform import TEXT_ENCODER_TARGETS, UNET_TARGETS


def tokenize(tokenizers: dict, prompts, max_length: int | None = None) -> dict:
    """{"input_ids", "attention_mask", "input_ids_2"}: each tokenizer with its own padding (the second pads
    with `!`); the mask is the first tokenizer's (SDXL's encoders take none; kept for the batch's layout)."""
    ids, mask = tokenize_with_mask(tokenizers["tokenizer"], prompts, max_length)
    ids_2, _ = tokenize_with_mask(tokenizers["tokenizer_2"], prompts, max_length)
    return {"input_ids": ids, "attention_mask": mask, "input_ids_2": ids_2}


def encode(run, tokens: dict, use_mask: bool = False) -> dict:
    """Both encoders' penultimate hidden states, concatenated; the second encoder's pooled projection. SDXL's
    pipelines pass no attention mask (`check_options` refuses one)."""
    out = run("text_encoder", tokens["input_ids"])
    out_2 = run("text_encoder_2", tokens["input_ids_2"])
    first = out.hidden_states[-2]
    context = jnp.concatenate([first, out_2.hidden_states[-2].astype(first.dtype)], axis=-1)
    return {"context": context, "pooled": out_2.text_embeds}


def view_inputs(geometry) -> dict:
    """`time_ids` [N, 6]: the geometry as it is (original size, crop corner, target size)."""
    return {"time_ids": geometry}


def negative(cond: dict, empty, model_index: dict) -> dict:
    """No negative prompt given (`empty`): zero conditioning where the pipeline's
    `force_zeros_for_empty_prompt` says so (its default), as diffusers does."""
    if not model_index.get("force_zeros_for_empty_prompt", True):
        return cond
    return {"context": jnp.where(empty[:, None, None], 0.0, cond["context"]),
            "pooled": jnp.where(empty[:, None], 0.0, cond["pooled"])}


def denoise(run, x, t, cond: dict, inputs: dict):
    return run("unet", x, t, cond["context"], text_embeds=cond["pooled"], time_ids=inputs["time_ids"])


def check_options(options) -> None:
    if options.get("text_encoder_use_attention_mask"):
        raise UsageError("--text_encoder_use_attention_mask: SDXL's text encoders take no attention mask "
                         "(its pipelines and diffusers' SDXL scripts pass none)")


SDXL = Family(
    name="sdxl",
    pipeline_class="StableDiffusionXLPipeline",
    components={"unet": "unet", "vae": "vae", "text_encoder": "clip_text",
                "text_encoder_2": "clip_text_projection"},
    tokenizers=("tokenizer", "tokenizer_2"),
    text_encoders=("text_encoder", "text_encoder_2"),
    tokenize=tokenize,
    encode=encode,
    denoise=denoise,
    view_inputs=view_inputs,
    negative=negative,
    check_options=check_options,
    guidance_scale=5.0,
    lora_targets={"unet": UNET_TARGETS, "text_encoder": TEXT_ENCODER_TARGETS,
                  "text_encoder_2": TEXT_ENCODER_TARGETS},
    absent_components=("feature_extractor", "image_encoder"),
    presets=("sdxl", "sdxl_lora"),
)
