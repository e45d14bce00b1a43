"""Sampling benchmark: images/s, compile time and peak device memory of `dreambooth_jax.generate`,
optionally beside diffusers' PyTorch pipeline on the same accelerator.

    python tools/bench_sample.py                                   # SD-1.5-shaped random weights, 512 px
    python tools/bench_sample.py --model PATH --batch 1 16 --steps 50 --scheduler pndm --dtype bf16 \
      --diffusers
    python tools/bench_sample.py --tiny --resolution 64 --steps 5  # a quick CPU smoke run

`--diffusers` times `StableDiffusionPipeline` with the same architecture, batch, steps and dtype when torch
with CUDA is installed. Prints one JSON line per measurement and a table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def sd15_configs():
    """SD 1.5's architecture (text encoder, UNet, VAE) from our presets."""
    # late, as in every tool: `--help` answers at once and a backend starts only for the work
    from dreambooth_jax.models import clip, unet, vae

    return clip.PRESETS["sd1"], unet.UNetConfig(cross_attention_dim=768), vae.SD_VAE


def sample_pipeline(args):
    from dreambooth_jax import families
    from dreambooth_jax.pipeline import load_pipeline
    from dreambooth_jax.testing import tiny

    if args.model:
        return load_pipeline(args.model, dtype=args.dtype, attention_impl=args.attention,
                             fused_norm=args.fused_norm)
    tokenizer = tiny.make_tokenizer()
    if args.tiny:
        configs = tiny.tiny_configs(len(tokenizer))
    else:
        tokenizer.model_max_length = 77
        configs = sd15_configs()
    return tiny.random_pipeline(families.SD, tiny.sd_configs(*configs), {"tokenizer": tokenizer},
                                tiny.SD1_SCHEDULER, dtype=args.dtype)


def peak_memory_gib() -> float | None:
    import jax

    stats = jax.local_devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**30


def bench_ours(pipe, batch: int, args) -> dict:
    import jax

    from dreambooth_jax.diffusion.generation import generate

    kw = dict(num_inference_steps=args.steps, scheduler=args.scheduler, height=args.resolution,
              width=args.resolution, guidance_scale=args.guidance_scale)
    prompts = ["a photo of sks dog on the beach"] * batch
    t0 = time.perf_counter()
    generate(pipe, prompts, seed=0, **kw)
    first = time.perf_counter() - t0
    times = []
    for r in range(args.repeats):
        t0 = time.perf_counter()
        generate(pipe, prompts, seed=r + 1, **kw)
        times.append(time.perf_counter() - t0)
    steady = min(times)
    return {"impl": "dreambooth_jax", "device": jax.devices()[0].device_kind, "batch": batch,
            "seconds_per_batch": steady, "images_per_s": batch / steady,
            "compile_s": max(0.0, first - steady), "peak_memory_gib": peak_memory_gib()}


def bench_diffusers(pipe, batch: int, args) -> dict | None:
    try:
        import torch  # heavy and optional: only --diffusers loads PyTorch (diffusers, transformers below)
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    unet = diffusers.UNet2DConditionModel.from_config(pipe.unet.config.to_diffusers_config())
    vae = diffusers.AutoencoderKL.from_config(pipe.vae.config.to_diffusers_config())
    text_config = pipe.text_encoder.config.to_diffusers_config(with_projection=False)
    text = CLIPTextModel(CLIPTextConfig(**text_config))
    sched = {"pndm": diffusers.PNDMScheduler, "ddim": diffusers.DDIMScheduler,
             "euler": diffusers.EulerDiscreteScheduler,
             "dpmpp_2m": diffusers.DPMSolverMultistepScheduler}[args.scheduler or "pndm"].from_config(
        pipe.scheduler_config)
    ref = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=pipe.tokenizer, unet=unet,
                                            scheduler=sched, safety_checker=None, feature_extractor=None,
                                            requires_safety_checker=False).to("cuda", dtype)
    ref.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=args.steps, height=args.resolution, width=args.resolution,
              guidance_scale=args.guidance_scale, output_type="np")
    prompts = ["a photo of sks dog on the beach"] * batch
    ref(prompts, **kw)  # warm-up
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        ref(prompts, **kw)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    steady = min(times)
    return {"impl": "diffusers", "device": torch.cuda.get_device_name(), "batch": batch,
            "seconds_per_batch": steady, "images_per_s": batch / steady, "compile_s": 0.0,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30}


def main(argv=None) -> None:
    from dreambooth_jax.kernels.choose import ATTENTION_IMPLS, FUSED_NORM

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None,
                   help="pipeline folder/Hub id (default: SD-1.5-shaped random weights)")
    p.add_argument("--tiny", action="store_true", help="the tiny random model instead (CPU smoke test)")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    p.add_argument("--scheduler", default="pndm")
    p.add_argument("--guidance_scale", type=float, default=7.5)
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    p.add_argument("--attention", default="auto", choices=ATTENTION_IMPLS,
                   help="'dot_product' with --fused_norm off: XLA only (the kernels-off row)")
    p.add_argument("--fused_norm", default="auto", choices=FUSED_NORM)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--diffusers", action="store_true", help="also time diffusers' PyTorch pipeline (CUDA)")
    args = p.parse_args(argv)

    pipe = sample_pipeline(args)
    if not args.model:
        pipe.unet, pipe.vae = (m.clone(attention_impl=args.attention, fused_norm=args.fused_norm)
                               for m in (pipe.unet, pipe.vae))
        pipe.text_encoder = pipe.text_encoder.clone(attention_impl=args.attention)
    rows = []
    for batch in args.batch:
        rows.append(bench_ours(pipe, batch, args))
        if args.diffusers:
            theirs = bench_diffusers(pipe, batch, args)
            if theirs is None:
                print("diffusers comparison skipped: torch with CUDA is not available", file=sys.stderr)
            else:
                rows.append(theirs)
    for row in rows:
        print(json.dumps({**row, "steps": args.steps, "resolution": args.resolution, "dtype": args.dtype,
                          "scheduler": args.scheduler, "attention": args.attention,
                          "fused_norm": args.fused_norm}))
    print(f"\n{'impl':<16}{'batch':>6}{'s/batch':>10}{'img/s':>9}{'compile s':>11}{'peak GiB':>10}")
    for r in rows:
        mem = "n/a" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.2f}"
        print(f"{r['impl']:<16}{r['batch']:>6}{r['seconds_per_batch']:>10.3f}{r['images_per_s']:>9.2f}"
              f"{r['compile_s']:>11.1f}{mem:>10}")


if __name__ == "__main__":
    main()
