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
import os
import re
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dreambooth_jax import checkpoint_files, convert
from dreambooth_jax.models import clip
from dreambooth_jax.models.attention import dot_product_attention

# ----------------------------------------------------------------------------------------------- preprocessing
IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BILINEAR, BICUBIC = 2, 3  # PIL.Image.Resampling values, as in `preprocessor_config.json`


@dataclasses.dataclass(frozen=True)
class ImagePreprocessing:
    """transformers' PIL image processor: resize -> [center crop] -> x / 255 -> (x - mean) / std.

    `shortest_edge=False` resizes to `size` x `size` (`ViTImageProcessor`); True resizes the shorter side
    to `size` keeping the aspect ratio, then center-crops `crop_size` (`CLIPImageProcessor`).
    """

    size: int = 224
    shortest_edge: bool = False
    crop_size: int | None = None
    resample: int = BILINEAR
    mean: tuple[float, ...] = IMAGENET_DEFAULT_MEAN
    std: tuple[float, ...] = IMAGENET_DEFAULT_STD

    @classmethod
    def from_processor_config(cls, d: dict) -> ImagePreprocessing:
        """Reads a `preprocessor_config.json` dict (square sizes only; resize/normalize must be on). Missing
        keys take the defaults of the processor class it names (`CLIPImageProcessor` or `ViTImageProcessor`)."""
        for key in ("do_resize", "do_rescale", "do_normalize"):
            if not d.get(key, True):
                raise ValueError(f"{key}=False is not supported")
        kind = str(d.get("image_processor_type") or d.get("feature_extractor_type") or "")
        base = CLIP_PREPROCESSING if "CLIP" in kind else VIT_PROCESSOR_DEFAULTS
        size = d.get("size", base.size)
        if isinstance(size, dict) and "shortest_edge" in size:
            shortest, size = True, size["shortest_edge"]
        elif isinstance(size, dict):
            if size["height"] != size["width"]:
                raise ValueError(f"size={size} is not supported; expected a square")
            shortest, size = False, size["height"]
        else:  # an int (old `*FeatureExtractor` configs): a square for ViT, the shortest edge for CLIP, as
            shortest = base.shortest_edge  # each processor's `get_size_dict(default_to_square=...)` reads it
        crop = d.get("crop_size", base.crop_size) if d.get("do_center_crop", base.crop_size is not None) else None
        if isinstance(crop, dict):
            if crop["height"] != crop["width"]:
                raise ValueError(f"crop_size={crop} is not supported; expected a square")
            crop = crop["height"]
        return cls(size=size, shortest_edge=shortest, crop_size=crop, resample=int(d.get("resample", base.resample)),
                   mean=tuple(d.get("image_mean", base.mean)), std=tuple(d.get("image_std", base.std)))


# facebook/dino-vits16's preprocessor_config.json: 224 x 224 bilinear, ImageNet mean/std (not the 0.5/0.5 of
# `ViTImageProcessor`'s own defaults). openai/clip-vit-base-patch32's: `CLIPImageProcessor` defaults.
DINO_PREPROCESSING = ImagePreprocessing()
VIT_PROCESSOR_DEFAULTS = ImagePreprocessing(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))  # `ViTImageProcessor()`
CLIP_PREPROCESSING = ImagePreprocessing(shortest_edge=True, crop_size=224, resample=BICUBIC, mean=OPENAI_CLIP_MEAN,
                                        std=OPENAI_CLIP_STD)


def _resize_crop(image: np.ndarray, cfg: ImagePreprocessing) -> np.ndarray:
    from PIL import Image

    pil = Image.fromarray(np.asarray(image, np.uint8)).convert("RGB")
    width, height = pil.size
    if cfg.shortest_edge:  # transformers' `get_resize_output_image_size(default_to_square=False)`
        short, long = min(width, height), max(width, height)
        new_short, new_long = cfg.size, int(cfg.size * long / short)
        height, width = (new_long, new_short) if width <= height else (new_short, new_long)
    else:
        height = width = cfg.size
    out = np.asarray(pil.resize((width, height), resample=cfg.resample))  # uint8 [h, w, 3], PIL rounds
    if cfg.crop_size:
        crop = cfg.crop_size
        if crop > min(height, width):
            raise ValueError(f"crop_size={crop} exceeds the resized image {height}x{width}")
        top, left = (height - crop) // 2, (width - crop) // 2
        out = out[top : top + crop, left : left + crop]
    return out


def preprocess(images, cfg: ImagePreprocessing) -> np.ndarray:
    """uint8 [H, W, 3] arrays (or PIL images), any sizes -> float32 [B, S, S, 3], as the HF processor."""
    out = []
    for image in images:
        x = _resize_crop(np.asarray(image), cfg).astype(np.float64) * (1 / 255)  # float64, as `rescale`
        x = x.astype(np.float32)
        out.append((x - np.asarray(cfg.mean, np.float32)) / np.asarray(cfg.std, np.float32))
    return np.stack(out)


