"""Flux.1 pipelines end to end against diffusers' `FluxPipeline`: tiny random dev (guidance embedding,
dynamic shifting) and schnell (neither) pipelines, CPU, fp32, the same starting noise; and the folders
`save_pipeline` writes, in diffusers and in ours."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from dreambooth_jax import families
from dreambooth_jax.diffusion.generation import generate
from dreambooth_jax.errors import UsageError
from dreambooth_jax.pipeline import load_pipeline, save_pipeline

PROMPTS = ["a photo of sks dog", "a red cube on the beach in the snow with a blue car and a wooden floor"]
# Images in [0, 1] after a fp32 flow loop and VAE decode. The transformer's sinusoids of t x 1000 (and of
# dev's guidance x 1000 = 3500) carry A x 2^-24 rad each in float32, evaluated differently by torch and XLA
# (~2e-4 rad at 3500); through the embedding MLPs of these weights that is ~1e-6 of the velocity per call,
# a few Euler steps of size <= 1 and a decoder of gain ~1 carry it into the pixels: measured 3.5e-6 (dev),
# 1.6e-6 (schnell). 1e-4, as for the SD pipelines, leaves a margin of ~30.
IMAGE_TOL = 1e-4


@functools.cache
def _pipe(path):
    return load_pipeline(path)


def _diffusers_images(path, latents_nhwc, **kwargs):
    import diffusers  # heavy (PyTorch): only the parity reference loads it
    import torch

    pipe = diffusers.FluxPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    noise = torch.tensor(latents_nhwc.transpose(0, 3, 1, 2))
    n, c, h, w = noise.shape
    packed = pipe._pack_latents(noise, n, c, h, w)
    return pipe(PROMPTS, latents=packed, output_type="np", **kwargs).images


# (kind, height, width, steps, our max_sequence_length, diffusers'): schnell's default T5 length is 256
# (its model card's), diffusers' pipeline default 512 for both
CASES = [("flux-dev", 48, 80, 3, None, 512), ("flux-schnell", 64, 32, 4, None, 256),
         ("flux-dev", 32, 32, 2, 24, 24)]


@pytest.mark.parametrize("kind, height, width, steps, ours_len, theirs_len", CASES)
def test_images_match_diffusers_flux_pipeline(tiny_flux_pipelines, kind, height, width, steps, ours_len,
                                              theirs_len):
    path = tiny_flux_pipelines[kind]
    pipe = _pipe(path)
    assert pipe.family is (families.FLUX if kind == "flux-dev" else families.FLUX_SCHNELL)
    latents = np.random.default_rng(0).standard_normal((2, height // 8, width // 8, 16)).astype(np.float32)
    ours = generate(pipe, PROMPTS, num_inference_steps=steps, height=height, width=width, latents=latents,
                    max_sequence_length=ours_len)
    # guidance_scale: dev's default 3.5 on both sides (ours: None -> the family's); schnell ignores it
    theirs = _diffusers_images(path, latents, num_inference_steps=steps, height=height, width=width,
                               max_sequence_length=theirs_len)
    assert ours.shape == theirs.shape == (2, height, width, 3)
    np.testing.assert_allclose(ours, theirs, atol=IMAGE_TOL)


def test_guidance_scale_reaches_dev_transformer(tiny_flux_pipelines):
    """The guidance embedding is an input of dev (other images at another scale), none of schnell."""
    latents = np.random.default_rng(1).standard_normal((1, 4, 4, 16)).astype(np.float32)
    kw = dict(num_inference_steps=2, height=32, width=32, latents=latents, max_sequence_length=8)
    for kind, changes in (("flux-dev", True), ("flux-schnell", False)):
        pipe = _pipe(tiny_flux_pipelines[kind])
        a = generate(pipe, PROMPTS[:1], guidance_scale=1.0, **kw)
        b = generate(pipe, PROMPTS[:1], guidance_scale=5.0, **kw)
        assert (np.abs(a - b).max() > 1e-3) == changes, kind


def test_saved_folder_draws_the_same(tiny_flux_pipelines, tmp_path):
    """`save_pipeline` of a loaded Flux pipeline: diffusers loads it and draws exactly what it draws from the
    original folder (bit-exact weights, same configs and tokenizers), and so do we."""
    import diffusers
    import torch

    src = tiny_flux_pipelines["flux-dev"]
    out = save_pipeline(_pipe(src), str(tmp_path / "saved"))
    latents = np.random.default_rng(2).standard_normal((2, 4, 6, 16)).astype(np.float32)
    kw = dict(num_inference_steps=2, height=32, width=48, max_sequence_length=16)
    theirs = _diffusers_images(src, latents, **kw)
    np.testing.assert_array_equal(_diffusers_images(out, latents, **kw), theirs)
    ours = load_pipeline(out)
    assert ours.family is families.FLUX
    np.testing.assert_array_equal(generate(ours, PROMPTS, latents=latents, **kw),
                                  generate(_pipe(src), PROMPTS, latents=latents, **kw))
    reloaded = diffusers.FluxPipeline.from_pretrained(out)
    for name in ("transformer", "text_encoder_2"):
        theirs = getattr(diffusers.FluxPipeline.from_pretrained(src), name).state_dict()
        for key, value in getattr(reloaded, name).state_dict().items():
            assert torch.equal(value, theirs[key]), f"{name}.{key}"


def test_bad_sizes_and_lengths_are_refused(tiny_flux_pipelines, tiny_pipelines):
    pipe = _pipe(tiny_flux_pipelines["flux-schnell"])
    with pytest.raises(UsageError, match="multiples of 16"):
        generate(pipe, PROMPTS, height=40, width=32)  # a multiple of the VAE's 8, not of 8 x the 2x2 patch
    with pytest.raises(UsageError, match="max_sequence_length"):
        generate(pipe, PROMPTS, max_sequence_length=513)
    with pytest.raises(UsageError, match="max_sequence_length"):
        generate(pipe, PROMPTS, height=32, width=32, latents=np.zeros((2, 4, 4, 16), np.float32),
                 max_sequence_length=0)
    with pytest.raises(UsageError, match="long-prompt"):  # SD's CLIP prompts have their tokenizer's length
        generate(_pipe(tiny_pipelines["sd1"]), PROMPTS, max_sequence_length=77)


def test_lora_file_draws_as_in_diffusers(tiny_flux_pipelines, tmp_path):
    """A LoRA on diffusers' Flux targets (double and single blocks) and CLIP, saved in the diffusers layout:
    `FluxPipeline.load_lora_weights` and our `load_pipeline(lora=)` draw the same images."""
    import diffusers
    import jax
    import jax.numpy as jnp
    import torch

    from dreambooth_jax import lora

    path = tiny_flux_pipelines["flux-dev"]
    pipe, config = _pipe(path), lora.LoraConfig(rank=4)
    loras = {}
    for i, (net, targets) in enumerate(pipe.family.lora_targets.items()):
        tree = lora.init_lora(pipe.params[net], targets, config, jax.random.key(i))
        rng = np.random.default_rng(i)  # nonzero B, as after training
        loras[net] = {k: {"A": v["A"], "B": jnp.asarray(0.2 * rng.standard_normal(v["B"].shape), jnp.float32)}
                      for k, v in tree.items()}
    assert any(k.startswith("single_transformer_blocks_") for k in loras["transformer"])
    file = lora.save_diffusers(str(tmp_path), loras, config)
    latents = np.random.default_rng(3).standard_normal((1, 4, 4, 16)).astype(np.float32)
    kw = dict(num_inference_steps=2, height=32, width=32, max_sequence_length=16)
    ref_pipe = diffusers.FluxPipeline.from_pretrained(path)
    ref_pipe.set_progress_bar_config(disable=True)
    ref_pipe.load_lora_weights(file)
    noise = torch.tensor(latents.transpose(0, 3, 1, 2))
    ref = ref_pipe(PROMPTS[:1], latents=ref_pipe._pack_latents(noise, 1, 16, 4, 4), output_type="np",
                   **kw).images
    merged = load_pipeline(path, lora=file)
    ours = generate(merged, PROMPTS[:1], latents=latents, **kw)
    base = generate(pipe, PROMPTS[:1], latents=latents, **kw)
    assert np.abs(base - ref).max() > 10 * IMAGE_TOL  # the LoRA changes the images
    np.testing.assert_allclose(ours, ref, atol=IMAGE_TOL)
    # merged into host weights (what `sample --fsdp --lora` does): NumPy stays NumPy, the same operations
    host = load_pipeline(path, lora=file, weights="host")
    pairs = zip(jax.tree.leaves(host.params["transformer"]), jax.tree.leaves(merged.params["transformer"]))
    for a, b in pairs:
        assert isinstance(a, np.ndarray)
        np.testing.assert_array_equal(a, np.asarray(b))
    kohya = lora.save_kohya(str(tmp_path / "kohya.safetensors"), {"transformer": loras["transformer"]},
                            config)
    with pytest.raises(UsageError, match="kohya-layout LoRA for a flux-dev pipeline"):
        load_pipeline(path, lora=kohya)


def test_fsdp_sharded_sampling_draws_the_same(tiny_flux_pipelines, tmp_path):
    """4 simulated CPU devices, params sharded over fsdp groups of 2 and loaded to the host first (what
    `sample --fsdp 2` does), vs this process's one device: the same images (the sharded matmuls sum in
    another order: fp32 rounding, 1e-5)."""
    import os
    import subprocess
    import sys

    from conftest import xla_flags_with

    path = tiny_flux_pipelines["flux-schnell"]
    kw = dict(num_inference_steps=2, height=32, width=48, seed=4, max_sequence_length=16)
    here = generate(_pipe(path), PROMPTS * 3, **kw)
    out = tmp_path / "sharded.npy"
    code = (
        "import jax, numpy as np\nfrom dreambooth_jax import parallel\n"
        "from dreambooth_jax.pipeline import load_pipeline\nfrom dreambooth_jax.diffusion.generation import "
        "generate\nassert jax.device_count() == 4\n"
        f"pipe = load_pipeline({path!r}, weights='host')\nmesh = parallel.train_mesh(2)\n"
        # the premise: some of the transformer's weights are split (the rest are under the fsdp threshold)
        "shardings = parallel.state_shardings(pipe.params['transformer'], mesh)\n"
        "assert any('fsdp' in s.spec for s in jax.tree.leaves(shardings))\n"
        f"np.save({str(out)!r}, generate(pipe, {PROMPTS * 3!r}, mesh=mesh, **{kw!r}))\n"
    )
    env = {**os.environ, "XLA_FLAGS": xla_flags_with("--xla_force_host_platform_device_count=4"),
           "JAX_PLATFORMS": "cpu"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
    np.testing.assert_allclose(np.load(out), here, atol=1e-5)


def test_cli_samples_flux_and_train_refuses_it(tiny_flux_pipelines, instance_dir, tmp_path, capsys):
    """`python -m dreambooth_jax.sample` on a Flux pipeline picks its flow sampler and writes the image;
    `train` refuses a Flux pipeline with one error, before any weight is read."""
    from PIL import Image

    from dreambooth_jax import sample, train
    from dreambooth_jax.errors import UnsupportedError

    path = tiny_flux_pipelines["flux-schnell"]
    out = tmp_path / "samples"
    sample.main(["--model", path, "--prompt", PROMPTS[0], "--steps", "2", "--height", "32", "--width", "48",
                 "--dtype", "fp32", "--max_sequence_length", "16", "--output_dir", str(out)])
    assert "scheduler flow_euler, 2 steps" in capsys.readouterr().err
    assert Image.open(out / "00000-seed0.png").size == (48, 32)
    with pytest.raises(UnsupportedError, match="training of Flux pipelines"):
        train.main(["--pretrained_model_name_or_path", path, "--instance_data_dir", instance_dir,
                    "--instance_prompt", PROMPTS[0], "--output_dir", str(tmp_path / "run"), "--resolution",
                    "32", "--max_train_steps", "1"])
    assert not (tmp_path / "run" / "checkpoints").exists()
