"""The offline demo, end to end on a CPU: make a tiny random Stable Diffusion model and a few photos of a
"toy" (if absent), DreamBooth-train it with prior preservation (`--config tiny_demo`), sample from the
trained model, and check that the exported diffusers pipeline reloads bit for bit.

    python -m dreambooth_jax.demo [--output_dir demo_output] [--max_train_steps N]

No network, no torch; a few minutes on 2 CPU cores. The images are noise-like (the model is tiny and
random); the point is that every stage runs and what it writes.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
from PIL import Image, ImageDraw

from dreambooth_jax import images as image_io
from dreambooth_jax.cli import setup_logging


def make_instance_photos(folder: str, n: int = 4, seed: int = 0) -> str:
    """A few 96 px 'photos' of the same yellow toy on varied backgrounds (kept if already there)."""
    os.makedirs(folder, exist_ok=True)
    if any(f.endswith(".png") for f in os.listdir(folder)):
        return folder
    rng = np.random.default_rng(seed)
    for i in range(n):
        im = Image.new("RGB", (96, 96), tuple(int(c) for c in rng.integers(30, 220, 3)))
        x, y = (int(v) for v in rng.integers(10, 40, 2))
        draw = ImageDraw.Draw(im)
        draw.ellipse([x, y, x + 44, y + 44], fill=(245, 200, 20))
        draw.rectangle([x + 14, y + 14, x + 30, y + 30], fill=(200, 30, 30))
        im.save(os.path.join(folder, f"toy-{i}.png"))
    return folder


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="demo_output", help="everything the demo makes goes here")
    parser.add_argument("--max_train_steps", type=int, default=None, help="default: the tiny_demo preset's")
    args = parser.parse_args(argv)

    # late: --help and usage errors answer before jax (and the models) load
    import jax

    from dreambooth_jax.diffusion.generation import generate
    from dreambooth_jax.pipeline import load_pipeline
    from dreambooth_jax.training.config import parse_args
    from dreambooth_jax.training.trainer import run

    setup_logging()
    out = args.output_dir
    model = os.path.join(out, "tiny-sd1")
    if not os.path.isfile(os.path.join(model, "model_index.json")):
        from dreambooth_jax.testing.tiny import make_tiny_pipeline  # test fixtures: only to make the model

        make_tiny_pipeline(model)
        print(f"[1/4] made a tiny random SD-1-style pipeline in {model}")
    else:
        print(f"[1/4] using the tiny pipeline in {model}")
    instance = make_instance_photos(os.path.join(out, "instance"))

    train_args = ["--config", "tiny_demo", "--pretrained_model_name_or_path", model,
                  "--instance_data_dir", instance, "--class_data_dir", os.path.join(out, "class"),
                  "--output_dir", os.path.join(out, "model")]
    if args.max_train_steps:
        train_args += ["--max_train_steps", str(args.max_train_steps)]
    cfg = parse_args(train_args)
    print(f"[2/4] training: python -m dreambooth_jax.train {' '.join(train_args)}")
    t0 = time.perf_counter()
    result = run(cfg)
    losses = [row["instance_loss"] for row in result.metrics]
    k = max(1, len(losses) // 4)
    print(f"      {result.steps} steps in {time.perf_counter() - t0:.0f}s; instance loss "
          f"{np.mean(losses[:k]):.3f} (first {k}) -> {np.mean(losses[-k:]):.3f} (last {k}); "
          f"pipeline exported to {cfg.output_dir}")

    trained = load_pipeline(cfg.output_dir)
    samples = generate(trained, ["a photo of sks toy on the beach", "a photo of sks toy in the snow"],
                       num_inference_steps=10, seed=0)
    sheet = os.path.join(out, "samples.png")
    image_io.save_png(image_io.contact_sheet(samples), sheet,
                      {"prompts": "sks toy on the beach / in the snow"})
    print(f"[3/4] sampled 2 images from the trained pipeline: {sheet}")

    expected = jax.device_get(result.state.export_params())
    pairs = zip(jax.tree.leaves(expected), jax.tree.leaves(trained.params))
    bit_exact = all(np.array_equal(a, b) for a, b in pairs)
    print(f"[4/4] the exported pipeline reloads bit-exact: {bit_exact}")
    if not bit_exact:
        raise SystemExit("the export does not match the trained weights")
    print(f"done. Everything is in {out}/; the pipeline in {cfg.output_dir} also loads with "
          f"diffusers.StableDiffusionPipeline.from_pretrained({cfg.output_dir!r}).")


if __name__ == "__main__":
    from dreambooth_jax import cli

    cli.run_main(main)
