"""Generate images from text: `python -m dreambooth_jax.sample --model PATH_OR_ID --prompt "..."`.

Writes one PNG per image (prompt, negative prompt, seed, steps, scheduler, guidance and model in its
metadata), a `prompts.jsonl` line per image, and a contact-sheet grid per run. Existing images in
`--output_dir` are kept: numbering continues after them.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax

from dreambooth_jax import images as image_io
from dreambooth_jax.cli import setup_logging
from dreambooth_jax.diffusion.generation import generate
from dreambooth_jax.diffusion.samplers import SCHEDULER_NAMES, scheduler_name_for
from dreambooth_jax.errors import UsageError
from dreambooth_jax.kernels.choose import ATTENTION_IMPLS, FUSED_NORM


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dreambooth_jax.sample", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="diffusers pipeline folder or Hugging Face Hub id")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the prompt")
    src.add_argument("--prompts_file", help="a text file with one prompt per line (blank lines skipped)")
    p.add_argument("--negative_prompt", default=None,
                   help="negative prompt, for every image (default: none; SDXL then uses zero conditioning, "
                        "as diffusers does, where an explicit '' is encoded)")
    p.add_argument("--num_images", type=int, default=1, help="images per prompt")
    p.add_argument("--steps", type=int, default=None,
                   help="denoising steps (default: the model family's: 50; Flux.1-dev 28, -schnell 4)")
    p.add_argument("--guidance_scale", type=float, default=None,
                   help="classifier-free guidance (<= 1: off), or Flux.1-dev's guidance input (default: the "
                        "model family's, as diffusers: SD 7.5, SDXL 5.0, Flux.1-dev 3.5)")
    p.add_argument("--guidance_rescale", type=float, default=0.0, help="guidance rescale, 0 to 1")
    p.add_argument("--scheduler", choices=SCHEDULER_NAMES, default=None,
                   help="sampler (default: the pipeline's own scheduler)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0: deterministic)")
    p.add_argument("--karras_sigmas", action="store_true", help="Karras sigmas (euler, euler_a, dpmpp_2m)")
    p.add_argument("--seed", type=int, default=0, help="image k of the run uses seed SEED + k")
    p.add_argument("--height", type=int, default=None, help="default: the model's native size")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--max_sequence_length", type=int, default=None,
                   help="Flux: T5 prompt length (default: dev 512, schnell 256; at most 512)")
    p.add_argument("--fsdp", type=int, default=1,
                   help="shard the networks over groups of this many devices (models that fit no single "
                        "device: Flux.1 on 16 GB chips); the images still split over every device")
    p.add_argument("--batch_size", type=int, default=None,
                   help="images per compiled call (default: 4 per device)")
    p.add_argument("--output_dir", default="samples")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16",
                   help="compute and weights dtype")
    p.add_argument("--attention", choices=ATTENTION_IMPLS, default="auto",
                   help="attention implementation ('auto': the fastest that applies per call)")
    p.add_argument("--fused_norm", choices=FUSED_NORM, default="auto",
                   help="GroupNorm + SiLU as one Pallas kernel ('auto': on for GPU and TPU)")
    p.add_argument("--lora", default=None,
                   help="LoRA file (diffusers/PEFT or kohya format) or folder with "
                        "pytorch_lora_weights.safetensors")
    p.add_argument("--lora_scale", type=float, default=1.0, help="strength of --lora")
    p.add_argument("--revision", default=None)
    p.add_argument("--variant", default=None, help="e.g. fp16: load the fp16 weight files")
    return p


def read_prompts(args) -> list[str]:
    if args.prompt is not None:
        return [args.prompt]
    with open(args.prompts_file, encoding="utf-8") as f:
        prompts = [line.strip() for line in f if line.strip()]
    if not prompts:
        raise UsageError(f"{args.prompts_file} holds no prompts")
    return prompts


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging()
    if args.num_images < 1 or (args.steps is not None and args.steps < 1) or args.fsdp < 1:
        raise UsageError("--num_images, --steps and --fsdp must be >= 1")
    prompts = read_prompts(args)
    os.makedirs(args.output_dir, exist_ok=True)

    # late: --help and usage errors answer before the models (flax, transformers) load
    from dreambooth_jax import parallel
    from dreambooth_jax.pipeline import load_pipeline

    mesh = parallel.train_mesh(args.fsdp)  # (data, fsdp); fsdp 1 is plain data parallelism
    t0 = time.perf_counter()
    # sharded: the weights stay on the host until each device receives its own shards
    pipe = load_pipeline(args.model, dtype=args.dtype, revision=args.revision, variant=args.variant,
                         attention_impl=args.attention, fused_norm=args.fused_norm, lora=args.lora,
                         lora_scale=args.lora_scale, weights="host" if args.fsdp > 1 else "device")
    scheduler = args.scheduler or scheduler_name_for(pipe.scheduler_config)
    guidance_scale = pipe.family.guidance_scale if args.guidance_scale is None else args.guidance_scale
    steps = args.steps or pipe.family.num_inference_steps
    print(f"loaded {args.model} in {time.perf_counter() - t0:.1f}s; {jax.device_count()} device(s) "
          f"({jax.devices()[0].platform}); scheduler {scheduler}, {steps} steps", file=sys.stderr)

    all_prompts = [p for p in prompts for _ in range(args.num_images)]
    # 4 images per device; 1 with sharded networks (large models, whose activations are large too)
    batch_size = args.batch_size or (1 if args.fsdp > 1 else 4) * jax.device_count()
    t0 = time.perf_counter()
    out = generate(pipe, all_prompts, negative_prompts=args.negative_prompt, num_inference_steps=steps,
                   guidance_scale=guidance_scale, guidance_rescale=args.guidance_rescale, scheduler=scheduler,
                   seed=args.seed, height=args.height, width=args.width, eta=args.eta,
                   use_karras_sigmas=True if args.karras_sigmas else None, batch_size=batch_size,
                   max_sequence_length=args.max_sequence_length, mesh=mesh, progress=True)
    elapsed = time.perf_counter() - t0

    settings = {"negative_prompt": args.negative_prompt, "steps": steps, "scheduler": scheduler,
                "guidance_scale": guidance_scale, "guidance_rescale": args.guidance_rescale, "eta": args.eta,
                "model": args.model, "lora": args.lora, "lora_scale": args.lora_scale if args.lora else None,
                "dtype": args.dtype}
    first, last, grid = image_io.write_images(args.output_dir, all_prompts, out, seed=args.seed,
                                              settings=settings,
                                              columns=args.num_images if len(prompts) > 1 else None)
    print(f"wrote {len(out)} image(s) {first:05d}..{last:05d} and {grid} in {elapsed:.1f}s "
          f"(compile included; {len(out) / elapsed:.2f} images/s)", file=sys.stderr)


if __name__ == "__main__":
    from dreambooth_jax import cli

    cli.run_main(main)
