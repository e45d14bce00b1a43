"""The Flux.1 transformer (diffusers' `FluxTransformer2DModel`) in Flax.

A rectified-flow DiT on 2x2-packed latent tokens: 19 double-stream blocks (text and image keep their own
weights and AdaLN-Zero modulation but attend jointly over [text; image]), then 38 single-stream blocks on the
concatenated sequence (attention and MLP in parallel), conditioned on the timestep, the pooled CLIP embedding
and, for the guidance-distilled dev model, the guidance scale. Positions enter through 3-axis rotary
embeddings on (0, row, col) ids (text ids are zero). Submodule names are the checkpoint keys with list
indices joined by `_` (`transformer_blocks_0/attn/to_q`), so `convert.torch_key` maps them.

Precision: the compute dtype is that of the matmuls and the attention; LayerNorm / RMSNorm statistics, the
rotary embedding and the gated residual streams are float32 (diffusers keeps them in the compute dtype; at
float32 the two are the same computation).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dreambooth_jax.errors import UsageError
from dreambooth_jax.models.attention import dot_product_attention
from dreambooth_jax.models.unet import TimestepEmbedding, timestep_embedding

ROPE_THETA = 10000  # diffusers' FluxPosEmbed(theta=10000)
_EPS = 1e-6  # every LayerNorm and RMSNorm of the model


@dataclasses.dataclass(frozen=True)
class FluxConfig:
    """Architecture of a Flux transformer; defaults are Flux.1-dev / -schnell's (schnell: no guidance)."""

    patch_size: int = 1
    in_channels: int = 64
    out_channels: int | None = None
    num_layers: int = 19
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = False
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)

    def __post_init__(self):
        object.__setattr__(self, "axes_dims_rope", tuple(self.axes_dims_rope))
        if sum(self.axes_dims_rope) != self.attention_head_dim or any(d % 2 for d in self.axes_dims_rope):
            raise UsageError(f"axes_dims_rope={list(self.axes_dims_rope)} must be even and sum to "
                             f"attention_head_dim={self.attention_head_dim}")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def output_channels(self) -> int:
        return self.patch_size**2 * (self.out_channels or self.in_channels)

    @classmethod
    def from_diffusers_config(cls, d: dict) -> FluxConfig:
        """Reads a diffusers `config.json` dict of a `FluxTransformer2DModel`."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_diffusers_config(self) -> dict:
        d = dataclasses.asdict(self)
        d["axes_dims_rope"] = list(self.axes_dims_rope)
        return {"_class_name": "FluxTransformer2DModel", **d}


PRESETS = {
    "flux-dev": FluxConfig(guidance_embeds=True),  # black-forest-labs/FLUX.1-dev
    "flux-schnell": FluxConfig(),  # black-forest-labs/FLUX.1-schnell
}


def rope_tables(ids, axes_dims: tuple[int, ...], theta: float = ROPE_THETA):
    """(cos, sin) [S, sum(axes_dims)] float32 of position ids [S, n_axes], as diffusers' `FluxPosEmbed`:
    per axis, frequencies theta^(-2i/d), each repeated twice (the pairs (x_2i, x_2i+1) rotate together).

    NumPy ids (the usual case: they follow from the shapes) are computed in float64 as diffusers does; traced
    ids in float32."""
    xp = np if isinstance(ids, np.ndarray) else jnp
    dtype = np.float64 if xp is np else jnp.float32
    angles = []
    for axis, dim in enumerate(axes_dims):
        freqs = 1.0 / (theta ** (xp.arange(0, dim, 2, dtype=dtype) / dim))
        angles.append(xp.repeat(xp.asarray(ids[:, axis], dtype)[:, None] * freqs[None, :], 2, axis=1))
    angles = xp.concatenate(angles, axis=1)
    return jnp.asarray(xp.cos(angles), jnp.float32), jnp.asarray(xp.sin(angles), jnp.float32)


def apply_rope(x, cos, sin):
    """Rotates x [B, S, N, H] by the tables [S, H] (diffusers' `apply_rotary_emb`, `use_real_unbind_dim=-1`):
    out = x cos + rot(x) sin, rot pairing (x_2i, x_2i+1) -> (-x_2i+1, x_2i); float32, back to x's dtype."""
    xf = x.astype(jnp.float32)
    pairs = xf.reshape(*x.shape[:-1], -1, 2)
    rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
    return (xf * cos[None, :, None] + rotated * sin[None, :, None]).astype(x.dtype)


def layer_norm(x):
    """LayerNorm without affine parameters (eps 1e-6), statistics in float32."""
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + _EPS)


