"""A DreamBooth run from a `TrainConfig`: what `python -m dreambooth_jax.train` calls.

One compiled `train_step` runs over a (data, fsdp) mesh of every device of every host: the batch split over
both axes, the trained state and frozen networks sharded over `fsdp` (see `parallel` and `preflight`). A run of
several subjects (--subjects) adds a `subject` axis (`subjects`) and goes through the same stages.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import math
import os

import jax

from dreambooth_jax import parallel, storage
from dreambooth_jax.errors import UsageError
from dreambooth_jax.images import count_images
from dreambooth_jax.parallel import maybe_initialize_distributed
from dreambooth_jax.pipeline import load_pipeline
from dreambooth_jax.training import checkpoints, preflight
from dreambooth_jax.training import state as state_lib
from dreambooth_jax.training import step as train_step
from dreambooth_jax.training import subjects as subjects_lib
from dreambooth_jax.training.class_images import ensure_class_images
from dreambooth_jax.training.concepts import (
    Subject,
    many_subjects,
    read_concepts,
    read_subjects,
    resolve_dataset,
)
from dreambooth_jax.training.config import TrainConfig, load_preset
from dreambooth_jax.training.data import DreamBoothData
from dreambooth_jax.training.inputs import SubjectsInputs, TrainInputs
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


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where a run's subjects train, resolved once from the options and the devices: a run of one subject spans
    every device; a run of several puts each in a device group (`parallel.subject_groups`), padded with slots that
    repeat the last subject where they do not fill the groups (`parallel.subject_slots`)."""

    slots: int  # subject slots of the state (0: one subject, no subject axis)
    groups: int | None  # device groups (None: one subject)
    per_subject: int  # devices each subject's batch spans
    fsdp: str | int  # 'auto' or the fsdp size inside each group

    def global_batch(self, cfg: TrainConfig) -> int:
        """Instance rows per step of each subject: per device x its devices x accumulated micro-batches."""
        return cfg.train_batch_size * self.per_subject * cfg.gradient_accumulation_steps

    def pad(self, items: list) -> list:
        """`items` (one per subject), then the last repeated for the padding slots."""
        return items + items[-1:] * (self.slots - len(items)) if self.slots else items


