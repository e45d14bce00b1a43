"""The CLIP text encoder of Stable Diffusion (transformers' `CLIPTextModel[WithProjection]`) in Flax.

Submodule names mirror the PyTorch attribute paths without the `text_model.` prefix
(`encoder/layers_0/self_attn/q_proj`), so `convert.state_dict_to_params` loads transformers checkpoints
directly. The residual stream is kept in float32 whatever the compute dtype, as PyTorch autocast does
(its LayerNorms return float32), so bf16 compute stays close to the fp32 reference.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from dreambooth_jax.errors import UsageError
from dreambooth_jax.models.attention import dot_product_attention

# State-dict keys without a param: transformers < 4.31 saved the `position_ids` buffer (SD 1.x on the Hub has
# it). Pass as `convert.state_dict_to_params(..., ignore=IGNORED_KEYS)`.
IGNORED_KEYS = (r"(^|\.)embeddings\.position_ids$",)

ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # torch's exact erf GELU
}


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """Architecture of a CLIP text encoder; defaults are transformers' `CLIPTextConfig` defaults."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int | None = 512
    eos_token_id: int = 49407
    bos_token_id: int | None = 49406
    pad_token_id: int | None = 1

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise UsageError(f"hidden_act={self.hidden_act!r} is not supported; expected one of "
                             f"{sorted(ACTIVATIONS)}")
        if self.hidden_size % self.num_attention_heads:
            raise UsageError(
                f"num_attention_heads={self.num_attention_heads} does not divide "
                f"hidden_size={self.hidden_size}"
            )
        if not isinstance(self.eos_token_id, int):
            raise UsageError(f"eos_token_id={self.eos_token_id!r} is not supported; expected a single int")

    @classmethod
    def from_diffusers_config(cls, d: dict) -> CLIPTextConfig:
        """Reads a transformers `config.json` dict of a `CLIPTextModel[WithProjection]`.

        Keys that do not change the architecture (dropout, initializers, dtype, versions) are ignored;
        an unsupported value of an architecture key raises a ValueError that names the key.
        """
        model_type = d.get("model_type", "clip_text_model")
        if model_type != "clip_text_model":
            raise UsageError(f"model_type={model_type!r} is not supported; expected 'clip_text_model'")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_diffusers_config(self, with_projection: bool) -> dict:
        """A `config.json` dict that transformers' `CLIPTextModel[WithProjection].from_pretrained` reads."""
        arch = "CLIPTextModelWithProjection" if with_projection else "CLIPTextModel"
        return {"architectures": [arch], "model_type": "clip_text_model", **dataclasses.asdict(self)}


# Full-size encoders of the Stable Diffusion checkpoints on the Hub (their `config.json` architecture keys).
_OPENAI_L14 = CLIPTextConfig(
    hidden_size=768, intermediate_size=3072, num_attention_heads=12, projection_dim=768,
    eos_token_id=2, bos_token_id=0, pad_token_id=1,
)
PRESETS = {
    "sd1": _OPENAI_L14,  # openai/clip-vit-large-patch14
    "sd2": dataclasses.replace(  # OpenCLIP ViT-H/14, last layer already dropped
        _OPENAI_L14, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
        hidden_act="gelu", projection_dim=512,
    ),
    "sdxl": _OPENAI_L14,
    "sdxl_2": dataclasses.replace(  # OpenCLIP ViT-bigG/14, with projection
        _OPENAI_L14, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
        hidden_act="gelu", projection_dim=1280,
    ),
}


class CLIPTextOutput(NamedTuple):
    """Outputs in the compute dtype. `hidden_states`: (embeddings, after layer 1, ..., after layer L),
    before the final layer norm, as transformers' `output_hidden_states=True` (SD2/SDXL use [-2])."""

    last_hidden_state: Any  # [B, T, D], after the final layer norm
    pooler_output: Any  # [B, D], last_hidden_state at the EOS token
    hidden_states: tuple
    text_embeds: Any = None  # [B, P], `text_projection(pooler_output)` (projection model only)


class CLIPTextEmbeddings(nn.Module):
    config: CLIPTextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        init = nn.initializers.normal(0.02)
        seq_len = input_ids.shape[-1]
        if seq_len > cfg.max_position_embeddings:
            raise UsageError(f"sequence length {seq_len} exceeds "
                             f"max_position_embeddings={cfg.max_position_embeddings}")
        tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size, embedding_init=init, **kw, name="token_embedding")
        positions = nn.Embed(
            cfg.max_position_embeddings, cfg.hidden_size, embedding_init=init, **kw, name="position_embedding"
        )
        return (tokens(input_ids).astype(jnp.float32)
                + positions(jnp.arange(seq_len))[None].astype(jnp.float32))