def preprocess_dino(images, size: int = 224) -> np.ndarray:
    """DINO's `ViTImageProcessor`: bilinear resize to `size` x `size`, ImageNet normalization."""
    return preprocess(images, dataclasses.replace(DINO_PREPROCESSING, size=size))


def preprocess_clip(images, size: int = 224) -> np.ndarray:
    """`CLIPImageProcessor`: bicubic resize of the shorter side to `size`, center crop, CLIP normalization."""
    return preprocess(images, dataclasses.replace(CLIP_PREPROCESSING, size=size, crop_size=size))


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
            raise ValueError(f"hidden_act={self.hidden_act!r} is not supported; expected 'gelu'")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} does not divide hidden_size")

    @classmethod
    def from_diffusers_config(cls, d: dict) -> ViTConfig:
        """Reads a transformers `config.json` dict of a `ViTModel` (non-architecture keys are ignored)."""
        if d.get("model_type", "vit") != "vit":
            raise ValueError(f"model_type={d['model_type']!r} is not supported; expected 'vit'")
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
    """`layer(name=inner)` inside this scope: PyTorch paths such as `output.dense`, `patch_embeddings.projection`."""

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
        dense = lambda n, scope: _Scoped(functools.partial(nn.Dense, n, **kw), "dense", name=scope)  # noqa: E731
        h = nn.LayerNorm(cfg.layer_norm_eps, **kw, name="layernorm_before")(x)
        x = x + _ViTAttention(cfg, self.attention_impl, **kw, name="attention")(h).astype(jnp.float32)
        h = nn.LayerNorm(cfg.layer_norm_eps, **kw, name="layernorm_after")(x)
        h = _GELU[cfg.hidden_act](dense(cfg.intermediate_size, "intermediate")(h).astype(jnp.float32))
        return x + dense(cfg.hidden_size, "output")(h.astype(self.dtype)).astype(jnp.float32)


class _ViTEncoder(_Part):
    @nn.compact
    def __call__(self, x):
        for i in range(self.config.num_hidden_layers):
            x = _ViTLayer(self.config, self.attention_impl, self.dtype, self.param_dtype, name=f"layer_{i}")(x)
        return x


def _patches(conv, pixel_values, image_size: int):
    """[B, S, S, C] -> [B, patches, D] float32, patches row-major as torch's `flatten(2).transpose(1, 2)`."""
    if pixel_values.shape[1:3] != (image_size, image_size):
        raise ValueError(f"image size {pixel_values.shape[1:3]} does not match image_size={image_size}")
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


# transformers-5 in-memory names (`layers.N.attention.q_proj`, `mlp.fc1`) -> the checkpoint names we mirror.
_VIT_RENAMES = (
    (r"^layers\.(\d+)\.", r"encoder.layer.\1."),
    (r"\.attention\.([qkv])_proj\.", lambda m: f".attention.attention.{dict(q='query', k='key', v='value')[m[1]]}."),
    (r"\.attention\.o_proj\.", ".attention.output.dense."),
    (r"\.mlp\.fc1\.", ".intermediate.dense."),
    (r"\.mlp\.fc2\.", ".output.dense."),
    (r"^encoder\.layer\.(\d+)\.", r"encoder.layer_\1."),  # `layer` is no `convert.LIST_ATTRIBUTES` entry
)


def vit_params_from_state_dict(state, config: ViTConfig, *, dtype=None, source: str = "checkpoint") -> dict:
    """A transformers `ViTModel` state dict (keys with or without `vit.`) -> our param tree."""
    state = convert.normalize_state_dict(state, strip_prefix="vit.")
    renamed = {}
    for key, value in state.items():
        for pattern, repl in _VIT_RENAMES:
            key = re.sub(pattern, repl, key)
        renamed[key] = value
    return convert.state_dict_to_params(renamed, vit_abstract_params(config), dtype=dtype, source=source,
                                        ignore=(r"^pooler\.", r"^embeddings\.mask_token$"))


def vit_abstract_params(config: ViTConfig):
    """The float32 param tree's shapes (`jax.eval_shape`, no memory used)."""
    x = jnp.zeros((1, config.image_size, config.image_size, config.num_channels))
    return jax.eval_shape(ViTModel(config).init, jax.random.key(0), x)["params"]


