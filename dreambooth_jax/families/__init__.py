"""Model families: one module per family (`sd`, `sdxl`, `flux`) and the registry from a pipeline's
`_class_name` to its family. The only place that knows which family a pipeline is; see `base.Family` for what
a family answers."""

from __future__ import annotations

import os

from dreambooth_jax.errors import UsageError
from dreambooth_jax.families import components
from dreambooth_jax.families.base import Family
from dreambooth_jax.families.flux import FLUX, FLUX_SCHNELL
from dreambooth_jax.families.sd import SD
from dreambooth_jax.families.sdxl import SDXL
from dreambooth_jax.fileio import read_json

# Flux.1-schnell shares FluxPipeline with dev: `Family.specialize` tells them apart once the models load
FAMILIES = {f.pipeline_class: f for f in (SD, SDXL, FLUX)}


def for_class_name(class_name: str | None, source: str = "model_index.json") -> Family:
    """The family of a pipeline class (model_index.json's `_class_name`); UsageError for any other."""
    if class_name not in FAMILIES:
        raise UsageError(f"{source}: pipeline class {class_name!r} is not supported "
                         f"(supported: {', '.join(FAMILIES)})")
    return FAMILIES[class_name]


def weight_folders() -> tuple[str, ...]:
    """Every component folder some family reads weights from (what is fetched of a pipeline repository)."""
    return tuple(dict.fromkeys(name for f in FAMILIES.values() for name in f.components))


def kind_of_folder(name: str, folder: str | None = None) -> str:
    """The component kind a folder name stands for in the families that have it (`load_component(folder,
    name)`). A name of several kinds (`text_encoder_2`: SDXL's projected CLIP, Flux's T5) is told by the
    class its `folder`'s config.json names."""
    kinds: dict[str, list[str]] = {}
    for f in FAMILIES.values():
        for n, k in f.components.items():
            kinds.setdefault(n, []).append(k)
    if name not in kinds:
        raise UsageError(f"unknown component {name!r}; expected one of {', '.join(kinds)}")
    candidates = list(dict.fromkeys(kinds[name]))
    if len(candidates) == 1 or folder is None:
        return candidates[0]
    config = read_json(os.path.join(folder, "config.json"))
    named = {config.get("_class_name"), *(config.get("architectures") or ())}
    for kind in candidates:
        if components.KINDS[kind].class_name in named:
            return kind
    if config.get("model_type") == "t5" and "t5" in candidates:  # e.g. saved as T5ForConditionalGeneration
        return "t5"
    # CLIP, whichever class it was saved as: `build_module` reads a projection from its config
    return next(k for k in candidates if k != "t5")


__all__ = ["FAMILIES", "FLUX", "FLUX_SCHNELL", "Family", "SD", "SDXL", "for_class_name", "kind_of_folder",
           "weight_folders"]
