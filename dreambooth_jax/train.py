"""DreamBooth fine-tuning: `python -m dreambooth_jax.train --config sd15 --instance_data_dir ... ...`.

A linear main: options -> model -> class images -> data -> compiled step -> loop (checkpoints, validation,
logs) -> export. One compiled `train_step` runs data parallel over every device of every host.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
import time

import jax
import jax.numpy as jnp

from dreambooth_jax import parallel
from dreambooth_jax.cli import setup_logging
from dreambooth_jax.parallel import maybe_initialize_distributed
from dreambooth_jax.train_config import TrainConfig, parse_args

log = logging.getLogger("dreambooth_jax.train")


@dataclasses.dataclass
class Run:
    """What `run` returns: the final state and where things went."""

    state: object
    output_dir: str
    steps: int
    metrics: list[dict]
    summary: dict


def make_state(cfg: TrainConfig, pipe, max_steps: int, global_batch: int):
    """The initial train state (unplaced) and the lr schedule of each trained part."""
    from dreambooth_jax import optim, train_step

    networks = ["unet"] + (["text_encoder"] if cfg.train_text_encoder else [])
    if cfg.use_lora:
        params, frozen = lora_params(cfg, pipe, networks)
    else:
        params = {k: v for k, v in pipe.params.items() if k in networks}
        frozen = {k: v for k, v in pipe.params.items() if k not in networks}
    scale = global_batch if cfg.scale_lr else 1
    peak = {"unet": cfg.learning_rate, "text_encoder": cfg.text_encoder_lr or cfg.learning_rate}
    schedules = {part: optim.lr_schedule(cfg.lr_scheduler, peak[part.removesuffix("_lora")] * scale,
                                         warmup_steps=cfg.lr_warmup_steps, total_steps=max_steps,
                                         num_cycles=cfg.lr_num_cycles, power=cfg.lr_power) for part in params}
    txs = {part: optim.make_optimizer(cfg.optimizer, schedules[part], b1=cfg.adam_beta1, b2=cfg.adam_beta2,
                                      eps=cfg.adam_epsilon, weight_decay=cfg.adam_weight_decay) for part in params}
    return train_step.TrainState.create(params, frozen, txs, ema=cfg.use_ema), schedules


def lora_config(cfg: TrainConfig):
    from dreambooth_jax import lora

    return lora.LoraConfig(rank=cfg.rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout) if cfg.use_lora else None


def lora_params(cfg: TrainConfig, pipe, networks: list[str]) -> tuple[dict, dict]:
    """(trained LoRA factors {'<net>_lora'}, frozen params): the adapted bases kept in the compute dtype."""
    from dreambooth_jax import lora

    defaults = {"unet": lora.UNET_TARGETS, "text_encoder": lora.TEXT_ENCODER_TARGETS}
    custom = tuple(t.strip() for t in cfg.lora_target_modules.split(",")) if cfg.lora_target_modules else None
    rngs = dict(zip(networks, jax.random.split(jax.random.PRNGKey(cfg.seed), len(networks))))
    params, frozen = {}, dict(pipe.params)
    dtype = jnp.bfloat16 if cfg.compute_dtype == "bf16" else jnp.float32
    for net in networks:
        targets = defaults[net] if custom is None else [t for t in custom if lora.target_paths(pipe.params[net], [t])]
        if not targets:
            continue  # none of the custom names is in this network
        params[f"{net}_lora"] = lora.init_lora(pipe.params[net], targets, lora_config(cfg), rngs[net])
        frozen[net] = jax.tree.map(lambda x: x.astype(dtype), pipe.params[net])
    if not params:
        raise ValueError(f"--lora_target_modules {cfg.lora_target_modules}: no such module in the "
                         f"{' or '.join(networks)}")
    return params, frozen


def run(cfg: TrainConfig) -> Run:
    """Trains as `cfg` says; see the module docstring. Usable from Python (tests, notebooks)."""
    from dreambooth_jax import checkpointing, noise_schedule, train_step
    from dreambooth_jax.class_images import ensure_class_images
    from dreambooth_jax.data import DreamBoothData
    from dreambooth_jax.pipeline import load_pipeline
    from dreambooth_jax.train_config import read_concepts, resolve_dataset
    from dreambooth_jax.train_loop import TrainLoop

    maybe_initialize_distributed()
    try:
        os.makedirs(cfg.output_dir, exist_ok=True)
    except OSError as e:
        raise OSError(f"--output_dir {cfg.output_dir}: cannot create it ({e})") from e
    if not os.access(cfg.output_dir, os.W_OK):
        raise PermissionError(f"--output_dir {cfg.output_dir} is not writable")
    if cfg.cache_latents and not cfg.center_crop:
        log.warning("--cache_latents encodes center crops once: random crops are off (flips still apply)")
    cfg = resolve_dataset(cfg)
    concepts = read_concepts(cfg)
    data_options = dict(resolution=cfg.resolution, center_crop=cfg.center_crop, random_flip=cfg.random_flip,
                        skip_bad_images=cfg.skip_bad_images, seed=cfg.seed)
    data = DreamBoothData(concepts, **data_options)  # reads the instance images: bad ones fail before the model

    pipe = load_pipeline(cfg.pretrained_model_name_or_path, dtype=cfg.compute_dtype, param_dtype="fp32",
                         revision=cfg.revision, variant=cfg.variant, attention_impl=cfg.attention,
                         remat=cfg.gradient_checkpointing)
    if pipe.is_sdxl:
        raise SystemExit("error: SDXL pipelines are not supported by the trainer yet (SD 1.x / 2.x are)")
    schedule_cfg = noise_schedule.ScheduleConfig.from_diffusers_config(pipe.scheduler_config,
                                                                       class_name="DDPMScheduler")
    if cfg.with_prior_preservation:
        for c in {(c.class_data_dir, c.class_prompt) for c in concepts}:  # a folder shared by concepts: once
            ensure_class_images(pipe, *c, cfg.num_class_images, batch_size_per_device=cfg.sample_batch_size,
                                num_inference_steps=cfg.validation_inference_steps, seed=cfg.seed)
        data = DreamBoothData(concepts, with_prior_preservation=True, **data_options)
    global_batch = cfg.train_batch_size * jax.device_count() * cfg.gradient_accumulation_steps  # instance rows
    dataset_len = max(data.num_instance_images, data.num_class_images if cfg.with_prior_preservation else 0)
    max_steps = cfg.max_train_steps or cfg.num_train_epochs * math.ceil(dataset_len / global_batch)

    mesh = parallel.data_mesh()
    state, schedules = make_state(cfg, pipe, max_steps, global_batch)
    spec = train_step.StepSpec(
        unet=pipe.unet, vae=pipe.vae, text_encoder=pipe.text_encoder,
        alphas_cumprod=noise_schedule.alphas_cumprod(schedule_cfg), prediction_type=schedule_cfg.prediction_type,
        prior_loss_weight=cfg.prior_loss_weight, use_attention_mask=cfg.text_encoder_use_attention_mask,
        snr_gamma=cfg.snr_gamma, noise_offset=cfg.noise_offset if cfg.offset_noise else 0.0,
        max_grad_norm=cfg.max_grad_norm, ema_decay=cfg.ema_decay, lora=lora_config(cfg),
    )
    loop = TrainLoop(cfg, pipe, mesh, spec, schedules, data, max_steps, global_batch)
    ckpt = checkpointing.Checkpointer(os.path.join(cfg.output_dir, "checkpoints"), every=cfg.checkpointing_steps,
                                      keep=cfg.checkpoints_total_limit)
    meta = {"model": cfg.pretrained_model_name_or_path, "seed": cfg.seed, "global_batch": global_batch,
            "optimizer": cfg.optimizer, "use_ema": cfg.use_ema}
    resume = checkpointing.resolve_resume(cfg.resume_from_checkpoint, ckpt.root)
    if resume is not None and cfg.stop_text_encoder_training is not None and resume[1] >= cfg.stop_text_encoder_training:
        state = state.freeze(cfg.text_encoder_part)  # the checkpoint was saved after the text encoder stopped
    state = parallel.put_replicated(state, mesh)
    if resume is not None:
        root, step = resume
        source = ckpt if root == ckpt.root else checkpointing.Checkpointer(root, every=cfg.checkpointing_steps)
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


def main(argv=None) -> None:
    cfg = parse_args(argv)
    setup_logging()
    t0 = time.perf_counter()
    result = run(cfg)
    if jax.process_index() == 0:
        s = result.summary
        print(f"done: {result.steps} steps in {time.perf_counter() - t0:.0f}s "
              f"(compile {s.get('compile_s', 0):.1f}s, {s.get('samples_per_s', 0):.2f} samples/s, "
              f"peak memory {s.get('peak_memory', 'n/a')}); pipeline in {result.output_dir}", file=sys.stderr)


if __name__ == "__main__":
    from dreambooth_jax import cli

    cli.run(main)
