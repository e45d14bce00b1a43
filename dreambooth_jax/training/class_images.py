"""Prior-preservation class images: fill `class_data_dir` up to `num_class_images` with our sampler.

Resumable: existing images are kept and counted; new ones are numbered after them and written batch by
batch, so an interrupted run loses at most one batch. Image k is drawn from seed `seed + k`, so the
same run settings always add the same pictures.
"""

from __future__ import annotations

import logging
import os
import re

import jax

from dreambooth_jax import images as image_io
from dreambooth_jax.images import count_images

log = logging.getLogger(__name__)
_NAME = re.compile(r"^class-(\d+)")


def _next_number(folder: str) -> int:
    numbers = [int(m.group(1)) for f in os.listdir(folder) if (m := _NAME.match(f))]
    return max(numbers, default=-1) + 1


def ensure_class_images(pipe, folder: str, prompt: str, num_images: int, *, batch_size_per_device: int,
                        num_inference_steps: int = 25, seed: int = 0, progress: bool = True) -> int:
    """Generates the class images missing from `folder`; returns how many were generated.

    Every process takes part in generation (the batch is sharded over all devices); process 0 writes.
    """
    from dreambooth_jax.diffusion.generation import generate

    os.makedirs(folder, exist_ok=True)
    have = count_images(folder)
    missing = num_images - have
    if missing <= 0:
        return 0
    log.info("%s holds %d class images of %d wanted: generating %d for %r", folder, have, num_images, missing,
             prompt)
    per_call = batch_size_per_device * jax.device_count()
    first = _next_number(folder)
    bar = None
    if progress and jax.process_index() == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=missing, desc="class images", unit="img")
    done = 0
    while done < missing:
        n = min(per_call, missing - done)
        images = generate(pipe, [prompt] * n, num_inference_steps=num_inference_steps, seed=seed + first + done)
        if jax.process_index() == 0:
            for k, image in enumerate(images):
                number = first + done + k
                meta = {"prompt": prompt, "seed": seed + number, "steps": num_inference_steps,
                        "model": pipe.source}
                image_io.save_png(image, os.path.join(folder, f"class-{number:05d}.png"), meta)
        done += n
        if bar is not None:
            bar.update(n)
    if bar is not None:
        bar.close()
    return missing
