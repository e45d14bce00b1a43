"""A DreamBooth run from a `TrainConfig`: what `python -m dreambooth_jax.train` calls.

One compiled `train_step` runs over a (data, fsdp) mesh of every device of every host: the batch split over
both axes, the trained state and frozen networks sharded over `fsdp` (see `parallel` and `preflight`). A run
of several subjects (--subjects) adds a `subject` axis (`subjects`) and goes through the same stages.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import os

import jax

from dreambooth_jax import parallel, storage
from dreambooth_jax.errors import UsageError
from dreambooth_jax.parallel import maybe_initialize_distributed
from dreambooth_jax.training import checkpoints, preflight
from dreambooth_jax.training import state as state_lib
from dreambooth_jax.training import step as train_step
from dreambooth_jax.training import subjects as subjects_lib
from dreambooth_jax.training.class_images import ensure_class_images, expected_class_images
from dreambooth_jax.training.concepts import (
    SubjectRun,
    many_subjects,
    read_concepts,
    read_subjects,
    resolve_dataset,
    resolve_subjects,
)
from dreambooth_jax.training.config import TrainConfig, recipe_report
from dreambooth_jax.training.data import DreamBoothData
from dreambooth_jax.training.inputs import SubjectsInputs, TrainInputs
from dreambooth_jax.training.loop import TrainLoop
from dreambooth_jax.training.specs import (
    BatchSpec,
    ClassImagesSpec,
    DataSpec,
    LengthSpec,
    LoopSpec,
    ModelSpec,
    StateSpec,
)

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
    """Where a run's subjects train, resolved once from the options and the devices: a run of one subject
    spans every device; a run of several puts each in a device group (`parallel.subject_groups`), padded with
    slots that repeat the last subject where they do not fill the groups (`parallel.subject_slots`)."""

    slots: int  # subject slots of the state (0: one subject, no subject axis)
    groups: int | None  # device groups (None: one subject)
    per_subject: int  # devices each subject's batch spans
    fsdp: str | int  # 'auto' or the fsdp size inside each group
    subject_devices: int | None  # --subject_devices

    def global_batch(self, batch: BatchSpec) -> int:
        """Instance rows per step of each subject: per device x its devices x accumulated micro-batches."""
        return batch.train_batch_size * self.per_subject * batch.gradient_accumulation_steps

    def pad(self, items: list) -> list:
        """`items` (one per subject), then the last repeated for the padding slots."""
        return items + items[-1:] * (self.slots - len(items)) if self.slots else items


def layout(devices, num_subjects: int | None, *, fsdp: str, subject_devices: int | None) -> Layout:
    """The run's `Layout` on `devices` (`num_subjects` None: one subject; `fsdp`, `subject_devices`: the
    flags); an --fsdp that does not divide the devices of a group, or a bad --subject_devices, fails here,
    before anything is read."""
    n = len(devices)
    slots = groups = None
    if num_subjects is not None:
        slots = parallel.subject_slots(num_subjects, n, subject_devices)
        groups = parallel.subject_groups(slots, n, subject_devices)
    fsdp = "auto" if fsdp == "auto" else int(fsdp)
    if fsdp != "auto":
        parallel.train_mesh(fsdp, devices, groups)
    return Layout(slots or 0, groups, n // (groups or 1), fsdp, subject_devices)


@dataclasses.dataclass
class _Part:
    """One subject of the run, as the stages need it: its concepts (as the user named the folders), its data
    and its own specs (seed, output folder, prompts)."""

    name: str
    concepts: list
    data: DreamBoothData
    state: StateSpec
    loop: LoopSpec
    length: LengthSpec
    class_images: ClassImagesSpec | None


def _part(subject: SubjectRun) -> _Part:
    """The specs of `subject` (its `TrainConfig`, resolved) and its training set; reads the instance images:
    bad ones fail here."""
    cfg = subject.cfg
    concepts = read_concepts(cfg)
    return _Part(subject.name, concepts, read_data(concepts, DataSpec.of(cfg)), StateSpec.of(cfg),
                 LoopSpec.of(cfg), LengthSpec.of(cfg), ClassImagesSpec.of(cfg))


def run(cfg: TrainConfig) -> Run:
    """Trains as `cfg` says, one stage after the other: the layout -> the output folder -> the model's configs
    -> the subjects' data -> the compiled step and its memory preflight (while the weights load) -> class
    images -> the loop (checkpoints, validation, logs) -> export. Each stage takes the specs it needs
    (`specs`), cut here from `cfg`. A run of one subject and a run of several (`--subjects`,
    `subjects.SubjectsLoop`) go through the same stages. Usable from Python (tests, notebooks). With
    `cfg.dry_run`, stops after the preflight: `Run.summary["preflight"]` holds its report."""
    maybe_initialize_distributed()
    configure_compilation_cache(cfg.compilation_cache_dir)
    if cfg.dry_run:
        return Run(state=None, output_dir=cfg.output_dir, steps=0, metrics=[],
                   summary={"preflight": dry_run(cfg)})
    many = many_subjects(cfg)
    named = read_subjects(cfg) if many else None
    where = layout(jax.devices(), len(named) if many else None, fsdp=cfg.fsdp,  # bad --fsdp: before anything
                   subject_devices=cfg.subject_devices)
    output = storage.Folder(cfg.output_dir)
    output.prepare_output()
    if cfg.cache_latents and not cfg.center_crop:
        log.warning("--cache_latents encodes center crops once: random crops are off (flips still apply)")
    # From here on everything is written to the output folder's local twin (the folder itself when local) and
    # pushed where it is remote; checkpoints go to the folder directly.
    cfg = dataclasses.replace(cfg, output_dir=output.local)
    model, batch = ModelSpec.of(cfg), BatchSpec.of(cfg)
    shapes = model_shapes(model, dataclasses.asdict(cfg))
    if many:
        subjects = resolve_subjects(named, cfg.output_dir, cfg.class_data_dir)
    else:
        subjects = [SubjectRun("", resolve_dataset(cfg))]
    parts = [_part(s) for s in subjects]
    global_batch = where.global_batch(batch)
    expected = [_expected_class_images(p) for p in parts]
    max_steps = _max_steps(parts, global_batch, expected)
    spec = step_spec(cfg, shapes)
    states = where.pad([p.state for p in parts]) if many else parts[0].state
    if many:
        subjects_lib.log_layout(subjects, where)
    plan, pipe = plan_and_load(model, shapes, spec, states, batch, max_steps=max_steps,
                               global_batch=global_batch, layout=where)

    if cfg.with_prior_preservation:
        # (folder, prompt) -> the seed of the first subject naming it: as that subject alone fills it
        folders = {}
        for p in parts:
            for c in p.concepts:
                folders.setdefault((c.class_data_dir, c.class_prompt), p.state.seed)
        fill_class_images(pipe, folders, ClassImagesSpec.of(cfg))
        for p in parts:
            p.data.add_class_images()
        counted = _max_steps(parts, global_batch, [p.data.num_class_images for p in parts])
        if counted != max_steps:  # fewer readable class images than expected: the schedule's length changes
            max_steps = counted
            plan = preflight.plan(shapes, spec, states, batch, max_steps=max_steps, global_batch=global_batch,
                                  fsdp=plan.report["mesh"]["fsdp"], subject_devices=where.subject_devices)
    if parallel.is_main_process():
        num_instances = min(p.data.num_instance_images for p in parts)
        summary, warning = recipe_report(cfg, where.per_subject, global_batch, max_steps, num_instances)
        prefix = "each subject: " if many else ""
        log.info("%s%s", prefix, summary)
        if warning:
            log.warning("%s", warning)

    # The inputs' caches (latents, text) use the pipeline's params: made before the state takes them.
    inputs = [TrainInputs(batch, pipe, p.data, plan.mesh, subject_devices=where.per_subject if many else None)
              for p in parts]
    schedules = state_lib.lr_schedules(parts[0].state, pipe.family, plan.abstract_state.params, max_steps,
                                       global_batch)
    meta = {"model": cfg.pretrained_model_name_or_path, "seed": cfg.seed, "global_batch": global_batch,
            "optimizer": cfg.optimizer, "use_ema": cfg.use_ema}
    if many:
        loops = {p.name: p.loop for p in parts}
        loop = subjects_lib.SubjectsLoop(LoopSpec.of(cfg), loops, [s.seed for s in states], pipe, plan.mesh,
                                         spec, schedules, SubjectsInputs(where.pad(inputs), plan.mesh),
                                         max_steps, global_batch, output)
        meta = subjects_lib.checkpoint_meta(meta, loops, where)
    # (older checkpoints have no "vae": read as None, the pipeline's own)
    if cfg.pretrained_vae_model_name_or_path:
        meta["vae"] = cfg.pretrained_vae_model_name_or_path
    if not many:
        loop = TrainLoop(parts[0].loop, pipe, plan.mesh, spec, schedules, inputs[0], max_steps, global_batch,
                         output)
    return train_and_export(plan, pipe, loop, meta, output, resume=cfg.resume_from_checkpoint,
                            keep=cfg.checkpoints_total_limit)


def _expected_class_images(part: _Part) -> int:
    """Class images `part` will read once the missing ones are generated (0 without prior preservation)."""
    if part.class_images is None:
        return 0
    return expected_class_images(part.concepts, part.class_images.num_class_images)


def _max_steps(parts: list[_Part], global_batch: int, classes: list[int]) -> int:
    """The step count every subject trains: each one's own (its `LengthSpec` over its instance images and its
    `classes` class images); they must agree."""
    return _agreed(
        {p.name: p.length.steps(global_batch, p.data.num_instance_images, n) for p, n in zip(parts, classes)})


def _agreed(steps: dict[str, int]) -> int:
    """The one step count of {subject: its step count}; a UsageError where they differ."""
    if len(set(steps.values())) > 1:
        raise UsageError(f"the subjects would train different step counts ({steps}: --num_train_epochs over "
                         "different numbers of images); give --max_train_steps")
    return next(iter(steps.values()))


def read_data(concepts, spec: DataSpec) -> DreamBoothData:
    """The training set of `concepts` (remote folders mirrored locally first), as `spec` reads it."""
    local = [dataclasses.replace(c, instance_data_dir=storage.Folder(c.instance_data_dir).pull(),
                                 class_data_dir=c.class_data_dir and storage.Folder(c.class_data_dir).local)
             for c in concepts]
    return DreamBoothData(local, **dataclasses.asdict(spec))


def plan_and_load(model: ModelSpec, shapes, spec, states, batch: BatchSpec, *, max_steps: int,
                  global_batch: int, layout: Layout) -> tuple[preflight.Plan, object]:
    """(the preflight's plan, the pipeline with its weights on the mesh): the step compiles (and its memory is
    known) while the weights are read into host memory; a run that will not fit stops before they are
    placed."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        planned = pool.submit(preflight.plan, shapes, spec, states, batch, max_steps=max_steps,
                              global_batch=global_batch, fsdp=layout.fsdp,
                              subject_devices=layout.subject_devices)
        host = model.load("host")
        plan = planned.result()
    log.info("preflight: %s", json.dumps(plan.report))
    preflight.raise_if_too_large(plan.report, states[0] if isinstance(states, list) else states, batch,
                                 gradient_checkpointing=model.gradient_checkpointing)
    return plan, dataclasses.replace(host, params=plan.place_params(host.params))


