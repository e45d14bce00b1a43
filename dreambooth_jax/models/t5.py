"""The T5 v1.1 encoder of Flux.1 (transformers' `T5EncoderModel`) in Flax.

T5 v1.1: relative position buckets (one learned bias table, in the first layer, shared by every layer), RMS
norm without mean or bias, gated-GELU feed-forward (GELU-tanh, transformers' `gelu_new`), no biases, and no
1/sqrt(d) scaling of the attention scores (folded into the initialisation). Submodule names mirror the
checkpoint keys with the list indices joined by `_` (`encoder/block_0/layer_1/DenseReluDense/wi_0`):
`TORCH_TO_FLAX` / `FLAX_TO_TORCH` rename the keys, as `block` and `layer` are no `convert.LIST_ATTRIBUTES`
entry. The residual stream is float32 whatever the compute dtype (transformers' RMS norm upcasts its input).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dreambooth_jax.errors import UsageError

# Checkpoint key <-> our key (regexes, applied in order). transformers ties `encoder.embed_tokens` to
# `shared`; our model holds the table once, as `shared` (IGNORED_KEYS drops the tied copy on load).
TORCH_TO_FLAX = ((r"^encoder\.block\.(\d+)\.layer\.(\d+)\.", r"encoder.block_\1.layer_\2."),)
FLAX_TO_TORCH = ((r"^encoder\.block_(\d+)\.layer_(\d+)\.", r"encoder.block.\1.layer.\2."),)
IGNORED_KEYS = (r"^encoder\.embed_tokens\.weight$",)

ACTIVATIONS = {
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),  # T5 v1.1, Flux's T5-XXL
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
}


@dataclasses.dataclass(frozen=True)
class T5Config:
    """Architecture of a T5 encoder; defaults are Flux.1's T5-XXL (google/t5-v1_1-xxl's encoder)."""

    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"

    def __post_init__(self):
        act = self.activation
        if act not in ACTIVATIONS:
            raise UsageError(f"feed_forward_proj={self.feed_forward_proj!r} is not supported; expected "
                             f"'gated-gelu' or one of {sorted(ACTIVATIONS)}")

    @property
    def gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def activation(self) -> str:
        # transformers: "gated-gelu" means the tanh GELU (`gelu_new`), for the original checkpoints
        act = self.feed_forward_proj.split("-")[-1]
        return "gelu_new" if self.feed_forward_proj == "gated-gelu" else act

    @classmethod
    def from_diffusers_config(cls, d: dict) -> T5Config:
        """Reads a transformers `config.json` dict of a `T5EncoderModel` (architecture keys only)."""
        model_type = d.get("model_type", "t5")
        if model_type != "t5":  # umT5 has a position table per layer, not one shared
            raise UsageError(f"model_type={model_type!r} is not supported; expected 't5'")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_diffusers_config(self) -> dict:
        """A `config.json` dict that transformers' `T5EncoderModel.from_pretrained` reads."""
        return {"architectures": ["T5EncoderModel"], "model_type": "t5", "is_encoder_decoder": False,
                "use_cache": False, "tie_word_embeddings": False, "dense_act_fn": self.activation,
                "is_gated_act": self.gated, **dataclasses.asdict(self)}


PRESETS = {"flux": T5Config()}  # google/t5-v1_1-xxl (Flux.1-dev and -schnell's text_encoder_2)


def relative_position_bucket(relative_position, num_buckets: int, max_distance: int):
    """The bidirectional bucket of each relative position (memory - query), as transformers' T5: half of
    the buckets per direction, exact up to num_buckets / 4, then logarithmic up to `max_distance`."""
    num_buckets //= 2
    buckets = (relative_position > 0).astype(jnp.int32) * num_buckets
    distance = jnp.abs(relative_position)
    max_exact = num_buckets // 2
    # float32 log, truncated toward zero as torch's `.to(torch.long)`; clipped before the cast so that
    # distance 0 (log -inf, not used: it is exact) stays finite
    scaled = (jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / max_exact)
              / math.log(max_distance / max_exact) * (num_buckets - max_exact))
    large = jnp.minimum(max_exact + scaled.astype(jnp.int32), num_buckets - 1)
    return buckets + jnp.where(distance < max_exact, distance, large)


class T5LayerNorm(nn.Module):
    """RMS norm (no mean, no bias), statistics in float32: x * rsqrt(mean(x^2) + eps) * weight."""

    eps: float
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        weight = self.param("weight", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        x = x.astype(jnp.float32)
        return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps) * weight


