"""The narrow specs the training stages take, each cut once from the run's `TrainConfig` by `of(cfg)`.

A stage reads only what it needs: the base model (`ModelSpec`), the training set (`DataSpec`), the batch
(`BatchSpec`: inputs, the preflight's batch shapes), the run's length (`LengthSpec`), class images
(`ClassImagesSpec`), the initial state and its optimizers (`StateSpec`), the loop (`LoopSpec`: checkpoints,
validation, logs) and the export (`ExportSpec`). Each field has the name of the `TrainConfig` field (the flag)
it comes from, so a spec is the configuration's values as the user gave them, not a restatement.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from dreambooth_jax import lora
from dreambooth_jax.pipeline import load_pipeline


def _cut(cls, cfg, **derived: Any):
    """An instance of the spec dataclass `cls` from `cfg`'s fields of the same names (`derived`: the
    others)."""
    return cls(**{f.name: derived[f.name] if f.name in derived else getattr(cfg, f.name)
                  for f in dataclasses.fields(cls)})


@dataclasses.dataclass(frozen=True)
class BatchSpec:
    """One step's batch: rows per device and accumulated micro-batches, what each row holds and what is
    cached."""

    train_batch_size: int
    gradient_accumulation_steps: int
    with_prior_preservation: bool
    resolution: int
    cache_latents: bool
    pre_compute_text_embeddings: bool
    tokenizer_max_length: int | None
    text_encoder_use_attention_mask: bool

    @classmethod
    def of(cls, cfg) -> BatchSpec:
        return _cut(cls, cfg)

    @property
    def rows_per_example(self) -> int:
        """Rows each instance example brings: itself, and a class example with prior preservation."""
        return 2 if self.with_prior_preservation else 1


@dataclasses.dataclass(frozen=True)
class StateSpec:
    """The initial train state: which networks train (fully or by LoRA), their optimizers and schedules,
    EMA."""

    seed: int
    compute_dtype: str
    train_text_encoder: bool
    lora: lora.LoraConfig | None  # None: full fine-tuning
    lora_target_modules: str | None
    optimizer: str
    learning_rate: float
    text_encoder_lr: float | None
    scale_lr: bool
    lr_scheduler: str
    lr_warmup_steps: int
    lr_num_cycles: int
    lr_power: float
    adam_beta1: float
    adam_beta2: float
    adam_epsilon: float
    adam_weight_decay: float
    use_ema: bool

    @classmethod
    def of(cls, cfg) -> StateSpec:
        config = lora.LoraConfig(rank=cfg.rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout)
        return _cut(cls, cfg, lora=config if cfg.use_lora else None)


@dataclasses.dataclass(frozen=True)
class ExportSpec:
    """What a run leaves in `output_dir`, and the base a LoRA is merged into."""

    output_dir: str
    use_lora: bool
    merge_lora: bool
    pretrained_model_name_or_path: str
    revision: str | None
    variant: str | None
    pretrained_vae_model_name_or_path: str | None

    @classmethod
    def of(cls, cfg) -> ExportSpec:
        return _cut(cls, cfg)


@dataclasses.dataclass(frozen=True)
class LoopSpec:
    """The loop around the step: its seed stream, checkpoints, validation images, logs, and the export it
    calls."""

    output_dir: str
    seed: int
    with_prior_preservation: bool
    checkpointing_steps: int
    export_at_checkpoints: bool
    stop_text_encoder_training: int | None
    validation_prompt: str | None
    validation_steps: int
    num_validation_images: int
    validation_inference_steps: int
    report_to: str
    export: ExportSpec

    @classmethod
    def of(cls, cfg) -> LoopSpec:
        return _cut(cls, cfg, export=ExportSpec.of(cfg))


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """How the training set reads its images: size, crops, flips, bad files, and the seed of its batch
    plan."""

    resolution: int
    center_crop: bool
    random_flip: bool
    skip_bad_images: bool
    seed: int

    @classmethod
    def of(cls, cfg) -> DataSpec:
        return _cut(cls, cfg)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """The base pipeline and how it loads: its weights' source and the networks' compute options."""

    pretrained_model_name_or_path: str
    revision: str | None
    variant: str | None
    pretrained_vae_model_name_or_path: str | None
    compute_dtype: str
    attention: str
    gradient_checkpointing: bool
    fused_norm: str

    @classmethod
    def of(cls, cfg) -> ModelSpec:
        return _cut(cls, cfg)

    def load(self, weights: str):
        """`load_pipeline` of the base model (`weights`: "none" for shapes only, "host", ...), its trained
        networks' params in fp32 whatever the compute dtype."""
        return load_pipeline(self.pretrained_model_name_or_path, weights=weights, dtype=self.compute_dtype,
                             param_dtype="fp32", revision=self.revision, variant=self.variant,
                             vae=self.pretrained_vae_model_name_or_path, attention_impl=self.attention,
                             remat=self.gradient_checkpointing, fused_norm=self.fused_norm)


@dataclasses.dataclass(frozen=True)
class LengthSpec:
    """How long the run trains: --max_train_steps, else --num_train_epochs."""

    max_train_steps: int | None
    num_train_epochs: int

    @classmethod
    def of(cls, cfg) -> LengthSpec:
        return _cut(cls, cfg)

    def steps(self, global_batch: int, num_instances: int, num_classes: int) -> int:
        """The run's optimizer steps: --max_train_steps, else --num_train_epochs over the larger image set."""
        return self.max_train_steps or self.num_train_epochs * math.ceil(
            max(num_instances, num_classes) / global_batch)


@dataclasses.dataclass(frozen=True)
class ClassImagesSpec:
    """Prior preservation's class images: how many each folder holds, and how the missing ones are drawn."""

    num_class_images: int
    sample_batch_size: int
    validation_inference_steps: int

    @classmethod
    def of(cls, cfg) -> ClassImagesSpec | None:
        """None without --with_prior_preservation."""
        return _cut(cls, cfg) if cfg.with_prior_preservation else None

