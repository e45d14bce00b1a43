"""Build tiny random diffusion pipelines in the diffusers layout, offline, with PyTorch.

These are the reference fixtures of the test suite: an SD-1-style, an
SD-2-style (v-prediction, linear projections, upcast attention, per-block head dims), an SDXL-style
(two text encoders, `text_time` added conditions, several transformer layers per block) and two Flux.1-style
(`FluxPipeline`: a Flux transformer, CLIP + T5 text encoders, the 16-channel VAE without quant convs, the
flow-matching scheduler; `flux-dev` with the guidance embedding and dynamic shifting, `flux-schnell`
without either) pipelines, each a few hundred kB, saved with diffusers' own `save_pretrained`. The Hugging
Face Hub is not needed: the CLIP BPE and T5 unigram tokenizers are written from a small word list
(`dreambooth_jax.testing.tiny`, which also makes the torch-free demo model).

Usage: python tools/make_tiny_pipeline.py OUT_DIR [--kind sd1|sd2|sdxl|flux-dev|flux-schnell|all] [--seed 0]
Needs torch, diffusers and transformers (the project's `test` extra).
"""

from __future__ import annotations

import argparse
import dataclasses
import os

from dreambooth_jax.testing import tiny

KINDS = ("sd1", "sd2", "sdxl")
FLUX_KINDS = ("flux-dev", "flux-schnell")
# Flux.1's scheduler configs (black-forest-labs/FLUX.1-dev and -schnell's scheduler/scheduler_config.json)
FLUX_SCHEDULERS = {
    "flux-dev": dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                     max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096),
    "flux-schnell": dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False, base_shift=0.5,
                         max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096),
}
TOKENIZER_MAX_LENGTH = tiny.TOKENIZER_MAX_LENGTH
make_tokenizer = tiny.make_tokenizer


def variant_configs(kind: str, vocab_size: int):
    """Our tiny (text, unet, vae) configs (`dreambooth_jax.testing.tiny`), varied per kind to cover each
    family."""
    text, unet, vae = tiny.tiny_configs(vocab_size)
    if kind == "sd2":  # per-block heads, linear projections, upcast attention, gelu text encoder
        text = dataclasses.replace(text, hidden_act="gelu")
        unet = dataclasses.replace(unet, attention_head_dim=(2, 4, 8), use_linear_projection=True,
                                   upcast_attention=True)
    elif kind == "sdxl":  # two text encoders (the second projected), text_time added conditions
        text = dataclasses.replace(text, hidden_act="gelu")
        unet = dataclasses.replace(
            unet, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64,
            attention_head_dim=(2, 4, 8), transformer_layers_per_block=(1, 1, 2), use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + text.projection_dim,
        )
    elif kind != "sd1":
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    return text, unet, vae


def _torch_text_encoder(config, with_projection: bool = False):
    # heavy and optional: torch and diffusers (test-only dependencies) load only to build
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(CLIPTextConfig(**config.to_diffusers_config(with_projection=with_projection)))


def _scheduler(kind: str):
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, PNDMScheduler

    common = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
    if kind == "sd1":
        return PNDMScheduler(**common, skip_prk_steps=True, set_alpha_to_one=False)
    if kind == "sd2":
        return DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=False,
                             prediction_type="v_prediction")
    return EulerDiscreteScheduler(**common, timestep_spacing="leading")


def build_torch_pipeline(kind: str, seed: int = 0):
    """Returns a tiny random diffusers pipeline (PyTorch) of the given kind."""
    import torch

    torch.manual_seed(seed + KINDS.index(kind))  # distinct weights per kind
    from diffusers import AutoencoderKL, UNet2DConditionModel

    tokenizer = make_tokenizer()
    text_cfg, unet_cfg, vae_cfg = variant_configs(kind, len(tokenizer))
    text_encoder = _torch_text_encoder(text_cfg)
    unet = UNet2DConditionModel.from_config(unet_cfg.to_diffusers_config())
    vae = AutoencoderKL.from_config(vae_cfg.to_diffusers_config())
    scheduler = _scheduler(kind)
    for model in (text_encoder, unet, vae):
        model.eval()
    if kind == "sdxl":
        from diffusers import StableDiffusionXLPipeline

        tokenizer_2 = make_tokenizer(pad_token="!")
        text_encoder_2 = _torch_text_encoder(dataclasses.replace(text_cfg, num_hidden_layers=2), True)
        text_encoder_2.eval()
        return StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=unet,
            scheduler=scheduler,
        )
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def flux_configs(kind: str, clip_vocab: int, t5_vocab: int):
    """Our tiny (CLIP, T5, Flux transformer, VAE) configs of a Flux.1-style pipeline: 16 latent channels
    (64-wide packed tokens), 2 + 2 blocks of 2 heads x 16, and every size the wiring needs to agree on."""
    from dreambooth_jax.models import flux, t5

    text, _, vae_cfg = tiny.tiny_configs(clip_vocab)
    t5_cfg = t5.T5Config(vocab_size=t5_vocab, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4)
    transformer = flux.FluxConfig(in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=16,
                                  num_attention_heads=2, joint_attention_dim=t5_cfg.d_model,
                                  pooled_projection_dim=text.hidden_size, guidance_embeds=kind == "flux-dev",
                                  axes_dims_rope=(4, 6, 6))
    vae_cfg = dataclasses.replace(vae_cfg, latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159,
                                  use_quant_conv=False, use_post_quant_conv=False)
    return text, t5_cfg, transformer, vae_cfg


def build_torch_flux_pipeline(kind: str, seed: int = 0):
    """A tiny random diffusers `FluxPipeline` (PyTorch): `flux-dev` or `flux-schnell`."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    if kind not in FLUX_KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {FLUX_KINDS}")
    torch.manual_seed(seed + 10 + FLUX_KINDS.index(kind))
    tokenizer, tokenizer_2 = make_tokenizer(), tiny.make_t5_tokenizer()
    text_cfg, t5_cfg, transformer_cfg, vae_cfg = flux_configs(kind, len(tokenizer), len(tokenizer_2))
    t5_config = T5Config(**t5_cfg.to_diffusers_config())
    models = dict(text_encoder=_torch_text_encoder(text_cfg), text_encoder_2=T5EncoderModel(t5_config),
                  transformer=FluxTransformer2DModel.from_config(transformer_cfg.to_diffusers_config()),
                  vae=AutoencoderKL.from_config(vae_cfg.to_diffusers_config()))
    for model in models.values():
        model.eval()
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULERS[kind]),
                        tokenizer=tokenizer, tokenizer_2=tokenizer_2, **models)


def save_tiny_pipeline(out_dir: str, kind: str = "sd1", seed: int = 0) -> str:
    """Builds and saves a tiny pipeline of `kind` to `out_dir` (safetensors). Returns `out_dir`."""
    pipe = build_torch_flux_pipeline(kind, seed) if kind in FLUX_KINDS else build_torch_pipeline(kind, seed)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="folder to write (one sub-folder per kind with --kind all)")
    parser.add_argument("--kind", default="sd1", choices=(*KINDS, *FLUX_KINDS, "all"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    kinds = (*KINDS, *FLUX_KINDS) if args.kind == "all" else (args.kind,)
    for kind in kinds:
        out = os.path.join(args.out_dir, kind) if args.kind == "all" else args.out_dir
        save_tiny_pipeline(out, kind, args.seed)
        print(f"wrote tiny {kind} pipeline to {out}")


if __name__ == "__main__":
    main()
