"""The Flax Flux.1 transformer against diffusers' PyTorch `FluxTransformer2DModel` and `FluxPipeline` helpers.

CPU, fp32, random weights: tiny configs (with and without the guidance embedding, at t = g = 0 and at a
sampler's t and guidance), the packing and position ids exactly, Flux.1's full width with one block of each
kind on a 1024 px image's 4096 + 512 tokens, the folder round trip diffusers -> ours -> diffusers bit-exactly
(one file and sharded), and Flux.1-dev / -schnell by shapes only."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel

from dreambooth_jax.families import components
from dreambooth_jax.models import flux
from dreambooth_jax.weights import convert

# fp32 parity, max |flax - torch| / max(1, max |torch|).
# t = g = 0: every sinusoid is exactly sin 0 = 0 / cos 0 = 1 in both, so what is left is float32 rounding of
# matmuls of width <= 256, norms, softmax and GELU: ~6e-8 relative per op, a few hundred ops deep, and the
# blocks' unit gain does not amplify it: measured 3e-7 to 6e-7; 1e-5 is far below any real mismatch (each
# block moves the output by 26-38%, `test_every_block_moves_the_output`; rotating the wrong way, 1e-1).
TIGHT_TOL = 1e-5
# A sampler's t in (0, 1) and guidance 3.5: the sinusoids' arguments reach 1000 t and 3500. float32 sin / cos
# of an argument A carry ~A * 2^-24 absolute error (~2e-4 rad at 3500), and torch and XLA round them (and the
# exp of the frequencies, the product) differently. At worst these errors line up as a relative change of g
# (or t) by a few 2^-24, and the tiny model's output moves ~580x a relative change of g, ~40x one of t
# (measured with 1e-5 perturbations): 3.5e-5 per ulp aligned. They do not line up: measured 5e-6 with the
# guidance embedding, 2e-6 without; 1e-4 allows 3 ulps aligned.
SINUSOID_TOL = 1e-4
# Full width: the same sinusoid term plus sums of 3072 (projections, modulation), 4608 (attention over the
# keys), 12288 and 15360 (MLP out, single-block proj_out) products in different orders, ~sqrt(K) * 6e-8 ~
# 4e-6-7e-6 relative each, a dozen matmuls deep: ~5e-5 if they all added up. Measured 7e-6.
FULL_WIDTH_TOL = 1e-4

TINY = dict(in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
            axes_dims_rope=(4, 6, 6), joint_attention_dim=32, pooled_projection_dim=24)
LATENT_HW = (8, 12)  # latent pixels: a non-square 4 x 6 grid of packed tokens
TEXT_LEN = 7

# black-forest-labs/FLUX.1-dev's transformer/config.json (schnell's: guidance_embeds false), written out here
# so that the count checks our presets too.
FLUX_DEV_CONFIG = dict(patch_size=1, in_channels=64, out_channels=None, num_layers=19, num_single_layers=38,
                       attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                       pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=[16, 56, 56])


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Unit-gain random weights (N(0, 1/fan_in)), RMSNorm scales ~1 + N(0, 0.2^2), biases N(0, 0.2^2): the
    AdaLN modulations and gates come out O(1), so every block changes the output (diffusers' default init
    makes the gates small and a block's mistake could hide)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(0, p.shape[1] ** -0.5, generator=gen)
            elif ".norm_" in name:
                p.normal_(1, 0.2, generator=gen)
            else:
                p.normal_(0, 0.2, generator=gen)
    return model.eval()


def _tiny_reference(guidance_embeds: bool, seed: int = 0) -> FluxTransformer2DModel:
    torch.manual_seed(seed)
    return _randomize(FluxTransformer2DModel(**TINY, guidance_embeds=guidance_embeds), seed)


def _inputs(cfg: dict, batch: int, latent_hw: tuple[int, int], text_len: int, realistic: bool, seed: int):
    """(hidden_states, encoder_hidden_states, pooled, timestep, img_ids, txt_ids, guidance) as NumPy."""
    rng = np.random.default_rng(seed)
    h, w = latent_hw
    tokens = (h // 2) * (w // 2)
    return (rng.standard_normal((batch, tokens, cfg["in_channels"]), np.float32),
            rng.standard_normal((batch, text_len, cfg["joint_attention_dim"]), np.float32),
            rng.standard_normal((batch, cfg["pooled_projection_dim"]), np.float32),
            rng.uniform(0, 1, batch).astype(np.float32) if realistic else np.zeros(batch, np.float32),
            flux.image_ids(h, w), flux.text_ids(text_len),
            np.full(batch, 3.5 if realistic else 0.0, np.float32))


def _torch_output(ref: FluxTransformer2DModel, inputs) -> np.ndarray:
    *args, guidance = (torch.from_numpy(np.asarray(a)) for a in inputs)
    with torch.no_grad():
        return ref(*args, guidance if ref.config.guidance_embeds else None).sample.numpy()


def _our_output(module, params, inputs, jit: bool = False) -> np.ndarray:
    """Eager for the tiny models (no compile); jitted at full width, where XLA's fusions save a third. The
    position ids stay outside the trace (NumPy ids: float64 rotary tables, the pipeline's path)."""
    x, context, pooled, t, img_ids, txt_ids, guidance = inputs
    guidance = jnp.asarray(guidance) if module.config.guidance_embeds else None
    apply = lambda p, *a: module.apply(p, *a[:4], img_ids, txt_ids, a[4])  # noqa: E731
    return np.asarray((jax.jit(apply) if jit else apply)({"params": params}, x, context, pooled, t, guidance))


def _err(actual, expected) -> float:
    expected = np.asarray(expected, np.float32)
    return float(np.abs(np.asarray(actual, np.float32) - expected).max() / max(1.0, np.abs(expected).max()))


@pytest.mark.parametrize("guidance_embeds", [True, False], ids=["dev", "schnell"])
def test_tiny_matches_diffusers_fp32(guidance_embeds, tmp_path):
    """Through the loader: diffusers' `save_pretrained` folder -> `components.load_folder`. Batch 2, t = g = 0
    (also with traced position ids, whose rotary tables are float32) and a sampler's t ~ U(0, 1), g = 3.5."""
    ref = _tiny_reference(guidance_embeds)
    ref.save_pretrained(tmp_path)
    module, params = components.load_folder(str(tmp_path), "flux_transformer")
    assert module.config == flux.FluxConfig(**TINY, guidance_embeds=guidance_embeds)
    zero = _inputs(TINY, 2, LATENT_HW, TEXT_LEN, realistic=False, seed=1)
    expected = _torch_output(ref, zero)
    assert _err(_our_output(module, params, zero), expected) < TIGHT_TOL
    traced_ids = (*zero[:4], jnp.asarray(zero[4]), jnp.asarray(zero[5]), zero[6])
    assert _err(_our_output(module, params, traced_ids), expected) < TIGHT_TOL
    sampler = _inputs(TINY, 2, LATENT_HW, TEXT_LEN, realistic=True, seed=2)
    assert _err(_our_output(module, params, sampler), _torch_output(ref, sampler)) < SINUSOID_TOL


def test_every_block_moves_the_output():
    """The premise of the parity tests: in the tiny model, skipping any one block changes diffusers' output
    by more than 10% of its scale (measured 26-38%), so a wrong block cannot pass under the tolerances."""

    class Skip(torch.nn.Module):
        def forward(self, hidden_states, encoder_hidden_states, **_):
            return encoder_hidden_states, hidden_states

    ref = _tiny_reference(guidance_embeds=True)
    inputs = _inputs(TINY, 2, LATENT_HW, TEXT_LEN, realistic=True, seed=2)
    full = _torch_output(ref, inputs)
    for blocks in (ref.transformer_blocks, ref.single_transformer_blocks):
        for i, block in enumerate(blocks):
            blocks[i] = Skip()
            assert _err(_torch_output(ref, inputs), full) > 0.1, i
            blocks[i] = block


def test_packing_and_ids_equal_diffusers():
    """`pack_latents` / `unpack_latents` / `image_ids` / `text_ids` against FluxPipeline's static helpers
    (NCHW there, NHWC here), exactly: they only move values. A 1024 x 768 px image: 128 x 96 latents."""
    height, width, vae_scale = 1024, 768, 8
    lh, lw = height // vae_scale, width // vae_scale
    latents = np.random.default_rng(0).standard_normal((2, lh, lw, 16), np.float32)
    nchw = torch.from_numpy(np.ascontiguousarray(latents.transpose(0, 3, 1, 2)))
    theirs = FluxPipeline._pack_latents(nchw, 2, 16, lh, lw).numpy()
    ours = np.asarray(flux.pack_latents(jnp.asarray(latents)))
    np.testing.assert_array_equal(ours, theirs)
    unpacked = FluxPipeline._unpack_latents(torch.from_numpy(theirs), height, width, vae_scale).numpy()
    np.testing.assert_array_equal(np.asarray(flux.unpack_latents(jnp.asarray(ours), lh, lw)),
                                  unpacked.transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(unpacked.transpose(0, 2, 3, 1), latents)
    # the pipeline asks for ids of the packed grid: latent size // 2
    ids = FluxPipeline._prepare_latent_image_ids(2, lh // 2, lw // 2, "cpu", torch.float32).numpy()
    np.testing.assert_array_equal(flux.image_ids(lh, lw), ids)
    assert flux.image_ids(lh, lw).dtype == ids.dtype
    np.testing.assert_array_equal(flux.text_ids(512), np.zeros((512, 3), np.float32))  # encode_prompt's


def test_full_width_one_block_each_matches_diffusers():
    """Flux.1-dev's width (24 heads of 128, rotary axes (16, 56, 56), T5 4096 and CLIP 768 inputs, guidance
    embedding) with one double- and one single-stream block, on a 1024 px image: 64 x 64 packed tokens of
    64 channels (128 x 128 x 16 latents) after 512 text tokens; batch 1, t = 0.7, guidance 3.5."""
    cfg = flux.FluxConfig(num_layers=1, num_single_layers=1, guidance_embeds=True)
    diffusers_cfg = {k: v for k, v in cfg.to_diffusers_config().items() if not k.startswith("_")}
    with torch.device("meta"):  # no default init of 546M params: `_randomize` writes them once
        ref = FluxTransformer2DModel(**diffusers_cfg)
    ref = _randomize(ref.to_empty(device="cpu"), seed=3)
    inputs = list(_inputs(diffusers_cfg, 1, (128, 128), 512, realistic=True, seed=3))
    inputs[3] = np.array([0.7], np.float32)
    expected = _torch_output(ref, inputs)
    state = convert.normalize_state_dict({k: v.numpy() for k, v in ref.state_dict().items()})
    params = jax.tree.map(jnp.asarray, convert.state_dict_to_params(state, flux.abstract_params(cfg)))
    del ref, state  # the torch weights (2.2 GB) go before our forward pass
    module = flux.FluxTransformer2DModel(cfg)
    assert _err(_our_output(module, params, inputs, jit=True), expected) < FULL_WIDTH_TOL


def _same_tensors(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key, value in sa.items():
        assert sb[key].dtype == value.dtype and sb[key].numpy().tobytes() == value.numpy().tobytes(), key


def test_folder_round_trip_through_diffusers_is_bit_exact(tmp_path, monkeypatch):
    """`FluxTransformer2DModel.save_pretrained` -> `components.load_folder` -> `components.save_folder` ->
    `from_pretrained`: every tensor bit-exact and the same config, from one file and from shards (a small
    shard limit; resaving into the same folder, so the earlier single file must go)."""
    ref = _tiny_reference(guidance_embeds=True, seed=4)
    ref.save_pretrained(tmp_path / "theirs")
    module, params = components.load_folder(str(tmp_path / "theirs"), "flux_transformer")
    ours = tmp_path / "ours"
    components.save_folder(str(ours), module, params)
    assert sorted(p.name for p in ours.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    theirs_config = json.loads((tmp_path / "theirs" / "config.json").read_text())
    ours_config = json.loads((ours / "config.json").read_text())
    assert ours_config == {k: v for k, v in theirs_config.items() if k != "_diffusers_version"}
    _same_tensors(ref, FluxTransformer2DModel.from_pretrained(ours))

    small_shards = dataclasses.replace(components.KINDS["flux_transformer"], max_shard_bytes=40_000)
    monkeypatch.setitem(components.KINDS, "flux_transformer", small_shards)
    components.save_folder(str(ours), module, params)
    index = json.loads((ours / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (ours / "diffusion_pytorch_model.safetensors").exists()
    assert sorted(p.name for p in ours.iterdir()) == sorted(
        ["config.json", "diffusion_pytorch_model.safetensors.index.json", *shards])
    _same_tensors(ref, FluxTransformer2DModel.from_pretrained(ours))
    assert json.loads((ours / "config.json").read_text()) == ours_config


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("name, guidance_embeds, billions", [("flux-dev", True, 11.90),
                                                             ("flux-schnell", False, 11.89)])
def test_full_size_by_shapes(name, guidance_embeds, billions):
    """Flux.1-dev / -schnell: our presets are their configs, and our param tree (`jax.eval_shape`, no memory)
    has as many tensors and parameters as diffusers' model built on the meta device."""
    config = {**FLUX_DEV_CONFIG, "guidance_embeds": guidance_embeds}
    assert flux.PRESETS[name] == flux.FluxConfig.from_diffusers_config(config)
    abstract = flux.abstract_params(flux.PRESETS[name])
    with torch.device("meta"):
        ref = FluxTransformer2DModel(**config)
    assert len(jax.tree.leaves(abstract)) == len(ref.state_dict())
    assert _count(abstract) == sum(p.numel() for p in ref.parameters())
    assert round(_count(abstract) / 1e9, 2) == billions


def test_attention_kernels_and_remat_keep_the_outputs_and_gradients():
    """Our own implementations against each other on the tiny dev model (diffusers has neither): the Pallas
    splash kernel (interpret mode on CPU; RoPE applied before it) and XLA's attention equal the einsum
    reference within fp32 rounding of a 16-wide softmax (1e-5); remat per block recomputes the same
    forward, so its gradients equal the plain ones to rounding (1e-5 of their scale)."""
    ref = _tiny_reference(guidance_embeds=True)
    state = convert.normalize_state_dict({k: v.numpy() for k, v in ref.state_dict().items()})
    cfg = flux.FluxConfig(**TINY, guidance_embeds=True)
    params = convert.state_dict_to_params(state, flux.abstract_params(cfg))
    inputs = _inputs(TINY, 2, LATENT_HW, TEXT_LEN, realistic=True, seed=3)
    expected = _our_output(flux.FluxTransformer2DModel(cfg, attention_impl="einsum"), params, inputs)
    for impl in ("dot_product", "pallas"):
        out = _our_output(flux.FluxTransformer2DModel(cfg, attention_impl=impl), params, inputs)
        assert _err(out, expected) < TIGHT_TOL, impl

    x, context, pooled, t, img_ids, txt_ids, guidance = inputs

    def grads(remat: bool):
        module = flux.FluxTransformer2DModel(cfg, attention_impl="einsum", remat=remat)
        def loss(p):
            out = module.apply({"params": p}, x, context, pooled, t, img_ids, txt_ids, jnp.asarray(guidance))
            return jnp.mean(out**2)

        return jax.jit(jax.grad(loss))(params)

    plain, checkpointed = grads(False), grads(True)
    scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(plain))
    pairs = zip(jax.tree.leaves(plain), jax.tree.leaves(checkpointed))
    worst = max(float(np.abs(a - b).max()) for a, b in pairs)
    assert worst <= 1e-5 * scale
