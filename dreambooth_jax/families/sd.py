"""Stable Diffusion 1.x / 2.x: one CLIP text encoder whose last hidden state conditions the UNet."""

from __future__ import annotations

from dreambooth_jax.diffusion.conditioning import tokenize_with_mask
from dreambooth_jax.families.base import Family
from dreambooth_jax.lora.transform import TEXT_ENCODER_TARGETS, UNET_TARGETS


def tokenize(tokenizers: dict, prompts, max_length: int | None = None) -> dict:
    """{"input_ids", "attention_mask"}: [N, length] int32 (see `conditioning.tokenize_with_mask`)."""
    ids, mask = tokenize_with_mask(tokenizers["tokenizer"], prompts, max_length)
    return {"input_ids": ids, "attention_mask": mask}


def encode(run, tokens: dict, use_mask: bool = False) -> dict:
    """The text encoder's last hidden state; with `use_mask` (--text_encoder_use_attention_mask) it attends to
    the prompt's tokens only."""
    mask = tokens.get("attention_mask") if use_mask else None
    return {"context": run("text_encoder", tokens["input_ids"], mask).last_hidden_state}


def denoise(run, x, t, cond: dict, inputs: dict):
    return run("unet", x, t, cond["context"])


SD = Family(
    name="sd",
    pipeline_class="StableDiffusionPipeline",
    components={"unet": "unet", "vae": "vae", "text_encoder": "clip_text"},
    tokenizers=("tokenizer",),
    text_encoders=("text_encoder",),
    tokenize=tokenize,
    encode=encode,
    denoise=denoise,
    guidance_scale=7.5,
    lora_targets={"unet": UNET_TARGETS, "text_encoder": TEXT_ENCODER_TARGETS},
    # We carry no safety checker / image encoder; declared absent so diffusers does not look for them.
    absent_components=("safety_checker", "feature_extractor", "image_encoder"),
    index_flags={"requires_safety_checker": False},
    presets=("sd15", "sd21", "paper", "tiny_demo"),
)