def load_vit(folder: str, *, dtype=None) -> tuple[ViTModel, dict]:
    """(module, params) of a transformers `ViTModel` folder (`config.json`, `model.safetensors`), no torch."""
    config = ViTConfig.from_diffusers_config(checkpoint_files.read_json(os.path.join(folder, "config.json")))
    state, source = checkpoint_files.load_state_dict(checkpoint_files.find_weight_files(folder, "model"))
    params = vit_params_from_state_dict(state, config, dtype=dtype, source=source)
    return ViTModel(config), params


# ------------------------------------------------------------------------------------------ CLIP vision tower
@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """Architecture of transformers' CLIP vision tower; defaults are its `CLIPVisionConfig` defaults (B/32)."""

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
        if self.hidden_act not in clip._ACTIVATIONS:
            raise ValueError(f"hidden_act={self.hidden_act!r} is not supported; expected one of {sorted(clip._ACTIVATIONS)}")

    @classmethod
    def from_diffusers_config(cls, d: dict) -> CLIPVisionConfig:
        """Reads a `CLIPVisionConfig` dict (a `CLIPModel` config.json's `vision_config`)."""
        if d.get("model_type", "clip_vision_model") != "clip_vision_model":
            raise ValueError(f"model_type={d['model_type']!r} is not supported; expected 'clip_vision_model'")
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
        conv = nn.Conv(cfg.hidden_size, (p, p), strides=(p, p), padding="VALID", use_bias=False, dtype=self.dtype,
                       param_dtype=self.param_dtype, name="patch_embedding")
        x = _patches(conv, pixel_values.astype(self.dtype), cfg.image_size)  # [B, patches, D]
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(jnp.float32), (x.shape[0], 1, x.shape[-1])), x], axis=1)
        pos = nn.Embed(x.shape[1], cfg.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                       name="position_embedding")(jnp.arange(x.shape[1]))
        return x + pos[None].astype(jnp.float32)


class CLIPVisionModelWithProjection(nn.Module):
    """transformers' `CLIPVisionModelWithProjection` (keys without `vision_model.`): pixels -> `CLIPVisionOutput`.

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
        return CLIPVisionOutput(last_hidden_state=last.astype(self.dtype), pooler_output=pooled, image_embeds=embeds)


def clip_vision_abstract_params(config: CLIPVisionConfig):
    """The float32 param tree's shapes (`jax.eval_shape`, no memory used)."""
    x = jnp.zeros((1, config.image_size, config.image_size, config.num_channels))
    return jax.eval_shape(CLIPVisionModelWithProjection(config).init, jax.random.key(0), x)["params"]


def clip_tower_config(d: dict, tower: str) -> dict:
    """A `CLIPModel` config's `text_config` / `vision_config`, with the overrides of the legacy
    `*_config_dict` key applied on top (as transformers' `CLIPConfig` does: old openai/* configs have them)."""
    return {**(d.get(f"{tower}_config") or {}), **(d.get(f"{tower}_config_dict") or {})}


def load_clip_model(folder: str, *, dtype=None):
    """The two towers of a transformers `CLIPModel` folder (`config.json`, `model.safetensors`), no torch.

    Returns:
      (vision module, vision params, text module, text params); the text module is our
      `clip.CLIPTextModelWithProjection`, whose `text_embeds` pair with the vision `image_embeds`.
    """
    d = checkpoint_files.read_json(os.path.join(folder, "config.json"))
    proj = d.get("projection_dim", 512)  # the model's, which overrides the towers' own
    vision_d = clip_tower_config(d, "vision")
    vision_cfg = dataclasses.replace(CLIPVisionConfig.from_diffusers_config(vision_d), projection_dim=proj)
    text_d = {k: v for k, v in clip_tower_config(d, "text").items() if k != "model_type"}
    text_cfg = dataclasses.replace(clip.CLIPTextConfig.from_diffusers_config(text_d), projection_dim=proj)
    state, path = checkpoint_files.load_state_dict(checkpoint_files.find_weight_files(folder, "model"))
    towers = {}
    for tower, prefix, projection in (("vision", "vision_model.", "visual_projection."),
                                      ("text", "text_model.", "text_projection.")):
        part = {k: v for k, v in state.items() if k.startswith((prefix, projection))}
        towers[tower] = convert.normalize_state_dict(part, strip_prefix=prefix)
    vision_params = convert.state_dict_to_params(
        towers["vision"], clip_vision_abstract_params(vision_cfg), dtype=dtype, source=path,
        ignore=(r"\.position_ids$",))
    text_params = convert.state_dict_to_params(
        towers["text"], clip.abstract_params(text_cfg, with_projection=True), dtype=dtype, source=path,
        ignore=clip.IGNORED_KEYS)
    return (CLIPVisionModelWithProjection(vision_cfg), vision_params, clip.CLIPTextModelWithProjection(text_cfg),
            text_params)
