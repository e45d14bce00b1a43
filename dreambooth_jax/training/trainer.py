"""A DreamBooth run from a `TrainConfig`: what `python -m dreambooth_jax.train` calls.

One compiled `train_step` runs data parallel over every device of every host.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os

import jax

from dreambooth_jax import parallel
from dreambooth_jax.diffusion import noise_schedule
from dreambooth_jax.errors import OutputError, UnsupportedError
from dreambooth_jax.parallel import maybe_initialize_distributed
from dreambooth_jax.pipeline import load_pipeline
from dreambooth_jax.training import checkpoints
from dreambooth_jax.training import state as state_lib
from dreambooth_jax.training import step as train_step
from dreambooth_jax.training.class_images import ensure_class_images
from dreambooth_jax.training.config import TrainConfig, load_preset, read_concepts, resolve_dataset
from dreambooth_jax.training.data import DreamBoothData
from dreambooth_jax.training.inputs import TrainInputs
from dreambooth_jax.training.loop import TrainLoop

log = logging.getLogger("dreambooth_jax.train")


@dataclasses.dataclass
class Run:
    """What `run` returns: the final state and where things went."""

    state: object
    output_dir: str
    steps: int
    metrics: list[dict]
    summary: dict


def run(cfg: TrainConfig) -> Run:
    """Trains as `cfg` says: options -> model -> class images -> data -> compiled step -> loop (checkpoints,
    validation, logs) -> export. Usable from Python (tests, notebooks)."""
    maybe_initialize_distributed()
    try:
        os.makedirs(cfg.output_dir, exist_ok=True)
    except OSError as e:
        raise OutputError(f"--output_dir {cfg.output_dir}: cannot create it ({e})") from e
    if not os.access(cfg.output_dir, os.W_OK):
        raise OutputError(f"--output_dir {cfg.output_dir} is not writable")
    if cfg.cache_latents and not cfg.center_crop:
        log.warning("--cache_latents encodes center crops once: random crops are off (flips still apply)")
    cfg = resolve_dataset(cfg)
    concepts = read_concepts(cfg)
    data = DreamBoothData(concepts, resolution=cfg.resolution, center_crop=cfg.center_crop,  # reads the instance
                          random_flip=cfg.random_flip, skip_bad_images=cfg.skip_bad_images,  # images: bad ones
                          seed=cfg.seed)                                                      # fail before the model

    pipe = load_pipeline(cfg.pretrained_model_name_or_path, dtype=cfg.compute_dtype, param_dtype="fp32",
                         revision=cfg.revision, variant=cfg.variant, attention_impl=cfg.attention,
                         remat=cfg.gradient_checkpointing)
    if pipe.is_sdxl:
        raise UnsupportedError("SDXL pipelines are not supported by the trainer yet (SD 1.x / 2.x are)")
    schedule_cfg = noise_schedule.ScheduleConfig.from_diffusers_config(pipe.scheduler_config,
                                                                       class_name="DDPMScheduler")
    if cfg.with_prior_preservation:
        for c in {(c.class_data_dir, c.class_prompt) for c in concepts}:  # a folder shared by concepts: once
            ensure_class_images(pipe, *c, cfg.num_class_images, batch_size_per_device=cfg.sample_batch_size,
                                num_inference_steps=cfg.validation_inference_steps, seed=cfg.seed)
        data.add_class_images()
    global_batch = cfg.train_batch_size * jax.device_count() * cfg.gradient_accumulation_steps  # instance rows
    dataset_len = max(data.num_instance_images, data.num_class_images if cfg.with_prior_preservation else 0)
    max_steps = cfg.max_train_steps or cfg.num_train_epochs * math.ceil(dataset_len / global_batch)
    if jax.process_index() == 0:
        summary, warning = recipe_report(cfg, jax.device_count(), global_batch, max_steps, data.num_instance_images)
        log.info("%s", summary)
        if warning:
            log.warning("%s", warning)

    mesh = parallel.data_mesh()
    state, schedules = state_lib.make_state(cfg, pipe, max_steps, global_batch)
    spec = train_step.StepSpec(
        unet=pipe.unet, vae=pipe.vae, text_encoder=pipe.text_encoder,
        alphas_cumprod=noise_schedule.alphas_cumprod(schedule_cfg), prediction_type=schedule_cfg.prediction_type,
        prior_loss_weight=cfg.prior_loss_weight, use_attention_mask=cfg.text_encoder_use_attention_mask,
        snr_gamma=cfg.snr_gamma, noise_offset=cfg.noise_offset if cfg.offset_noise else 0.0,
        max_grad_norm=cfg.max_grad_norm, ema_decay=cfg.ema_decay, lora=state_lib.lora_config(cfg),
    )
    loop = TrainLoop(cfg, pipe, mesh, spec, schedules, TrainInputs(cfg, pipe, data, mesh), max_steps, global_batch)
    ckpt = checkpoints.Checkpointer(os.path.join(cfg.output_dir, "checkpoints"), every=cfg.checkpointing_steps,
                                      keep=cfg.checkpoints_total_limit)
    meta = {"model": cfg.pretrained_model_name_or_path, "seed": cfg.seed, "global_batch": global_batch,
            "optimizer": cfg.optimizer, "use_ema": cfg.use_ema}
    resume = checkpoints.resolve_resume(cfg.resume_from_checkpoint, ckpt.root)
    # The loop freezes the text encoder at the start of step `stop`, after the checkpoint of step `stop` was
    # written: only later checkpoints were saved without it.
    stop = cfg.stop_text_encoder_training
    if resume is not None and stop is not None and resume[1] > stop:
        state = state.freeze(cfg.text_encoder_part)
    state = parallel.put_replicated(state, mesh)
    if resume is not None:
        root, step = resume
        source = ckpt if root == ckpt.root else checkpoints.Checkpointer(root, every=cfg.checkpointing_steps)
        state, _ = source.restore(state, step, expected_meta=meta)
        log.info("resumed from %s/%d", root, step)
    try:
        state, metrics = loop.train(state, ckpt, meta)
    finally:
        ckpt.close()
    if int(state.step) >= max_steps:
        loop.export(state)
        parallel.barrier("export")  # the others wait until process 0 has written the pipeline
    loop.finish()
    return Run(state=state, output_dir=cfg.output_dir, steps=int(state.step), metrics=metrics, summary=loop.summary)


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
               f"{cfg.train_batch_size} per device x {cfg.gradient_accumulation_steps} accumulated; {max_steps} "
               f"steps = {max_steps * global_batch / num_instances:.1f} epochs over {num_instances} instance "
               f"images; learning rate {lr:g}{scaled}")
    warning = None
    if cfg.config:
        preset = load_preset(cfg.config)
        tuned = preset.get("train_batch_size", 1) * preset.get("gradient_accumulation_steps", 1)
        if global_batch != tuned and cfg.train_batch_size == preset.get("train_batch_size", 1):
            warning = (
                f"the {cfg.config!r} preset's recipe is a global batch of {tuned} at learning rate "
                f"{preset.get('learning_rate', cfg.learning_rate):g} for {preset.get('max_train_steps', max_steps)} "
                f"steps; on {devices} devices this run takes {global_batch} instance images per step "
                f"({global_batch / tuned:g}x the recipe) at the same learning rate and step count. To keep the "
                f"recipe, run on fewer devices; or adapt it: fewer --max_train_steps, another --learning_rate")
    return summary, warning
