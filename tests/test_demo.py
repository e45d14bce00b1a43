"""The README's main command: the offline demo (tiny model made without torch, round trip)."""

from __future__ import annotations

import os

import numpy as np

from dreambooth_jax import demo


def test_demo_end_to_end_and_diffusers_loads_both_pipelines(tmp_path, capsys):
    demo.main(["--output_dir", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "made a tiny random SD-1-style pipeline" in printed
    assert "weights bit-exact: True; outputs identical: True" in printed

    import diffusers

    for folder in ("tiny-sd1", "pipeline"):
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(os.path.join(tmp_path, folder))
        out = pipe("a photo of sks dog", num_inference_steps=2, height=64, width=64, output_type="np").images
        assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()

    # A second run reuses the tiny model instead of making it again.
    demo.main(["--output_dir", str(tmp_path)])
    assert "made a tiny" not in capsys.readouterr().out
