"""The trainer's options: one typed dataclass (defaults, help), presets from `configs/`, CLI overrides.

Flag names follow diffusers' `train_dreambooth.py` where the concept is the same. Resolution order:
dataclass default < preset (`--config NAME_OR_PATH`) < command-line flag. `validate` rejects bad
combinations before anything heavy is loaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import types
import typing
from dataclasses import dataclass, field

from dreambooth_jax import storage
from dreambooth_jax.errors import UsageError
from dreambooth_jax.images import count_images
from dreambooth_jax.kernels.choose import ATTENTION_IMPLS, FUSED_NORM
from dreambooth_jax.training.concepts import many_subjects, read_concepts, read_subjects
from dreambooth_jax.training.optimizers import LR_SCHEDULERS, OPTIMIZERS

# The presets: the package data `dreambooth_jax.configs` (dreambooth_jax/configs/*.json).
CONFIGS_DIR = os.path.dirname(importlib.import_module("dreambooth_jax.configs").__file__)


def preset_names() -> list[str]:
    if not os.path.isdir(CONFIGS_DIR):
        return []
    return sorted(f[:-5] for f in os.listdir(CONFIGS_DIR) if f.endswith(".json"))


def _opt(default, help: str, choices=None):
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class TrainConfig:
    # Model
    config: str | None = _opt(None, f"preset name in configs/ ({', '.join(preset_names())}) or a JSON file "
                                    "path; options given on the command line override it")
    pretrained_model_name_or_path: str | None = _opt(None, "diffusers pipeline folder or Hugging Face Hub id")
    revision: str | None = _opt(None, "Hub revision (branch, tag or commit) of the pretrained model")
    variant: str | None = _opt(None, "weight variant to load, e.g. fp16")
    pretrained_vae_model_name_or_path: str | None = _opt(
        None, "another VAE to train and export with: a model folder, a pipeline (its vae/), a bucket folder "
              "or a Hub id, e.g. madebyollin/sdxl-vae-fp16-fix for SDXL")
    # Data
    instance_data_dir: str | None = _opt(None, "folder with the 3-5 photos of the subject (transparent "
                                               "pixels are composited on white; diffusers drops the alpha "
                                               "channel)")
    dataset: str | None = _opt(None, "a subject of the DreamBooth paper's dataset instead of "
                                     "--instance_data_dir, e.g. 'dreambooth:dog6'; also sets the class and "
                                     "the default prompts")
    dataset_dir: str | None = _opt(None,
                                   "TFDS data_dir where --dataset is built (default: ~/tensorflow_datasets)")
    dataset_manual_dir: str | None = _opt(None, "local copy of the DreamBooth dataset to build --dataset "
                                                "from offline (default: download it from GitHub)")
    instance_prompt: str | None = _opt(None, "prompt naming the subject, e.g. 'a photo of sks dog'")
    concepts_list: str | None = _opt(None, "JSON file: a list of {instance_data_dir, instance_prompt, "
                                            "class_data_dir, class_prompt}, several concepts in one model")
    subjects: str | None = _opt(None, "JSON file: a list of subjects {name, instance_data_dir, "
                                      "instance_prompt, class_data_dir, class_prompt[, dataset, seed, "
                                      "validation_prompt]}, each trained as its own model by one program and "
                                      "exported to output_dir/<name>/ (or --dataset dreambooth:a,b,c); "
                                      "options not given per subject are the run's")
    class_data_dir: str | None = _opt(None, "folder of class images (generated there if too few)")
    class_prompt: str | None = _opt(None, "prompt of the subject's class, e.g. 'a photo of dog'")
    with_prior_preservation: bool = _opt(False, "add the prior-preservation loss on class images")
    prior_loss_weight: float = _opt(1.0, "weight of the prior-preservation loss")
    num_class_images: int = _opt(100, "class images wanted; missing ones are generated")
    sample_batch_size: int = _opt(4, "images per device per call when generating class images")
    resolution: int = _opt(512, "training image size (square)")
    center_crop: bool = _opt(False, "center crop instead of random crop")
    random_flip: bool = _opt(False, "random horizontal flips")
    skip_bad_images: bool = _opt(False, "skip unreadable images (with a warning) instead of failing")
    cache_latents: bool = _opt(False, "encode the (center-cropped) images with the VAE once, not every step")
    pre_compute_text_embeddings: bool = _opt(False, "encode prompts once (frozen text encoder(s) only)")
    tokenizer_max_length: int | None = _opt(None, "token length (default: the tokenizer's)")
    text_encoder_use_attention_mask: bool = _opt(False, "pass the padding mask to the text encoder")
    # Output
    output_dir: str = _opt("dreambooth-model", "the trained pipeline goes here; checkpoints in checkpoints/")
    seed: int = _opt(0, "seed of data order, noise and initialisation")
    # Training
    train_text_encoder: bool = _opt(False, "fine-tune the text encoder too (SDXL: both)")
    train_batch_size: int = _opt(1, "instance images per device per step (as many class images are added)")
    max_train_steps: int | None = _opt(None, "steps to train (overrides num_train_epochs)")
    num_train_epochs: int = _opt(1, "epochs over the instance images, when max_train_steps is not set")
    gradient_accumulation_steps: int = _opt(1, "micro-batches per optimizer step (inside the compiled step)")
    gradient_checkpointing: bool = _opt(False,
                                        "recompute UNet activations in the backward pass (less memory)")
    learning_rate: float = _opt(5e-6, "peak learning rate")
    text_encoder_lr: float | None = _opt(None,
                                         "peak learning rate of the text encoder (default: learning_rate)")
    stop_text_encoder_training: int | None = _opt(None, "freeze the text encoder after this many steps")
    optimizer: str = _opt("adamw", "optimizer, each equal to its PyTorch implementation: torch AdamW, "
                                   "transformers Adafactor (fixed lr, scale_parameter), lion-pytorch, "
                                   "prodigyopt (use lr 1.0); adam_* options apply where they exist",
                          OPTIMIZERS)
    scale_lr: bool = _opt(False, "multiply the learning rate by the global batch size")
    lr_scheduler: str = _opt("constant", "learning-rate schedule", LR_SCHEDULERS)
    lr_warmup_steps: int = _opt(0, "linear warm-up steps")
    lr_num_cycles: int = _opt(1, "restarts of cosine_with_restarts")
    lr_power: float = _opt(1.0, "power of the polynomial schedule")
    adam_beta1: float = _opt(0.9, "first-moment decay (AdamW, Lion, Prodigy)")
    adam_beta2: float | None = _opt(None, "second-moment decay (default: the optimizer's own: 0.999 for "
                                          "AdamW and Prodigy, 0.99 for Lion)")
    adam_weight_decay: float = _opt(1e-2,
                                    "decoupled weight decay, scaled by the learning rate (every optimizer)")
    adam_epsilon: float = _opt(1e-8, "AdamW / Prodigy epsilon")
    max_grad_norm: float = _opt(1.0, "clip all trained gradients to this global norm, as torch's "
                                     "clip_grad_norm_ (0: no clipping)")
    snr_gamma: float | None = _opt(None, "Min-SNR-gamma loss weighting (5.0 is the paper's choice), per "
                                         "example and for the prediction type's target (epsilon, v or "
                                         "sample); unlike diffusers' train_dreambooth.py the prior half is "
                                         "weighted too")
    offset_noise: bool = _opt(False, "offset noise: add noise_offset x N(0, 1) per example and channel")
    noise_offset: float = _opt(0.1, "strength of --offset_noise")
    use_ema: bool = _opt(False, "keep an EMA of the trained weights and export it instead")
    ema_decay: float = _opt(0.9999, "EMA decay, warmed up as diffusers' EMAModel: 0 at the first update, "
                                    "then min(decay, (1+k)/(10+k))")
    mixed_precision: str = _opt("no", "compute dtype: 'no' (fp32) or 'bf16'; master weights stay fp32",
                                ("no", "bf16", "fp16"))
    attention: str = _opt("auto", "attention implementation: 'auto' picks per call (cuDNN flash on GPU, "
                                  "Pallas splash on TPU for long sequences, XLA otherwise); the others force "
                                  "one",
                          ATTENTION_IMPLS)
    fused_norm: str = _opt("auto", "GroupNorm (+ SiLU) in the UNet and VAE as one Pallas kernel per "
                                   "direction; 'auto': on for GPU and TPU, off on CPU", FUSED_NORM)
    # Scale
    fsdp: str = _opt("auto", "devices to shard the trained state (params, gradients, optimizer state, EMA) "
                             "and frozen networks over; must divide the device count, the rest is data "
                             "parallel. 'auto': 1 (replication) when that fits comfortably in device memory, "
                             "else the smallest that fits")
    subject_devices: int | None = _opt(None, "with --subjects: the devices each subject's batch spans (a "
                                             "divisor of the device count; its global batch is "
                                             "--train_batch_size x these devices x "
                                             "--gradient_accumulation_steps). Default: one group of devices "
                                             "per subject where there are enough, else one device each")
    dry_run: bool = _opt(False, "read only the model's configs and tokenizers, compile the step ahead of "
                                "time and print its per-device memory as one JSON line; then exit")
    compilation_cache_dir: str | None = _opt(None, "XLA's persistent compilation cache, so a second run "
                                                   "compiles nothing (default: $JAX_COMPILATION_CACHE_DIR or "
                                                   "~/.cache/dreambooth_jax/xla; 'none': off)")
    # LoRA
    use_lora: bool = _opt(False, "train low-rank adapters instead of the full UNet (and text encoder)")
    rank: int = _opt(4, "LoRA rank")
    lora_alpha: float | None = _opt(None, "LoRA alpha (scale alpha/rank; default: rank)")
    lora_dropout: float = _opt(0.0, "dropout on the LoRA branch's input")
    lora_target_modules: str | None = _opt(
        None, "comma-separated module names to adapt (default: to_q,to_k,to_v,to_out.0 in the UNet and, with "
              "--train_text_encoder, q_proj,k_proj,v_proj,out_proj in the text encoder)")
    merge_lora: bool = _opt(False, "also export a full diffusers pipeline with the adapters merged in")
    # Checkpoints, validation, logging
    checkpointing_steps: int = _opt(500, "save an Orbax checkpoint every N steps")
    export_at_checkpoints: bool = _opt(False, "also export the pipeline to --output_dir at each checkpoint")
    checkpoints_total_limit: int | None = _opt(None, "keep at most this many checkpoints")
    resume_from_checkpoint: str | None = _opt(None, "'latest' or a checkpoint folder to resume from")
    validation_prompt: str | None = _opt(None, "prompt of the validation images")
    num_validation_images: int = _opt(4, "validation images per validation")
    validation_steps: int = _opt(100, "validate every N steps")
    validation_inference_steps: int = _opt(25, "denoising steps of validation and class images")
    report_to: str = _opt("none", "'tensorboard' also writes TensorBoard events", ("none", "tensorboard"))

    @property
    def compute_dtype(self) -> str:
        return "bf16" if self.mixed_precision == "bf16" else "fp32"


def _field_type(f: dataclasses.Field):
    hint = typing.get_type_hints(TrainConfig)[f.name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def _none_or(kind):
    return lambda s: None if s.lower() in ("none", "null", "") else kind(s)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dreambooth_jax.train",
                                     description="DreamBooth fine-tuning of Stable Diffusion in JAX.")
    for f in dataclasses.fields(TrainConfig):
        kind, help_text = _field_type(f), f.metadata["help"]
        if kind is bool:
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=f.default,
                                help=help_text)
        else:
            nullable = f.default is None
            parser.add_argument(f"--{f.name}", type=_none_or(kind) if nullable else kind, default=f.default,
                                choices=f.metadata["choices"], help=f"{help_text} (default: %(default)s)")
    return parser


def load_preset(name_or_path: str) -> dict:
    """A preset's overrides: `configs/<name>.json`, or any JSON file of field -> value."""
    path = name_or_path if name_or_path.endswith(".json") else os.path.join(CONFIGS_DIR,
                                                                            name_or_path + ".json")
    if not os.path.isfile(path):
        raise UsageError(f"no preset {name_or_path!r} (known: {', '.join(preset_names())}; or a .json path)")
    with open(path, encoding="utf-8") as f:
        preset = json.load(f)
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(k for k in preset if k not in names and not k.startswith("_"))
    if unknown:
        raise UsageError(f"{path}: unknown option(s) {', '.join(unknown)}")
    return {k: v for k, v in preset.items() if not k.startswith("_")}