class RMSNorm(nn.Module):
    """torch's `RMSNorm(dim, eps=1e-6)` over the last axis: x * rsqrt(mean(x^2) + eps) * weight."""

    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        weight = self.param("weight", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        xf = x.astype(jnp.float32)
        out = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + _EPS) * weight
        return out.astype(x.dtype)


def modulate(x, shift, scale):
    """norm(x) (1 + scale) + shift, per example: x [B, S, D] float32, shift / scale [B, D]."""
    return layer_norm(x) * (1 + scale[:, None]) + shift[:, None]


def _dense(features: int, name: str, dtype, param_dtype):
    return nn.Dense(features, dtype=dtype, param_dtype=param_dtype, name=name)


class FluxAttention(nn.Module):
    """Multi-head attention with RMSNorm on q and k and rotary positions. With `context` (double-stream
    blocks), the text stream's own projections (`add_*_proj`, `norm_added_*`) join it in one attention over
    [text; image], and the two outputs are projected apart (`to_out_0`, `to_add_out`); without (single-stream
    blocks), one sequence and no output projection."""

    heads: int
    head_dim: int
    attention_impl: str = "auto"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, cos, sin, context=None):
        inner, kw = self.heads * self.head_dim, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        split = lambda t: t.reshape(*t.shape[:2], self.heads, self.head_dim)  # noqa: E731  [B, S, N, H]

        def qkv(h, names, norm_prefix):
            q, k, v = (split(_dense(inner, name, **kw)(h)) for name in names)
            q = RMSNorm(self.param_dtype, name=f"{norm_prefix}q")(q)
            k = RMSNorm(self.param_dtype, name=f"{norm_prefix}k")(k)
            return q, k, v

        q, k, v = qkv(x, ("to_q", "to_k", "to_v"), "norm_")
        if context is not None:  # text first, as diffusers concatenates
            cq, ck, cv = qkv(context, ("add_q_proj", "add_k_proj", "add_v_proj"), "norm_added_")
            q, k, v = (jnp.concatenate(pair, axis=1) for pair in ((cq, q), (ck, k), (cv, v)))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = dot_product_attention(q, k, v, implementation=self.attention_impl)
        out = out.reshape(*out.shape[:2], inner)
        if context is None:
            return out
        n_text = context.shape[1]
        return (_dense(x.shape[-1], "to_out_0", **kw)(out[:, n_text:]),
                _dense(context.shape[-1], "to_add_out", **kw)(out[:, :n_text]))


class FeedForward(nn.Module):
    """diffusers' `FeedForward(activation_fn="gelu-approximate")`: `net_0/proj` (4x), GELU-tanh, `net_2`."""

    dim: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        # `net.0` is diffusers' GELU module holding `proj`: a submodule level of its own, as in the keys
        h = _GELU(4 * self.dim, **kw, name="net_0")(x)
        return _dense(self.dim, "net_2", **kw)(h)


class _GELU(nn.Module):
    features: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = _dense(self.features, "proj", self.dtype, self.param_dtype)(x)
        return jax.nn.gelu(h, approximate=True)


class FluxTransformerBlock(nn.Module):
    """A double-stream block: per stream AdaLN-Zero (`norm1`, `norm1_context`: shift, scale, gate of the
    attention and of the MLP from silu(temb)), joint attention, gated residuals, GELU-tanh MLPs."""

    config: FluxConfig
    attention_impl: str = "auto"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, context, temb, cos, sin):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        dim = cfg.inner_dim
        mods = [jnp.split(_AdaLNLinear(6 * dim, **kw, name=name)(temb), 6, axis=-1)
                for name in ("norm1", "norm1_context")]
        (shift, scale, gate, shift_mlp, scale_mlp, gate_mlp), (c_shift, c_scale, c_gate, c_shift_mlp,
                                                                c_scale_mlp, c_gate_mlp) = mods
        attn = FluxAttention(cfg.num_attention_heads, cfg.attention_head_dim, self.attention_impl, **kw,
                             name="attn")
        out, c_out = attn(modulate(x, shift, scale).astype(self.dtype), cos, sin,
                          context=modulate(context, c_shift, c_scale).astype(self.dtype))
        x = x + gate[:, None] * out.astype(jnp.float32)
        ff = FeedForward(dim, **kw, name="ff")(modulate(x, shift_mlp, scale_mlp).astype(self.dtype))
        x = x + gate_mlp[:, None] * ff.astype(jnp.float32)
        context = context + c_gate[:, None] * c_out.astype(jnp.float32)
        c_ff = FeedForward(dim, **kw, name="ff_context")(
            modulate(context, c_shift_mlp, c_scale_mlp).astype(self.dtype))
        context = context + c_gate_mlp[:, None] * c_ff.astype(jnp.float32)
        return x, context


