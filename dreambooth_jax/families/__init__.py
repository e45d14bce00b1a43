"""Model families: one module per family (`sd`, `sdxl`) and the registry from a pipeline's `_class_name` to
its family. The only place that knows which family a pipeline is; see `base.Family` for what a family
answers."""

from __future__ import annotations

from dreambooth_jax.errors import UsageError
from dreambooth_jax.families.base import Family
from dreambooth_jax.families.sd import SD
from dreambooth_jax.families.sdxl import SDXL

FAMILIES = {f.pipeline_class: f for f in (SD, SDXL)}


def for_class_name(class_name: str | None, source: str = "model_index.json") -> Family:
    """The family of a pipeline class (model_index.json's `_class_name`); UsageError for any other."""
    if class_name not in FAMILIES:
        raise UsageError(f"{source}: pipeline class {class_name!r} is not supported "
                         f"(supported: {', '.join(FAMILIES)})")
    return FAMILIES[class_name]


def weight_folders() -> tuple[str, ...]:
    """Every component folder some family reads weights from (what is fetched of a pipeline repository)."""
    return tuple(dict.fromkeys(name for f in FAMILIES.values() for name in f.components))


def kind_of_folder(name: str) -> str:
    """The component kind a folder name stands for in the families that have it
    (`load_component(folder, name)`)."""
    kinds = {n: k for f in FAMILIES.values() for n, k in f.components.items()}
    if name not in kinds:
        raise UsageError(f"unknown component {name!r}; expected one of {', '.join(kinds)}")
    return kinds[name]


__all__ = ["FAMILIES", "Family", "SD", "SDXL", "for_class_name", "kind_of_folder", "weight_folders"]