_SUBJECT_OPTIONS = ("dataset", "instance_data_dir", "instance_prompt", "class_data_dir", "class_prompt",
                    "concepts_list", "subjects", "validation_prompt")


def parse_args(argv=None) -> TrainConfig:
    parser = build_parser()
    known, _ = parser.parse_known_args(argv)
    if known.config:
        try:
            preset = load_preset(known.config)
        except UsageError as e:
            parser.error(str(e))
        # A subject given on the command line replaces the preset's subject (e.g. tiny_demo's toy photos).
        if known.dataset or known.subjects:
            preset = {k: v for k, v in preset.items() if k not in _SUBJECT_OPTIONS}
        elif known.instance_data_dir or known.concepts_list:
            preset.pop("dataset", None)
        parser.set_defaults(**preset)
    cfg = TrainConfig(**vars(parser.parse_args(argv)))
    errors = validate(cfg)
    if errors:
        parser.error("\n  ".join(errors))
    return cfg


def _dataset_errors(cfg: TrainConfig) -> list[str]:
    if not cfg.dataset:
        return []
    from dreambooth_jax.datasets import dreambooth as dreambooth_dataset  # TFDS, heavy: --dataset only

    errors = []
    try:
        dreambooth_dataset.parse_spec(cfg.dataset)
    except UsageError as e:
        errors.append(str(e))
    if cfg.instance_data_dir or cfg.concepts_list:
        errors.append("--dataset replaces --instance_data_dir and --concepts_list; give one of them")
    if cfg.dataset_manual_dir and not os.path.isdir(cfg.dataset_manual_dir):
        errors.append(f"--dataset_manual_dir {cfg.dataset_manual_dir}: no such folder")
    return errors


