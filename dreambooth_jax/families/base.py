"""What a model family answers: one frozen `Family` of constants and plain functions per family.

The trainer, the sampler, the preflight and the exports ask the pipeline's family and never test which family
it is. The functions take a `run(component, *args, **kwargs)` callback that applies one component (the
sampler: the module with its params; the train step: with its trained, frozen or LoRA-adapted params), so a
family says how its networks are wired without owning their parameters.

Conditioning is a dict: "context" [N, L, D] (the denoiser's cross-attention sequence) and, where the family
has one, "pooled" [N, P]. Per-example denoiser inputs that come from the picture's geometry (SDXL's size and
crop ids) are built by `view_inputs` from a `[N, 6]` geometry array: (original height, width, crop top, left,
target height, width) in pixels.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from dreambooth_jax.diffusion import objectives


def no_view_inputs(geometry) -> dict:
    return {}


def keep_negative(cond: dict, empty, model_index: dict) -> dict:
    return cond


def no_option_checks(options: Mapping[str, Any]) -> None:
    return None


def no_train_inputs(options) -> dict:
    return {}


def as_it_is(family: Family, modules: dict) -> Family:
    return family


def unet_sample_size(pipe) -> int:
    """The default picture side: the UNet's native latent size times the VAE's downscaling factor."""
    return (pipe.denoiser.config.sample_size or 64) * pipe.vae_scale_factor


def ddpm_objective(scheduler_config: dict, snr_gamma: float | None = None) -> objectives.DDPMObjective:
    """The denoising objective of a DDPM-trained family: its scheduler's schedule and prediction type."""
    return objectives.DDPMObjective.from_scheduler_config(scheduler_config, snr_gamma=snr_gamma)


@dataclasses.dataclass(frozen=True)
class Family:
    """One model family (SD 1.x/2.x, SDXL, ...): its components, conditioning, objective and defaults."""

    name: str
    pipeline_class: str  # model_index.json's `_class_name`
    components: Mapping[str, str]  # component folder -> kind (`families.components.KINDS`)
    tokenizers: tuple[str, ...]  # tokenizer folders, one per text encoder, in the order of `text_encoders`
    text_encoders: tuple[str, ...]
    tokenize: Callable  # (tokenizers {folder: tokenizer}, prompts, max_length) -> {batch key: int32 [N, L]}
    encode: Callable  # (run, tokens, use_mask) -> conditioning {"context"[, "pooled"]}
    denoise: Callable  # (run, x_t, t, conditioning, inputs) -> the denoiser's prediction
    denoiser: str = "unet"
    vae: str = "vae"
    view_inputs: Callable = no_view_inputs  # geometry [N, 6] -> {batch key: [N, ...]} of per-example inputs
    negative: Callable = keep_negative  # (conditioning of the negative prompts, empty [N] bool, model_index)
    check_options: Callable = no_option_checks  # raises UsageError for options the family cannot take
    objective: Callable = ddpm_objective  # (scheduler config, snr_gamma) -> the training objective
    guidance_scale: float = 7.5  # the sampler's default, as diffusers' pipeline of the family
    num_inference_steps: int = 50  # the sampler's default (diffusers' pipelines; schnell: its model card's)
    # How the sampler applies guidance_scale: "classifier_free" (conditional and unconditional calls, mixed),
    # "embedded" (the scale is a denoiser input, `inputs["guidance"]` [N]: guidance-distilled models), "none".
    guidance: str = "classifier_free"
    sample_size: Callable = unet_sample_size  # pipe -> the default height and width in pixels
    latent_patch: int = 1  # the denoiser's patch side in latent pixels: sizes are multiples of it x the VAE's
    # The default prompt length of a family whose last text encoder takes long prompts (Flux's T5); None: the
    # tokenizers' own lengths, and `generate(max_sequence_length=)` is refused.
    max_sequence_length: int | None = None
    # (family, modules) -> the family member the loaded networks are (Flux.1-dev or -schnell: one pipeline
    # class, told apart by the transformer's config)
    specialize: Callable = as_it_is
    train_inputs: Callable = no_train_inputs  # options -> constant denoiser inputs of the train step
    # network -> default
    lora_targets: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    absent_components: tuple[str, ...] = ()  # model_index.json entries we declare empty ([null, null])
    index_flags: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # other model_index.json entries
    presets: tuple[str, ...] = ()

    @property
    def weight_folders(self) -> tuple[str, ...]:
        return tuple(self.components)

    @property
    def files(self) -> tuple[str, ...]:
        """The names a saved pipeline of this family consists of (model_index.json last: it says complete)."""
        return (*self.components, *self.tokenizers, "scheduler", "model_index.json")
