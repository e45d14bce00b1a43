"""The UNet's transformer and down/mid/up blocks (diffusers' `unet_2d_blocks.py`, `transformer_2d.py`)."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from dreambooth_jax.models.attention import Attention
from dreambooth_jax.models.blocks import Downsample2D, GroupNorm, ResnetBlock2D, Upsample2D, conv


class GEGLU(nn.Module):
    """`proj` to 2x the inner width, then value * gelu(gate) (exact erf gelu, as PyTorch)."""

    inner_dim: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(2 * self.inner_dim, dtype=self.dtype, param_dtype=self.param_dtype, name="proj")(x)
        value, gate = jnp.split(h, 2, axis=-1)
        return value * nn.gelu(gate, approximate=False)


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm self-attention, cross-attention and GEGLU feed-forward, each with a residual."""

    dim: int
    heads: int
    dim_head: int
    upcast_attention: bool = False
    attention_impl: str = "einsum"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attn = dict(heads=self.heads, dim_head=self.dim_head, out_dim=self.dim, upcast=self.upcast_attention,
                    attention_impl=self.attention_impl, **kw)
        norm = lambda name: nn.LayerNorm(epsilon=1e-5, name=name, **kw)  # noqa: E731
        x = x + Attention(**attn, name="attn1")(norm("norm1")(x))
        x = x + Attention(**attn, name="attn2")(norm("norm2")(x), context)
        return x + FeedForward(self.dim, **kw, name="ff")(norm("norm3")(x))


class FeedForward(nn.Module):
    """`net.0` = GEGLU, `net.1` = dropout (a no-op here), `net.2` = the output projection."""

    dim: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = GEGLU(4 * self.dim, **kw, name="net_0")(x)
        return nn.Dense(self.dim, **kw, name="net_2")(h)


class Transformer2DModel(nn.Module):
    """GroupNorm, `proj_in` (1x1 conv, or linear with `use_linear_projection`), transformer blocks,
    `proj_out`, residual. x [B, H, W, C]; context [B, S, D]."""

    heads: int
    dim_head: int
    num_layers: int = 1
    groups: int = 32
    use_linear_projection: bool = False
    upcast_attention: bool = False
    attention_impl: str = "einsum"
    fused_norm: bool | str = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, h, w, c = x.shape
        inner = self.heads * self.dim_head
        residual = x
        x = GroupNorm(self.groups, 1e-6, fused=self.fused_norm, **kw, name="norm")(x)
        if self.use_linear_projection:
            x = nn.Dense(inner, **kw, name="proj_in")(x.reshape(b, h * w, c))
        else:
            x = conv(inner, 1, **kw, name="proj_in")(x).reshape(b, h * w, inner)
        for i in range(self.num_layers):
            x = BasicTransformerBlock(
                inner, self.heads, self.dim_head, self.upcast_attention, self.attention_impl, **kw,
                name=f"transformer_blocks_{i}",
            )(x, context)
        if self.use_linear_projection:
            x = nn.Dense(c, **kw, name="proj_out")(x).reshape(b, h, w, c)
        else:
            x = conv(c, 1, **kw, name="proj_out")(x.reshape(b, h, w, inner))
        return x + residual.astype(x.dtype)


class BlockSpec(nn.Module):
    """Fields shared by the down, mid and up blocks; `heads` is None for blocks without attention."""

    out_channels: int
    num_layers: int
    groups: int
    eps: float
    heads: int | None = None
    transformer_layers: int = 1
    use_linear_projection: bool = False
    upcast_attention: bool = False
    attention_impl: str = "einsum"
    fused_norm: bool | str = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def resnet(self, i: int, output_scale_factor: float = 1.0):
        return ResnetBlock2D(self.out_channels, self.groups, self.eps,
                             output_scale_factor=output_scale_factor, fused_norm=self.fused_norm,
                             dtype=self.dtype, param_dtype=self.param_dtype, name=f"resnets_{i}")

    def attention(self, i: int):
        return Transformer2DModel(
            self.heads, self.out_channels // self.heads, self.transformer_layers, self.groups,
            self.use_linear_projection, self.upcast_attention, self.attention_impl, self.fused_norm,
            dtype=self.dtype, param_dtype=self.param_dtype, name=f"attentions_{i}",
        )


class DownBlock(BlockSpec):
    """`DownBlock2D` (heads None) or `CrossAttnDownBlock2D`. Returns (h, skip states)."""

    add_downsample: bool = True
    downsample_padding: int = 1

    @nn.compact
    def __call__(self, h, temb, context):
        skips = []
        for i in range(self.num_layers):
            h = self.resnet(i)(h, temb)
            if self.heads is not None:
                h = self.attention(i)(h, context)
            skips.append(h)
        if self.add_downsample:
            h = Downsample2D(self.out_channels, self.downsample_padding, dtype=self.dtype,
                             param_dtype=self.param_dtype, name="downsamplers_0")(h)
            skips.append(h)
        return h, tuple(skips)


class MidBlock(BlockSpec):
    """`UNetMidBlock2DCrossAttn`: resnet, then (transformer, resnet) pairs."""

    output_scale_factor: float = 1.0

    @nn.compact
    def __call__(self, h, temb, context):
        h = self.resnet(0, self.output_scale_factor)(h, temb)
        for i in range(self.num_layers):
            h = self.attention(i)(h, context)
            h = self.resnet(i + 1, self.output_scale_factor)(h, temb)
        return h


class UpBlock(BlockSpec):
    """`UpBlock2D` (heads None) or `CrossAttnUpBlock2D`: each resnet eats one skip state (last first)."""

    add_upsample: bool = True
    upsample_size: tuple[int, int] | None = None  # the skip's size, for odd latent sizes

    @nn.compact
    def __call__(self, h, skips, temb, context):
        for i in range(self.num_layers):
            h = jnp.concatenate([h, skips[-1 - i].astype(h.dtype)], axis=-1)
            h = self.resnet(i)(h, temb)
            if self.heads is not None:
                h = self.attention(i)(h, context)
        if self.add_upsample:
            h = Upsample2D(self.out_channels, dtype=self.dtype, param_dtype=self.param_dtype,
                           name="upsamplers_0")(h, self.upsample_size)
        return h
