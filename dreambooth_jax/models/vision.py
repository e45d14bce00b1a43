"""Image encoders of the DreamBooth paper's metrics in Flax: DINO (`ViTModel`) and CLIP (vision tower).

DINO score: cosine similarity of `ViTModel` CLS tokens (facebook/dino-vits16); CLIP-I / CLIP-T: cosine
similarity of `image_embeds` with each other / with `text_embeds` (openai/clip-vit-base-patch32).
Submodule names mirror transformers' checkpoint keys (`encoder/layer_0/attention/attention/query`,
`encoder/layers_0/self_attn/q_proj`), so `convert.state_dict_to_params` loads them after one rename
(`encoder.layer.N` -> `encoder.layer_N`: `layer` is not one of `convert.LIST_ATTRIBUTES`). Images are
NHWC float32; the preprocessing reproduces transformers' PIL image processors bit for bit.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from dreambooth_jax.errors import UsageError
from dreambooth_jax.models import clip
from dreambooth_jax.models.attention import dot_product_attention

# ------------------------------------------------------------------------------------------------------- ViT
_GELU = {"gelu": lambda x: jax.nn.gelu(x, approximate=False)}


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Architecture of transformers' `ViTModel`; defaults are its `ViTConfig` defaults (ViT-B/16)."""

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    qkv_bias: bool = True

    def __post_init__(self):
        if self.hidden_act not in _GELU:
            raise UsageError(f"hidden_act={self.hidden_act!r} is not supported; expected 'gelu'")
        if self.hidden_size % self.num_attention_heads:
            raise UsageError(f"num_attention_heads={self.num_attention_heads} does not divide hidden_size")

    @classmethod
    def from_diffusers_config(cls, d: dict) -> ViTConfig:
        """Reads a transformers `config.json` dict of a `ViTModel` (non-architecture keys are ignored)."""
        if d.get("model_type", "vit") != "vit":
            raise UsageError(f"model_type={d['model_type']!r} is not supported; expected 'vit'")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_diffusers_config(self) -> dict:
        return {"architectures": ["ViTModel"], "model_type": "vit", **dataclasses.asdict(self)}


class ViTOutput(NamedTuple):
    last_hidden_state: Any  # [B, 1 + patches, D], after the final layer norm
    cls: Any  # [B, D], last_hidden_state[:, 0]: the DINO embedding


class _Part(nn.Module):
    """Fields shared by the internal layers."""

    config: Any
    attention_impl: str = "einsum"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32


class _Scoped(nn.Module):
    """`layer(name=inner)` inside this scope: PyTorch paths such as `output.dense`,
    `patch_embeddings.projection`."""

    layer: Callable
    inner: str

    @nn.compact
    def __call__(self, x):
        return self.layer(name=self.inner)(x)


