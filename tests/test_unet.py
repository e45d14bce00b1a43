"""UNet2DConditionModel parity with diffusers (fp32, CPU) on the tiny SD1 / SD2 / SDXL fixtures."""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from dreambooth_jax.models.unet import UNetConfig
from dreambooth_jax.pipeline import load_component

# fp32 parity: max abs error relative to the output scale. Measured ~1e-6 on all three fixtures.
PARITY_TOL = 1e-4
# bf16 compute with fp32 params, relative to the output scale (measured ~1e-2).
BF16_TOL = 5e-2


@functools.cache
def _load(path: str):
    return load_component(os.path.join(path, "unet"), "unet")


@functools.cache
def _torch_unet(path: str):
    from diffusers import UNet2DConditionModel as TorchUNet  # heavy (PyTorch): here only for the references

    return TorchUNet.from_pretrained(path, subfolder="unet").eval()


def _inputs(cfg: UNetConfig, size=(8, 8), batch=2, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, cfg.in_channels, *size)).astype(np.float32)  # NCHW, as diffusers
    t = np.array([10, 900][:batch] + [500] * (batch - 2), dtype=np.int64)
    ctx = rng.standard_normal((batch, 16, cfg.per_block("cross_attention_dim")[0])).astype(np.float32)
    added = {}
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        added = dict(text_embeds=rng.standard_normal((batch, pooled)).astype(np.float32),
                     time_ids=np.tile(np.array([[64, 64, 0, 0, 64, 64]], np.float32), (batch, 1)))
    return x, t, ctx, added


def _reference(path, x, t, ctx, added):
    import torch

    kwargs = {}
    if added:
        kwargs["added_cond_kwargs"] = {k: torch.tensor(v) for k, v in added.items()}
    with torch.no_grad():
        out = _torch_unet(path)(torch.tensor(x), torch.tensor(t), torch.tensor(ctx), **kwargs).sample
    return out.numpy().transpose(0, 2, 3, 1)


def _ours(module, params, x, t, ctx, added):
    apply = jax.jit(lambda p, *a, **k: module.apply({"params": p}, *a, **k))
    return np.asarray(apply(params, x.transpose(0, 2, 3, 1), t, ctx, **added), dtype=np.float32)


def _rel_err(a, b):
    return float(np.abs(a - b).max() / max(1.0, np.abs(b).max()))


@pytest.mark.parametrize("size", [(8, 8), (12, 10)])
def test_unet_matches_diffusers(tiny_pipelines, tiny_kind, size):
    """Batch of different timesteps; (12, 10) exercises odd sizes (upsampling to the skip's size)."""
    path = tiny_pipelines[tiny_kind]
    module, params = _load(path)
    x, t, ctx, added = _inputs(module.config, size)
    ref = _reference(path, x, t, ctx, added)
    assert _rel_err(_ours(module, params, x, t, ctx, added), ref) <= PARITY_TOL


def test_unet_scalar_timestep(tiny_pipelines):
    path = tiny_pipelines["sd1"]
    module, params = _load(path)
    x, _, ctx, added = _inputs(module.config)
    ref = _reference(path, x, np.array([321, 321]), ctx, added)
    assert _rel_err(_ours(module, params, x, np.int32(321), ctx, added), ref) <= PARITY_TOL


def test_sdxl_added_conditions_matter(tiny_pipelines):
    module, params = _load(tiny_pipelines["sdxl"])
    x, t, ctx, added = _inputs(module.config)
    base = _ours(module, params, x, t, ctx, added)
    added["time_ids"] = added["time_ids"] * 2
    assert np.abs(_ours(module, params, x, t, ctx, added) - base).max() > 1e-3
    with pytest.raises(ValueError, match="text_embeds and time_ids"):
        module.apply({"params": params}, x.transpose(0, 2, 3, 1), t, ctx)


def test_bf16_compute_close_to_fp32(tiny_pipelines):
    module, params = _load(tiny_pipelines["sdxl"])  # the family with every option
    x, t, ctx, added = _inputs(module.config)
    fp32 = _ours(module, params, x, t, ctx, added)
    bf16 = _ours(module.clone(dtype=jnp.bfloat16), params, x, t, ctx, added)
    assert _rel_err(bf16, fp32) <= BF16_TOL


def test_attention_implementations_agree(tiny_pipelines):
    module, params = _load(tiny_pipelines["sd2"])
    x, t, ctx, added = _inputs(module.config)
    ref = _ours(module, params, x, t, ctx, added)
    out = _ours(module.clone(attention_impl="dot_product"), params, x, t, ctx, added)
    assert np.abs(out - ref).max() <= 1e-5


def test_remat_same_outputs_and_gradients(tiny_pipelines):
    module, params = _load(tiny_pipelines["sdxl"])
    x, t, ctx, added = _inputs(module.config)
    x = x.transpose(0, 2, 3, 1)

    def loss_and_grad(m):
        loss = lambda p: jnp.mean(m.apply({"params": p}, x, t, ctx, **added) ** 2)  # noqa: E731
        return jax.jit(jax.value_and_grad(loss))(params)

    plain_loss, plain_grads = loss_and_grad(module)
    remat_loss, remat_grads = loss_and_grad(module.clone(remat=True))
    assert jax.tree.structure(plain_grads) == jax.tree.structure(remat_grads)
    np.testing.assert_allclose(remat_loss, plain_loss, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(remat_grads), jax.tree.leaves(plain_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_config_round_trip_and_errors(tiny_pipelines, tiny_kind):
    with open(os.path.join(tiny_pipelines[tiny_kind], "unet", "config.json")) as f:
        raw = json.load(f)
    cfg = UNetConfig.from_diffusers_config(raw)
    assert UNetConfig.from_diffusers_config(cfg.to_diffusers_config()) == cfg
    from diffusers import UNet2DConditionModel as TorchUNet

    torch_unet = TorchUNet.from_config(cfg.to_diffusers_config())
    assert torch_unet.config.block_out_channels == raw["block_out_channels"]
    with pytest.raises(ValueError, match="class_embed_type"):
        UNetConfig.from_diffusers_config({**raw, "class_embed_type": "timestep"})
    with pytest.raises(ValueError, match="unknown key `mystery_option`"):
        UNetConfig.from_diffusers_config({**raw, "mystery_option": 3})
    with pytest.raises(ValueError, match="down block type"):
        UNetConfig.from_diffusers_config({**raw,
                                          "down_block_types": ["SimpleDown"] * len(raw["down_block_types"])})


def test_param_names_mirror_diffusers(tiny_pipelines):
    """Every diffusers tensor has a Flax twin and vice versa (the loader would raise otherwise)."""
    module, params = _load(tiny_pipelines["sd1"])
    assert "down_blocks_0" in params and "attentions_0" in params["down_blocks_0"]
    assert params["down_blocks_0"]["attentions_0"]["proj_in"]["kernel"].shape[:2] == (1, 1)  # 1x1 conv (SD1)
    # Our config, written back in diffusers' terms, builds a diffusers UNet with exactly the checkpoint's
    # tensors.
    from diffusers import UNet2DConditionModel as TorchUNet

    torch_unet = TorchUNet.from_config(module.config.to_diffusers_config())
    on_disk = load_file(os.path.join(tiny_pipelines["sd1"], "unet", "diffusion_pytorch_model.safetensors"))
    theirs = {k: tuple(v.shape) for k, v in torch_unet.state_dict().items()}
    assert theirs == {k: v.shape for k, v in on_disk.items()}
