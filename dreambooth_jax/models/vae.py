"""diffusers' `AutoencoderKL` (the Stable Diffusion VAE) in Flax, NHWC, parameter-compatible.

Submodule names mirror the PyTorch attribute paths (`encoder/down_blocks_0/resnets_1/conv1`,
`decoder/mid_block/attentions_0/to_q`), so `dreambooth_jax.weights.convert` maps weights by name alone.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dreambooth_jax.errors import UsageError
from dreambooth_jax.models.attention import Attention
from dreambooth_jax.models.blocks import Downsample2D, GroupNorm, ResnetBlock2D, Upsample2D, conv

_EPS = 1e-6  # every norm of the diffusers VAE (resnets, mid-block attention, conv_norm_out)
# Config keys of AutoencoderKL that change the latent space in ways this port does not implement.
_UNSUPPORTED_IF_SET = ("latents_mean", "latents_std")


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """The architecture of a diffusers `AutoencoderKL`; defaults are diffusers' own."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, ...] = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self):
        for name in ("down_block_types", "up_block_types", "block_out_channels", "sample_size"):
            if isinstance(getattr(self, name), list):  # JSON lists -> hashable tuples
                object.__setattr__(self, name, tuple(getattr(self, name)))
        n = len(self.block_out_channels)
        if self.act_fn not in ("silu", "swish"):  # diffusers maps both names to nn.SiLU
            raise UsageError(f"VAE config act_fn={self.act_fn!r}: only 'silu' is supported")
        for key, expected in (("down_block_types", "DownEncoderBlock2D"),
                              ("up_block_types", "UpDecoderBlock2D")):
            bad = [t for t in getattr(self, key) if t != expected]
            if bad:
                raise UsageError(f"VAE config {key}: unsupported block type {bad[0]!r}; only {expected!r}")
            if len(getattr(self, key)) != n:
                raise UsageError(f"VAE config {key} has {len(getattr(self, key))} entries, "
                                 f"block_out_channels {n}")
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise UsageError(f"VAE config norm_num_groups={self.norm_num_groups} does not divide "
                             f"block_out_channels={self.block_out_channels}")
        if self.layers_per_block < 1:
            raise UsageError(f"VAE config layers_per_block={self.layers_per_block}: must be >= 1")

    @classmethod
    def from_diffusers_config(cls, d: dict[str, Any]) -> VAEConfig:
        """From diffusers' `vae/config.json`; keys that are not architecture (`_class_name`...) are
        ignored."""
        if d.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
            raise UsageError(f"VAE config _class_name={d['_class_name']!r}: only 'AutoencoderKL' is "
                             "supported")
        for key in _UNSUPPORTED_IF_SET:
            if d.get(key) is not None:
                raise UsageError(f"VAE config {key}={d[key]!r}: per-channel latent statistics are not "
                                 "supported")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_diffusers_config(self) -> dict[str, Any]:
        """A config dict that `diffusers.AutoencoderKL.from_config` reads (tuples written as lists)."""
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
        return {"_class_name": "AutoencoderKL", **d}


# Stable Diffusion 1.x / 2.x and SDXL VAEs (their `vae/config.json`); SDXL differs only in scale.
SD_VAE = VAEConfig(
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    sample_size=512,
)
SDXL_VAE = dataclasses.replace(SD_VAE, sample_size=1024, scaling_factor=0.13025)
# Flux.1's (black-forest-labs/FLUX.1-dev `vae/`): 16 latent channels, latents (z - 0.1159) x 0.3611, no quant
# convs.
FLUX_VAE = dataclasses.replace(SD_VAE, sample_size=1024, latent_channels=16, scaling_factor=0.3611,
                               shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)