class _ViTSelfAttention(_Part):
    @nn.compact
    def __call__(self, x):
        heads, dim = self.config.num_attention_heads, self.config.hidden_size
        kw = dict(use_bias=self.config.qkv_bias, dtype=self.dtype, param_dtype=self.param_dtype)
        split = lambda t: t.reshape(*t.shape[:2], heads, dim // heads)  # noqa: E731  [B, T, N, H]
        q, k, v = (split(nn.Dense(dim, **kw, name=name)(x)) for name in ("query", "key", "value"))
        out = dot_product_attention(q, k, v, implementation=self.attention_impl, upcast=True)
        return out.reshape(*out.shape[:2], dim)


class _ViTAttention(_Part):
    """PyTorch's `attention.attention.{query,key,value}`, then `attention.output.dense`."""

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = _ViTSelfAttention(self.config, self.attention_impl, **kw, name="attention")(x)
        return _Scoped(functools.partial(nn.Dense, self.config.hidden_size, **kw), "dense", name="output")(h)


class _ViTLayer(_Part):
    """Pre-LN block; `x` is the float32 residual stream [B, T, D]."""

    @nn.compact
    def __call__(self, x):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        dense = lambda n, scope: _Scoped(functools.partial(nn.Dense, n, **kw), "dense",  # noqa: E731
                                         name=scope)
        h = nn.LayerNorm(cfg.layer_norm_eps, **kw, name="layernorm_before")(x)
        x = x + _ViTAttention(cfg, self.attention_impl, **kw, name="attention")(h).astype(jnp.float32)
        h = nn.LayerNorm(cfg.layer_norm_eps, **kw, name="layernorm_after")(x)
        h = _GELU[cfg.hidden_act](dense(cfg.intermediate_size, "intermediate")(h).astype(jnp.float32))
        return x + dense(cfg.hidden_size, "output")(h.astype(self.dtype)).astype(jnp.float32)


class _ViTEncoder(_Part):
    @nn.compact
    def __call__(self, x):
        for i in range(self.config.num_hidden_layers):
            x = _ViTLayer(self.config, self.attention_impl, self.dtype, self.param_dtype,
                          name=f"layer_{i}")(x)
        return x


def _patches(conv, pixel_values, image_size: int):
    """[B, S, S, C] -> [B, patches, D] float32, patches row-major as torch's `flatten(2).transpose(1, 2)`."""
    if pixel_values.shape[1:3] != (image_size, image_size):
        raise UsageError(f"image size {pixel_values.shape[1:3]} does not match image_size={image_size}")
    x = conv(pixel_values)
    return x.reshape(x.shape[0], -1, x.shape[-1]).astype(jnp.float32)


class _ViTEmbeddings(_Part):
    @nn.compact
    def __call__(self, pixel_values):
        cfg, p = self.config, self.config.patch_size
        init = nn.initializers.truncated_normal(0.02)
        cls = self.param("cls_token", init, (1, 1, cfg.hidden_size), self.param_dtype)
        pos = self.param("position_embeddings", init, (1, (cfg.image_size // p) ** 2 + 1, cfg.hidden_size),
                         self.param_dtype)
        conv = _Scoped(functools.partial(nn.Conv, cfg.hidden_size, (p, p), strides=(p, p), padding="VALID",
                                         dtype=self.dtype, param_dtype=self.param_dtype),
                       "projection", name="patch_embeddings")
        x = _patches(conv, pixel_values.astype(self.dtype), cfg.image_size)  # [B, patches, D]
        cls = jnp.broadcast_to(cls.astype(jnp.float32), (x.shape[0], 1, x.shape[-1]))
        return jnp.concatenate([cls, x], axis=1) + pos.astype(jnp.float32)


class ViTModel(nn.Module):
    """transformers' `ViTModel(add_pooling_layer=False)`: pixels [B, S, S, C] (normalized) -> `ViTOutput`.

    Attributes:
      config: the architecture.
      dtype: compute dtype; layer-norm statistics, softmax and the residual stream stay in float32.
      param_dtype: storage dtype of the params.
      attention_impl: one of `attention.ATTENTION_IMPLS`.
    """

    config: ViTConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_impl: str = "einsum"

    @nn.compact
    def __call__(self, pixel_values) -> ViTOutput:
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = _ViTEmbeddings(cfg, **kw, name="embeddings")(pixel_values)
        x = _ViTEncoder(cfg, self.attention_impl, **kw, name="encoder")(x)
        last = nn.LayerNorm(cfg.layer_norm_eps, **kw, name="layernorm")(x)
        return ViTOutput(last_hidden_state=last, cls=last[:, 0])


def vit_abstract_params(config: ViTConfig):
    """The float32 param tree's shapes (`jax.eval_shape`, no memory used)."""
    x = jnp.zeros((1, config.image_size, config.image_size, config.num_channels))
    return jax.eval_shape(ViTModel(config).init, jax.random.key(0), x)["params"]


# ------------------------------------------------------------------------------------------ CLIP vision tower
@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """Architecture of transformers' CLIP vision tower; defaults are its `CLIPVisionConfig` defaults
    (B/32)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    image_size: int = 224
    patch_size: int = 32
    num_channels: int = 3
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 512

    def __post_init__(self):
        if self.hidden_act not in clip.ACTIVATIONS:
            raise UsageError(f"hidden_act={self.hidden_act!r} is not supported; expected one of "
                             f"{sorted(clip.ACTIVATIONS)}")

    @classmethod
    def from_diffusers_config(cls, d: dict) -> CLIPVisionConfig:
        """Reads a `CLIPVisionConfig` dict (a `CLIPModel` config.json's `vision_config`)."""
        if d.get("model_type", "clip_vision_model") != "clip_vision_model":
            raise UsageError(f"model_type={d['model_type']!r} is not supported; expected 'clip_vision_model'")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_diffusers_config(self) -> dict:
        return {"architectures": ["CLIPVisionModelWithProjection"], "model_type": "clip_vision_model",
                **dataclasses.asdict(self)}


class CLIPVisionOutput(NamedTuple):
    last_hidden_state: Any  # [B, 1 + patches, D], encoder output (no final layer norm, as transformers)
    pooler_output: Any  # [B, D], post_layernorm(last_hidden_state[:, 0])
    image_embeds: Any  # [B, P], visual_projection(pooler_output): the CLIP-I / CLIP-T embedding


class _CLIPVisionEmbeddings(_Part):
    @nn.compact
    def __call__(self, pixel_values):
        cfg, p = self.config, self.config.patch_size
        cls = self.param("class_embedding", nn.initializers.normal(1.0), (cfg.hidden_size,), self.param_dtype)
        conv = nn.Conv(cfg.hidden_size, (p, p), strides=(p, p), padding="VALID", use_bias=False,
                       dtype=self.dtype, param_dtype=self.param_dtype, name="patch_embedding")
        x = _patches(conv, pixel_values.astype(self.dtype), cfg.image_size)  # [B, patches, D]
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(jnp.float32), (x.shape[0], 1, x.shape[-1])), x],
                            axis=1)
        pos = nn.Embed(x.shape[1], cfg.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                       name="position_embedding")(jnp.arange(x.shape[1]))
        return x + pos[None].astype(jnp.float32)


class CLIPVisionModelWithProjection(nn.Module):
    """transformers' `CLIPVisionModelWithProjection` (keys without `vision_model.`): pixels ->
    `CLIPVisionOutput`.

    Attributes as `ViTModel`'s. The encoder is the text tower's (`clip.CLIPEncoder`), unmasked.
    """

    config: CLIPVisionConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_impl: str = "einsum"

    @nn.compact
    def __call__(self, pixel_values) -> CLIPVisionOutput:
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = _CLIPVisionEmbeddings(cfg, **kw, name="embeddings")(pixel_values)
        x = nn.LayerNorm(cfg.layer_norm_eps, **kw, name="pre_layrnorm")(x).astype(jnp.float32)  # (sic)
        last = clip.CLIPEncoder(cfg, self.attention_impl, **kw, name="encoder")(x, None)[-1]
        pooled = nn.LayerNorm(cfg.layer_norm_eps, **kw, name="post_layernorm")(last[:, 0])
        embeds = nn.Dense(cfg.projection_dim, use_bias=False, **kw, name="visual_projection")(pooled)
        return CLIPVisionOutput(last_hidden_state=last.astype(self.dtype), pooler_output=pooled,
                                image_embeds=embeds)


def clip_vision_abstract_params(config: CLIPVisionConfig):
    """The float32 param tree's shapes (`jax.eval_shape`, no memory used)."""
    x = jnp.zeros((1, config.image_size, config.image_size, config.num_channels))
    return jax.eval_shape(CLIPVisionModelWithProjection(config).init, jax.random.key(0), x)["params"]
