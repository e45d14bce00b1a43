"""Write the config-only skeleton of a full-size pipeline (SD 1.5, SD 2.1, SDXL, Flux.1-dev and -schnell):
`model_index.json`, each component's `config.json`, the scheduler config and the tokenizers; no weights.

That is all `python -m dreambooth_jax.train --dry_run` reads, so memory preflights of the real model sizes run
offline, on any machine (`tools/bench_memory.py` uses these). With the Hub reachable, `--dry_run` on the Hub
id itself downloads the same files. The tokenizer is the tiny test vocabulary set to 77 tokens: the models'
vocabulary size comes from the text encoder's config, so shapes and memory are those of the real models
(Flux's T5 tokenizer is the tiny one too, with T5's 512 tokens).

Usage: python tools/make_config_pipeline.py OUT_DIR [--kind sd15|sd21|sdxl|flux-dev|flux-schnell]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

KINDS = ("sd15", "sd21", "sdxl", "flux-dev", "flux-schnell")


def configs(kind: str) -> dict:
    """{component: diffusers config dict} of `kind`, from our model presets."""
    # late, as in every tool: `--help` answers at once and JAX loads only for the work
    from dreambooth_jax.models import clip, unet, vae
    from dreambooth_jax.testing import tiny

    scheduler = dict(tiny.SD1_SCHEDULER)
    if kind == "sd15":
        text, unet_cfg, vae_cfg = clip.PRESETS["sd1"], unet.UNetConfig(cross_attention_dim=768), vae.SD_VAE
    elif kind == "sd21":  # stabilityai/stable-diffusion-2-1 (768 px, v-prediction)
        text, vae_cfg = clip.PRESETS["sd2"], dataclasses.replace(vae.SD_VAE, sample_size=768)
        unet_cfg = unet.UNetConfig(cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                                   use_linear_projection=True, upcast_attention=True, sample_size=96)
        scheduler = {**scheduler, "prediction_type": "v_prediction"}
    elif kind == "sdxl":  # stabilityai/stable-diffusion-xl-base-1.0
        text, vae_cfg = clip.PRESETS["sdxl"], vae.SDXL_VAE
        unet_cfg = unet.UNetConfig(
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(320, 640, 1280), cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
            transformer_layers_per_block=(1, 2, 10), use_linear_projection=True, sample_size=128,
            addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816)
        scheduler = {**scheduler, "_class_name": "EulerDiscreteScheduler"}
    else:
        raise SystemExit(f"error: unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
    out = {"unet": unet_cfg.to_diffusers_config(), "vae": vae_cfg.to_diffusers_config(),
           "text_encoder": text.to_diffusers_config(with_projection=False), "scheduler": scheduler}
    if kind == "sdxl":
        out["text_encoder_2"] = clip.PRESETS["sdxl_2"].to_diffusers_config(with_projection=True)
    return out


def flux_configs(kind: str) -> dict:
    """{component: config dict} of black-forest-labs/FLUX.1-dev or -schnell."""
    from make_tiny_pipeline import FLUX_SCHEDULERS

    from dreambooth_jax.models import clip, flux, t5, vae

    return {"transformer": flux.PRESETS[kind].to_diffusers_config(),
            "vae": vae.FLUX_VAE.to_diffusers_config(),
            "text_encoder": clip.PRESETS["sd1"].to_diffusers_config(with_projection=False),
            "text_encoder_2": t5.PRESETS["flux"].to_diffusers_config(),
            "scheduler": {"_class_name": "FlowMatchEulerDiscreteScheduler", **FLUX_SCHEDULERS[kind]}}


def make_flux_config_pipeline(out_dir: str, kind: str) -> str:
    from dreambooth_jax import fileio
    from dreambooth_jax.testing import tiny

    index = {"_class_name": "FluxPipeline", "_diffusers_version": "0.42.1",
             "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"],
             "text_encoder_2": ["transformers", "T5EncoderModel"],
             "tokenizer_2": ["transformers", "T5Tokenizer"],
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}
    for name, config in flux_configs(kind).items():
        file = "scheduler_config.json" if name == "scheduler" else "config.json"
        os.makedirs(os.path.join(out_dir, name), exist_ok=True)
        fileio.write_json(os.path.join(out_dir, name, file), config)
    tokenizer = tiny.make_tokenizer()
    tokenizer.model_max_length = 77
    tokenizer.save_pretrained(os.path.join(out_dir, "tokenizer"))
    tiny.make_t5_tokenizer(512).save_pretrained(os.path.join(out_dir, "tokenizer_2"))
    fileio.write_json(os.path.join(out_dir, "model_index.json"), index)
    return out_dir


def make_config_pipeline(out_dir: str, kind: str) -> str:
    from dreambooth_jax import fileio
    from dreambooth_jax.testing import tiny

    if kind.startswith("flux"):
        return make_flux_config_pipeline(out_dir, kind)

    parts = configs(kind)
    sdxl = "text_encoder_2" in parts
    index = {"_class_name": "StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline",
             "_diffusers_version": "0.42.1", "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"],
             "scheduler": ["diffusers", parts["scheduler"]["_class_name"]]}
    for name, config in parts.items():
        file = "scheduler_config.json" if name == "scheduler" else "config.json"
        os.makedirs(os.path.join(out_dir, name), exist_ok=True)
        fileio.write_json(os.path.join(out_dir, name, file), config)
    tokenizers = ["tokenizer"]
    if sdxl:
        index["text_encoder_2"] = ["transformers", "CLIPTextModelWithProjection"]
        index["tokenizer_2"] = ["transformers", "CLIPTokenizer"]
        tokenizers.append("tokenizer_2")
    for name in tokenizers:
        tok = tiny.make_tokenizer(pad_token="!" if name == "tokenizer_2" else "<|endoftext|>")
        tok.model_max_length = 77
        tok.save_pretrained(os.path.join(out_dir, name))
    fileio.write_json(os.path.join(out_dir, "model_index.json"), index)
    return out_dir


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir")
    p.add_argument("--kind", choices=KINDS, default="sd15")
    args = p.parse_args(argv)
    print(make_config_pipeline(args.out_dir, args.kind))


if __name__ == "__main__":
    main()
