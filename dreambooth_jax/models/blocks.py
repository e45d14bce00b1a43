"""Convolutional building blocks shared by the UNet and the VAE (diffusers' `resnet.py`), NHWC."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dreambooth_jax.kernels import choose
from dreambooth_jax.kernels.batch_parallel import batch_parallel
from dreambooth_jax.kernels.norm import group_norm


class GroupNorm(nn.Module):
    """GroupNorm with statistics in float32 whatever the compute dtype (as PyTorch autocast does), optionally
    followed by SiLU (`activation="silu"`, the norm -> SiLU pairs of every ResNet block).

    `fused`: one Pallas kernel per direction (`dreambooth_jax.kernels.group_norm`, SiLU computed in float32)
    instead of XLA's ops; same params, same values up to rounding. A bool, or "auto"/"on"/"off" decided when
    traced (`kernels.choose.fused_norm`: auto is on for GPU and TPU).
    """

    num_groups: int
    epsilon: float
    activation: str | None = None
    fused: bool | str = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
        if choose.fused_norm(self.fused):
            kernel = functools.partial(group_norm, num_groups=self.num_groups, eps=self.epsilon,
                                       activation=self.activation)
            return batch_parallel(kernel, x, scale, bias).astype(self.dtype)
        xf = x.astype(jnp.float32).reshape(*x.shape[:-1], self.num_groups, c // self.num_groups)
        axes = tuple(range(1, xf.ndim - 2)) + (xf.ndim - 1,)
        mean = xf.mean(axis=axes, keepdims=True)
        var = jnp.square(xf - mean).mean(axis=axes, keepdims=True)
        xf = ((xf - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
        y = (xf * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)
        return nn.silu(y) if self.activation == "silu" else y


class PointwiseConv(nn.Module):
    """A 1x1 convolution (stride 1, no padding) as a matmul over channels, with `nn.Conv`'s parameters (kernel
    [1, 1, in, out], bias [out]) and initialisers.

    Why not `nn.Conv`: XLA's SPMD partitioner (jaxlib 0.10.2) miscomputes a 1x1 convolution whose kernel is
    batched by `jax.vmap` (several subjects' weights) and split over a mesh axis: results off by O(1) where a
    3x3 one, or a matmul, is exact. The same product as a matmul is partitioned correctly."""

    features: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (1, 1, x.shape[-1], self.features),
                            self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), self.param_dtype)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        return jnp.einsum("...c,cd->...d", x, kernel[0, 0]) + bias


def conv(features: int, kernel: int, *, stride: int = 1, padding: int | None = None, dtype, param_dtype,
         name: str):
    """A PyTorch-style `nn.Conv2d` (symmetric padding, default `kernel // 2`) as a Flax `nn.Conv` (1x1 ones as
    `PointwiseConv`)."""
    pad = kernel // 2 if padding is None else padding
    if kernel == 1 and stride == 1 and pad == 0:
        return PointwiseConv(features, dtype=dtype, param_dtype=param_dtype, name=name)
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
    )


class ResnetBlock2D(nn.Module):
    """diffusers `ResnetBlock2D` (default time-embedding norm): x [B, H, W, C], temb [B, T] or None."""

    out_channels: int
    groups: int = 32
    eps: float = 1e-6
    use_temb: bool = True
    output_scale_factor: float = 1.0
    fused_norm: bool | str = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb=None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        norm = functools.partial(GroupNorm, self.groups, self.eps, "silu", self.fused_norm, **kw)
        h = conv(self.out_channels, 3, **kw, name="conv1")(norm(name="norm1")(x))
        if self.use_temb:
            t = nn.Dense(self.out_channels, **kw, name="time_emb_proj")(nn.silu(temb))
            h = h + t[:, None, None, :]
        h = conv(self.out_channels, 3, **kw, name="conv2")(norm(name="norm2")(h))
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, **kw, name="conv_shortcut")(x)
        out = x.astype(h.dtype) + h
        return out if self.output_scale_factor == 1.0 else out / self.output_scale_factor


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv (`use_conv=True`); `padding=0` pads right/bottom only, as the VAE encoder does."""

    out_channels: int
    padding: int = 1
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        if self.padding == 0:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return conv(self.out_channels, 3, stride=2, padding=self.padding, dtype=self.dtype,
                    param_dtype=self.param_dtype, name="conv")(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour x2 (or to `output_size`) followed by a 3x3 conv."""

    out_channels: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, output_size: tuple[int, int] | None = None):
        b, h, w, c = x.shape
        if output_size is None or tuple(output_size) == (2 * h, 2 * w):
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        else:  # PyTorch's `interpolate(mode="nearest")`: source index floor(i * in / out)
            rows = (np.arange(output_size[0]) * h) // output_size[0]
            cols = (np.arange(output_size[1]) * w) // output_size[1]
            x = x[:, rows][:, :, cols]
        return conv(self.out_channels, 3, dtype=self.dtype, param_dtype=self.param_dtype, name="conv")(x)