def fill_class_images(pipe, folders: dict, spec: ClassImagesSpec) -> None:
    """Generates the missing class images of each (folder, prompt) of `folders`, drawn from its seed: a folder
    shared by concepts (or subjects) is filled once."""
    for (folder, prompt), seed in sorted(folders.items()):
        ensure_class_images(pipe, folder, prompt, spec.num_class_images,
                            batch_size_per_device=spec.sample_batch_size,
                            num_inference_steps=spec.validation_inference_steps, seed=seed)


def train_and_export(plan, pipe, loop, meta: dict, output, *, resume: str | None, keep: int | None) -> Run:
    """The initial state (resumed from the checkpoint `resume` names, where given; `meta` is checked against
    the checkpoint's), the loop, and the export once every step is done; `keep`: checkpoints kept."""
    loop.compiled = plan.compiled
    loop.summary.update(preflight=plan.report, compile_s=plan.compile_s)
    every = loop.spec.checkpointing_steps
    ckpt = checkpoints.Checkpointer(output.join("checkpoints"), every=every, keep=keep)
    resume = checkpoints.resolve_resume(resume, ckpt.root)
    state = plan.init_state(pipe.params)  # the pipeline's params are donated: the state's arrays replace them
    # The loop freezes the text encoder at the start of step `stop`, after the checkpoint of step `stop` was
    # written: only later checkpoints were saved without it.
    stop = loop.spec.stop_text_encoder_training
    if resume is not None and stop is not None and resume[1] > stop:
        state, loop.compiled = state.freeze(*state_lib.text_encoder_parts(state.params, pipe.family)), None
    if resume is not None:
        root, step = resume
        source = ckpt if root == ckpt.root else checkpoints.Checkpointer(root, every=every)
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
    return Run(state=state, output_dir=output.uri, steps=loop.step_count, metrics=metrics,
               summary=loop.summary)


