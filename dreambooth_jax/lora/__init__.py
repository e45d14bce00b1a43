"""LoRA: the parameter transform (`transform`) and its file formats (`formats`).

    from dreambooth_jax import lora
    factors = lora.init_lora(params, lora.UNET_TARGETS, lora.LoraConfig(rank=4), rng)
    lora.save_diffusers("out/", {"unet": factors}, config)
"""

from dreambooth_jax.lora.formats import (
    KOHYA_WEIGHT_NAME,
    WEIGHT_NAME,
    apply_file,
    load_lora_file,
    resolve_file,
    save_diffusers,
    save_kohya,
)
from dreambooth_jax.lora.transform import (
    FLUX_TARGETS,
    TEXT_ENCODER_TARGETS,
    UNET_TARGETS,
    LoraConfig,
    apply,
    check,
    init_lora,
    merge,
    target_paths,
)

__all__ = ["FLUX_TARGETS", "KOHYA_WEIGHT_NAME", "TEXT_ENCODER_TARGETS", "UNET_TARGETS", "WEIGHT_NAME",
           "LoraConfig", "apply", "apply_file", "check", "init_lora", "load_lora_file", "merge",
           "resolve_file", "save_diffusers", "save_kohya", "target_paths"]
