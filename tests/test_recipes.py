"""Trainer recipes: Min-SNR, offset noise, EMA, text-encoder lr/stop, optimizers by name, several concepts."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_helpers import PROMPT, draw_images, fixed_eval_loss, train_cfg

from dreambooth_jax import noise_schedule, train_step
from dreambooth_jax.optim import OPTIMIZERS
from dreambooth_jax.pipeline import load_pipeline
from dreambooth_jax.train import run


@pytest.mark.parametrize("kind", ["sd1", "sd2"])  # epsilon, v-prediction
def test_min_snr_loss_equals_numpy(tiny_pipelines, kind):
    """Per-example Min-SNR weights, each half (instance / prior) weighted by its own examples' timesteps."""
    pipe = load_pipeline(tiny_pipelines[kind])
    sched = noise_schedule.ScheduleConfig.from_diffusers_config(pipe.scheduler_config, class_name="DDPMScheduler")
    ac = noise_schedule.alphas_cumprod(sched)
    common = dict(unet=pipe.unet, vae=pipe.vae, text_encoder=pipe.text_encoder, alphas_cumprod=ac,
                  prediction_type=sched.prediction_type)
    plain, snr_spec = train_step.StepSpec(**common), train_step.StepSpec(**common, snr_gamma=5.0)
    rng = np.random.default_rng(0)
    latents, noise = (rng.standard_normal((4, 8, 8, 4)).astype(np.float32) for _ in range(2))
    t = np.array([5, 700, 40, 980])  # low and high SNR in each half
    ids = pipe.tokenizer([PROMPT] * 2 + ["a photo of toy"] * 2, padding="max_length", max_length=16,
                         return_tensors="np").input_ids.astype(np.int32)
    is_prior = np.array([False, False, True, True])
    args = ({}, pipe.params, {"input_ids": ids}, latents, noise, t)
    mse = np.asarray(train_step.per_example_loss(plain, *args))
    weighted = train_step.per_example_loss(snr_spec, *args)
    loss = float(train_step.combine_losses(weighted, is_prior, 0.5)[0])

    a = ac[t]  # the independent computation, in float64
    snr = a / (1 - a)
    w = np.minimum(snr, 5.0) / (snr + 1 if sched.prediction_type == "v_prediction" else snr)
    expected = np.mean(w[:2] * mse[:2]) + 0.5 * np.mean(w[2:] * mse[2:])
    assert sched.prediction_type == ("epsilon" if kind == "sd1" else "v_prediction")
    assert abs(loss - expected) <= 1e-6 * max(1.0, expected)
    assert not np.allclose(w, w[0])  # the weights really differ per example


def test_offset_noise_is_a_per_channel_shift():
    spec = train_step.StepSpec(unet=None, vae=None, text_encoder=None, alphas_cumprod=np.ones(10), noise_offset=0.1)
    keys = jax.vmap(lambda i: jax.random.split(jax.random.PRNGKey(i), 2))(jnp.arange(256))
    with_offset = train_step.draw_noise(spec, keys, (8, 8, 4))
    without = train_step.draw_noise(train_step.StepSpec(None, None, None, np.ones(10)), keys, (8, 8, 4))
    shift = np.asarray(with_offset - without)  # [B, 8, 8, 4]
    np.testing.assert_allclose(shift, np.broadcast_to(shift[:, :1, :1, :], shift.shape), atol=1e-6)
    assert 0.08 < shift[:, 0, 0, :].std() < 0.12  # ~ noise_offset x N(0, 1)


def test_ema_closed_form_on_a_toy():
    """e_k = prod(d_i) e_0 + sum_j (1 - d_j) prod_{i>j} d_i p_j with d_i = min(decay, (1+i)/(10+i))."""
    decay, steps = 0.9, 100  # the warm-up reaches the cap at k = 81
    params_seq = [{"unet": {"w": jnp.full((3,), float(j + 1))}} for j in range(steps)]
    ema = {"unet": {"w": jnp.zeros(3)}}
    for j, p in enumerate(params_seq):
        ema = train_step.update_ema(ema, p, j, decay)
    d = [min(decay, (1 + i) / (10 + i)) for i in range(steps)]
    closed = sum((1 - d[j]) * np.prod(d[j + 1:]) * (j + 1) for j in range(steps))
    np.testing.assert_allclose(np.asarray(ema["unet"]["w"]), closed, rtol=1e-6)
    assert d[0] == pytest.approx(0.1) and d[-1] == decay


def test_ema_weights_are_exported(tiny_pipelines, instance_dir, tmp_path):
    out = tmp_path / "ema"
    result = run(train_cfg(tiny_pipelines, instance_dir, out, max_train_steps=3, use_ema=True, ema_decay=0.5))
    state = result.state
    ema, raw = jax.device_get(state.ema["unet"]), jax.device_get(state.params["unet"])
    exported = load_pipeline(str(out)).params["unet"]
    for e, x in zip(jax.tree.leaves(ema), jax.tree.leaves(exported)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(e))
    assert any(not np.array_equal(e, r) for e, r in zip(jax.tree.leaves(ema), jax.tree.leaves(raw)))