def layout(cfg: TrainConfig, devices, num_subjects: int | None = None) -> Layout:
    """The run's `Layout` on `devices` (`num_subjects` None: one subject); an --fsdp that does not divide the
    devices of a group, or a bad --subject_devices, fails here, before anything is read."""
    n = len(devices)
    slots = groups = None
    if num_subjects is not None:
        slots = parallel.subject_slots(num_subjects, n, cfg.subject_devices)
        groups = parallel.subject_groups(slots, n, cfg.subject_devices)
    fsdp = "auto" if cfg.fsdp == "auto" else int(cfg.fsdp)
    if fsdp != "auto":
        parallel.train_mesh(fsdp, devices, groups)
    return Layout(slots or 0, groups, n // (groups or 1), fsdp)


def run(cfg: TrainConfig) -> Run:
    """Trains as `cfg` says, one stage after the other: the layout -> the output folder -> the model's configs ->
    the subjects' data -> the compiled step and its memory preflight (while the weights load) -> class images ->
    the loop (checkpoints, validation, logs) -> export. A run of one subject and a run of several
    (`--subjects`, `subjects.SubjectsLoop`) go through the same stages. Usable from Python (tests, notebooks).
    With `cfg.dry_run`, stops after the preflight: `Run.summary["preflight"]` holds its report."""
    maybe_initialize_distributed()
    configure_compilation_cache(cfg.compilation_cache_dir)
    if cfg.dry_run:
        return Run(state=None, output_dir=cfg.output_dir, steps=0, metrics=[], summary={"preflight": dry_run(cfg)})
    many = many_subjects(cfg)
    named = read_subjects(cfg) if many else None
    where = layout(cfg, jax.devices(), len(named) if many else None)  # bad --fsdp: before anything else
    cfg, output = prepare_output(cfg)
    shapes = model_shapes(cfg)
    subjects = subjects_lib.resolve(cfg, named) if many else [Subject("", resolve_dataset(cfg))]
    given = {s.name: read_concepts(s.cfg) for s in subjects}  # as the user named the folders
    datas = [read_data(s.cfg, given[s.name]) for s in subjects]  # reads the instance images: bad ones fail here
    global_batch = where.global_batch(cfg)
    instances = {s.name: d.num_instance_images for s, d in zip(subjects, datas)}
    expected = {s.name: expected_class_images(s.cfg, given[s.name]) for s in subjects}
    max_steps = _max_steps(subjects, global_batch, lambda s: (instances[s.name], expected[s.name]))
    spec = step_spec(cfg, shapes)
    slots = where.pad([s.cfg for s in subjects]) if many else None
    if many:
        subjects_lib.log_layout(subjects, where)
    plan, pipe = plan_and_load(cfg, shapes, spec, max_steps=max_steps, global_batch=global_batch, fsdp=where.fsdp,
                               subjects=slots)

    if cfg.with_prior_preservation:
        folders = {}  # (folder, prompt) -> the seed of the first subject naming it: as that subject alone fills it
        for s in subjects:
            for c in given[s.name]:
                folders.setdefault((c.class_data_dir, c.class_prompt), s.cfg.seed)
        fill_class_images(cfg, pipe, folders)
        for data in datas:
            data.add_class_images()
        classes = {s.name: d.num_class_images for s, d in zip(subjects, datas)}
        counted = _max_steps(subjects, global_batch, lambda s: (instances[s.name], classes[s.name]))
        if counted != max_steps:  # fewer readable class images than expected: the schedule's length changes
            max_steps = counted
            plan = preflight.plan(cfg, shapes, spec, max_steps=max_steps, global_batch=global_batch,
                                  fsdp=plan.report["mesh"]["fsdp"], subjects=slots)
    log_recipe(cfg, where.per_subject, global_batch, max_steps, min(instances.values()),
               prefix="each subject: " if many else "")

    # The inputs' caches (latents, text) use the pipeline's params: made before the state takes them.
    inputs = [TrainInputs(s.cfg, pipe, d, plan.mesh, subject_devices=where.per_subject if many else None)
              for s, d in zip(subjects, datas)]
    schedules = state_lib.lr_schedules(cfg, pipe.family, plan.abstract_state.params, max_steps, global_batch)
    meta = {"model": cfg.pretrained_model_name_or_path, "seed": cfg.seed, "global_batch": global_batch,
            "optimizer": cfg.optimizer, "use_ema": cfg.use_ema}
    if many:
        loop = subjects_lib.SubjectsLoop(cfg, subjects, [c.seed for c in slots], pipe, plan.mesh, spec, schedules,
                                         SubjectsInputs(where.pad(inputs), plan.mesh), max_steps, global_batch,
                                         output)
        meta = subjects_lib.checkpoint_meta(meta, subjects, where)
    else:
        loop = TrainLoop(cfg, pipe, plan.mesh, spec, schedules, inputs[0], max_steps, global_batch, output)
    return train_and_export(cfg, plan, pipe, loop, meta, output)


def _max_steps(subjects, global_batch: int, count) -> int:
    """The step count every subject trains: each one's own (`count_steps` of `count(subject)`: its instance and
    class images); they must agree."""
    steps = {s.name: count_steps(s.cfg, global_batch, *count(s)) for s in subjects}
    if len(set(steps.values())) > 1:
        raise UsageError(f"the subjects would train different step counts ({steps}: --num_train_epochs over "
                         "different numbers of images); give --max_train_steps")
    return next(iter(steps.values()))


def prepare_output(cfg: TrainConfig) -> tuple[TrainConfig, storage.Folder]:
    """(`cfg` writing to the output folder's local twin, the output `storage.Folder`): from here on everything is
    written to the local twin (the folder itself when local) and pushed where it is remote; checkpoints go to the
    folder directly."""
    output = storage.Folder(cfg.output_dir)
    output.prepare_output()
    if cfg.cache_latents and not cfg.center_crop:
        log.warning("--cache_latents encodes center crops once: random crops are off (flips still apply)")
    return dataclasses.replace(cfg, output_dir=output.local), output


def read_data(cfg: TrainConfig, concepts) -> DreamBoothData:
    """The training set of `concepts` (remote folders mirrored locally first), seeded by `cfg.seed`."""
    local = [dataclasses.replace(c, instance_data_dir=storage.Folder(c.instance_data_dir).pull(),
                                 class_data_dir=c.class_data_dir and storage.Folder(c.class_data_dir).local)
             for c in concepts]
    return DreamBoothData(local, resolution=cfg.resolution, center_crop=cfg.center_crop, random_flip=cfg.random_flip,
                          skip_bad_images=cfg.skip_bad_images, seed=cfg.seed)


def plan_and_load(cfg: TrainConfig, shapes, spec, *, max_steps: int, global_batch: int, fsdp,
                  subjects=None) -> tuple[preflight.Plan, object]:
    """(the preflight's plan, the pipeline with its weights on the mesh): the step compiles (and its memory is
    known) while the weights are read into host memory; a run that will not fit stops before they are placed."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        planned = pool.submit(preflight.plan, cfg, shapes, spec, max_steps=max_steps, global_batch=global_batch,
                              fsdp=fsdp, subjects=subjects)
        host = load_pipeline(cfg.pretrained_model_name_or_path, weights="host", **_pipeline_options(cfg))
        plan = planned.result()
    log.info("preflight: %s", json.dumps(plan.report))
    preflight.raise_if_too_large(plan.report, cfg)
    return plan, dataclasses.replace(host, params=plan.place_params(host.params))


def fill_class_images(cfg: TrainConfig, pipe, folders: dict) -> None:
    """Generates the missing class images of each (folder, prompt) of `folders`, drawn from its seed: a folder
    shared by concepts (or subjects) is filled once."""
    for (folder, prompt), seed in sorted(folders.items()):
        ensure_class_images(pipe, folder, prompt, cfg.num_class_images, batch_size_per_device=cfg.sample_batch_size,
                            num_inference_steps=cfg.validation_inference_steps, seed=seed)


def log_recipe(cfg: TrainConfig, devices: int, global_batch: int, max_steps: int, num_instances: int,
               prefix: str = "") -> None:
    """`recipe_report`, logged by process 0."""
    if parallel.is_main_process():
        summary, warning = recipe_report(cfg, devices, global_batch, max_steps, num_instances)
        log.info("%s%s", prefix, summary)
        if warning:
            log.warning("%s", warning)


def train_and_export(cfg: TrainConfig, plan, pipe, loop, meta: dict, output) -> Run:
    """The initial state (resumed from a checkpoint where asked; `meta` is checked against the checkpoint's), the
    loop, and the export once every step is done."""
    loop.compiled = plan.compiled
    loop.summary.update(preflight=plan.report, compile_s=plan.compile_s)
    ckpt = checkpoints.Checkpointer(output.join("checkpoints"), every=cfg.checkpointing_steps,
                                    keep=cfg.checkpoints_total_limit)
    if cfg.pretrained_vae_model_name_or_path:  # (older checkpoints have no "vae": read as None, the pipeline's own)
        meta = {**meta, "vae": cfg.pretrained_vae_model_name_or_path}
    resume = checkpoints.resolve_resume(cfg.resume_from_checkpoint, ckpt.root)
    state = plan.init_state(pipe.params)  # the pipeline's params are donated: the state's arrays replace them
    # The loop freezes the text encoder at the start of step `stop`, after the checkpoint of step `stop` was
    # written: only later checkpoints were saved without it.
    stop = cfg.stop_text_encoder_training
    if resume is not None and stop is not None and resume[1] > stop:
        state, loop.compiled = state.freeze(*state_lib.text_encoder_parts(cfg, pipe.family)), None
    if resume is not None:
        root, step = resume
        source = ckpt if root == ckpt.root else checkpoints.Checkpointer(root, every=cfg.checkpointing_steps)
        state, _ = source.restore(state, step, expected_meta=meta)
        log.info("resumed from %s/%d", root, step)
    try:
        state, metrics = loop.train(state, ckpt, meta)
    finally:
        ckpt.close()
    if loop.step_count >= loop.max_steps:
        loop.export(state)
        parallel.barrier("export")  # the others wait until process 0 has written the pipeline
    loop.finish()
    return Run(state=state, output_dir=output.uri, steps=loop.step_count, metrics=metrics, summary=loop.summary)


def dry_run(cfg: TrainConfig, devices=None) -> dict:
    """The memory preflight of `cfg` on `devices` (default: every device of every process; or e.g. the
    compile-only devices of a TPU topology), from the model's configs and tokenizers alone: what `--dry_run`
    prints. The data folders are listed, not read."""
    devices = jax.devices() if devices is None else list(devices)
    many = many_subjects(cfg)
    subjects = read_subjects(cfg) if many else [Subject("", cfg)]
    where = layout(cfg, devices, len(subjects) if many else None)
    shapes = model_shapes(cfg)
    global_batch = where.global_batch(cfg)

    def count(s):
        concepts = read_concepts(s.cfg) if not s.cfg.dataset else []
        n = sum(storage.Folder(c.instance_data_dir).count_images() for c in concepts) or 1
        return n, expected_class_images(s.cfg, concepts)

    plan = preflight.plan(cfg, shapes, step_spec(cfg, shapes), max_steps=_max_steps(subjects, global_batch, count),
                          global_batch=global_batch, fsdp=where.fsdp, devices=devices,
                          subjects=where.pad([s.cfg for s in subjects]) if many else None)
    return {**plan.report, "subjects": len(subjects)} if many else plan.report


def model_shapes(cfg: TrainConfig):
    """The pipeline's modules, tokenizers and parameter shapes, from its configs (no weight is read); options the
    model cannot take are refused here, before any weight is loaded."""
    shapes = load_pipeline(cfg.pretrained_model_name_or_path, weights="none", **_pipeline_options(cfg))
    shapes.family.check_options(dataclasses.asdict(cfg))
    return shapes


def _pipeline_options(cfg: TrainConfig) -> dict:
    return dict(dtype=cfg.compute_dtype, param_dtype="fp32", revision=cfg.revision, variant=cfg.variant,
                vae=cfg.pretrained_vae_model_name_or_path, attention_impl=cfg.attention,
                remat=cfg.gradient_checkpointing, fused_norm=cfg.fused_norm)


def step_spec(cfg: TrainConfig, pipe) -> train_step.StepSpec:
    """The static parts of the step: the pipeline's family and modules (weights not needed), objective, options."""
    return train_step.StepSpec.of(
        pipe, snr_gamma=cfg.snr_gamma, run_options=dataclasses.asdict(cfg), prior_loss_weight=cfg.prior_loss_weight,
        use_attention_mask=cfg.text_encoder_use_attention_mask,
        noise_offset=cfg.noise_offset if cfg.offset_noise else 0.0, max_grad_norm=cfg.max_grad_norm,
        ema_decay=cfg.ema_decay, lora=state_lib.lora_config(cfg),
    )


def expected_class_images(cfg: TrainConfig, concepts) -> int:
    """Class images the run will read once the missing ones are generated (each concept reads its folder)."""
    if not cfg.with_prior_preservation:
        return 0
    def have(uri: str) -> int:  # a bucket folder is listed, not downloaded
        folder = storage.Folder(uri)
        return folder.count_images() if folder.remote else count_images(uri)

    return sum(max(have(c.class_data_dir), cfg.num_class_images) for c in concepts if c.class_data_dir)


def count_steps(cfg: TrainConfig, global_batch: int, num_instances: int, num_classes: int) -> int:
    """The run's optimizer steps: --max_train_steps, else --num_train_epochs over the larger image set."""
    return cfg.max_train_steps or cfg.num_train_epochs * math.ceil(max(num_instances, num_classes) / global_batch)


def configure_compilation_cache(option: str | None) -> None:
    """XLA's persistent compilation cache: `option`, else $JAX_COMPILATION_CACHE_DIR, else our user cache folder;
    'none' turns it off. A second run of the same command then loads its programs instead of compiling them."""
    if option == "none":
        jax.config.update("jax_compilation_cache_dir", None)
        return
    folder = option or os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "dreambooth_jax", "xla")
    if jax.config.jax_compilation_cache_dir != folder:
        jax.config.update("jax_compilation_cache_dir", folder)


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
