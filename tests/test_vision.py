"""The Flax DINO / CLIP evaluation encoders and preprocessing against transformers (CPU, fp32)."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest
import torch
import transformers
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

from dreambooth_jax.evaluation import encoders, preprocessing
from dreambooth_jax.models import vision
from dreambooth_jax.testing import tiny

# fp32 parity, max abs error on the tiny random models. Measured 2e-7..9e-7 (ViT, CLIP image/text).
FP32_TOL = 1e-4
# Preprocessing: both sides resize with PIL on uint8 and then do the same float64/float32 arithmetic, so
# the result is bit-identical; the tolerance only absorbs float32 rounding-order differences.
PREPROCESS_TOL = 1e-5


def _images(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((37, 53), (61, 29), (40, 40))]


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def test_vit_matches_transformers(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=64, layer_norm_eps=1e-6)
    ref = transformers.ViTModel(cfg, add_pooling_layer=False).eval()
    ref.save_pretrained(tmp_path)
    model, params = encoders.load_vit(str(tmp_path))
    x = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype(np.float32)
    out = model.apply({"params": params}, x)
    with torch.no_grad():
        expected = ref(pixel_values=_nchw(x)).last_hidden_state.numpy()
    err_last = np.abs(np.asarray(out.last_hidden_state) - expected).max()
    err_cls = np.abs(np.asarray(out.cls) - expected[:, 0]).max()
    print(f"ViT max abs error: last_hidden_state {err_last:.2e}, cls {err_cls:.2e}")
    assert err_last <= FP32_TOL and err_cls <= FP32_TOL

    # The same weights as `pytorch_model.bin` only (as facebook/dino-vits16 ships them): read without torch.
    os.remove(tmp_path / "model.safetensors")
    torch.save(ref.state_dict(), tmp_path / "pytorch_model.bin")
    _, from_bin = encoders.load_vit(str(tmp_path))
    for a, b in zip(jax.tree.leaves(from_bin), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)


def test_vit_loads_transformers5_names():
    """In-memory transformers-5 names (`layers.N.attention.q_proj`, `vit.` prefix) map to the same params."""
    cfg = transformers.ViTConfig(image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=32)
    ref = transformers.ViTModel(cfg, add_pooling_layer=False)
    state = {f"vit.{k}": v.numpy() for k, v in ref.state_dict().items()}
    assert any(".q_proj." in k for k in state)
    params = encoders.vit_params_from_state_dict(state, vision.ViTConfig.from_diffusers_config(cfg.to_dict()))
    np.testing.assert_array_equal(params["encoder"]["layer_0"]["attention"]["attention"]["query"]["kernel"],
                                  ref.layers[0].attention.q_proj.weight.detach().numpy().T)


def test_clip_matches_transformers(tmp_path):
    torch.manual_seed(0)
    tok = tiny.make_tokenizer()
    vocab = len(tok)
    text = transformers.CLIPTextConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=tiny.TOKENIZER_MAX_LENGTH, bos_token_id=vocab - 2, eos_token_id=vocab - 1,
        pad_token_id=vocab - 1)
    vis = transformers.CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=48, intermediate_size=96,
                                        num_hidden_layers=2, num_attention_heads=4)
    ref = transformers.CLIPModel(transformers.CLIPConfig(text_config=text.to_dict(),
                                                         vision_config=vis.to_dict(),
                                                         projection_dim=24)).eval()
    ref.save_pretrained(tmp_path)
    vmodel, vparams, tmodel, tparams = encoders.load_clip_model(str(tmp_path))

    x = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype(np.float32)
    ids = tok(["a photo of sks dog", "a dog"], padding="max_length", max_length=tiny.TOKENIZER_MAX_LENGTH,
              truncation=True, return_tensors="np").input_ids
    image_embeds = np.asarray(vmodel.apply({"params": vparams}, x).image_embeds)
    text_embeds = np.asarray(tmodel.apply({"params": tparams}, ids).text_embeds)
    with torch.no_grad():
        # Unnormalized projections (`CLIPModel.forward` returns L2-normalized embeddings).
        expected_i = ref.get_image_features(pixel_values=_nchw(x)).pooler_output.numpy()
        expected_t = ref.get_text_features(input_ids=torch.from_numpy(ids)).pooler_output.numpy()
    err_i = np.abs(image_embeds - expected_i).max()
    err_t = np.abs(text_embeds - expected_t).max()
    print(f"CLIP max abs error: image_embeds {err_i:.2e}, text_embeds {err_t:.2e}")
    assert image_embeds.shape == (2, 24) and text_embeds.shape == (2, 24)
    assert err_i <= FP32_TOL and err_t <= FP32_TOL


@pytest.mark.parametrize("kind", ["dino", "clip"])
@pytest.mark.parametrize("size", [24, 224])
def test_preprocessing_matches_processor(kind, size):
    images = _images()
    if kind == "dino":  # facebook/dino-vits16's preprocessor_config.json
        proc = ViTImageProcessorPil(size={"height": size, "width": size}, resample=2,
                                    image_mean=list(preprocessing.IMAGENET_DEFAULT_MEAN),
                                    image_std=list(preprocessing.IMAGENET_DEFAULT_STD))
        ours = preprocessing.preprocess_dino(images, size=size)
    else:
        proc = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        ours = preprocessing.preprocess_clip(images, size=size)
    expected = np.stack([proc(images=im, return_tensors="np")["pixel_values"][0] for im in images])
    expected = expected.transpose(0, 2, 3, 1)
    assert ours.shape == expected.shape and ours.dtype == np.float32
    err = np.abs(ours - expected).max()
    print(f"{kind} size {size} preprocessing max abs error: {err:.2e}")
    assert err <= PREPROCESS_TOL
    # The same, through the processor's own config dict.
    cfg = preprocessing.ImagePreprocessing.from_processor_config(proc.to_dict())
    np.testing.assert_allclose(preprocessing.preprocess(images, cfg), ours, atol=0)


def test_legacy_openai_config_formats():
    """openai/clip-vit-base-patch32's old preprocessor config (`size: 224` means the shortest edge for CLIP, a
    square for ViT) and `text_config_dict` overrides, read as transformers reads them."""
    old_clip = {"crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
                "feature_extractor_type": "CLIPFeatureExtractor",
                "image_mean": list(preprocessing.OPENAI_CLIP_MEAN),
                "image_std": list(preprocessing.OPENAI_CLIP_STD), "resample": 3, "size": 224}
    from_config = preprocessing.ImagePreprocessing.from_processor_config
    assert from_config(old_clip) == preprocessing.CLIP_PREPROCESSING
    old_dino = {"do_normalize": True, "do_resize": True, "feature_extractor_type": "ViTFeatureExtractor",
                "image_mean": list(preprocessing.IMAGENET_DEFAULT_MEAN),
                "image_std": list(preprocessing.IMAGENET_DEFAULT_STD), "resample": 2, "size": 224}
    assert from_config(old_dino) == preprocessing.DINO_PREPROCESSING
    config = {"text_config": {"hidden_size": 512, "vocab_size": 49408},
              "text_config_dict": {"hidden_size": 768}, "vision_config": None,
              "vision_config_dict": {"patch_size": 14}}
    assert encoders.clip_tower_config(config, "text") == {"hidden_size": 768, "vocab_size": 49408}
    assert encoders.clip_tower_config(config, "vision") == {"patch_size": 14}
    ref = transformers.CLIPConfig(text_config={"hidden_size": 512}, text_config_dict={"hidden_size": 768})
    assert ref.text_config.hidden_size == 768


@pytest.mark.parametrize("kind", ["clip", "vit"])
def test_missing_processor_keys_take_the_processor_classes_defaults(kind):
    if kind == "clip":
        proc, name = CLIPImageProcessorPil(), "CLIPImageProcessor"
    else:
        proc, name = ViTImageProcessorPil(), "ViTImageProcessor"
    # nothing else given
    cfg = preprocessing.ImagePreprocessing.from_processor_config({"image_processor_type": name})
    images = _images()
    expected = np.stack([proc(images=im, return_tensors="np")["pixel_values"][0] for im in images])
    np.testing.assert_allclose(preprocessing.preprocess(images, cfg), expected.transpose(0, 2, 3, 1),
                               atol=PREPROCESS_TOL)
