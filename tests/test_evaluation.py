"""The paper's metrics (DINO, CLIP-I, CLIP-T) and `python -m dreambooth_jax.evaluate`, on tiny random
encoders written without torch (checked against transformers here too)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import run_processes, xla_flags_with

from dreambooth_jax import evaluate as evaluate_cli
from dreambooth_jax import images
from dreambooth_jax.diffusion.conditioning import tokenize_with_mask
from dreambooth_jax.evaluation import encoders as encoders_lib
from dreambooth_jax.evaluation import metrics as evaluation
from dreambooth_jax.evaluation import preprocessing
from dreambooth_jax.evaluation.encoders import Encoders
from dreambooth_jax.testing import tiny

SCORE_TOL = 1e-5  # float32 cosine similarities: ours vs NumPy from the same embeddings


@pytest.fixture(scope="module")
def encoder_dirs(tmp_path_factory) -> tuple[str, str]:
    return tiny.make_tiny_encoders(str(tmp_path_factory.mktemp("encoders")))


@pytest.fixture(scope="module")
def encoders(encoder_dirs):
    return Encoders(*encoder_dirs)


def _pictures(n, seed=0, size=40):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size + 8 * i, 3), dtype=np.uint8) for i in range(n)]


def test_tiny_encoders_written_without_torch_load_in_transformers(encoder_dirs):
    import torch
    import transformers

    dino_dir, clip_dir = encoder_dirs
    x = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype(np.float32)
    pixels = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    model, params = encoders_lib.load_vit(dino_dir)
    vmodel, vparams, tmodel, tparams = encoders_lib.load_clip_model(clip_dir)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(clip_dir)
    ids, _ = tokenize_with_mask(tokenizer, ["a photo of a dog"])
    with torch.no_grad():
        vit = transformers.ViTModel.from_pretrained(dino_dir, add_pooling_layer=False).eval()
        ref = transformers.CLIPModel.from_pretrained(clip_dir).eval()
        expected_cls = vit(pixel_values=pixels).last_hidden_state[:, 0].numpy()
        expected_i = ref.get_image_features(pixel_values=pixels).pooler_output.numpy()
        text_ids = torch.from_numpy(ids.astype(np.int64))
        expected_t = ref.get_text_features(input_ids=text_ids).pooler_output.numpy()
    np.testing.assert_allclose(model.apply({"params": params}, x).cls, expected_cls, atol=1e-4)
    np.testing.assert_allclose(vmodel.apply({"params": vparams}, x).image_embeds, expected_i, atol=1e-4)
    np.testing.assert_allclose(tmodel.apply({"params": tparams}, ids).text_embeds, expected_t, atol=1e-4)


def test_identical_images_score_one(encoders):
    image = _pictures(1)[0]
    result = evaluation.evaluate(encoders, [image], ["a sks dog"], [image.copy()])
    assert abs(result.scores["dino"][0] - 1) < SCORE_TOL and abs(result.scores["clip_i"][0] - 1) < SCORE_TOL


def test_scores_equal_numpy_from_the_same_embeddings(encoders, encoder_dirs):
    """One generated image, two real ones: the scores are NumPy cosines of the models' raw outputs."""
    generated, *real = _pictures(3, seed=1)
    prompt = "a sks dog in the snow"
    result = evaluation.evaluate(encoders, [generated], [prompt], real, unique_token="sks")

    dino_dir, clip_dir = encoder_dirs
    model, params = encoders_lib.load_vit(dino_dir)
    vmodel, vparams, tmodel, tparams = encoders_lib.load_clip_model(clip_dir)
    dino = np.asarray(model.apply({"params": params}, preprocessing.preprocess([generated, *real],
                                                                         encoders.dino_preprocessing)).cls)
    clip = np.asarray(vmodel.apply({"params": vparams}, preprocessing.preprocess([generated, *real],
                                                                          encoders.clip_preprocessing)).image_embeds)
    text = np.asarray(tmodel.apply({"params": tparams},
                                   tokenize_with_mask(encoders.tokenizer, ["a dog in the snow"])[0])
                      .text_embeds)[0]

    def cos(a, b):
        return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))

    assert abs(result.scores["dino"][0] - (cos(dino[0], dino[1]) + cos(dino[0], dino[2])) / 2) < SCORE_TOL
    assert abs(result.scores["clip_i"][0] - (cos(clip[0], clip[1]) + cos(clip[0], clip[2])) / 2) < SCORE_TOL
    assert abs(result.scores["clip_t"][0] - cos(clip[0], text)) < SCORE_TOL
    assert abs(result.real["dino"]["mean"] - cos(dino[1], dino[2])) < SCORE_TOL


def test_summary_per_prompt_and_overall():
    scores = {m: np.array([0.1, 0.3, 0.5, 0.9]) * (k + 1) for k, m in enumerate(evaluation.METRICS)}
    summary = evaluation.summarize(scores, ["p", "q", "p", "q"])
    assert summary["per_prompt"]["p"]["dino"] == {"mean": 0.3, "std": pytest.approx(0.2), "n": 2}
    assert summary["per_prompt"]["q"]["clip_t"]["mean"] == pytest.approx(1.8)
    assert summary["overall"]["clip_i"]["std"] == pytest.approx(np.std(scores["clip_i"]))
    assert list(summary["per_prompt"]) == ["p", "q"]


def test_batches_are_padded_to_one_shape(encoder_dirs, encoders):
    pictures = _pictures(5, seed=2)
    small = Encoders(*encoder_dirs, batch_size=2)
    np.testing.assert_allclose(small.dino(pictures), encoders.dino(pictures), atol=1e-6)
    np.testing.assert_allclose(small.clip_texts(["a", "b", "c"]), encoders.clip_texts(["a", "b", "c"]),
                               atol=1e-6)