class FluxSingleTransformerBlock(nn.Module):
    """A single-stream block on [text; image]: one AdaLN-Zero (`norm`: shift, scale, gate), attention and a
    GELU-tanh MLP in parallel, both projected back by one `proj_out`, a gated residual."""

    config: FluxConfig
    attention_impl: str = "auto"
    mlp_ratio: float = 4.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, temb, cos, sin):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        shift, scale, gate = jnp.split(_AdaLNLinear(3 * cfg.inner_dim, **kw, name="norm")(temb), 3, axis=-1)
        h = modulate(x, shift, scale).astype(self.dtype)
        mlp = jax.nn.gelu(_dense(int(cfg.inner_dim * self.mlp_ratio), "proj_mlp", **kw)(h), approximate=True)
        attn = FluxAttention(cfg.num_attention_heads, cfg.attention_head_dim, self.attention_impl, **kw,
                             name="attn")(h, cos, sin)
        out = _dense(cfg.inner_dim, "proj_out", **kw)(jnp.concatenate([attn, mlp.astype(attn.dtype)], -1))
        return x + gate[:, None] * out.astype(jnp.float32)


class _AdaLNLinear(nn.Module):
    """diffusers' `AdaLayerNormZero*.linear` on silu(temb), returned in float32 (the modulation)."""

    features: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, temb):
        out = _dense(self.features, "linear", self.dtype, self.param_dtype)(nn.silu(temb))
        return out.astype(jnp.float32)


class FluxTransformer2DModel(nn.Module):
    """diffusers' `FluxTransformer2DModel`: packed latent tokens -> the velocity prediction, same shape.

    Attributes:
      config: the architecture.
      dtype: compute dtype (see the module docstring for what stays float32).
      param_dtype: storage dtype of the params.
      attention_impl: see `models.attention.dot_product_attention`.
      remat: recompute each block's activations in the backward pass.
    """

    config: FluxConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_impl: str = "auto"
    remat: bool = False

    @nn.compact
    def __call__(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
                 guidance=None):
        """Args (diffusers' names):
          hidden_states: [B, S_img, in_channels] packed latents.
          encoder_hidden_states: [B, S_txt, joint_attention_dim] T5 states.
          pooled_projections: [B, pooled_projection_dim] CLIP's pooled output.
          timestep: [B] sigma in [0, 1] (scaled by 1000 here, as diffusers).
          img_ids: [S_img, 3] and txt_ids [S_txt, 3] position ids (NumPy for float64 tables).
          guidance: [B] the guidance scale (required when `config.guidance_embeds`, else ignored).

        Returns: [B, S_img, patch_size^2 * out_channels] in the compute dtype.
        """
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        dim = cfg.inner_dim
        x = _dense(dim, "x_embedder", **kw)(hidden_states.astype(self.dtype)).astype(jnp.float32)
        context = _dense(dim, "context_embedder", **kw)(encoder_hidden_states.astype(self.dtype))
        context = context.astype(jnp.float32)

        # The conditioning vector: diffusers casts t * 1000 to the compute dtype before the sinusoids
        time_embed = _TimeTextEmbed(cfg, **kw, name="time_text_embed")
        if cfg.guidance_embeds and guidance is None:
            raise UsageError("this Flux transformer has a guidance embedding (guidance_embeds): "
                             "pass guidance=")
        temb = time_embed(timestep, pooled_projections, guidance if cfg.guidance_embeds else None)

        xp = np if isinstance(img_ids, np.ndarray) and isinstance(txt_ids, np.ndarray) else jnp
        cos, sin = rope_tables(xp.concatenate([txt_ids, img_ids], axis=0), cfg.axes_dims_rope)

        double = nn.remat(FluxTransformerBlock) if self.remat else FluxTransformerBlock
        single = nn.remat(FluxSingleTransformerBlock) if self.remat else FluxSingleTransformerBlock
        for i in range(cfg.num_layers):
            x, context = double(cfg, self.attention_impl, **kw, name=f"transformer_blocks_{i}")(
                x, context, temb, cos, sin)
        n_text = context.shape[1]
        x = jnp.concatenate([context, x], axis=1)
        for i in range(cfg.num_single_layers):
            block = single(cfg, self.attention_impl, **kw, name=f"single_transformer_blocks_{i}")
            x = block(x, temb, cos, sin)
        x = x[:, n_text:]

        # norm_out (AdaLayerNormContinuous): scale first, then shift
        scale, shift = jnp.split(_AdaLNLinear(2 * dim, **kw, name="norm_out")(temb), 2, axis=-1)
        x = modulate(x, shift, scale).astype(self.dtype)
        return _dense(cfg.output_channels, "proj_out", **kw)(x)


