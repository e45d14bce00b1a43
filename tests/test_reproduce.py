"""`python -m dreambooth_jax.reproduce` end to end on two tiny subjects with the tiny model, and its
resume."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from dreambooth_jax import reproduce
from dreambooth_jax.paper import reproduction
from dreambooth_jax.testing import tiny


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("reproduce")
    data = tiny.make_tiny_dataset(str(root / "data"))  # a live 'dog' and an object 'teapot', 2 prompts each
    dino, clip = tiny.make_tiny_encoders(str(root / "encoders"))
    model = tiny.make_tiny_pipeline(str(root / "tiny-sd1"))
    preset = root / "tiny_paper.json"
    preset.write_text(json.dumps({
        "pretrained_model_name_or_path": model, "with_prior_preservation": True, "num_class_images": 2,
        "sample_batch_size": 2, "resolution": 32, "max_train_steps": 2, "learning_rate": 1e-3,
        "train_text_encoder": True, "attention": "einsum", "checkpointing_steps": 100,
        "validation_inference_steps": 2}))
    args = ["--config", str(preset), "--dataset_dir", str(root / "tfds"), "--dataset_manual_dir", data,
            "--dino_model", dino, "--clip_model", clip, "--num_images_per_prompt", "2",
            "--num_inference_steps", "2", "--output_dir", str(root / "out")]
    return root, args


def test_reproduce_two_subjects_then_skips_them_and_keeps_settings(setup, monkeypatch, capsys):
    root, args = setup
    out = root / "out"
    reproduce.main(args)
    printed = capsys.readouterr().out
    with open(out / "results.json") as f:
        results = json.load(f)
    assert list(results["subjects"]) == ["dog", "teapot"]
    for name, class_name in (("dog", "dog"), ("teapot", "teapot")):
        subject = results["subjects"][name]
        assert subject["class"] == class_name and subject["dino"]["n"] == 4  # 2 prompts x 2 images
        run = out / name / "seed0"
        with open(run / "metrics.json") as f:
            metrics = json.load(f)
        for m in ("dino", "clip_i", "clip_t"):  # the subject's row pools its images' scores
            scores = [row[m] for row in metrics["images"]]
            assert subject[m]["mean"] == pytest.approx(float(np.mean(scores)), rel=1e-9)
            assert subject[m]["std"] == pytest.approx(float(np.std(scores)), rel=1e-9, abs=1e-12)
        expected = ["a sks dog in the snow", "a sks dog wearing a red hat"] if name == "dog" else [
            "a sks teapot in the jungle", "a red sks teapot"]
        assert list(metrics["per_prompt"]) == expected
        assert sorted(f for f in os.listdir(run / "samples") if f.endswith(".png") and f[0].isdigit()) == [
            f"{k:05d}-seed{k}.png" for k in range(4)]
        assert not (run / "model").exists()  # deleted once sampled (no --keep_models)
        assert (out / name / "contact_sheet.png").is_file()
    assert sorted(os.listdir(out / "class_images")) == ["dog", "teapot"]  # one class folder per class
    assert "| paper: DreamBooth (Stable Diffusion) |" in printed
    assert "| dog | dog |" in (out / "results.md").read_text()

    # Rerun: both subjects are finished, nothing is trained, sampled or scored again.
    def fail(*a, **k):
        raise AssertionError("a finished subject was redone")

    monkeypatch.setattr(reproduction, "train_subject", fail)
    monkeypatch.setattr(reproduction, "sample_subject", fail)
    reproduce.main(args)
    assert "dog seed 0: done before, skipped" in capsys.readouterr().err
    with open(out / "results.json") as f:
        assert json.load(f)["subjects"] == results["subjects"]
    assert json.loads((out / "dog" / "seed0" / "settings.json").read_text())["num_inference_steps"] == 2

    # Other settings into the same folder are refused, not mixed with the old results; bad options too.
    with pytest.raises(ValueError,
                       match=r"dog/seed0 was started with other settings \(num_inference_steps: 2 -> 3\)"):
        reproduce.main([*args, "--num_inference_steps", "3"])
    with pytest.raises(ValueError, match="unknown dog6; known: dog, teapot"):
        reproduce.main([*args, "--subjects", "dog6"])
    with pytest.raises(SystemExit):
        reproduce.main([*args, "--seeds", "a,b"])


def test_reproduce_with_the_sdxl_lora_preset(setup, tiny_pipelines, capsys):
    """`--config sdxl_lora` (the preset itself, its heavy settings overridden for the tiny SDXL model): the
    paper's protocol on SDXL trains a LoRA, samples from the merged pipeline and scores it."""
    root, args = setup
    out = root / "out_sdxl"
    args = [a for a in args if a not in ("--config", str(root / "tiny_paper.json"))]
    args[args.index("--output_dir") + 1] = str(out)
    reproduce.main([*args, "--config", "sdxl_lora", "--pretrained_model_name_or_path", tiny_pipelines["sdxl"],
                    "--subjects", "dog", "--max_train_steps", "2", "--",
                    "--pretrained_vae_model_name_or_path", "none", "--resolution", "64",
                    "--gradient_accumulation_steps", "1", "--num_class_images", "2", "--sample_batch_size",
                    "2", "--mixed_precision", "no", "--attention", "einsum", "--validation_inference_steps",
                    "2", "--learning_rate", "1e-3"])
    results = json.loads((out / "results.json").read_text())
    assert list(results["subjects"]) == ["dog"] and results["subjects"]["dog"]["dino"]["n"] == 4
    settings = json.loads((out / "dog" / "seed0" / "settings.json").read_text())
    assert settings["config"] == "sdxl_lora"
    assert "--use_lora: adding --merge_lora" in capsys.readouterr().err


SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "datasets", "dreambooth")


@pytest.mark.skipif(not os.path.isdir(SHARED), reason="../shared/datasets/dreambooth is not here")
def test_parallel_subjects_give_the_scores_of_one_at_a_time(setup, capsys):
    """Four subjects of the paper's dataset (two of one class) trained 4 at a time (one program, `train
    --subjects`) score as trained one at a time. The weights agree to rtol 1e-5 (test_subjects); the images
    are 8-bit PNGs, so a pixel may round the other way: the scores (cosine similarities) agree to 1e-3."""
    root, args = setup
    args = [*args, "--dataset_manual_dir", os.path.abspath(SHARED), "--dataset_dir",
            # (the last of a repeated flag wins)
            str(root / "tfds_shared"), "--subjects", "dog6,dog8,can,cat", "--num_images_per_prompt", "1"]
    results = {}
    for k in (4, 1):
        out = root / f"parallel{k}"
        reproduce.main([*args, "--output_dir", str(out), "--parallel_subjects", str(k)])
        results[k] = json.loads((out / "results.json").read_text())
        # exported runs leave nothing
        assert not (out / "parallel").exists() or not os.listdir(out / "parallel")
    assert "training 4 run(s) 4 at a time" in capsys.readouterr().err
    assert list(results[4]["subjects"]) == ["dog6", "dog8", "can", "cat"]
    for name, subject in results[1]["subjects"].items():
        assert subject["dino"]["n"] == 25
        for m in ("dino", "clip_i", "clip_t"):
            got = results[4]["subjects"][name][m]["mean"]
            assert got == pytest.approx(subject[m]["mean"], abs=1e-3), (name, m)
