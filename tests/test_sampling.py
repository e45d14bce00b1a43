"""The jit-compiled sampler: parity with diffusers' pipelines, determinism, devices, bad input, the CLI."""

from __future__ import annotations

import functools
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import xla_flags_with

from dreambooth_jax import images as image_io
from dreambooth_jax import sample as sample_cli
from dreambooth_jax.diffusion.generation import generate
from dreambooth_jax.pipeline import load_pipeline

# Images in [0, 1] after a whole fp32 denoising loop and VAE decode; measured max abs error ~1e-5 or below.
IMAGE_TOL = 1e-4
PROMPTS = ["a photo of sks dog", "a red cube on the beach"]


@functools.cache
def _pipe(path):
    return load_pipeline(path)


def _diffusers_images(path, scheduler_name, latents_nhwc, steps, guidance, kind, negative_prompt=None):
    import diffusers
    import torch

    classes = {"ddim": diffusers.DDIMScheduler, "dpmpp_2m": diffusers.DPMSolverMultistepScheduler,
               "pndm": diffusers.PNDMScheduler, "euler": diffusers.EulerDiscreteScheduler}
    cls = diffusers.StableDiffusionXLPipeline if kind == "sdxl" else diffusers.StableDiffusionPipeline
    pipe = cls.from_pretrained(path)
    pipe.scheduler = classes[scheduler_name].from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    latents = torch.tensor(latents_nhwc.transpose(0, 3, 1, 2))
    return pipe(PROMPTS, num_inference_steps=steps, guidance_scale=guidance, latents=latents, height=64, width=64,
                negative_prompt=None if negative_prompt is None else [negative_prompt] * len(PROMPTS),
                output_type="np").images


@pytest.mark.parametrize("kind, scheduler, negative", [
    ("sd1", "ddim", None), ("sd1", "dpmpp_2m", ""), ("sd2", "ddim", None), ("sd2", "dpmpp_2m", None),
    # SDXL: diffusers zeroes the negative conditioning only when no negative prompt is given
    # (`force_zeros_for_empty_prompt`); an explicit "" (what many front-ends send) is encoded.
    ("sdxl", "euler", None), ("sdxl", "euler", "")])
def test_images_match_diffusers_pipeline(tiny_pipelines, kind, scheduler, negative):
    """Same weights, latents and prompts, CFG on: our images equal diffusers' `output_type="np"` ones."""
    path = tiny_pipelines[kind]
    latents = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)
    ours = generate(_pipe(path), PROMPTS, num_inference_steps=6, guidance_scale=7.5, scheduler=scheduler,
                    latents=latents, height=64, width=64, negative_prompts=negative)
    ref = _diffusers_images(path, scheduler, latents, 6, 7.5, kind, negative)
    assert ours.shape == ref.shape == (2, 64, 64, 3) and ours.dtype == np.float32
    assert np.abs(ours - ref).max() <= IMAGE_TOL


def test_seeds_are_per_image_and_reproducible(tiny_pipelines):
    pipe = _pipe(tiny_pipelines["sd1"])
    kw = dict(num_inference_steps=3, scheduler="ddim")
    a = generate(pipe, PROMPTS, seed=7, **kw)
    programs = dict(pipe.cache["sampling"])  # (the pipeline is shared: other tests' programs are there too)
    traces = {key: fn._cache_size() for key, fn in programs.items()}
    weaker = generate(pipe, PROMPTS, seed=7, guidance_scale=5.0, **kw)  # guidance is an input, not a new program
    assert np.abs(weaker - a).max() > 1e-3
    b = generate(pipe, PROMPTS, seed=7, **kw)
    np.testing.assert_array_equal(a, b)
    assert pipe.cache["sampling"] == programs  # no new program...
    assert {key: fn._cache_size() for key, fn in programs.items()} == traces  # ...and no retrace
    # Image i depends on seed + i only: the second image alone, with its own seed, is the same picture
    # up to float rounding: XLA's kernels for batch 1 and batch 2 sum in different orders. Budget: a changed
    # summation order moves each layer's fp32 output by ~eps32 * sqrt(K) relative (K <= 1e3 terms here); over
    # the UNet's 3 calls and the decoder (~60 layers deep) that compounds to ~1e-5 of the pixel range. 1e-4 is
    # 10x that and still 40x below one 8-bit level, so the saved PNGs are the same.
    alone = generate(pipe, PROMPTS[1:], seed=8, **kw)
    np.testing.assert_allclose(alone[0], a[1], atol=1e-4)
    assert np.abs(generate(pipe, PROMPTS, seed=9, **kw) - a).max() > 1e-3