def _subjects_errors(cfg: TrainConfig) -> list[str]:
    """The problems of a run of several subjects: the run's options, then each subject's as its own run."""
    errors = []
    if cfg.subjects and cfg.dataset:
        errors.append("--subjects and --dataset both name the subjects; give one of them (a subject of "
                      "--subjects may have its own \"dataset\")")
    if cfg.instance_data_dir or cfg.concepts_list:
        errors.append("--subjects (or a --dataset of several subjects) replaces --instance_data_dir and "
                      "--concepts_list: each subject names its own folder")
    if cfg.dataset and (cfg.instance_prompt or cfg.class_prompt):
        errors.append("--dataset of several subjects: --instance_prompt and --class_prompt would name every "
                      "subject alike; each takes its own from the dataset (or give them per subject with "
                      "--subjects)")
    if cfg.subject_devices is not None and cfg.subject_devices < 1:
        errors.append("--subject_devices must be >= 1")
    if errors:
        return errors
    try:
        subjects = read_subjects(cfg)
    except UsageError as e:
        return [str(e)]

    found = {}
    for subject in subjects:
        own = found[subject.name] = validate(subject.cfg)
        folder = subject.cfg.instance_data_dir
        if not own and folder and not storage.is_remote(folder) and not count_images(folder):
            own.append(f"instance_data_dir {folder}: no images")
    # What every subject has is the run's own problem (e.g. a bad --snr_gamma): said once.
    common = set.intersection(*(set(own) for own in found.values()))
    errors += [e for e in found[subjects[0].name] if e in common]
    return errors + [f"subject {name!r}: {e}" for name, own in found.items() for e in own if e not in common]


