"""Flax AutoencoderKL vs diffusers' PyTorch AutoencoderKL (CPU, float32), weights through our converter."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dreambooth_jax.models.vae import FLUX_VAE, AutoencoderKL, VAEConfig, abstract_params, sample_latents
from dreambooth_jax.weights import convert, safetensors_io

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

# fp32 parity, max abs error <= ATOL_FP32 * max(1, output scale) and <= 1e-4 of the output scale. XLA and
# PyTorch sum convolutions in different orders: measured 1e-6 (encode, scale ~0.9) and 9e-6 (decode, scale
# ~3.9), where PyTorch fp32 itself is 7.5e-6 away from PyTorch fp64 on the decode.
ATOL_FP32 = 1e-5
RTOL_FP32 = 1e-4
# bf16 compute with fp32 params, max abs error relative to the output scale: measured 0.03 (PyTorch's own
# bf16 VAE is 0.02-0.03 away from its fp32 on the same inputs).
RTOL_BF16 = 8e-2


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x, np.float32).transpose(0, 3, 1, 2)))


def _nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


def _torch_state(vae) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in vae.state_dict().items()}


def _perturb_norms(vae, seed: int = 0) -> None:
    """diffusers initialises GroupNorm to (1, 0); random affine params make the weight mapping visible."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn(p.shape, generator=gen))


def _apply_fns(vae: AutoencoderKL):
    """(encode, decode) jitted once each."""
    encode = jax.jit(lambda p, x: vae.apply({"params": p}, x, method=vae.encode))
    decode = jax.jit(lambda p, z: vae.apply({"params": p}, z, method=vae.decode))
    return encode, decode


def _max_err(a, b) -> tuple[float, float]:
    """(max abs error, max abs error / max abs reference)."""
    err = float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
    return err, err / float(np.max(np.abs(b)))


def _assert_fp32_close(out, ref, what: str) -> None:
    err, rel = _max_err(out, ref)
    scale = float(np.max(np.abs(ref)))
    assert err <= ATOL_FP32 * max(1.0, scale) and rel <= RTOL_FP32, (
        f"{what}: max abs error {err:.2e} (relative to output scale {scale:.2f}: {rel:.2e})")


@pytest.fixture(scope="module")
def sd1(tiny_pipelines, tmp_path_factory):
    """The sd1 fixture's VAE with random norm params, saved by diffusers and loaded both ways."""
    ref = diffusers.AutoencoderKL.from_pretrained(tiny_pipelines["sd1"], subfolder="vae")
    _perturb_norms(ref)
    path = str(tmp_path_factory.mktemp("vae"))
    ref.save_pretrained(path, safe_serialization=True)
    ref = diffusers.AutoencoderKL.from_pretrained(path).eval()
    with open(os.path.join(path, "config.json")) as f:
        config = VAEConfig.from_diffusers_config(json.load(f))
    state = convert.normalize_state_dict(safetensors_io.load_file(os.path.join(path,
                                                                               "diffusion_pytorch_model.safetensors")))
    params = convert.state_dict_to_params(state, abstract_params(config), source=path)
    vae = AutoencoderKL(config)
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (2, 64, 64, 3)).astype(np.float32)
    latents = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    with torch.no_grad():
        dist = ref.encode(_nchw(images)).latent_dist
        ref_out = dict(mean=_nhwc(dist.mean), logvar=_nhwc(dist.logvar),
                       decoded=_nhwc(ref.decode(_nchw(latents)).sample))
    encode, decode = _apply_fns(vae)
    return dict(config=config, params=params, state=state, vae=vae, encode=encode, decode=decode,
                images=images, latents=latents, ref=ref_out)


@pytest.fixture(scope="module")
def sd1_out(sd1):
    mean, logvar = sd1["encode"](sd1["params"], sd1["images"])
    return dict(mean=mean, logvar=logvar, decoded=sd1["decode"](sd1["params"], sd1["latents"]))


@pytest.mark.parametrize("name", ["mean", "logvar", "decoded"])
def test_matches_diffusers_fp32(sd1, sd1_out, name):
    out, ref = sd1_out[name], sd1["ref"][name]
    assert out.shape == ref.shape and out.dtype == jnp.float32
    _assert_fp32_close(out, ref, name)


def test_sample_latents_formula(sd1, sd1_out):
    # diffusers is optional (importorskip above), and a top-level import after that call would be E402
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    mean, logvar = sd1_out["mean"], sd1_out["logvar"]
    rng = jax.random.PRNGKey(3)
    noise = np.asarray(jax.random.normal(rng, mean.shape, mean.dtype))
    ref = DiagonalGaussianDistribution(torch.cat([_nchw(mean), _nchw(logvar)], dim=1))
    expected = _nhwc(ref.mean + ref.std * _nchw(noise))
    np.testing.assert_allclose(sample_latents(mean, logvar, rng), expected, rtol=1e-6, atol=1e-6)
    other = sample_latents(mean, logvar, jax.random.PRNGKey(4))
    assert float(jnp.mean(jnp.abs(other - expected))) > 0.1


@pytest.mark.parametrize("bias, expected", [(100.0, 20.0), (-100.0, -30.0)])
def test_logvar_is_clipped(sd1, bias, expected):
    b = np.array(sd1["params"]["quant_conv"]["bias"])
    b[sd1["config"].latent_channels :] = bias  # the logvar half of the moments
    params = dict(sd1["params"], quant_conv=dict(sd1["params"]["quant_conv"], bias=b))
    _, logvar = sd1["encode"](params, sd1["images"])
    np.testing.assert_array_equal(logvar, expected)


