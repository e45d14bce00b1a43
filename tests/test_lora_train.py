"""DreamBooth-LoRA through the trainer: only the factors train, exports load in diffusers and in our
sampler."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest
from train_helpers import train_cfg

from dreambooth_jax.diffusion.generation import generate
from dreambooth_jax.pipeline import load_pipeline
from dreambooth_jax.training.trainer import run

IMAGE_TOL = 1e-4  # whole sampling loop + decode, as in test_sampling


@pytest.fixture(scope="module")
def lora_run(tiny_pipelines, instance_dir, class_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora_run")
    cfg = train_cfg(tiny_pipelines, instance_dir, out, use_lora=True, rank=4, lora_alpha=8.0,
                    train_text_encoder=True, max_train_steps=3, learning_rate=1e-2, merge_lora=True,
                    with_prior_preservation=True, class_data_dir=class_dir, class_prompt="a photo of toy",
                    num_class_images=4, validation_prompt="a photo of sks toy", validation_steps=3,
                    num_validation_images=1, validation_inference_steps=2)
    return run(cfg), str(out)


def test_only_lora_factors_train(tiny_pipelines, lora_run):
    result, _ = lora_run
    state = result.state
    assert set(state.params) == {"unet_lora", "text_encoder_lora"}
    base = load_pipeline(tiny_pipelines["sd1"]).params
    for net in ("unet", "text_encoder", "vae"):  # the base weights are untouched
        for a, b in zip(jax.tree.leaves(jax.device_get(state.frozen[net])), jax.tree.leaves(base[net])):
            np.testing.assert_array_equal(a, b)
    lora_bytes = sum(x.nbytes for x in jax.tree.leaves(state.params))
    opt_bytes = sum(x.nbytes for x in jax.tree.leaves(state.opt_state))
    base_bytes = sum(x.nbytes for x in jax.tree.leaves(base["unet"]))
    assert lora_bytes < 0.2 * base_bytes
    assert 2 * lora_bytes <= opt_bytes <= 2 * lora_bytes + 1024  # AdamW: two moments of the factors, counters
    b_factors = [f["B"] for f in jax.tree.leaves(state.params,
                                                 is_leaf=lambda x: isinstance(x, dict) and "B" in x)]
    assert any(np.abs(np.asarray(b)).max() > 0 for b in b_factors)  # B moved off zero


def test_lora_exports_match_diffusers_and_the_merged_pipeline(tiny_pipelines, lora_run):
    import diffusers
    import torch

    _, out = lora_run
    assert os.path.isfile(os.path.join(out, "pytorch_lora_weights.safetensors"))
    assert os.path.isfile(os.path.join(out, "lora_kohya.safetensors"))
    assert os.path.isfile(os.path.join(out, "validation", "step-000003.png"))
    latents = np.random.default_rng(0).standard_normal((1, 8, 8, 4)).astype(np.float32)
    kw = dict(num_inference_steps=3, scheduler="ddim", latents=latents, height=64, width=64)
    ours = generate(load_pipeline(tiny_pipelines["sd1"], lora=out), ["a photo of sks toy"], **kw)
    merged = generate(load_pipeline(out), ["a photo of sks toy"], **kw)  # the --merge_lora pipeline
    np.testing.assert_allclose(merged, ours, atol=1e-5)
    base = generate(load_pipeline(tiny_pipelines["sd1"]), ["a photo of sks toy"], **kw)
    assert np.abs(base - ours).max() > 1e-3  # the adapters do something

    ref = diffusers.StableDiffusionPipeline.from_pretrained(tiny_pipelines["sd1"])
    ref.scheduler = diffusers.DDIMScheduler.from_config(ref.scheduler.config)
    ref.load_lora_weights(out)
    ref.set_progress_bar_config(disable=True)
    theirs = ref(["a photo of sks toy"], num_inference_steps=3,
                 latents=torch.tensor(latents.transpose(0, 3, 1, 2)),
                 height=64, width=64, output_type="np").images
    assert np.abs(theirs - ours).max() <= IMAGE_TOL


def test_lora_with_ema_resumes_bit_identically(tiny_pipelines, instance_dir, tmp_path):
    """Checkpoints carry the LoRA factors, their optimizer state and their EMA: a resumed run ends where a
    straight one does."""
    kw = dict(use_lora=True, rank=2, use_ema=True, ema_decay=0.9, max_train_steps=4, checkpointing_steps=2,
              learning_rate=1e-2)
    straight = run(train_cfg(tiny_pipelines, instance_dir, tmp_path / "straight", **kw))
    resumed = run(train_cfg(tiny_pipelines, instance_dir, tmp_path / "resumed",
                            resume_from_checkpoint=str(tmp_path / "straight" / "checkpoints" / "2"), **kw))
    assert [m["step"] for m in resumed.metrics] == [3, 4]
    for part in ("params", "opt_state", "ema"):
        a, b = (jax.device_get(getattr(r.state, part)) for r in (straight, resumed))
        assert jax.tree.structure(a) == jax.tree.structure(b)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_array_equal(x, y)