def validate(cfg: TrainConfig) -> list[str]:
    """Every problem with the options, as messages (empty when fine). Cheap: no model is loaded."""
    errors = []
    if not cfg.pretrained_model_name_or_path:
        errors.append("--pretrained_model_name_or_path is required")
    if many_subjects(cfg):
        return errors + _subjects_errors(cfg)
    try:
        concepts = [] if cfg.dataset else read_concepts(cfg)  # --dataset: filled in by `resolve_dataset`
    except (OSError, UsageError) as e:  # OSError: a concepts file that cannot be read
        errors.append(str(e))
        concepts = []
    errors += _dataset_errors(cfg)
    for flag, path in (("--output_dir", cfg.output_dir), ("--pretrained_model_name_or_path",
                       cfg.pretrained_model_name_or_path),
                       ("--resume_from_checkpoint", cfg.resume_from_checkpoint),
                       ("--pretrained_vae_model_name_or_path", cfg.pretrained_vae_model_name_or_path)):
        try:
            storage.check_backend(path or "", flag)
        except UsageError as e:
            errors.append(str(e))
    for i, c in enumerate(concepts):
        where = f"concept {i} of {cfg.concepts_list}: " if cfg.concepts_list else ""
        flag = (lambda name: name) if cfg.concepts_list else (lambda name: f"--{name}")  # noqa: E731
        for name in ("instance_data_dir", "class_data_dir"):
            try:
                storage.check_backend(getattr(c, name) or "", f"{where}{flag(name)}")
            except UsageError as e:
                errors.append(str(e))
        if not c.instance_data_dir:
            errors.append(f"{where}{flag('instance_data_dir')} is required")
        elif not storage.is_remote(c.instance_data_dir) and not os.path.isdir(c.instance_data_dir):
            errors.append(f"{where}{flag('instance_data_dir')} {c.instance_data_dir}: no such folder")
        if not c.instance_prompt:
            errors.append(f"{where}{flag('instance_prompt')} is required")
        if cfg.with_prior_preservation:
            if not c.class_prompt:
                errors.append(f"{where}--with_prior_preservation needs {flag('class_prompt')}")
            if not c.class_data_dir:
                errors.append(f"{where}--with_prior_preservation needs {flag('class_data_dir')} "
                              "(generated class images go there)")
    if cfg.stop_text_encoder_training is not None and not cfg.train_text_encoder:
        errors.append("--stop_text_encoder_training needs --train_text_encoder")
    if cfg.snr_gamma is not None and cfg.snr_gamma <= 0:
        errors.append("--snr_gamma must be > 0")
    if cfg.use_lora and cfg.rank < 1:
        errors.append("--rank must be >= 1")
    if not 0.0 <= cfg.lora_dropout < 1.0:
        errors.append("--lora_dropout must be in [0, 1)")
    if cfg.merge_lora and not cfg.use_lora:
        errors.append("--merge_lora needs --use_lora")
    if not 0.0 < cfg.ema_decay < 1.0:
        errors.append("--ema_decay must be in (0, 1)")
    if cfg.mixed_precision == "fp16":
        errors.append("--mixed_precision fp16 is not supported (it needs loss scaling); use bf16, as fast on "
                      "TPUs and recent GPUs")
    if cfg.resolution <= 0 or cfg.resolution % 8:
        errors.append(f"--resolution must be a positive multiple of 8; got {cfg.resolution}")
    for name in ("train_batch_size", "gradient_accumulation_steps", "num_train_epochs", "checkpointing_steps",
                 "validation_steps", "num_validation_images", "sample_batch_size"):
        if getattr(cfg, name) < 1:
            errors.append(f"--{name} must be >= 1")
    if cfg.max_train_steps is not None and cfg.max_train_steps < 1:
        errors.append("--max_train_steps must be >= 1")
    if cfg.learning_rate <= 0:
        errors.append("--learning_rate must be > 0")
    if cfg.pre_compute_text_embeddings and cfg.train_text_encoder:
        errors.append("--pre_compute_text_embeddings cannot be combined with --train_text_encoder")
    if cfg.checkpoints_total_limit is not None and cfg.checkpoints_total_limit < 1:
        errors.append("--checkpoints_total_limit must be >= 1")
    resume = cfg.resume_from_checkpoint
    if resume not in (None, "latest") and not storage.is_remote(resume) and not os.path.isdir(resume):
        errors.append(f"--resume_from_checkpoint {cfg.resume_from_checkpoint}: no such checkpoint folder")
    if cfg.fsdp != "auto" and not (cfg.fsdp.isdigit() and int(cfg.fsdp) >= 1):
        errors.append(f"--fsdp must be 'auto' or a positive integer; got {cfg.fsdp!r}")
    if cfg.report_to == "tensorboard":
        try:
            import tensorboardX  # noqa: F401  (optional: only --report_to tensorboard needs it)
        except ImportError:
            errors.append("--report_to tensorboard needs tensorboardX (pip install tensorboardX)")
    return errors


