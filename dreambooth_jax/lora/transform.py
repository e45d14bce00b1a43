"""LoRA (Hu et al. 2021) as a parameter transform on the existing Flax modules.

The base params are never touched: the LoRA factors live in their own tree, {'/'-joined Flax module path:
{'A': [in, rank], 'B': [rank, out]}}, and `apply` runs the unchanged module with every targeted `nn.Dense`
intercepted (`nn.intercept_methods`) to add `scale * (x @ A) @ B`. The factors travel as a separate variable
collection, so Flax threads them through `nn.remat` and any other lifted transform like the params.

    lora_params = init_lora(params, UNET_TARGETS, LoraConfig(rank=4), rng)
    out = apply(unet, params, lora_params, config, latents, t, context)     # train: grad w.r.t. lora_params
    merged = merge(params, lora_params, config)                              # W + scale * A @ B

File formats (diffusers/PEFT, kohya) are in `dreambooth_jax.lora.formats`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from dreambooth_jax.errors import UsageError
from dreambooth_jax.weights import convert

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # diffusers' train_dreambooth_lora defaults
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
# diffusers' train_dreambooth_lora_flux defaults; by suffix, so the single-stream blocks' attn.to_q/k/v too
FLUX_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                "ff_context.net.2")

_COLLECTION = "lora"  # the variable collection that carries the factors into `module.apply`
_DROPOUT_RNG = "lora_dropout"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """rank r, alpha (None -> r, i.e. scale 1) and dropout on the LoRA input; the update is (alpha / r) A
    B."""

    rank: int = 4
    alpha: float | None = None
    dropout: float = 0.0

    def __post_init__(self):
        if self.rank < 1:
            raise UsageError(f"LoRA rank must be >= 1, got {self.rank}")
        if self.alpha is not None and self.alpha <= 0:
            raise UsageError(f"LoRA alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise UsageError(f"LoRA dropout must be in [0, 1), got {self.dropout}")

    @property
    def scale(self) -> float:
        return (self.rank if self.alpha is None else self.alpha) / self.rank


def torch_name(key: str) -> str:
    """'down_blocks_0/.../to_out_0' -> 'down_blocks.0....to_out.0' (the PyTorch module name)."""
    return convert.torch_key((*key.split("/"), "kernel"))[: -len(".weight")]


def flax_key(torch_name: str) -> str:
    return re.sub(r"\.(\d+)(?=\.|$)", r"_\1", torch_name).replace(".", "/")


def target_paths(params, targets: Sequence[str]) -> list[tuple[str, ...]]:
    """Module paths of the Dense layers whose PyTorch name ends with one of `targets` (whole components).

    E.g. 'to_out.0' matches 'down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0'. Raises a
    ValueError listing the available Dense names when nothing matches.
    """
    if isinstance(targets, str):
        targets = (targets,)
    found, names = [], set()
    for path, leaf in traverse_util.flatten_dict(params).items():
        if path[-1] != "kernel" or len(leaf.shape) != 2:
            continue
        name = torch_name("/".join(path[:-1]))
        names.add(re.sub(r"^.*?([^.]+(\.\d+)?)$", r"\1", name))
        if any(name == t or name.endswith("." + t) for t in targets):
            found.append(path[:-1])
    if not found:
        raise UsageError(f"no Dense layer matches the LoRA targets {list(targets)}; available layer names: "
                         f"{', '.join(sorted(names)[:20])}")
    return found


def init_lora(params, targets: Sequence[str], config: LoraConfig, rng) -> dict:
    """A float32 LoRA tree for `targets`: A ~ U(+-1/sqrt(in)) (PEFT's kaiming-uniform, a=sqrt(5)), B = 0."""
    flat = traverse_util.flatten_dict(params)
    out = {}
    for i, path in enumerate(target_paths(params, targets)):
        d_in, d_out = flat[(*path, "kernel")].shape
        bound = 1.0 / np.sqrt(d_in)
        a = jax.random.uniform(jax.random.fold_in(rng, i), (d_in, config.rank), jnp.float32, -bound, bound)
        out["/".join(path)] = {"A": a, "B": jnp.zeros((config.rank, d_out), jnp.float32)}
    return out


def check(base_params, lora_params) -> None:
    """Raises a ValueError naming the layer when a LoRA layer is not a Dense of the model or mis-shaped."""
    flat = traverse_util.flatten_dict(base_params)
    for key, ab in lora_params.items():
        kernel = flat.get((*key.split("/"), "kernel"))
        a, b = ab["A"], ab["B"]
        if kernel is None or len(kernel.shape) != 2:
            raise UsageError(f"LoRA layer {torch_name(key)!r} is not a Linear layer of this model "
                             "(a LoRA for another architecture?)")
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0] or (a.shape[0], b.shape[1]) != kernel.shape:
            raise UsageError(
                f"LoRA layer {torch_name(key)!r}: A {tuple(a.shape)} @ B {tuple(b.shape)} does not fit the "
                f"model's [in, out] = {tuple(kernel.shape)} (a LoRA for another architecture?)")


