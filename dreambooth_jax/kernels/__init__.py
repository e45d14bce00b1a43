"""Pallas kernels (installed as `dreambooth_jax.kernels`), each with a pure-JAX reference.

    from dreambooth_jax.kernels import group_norm
    y = group_norm(x, scale, bias, num_groups=32, eps=1e-5, activation="silu")

`norm`: fused GroupNorm (+ SiLU); `attention`: splash attention fitted to SD's shapes; `choose`: which
implementation runs where; `batch_parallel`: a kernel on each device's share of the batch.
"""

from dreambooth_jax.kernels.attention import attention_reference, splash_attention
from dreambooth_jax.kernels.norm import group_norm, group_norm_reference

__all__ = ["attention_reference", "group_norm", "group_norm_reference", "splash_attention"]