def recipe_report(cfg: TrainConfig, devices: int, global_batch: int, max_steps: int,
                  num_instances: int) -> tuple[str, str | None]:
    """What the run will do, in numbers (logged at the start): the global batch, the epochs over the instance
    images and the effective learning rate; and a warning when the device count changes a preset's recipe
    (`--train_batch_size` is per device, so a preset tuned on one device takes a larger global batch on many
    at the same learning rate and step count). Returns (summary, warning or None)."""
    prior = " (+ as many class images)" if cfg.with_prior_preservation else ""
    lr = cfg.learning_rate * (global_batch if cfg.scale_lr else 1)
    scaled = f" (--scale_lr: {cfg.learning_rate:g} x {global_batch})" if cfg.scale_lr else ""
    summary = (f"global batch {global_batch} instance images{prior} per step = {devices} device(s) x "
               f"{cfg.train_batch_size} per device x {cfg.gradient_accumulation_steps} accumulated; "
               f"{max_steps} steps = {max_steps * global_batch / num_instances:.1f} epochs over "
               f"{num_instances} instance images; learning rate {lr:g}{scaled}")
    warning = None
    if cfg.config:
        preset = load_preset(cfg.config)
        tuned = preset.get("train_batch_size", 1) * preset.get("gradient_accumulation_steps", 1)
        if global_batch != tuned and cfg.train_batch_size == preset.get("train_batch_size", 1):
            warning = (
                f"the {cfg.config!r} preset's recipe is a global batch of {tuned} at learning rate "
                f"{preset.get('learning_rate', cfg.learning_rate):g} for "
                f"{preset.get('max_train_steps', max_steps)} steps; on {devices} devices this run takes "
                f"{global_batch} instance images per step ({global_batch / tuned:g}x the recipe) at the same "
                "learning rate and step count. To keep the recipe, run on fewer devices; or adapt it: fewer "
                "--max_train_steps, another --learning_rate")
    return summary, warning
