"""Every training option through the CLI (`python -m dreambooth_jax.train`'s parser and `run`), on the tiny
model, against the same steps computed in PyTorch by the reference libraries (`torch_reference.py`).

Error budgets (fp32 on CPU): our UNet and diffusers' agree to ~1e-6 of their outputs' scale, so a loss (a mean
of squared errors of O(1) values) agrees to ~1e-5 relative: asserted at 1e-4. Gradient norms likewise. Trained
weights: see `torch_reference.assert_same_training`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil

import jax
import numpy as np
import pytest
from torch_reference import OurInputs, assert_same_training, exported_unet, read_metrics, reference_run
from train_helpers import PROMPT

from dreambooth_jax.diffusion.generation import generate
from dreambooth_jax.pipeline import load_pipeline
from dreambooth_jax.testing import tiny
from dreambooth_jax.training.config import parse_args
from dreambooth_jax.training.trainer import run
from dreambooth_jax.weights import convert

LOSS_RTOL = 1e-4


def _argv(pipeline, instance_dir, out, **options) -> list[str]:
    base = {"pretrained_model_name_or_path": pipeline, "instance_data_dir": instance_dir,
            "instance_prompt": PROMPT, "output_dir": str(out), "resolution": 64, "train_batch_size": 1,
            "max_train_steps": 1, "learning_rate": 1e-3, "attention": "einsum", "checkpointing_steps": 100,
            "seed": 0, **options}
    argv = []
    for key, value in base.items():
        if value is True:
            argv.append(f"--{key}")
        elif value is not False:
            argv += [f"--{key}", str(value)]
    return argv


def _cli_run(*args, **options):
    cfg = parse_args(_argv(*args, **options))
    return cfg, run(cfg)


def _init_unet(pipeline) -> dict[str, np.ndarray]:
    return exported_unet(pipeline)


def _unet_state(params) -> dict[str, np.ndarray]:
    """Our UNet params in diffusers' names and layout."""
    return {k: np.asarray(v) for k, v in convert.params_to_state_dict(jax.device_get(params)).items()}


def _assert_metrics(ours: dict, ref: dict, keys=("loss", "instance_loss", "prior_loss", "grad_norm")):
    for key in keys:
        np.testing.assert_allclose(ours[key], ref[key], rtol=LOSS_RTOL, atol=1e-7, err_msg=key)


OPTIMIZER_RUNS = {
    # EMA, a schedule and weight decay ride along. No warm-up for AdamW: at lr 0 the first EMA update, which
    # diffusers makes with decay 0, would see unchanged weights.
    # AdamW and Prodigy divide by sqrt(v) + eps: an eps above the gradients' rounding noise (~1e-7 here) keeps
    # entries whose gradient is within that noise of zero from moving by lr-sized, random amounts.
    "adamw": dict(learning_rate=1e-3, adam_weight_decay=0.1, adam_epsilon=1e-6, use_ema=True, ema_decay=0.9,
                  lr_scheduler="cosine_with_restarts", lr_num_cycles=2),
    "adafactor": dict(learning_rate=1e-2, adam_weight_decay=0.1, lr_scheduler="cosine", lr_warmup_steps=1),
    "lion": dict(learning_rate=3e-4, adam_weight_decay=0.1),
    # Prodigy's step is lr x d, d from 1e-6 up: a large lr makes 3 steps move the weights well above rounding.
    "prodigy": dict(learning_rate=30.0, adam_weight_decay=0.01, adam_epsilon=1e-6,
                    lr_scheduler="constant_with_warmup", lr_warmup_steps=1),
}


@pytest.mark.parametrize("optimizer", list(OPTIMIZER_RUNS))
def test_optimizer_schedule_and_ema_equal_pytorch(tiny_pipelines, instance_dir, tmp_path, optimizer):
    """Also, for our own optimizer states (Adafactor's, Prodigy's; optax's AdamW state resumes in
    test_train.py): the state goes through an Orbax checkpoint, and a run resumed from it continues bit for
    bit."""
    steps = 3
    options = dict(optimizer=optimizer, max_train_steps=steps, checkpointing_steps=2,
                   **OPTIMIZER_RUNS[optimizer])
    cfg, result = _cli_run(tiny_pipelines["sd1"], instance_dir, tmp_path / "out", **options)
    if optimizer in ("adafactor", "prodigy"):
        _, resumed = _cli_run(tiny_pipelines["sd1"], instance_dir, tmp_path / "resumed",
                              resume_from_checkpoint=str(tmp_path / "out" / "checkpoints" / "2"), **options)
        assert resumed.steps == steps and [m["step"] for m in resumed.metrics] == [3]
        for a, b in zip(jax.tree.leaves(jax.device_get(result.state)),
                        jax.tree.leaves(jax.device_get(resumed.state))):
            np.testing.assert_array_equal(a, b)
    ref, ref_metrics = reference_run(cfg, steps)
    ours_metrics = read_metrics(tmp_path / "out")
    assert [m["step"] for m in ours_metrics] == [1, 2, 3]
    # The lr of every step, as diffusers' get_scheduler gives it.
    np.testing.assert_allclose([m["lr"] for m in ours_metrics], [m["lr"] for m in ref_metrics], rtol=1e-6)
    _assert_metrics(ours_metrics[0], ref_metrics[0])  # the first step's loss and gradient norm
    init = _init_unet(tiny_pipelines["sd1"])
    assert_same_training(_unet_state(result.state.params["unet"]), ref.weights(), init)
    if cfg.use_ema:  # the export holds the EMA weights: as diffusers' EMAModel fed the same weights
        assert_same_training(exported_unet(tmp_path / "out"), ref.weights(ema=True), init)


