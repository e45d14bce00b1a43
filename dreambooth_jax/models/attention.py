"""Scaled dot-product attention with a switchable implementation, and diffusers' `Attention` layer."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from dreambooth_jax.kernels import choose
from dreambooth_jax.kernels.attention import attention_reference, splash_attention
from dreambooth_jax.kernels.batch_parallel import batch_parallel

ATTENTION_IMPLS = choose.ATTENTION_IMPLS


def dot_product_attention(q, k, v, *, mask=None, implementation: str = "auto", upcast: bool = True):
    """softmax(q k^T / sqrt(d) + mask) v.

    Args:
      q: [B, T, N, H] queries; k, v: [B, S, N, H].
      mask: optional bool array broadcastable to [B, N, T, S]; True where attending is allowed.
      implementation: one of `ATTENTION_IMPLS`; "auto" asks `kernels.choose.attention` for this call's shapes.
      upcast: compute the scores and softmax in float32 (diffusers' `upcast_attention`/`upcast_softmax`);
        only the einsum path honours False, the others always accumulate in float32.

    Returns:
      [B, T, N, H] in q's dtype.
    """
    impl = choose.attention(implementation, q_len=q.shape[1], kv_len=k.shape[1], head_dim=q.shape[-1],
                            dtype=q.dtype, masked=mask is not None)
    if impl == "einsum":
        return attention_reference(q, k, v, mask=mask, upcast=upcast)
    if impl == "pallas":
        return batch_parallel(splash_attention, q, k, v, num_batched=3)
    return jax.nn.dot_product_attention(q, k, v, mask=mask,
                                        implementation="xla" if impl == "dot_product" else impl)


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
