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
import numpy as np
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from dreambooth_jax import images as image_io
from dreambooth_jax import parallel, storage
from dreambooth_jax.diffusion.generation import generate
from dreambooth_jax.errors import UsageError
from dreambooth_jax.images import count_images

log = logging.getLogger(__name__)
_NAME = re.compile(r"^class-(\d+)")


def _next_number(folder: str) -> int:
    numbers = [int(m.group(1)) for f in os.listdir(folder) if (m := _NAME.match(f))]
    return max(numbers, default=-1) + 1


def ensure_class_images(pipe, uri: str, prompt: str, num_images: int, *, batch_size_per_device: int,
                        num_inference_steps: int = 25, seed: int = 0, progress: bool = True) -> int:
    """Generates the class images missing from `folder`; returns how many were generated.

    Every process takes part: each batch is sharded over all devices, each process writes the images of its
    share of every batch, and all wait for each other before anyone reads the folder. On several hosts the
    folder must be one they share (a network filesystem or a bucket); each checks that it sees every image. A
    bucket folder (`gs://...`) is mirrored into a local twin, each process uploads the images it wrote, and
    all download the others' after the barrier.
    """
    remote = storage.Folder(uri)
    folder = remote.pull(required=False)
    if parallel.is_main_process() or remote.remote:
        os.makedirs(folder, exist_ok=True)
    parallel.barrier(f"class folder {uri}")
    have = count_images(folder)
    missing = num_images - have
    if missing <= 0:
        return 0
    log.info("%s holds %d class images of %d wanted: generating %d for %r", uri, have, num_images, missing,
             prompt)
    per_call = batch_size_per_device * jax.device_count()
    first = _next_number(folder)
    bar = None
    if progress and parallel.is_main_process():
        bar = tqdm(total=missing, desc="class images", unit="img")
    done = 0
    while done < missing:
        n = min(per_call, missing - done)
        images = generate(pipe, [prompt] * n, num_inference_steps=num_inference_steps,
                          seed=seed + first + done)
        written = []
        share = -(-n // jax.process_count())  # this process's consecutive images of the batch
        for k in range(jax.process_index() * share, min(n, (jax.process_index() + 1) * share)):
            number = first + done + k
            meta = {"prompt": prompt, "seed": seed + number, "steps": num_inference_steps,
                    "model": pipe.source}
            image_io.save_png(images[k], os.path.join(folder, f"class-{number:05d}.png"), meta)
            written.append(f"class-{number:05d}.png")
        remote.push(*written)  # this process's images of the batch (a no-op for a local folder)
        done += n
        if bar is not None:
            bar.update(n)
    if bar is not None:
        bar.close()
    parallel.barrier(f"class images {uri}")
    seen = count_images(remote.pull())
    if jax.process_count() > 1:
        fewest = int(multihost_utils.process_allgather(np.int32(seen)).min())
        if fewest < num_images:
            raise UsageError(f"{uri}: a host sees {fewest} class images of {num_images}; on several hosts "
                             "--class_data_dir must be a folder they share")
    return missing


def expected_class_images(concepts, num_images: int) -> int:
    """Class images a run will read once the missing ones are generated: each concept's folder holds at least
    `num_images` (a folder is listed, not read; a bucket folder is listed, not downloaded)."""
    def have(uri: str) -> int:
        folder = storage.Folder(uri)
        return folder.count_images() if folder.remote else count_images(uri)

    return sum(max(have(c.class_data_dir), num_images) for c in concepts if c.class_data_dir)