def test_bf16_compute_close_to_fp32(sd1, sd1_out):
    vae = AutoencoderKL(sd1["config"], dtype=jnp.bfloat16)
    encode, decode = _apply_fns(vae)
    mean, logvar = encode(sd1["params"], sd1["images"])
    decoded = decode(sd1["params"], sd1["latents"])
    for name, out in (("mean", mean), ("logvar", logvar), ("decoded", decoded)):
        assert out.dtype == jnp.float32 and np.isfinite(np.asarray(out)).all()
        _, rel = _max_err(out, sd1_out[name])
        assert rel <= RTOL_BF16, f"bf16 {name}: max error {rel:.2e} of the output scale"


def test_deprecated_attention_names_load(sd1):
    renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    old = {}
    for key, value in sd1["state"].items():
        for new_name, old_name in renames.items():
            marker = f".attentions.0.{new_name}."
            if marker in key:
                key = key.replace(marker, f".attentions.0.{old_name}.")
                if old_name in ("value", "proj_attn") and value.ndim == 2:  # 1x1-conv-shaped weights
                    value = value[:, :, None, None]
        old[key] = value
    assert "encoder.mid_block.attentions.0.query.weight" in old
    params = convert.state_dict_to_params(convert.normalize_state_dict(old), abstract_params(sd1["config"]))
    jax.tree.map(np.testing.assert_array_equal, params, sd1["params"])


def _torch_shapes(model) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _flax_torch_shapes(config: VAEConfig) -> dict[str, tuple[int, ...]]:
    flat = jax.tree_util.tree_flatten_with_path(abstract_params(config))[0]
    out = {}
    for path, leaf in flat:
        names = tuple(p.key for p in path)
        out[convert.torch_key(names)] = convert.to_torch_layout(names, np.empty(leaf.shape, np.int8)).shape
    return out


def test_config_round_trip(tiny_pipelines):
    with open(os.path.join(tiny_pipelines["sd1"], "vae", "config.json")) as f:
        raw = json.load(f)
    config = VAEConfig.from_diffusers_config(raw)
    assert config.block_out_channels == (8, 16, 16, 16) and config.scaling_factor == 0.18215
    d = config.to_diffusers_config()
    assert d["_class_name"] == "AutoencoderKL"
    assert VAEConfig.from_diffusers_config(json.loads(json.dumps(d))) == config
    rebuilt = diffusers.AutoencoderKL.from_config(d)
    original = diffusers.AutoencoderKL.from_config(raw)
    assert _torch_shapes(rebuilt) == _torch_shapes(original) == _flax_torch_shapes(config)
    for key in ("scaling_factor", "latent_channels", "norm_num_groups", "force_upcast", "shift_factor"):
        assert rebuilt.config[key] == original.config[key]


@pytest.mark.parametrize(
    "key, value",
    [("down_block_types", ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]),
     ("up_block_types", ["UpBlock2D"] * 2), ("act_fn", "gelu"),
     ("_class_name", "AutoencoderKLTemporalDecoder"), ("latents_mean", [0.0] * 4), ("norm_num_groups", 3)],
)
def test_config_rejects_unsupported(key, value):
    d = dict(down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
             block_out_channels=[8, 16], norm_num_groups=4, _diffusers_version="0.42.0", _name_or_path="x")
    VAEConfig.from_diffusers_config(d)  # valid as it stands
    with pytest.raises(ValueError, match=key):
        VAEConfig.from_diffusers_config({**d, key: value})


@pytest.fixture(scope="module")
def shifted():
    """A tiny random VAE as Flux.1's: 16 latent channels, its shift and scale, no quant convs; also no
    mid-block attention."""
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16), latent_channels=16, norm_num_groups=4, sample_size=32,
        scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
        mid_block_add_attention=False,
    ).eval()
    _perturb_norms(ref, seed=1)
    config = VAEConfig.from_diffusers_config(dict(ref.config))
    params = convert.state_dict_to_params(_torch_state(ref), abstract_params(config))
    return ref, config, params


def test_shift_factor_and_no_quant_conv(shifted):
    ref, config, params = shifted
    assert config.shift_factor == 0.1159 and not config.use_quant_conv and not config.use_post_quant_conv
    assert "quant_conv" not in params and "post_quant_conv" not in params
    latent_fields = ("latent_channels", "scaling_factor", "shift_factor", "use_quant_conv",
                     "use_post_quant_conv")
    assert [getattr(FLUX_VAE, f) for f in latent_fields] == [getattr(config, f) for f in latent_fields]
    assert "attentions_0" not in params["encoder"]["mid_block"]
    vae = AutoencoderKL(config)
    encode, decode = _apply_fns(vae)
    rng = np.random.default_rng(1)
    images = rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    mean, logvar = encode(params, images)
    with torch.no_grad():
        dist = ref.encode(_nchw(images)).latent_dist
        # What Flux's training and sampling do with the latents.
        scaled_ref = (dist.mean - ref.config.shift_factor) * ref.config.scaling_factor
        decoded_ref = ref.decode(scaled_ref / ref.config.scaling_factor + ref.config.shift_factor).sample
    _assert_fp32_close(mean, _nhwc(dist.mean), "mean")
    _assert_fp32_close(logvar, _nhwc(dist.logvar), "logvar")
    scaled = vae.scale_latents(mean)
    np.testing.assert_allclose(scaled, _nhwc(scaled_ref), rtol=1e-5, atol=1e-5)
    decoded = decode(params, vae.unscale_latents(scaled))
    _assert_fp32_close(decoded, _nhwc(decoded_ref), "decoded")


def test_scale_latents_without_shift(sd1):
    vae, z = sd1["vae"], jnp.asarray(sd1["latents"])
    np.testing.assert_allclose(vae.scale_latents(z), z * 0.18215, rtol=1e-6)
    np.testing.assert_allclose(vae.unscale_latents(vae.scale_latents(z)), z, rtol=1e-5, atol=1e-6)
