"""`UNet2DConditionModel` of Stable Diffusion 1.x / 2.x / XL in Flax, parameter-compatible with diffusers."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dreambooth_jax.errors import UsageError
from dreambooth_jax.models.blocks import GroupNorm, conv
from dreambooth_jax.models.unet_blocks import DownBlock, MidBlock, UpBlock

IntOrTuple = int | tuple[int, ...]

# diffusers config keys that do not change the parameters or the maths of inference/training here.
_IGNORED_KEYS = {"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values", "dropout",
                 "sample_size", "num_class_embeds", "addition_embed_type_num_heads"}
# Architecture options we do not implement: key -> the values we accept (their diffusers defaults).
_UNSUPPORTED = {
    "class_embed_type": (None,), "time_embedding_type": ("positional",), "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,), "dual_cross_attention": (False,),
    "resnet_time_scale_shift": ("default",),
    "attention_type": ("default",), "time_cond_proj_dim": (None,), "only_cross_attention": (False,),
    "act_fn": ("silu",), "time_embedding_act_fn": (None,), "timestep_post_act": (None,),
    "reverse_transformer_layers_per_block": (None,), "cross_attention_norm": (None,),
    "resnet_skip_time_act": (False,), "resnet_out_scale_factor": (1.0, 1),
    "class_embeddings_concat": (False,),
    "mid_block_only_cross_attention": (None, False), "mid_block_type": ("UNetMidBlock2DCrossAttn",),
    "time_embedding_dim": (None,), "addition_embed_type": (None, "text_time"),
}
_DOWN_TYPES = ("DownBlock2D", "CrossAttnDownBlock2D")
_UP_TYPES = ("UpBlock2D", "CrossAttnUpBlock2D")


def _per_block(value, n: int, name: str) -> tuple:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise UsageError(f"unet config: `{name}` has {len(value)} entries for {n} blocks")
        return tuple(value)
    return (value,) * n


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """The architecture fields of a diffusers `UNet2DConditionModel` config (names and values as there)."""

    in_channels: int = 4
    out_channels: int = 4
    sample_size: int | None = 64
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: IntOrTuple = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: IntOrTuple = 1280
    transformer_layers_per_block: IntOrTuple = 1
    attention_head_dim: IntOrTuple = 8
    num_attention_heads: IntOrTuple | None = None
    use_linear_projection: bool = False
    upcast_attention: bool = False
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3

    def __post_init__(self):
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise UsageError("unet config: down_block_types, up_block_types and block_out_channels differ in "
                             "length")
        for t in self.down_block_types:
            if t not in _DOWN_TYPES:
                raise UsageError(f"unet config: unsupported down block type {t!r} (supported: {_DOWN_TYPES})")
        for t in self.up_block_types:
            if t not in _UP_TYPES:
                raise UsageError(f"unet config: unsupported up block type {t!r} (supported: {_UP_TYPES})")
        if self.addition_embed_type == "text_time" and not (
            self.addition_time_embed_dim and self.projection_class_embeddings_input_dim
        ):
            raise UsageError("unet config: addition_embed_type='text_time' needs addition_time_embed_dim and "
                             "projection_class_embeddings_input_dim")
        for name in ("layers_per_block", "cross_attention_dim", "transformer_layers_per_block",
                     "attention_head_dim"):
            _per_block(getattr(self, name), n, name)
        if any(isinstance(v, (list, tuple)) for v in _per_block(self.transformer_layers_per_block, n, "")):
            raise UsageError("unet config: nested transformer_layers_per_block (asymmetric UNets) is not "
                             "supported")

    @property
    def num_blocks(self) -> int:
        return len(self.block_out_channels)

    def per_block(self, name: str) -> tuple:
        return _per_block(getattr(self, name), self.num_blocks, name)

    @property
    def heads_per_block(self) -> tuple[int, ...]:
        # diffusers' historical naming: `attention_head_dim` holds the number of heads when
        # `num_attention_heads` is unset (SD 1.x/2.x/XL configs all rely on this).
        value = self.num_attention_heads if self.num_attention_heads is not None else self.attention_head_dim
        return _per_block(value, self.num_blocks, "num_attention_heads")

    @property
    def time_embed_dim(self) -> int:
        return self.block_out_channels[0] * 4

    @classmethod
    def from_diffusers_config(cls, config: dict[str, Any]) -> UNetConfig:
        """Reads a diffusers `unet/config.json` dict; unknown or unsupported architecture keys raise."""
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in config.items():
            if key in _UNSUPPORTED and value not in _UNSUPPORTED[key]:
                raise UsageError(f"unet config: `{key}={value!r}` is not supported (supported: "
                                 f"{_UNSUPPORTED[key]})")
            if key in fields:
                kwargs[key] = tuple(value) if isinstance(value, list) else value
            elif key not in _IGNORED_KEYS and key not in _UNSUPPORTED:
                raise UsageError(f"unet config: unknown key `{key}` (would change the architecture?)")
        return cls(**kwargs)

    def to_diffusers_config(self) -> dict[str, Any]:
        d = {"_class_name": "UNet2DConditionModel"}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            d[f.name] = list(value) if isinstance(value, tuple) else value
        return d


def timestep_embedding(timesteps, dim: int, *, flip_sin_to_cos: bool, freq_shift: float, max_period=10000):
    """Sinusoidal embedding of (possibly fractional) timesteps [N] -> [N, dim], float32 (as diffusers)."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """`linear_1` -> silu -> `linear_2`."""

    dim: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.silu(nn.Dense(self.dim, **kw, name="linear_1")(x))
        return nn.Dense(self.dim, **kw, name="linear_2")(h)


class UNet2DConditionModel(nn.Module):
    """Predicts noise (or v, or x0) from noisy latents, timesteps and text embeddings.

    Attributes:
      config: the architecture.
      dtype / param_dtype: compute and storage dtypes.
      remat: gradient checkpointing of every down/mid/up block (`nn.remat`).
      attention_impl: see `dreambooth_jax.models.attention.ATTENTION_IMPLS`.
      fused_norm: GroupNorm (+ SiLU) as one Pallas kernel (`dreambooth_jax.kernels.group_norm`).
    """

    config: UNetConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    remat: bool = False
    attention_impl: str = "einsum"
    fused_norm: bool | str = False

    @nn.compact
    def __call__(self, sample, timesteps, encoder_hidden_states, *, text_embeds=None, time_ids=None):
        """
        Args:
          sample: [B, h, w, C] noisy latents (NHWC).
          timesteps: scalar or [B].
          encoder_hidden_states: [B, S, D] text embeddings.
          text_embeds, time_ids: SDXL added conditions ([B, P] pooled text embedding, [B, 6]).

        Returns:
          [B, h, w, out_channels] in the compute dtype.
        """
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b = sample.shape[0]
        timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (b,))
        t_emb = timestep_embedding(timesteps, cfg.block_out_channels[0], flip_sin_to_cos=cfg.flip_sin_to_cos,
                                   freq_shift=cfg.freq_shift).astype(self.dtype)
        emb = TimestepEmbedding(cfg.time_embed_dim, **kw, name="time_embedding")(t_emb)
        if cfg.addition_embed_type == "text_time":
            if text_embeds is None or time_ids is None:
                raise UsageError("this UNet (addition_embed_type='text_time', SDXL) needs text_embeds and "
                                 "time_ids")
            time_embeds = timestep_embedding(time_ids.reshape(-1), cfg.addition_time_embed_dim,
                                             flip_sin_to_cos=cfg.flip_sin_to_cos, freq_shift=cfg.freq_shift)
            add = jnp.concatenate([text_embeds.astype(jnp.float32), time_embeds.reshape(b, -1)], axis=-1)
            add_embedding = TimestepEmbedding(cfg.time_embed_dim, **kw, name="add_embedding")
            emb = emb + add_embedding(add.astype(self.dtype))

        context = encoder_hidden_states.astype(self.dtype)
        x = sample.astype(self.dtype)
        if cfg.center_input_sample:
            x = 2 * x - 1.0
        x = conv(cfg.block_out_channels[0], cfg.conv_in_kernel, **kw, name="conv_in")(x)

        block = dict(groups=cfg.norm_num_groups, eps=cfg.norm_eps,
                     use_linear_projection=cfg.use_linear_projection, upcast_attention=cfg.upcast_attention,
                     attention_impl=self.attention_impl, fused_norm=self.fused_norm, **kw)
        wrap = (lambda cls: nn.remat(cls)) if self.remat else (lambda cls: cls)  # noqa: E731
        heads, layers = cfg.heads_per_block, cfg.per_block("layers_per_block")
        tlayers = cfg.per_block("transformer_layers_per_block")
        skips = [x]
        for i, kind in enumerate(cfg.down_block_types):
            x, states = wrap(DownBlock)(
                cfg.block_out_channels[i], layers[i],
                heads=heads[i] if kind.startswith("CrossAttn") else None, transformer_layers=tlayers[i],
                add_downsample=i < cfg.num_blocks - 1, downsample_padding=cfg.downsample_padding, **block,
                name=f"down_blocks_{i}",
            )(x, emb, context)
            skips.extend(states)

        # The mid block has one (transformer, resnet) pair after its first resnet, as in diffusers.
        mid = wrap(MidBlock)(cfg.block_out_channels[-1], 1, heads=heads[-1], transformer_layers=tlayers[-1],
                             output_scale_factor=cfg.mid_block_scale_factor, **block, name="mid_block")
        x = mid(x, emb, context)
        for i, kind in enumerate(cfg.up_block_types):
            r = cfg.num_blocks - 1 - i  # the matching down block
            n = layers[r] + 1
            block_skips, skips = tuple(skips[-n:]), skips[:-n]
            upsample_size = tuple(skips[-1].shape[1:3]) if i < cfg.num_blocks - 1 else None
            x = wrap(UpBlock)(
                cfg.block_out_channels[r], n, heads=heads[r] if kind.startswith("CrossAttn") else None,
                transformer_layers=tlayers[r], add_upsample=i < cfg.num_blocks - 1,
                upsample_size=upsample_size, **block, name=f"up_blocks_{i}",
            )(x, block_skips, emb, context)

        x = GroupNorm(cfg.norm_num_groups, cfg.norm_eps, "silu", self.fused_norm, **kw,
                      name="conv_norm_out")(x)
        return conv(cfg.out_channels, cfg.conv_out_kernel, **kw, name="conv_out")(x)


def dummy_inputs(config: UNetConfig, batch: int = 1, seq_len: int = 77):
    """Inputs of the right shapes for `init` / `jax.eval_shape`."""
    size = config.sample_size if isinstance(config.sample_size, int) and config.sample_size else 64
    cross = config.per_block("cross_attention_dim")[0]
    args = (jnp.zeros((batch, size, size, config.in_channels)), jnp.zeros((batch,), jnp.int32),
            jnp.zeros((batch, seq_len, cross)))
    kwargs = {}
    if config.addition_embed_type == "text_time":
        n_time = 6
        kwargs = dict(
            text_embeds=jnp.zeros((batch, config.projection_class_embeddings_input_dim
                                   - n_time * config.addition_time_embed_dim)),
            time_ids=jnp.zeros((batch, n_time)),
        )
    return args, kwargs


def abstract_params(config: UNetConfig):
    """The float32 param tree of `config` as `jax.ShapeDtypeStruct`s (no memory used)."""
    args, kwargs = dummy_inputs(config)
    model = UNet2DConditionModel(config)
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *args, **kwargs))["params"]
