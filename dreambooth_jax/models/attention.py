"""Scaled dot-product attention with a switchable implementation, and diffusers' `Attention` layer."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from dreambooth_jax.errors import UsageError

# "einsum": plain XLA ops, runs anywhere, the reference. "dot_product": `jax.nn.dot_product_attention`,
# which picks its own backend (XLA, or cuDNN flash attention on a GPU where it applies). "cudnn": force
# cuDNN (GPU only, fp16/bf16).
ATTENTION_IMPLS = ("einsum", "dot_product", "cudnn")


def dot_product_attention(q, k, v, *, mask=None, implementation: str = "einsum", upcast: bool = True):
    """softmax(q k^T / sqrt(d) + mask) v.

    Args:
      q: [B, T, N, H] queries; k, v: [B, S, N, H].
      mask: optional bool array broadcastable to [B, N, T, S]; True where attending is allowed.
      implementation: one of `ATTENTION_IMPLS`.
      upcast: compute the scores and softmax in float32 (diffusers' `upcast_attention`/`upcast_softmax`);
        only the einsum path honours False, the others always accumulate in float32.

    Returns:
      [B, T, N, H] in q's dtype.
    """
    if implementation == "einsum":
        scale = 1.0 / math.sqrt(q.shape[-1])
        compute = jnp.float32 if upcast else q.dtype
        scores = jnp.einsum("btnh,bsnh->bnts", q.astype(compute), k.astype(compute)) * scale
        if mask is not None:
            scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
        probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(v.dtype)
        return jnp.einsum("bnts,bsnh->btnh", probs, v)
    if implementation in ("dot_product", "cudnn"):
        impl = None if implementation == "dot_product" else "cudnn"
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=impl)
    raise UsageError(f"unknown attention implementation {implementation!r}; expected one of {ATTENTION_IMPLS}")


class Attention(nn.Module):
    """diffusers' `Attention` projections (`to_q`, `to_k`, `to_v`, `to_out.0`) around the attention op.

    Self-attention when `context` is None, cross-attention otherwise. Inputs [B, T, C]; context [B, S, D].
    """

    heads: int
    dim_head: int
    out_dim: int
    qkv_bias: bool = False
    upcast: bool = True
    attention_impl: str = "einsum"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context=None):
        context = x if context is None else context
        inner = self.heads * self.dim_head
        dense = lambda features, bias, name: nn.Dense(  # noqa: E731
            features, use_bias=bias, dtype=self.dtype, param_dtype=self.param_dtype, name=name
        )
        split = lambda t: t.reshape(*t.shape[:2], self.heads, self.dim_head)  # noqa: E731
        q = split(dense(inner, self.qkv_bias, "to_q")(x))
        k = split(dense(inner, self.qkv_bias, "to_k")(context))
        v = split(dense(inner, self.qkv_bias, "to_v")(context))
        out = dot_product_attention(q, k, v, implementation=self.attention_impl, upcast=self.upcast)
        out = out.reshape(*out.shape[:2], inner)
        return dense(self.out_dim, True, "to_out_0")(out)