def _interceptor(config: LoraConfig, scale, dropout: bool):
    def intercept(next_fun, args, kwargs, context):
        y = next_fun(*args, **kwargs)
        module = context.module
        if (context.method_name != "__call__" or not isinstance(module, nn.Dense)
                or not module.has_variable(_COLLECTION, "A")):
            return y
        # The LoRA branch runs in float32 whatever the compute dtype (it is small: rank columns), then is
        # cast to the Dense output's dtype, like PEFT under autocast.
        h = (args[0] if args else kwargs["inputs"]).astype(jnp.float32)
        if dropout:
            keep = jax.random.bernoulli(module.make_rng(_DROPOUT_RNG), 1.0 - config.dropout, h.shape)
            h = jnp.where(keep, h / (1.0 - config.dropout), 0.0)
        a, b = module.get_variable(_COLLECTION, "A"), module.get_variable(_COLLECTION, "B")
        delta = (h @ a.astype(jnp.float32)) @ b.astype(jnp.float32)
        return y + (scale * config.scale * delta).astype(y.dtype)

    return intercept


def apply(module, base_params, lora_params, config: LoraConfig, *args, method=None, dropout_rng=None,
          scale: float = 1.0, **kwargs):
    """`module.apply({'params': base_params}, *args, method=method, **kwargs)` with LoRA on the targeted
    Denses.

    Each Dense whose path is a key of `lora_params` computes y = dense(x) + scale * config.scale *
    dropout(x) @ A @ B, the LoRA branch in float32 and cast to y's dtype. Dropout only when `dropout_rng` is
    given and config.dropout > 0 (a mask per layer and call). Works under jit, grad (w.r.t. `lora_params`)
    and `nn.remat`: the factors enter as the variable collection 'lora', nested like the params.
    """
    check(base_params, lora_params)
    nested = traverse_util.unflatten_dict({(*k.split("/"), n): v for k, ab in lora_params.items()
                                           for n, v in ab.items()})
    use_dropout = dropout_rng is not None and config.dropout > 0
    rngs = dict(kwargs.pop("rngs", None) or {}, **({_DROPOUT_RNG: dropout_rng} if use_dropout else {}))
    with nn.intercept_methods(_interceptor(config, scale, use_dropout)):
        return module.apply({"params": base_params, _COLLECTION: nested}, *args, method=method,
                            rngs=rngs or None, **kwargs)


def merge(base_params, lora_params, config: LoraConfig, scale: float = 1.0) -> dict:
    """`base_params` with W <- W + scale * config.scale * A @ B on every LoRA layer (sum in float32, stored
    in W's dtype). jnp, jit-able; host (NumPy) weights come back as NumPy, merged one layer at a time on the
    device (the same operations, so bit-identical to merging device weights), so that a model loaded to the
    host for sharding never lands whole on one device. The input tree is not modified."""
    check(base_params, lora_params)
    flat = dict(traverse_util.flatten_dict(base_params))
    for key, ab in lora_params.items():
        path = (*key.split("/"), "kernel")
        w = flat[path]
        delta = jnp.asarray(ab["A"], jnp.float32) @ jnp.asarray(ab["B"], jnp.float32)
        merged = (jnp.asarray(w).astype(jnp.float32) + scale * config.scale * delta).astype(w.dtype)
        flat[path] = np.asarray(merged) if isinstance(w, np.ndarray) else merged
    return traverse_util.unflatten_dict(flat)