class MidBlockAttention(Attention):
    """diffusers' VAE mid-block `Attention`: GroupNorm, one-head self-attention over pixels, residual.

    A subclass, not a wrapper, so that `group_norm` and `to_q`... sit side by side as in PyTorch.
    """

    groups: int = 32
    fused_norm: bool | str = False

    @nn.compact
    def __call__(self, x):  # [B, H, W, C]
        b, h, w, c = x.shape
        y = GroupNorm(self.groups, _EPS, fused=self.fused_norm, dtype=self.dtype,
                      param_dtype=self.param_dtype, name="group_norm")(x)
        y = super().__call__(y.reshape(b, h * w, c)).reshape(b, h, w, c)
        return y + x.astype(y.dtype)  # rescale_output_factor is 1 in the VAE


class VAEMidBlock(nn.Module):
    """`UNetMidBlock2D` without time embedding: resnet, (attention, resnet) x 1."""

    channels: int
    groups: int
    add_attention: bool = True
    attention_impl: str = "einsum"
    fused_norm: bool | str = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(groups=self.groups, eps=_EPS, use_temb=False, fused_norm=self.fused_norm, dtype=self.dtype,
                  param_dtype=self.param_dtype)
        x = ResnetBlock2D(self.channels, **kw, name="resnets_0")(x)
        if self.add_attention:
            x = MidBlockAttention(
                heads=1, dim_head=self.channels, out_dim=self.channels, qkv_bias=True, upcast=True,
                attention_impl=self.attention_impl, groups=self.groups, fused_norm=self.fused_norm,
                dtype=self.dtype, param_dtype=self.param_dtype, name="attentions_0",
            )(x)
        return ResnetBlock2D(self.channels, **kw, name="resnets_1")(x)


class ResnetStack2D(nn.Module):
    """`layers` resnets, then optionally a resampler: diffusers' `DownEncoderBlock2D` (resample "down": a
    stride-2 conv with right/bottom padding) and `UpDecoderBlock2D` (resample "up": nearest x2 then a
    conv)."""

    out_channels: int
    layers: int
    groups: int
    resample: str | None = None  # "down", "up" or None (the last block of a stack)
    fused_norm: bool | str = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for j in range(self.layers):
            x = ResnetBlock2D(self.out_channels, self.groups, _EPS, use_temb=False,
                              fused_norm=self.fused_norm, **kw, name=f"resnets_{j}")(x)
        if self.resample == "down":
            x = Downsample2D(self.out_channels, padding=0, **kw, name="downsamplers_0")(x)
        elif self.resample == "up":
            x = Upsample2D(self.out_channels, **kw, name="upsamplers_0")(x)
        return x


class Encoder(nn.Module):
    """Images [B, H, W, in_channels] -> moments [B, H/f, W/f, 2 * latent_channels] (before quant_conv)."""

    config: VAEConfig
    attention_impl: str = "einsum"
    fused_norm: bool | str = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        channels, n = cfg.block_out_channels, len(cfg.block_out_channels)
        x = conv(channels[0], 3, **kw, name="conv_in")(x.astype(self.dtype))
        for i, c in enumerate(channels):
            x = ResnetStack2D(c, cfg.layers_per_block, cfg.norm_num_groups, "down" if i < n - 1 else None,
                              self.fused_norm, **kw, name=f"down_blocks_{i}")(x)
        x = VAEMidBlock(channels[-1], cfg.norm_num_groups, cfg.mid_block_add_attention, self.attention_impl,
                        self.fused_norm, **kw, name="mid_block")(x)
        x = GroupNorm(cfg.norm_num_groups, _EPS, "silu", self.fused_norm, **kw, name="conv_norm_out")(x)
        return conv(2 * cfg.latent_channels, 3, **kw, name="conv_out")(x)