def _sample_prediction_pipeline(src: str, dst) -> str:
    """A copy of `src` whose scheduler predicts x_0 (prediction_type 'sample')."""
    shutil.copytree(src, dst)
    path = os.path.join(dst, "scheduler", "scheduler_config.json")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    config["prediction_type"] = "sample"
    with open(path, "w", encoding="utf-8") as f:
        json.dump(config, f)
    return str(dst)


@pytest.mark.parametrize("case", ["epsilon_prior_offset", "v_prediction", "sample"])
def test_loss_options_equal_pytorch(tiny_pipelines, instance_dir, class_dir, tmp_path, case):
    """--snr_gamma for each prediction type, --with_prior_preservation with --prior_loss_weight,
    --offset_noise with --noise_offset: the first step's losses and gradient norm."""
    options = {"snr_gamma": 5.0}
    pipeline = tiny_pipelines["sd1"]
    if case == "epsilon_prior_offset":
        options.update(with_prior_preservation=True, class_data_dir=class_dir, class_prompt="a photo of toy",
                       num_class_images=4, prior_loss_weight=0.5, offset_noise=True, noise_offset=0.3)
    elif case == "v_prediction":
        pipeline = tiny_pipelines["sd2"]
    else:
        pipeline = _sample_prediction_pipeline(tiny_pipelines["sd1"], tmp_path / "sample_pipe")
    cfg, _ = _cli_run(pipeline, instance_dir, tmp_path / "out", **options)
    _, ref_metrics = reference_run(cfg, 1)
    ours = read_metrics(tmp_path / "out")[0]
    _assert_metrics(ours, ref_metrics[0])
    if case == "epsilon_prior_offset":
        assert ours["prior_loss"] > 0 and ours["loss"] == pytest.approx(ours["instance_loss"]
                                                                        + 0.5 * ours["prior_loss"], rel=1e-6)


def test_text_encoder_attention_mask_with_a_bang_padding_tokenizer(tiny_pipelines, instance_dir, tmp_path):
    """SD 2.x's tokenizer pads with '!': the mask must be the tokenizer's own, also for a prompt that contains
    '!' (counting pad tokens, as we once did, masks everything after it)."""
    pipeline = shutil.copytree(tiny_pipelines["sd1"], tmp_path / "bang_pipe")
    shutil.rmtree(pipeline / "tokenizer")
    tok = tiny.make_tokenizer(pad_token="!")
    tok.save_pretrained(pipeline / "tokenizer")
    prompt = "a photo of sks! toy!"  # two '!' in the prompt
    cfg, _ = _cli_run(str(pipeline), instance_dir, tmp_path / "out", instance_prompt=prompt,
                      text_encoder_use_attention_mask=True)

    prompts = [prompt, "a photo of toy"]  # and one without '!', whose first pad must be masked too
    tokens = OurInputs(cfg).inputs.tokens_of(prompts)
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    expected = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True)
    np.testing.assert_array_equal(mask, expected.attention_mask)
    assert int((ids[0] == tok.pad_token_id).sum()) > int((mask[0] == 0).sum())  # '!' inside the prompt
    _, ref_metrics = reference_run(cfg, 1)
    _assert_metrics(read_metrics(tmp_path / "out")[0], ref_metrics[0])