def test_embeddings_on_eight_devices_match(encoder_dirs, encoders, tmp_path):
    pictures = _pictures(3, seed=3)
    np.save(tmp_path / "pictures.npy", np.stack([p[:, :40] for p in pictures]))
    script = (
        "import sys, numpy as np, jax; from dreambooth_jax.evaluation.encoders import Encoders\n"
        "assert jax.device_count() == 8\n"
        f"enc = Encoders({encoder_dirs[0]!r}, {encoder_dirs[1]!r}, batch_size=8)\n"
        f"x = list(np.load({str(tmp_path / 'pictures.npy')!r}))\n"
        f"np.save({str(tmp_path / 'out.npy')!r}, np.concatenate([enc.dino(x), enc.clip_images(x)], 1))\n")
    env = {**os.environ, "XLA_FLAGS": xla_flags_with("--xla_force_host_platform_device_count=8")}
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=300)
    x = [p[:, :40] for p in pictures]
    expected = np.concatenate([encoders.dino(x), encoders.clip_images(x)], 1)
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected, atol=1e-5)


def _write_samples(folder, prompts, seed=0):
    os.makedirs(folder, exist_ok=True)
    for k, (prompt, picture) in enumerate(zip(prompts, _pictures(len(prompts), seed))):
        images.save_png(picture / 255.0, os.path.join(folder, f"{k:05d}-seed{k}.png"), {"prompt": prompt})
    images.save_png(_pictures(1)[0] / 255.0, os.path.join(folder, "grid-00000-00003.png"), {"images": "0..3"})


def test_evaluate_cli_reads_png_metadata_and_prompts_jsonl(encoder_dirs, tmp_path, capsys):
    samples, real = str(tmp_path / "samples"), str(tmp_path / "real")
    prompts = ["a sks dog in the snow", "a sks dog in the snow", "a red sks dog", "a red sks dog"]
    _write_samples(samples, prompts)
    _write_samples(real, ["x", "y"], seed=5)
    args = ["--images", samples, "--real_images", real, "--dino_model", encoder_dirs[0], "--clip_model",
            encoder_dirs[1]]
    evaluate_cli.main(args)
    with open(os.path.join(samples, "metrics.json")) as f:
        result = json.load(f)
    assert result["num_generated"] == 4 and result["num_real"] == 3  # the grid is skipped, real grid is not
    assert list(result["per_prompt"]) == ["a sks dog in the snow", "a red sks dog"]
    assert [row["file"] for row in result["images"]] == [f"{k:05d}-seed{k}.png" for k in range(4)]
    assert set(result["overall"]) == {"dino", "clip_i", "clip_t"}
    table = capsys.readouterr().out
    assert "| a red sks dog |" in table and "DINO" in table
    assert os.path.isfile(os.path.join(samples, "metrics.md"))

    # prompts.jsonl, when present, decides which images and prompts are scored.
    with open(os.path.join(samples, "prompts.jsonl"), "w") as f:
        f.write(json.dumps({"file": "00001-seed1.png", "prompt": "another prompt"}) + "\n")
    evaluate_cli.main([*args, "--output", str(tmp_path / "one.json")])
    with open(tmp_path / "one.json") as f:
        assert list(json.load(f)["per_prompt"]) == ["another prompt"]


def test_evaluate_cli_in_two_processes(encoder_dirs, tmp_path):
    """Two processes of two devices (JAX's multi-process runtime on CPU): the TFDS build behind a barrier, the
    encoders data parallel across processes, one writer; the scores equal a single-process run."""
    samples, copy = str(tmp_path / "samples"), tiny.make_tiny_dataset(str(tmp_path / "copy"))
    _write_samples(samples, ["a sks dog in the snow", "a red sks dog", "a red sks dog"])
    args = ["--images", samples, "--dataset", "dreambooth:dog", "--dataset_dir", str(tmp_path / "tfds"),
            "--dataset_manual_dir", copy, "--dino_model", encoder_dirs[0], "--clip_model", encoder_dirs[1],
            "--batch_size", "4"]
    logs = run_processes(["-m", "dreambooth_jax.evaluate", *args, "--output", str(tmp_path / "multi.json")],
                         timeout=300)
    assert logs[0].count("| **all prompts** |") == 1 and "| **all prompts** |" not in logs[1]  # one writer
    evaluate_cli.main([*args, "--output", str(tmp_path / "single.json")])
    with open(tmp_path / "multi.json") as f, open(tmp_path / "single.json") as g:
        multi, single = json.load(f), json.load(g)
    assert multi["num_real"] == 3 and multi["real_source"] == "dreambooth:dog"
    for a, b in zip(multi["images"], single["images"]):
        assert a["file"] == b["file"]
        for m in evaluation.METRICS:
            assert abs(a[m] - b[m]) < SCORE_TOL


def test_evaluate_cli_errors(encoder_dirs, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {**os.environ, "DREAMBOOTH_JAX_TRACEBACK": ""}
    run = subprocess.run([sys.executable, "-m", "dreambooth_jax.evaluate", "--images", str(empty),
                          "--real_images", str(empty)], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 2
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --images") and "no generated images" in run.stderr
    with open(empty / "prompts.jsonl", "w") as f:
        f.write('{"file": "missing.png", "prompt": "p"}\n')
    with pytest.raises(FileNotFoundError, match="lists 1 missing image"):
        evaluate_cli.read_generated(str(empty))