class T5Attention(nn.Module):
    """`SelfAttention`: q, k, v, o without biases; the first layer's also holds the relative position
    table."""

    config: T5Config
    has_relative_bias: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, bias, buckets):
        """x [B, T, D]; `bias` [B or 1, N, T, T]: the position bias plus the padding mask (in the first layer
        only the mask: it adds the position bias of `buckets` [T, T]). Returns (output [B, T, D], the
        bias)."""
        cfg, kw = self.config, dict(use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)
        if self.has_relative_bias:
            table = nn.Embed(cfg.relative_attention_num_buckets, cfg.num_heads, param_dtype=self.param_dtype,
                             name="relative_attention_bias")
            bias = table(buckets).astype(jnp.float32).transpose(2, 0, 1)[None] + bias  # [B|1, N, T, T]
        inner = cfg.num_heads * cfg.d_kv
        split = lambda t: t.reshape(*t.shape[:2], cfg.num_heads, cfg.d_kv)  # noqa: E731  [B, T, N, H]
        q, k, v = (split(nn.Dense(inner, **kw, name=n)(x.astype(self.dtype))) for n in ("q", "k", "v"))
        # scale 1: T5 folds 1/sqrt(d) into the initialisation of q; the scores and softmax in float32
        out = jax.nn.dot_product_attention(q, k, v, bias=bias.astype(q.dtype), scale=1.0,
                                           implementation="xla")
        return nn.Dense(cfg.d_model, **kw, name="o")(out.reshape(*out.shape[:2], inner)), bias


class T5DenseGatedActDense(nn.Module):
    """`DenseReluDense`: wo(act(wi_0 x) * wi_1 x) (gated) or wo(act(wi x))."""

    config: T5Config
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg, kw = self.config, dict(use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)
        act, x = ACTIVATIONS[cfg.activation], x.astype(self.dtype)
        if cfg.gated:
            h = act(nn.Dense(cfg.d_ff, **kw, name="wi_0")(x)) * nn.Dense(cfg.d_ff, **kw, name="wi_1")(x)
        else:
            h = act(nn.Dense(cfg.d_ff, **kw, name="wi")(x))
        return nn.Dense(cfg.d_model, **kw, name="wo")(h)


class _SelfAttentionLayer(nn.Module):  # `layer.0`: x + SelfAttention(layer_norm(x))
    config: T5Config
    has_relative_bias: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, bias, buckets):
        h = T5LayerNorm(self.config.layer_norm_epsilon, self.param_dtype, name="layer_norm")(x)
        h, bias = T5Attention(self.config, self.has_relative_bias, self.dtype, self.param_dtype,
                              name="SelfAttention")(h, bias, buckets)
        return x + h.astype(jnp.float32), bias


class _FeedForwardLayer(nn.Module):  # `layer.1`: x + DenseReluDense(layer_norm(x))
    config: T5Config
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = T5LayerNorm(self.config.layer_norm_epsilon, self.param_dtype, name="layer_norm")(x)
        h = T5DenseGatedActDense(self.config, self.dtype, self.param_dtype, name="DenseReluDense")(h)
        return x + h.astype(jnp.float32)


class T5Block(nn.Module):
    config: T5Config
    has_relative_bias: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, bias, buckets):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attention = _SelfAttentionLayer(self.config, self.has_relative_bias, **kw, name="layer_0")
        x, bias = attention(x, bias, buckets)
        return _FeedForwardLayer(self.config, **kw, name="layer_1")(x), bias


class T5Stack(nn.Module):
    """`encoder`: the blocks and the final RMS norm, on float32 embeddings [B, T, D]."""

    config: T5Config
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, x, attention_mask=None):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        positions = jnp.arange(x.shape[1])
        buckets = relative_position_bucket(positions[None, :] - positions[:, None],  # memory - query
                                           cfg.relative_attention_num_buckets,
                                           cfg.relative_attention_max_distance)
        bias = jnp.zeros((1, 1, 1, 1), jnp.float32)
        if attention_mask is not None:  # additive, as transformers: the float32 minimum where padding
            keep = attention_mask.astype(bool)[:, None, None, :]
            bias = jnp.where(keep, 0.0, jnp.finfo(jnp.float32).min)
        block = nn.remat(T5Block) if self.remat else T5Block
        for i in range(cfg.num_layers):
            x, bias = block(cfg, i == 0, **kw, name=f"block_{i}")(x, bias, buckets)
        return T5LayerNorm(cfg.layer_norm_epsilon, self.param_dtype, name="final_layer_norm")(x)


class T5EncoderModel(nn.Module):
    """transformers' `T5EncoderModel`: token ids [B, T] -> last hidden state [B, T, d_model] (compute dtype).

    Attributes:
      config: the architecture.
      dtype: compute dtype; the RMS norms' statistics, the softmax and the residual stream stay in float32.
      param_dtype: storage dtype of the params.
      remat: recompute each block's activations in the backward pass.
    """

    config: T5Config
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, input_ids, attention_mask=None):
        """Args: input_ids [B, T] ints; attention_mask [B, T], 1 = token, 0 = padding (None: every token
        attends to every token, as Flux's pipelines call it)."""
        cfg = self.config
        x = nn.Embed(cfg.vocab_size, cfg.d_model, param_dtype=self.param_dtype, name="shared")(input_ids)
        encoder = T5Stack(cfg, self.dtype, self.param_dtype, self.remat, name="encoder")
        x = encoder(x.astype(jnp.float32), attention_mask)
        return x.astype(self.dtype)


def abstract_params(config: T5Config):
    """The float32 param tree's shapes (`jax.eval_shape`, no memory used), as the loader's target."""
    ids = jnp.zeros((1, 8), jnp.int32)
    return jax.eval_shape(T5EncoderModel(config).init, jax.random.key(0), ids)["params"]