def dry_run(cfg: TrainConfig, devices=None) -> dict:
    """The memory preflight of `cfg` on `devices` (default: every device of every process; or e.g. the
    compile-only devices of a TPU topology), from the model's configs and tokenizers alone: what `--dry_run`
    prints. The data folders are listed, not read."""
    devices = jax.devices() if devices is None else list(devices)
    many = many_subjects(cfg)
    subjects = read_subjects(cfg) if many else [SubjectRun("", cfg)]
    where = layout(devices, len(subjects) if many else None, fsdp=cfg.fsdp,
                   subject_devices=cfg.subject_devices)
    batch = BatchSpec.of(cfg)
    shapes = model_shapes(ModelSpec.of(cfg), dataclasses.asdict(cfg))
    global_batch = where.global_batch(batch)
    steps = {}
    for s in subjects:
        concepts = read_concepts(s.cfg) if not s.cfg.dataset else []
        n = sum(storage.Folder(c.instance_data_dir).count_images() for c in concepts) or 1
        classes = (expected_class_images(concepts, s.cfg.num_class_images) if s.cfg.with_prior_preservation
                   else 0)
        steps[s.name] = LengthSpec.of(s.cfg).steps(global_batch, n, classes)
    states = where.pad([StateSpec.of(s.cfg) for s in subjects]) if many else StateSpec.of(cfg)
    plan = preflight.plan(shapes, step_spec(cfg, shapes), states, batch, max_steps=_agreed(steps),
                          global_batch=global_batch, fsdp=where.fsdp, devices=devices,
                          subject_devices=where.subject_devices)
    return {**plan.report, "subjects": len(subjects)} if many else plan.report


