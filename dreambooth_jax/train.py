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

from dreambooth_jax import parallel
from dreambooth_jax.train_config import TrainConfig, parse_args

log = logging.getLogger("dreambooth_jax.train")


def maybe_initialize_distributed() -> None:
    """`jax.distributed.initialize()` on multi-host runs (TPU pod slices, or a coordinator given by env)."""
    multi = os.environ.get("JAX_COORDINATOR_ADDRESS") or "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if multi and not jax.distributed.is_initialized():
        jax.distributed.initialize()


@dataclasses.dataclass
class Run:
    """What `run` returns: the final state and where things went."""

    state: object
    output_dir: str
    steps: int
    metrics: list[dict]
    summary: dict


def run(cfg: TrainConfig) -> Run:
    """Trains as `cfg` says; see the module docstring. Usable from Python (tests, notebooks)."""
    from dreambooth_jax import checkpointing, noise_schedule, optim, train_step
    from dreambooth_jax.class_images import ensure_class_images
    from dreambooth_jax.data import Concept, DreamBoothData
    from dreambooth_jax.pipeline import load_pipeline
    from dreambooth_jax.train_loop import TrainLoop

    maybe_initialize_distributed()
    try:
        os.makedirs(cfg.output_dir, exist_ok=True)
    except OSError as e:
        raise OSError(f"--output_dir {cfg.output_dir}: cannot create it ({e})") from e
    if not os.access(cfg.output_dir, os.W_OK):
        raise PermissionError(f"--output_dir {cfg.output_dir} is not writable")
    concept = Concept(cfg.instance_data_dir, cfg.instance_prompt, cfg.class_data_dir, cfg.class_prompt)
    data_options = dict(resolution=cfg.resolution, center_crop=cfg.center_crop, random_flip=cfg.random_flip,
                        skip_bad_images=cfg.skip_bad_images, seed=cfg.seed)
    data = DreamBoothData([concept], **data_options)  # reads the instance images: bad ones fail before the model

    pipe = load_pipeline(cfg.pretrained_model_name_or_path, dtype=cfg.compute_dtype, param_dtype="fp32",
                         revision=cfg.revision, variant=cfg.variant, attention_impl=cfg.attention,
                         remat=cfg.gradient_checkpointing)
    if pipe.is_sdxl:
        raise SystemExit("error: SDXL pipelines are not supported by the trainer yet (SD 1.x / 2.x are)")
    schedule_cfg = noise_schedule.ScheduleConfig.from_diffusers_config(pipe.scheduler_config,
                                                                       class_name="DDPMScheduler")
    if cfg.with_prior_preservation:
        ensure_class_images(pipe, cfg.class_data_dir, cfg.class_prompt, cfg.num_class_images,
                            batch_size_per_device=cfg.sample_batch_size,
                            num_inference_steps=cfg.validation_inference_steps, seed=cfg.seed)
        data = DreamBoothData([concept], with_prior_preservation=True, **data_options)
    devices, accum = jax.device_count(), cfg.gradient_accumulation_steps
    global_batch = cfg.train_batch_size * devices * accum  # instance examples per optimizer step
    dataset_len = max(data.num_instance_images, data.num_class_images if cfg.with_prior_preservation else 0)
    steps_per_epoch = math.ceil(dataset_len / global_batch)
    max_steps = cfg.max_train_steps or cfg.num_train_epochs * steps_per_epoch
    lr = cfg.learning_rate * (global_batch if cfg.scale_lr else 1)
    schedule = optim.lr_schedule(cfg.lr_scheduler, lr, warmup_steps=cfg.lr_warmup_steps, total_steps=max_steps,
                                 num_cycles=cfg.lr_num_cycles, power=cfg.lr_power)
    tx = optim.adamw(schedule, b1=cfg.adam_beta1, b2=cfg.adam_beta2, eps=cfg.adam_epsilon,
                     weight_decay=cfg.adam_weight_decay, max_grad_norm=cfg.max_grad_norm)

    trained = ["unet"] + (["text_encoder"] if cfg.train_text_encoder else [])
    mesh = parallel.data_mesh()
    params = {k: v for k, v in pipe.params.items() if k in trained}
    frozen = {k: v for k, v in pipe.params.items() if k not in trained}
    state = parallel.put_replicated(train_step.TrainState.create(params, frozen, tx), mesh)
    spec = train_step.StepSpec(
        unet=pipe.unet, vae=pipe.vae, text_encoder=pipe.text_encoder,
        alphas_cumprod=noise_schedule.alphas_cumprod(schedule_cfg), prediction_type=schedule_cfg.prediction_type,
        prior_loss_weight=cfg.prior_loss_weight, train_text_encoder=cfg.train_text_encoder,
        use_attention_mask=cfg.text_encoder_use_attention_mask,
    )
    loop = TrainLoop(cfg, pipe, mesh, spec, schedule, data, max_steps, global_batch)
    ckpt = checkpointing.Checkpointer(os.path.join(cfg.output_dir, "checkpoints"), every=cfg.checkpointing_steps,
                                      keep=cfg.checkpoints_total_limit)
    meta = {"model": cfg.pretrained_model_name_or_path, "seed": cfg.seed, "global_batch": global_batch,
            "trained": trained}
    resume = checkpointing.resolve_resume(cfg.resume_from_checkpoint, ckpt.root)
    if resume is not None:
        root, step = resume
        source = ckpt if root == ckpt.root else checkpointing.Checkpointer(root, every=cfg.checkpointing_steps)
        state, _ = source.restore(state, step, expected_meta=meta)
        log.info("resumed from %s/%d", root, step)
    try:
        state, metrics = loop.train(state, ckpt, meta)
    finally:
        ckpt.close()
    summary = loop.summary
    if int(state.step) >= max_steps:
        loop.export(state)
    loop.finish()
    return Run(state=state, output_dir=cfg.output_dir, steps=int(state.step), metrics=metrics, summary=summary)


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    for noisy in ("absl", "jax"):  # Orbax's per-save chatter, JAX's backend probing
        logging.getLogger(noisy).setLevel(logging.WARNING)


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
    main()
