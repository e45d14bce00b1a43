"""The jit-compiled sampler: parity with diffusers' pipelines, determinism, devices, bad input, the CLI."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import xla_flags_with

from dreambooth_jax import images as image_io
from dreambooth_jax import sample as sample_cli
from dreambooth_jax.diffusion.generation import generate
from dreambooth_jax.errors import UsageError
from dreambooth_jax.pipeline import load_pipeline

# Images in [0, 1] after a whole fp32 denoising loop and VAE decode; measured max abs error ~1e-5 or below.
IMAGE_TOL = 1e-4
PROMPTS = ["a photo of sks dog", "a red cube on the beach"]


@functools.cache
def _pipe(path):
    return load_pipeline(path)


def _diffusers_images(path, scheduler_name, latents_nhwc, steps, guidance, kind, negative_prompt=None):
    import diffusers  # heavy (PyTorch): only the parity references load it
    import torch

    classes = {"ddim": diffusers.DDIMScheduler, "dpmpp_2m": diffusers.DPMSolverMultistepScheduler,
               "pndm": diffusers.PNDMScheduler, "euler": diffusers.EulerDiscreteScheduler}
    cls = diffusers.StableDiffusionXLPipeline if kind == "sdxl" else diffusers.StableDiffusionPipeline
    pipe = cls.from_pretrained(path)
    pipe.scheduler = classes[scheduler_name].from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    latents = torch.tensor(latents_nhwc.transpose(0, 3, 1, 2))
    return pipe(PROMPTS, num_inference_steps=steps, guidance_scale=guidance, latents=latents, height=64,
                width=64,
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
    # guidance is an input, not a new program
    weaker = generate(pipe, PROMPTS, seed=7, guidance_scale=5.0, **kw)
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
        "from dreambooth_jax.pipeline import load_pipeline\nfrom dreambooth_jax.diffusion.generation import "
        "generate\nassert jax.device_count() == 8\n"
        f"np.save({str(out)!r}, generate(load_pipeline({path!r}), {prompts!r}, **{kw!r}))\n"
    )
    env = {**os.environ, "XLA_FLAGS": xla_flags_with("--xla_force_host_platform_device_count=8"),
           "JAX_PLATFORMS": "cpu"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
    np.testing.assert_allclose(np.load(out), here, atol=1e-5)


def _perturbed_sets(tree, k: int, seed: int):
    """`tree` with a leading axis of `k` sets: set 0 is `tree`, the others add seeded noise of 1e-2 of each
    leaf's std (a small fine-tune's worth: visibly different images, the same network)."""
    rng = np.random.default_rng(seed)

    def sets(x):
        x = np.asarray(x)
        noise = rng.standard_normal((k, *x.shape)).astype(x.dtype) * (1e-2 * x.std())
        return x + np.concatenate([np.zeros_like(noise[:1]), noise[1:]])

    return jax.tree.map(sets, tree)


def test_subject_params_sample_each_set_in_one_program(tiny_pipelines):
    """K = 3 (unet, text encoder) parameter sets vmapped in one program: set k's images equal a plain call on
    the pipeline with set k's params; the sets' images differ; bad sets are refused."""
    pipe = _pipe(tiny_pipelines["sd1"])
    subject = {"unet": _perturbed_sets(pipe.params["unet"], 3, seed=0),
               "text_encoder": _perturbed_sets(pipe.params["text_encoder"], 3, seed=1)}
    kw = dict(num_inference_steps=3, seed=5)
    out = generate(pipe, PROMPTS, subject_params=subject, **kw)
    assert out.shape == (3, 2, 64, 64, 3) and out.dtype == np.float32

    def alone(k, nets=("unet", "text_encoder")):
        params = {**pipe.params, **{net: jax.tree.map(lambda x: x[k], subject[net]) for net in nets}}
        return generate(dataclasses.replace(pipe, params=params), PROMPTS, **kw)

    # Same maths in fp32, but vmap makes each conv / matmul a batched one whose kernel may sum in another
    # order: ~eps32 * sqrt(K) relative per layer (K <= 1e3 terms), compounded over 3 UNet calls and the
    # ~60-layer decoder to ~1e-6 of the [0, 1] range (measured ~2e-6, also on 8 devices). 1e-5 leaves 5x
    # margin, and the sets' images differ by > 1e-3 (measured ~2e-2), so a set sampled with another set's
    # params fails.
    tol = 1e-5
    refs = [alone(k) for k in range(3)]
    for k in range(3):
        np.testing.assert_allclose(out[k], refs[k], atol=tol, rtol=0)
    for a, b in [(0, 1), (0, 2), (1, 2)]:
        assert np.abs(out[a] - out[b]).max() > 1e-3
    # The text encoder's set counts too (not only the UNet's): set 1 with the shared text encoder differs.
    assert np.abs(alone(1, nets=("unet",)) - refs[1]).max() > 1e-3

    ragged = {**subject, "text_encoder": jax.tree.map(lambda x: x[:2], subject["text_encoder"])}
    with pytest.raises(UsageError, match="same leading size"):
        generate(pipe, PROMPTS, subject_params=ragged, **kw)
    with pytest.raises(UsageError, match="networks of the pipeline.*'unett'"):
        generate(pipe, PROMPTS, subject_params={"unett": subject["unet"]}, **kw)
    with pytest.raises(UsageError, match="leading set axis"):
        generate(pipe, PROMPTS, subject_params={"unet": pipe.params["unet"]}, **kw)  # no set axis


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
            "--steps", "3", "--seed", "5", "--output_dir", str(out), "--dtype", "fp32", "--attention",
            "einsum"]
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