def model_shapes(model: ModelSpec, options: dict):
    """The pipeline's modules, tokenizers and parameter shapes, from its configs (no weight is read);
    `options` (the run's flags) the model cannot take are refused here, before any weight is loaded."""
    shapes = model.load("none")
    shapes.family.check_options(options)
    return shapes


def configure_compilation_cache(option: str | None) -> None:
    """XLA's persistent compilation cache: `option`, else $JAX_COMPILATION_CACHE_DIR, else our user cache
    folder; 'none' turns it off. A second run of the same command then loads its programs instead of compiling
    them."""
    if option == "none":
        jax.config.update("jax_compilation_cache_dir", None)
        return
    folder = option or os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "dreambooth_jax", "xla")
    if jax.config.jax_compilation_cache_dir != folder:
        jax.config.update("jax_compilation_cache_dir", folder)


def step_spec(cfg, pipe) -> train_step.StepSpec:
    """The static parts of the step: the pipeline's family and modules (weights not needed), objective,
    options."""
    return train_step.StepSpec.of(
        pipe, snr_gamma=cfg.snr_gamma, run_options=dataclasses.asdict(cfg),
        prior_loss_weight=cfg.prior_loss_weight, use_attention_mask=cfg.text_encoder_use_attention_mask,
        noise_offset=cfg.noise_offset if cfg.offset_noise else 0.0, max_grad_norm=cfg.max_grad_norm,
        ema_decay=cfg.ema_decay, lora=StateSpec.of(cfg).lora,
    )
