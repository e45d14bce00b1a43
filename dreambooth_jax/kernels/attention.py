"""Attention kernels: JAX's Pallas TPU splash attention made to fit Stable Diffusion's shapes, and the
pure-JAX reference every implementation is tested against.

Splash attention wants head_dim a multiple of 128 and sequence lengths a multiple of its blocks; SD's heads
are 40/64/80/160 wide and its cross-attention keys are 77 text tokens. So (as MaxDiffusion does) q, k, v are
zero-padded: padded head features add 0 to q.k and give output columns that are cut off; padded keys get their
own segment id, so no query attends to them; padded queries are cut off. The softmax scale 1/sqrt(head_dim)
of the real head_dim is applied to q beforehand (splash does not scale).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from dreambooth_jax.kernels import choose


def attention_reference(q, k, v, *, mask=None, upcast: bool = True):
    """softmax(q k^T / sqrt(d) + mask) v in plain jax.numpy.

    Args:
      q: [B, T, N, H] queries; k, v: [B, S, N, H].
      mask: optional bool array broadcastable to [B, N, T, S]; True where attending is allowed.
      upcast: scores and softmax in float32 (diffusers' `upcast_attention`/`upcast_softmax`).

    Returns:
      [B, T, N, H] in v's dtype.
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    compute = jnp.float32 if upcast else q.dtype
    scores = jnp.einsum("btnh,bsnh->bnts", q.astype(compute), k.astype(compute)) * scale
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
    probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(v.dtype)
    return jnp.einsum("bnts,bsnh->btnh", probs, v)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _block(length: int) -> int:
    """The largest of 512, 256, 128 dividing `length` (a multiple of 128)."""
    return next(b for b in (512, 256, 128) if length % b == 0)


@functools.cache
def _splash_kernel(heads: int, q_len: int, kv_len: int, interpret: bool):
    # the TPU kernels' modules load only where a splash kernel is built
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    bq, bkv = _block(q_len), _block(kv_len)
    sizes = splash.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq,
                              block_kv_dkv=bkv, block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)
    mask = masks.MultiHeadMask([masks.FullMask((q_len, kv_len))] * heads)
    # Built once per shape and cached: its block tables must be concrete arrays, not tracers of the program
    # that happens to ask first.
    with jax.ensure_compile_time_eval():
        return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                      interpret=interpret)


def splash_attention(q, k, v, *, interpret: bool | None = None):
    """softmax(q k^T / sqrt(d)) v with JAX's Pallas TPU splash-attention kernel (forward and backward).

    Args:
      q: [B, T, N, H]; k, v: [B, S, N, H]; any T, S and H (padded as the module docstring says).
      interpret: Pallas interpret mode; None: on CPU only.

    Returns:
      [B, T, N, H] in q's dtype.
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash

    if interpret is None:
        interpret = choose.backend() == "cpu"
    b, t, n, h = q.shape
    s = k.shape[1]
    tp, sp, hp = _round_up(t, 128), _round_up(s, 128), _round_up(h, 128)
    q = q * jnp.asarray(1.0 / math.sqrt(h), q.dtype)

    def pad(x, length):  # [B, L, N, H] -> [B, N, length, hp]
        x = jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, hp - h)))
        return x.transpose(0, 2, 1, 3)

    kernel = _splash_kernel(n, tp, sp, bool(interpret))
    segments = splash.SegmentIds(q=jnp.zeros((tp,), jnp.int32), kv=(jnp.arange(sp) >= s).astype(jnp.int32))
    out = jax.vmap(lambda q1, k1, v1: kernel(q1, k1, v1, segment_ids=segments))(pad(q, tp), pad(k, sp),
                                                                                pad(v, sp))
    return out.transpose(0, 2, 1, 3)[:, :t, :, :h].astype(q.dtype)
