"""Flux.1 (dev and schnell): a rectified-flow transformer on 2x2-packed 16-channel latents, conditioned on
T5-XXL's states and CLIP-L's pooled output, as diffusers' `FluxPipeline` wires it.

Both models are `FluxPipeline`s; they differ in the transformer: dev is guidance-distilled (its
`guidance_embeds`: the guidance scale is a transformer input, one model call per step, default 3.5), schnell
is timestep-distilled (no guidance input; 4 steps; T5 prompts of 256 tokens, its model card's setting). The
pipeline's family is `FLUX` until its transformer's config is read; `specialize` then picks `FLUX_SCHNELL`
for a transformer without a guidance embedding.

The sampler keeps latents unpacked [N, H/8, W/8, 16] (NHWC, as for every family): the flow-matching Euler
step is elementwise, so packing only around the transformer call is the same computation as diffusers'
stepping of the packed sequence.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from dreambooth_jax.diffusion.conditioning import tokenize_with_mask
from dreambooth_jax.errors import UnsupportedError
from dreambooth_jax.families.base import Family
from dreambooth_jax.lora.transform import FLUX_TARGETS, TEXT_ENCODER_TARGETS
from dreambooth_jax.models import flux

DEFAULT_SAMPLE_SIZE = 128  # diffusers' FluxPipeline.default_sample_size: 1024 px with the 8x VAE


def tokenize(tokenizers: dict, prompts, max_length: int | None = None) -> dict:
    """{"input_ids": CLIP's ids [N, 77], "input_ids_2": T5's ids [N, max_length]}: both padded to their
    length and truncated, as diffusers' `FluxPipeline.encode_prompt` (neither encoder takes a mask)."""
    ids, _ = tokenize_with_mask(tokenizers["tokenizer"], prompts)
    ids_2, _ = tokenize_with_mask(tokenizers["tokenizer_2"], prompts, max_length or 512)
    return {"input_ids": ids, "input_ids_2": ids_2}


def encode(run, tokens: dict, use_mask: bool = False) -> dict:
    """The T5 encoder's last hidden state (the transformer's text stream) and CLIP's pooled output."""
    return {"context": run("text_encoder_2", tokens["input_ids_2"]),
            "pooled": run("text_encoder", tokens["input_ids"]).pooler_output}


def denoise(run, x, t, cond: dict, inputs: dict):
    """The velocity at latents x [N, h, w, 16] and flow time t (sigma x 1000, a scalar or [N]): x packed into
    tokens with their position ids, the transformer called at t / 1000 as diffusers does, unpacked again."""
    n, h, w, _ = x.shape
    context = cond["context"]
    timestep = jnp.broadcast_to(jnp.asarray(t).astype(x.dtype), (n,)) / 1000
    out = run("transformer", flux.pack_latents(x), context, cond["pooled"], timestep, flux.image_ids(h, w),
              flux.text_ids(context.shape[1]), guidance=inputs.get("guidance"))
    return flux.unpack_latents(out, h, w)


def sample_size(pipe) -> int:
    return DEFAULT_SAMPLE_SIZE * pipe.vae_scale_factor


def refuse_training(options) -> None:
    raise UnsupportedError("DreamBooth training of Flux pipelines is not supported yet (sampling, loading "
                           "and saving are); train an SD 1.x/2.x or SDXL pipeline")


def specialize(family: Family, modules: dict) -> Family:
    """Flux.1-dev for a transformer with a guidance embedding, else Flux.1-schnell."""
    return FLUX if modules["transformer"].config.guidance_embeds else FLUX_SCHNELL


FLUX = Family(
    name="flux-dev",
    pipeline_class="FluxPipeline",
    components={"transformer": "flux_transformer", "vae": "vae", "text_encoder": "clip_text",
                "text_encoder_2": "t5"},
    tokenizers=("tokenizer", "tokenizer_2"),
    text_encoders=("text_encoder", "text_encoder_2"),
    tokenize=tokenize,
    encode=encode,
    denoise=denoise,
    denoiser="transformer",
    check_options=refuse_training,
    guidance_scale=3.5,
    num_inference_steps=28,
    guidance="embedded",
    sample_size=sample_size,
    latent_patch=2,
    max_sequence_length=512,
    specialize=specialize,
    lora_targets={"transformer": FLUX_TARGETS, "text_encoder": TEXT_ENCODER_TARGETS},
    absent_components=("image_encoder", "feature_extractor"),
)

FLUX_SCHNELL = dataclasses.replace(FLUX, name="flux-schnell", guidance="none", guidance_scale=0.0,
                                   num_inference_steps=4, max_sequence_length=256)
