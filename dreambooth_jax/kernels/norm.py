"""Fused GroupNorm (+ SiLU) for NHWC activations, forward and backward as Pallas kernels.

    y = act((x - mean_g) * rsqrt(var_g + eps) * scale + bias)     statistics in float32 per (sample, group)

XLA computes GroupNorm + SiLU as several passes over the activation (mean, variance, normalise, activate,
and as many again backward), each reading or writing HBM; here each direction is two passes:

  forward:  stats  (read x)                 -> per-channel partial means and M2, combined into group stats
            apply  (read x, write y)
  backward: stats  (read x, dy)             -> per-channel sums of dz and dz * x_hat
            apply  (read x, dy, write dx)   (z and x_hat are recomputed, nothing activation-sized is saved)

Every kernel is a parallel grid over (sample, row block, channel block), so one structure lowers on TPU
(Mosaic), GPU (Triton: power-of-two blocks) and in interpret mode on CPU. Row blocks need not divide H * W:
the rows past the end are masked out of every sum, and writes past it are dropped. The partial statistics
(a few floats per channel and row block) are combined in plain JAX with Chan's parallel formula, which keeps
the variance as accurate as a two-pass computation (no E[x^2] - E[x]^2 cancellation).

`group_norm_reference` is the same function in plain jax.numpy (the tests compare the two).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from dreambooth_jax.kernels import choose

ACTIVATIONS = (None, "silu")


def group_norm_reference(x, scale, bias, *, num_groups: int, eps: float, activation: str | None = None):
    """GroupNorm over [B, ..., C] (channels last) with float32 statistics, then the optional activation;
    output in x's dtype."""
    _check(x, scale, num_groups, activation)
    c = x.shape[-1]
    xf = x.astype(jnp.float32).reshape(x.shape[0], -1, num_groups, c // num_groups)
    mean = xf.mean(axis=(1, 3), keepdims=True)
    var = jnp.square(xf - mean).mean(axis=(1, 3), keepdims=True)
    y = ((xf - mean) * jax.lax.rsqrt(var + eps)).reshape(x.shape)
    y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return (jax.nn.silu(y) if activation == "silu" else y).astype(x.dtype)


def group_norm(x, scale, bias, *, num_groups: int, eps: float, activation: str | None = None,
               interpret: bool | None = None):
    """GroupNorm (+ activation) of NHWC `x` [B, H, W, C] (or [B, L, C]) with Pallas kernels.

    Args:
      x: activations, float32 or bfloat16 (float16 works too); statistics are float32 whatever its dtype.
      scale, bias: [C] affine parameters (any float dtype; gradients come back in theirs).
      num_groups: groups of C // num_groups consecutive channels.
      eps: added to the variance.
      activation: None or "silu" (applied after the affine transform, in float32).
      interpret: run the kernels in Pallas interpret mode; None: on CPU only.

    Returns:
      y with x's shape and dtype. Differentiable in x, scale and bias (`jax.custom_vjp`).
    """
    _check(x, scale, num_groups, activation)
    if interpret is None:
        interpret = choose.backend() == "cpu"
    return _group_norm(x, scale, bias, num_groups, float(eps), activation, bool(interpret))


def _check(x, scale, num_groups, activation):
    c = x.shape[-1]
    if x.ndim < 3 or c % num_groups:
        raise ValueError(f"group_norm wants [B, ..., C] with C divisible by num_groups; got {x.shape}, "
                         f"num_groups={num_groups}")
    if scale.shape != (c,):
        raise ValueError(f"scale must be [{c}], got {scale.shape}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


# ---------------------------------------------------------------------------------------------- blocks


def _tiling(rows: int, channels: int, interpret: bool) -> tuple[int, int]:
    """(row block, channel block) for a [rows, channels] slab of one sample.

    TPU: the channel block is a multiple of 128 dividing C (else all of C) and the row block a power of
    two >= 16 (bf16 sublane tiles), or all rows; blocks of ~1 MiB of float32 (a few are live at once,
    double-buffered, well inside scoped VMEM). GPU (Triton): power-of-two blocks of <= 8192 elements,
    which a program keeps in registers. Interpret mode (CPU) wants few grid steps, so it takes TPU's.
    """
    if _backend(interpret) == "gpu":
        cb = min(256, channels & -channels)  # the largest power of two dividing C
        rb = max(1, min(8192 // cb, pl.next_power_of_2(rows)))
        return rb, cb
    cb = next((n for n in (512, 384, 256, 128) if channels % n == 0), channels)
    rb = max(16, 1 << int(math.log2(max(1, (1 << 18) // cb))))
    return (rows if rows <= rb else rb), cb


def _backend(interpret: bool) -> str:
    return "interpret" if interpret else choose.backend()


def _compiler_params(backend: str):
    if backend == "tpu":  # each backend's Pallas module loads only on that backend
        from jax.experimental.pallas import tpu as pltpu

        return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel"))
    if backend == "gpu":  # Triton (Triton compiler params select it; JAX's default on GPU is Mosaic GPU)
        from jax.experimental.pallas import triton as pltriton

        return pltriton.CompilerParams(num_warps=4, num_stages=1)
    return None


def _call(kernel, x3, extra_row_inputs, per_channel, out_rows, out_dtype, partial: bool, interpret: bool):
    """Runs `kernel` over a grid (B, row blocks, channel blocks) of the [B, L, C] inputs.

    `extra_row_inputs`: more [B, L, C] arrays (dy); `per_channel`: a [B, K, C] float32 array of per-channel
    coefficients, or None. Returns [B, L, C] of `out_dtype` (`partial` False), or [B, row blocks, out_rows, C]
    float32 partial sums (`partial` True).
    """
    b, length, c = x3.shape
    rb, cb = _tiling(length, c, interpret)
    grid = (b, pl.cdiv(length, rb), c // cb)
    rows = pl.BlockSpec((1, rb, cb), lambda i, r, j: (i, r, j))
    inputs, in_specs = [x3, *extra_row_inputs], [rows] * (1 + len(extra_row_inputs))
    if per_channel is not None:
        inputs.append(per_channel)
        in_specs.append(pl.BlockSpec((1, per_channel.shape[1], cb), lambda i, r, j: (i, 0, j)))
    if partial:
        out_shape = jax.ShapeDtypeStruct((b, grid[1], out_rows, c), jnp.float32)
        out_spec = pl.BlockSpec((1, 1, out_rows, cb), lambda i, r, j: (i, r, 0, j))
    else:
        out_shape = jax.ShapeDtypeStruct((b, length, c), out_dtype)
        out_spec = rows
    return pl.pallas_call(
        functools.partial(kernel, length=length, rb=rb),
        grid=grid,
        in_specs=in_specs,
        out_specs=out_spec,
        out_shape=out_shape,
        compiler_params=_compiler_params(_backend(interpret)),
        interpret=interpret,
    )(*inputs)


def _valid_rows(length: int, rb: int, shape):
    """[rb, cb] bool: which rows of this row block lie inside the sample (the last block may overhang)."""
    row = pl.program_id(1) * rb + jax.lax.broadcasted_iota(jnp.int32, shape, 0)
    return row < length


# --------------------------------------------------------------------------------------------- kernels


def _stats_kernel(x_ref, out_ref, *, length, rb):
    """Per channel of one row block: [mean, M2] over its valid rows."""
    x = x_ref[0].astype(jnp.float32)  # [rb, cb]
    valid = _valid_rows(length, rb, x.shape)
    n = jnp.minimum(rb, length - pl.program_id(1) * rb).astype(jnp.float32)
    mean = jnp.sum(jnp.where(valid, x, 0.0), axis=0, keepdims=True) / n  # [1, cb]
    m2 = jnp.sum(jnp.where(valid, jnp.square(x - mean), 0.0), axis=0, keepdims=True)
    out_ref[0, 0, 0:1, :] = mean
    out_ref[0, 0, 1:2, :] = m2


def _normalize(x_ref, coef_ref):
    """(x_hat, z) of one block: x_hat = (x - mean) * rstd, z = x_hat * scale + bias, in float32."""
    x_hat = (x_ref[0].astype(jnp.float32) - _row(coef_ref, 0)) * _row(coef_ref, 1)
    return x_hat, x_hat * _row(coef_ref, 2) + _row(coef_ref, 3)


def _row(coef_ref, i: int):
    """[1, cb] coefficient row i of the block: 0 mean, 1 rstd, 2 scale, 3 bias, 4 c1, 5 c2."""
    return coef_ref[0, i:i + 1, :]


def _silu_and_grad(z):
    s = jax.nn.sigmoid(z)
    return z * s, s * (1.0 + z * (1.0 - s))


def _apply_kernel(x_ref, coef_ref, y_ref, *, length, rb, activation):
    del length, rb
    _, z = _normalize(x_ref, coef_ref)
    y_ref[0] = (_silu_and_grad(z)[0] if activation == "silu" else z).astype(y_ref.dtype)


def _dz(dy_ref, z, activation):
    dy = dy_ref[0].astype(jnp.float32)
    return dy * _silu_and_grad(z)[1] if activation == "silu" else dy


def _grad_stats_kernel(x_ref, dy_ref, coef_ref, out_ref, *, length, rb, activation):
    """Per channel of one row block: [sum dz, sum dz * x_hat] over its valid rows (dz = dL/dz)."""
    x_hat, z = _normalize(x_ref, coef_ref)
    # rows past the end hold anything, NaN included: select, never scale
    valid = _valid_rows(length, rb, z.shape)
    dz = _dz(dy_ref, z, activation)
    out_ref[0, 0, 0:1, :] = jnp.sum(jnp.where(valid, dz, 0.0), axis=0, keepdims=True)
    out_ref[0, 0, 1:2, :] = jnp.sum(jnp.where(valid, dz * x_hat, 0.0), axis=0, keepdims=True)


def _grad_apply_kernel(x_ref, dy_ref, coef_ref, dx_ref, *, length, rb, activation):
    """dx = rstd * (dz * scale - c1 - x_hat * c2), with c1, c2 the group means of dx_hat and dx_hat *
    x_hat."""
    del length, rb
    x_hat, z = _normalize(x_ref, coef_ref)
    dz = _dz(dy_ref, z, activation)
    dx = _row(coef_ref, 1) * (dz * _row(coef_ref, 2) - _row(coef_ref, 4) - x_hat * _row(coef_ref, 5))
    dx_ref[0] = dx.astype(dx_ref.dtype)


# ------------------------------------------------------------------------------------- the custom vjp


_COEF_ROWS = 8  # mean, rstd, scale, bias, c1, c2, and padding to a power of two (Triton blocks)


def _coefficients(b, c, *rows):
    """[B, 8, C] float32 from per-sample [B, C] or shared [C] rows (the kernels' per-channel inputs)."""
    rows = [jnp.broadcast_to(jnp.asarray(r, jnp.float32), (b, c)) for r in rows]
    rows += [jnp.zeros((b, c), jnp.float32)] * (_COEF_ROWS - len(rows))
    return jnp.stack(rows, axis=1)


def _per_channel(group_values, c):
    """[B, G] -> [B, C]: each group's value on each of its channels."""
    return jnp.repeat(group_values, c // group_values.shape[1], axis=1)


def _group_stats(x3, num_groups, eps, interpret):
    """(mean, rstd) [B, G] float32 of [B, L, C] x, from the stats kernel's per-block partials."""
    b, length, c = x3.shape
    partial = _call(_stats_kernel, x3, [], None, 2, None, True, interpret)  # [B, nb, 2, C]
    rb = _tiling(length, c, interpret)[0]
    counts = np.minimum(rb, length - rb * np.arange(partial.shape[1])).astype(np.float32)  # rows per block
    counts = counts[None, :, None]
    means, m2s = partial[:, :, 0], partial[:, :, 1]  # [B, nb, C]
    # Chan et al.: combine the blocks, then the channels of a group (each over the same `length` rows).
    mean_c = jnp.sum(means * counts, axis=1) / length  # [B, C]
    m2_c = jnp.sum(m2s, axis=1) + jnp.sum(counts * jnp.square(means - mean_c[:, None]), axis=1)
    grouped = lambda a: a.reshape(b, num_groups, c // num_groups)  # noqa: E731
    mean_g = grouped(mean_c).mean(axis=2)  # [B, G]
    spread = jnp.sum(jnp.square(grouped(mean_c) - mean_g[..., None]), axis=2)
    m2_g = grouped(m2_c).sum(axis=2) + length * spread
    var_g = m2_g / (length * (c // num_groups))
    return mean_g, jax.lax.rsqrt(var_g + eps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _group_norm(x, scale, bias, num_groups, eps, activation, interpret):
    return _forward(x, scale, bias, num_groups, eps, activation, interpret)[0]


def _forward(x, scale, bias, num_groups, eps, activation, interpret):
    b, c = x.shape[0], x.shape[-1]
    x3 = x.reshape(b, -1, c)
    mean, rstd = _group_stats(x3, num_groups, eps, interpret)
    coef = _coefficients(b, c, _per_channel(mean, c), _per_channel(rstd, c), scale, bias)
    kernel = functools.partial(_apply_kernel, activation=activation)
    y = _call(kernel, x3, [], coef, None, x.dtype, False, interpret)
    return y.reshape(x.shape), (x, scale, bias, mean, rstd)


def _backward(num_groups, eps, activation, interpret, residuals, dy):
    x, scale, bias, mean, rstd = residuals
    b, c = x.shape[0], x.shape[-1]
    x3, dy3 = x.reshape(b, -1, c), dy.reshape(b, -1, c)
    coef = _coefficients(b, c, _per_channel(mean, c), _per_channel(rstd, c), scale, bias)
    stats = functools.partial(_grad_stats_kernel, activation=activation)
    sums = _call(stats, x3, [dy3], coef, 2, None, True, interpret).sum(axis=1)  # [B, 2, C]
    dz_sum, dz_xhat_sum = sums[:, 0], sums[:, 1]  # [B, C]
    # The group means of dx_hat = dz * scale and of dx_hat * x_hat, over (rows, channels of the group).
    n = x3.shape[1] * (c // num_groups)
    group_mean = lambda a: _per_channel(  # noqa: E731
        (a * scale.astype(jnp.float32)).reshape(b, num_groups, -1).sum(axis=2) / n, c)
    coef = coef.at[:, 4:6].set(jnp.stack([group_mean(dz_sum), group_mean(dz_xhat_sum)], axis=1))
    apply = functools.partial(_grad_apply_kernel, activation=activation)
    dx = _call(apply, x3, [dy3], coef, None, x.dtype, False, interpret).reshape(x.shape)
    return dx, dz_xhat_sum.sum(axis=0).astype(scale.dtype), dz_sum.sum(axis=0).astype(bias.dtype)


_group_norm.defvjp(_forward, _backward)