class CLIPAttention(nn.Module):
    config: CLIPTextConfig
    attention_impl: str = "einsum"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask):
        cfg = self.config
        heads, dim = cfg.num_attention_heads, cfg.hidden_size
        dense = lambda name: nn.Dense(dim, dtype=self.dtype, param_dtype=self.param_dtype,  # noqa: E731
                                      name=name)
        split = lambda t: t.reshape(*t.shape[:2], heads, dim // heads)  # noqa: E731  [B, T, N, H]
        q, k, v = (split(dense(name)(x)) for name in ("q_proj", "k_proj", "v_proj"))
        out = dot_product_attention(q, k, v, mask=mask, implementation=self.attention_impl, upcast=True)
        return dense("out_proj")(out.reshape(*out.shape[:2], dim))


class CLIPMLP(nn.Module):
    config: CLIPTextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.Dense(cfg.intermediate_size, **kw, name="fc1")(x)
        h = ACTIVATIONS[cfg.hidden_act](h.astype(jnp.float32)).astype(self.dtype)
        return nn.Dense(cfg.hidden_size, **kw, name="fc2")(h)


class CLIPEncoderLayer(nn.Module):
    """Pre-LN transformer block; `x` is the float32 residual stream [B, T, D]."""

    config: CLIPTextConfig
    attention_impl: str = "einsum"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.LayerNorm(cfg.layer_norm_eps, **kw, name="layer_norm1")(x)
        x = x + CLIPAttention(cfg, self.attention_impl, **kw, name="self_attn")(h, mask).astype(jnp.float32)
        h = nn.LayerNorm(cfg.layer_norm_eps, **kw, name="layer_norm2")(x)
        return x + CLIPMLP(cfg, **kw, name="mlp")(h).astype(jnp.float32)


class CLIPEncoder(nn.Module):
    config: CLIPTextConfig
    attention_impl: str = "einsum"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask):
        """Returns the residual stream before the first layer and after each layer."""
        states = [x]
        for i in range(self.config.num_hidden_layers):
            layer = CLIPEncoderLayer(self.config, self.attention_impl, self.dtype, self.param_dtype,
                                     name=f"layers_{i}")
            states.append(layer(states[-1], mask))
        return states


class CLIPTextModel(nn.Module):
    """transformers' `CLIPTextModel`: token ids [B, T] -> `CLIPTextOutput`.

    Attributes:
      config: the architecture.
      dtype: compute dtype; layer-norm statistics, softmax and the residual stream stay in float32.
      param_dtype: storage dtype of the params.
      attention_impl: one of `attention.ATTENTION_IMPLS`.
    """

    config: CLIPTextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_impl: str = "einsum"
    with_projection: ClassVar[bool] = False

    @nn.compact
    def __call__(self, input_ids, attention_mask=None) -> CLIPTextOutput:
        """Args: input_ids [B, T] ints; attention_mask [B, T], 1 = token, 0 = padding (combined with the
        causal mask, which always applies)."""
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        seq_len = input_ids.shape[-1]
        mask = jnp.tril(jnp.ones((seq_len, seq_len), jnp.bool_))[None, None]  # [1, 1, T, S]
        if attention_mask is not None:
            mask = mask & attention_mask.astype(jnp.bool_)[:, None, None, :]  # [B, 1, T, S]
        x = CLIPTextEmbeddings(cfg, **kw, name="embeddings")(input_ids)
        states = CLIPEncoder(cfg, self.attention_impl, **kw, name="encoder")(x, mask)
        last = nn.LayerNorm(cfg.layer_norm_eps, **kw, name="final_layer_norm")(states[-1])
        if cfg.eos_token_id == 2:
            # Old configs carry a wrong eos_token_id; transformers then pools at the largest id (the EOS of
            # the original vocabulary), and so must we to match their checkpoints.
            eos_pos = jnp.argmax(input_ids, axis=-1)
        else:
            eos_pos = jnp.argmax((input_ids == cfg.eos_token_id).astype(jnp.int32), axis=-1)  # first EOS
        pooled = last[jnp.arange(last.shape[0]), eos_pos]  # [B, D]
        text_embeds = None
        if self.with_projection:
            text_embeds = nn.Dense(cfg.projection_dim, use_bias=False, **kw, name="text_projection")(pooled)
        return CLIPTextOutput(
            last_hidden_state=last,
            pooler_output=pooled,
            hidden_states=tuple(s.astype(self.dtype) for s in states),
            text_embeds=text_embeds,
        )


class CLIPTextModelWithProjection(CLIPTextModel):
    """transformers' `CLIPTextModelWithProjection` (SDXL's second encoder): adds `text_embeds`."""

    with_projection: ClassVar[bool] = True


def abstract_params(config: CLIPTextConfig, with_projection: bool = False):
    """The float32 param tree's shapes (`jax.eval_shape`, no memory used), as the loader's target."""
    model = (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)
    ids = jnp.zeros((1, config.max_position_embeddings), jnp.int32)
    return jax.eval_shape(model.init, jax.random.key(0), ids)["params"]