def test_text_encoder_stops_training(tiny_pipelines, instance_dir, tmp_path):
    kw = dict(train_text_encoder=True, text_encoder_lr=5e-4, stop_text_encoder_training=2)
    stopped = run(train_cfg(tiny_pipelines, instance_dir, tmp_path / "a", max_train_steps=4, **kw))
    two = run(train_cfg(tiny_pipelines, instance_dir, tmp_path / "b", max_train_steps=2, **kw))
    assert "text_encoder" not in stopped.state.params and "text_encoder" not in stopped.state.opt_state
    te_after_4 = jax.tree.leaves(jax.device_get(stopped.state.frozen["text_encoder"]))
    te_after_2 = jax.tree.leaves(jax.device_get(two.state.params["text_encoder"]))
    base = jax.tree.leaves(load_pipeline(tiny_pipelines["sd1"]).params["text_encoder"])
    assert all(np.array_equal(a, b) for a, b in zip(te_after_4, te_after_2))  # unchanged after step 2
    assert any(not np.array_equal(a, b) for a, b in zip(te_after_2, base))  # but trained before it
    assert [m["lr_text_encoder"] for m in two.metrics] == pytest.approx([5e-4, 5e-4])
    # The export carries the text encoder as trained up to step 2.
    exported = jax.tree.leaves(load_pipeline(str(tmp_path / "a")).params["text_encoder"])
    assert all(np.array_equal(a, b) for a, b in zip(exported, te_after_2))


# Prodigy's step is lr x its distance estimate D, which starts at 1e-6 and needs hundreds of steps to grow:
# for an 8-step test the lr makes up for it.
LEARNING_RATES = {"adamw": 1e-3, "adafactor": 1e-2, "lion": 1e-3, "prodigy": 1e2}


# adamw, the default, is covered by test_train.py (overfitting; SIGTERM then bit-identical resume).
@pytest.mark.parametrize("optimizer", [o for o in OPTIMIZERS if o != "adamw"])
def test_each_optimizer_trains_and_resumes_exactly(tiny_pipelines, instance_dir, tmp_path, optimizer):
    kw = dict(optimizer=optimizer, learning_rate=LEARNING_RATES[optimizer], checkpointing_steps=4,
              max_train_steps=8, center_crop=True)
    straight = run(train_cfg(tiny_pipelines, instance_dir, tmp_path / "straight", **kw))
    before = fixed_eval_loss(tiny_pipelines["sd1"], {}, instance_dir)
    after = fixed_eval_loss(tiny_pipelines["sd1"], jax.device_get(straight.state.params), instance_dir)
    assert after < 0.9 * before, (optimizer, before, after)
    resumed = run(train_cfg(tiny_pipelines, instance_dir, tmp_path / "resumed",
                       resume_from_checkpoint=str(tmp_path / "straight" / "checkpoints" / "4"), **kw))
    assert resumed.steps == 8 and [m["step"] for m in resumed.metrics] == [5, 6, 7, 8]
    for a, b in zip(jax.tree.leaves(jax.device_get(straight.state)), jax.tree.leaves(jax.device_get(resumed.state))):
        np.testing.assert_array_equal(a, b)


def test_two_concepts_draw_from_both(tiny_pipelines, tmp_path):
    from dreambooth_jax.data import DreamBoothData
    from dreambooth_jax.train_config import read_concepts

    concepts = [
        {"instance_data_dir": draw_images(tmp_path / "toy", 2, seed=5), "instance_prompt": "a photo of sks toy",
         "class_data_dir": str(tmp_path / "class_toy"), "class_prompt": "a photo of toy"},
        {"instance_data_dir": draw_images(tmp_path / "cube", 3, seed=6), "instance_prompt": "a photo of zwx cube",
         "class_data_dir": str(tmp_path / "class_cube"), "class_prompt": "a photo of cube"},
    ]
    path = tmp_path / "concepts.json"
    path.write_text(json.dumps(concepts))
    cfg = train_cfg(tiny_pipelines, None, tmp_path / "out", instance_prompt=None, concepts_list=str(path),
               with_prior_preservation=True, num_class_images=2, sample_batch_size=2, max_train_steps=2,
               train_batch_size=2, validation_inference_steps=2)
    result = run(cfg)
    assert result.steps == 2
    assert len(os.listdir(tmp_path / "class_toy")) == 2 and len(os.listdir(tmp_path / "class_cube")) == 2
    data = DreamBoothData(read_concepts(cfg), resolution=64, with_prior_preservation=True)
    pairs = {(i, c) for step in range(3) for plan in [data.batch_plan(step, 2)]
             for i, c in zip(plan["instance_prompts"], plan["class_prompts"])}
    # Both subjects are drawn, each with class images of its own class.
    assert pairs == {("a photo of sks toy", "a photo of toy"), ("a photo of zwx cube", "a photo of cube")}
