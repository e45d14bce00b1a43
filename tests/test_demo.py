"""The README's main command: the offline demo (tiny model made without torch, train, sample, export)."""

from __future__ import annotations

import os

import numpy as np

from dreambooth_jax import demo


def test_demo_end_to_end(tmp_path, capsys):
    demo.main(["--output_dir", str(tmp_path), "--max_train_steps", "4"])
    printed = capsys.readouterr().out
    for stage in ("made a tiny random SD-1-style pipeline", "4 steps in", "sampled 2 images",
                  "reloads bit-exact: True"):
        assert stage in printed
    assert len(os.listdir(tmp_path / "class")) == 4  # prior preservation generated the class images
    assert os.path.isfile(tmp_path / "samples.png")

    import diffusers

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(tmp_path / "model"))
    out = pipe("a photo of sks toy", num_inference_steps=2, height=64, width=64, output_type="np").images
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()
