"""Trainer recipes beyond the reference tests (test_training_reference.py): text-encoder lr and stop (with
resume across it), several concepts."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
from train_helpers import draw_images, train_cfg

from dreambooth_jax.pipeline import load_pipeline
from dreambooth_jax.training.concepts import read_concepts
from dreambooth_jax.training.data import DreamBoothData
from dreambooth_jax.training.trainer import run


def test_text_encoder_stops_training_and_resumes_across_the_stop(tiny_pipelines, instance_dir, tmp_path):
    kw = dict(train_text_encoder=True, text_encoder_lr=5e-4, stop_text_encoder_training=2, max_train_steps=4,
              checkpointing_steps=2)
    stopped = run(train_cfg(tiny_pipelines, instance_dir, tmp_path / "a", **kw))
    assert "text_encoder" not in stopped.state.params and "text_encoder" not in stopped.state.opt_state
    # Trained in steps 1 and 2 (at its own lr), then a step without it.
    assert [m["lr_text_encoder"] for m in stopped.metrics[:2]] == pytest.approx([5e-4, 5e-4])
    assert all("lr_text_encoder" not in m for m in stopped.metrics[2:])
    te = jax.tree.leaves(jax.device_get(stopped.state.frozen["text_encoder"]))
    base = jax.tree.leaves(load_pipeline(tiny_pipelines["sd1"]).params["text_encoder"])
    assert any(not np.array_equal(a, b) for a, b in zip(te, base))
    exported = jax.tree.leaves(load_pipeline(str(tmp_path / "a")).params["text_encoder"])
    assert all(np.array_equal(a, b) for a, b in zip(exported, te))
    # Resumed from the checkpoint of step 2, the stop itself (written before the loop froze the encoder at the
    # start of step 3), the run continues exactly as the straight one.
    resumed = run(train_cfg(tiny_pipelines, instance_dir, tmp_path / "b",
                            resume_from_checkpoint=str(tmp_path / "a" / "checkpoints" / "2"), **kw))
    assert resumed.steps == 4 and "text_encoder" not in resumed.state.params
    for a, b in zip(jax.tree.leaves(jax.device_get(stopped.state)),
                    jax.tree.leaves(jax.device_get(resumed.state))):
        np.testing.assert_array_equal(a, b)


def test_two_concepts_draw_from_both(tiny_pipelines, tmp_path):
    concepts = [
        {"instance_data_dir": draw_images(tmp_path / "toy", 2, seed=5),
         "instance_prompt": "a photo of sks toy", "class_data_dir": str(tmp_path / "class_toy"),
         "class_prompt": "a photo of toy"},
        {"instance_data_dir": draw_images(tmp_path / "cube", 3, seed=6),
         "instance_prompt": "a photo of zwx cube", "class_data_dir": str(tmp_path / "class_cube"),
         "class_prompt": "a photo of cube"},
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
