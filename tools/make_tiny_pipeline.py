"""Build tiny random Stable Diffusion pipelines in the diffusers layout, offline, with PyTorch.

These are the reference fixtures of the test suite: an SD-1-style, an
SD-2-style (v-prediction, linear projections, upcast attention, per-block head dims) and an SDXL-style
(two text encoders, `text_time` added conditions, several transformer layers per block) pipeline, each a
few hundred kB, saved with diffusers' own `save_pretrained`. The Hugging Face Hub is not needed: the CLIP
BPE tokenizer is written from a small word list (`dreambooth_jax.testing.tiny`, which also makes the
torch-free demo model).

Usage: python tools/make_tiny_pipeline.py OUT_DIR [--kind sd1|sd2|sdxl|all] [--seed 0]
Needs torch, diffusers and transformers (the project's `test` extra).
"""

from __future__ import annotations

import argparse
import dataclasses
import os

from dreambooth_jax.testing import tiny

KINDS = ("sd1", "sd2", "sdxl")
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


def save_tiny_pipeline(out_dir: str, kind: str = "sd1", seed: int = 0) -> str:
    """Builds and saves a tiny pipeline of `kind` to `out_dir` (safetensors). Returns `out_dir`."""
    pipe = build_torch_pipeline(kind, seed)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="folder to write (one sub-folder per kind with --kind all)")
    parser.add_argument("--kind", default="sd1", choices=(*KINDS, "all"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    kinds = KINDS if args.kind == "all" else (args.kind,)
    for kind in kinds:
        out = os.path.join(args.out_dir, kind) if args.kind == "all" else args.out_dir
        save_tiny_pipeline(out, kind, args.seed)
        print(f"wrote tiny {kind} pipeline to {out}")


if __name__ == "__main__":
    main()
