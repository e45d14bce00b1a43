"""The Flax CLIP text encoder against transformers' PyTorch `CLIPTextModel[WithProjection]` (CPU, fp32)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from dreambooth_jax.models import clip
from dreambooth_jax.weights import convert
from dreambooth_jax.weights.safetensors_io import load_file

# fp32 parity: max |flax - torch| / max(1, max |torch|). Measured ~2e-6 on the tiny encoders.
FP32_TOL = 1e-5
# bf16 compute (fp32 params) against the fp32 model: max |bf16 - fp32| / max |fp32|.
BF16_TOL = 5e-2
# The `jax.nn.dot_product_attention` path against the einsum reference, both fp32: max abs error.
IMPL_TOL = 1e-5

PROMPTS = [
    "a photo of sks dog",
    "a painting of a red car on the beach in the snow with a blue backpack wearing sunglasses",  # truncated
]
# (pipeline kind, encoder folder, tokenizer folder)
ENCODERS = {
    "sd1": ("sd1", "text_encoder", "tokenizer"),
    "sd2": ("sd2", "text_encoder", "tokenizer"),
    "sdxl": ("sdxl", "text_encoder", "tokenizer"),
    "sdxl_2": ("sdxl", "text_encoder_2", "tokenizer_2"),
}


def _err(actual, expected) -> float:
    expected = np.asarray(expected, np.float32)
    return float(np.abs(np.asarray(actual, np.float32) - expected).max() / max(1.0, np.abs(expected).max()))


def _torch_outputs(model, ids, mask=None) -> dict:
    with torch.no_grad():
        out = model(torch.tensor(ids), attention_mask=None if mask is None else torch.tensor(mask),
                    output_hidden_states=True)
    ref = {"last_hidden_state": out.last_hidden_state, "penultimate": out.hidden_states[-2]}
    if hasattr(out, "text_embeds"):
        ref["text_embeds"] = out.text_embeds
    else:
        ref["pooler_output"] = out.pooler_output
    return {k: v.numpy() for k, v in ref.items()}


def _flax_outputs(out: clip.CLIPTextOutput) -> dict:
    res = {"last_hidden_state": out.last_hidden_state, "penultimate": out.hidden_states[-2],
           "pooler_output": out.pooler_output}
    if out.text_embeds is not None:
        res["text_embeds"] = out.text_embeds
    return {k: np.asarray(v.astype(jnp.float32)) for k, v in res.items()}


@pytest.fixture(scope="module", params=list(ENCODERS))
def enc(request, tiny_pipelines):
    """One tiny encoder: its config, converted params, token ids, padding mask and torch reference."""
    kind, sub, tok_sub = ENCODERS[request.param]
    folder = os.path.join(tiny_pipelines[kind], sub)
    with open(os.path.join(folder, "config.json")) as f:
        hf_config = json.load(f)
    with_projection = hf_config["architectures"] == ["CLIPTextModelWithProjection"]
    config = clip.CLIPTextConfig.from_diffusers_config(hf_config)
    raw_state = load_file(os.path.join(folder, "model.safetensors"))
    state = convert.normalize_state_dict(raw_state, strip_prefix="text_model.")
    params = convert.state_dict_to_params(state, clip.abstract_params(config, with_projection))
    tokenizer = transformers.CLIPTokenizer.from_pretrained(os.path.join(tiny_pipelines[kind], tok_sub))
    tokens = tokenizer(PROMPTS, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                       return_tensors="np")
    ids = tokens["input_ids"].astype(np.int32)
    mask = tokens["attention_mask"].astype(np.int32)
    assert mask[0].sum() < ids.shape[1] and mask[1].all(), "expected one padded and one full prompt"
    mask[1, 3] = 0  # also mask a real token, so the mask changes outputs at real positions
    torch_cls = getattr(transformers, hf_config["architectures"][0])
    torch_model = torch_cls.from_pretrained(folder).eval()
    return SimpleNamespace(
        name=request.param, folder=folder, hf_config=hf_config, with_projection=with_projection,
        config=config, raw_state=raw_state, params=params, ids=ids, mask=mask, torch_model=torch_model,
        ref=_torch_outputs(torch_model, ids), ref_masked=_torch_outputs(torch_model, ids, mask),
    )


def _run(enc, mask=None, jit=False, **module_kwargs) -> dict:
    # Op-by-op is faster than compiling for these tiny models; `_fp32` also runs the projection model (a
    # superset of the plain one) under jit.
    cls = clip.CLIPTextModelWithProjection if enc.with_projection else clip.CLIPTextModel
    model = cls(enc.config, **module_kwargs)
    out = (jax.jit(model.apply) if jit else model.apply)({"params": enc.params}, enc.ids, mask)
    assert len(out.hidden_states) == enc.config.num_hidden_layers + 1
    return _flax_outputs(out)


def _fp32(enc):
    if not hasattr(enc, "fp32"):
        enc.fp32 = _run(enc, jit=enc.with_projection)
    return enc.fp32


def test_matches_transformers_fp32(enc):
    out = _fp32(enc)
    for name, expected in enc.ref.items():
        assert _err(out[name], expected) <= FP32_TOL, name


def test_matches_transformers_with_attention_mask(enc):
    out = _run(enc, enc.mask)
    for name, expected in enc.ref_masked.items():
        assert _err(out[name], expected) <= FP32_TOL, name
    # The mask must matter (padded positions of prompt 0, every position after the masked token of prompt 1).
    assert np.abs(enc.ref_masked["last_hidden_state"] - enc.ref["last_hidden_state"]).max() > 1e-3


def test_bf16_compute_close_to_fp32(enc):
    out, fp32 = _run(enc, dtype=jnp.bfloat16), _fp32(enc)
    for name, expected in fp32.items():
        err = np.abs(out[name] - expected).max() / np.abs(expected).max()
        assert np.isfinite(out[name]).all() and err <= BF16_TOL, (name, err)


def test_dot_product_attention_matches_einsum(enc):
    out, fp32 = _run(enc, enc.mask, attention_impl="dot_product"), _run(enc, enc.mask)
    for name, expected in fp32.items():
        assert np.abs(out[name] - expected).max() <= IMPL_TOL, name


@pytest.mark.parametrize("rule", ["legacy_argmax", "first_eos"])
def test_pooling_rules(enc, rule):
    """eos_token_id == 2 (old configs) pools at the largest id, any other at the first EOS; the ids here make
    the two rules disagree, which the tokenizer's ids (EOS = largest id) do not."""
    if rule == "legacy_argmax":
        eos = 2
        ids = np.random.default_rng(0).integers(3, enc.config.vocab_size - 2, enc.ids.shape).astype(np.int32)
        assert (ids.argmax(-1) != 0).all()  # first-EOS would pick position 0 (no EOS present)
    else:
        ids, eos = enc.ids, int(enc.ids[1, 1])  # a common word: twice in prompt 1, never the largest id
        assert (ids == eos).sum(-1).min() >= 1 and (ids == eos).argmax(-1).tolist() != ids.argmax(-1).tolist()
    torch_text_model = enc.torch_model.text_model if enc.with_projection else enc.torch_model
    torch_text_model.eos_token_id = eos
    try:
        expected = _torch_outputs(enc.torch_model, ids)
    finally:
        torch_text_model.eos_token_id = enc.config.eos_token_id
    config = dataclasses.replace(enc.config, eos_token_id=eos)
    out = _run(SimpleNamespace(**{**vars(enc), "config": config, "ids": ids}))
    for name in ("pooler_output", "text_embeds"):
        if name in expected:
            assert _err(out[name], expected[name]) <= FP32_TOL, name


