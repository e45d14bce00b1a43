"""Helpers shared by the trainer tests: synthetic photos, a tiny training config, a fixed-noise loss."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw
from safetensors.numpy import load_file

from dreambooth_jax.pipeline import load_pipeline
from dreambooth_jax.training import step as train_step
from dreambooth_jax.training.config import TrainConfig
from dreambooth_jax.training.data import Concept, DreamBoothData

PROMPT = "a photo of sks toy"
# Adam's first updates are ~lr * sign(g): a float-rounding-sized change of a near-zero gradient flips them. A
# large epsilon makes the update ~lr * g / eps, so equal gradients up to summation order give equal params.
# What differs between device counts, meshes and micro-batchings is only the order of the gradient sums (fp32,
# ~1e-7 relative per add over a few hundred terms) and of the fsdp all-gathers (exact): rtol 1e-5 bounds it.
RTOL, ATOL = 1e-5, 1e-7


def run_argv(tiny_pipelines, instance_dir, out, *extra) -> list[str]:
    """`python -m dreambooth_jax.train` options of a 2-step run on the tiny SD-1 pipeline."""
    return ["--pretrained_model_name_or_path", tiny_pipelines["sd1"], "--instance_data_dir", instance_dir,
            "--instance_prompt", PROMPT, "--output_dir", str(out), "--resolution", "64", "--attention",
            "einsum", "--max_train_steps", "2", "--seed", "0", *extra]


def full_run_argv(class_dir) -> list[str]:
    """Full fine-tuning with prior preservation, the text encoder and EMA, well conditioned (see RTOL)."""
    return ["--with_prior_preservation", "--class_data_dir", class_dir, "--class_prompt", "a photo of toy",
            "--num_class_images", "4", "--train_text_encoder", "--use_ema", "--adam_epsilon", "1.0",
            "--learning_rate", "1e-2"]


def exported_weights(out) -> dict[str, np.ndarray]:
    """The exported weights of a run: the pipeline's trained components, or the LoRA file."""
    lora = os.path.join(out, "pytorch_lora_weights.safetensors")
    if os.path.exists(lora):
        return load_file(lora)
    files = (("unet", "diffusion_pytorch_model"), ("text_encoder", "model"))
    return {f"{part}/{k}": v for part, file in files
            for k, v in load_file(os.path.join(out, part, f"{file}.safetensors")).items()}


def assert_same_weights(a: dict, b: dict, *, exact: bool = False) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        if exact:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        else:
            np.testing.assert_allclose(a[k], b[k], rtol=RTOL, atol=ATOL, err_msg=k)


def draw_images(folder, n, seed, size=(80, 72)):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        im = Image.new("RGB", size, tuple(int(c) for c in rng.integers(0, 255, 3)))
        x, y = (int(v) for v in rng.integers(5, 30, 2))
        ImageDraw.Draw(im).ellipse([x, y, x + 30, y + 30], fill=(250, 200, 0))
        im.save(os.path.join(folder, f"{i}.png"))
    return str(folder)


def train_cfg(tiny_pipelines, instance_dir, out, **kw) -> TrainConfig:
    base = dict(pretrained_model_name_or_path=tiny_pipelines["sd1"], instance_data_dir=instance_dir,
                instance_prompt=PROMPT, output_dir=str(out), resolution=64, train_batch_size=1,
                max_train_steps=2, learning_rate=1e-3, attention="einsum", checkpointing_steps=100, seed=0)
    return TrainConfig(**{**base, **kw})


def fixed_eval_loss(path, params, instance_dir):
    """Instance loss of `params` on fixed latents/noise/timesteps (deterministic progress measure)."""
    pipe = load_pipeline(path)
    spec = train_step.StepSpec.of(pipe)
    data = DreamBoothData([Concept(instance_dir, PROMPT)], resolution=64, center_crop=True)
    images = np.stack([data.fixed_view("instance", i) for i in range(4)] * 4)
    mean, _ = pipe.vae.apply({"params": pipe.params["vae"]}, images, method=pipe.vae.encode)
    latents = pipe.vae.scale_latents(mean)
    noise = jax.random.normal(jax.random.PRNGKey(1), latents.shape)
    t = jnp.tile(jnp.array([100, 400, 700, 900]), 4)
    tokens = pipe.tokenizer([PROMPT], padding="max_length", max_length=16, return_tensors="np")
    ids = np.tile(tokens.input_ids, (16, 1)).astype(np.int32)
    frozen = {**pipe.params, **params}
    loss = train_step.per_example_loss(spec, {}, frozen, {"input_ids": ids}, latents, noise, t)
    return float(jnp.mean(loss))