@pytest.mark.parametrize("option", ["gradient_checkpointing", "bf16"])
def test_gradient_checkpointing_and_bf16_through_the_trainer(tiny_pipelines, instance_dir, tmp_path, option):
    """--gradient_checkpointing recomputes the same activations: the reference's gradients and updates (fp32).
    --mixed_precision bf16: bf16 keeps 8 significant bits (2^-9 relative per rounding); through the tiny
    UNet's ~20 layers the first loss moves by ~1e-2 relative from fp32's: asserted within 3e-2 of the
    reference."""
    options = ({"gradient_checkpointing": True} if option == "gradient_checkpointing"
               else {"mixed_precision": "bf16"})
    cfg, result = _cli_run(tiny_pipelines["sd1"], instance_dir, tmp_path / "out", **options)
    fp32 = dataclasses.replace(cfg, mixed_precision="no", gradient_checkpointing=False)
    ref, ref_metrics = reference_run(fp32, 1)
    ours = read_metrics(tmp_path / "out")[0]
    if option == "gradient_checkpointing":
        _assert_metrics(ours, ref_metrics[0])
        assert_same_training(_unet_state(result.state.params["unet"]), ref.weights(),
                             _init_unet(tiny_pipelines["sd1"]))
    else:
        assert abs(ours["loss"] - ref_metrics[0]["loss"]) <= 3e-2 * ref_metrics[0]["loss"]
        # it really ran in bf16
        assert abs(ours["loss"] - ref_metrics[0]["loss"]) > 1e-6 * ref_metrics[0]["loss"]


def test_scale_lr_is_diffusers_formula(tiny_pipelines, instance_dir, tmp_path, caplog):
    """diffusers: lr x gradient_accumulation_steps x train_batch_size x num_processes (x devices, for us)."""
    with caplog.at_level(logging.INFO, logger="dreambooth_jax.train"):
        cfg, _ = _cli_run(tiny_pipelines["sd1"], instance_dir, tmp_path / "out", scale_lr=True,
                          learning_rate=1e-4, train_batch_size=2, gradient_accumulation_steps=2)
    expected = 1e-4 * 2 * 2 * jax.device_count()
    assert read_metrics(tmp_path / "out")[0]["lr"] == pytest.approx(expected, rel=1e-6)
    assert f"learning rate {expected:g}" in caplog.text and "global batch 4 instance images" in caplog.text


@pytest.mark.parametrize("prior", [False, True], ids=["unet", "prior+text_encoders"])
def test_sdxl_training_equals_pytorch(tiny_pipelines, instance_dir, class_dir, tmp_path, prior):
    """SDXL: the UNet conditioned on both text encoders' penultimate hidden states, the second's pooled
    embedding and each example's time_ids (random crops and flips), as diffusers'
    `train_dreambooth_lora_sdxl.py` does: the first step's losses and gradient norm, and the UNet after two
    steps. With prior preservation both text encoders train too (at their own --text_encoder_lr): the gradient
    norm spans all three networks."""
    # AdamW's eps above the gradients' float32 noise, as in OPTIMIZER_RUNS (else text-encoder weights whose
    # gradient is noise move by ~lr either way, and the second step's UNet gradients with them).
    options = dict(max_train_steps=2, random_flip=True, adam_epsilon=1e-6)
    if prior:
        options.update(with_prior_preservation=True, class_data_dir=class_dir, class_prompt="a photo of toy",
                       num_class_images=4, train_text_encoder=True, text_encoder_lr=5e-4)
    cfg, result = _cli_run(tiny_pipelines["sdxl"], instance_dir, tmp_path / "out", **options)
    ref, ref_metrics = reference_run(cfg, 2)
    ours = read_metrics(tmp_path / "out")
    _assert_metrics(ours[0], ref_metrics[0])
    assert ours[0]["loss"] > 0 and (ours[0]["prior_loss"] > 0) == prior
    if prior:
        assert set(result.state.params) == {"unet", "text_encoder", "text_encoder_2"}
        assert ours[0]["lr_text_encoder_2"] == pytest.approx(5e-4)
    assert_same_training(_unet_state(result.state.params["unet"]), ref.weights(),
                         _init_unet(tiny_pipelines["sdxl"]))
    # the exported pipeline (both trained encoders, tokenizer_2) loads in diffusers and samples as ours
    if prior:
        _assert_samples_like_diffusers(str(tmp_path / "out"))


def _assert_samples_like_diffusers(path: str) -> None:
    """diffusers' StableDiffusionXLPipeline loads the pipeline at `path` and draws our images (sampling
    parity: ~2e-6, test_sampling)."""
    import diffusers  # heavy (PyTorch): only the SDXL sampling check loads it
    import torch

    latents = np.random.default_rng(0).standard_normal((1, 8, 8, 4)).astype(np.float32)
    kw = dict(num_inference_steps=3, guidance_scale=5.0, height=64, width=64)
    ours = generate(load_pipeline(path), [PROMPT], latents=latents, **kw)
    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(path)
    ref.set_progress_bar_config(disable=True)
    theirs = ref([PROMPT], latents=torch.tensor(latents.transpose(0, 3, 1, 2)), output_type="np", **kw).images
    assert np.abs(theirs - ours).max() <= 1e-4