class Decoder(nn.Module):
    """Latents [B, h, w, latent_channels] (after post_quant_conv) -> images [B, h*f, w*f, out_channels]."""

    config: VAEConfig
    attention_impl: str = "einsum"
    fused_norm: bool | str = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        channels, n = tuple(reversed(cfg.block_out_channels)), len(cfg.block_out_channels)
        x = conv(channels[0], 3, **kw, name="conv_in")(z.astype(self.dtype))
        x = VAEMidBlock(channels[0], cfg.norm_num_groups, cfg.mid_block_add_attention, self.attention_impl,
                        self.fused_norm, **kw, name="mid_block")(x)
        for i, c in enumerate(channels):
            x = ResnetStack2D(c, cfg.layers_per_block + 1, cfg.norm_num_groups, "up" if i < n - 1 else None,
                              self.fused_norm, **kw, name=f"up_blocks_{i}")(x)
        x = GroupNorm(cfg.norm_num_groups, _EPS, "silu", self.fused_norm, **kw, name="conv_norm_out")(x)
        return conv(cfg.out_channels, 3, **kw, name="conv_out")(x)


def sample_latents(mean, logvar, rng):
    """z ~ q(z | x) = N(mean, exp(logvar)): mean + exp(logvar / 2) * eps, eps ~ N(0, I) drawn from `rng`."""
    eps = jax.random.normal(rng, mean.shape, mean.dtype)
    return mean + jnp.exp(0.5 * logvar) * eps


class AutoencoderKL(nn.Module):
    """diffusers' `AutoencoderKL`, NHWC. Outputs are float32 whatever the compute `dtype`.

    Attributes:
      config: the architecture.
      dtype: compute dtype (GroupNorm statistics and attention softmax stay in float32).
      param_dtype: storage dtype of the params.
      attention_impl: the mid-block attention implementation, see `attention.ATTENTION_IMPLS`.
      fused_norm: GroupNorm (+ SiLU) as one Pallas kernel (`dreambooth_jax.kernels.group_norm`).
    """

    config: VAEConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_impl: str = "einsum"
    fused_norm: bool | str = False

    def setup(self):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.encoder = Encoder(cfg, self.attention_impl, self.fused_norm, **kw)
        self.decoder = Decoder(cfg, self.attention_impl, self.fused_norm, **kw)
        if cfg.use_quant_conv:
            self.quant_conv = conv(2 * cfg.latent_channels, 1, **kw, name="quant_conv")
        if cfg.use_post_quant_conv:
            self.post_quant_conv = conv(cfg.latent_channels, 1, **kw, name="post_quant_conv")

    def encode(self, images):
        """Images [B, H, W, C] in [-1, 1] -> (mean, logvar) of q(z | x), each [B, H/f, W/f, latent_channels].

        logvar is clipped to [-30, 20] as in diffusers' `DiagonalGaussianDistribution`.
        """
        h = self.encoder(images)
        if self.config.use_quant_conv:
            h = self.quant_conv(h)
        mean, logvar = jnp.split(h.astype(jnp.float32), 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, latents):
        """Unscaled latents [B, h, w, latent_channels] -> images [B, h*f, w*f, out_channels], about [-1,
        1]."""
        if self.config.use_post_quant_conv:
            latents = self.post_quant_conv(latents.astype(self.dtype))
        return self.decoder(latents).astype(jnp.float32)

    def scale_latents(self, z):
        """VAE latents -> diffusion-model latents: (z - shift_factor) * scaling_factor."""
        if self.config.shift_factor is not None:
            z = z - self.config.shift_factor
        return z * self.config.scaling_factor

    def unscale_latents(self, z):
        """Inverse of `scale_latents`: z / scaling_factor + shift_factor."""
        z = z / self.config.scaling_factor
        if self.config.shift_factor is not None:
            z = z + self.config.shift_factor
        return z

    def __call__(self, images, rng):
        """encode -> sample -> decode (creates every param; used for `init`)."""
        return self.decode(sample_latents(*self.encode(images), rng))


def abstract_params(config: VAEConfig) -> dict:
    """The float32 param tree of `AutoencoderKL(config)` as `jax.ShapeDtypeStruct`s (no memory used)."""
    size = 2 ** (len(config.block_out_channels) - 1)  # smallest image every downsampler accepts
    images = jnp.zeros((1, size, size, config.in_channels), jnp.float32)
    rng = jax.random.PRNGKey(0)
    return jax.eval_shape(lambda: AutoencoderKL(config).init(rng, images, rng)["params"])