class _TimeTextEmbed(nn.Module):
    """`time_text_embed`: sinusoids of t (and of the guidance) through MLPs, plus the pooled text MLP."""

    config: FluxConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, timestep, pooled, guidance=None):
        dim, kw = self.config.inner_dim, dict(dtype=self.dtype, param_dtype=self.param_dtype)

        def sinusoids(value):
            scaled = (jnp.asarray(value).astype(self.dtype) * 1000).astype(jnp.float32)
            return timestep_embedding(scaled, 256, flip_sin_to_cos=True, freq_shift=0).astype(self.dtype)

        temb = TimestepEmbedding(dim, **kw, name="timestep_embedder")(sinusoids(timestep))
        if guidance is not None:
            temb = temb + TimestepEmbedding(dim, **kw, name="guidance_embedder")(sinusoids(guidance))
        temb = temb + TimestepEmbedding(dim, **kw, name="text_embedder")(pooled.astype(self.dtype))
        return temb


def pack_latents(latents):
    """[B, H, W, C] NHWC latents -> [B, (H/2)(W/2), 4C] tokens, each 2x2 patch's channels in diffusers'
    order (c, dy, dx), rows of patches first."""
    b, h, w, c = latents.shape
    x = latents.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 5, 2, 4)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens, height: int, width: int):
    """The inverse of `pack_latents`: [B, (H/2)(W/2), 4C] -> [B, H, W, C] for latent height and width."""
    b, _, c4 = tokens.shape
    c = c4 // 4
    x = tokens.reshape(b, height // 2, width // 2, c, 2, 2).transpose(0, 1, 4, 2, 5, 3)
    return x.reshape(b, height, width, c)


def image_ids(height: int, width: int) -> np.ndarray:
    """[(H/2)(W/2), 3] ids (0, row, col) of the packed tokens of [H, W] latents (diffusers'
    `_prepare_latent_image_ids`)."""
    rows, cols = np.meshgrid(np.arange(height // 2), np.arange(width // 2), indexing="ij")
    return np.stack([np.zeros_like(rows), rows, cols], axis=-1).reshape(-1, 3).astype(np.float32)


def text_ids(length: int) -> np.ndarray:
    return np.zeros((length, 3), np.float32)


def dummy_inputs(config: FluxConfig, batch: int = 1, latent_size: int = 4, text_len: int = 8):
    """Arguments of one call, zeros (for `init` and shape evaluation)."""
    tokens = (latent_size // 2) ** 2
    return (jnp.zeros((batch, tokens, config.in_channels)),
            jnp.zeros((batch, text_len, config.joint_attention_dim)),
            jnp.zeros((batch, config.pooled_projection_dim)), jnp.zeros((batch,)),
            image_ids(latent_size, latent_size), text_ids(text_len),
            jnp.ones((batch,)) if config.guidance_embeds else None)


def abstract_params(config: FluxConfig):
    """The float32 param tree's shapes (`jax.eval_shape`, no memory used), as the loader's target."""
    model = FluxTransformer2DModel(config)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), *dummy_inputs(config)))["params"]