def test_same_images_on_one_and_eight_devices(tiny_pipelines, tmp_path):
    """8 simulated CPU devices (a subprocess: the flag must be set before JAX starts) vs this process."""
    path = tiny_pipelines["sd1"]
    prompts = PROMPTS * 3  # 6 images: padded to 8 on 8 devices
    kw = dict(num_inference_steps=3, scheduler="euler_a", seed=3)
    here = generate(_pipe(path), prompts, **kw)
    out = tmp_path / "eight.npy"
    code = (
        "import jax, numpy as np\n"
        "from dreambooth_jax.pipeline import load_pipeline\nfrom dreambooth_jax.diffusion.generation import generate\n"
        "assert jax.device_count() == 8\n"
        f"np.save({str(out)!r}, generate(load_pipeline({path!r}), {prompts!r}, **{kw!r}))\n"
    )
    env = {**os.environ, "XLA_FLAGS": xla_flags_with("--xla_force_host_platform_device_count=8"),
           "JAX_PLATFORMS": "cpu"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
    np.testing.assert_allclose(np.load(out), here, atol=1e-5)


def test_bad_input(tiny_pipelines, caplog):
    pipe = _pipe(tiny_pipelines["sd1"])
    with pytest.raises(ValueError, match="no prompts"):
        generate(pipe, [])
    with pytest.raises(ValueError, match="multiples of 8"):
        generate(pipe, PROMPTS, height=60)
    with pytest.raises(ValueError, match="unknown scheduler 'lms'.*ddim.*dpmpp_2m"):
        generate(pipe, PROMPTS, scheduler="lms")
    with pytest.raises(ValueError, match="latents must have shape"):
        generate(pipe, PROMPTS, latents=np.zeros((2, 4, 4, 4)))
    long_prompt = " ".join(["dog"] * 40)
    with caplog.at_level(logging.WARNING):
        out = generate(pipe, [long_prompt], num_inference_steps=3, scheduler="ddim")
    assert out.shape == (1, 64, 64, 3)
    assert "truncated" in caplog.text


def test_sample_cli_writes_pngs_metadata_and_grid(tiny_pipelines, tmp_path, capsys):
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("a photo of sks dog\n\na blue car\n")
    out = tmp_path / "out"
    args = ["--model", tiny_pipelines["sd1"], "--prompts_file", str(prompts_file), "--num_images", "2",
            "--steps", "3", "--seed", "5", "--output_dir", str(out), "--dtype", "fp32", "--attention", "einsum"]
    sample_cli.main(args)
    pngs = sorted(f for f in os.listdir(out) if f.endswith(".png") and not f.startswith("grid"))
    assert pngs == ["00000-seed5.png", "00001-seed6.png", "00002-seed7.png", "00003-seed8.png"]
    meta = image_io.read_png_metadata(str(out / "00002-seed7.png"))
    assert meta["prompt"] == "a blue car" and meta["seed"] == 7 and meta["steps"] == 3
    assert meta["scheduler"] == "pndm"  # the tiny SD1 pipeline's own scheduler
    lines = [json.loads(line) for line in (out / "prompts.jsonl").read_text().splitlines()]
    assert [line["file"] for line in lines] == pngs
    assert os.path.isfile(out / "grid-00000-00003.png")
    # A second run keeps the first run's images and numbers after them.
    sample_cli.main(["--model", tiny_pipelines["sd1"], "--prompt", "a dog", "--steps", "3", "--output_dir",
                     str(out), "--dtype", "fp32", "--seed", "1"])
    assert os.path.isfile(out / "00004-seed1.png") and os.path.isfile(out / "00000-seed5.png")
    assert "wrote 1 image(s)" in capsys.readouterr().err