def test_transformers4_prefixed_state_dict_loads_identically(enc):
    bare = {k.removeprefix("text_model."): v for k, v in enc.raw_state.items()}
    prefixed = {k if k.startswith("text_projection") else "text_model." + k: v for k, v in bare.items()}
    # transformers < 4.31 also saved the position_ids buffer (e.g. SD 1.5 on the Hub).
    prefixed["text_model.embeddings.position_ids"] = np.arange(enc.config.max_position_embeddings)[None]
    target = clip.abstract_params(enc.config, enc.with_projection)
    for state in (bare, prefixed):
        state = convert.normalize_state_dict(state, strip_prefix="text_model.")
        params = convert.state_dict_to_params(state, target, ignore=clip.IGNORED_KEYS)
        jax.tree.map(np.testing.assert_array_equal, params, enc.params)


def test_config_round_trip_loads_in_transformers(enc, tmp_path):
    d = enc.config.to_diffusers_config(with_projection=enc.with_projection)
    assert clip.CLIPTextConfig.from_diffusers_config(d) == enc.config
    hf = transformers.CLIPTextConfig(**d)
    for field in dataclasses.fields(clip.CLIPTextConfig):
        assert getattr(hf, field.name) == getattr(enc.torch_model.config, field.name), field.name
    with open(tmp_path / "config.json", "w") as f:
        json.dump(d, f)
    shutil.copy(os.path.join(enc.folder, "model.safetensors"), tmp_path / "model.safetensors")
    model, info = getattr(transformers, d["architectures"][0]).from_pretrained(tmp_path,
                                                                               output_loading_info=True)
    assert type(model) is type(enc.torch_model)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    reloaded = _torch_outputs(model.eval(), enc.ids)
    for name, expected in enc.ref.items():
        np.testing.assert_array_equal(reloaded[name], expected)


def test_from_diffusers_config_ignores_metadata_and_rejects_unsupported():
    base = clip.PRESETS["sd1"].to_diffusers_config(with_projection=False)
    noisy = {**base, "_name_or_path": "x", "transformers_version": "4.40.0", "torch_dtype": "float16",
             "dtype": "float16", "attention_dropout": 0.1, "dropout": 0.1, "initializer_factor": 1.0,
             "initializer_range": 0.02, "output_hidden_states": True, "architectures": ["CLIPTextModel"]}
    assert clip.CLIPTextConfig.from_diffusers_config(noisy) == clip.PRESETS["sd1"]
    for key, value in [("hidden_act", "gelu_new"), ("model_type", "clip"), ("num_attention_heads", 5),
                       ("eos_token_id", [2, 3])]:
        with pytest.raises(ValueError, match=key):
            clip.CLIPTextConfig.from_diffusers_config({**base, key: value})


@pytest.mark.parametrize("name", list(clip.PRESETS))
def test_full_size_presets_match_transformers_param_count(name):
    config, with_projection = clip.PRESETS[name], name == "sdxl_2"
    shapes = clip.abstract_params(config, with_projection)
    n_flax = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    d = config.to_diffusers_config(with_projection)
    with torch.device("meta"):
        torch_model = getattr(transformers, d["architectures"][0])(transformers.CLIPTextConfig(**d))
    assert n_flax == sum(p.numel() for p in torch_model.parameters())
