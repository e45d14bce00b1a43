"""Many subjects in one run: K independent DreamBooth models trained by one compiled program.

`python -m dreambooth_jax.train --subjects subjects.json` (or `--dataset dreambooth:dog6,cat,can`): each subject
keeps its own data, class images (a folder shared when subjects name the same one), prompts, seed stream and
loss log, and is exported to `output_dir/<name>/` exactly as a run of it alone would be. The trained state
(params, optimizer state, EMA) of the K subjects is stacked along a leading subject axis, split over the mesh's
`subject` axis (device groups; data and fsdp inside each); the frozen networks (VAE, frozen text encoders, the
LoRA base) are shared. `step.subjects_train_step` is the ordinary step, vmapped over the subjects.

Subject k's batch spans the devices of its group (`parallel.subject_groups`): its global batch is
--train_batch_size x those devices x --gradient_accumulation_steps, and with the same global batch and seed its
result is that of a run of it alone (up to the order of floating-point sums).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import logging
import os

import jax
import numpy as np

from dreambooth_jax import parallel, storage
from dreambooth_jax.errors import DivergedError, UsageError
from dreambooth_jax.pipeline import load_pipeline
from dreambooth_jax.training import checkpoints, preflight
from dreambooth_jax.training import export as export_lib
from dreambooth_jax.training import state as state_lib
from dreambooth_jax.training import step as train_step
from dreambooth_jax.training.class_images import ensure_class_images
from dreambooth_jax.training.config import TrainConfig, read_concepts, read_subjects, resolve_dataset
from dreambooth_jax.training.data import DreamBoothData
from dreambooth_jax.training.inputs import SubjectsInputs, TrainInputs
from dreambooth_jax.training.loop import TrainLoop

log = logging.getLogger("dreambooth_jax.train")


def _max_steps(subjects, global_batch: int, count) -> int:
    """The step count every subject trains: each one's own (`trainer._max_steps`); they must agree."""
    from dreambooth_jax.training.trainer import _max_steps as steps_of

    steps = {s.name: steps_of(s.cfg, global_batch, *count(s)) for s in subjects}
    if len(set(steps.values())) > 1:
        raise UsageError(f"the subjects would train different step counts ({steps}: --num_train_epochs over "
                         "different numbers of images); give --max_train_steps")
    return next(iter(steps.values()))


def dry_run(cfg: TrainConfig, devices=None) -> dict:
    """`trainer.dry_run` of a run of several subjects: the memory preflight of the K-subject step."""
    from dreambooth_jax.training import trainer

    devices = jax.devices() if devices is None else list(devices)
    subjects = read_subjects(cfg)
    groups = parallel.subject_groups(len(subjects), len(devices))
    fsdp = trainer._fsdp(cfg, devices[: len(devices) // groups])
    shapes = trainer._model_shapes(cfg)
    global_batch = cfg.train_batch_size * (len(devices) // groups) * cfg.gradient_accumulation_steps

    def count(s):
        concepts = read_concepts(s.cfg) if not s.cfg.dataset else []
        n = sum(storage.Folder(c.instance_data_dir).count_images() for c in concepts) or 1
        return n, trainer._expected_class_images(s.cfg, concepts)

    max_steps = _max_steps(subjects, global_batch, count)
    plan = preflight.plan(cfg, shapes, trainer.step_spec(cfg, shapes), max_steps=max_steps,
                          global_batch=global_batch, fsdp=fsdp, devices=devices, subjects=[s.cfg for s in subjects])
    return plan.report


def run(cfg: TrainConfig):
    """Trains the subjects of `cfg` together (see the module docstring); returns a `trainer.Run` whose
    `summary["subjects"]` names them. The order of things is `trainer.run`'s."""
    from dreambooth_jax.training import trainer

    devices = jax.devices()
    output = storage.Folder(cfg.output_dir)
    output.prepare_output()
    cfg = dataclasses.replace(cfg, output_dir=output.local)
    subjects = read_subjects(cfg)
    names = [s.name for s in subjects]
    groups = parallel.subject_groups(len(subjects), len(devices))
    per_group = len(devices) // groups
    fsdp = trainer._fsdp(cfg, devices[:per_group])  # checked against a group's devices
    if cfg.cache_latents and not cfg.center_crop:
        log.warning("--cache_latents encodes center crops once: random crops are off (flips still apply)")

    shapes = trainer._model_shapes(cfg)
    class_root = os.path.join(cfg.output_dir, "class_images")  # --dataset subjects of one class share a folder
    subjects = [dataclasses.replace(s, cfg=resolve_dataset(s.cfg, class_root)) for s in subjects]
    given = {s.name: read_concepts(s.cfg) for s in subjects}
    datas = []
    for s in subjects:
        concepts = [dataclasses.replace(c, instance_data_dir=storage.Folder(c.instance_data_dir).pull(),
                                        class_data_dir=c.class_data_dir and storage.Folder(c.class_data_dir).local)
                    for c in given[s.name]]
        datas.append(DreamBoothData(concepts, resolution=cfg.resolution, center_crop=cfg.center_crop,
                                    random_flip=cfg.random_flip, skip_bad_images=cfg.skip_bad_images,
                                    seed=s.cfg.seed))
    global_batch = cfg.train_batch_size * per_group * cfg.gradient_accumulation_steps  # each subject's
    expected = {s.name: trainer._expected_class_images(s.cfg, given[s.name]) for s in subjects}
    instances = {s.name: d.num_instance_images for s, d in zip(subjects, datas)}
    max_steps = _max_steps(subjects, global_batch, lambda s: (instances[s.name], expected[s.name]))
    spec = trainer.step_spec(cfg, shapes)
    cfgs = [s.cfg for s in subjects]
    log.info("%d subjects (%s) in %d device group(s) of %d device(s)", len(subjects), ", ".join(names), groups,
             per_group)

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        planned = pool.submit(preflight.plan, cfg, shapes, spec, max_steps=max_steps, global_batch=global_batch,
                              fsdp=fsdp, subjects=cfgs)
        host = load_pipeline(cfg.pretrained_model_name_or_path, weights="host", **trainer._pipeline_options(cfg))
        plan = planned.result()
    report = plan.report
    log.info("preflight: %s", json.dumps(report))
    preflight.raise_if_too_large(report, cfg)
    mesh = plan.mesh
    pipe = dataclasses.replace(host, params=plan.place_params(host.params))
    del host

    if cfg.with_prior_preservation:
        folders = {(c.class_data_dir, c.class_prompt) for s in subjects for c in given[s.name]}
        for folder, prompt in sorted(folders):  # a folder shared by subjects: filled once
            ensure_class_images(pipe, folder, prompt, cfg.num_class_images, batch_size_per_device=cfg.sample_batch_size,
                                num_inference_steps=cfg.validation_inference_steps, seed=cfg.seed)
        for data in datas:
            data.add_class_images()
        counted = _max_steps(subjects, global_batch, lambda s: (instances[s.name], datas[names.index(s.name)]
                                                                .num_class_images))
        if counted != max_steps:  # fewer readable class images than expected: the schedule's length changes
            max_steps = counted
            plan = preflight.plan(cfg, shapes, spec, max_steps=max_steps, global_batch=global_batch,
                                  fsdp=report["mesh"]["fsdp"], subjects=cfgs)
    if jax.process_index() == 0:
        summary, warning = trainer.recipe_report(cfg, per_group, global_batch, max_steps,
                                                 min(instances.values()))
        log.info("each subject: %s", summary)
        if warning:
            log.warning("%s", warning)

    inputs = SubjectsInputs([TrainInputs(s.cfg, pipe, d, mesh, subject_devices=per_group)
                             for s, d in zip(subjects, datas)], mesh)
    schedules = state_lib.lr_schedules(cfg, plan.abstract_state.params, max_steps, global_batch)
    loop = SubjectsLoop(cfg, subjects, pipe, mesh, spec, schedules, inputs, max_steps, global_batch, output)
    loop.compiled = plan.compiled
    loop.summary.update(preflight=report, compile_s=plan.compile_s, subjects=names)
    ckpt = checkpoints.Checkpointer(output.join("checkpoints"), every=cfg.checkpointing_steps,
                                    keep=cfg.checkpoints_total_limit)
    meta = {"model": cfg.pretrained_model_name_or_path, "subjects": names, "seeds": [c.seed for c in cfgs],
            "global_batch": global_batch, "optimizer": cfg.optimizer, "use_ema": cfg.use_ema}
    if cfg.pretrained_vae_model_name_or_path:
        meta["vae"] = cfg.pretrained_vae_model_name_or_path
    resume = checkpoints.resolve_resume(cfg.resume_from_checkpoint, ckpt.root)
    state = plan.init_state(pipe.params)
    stop = cfg.stop_text_encoder_training
    if resume is not None and stop is not None and resume[1] > stop:
        state, loop.compiled = state.freeze(*cfg.text_encoder_parts), None
    if resume is not None:
        root, step = resume
        source = ckpt if root == ckpt.root else checkpoints.Checkpointer(root, every=cfg.checkpointing_steps)
        state, _ = source.restore(state, step, expected_meta=meta)
        log.info("resumed from %s/%d", root, step)
    try:
        state, metrics = loop.train(state, ckpt, meta)
    finally:
        ckpt.close()
    if loop.step_count >= max_steps:
        loop.export(state)
        parallel.barrier("export")
    loop.finish()
    return trainer.Run(state=state, output_dir=output.uri, steps=loop.step_count, metrics=metrics,
                       summary=loop.summary)


class SubjectsLoop(TrainLoop):
    """`TrainLoop` for several subjects: the vmapped step, each subject's seed stream, loss log
    (`<name>/logs/metrics.jsonl`; the run's own log holds the means over the subjects), validation images
    and export."""

    def __init__(self, cfg, subjects, pipe, mesh, spec, schedules, inputs, max_steps, global_batch, output):
        super().__init__(cfg, pipe, mesh, spec, schedules, inputs, max_steps, global_batch * len(subjects), output)
        self.subjects = subjects
        keys = np.stack([np.asarray(jax.random.key_data(jax.random.PRNGKey(s.cfg.seed))) for s in subjects])
        self.rng = parallel.put_replicated(keys, mesh)
        self.batch_sharding = parallel.batch_sharding(mesh, batch_axis=2)
        self.step = functools.partial(train_step.subjects_train_step, spec=spec, schedules=schedules)
        self.validating = any(s.cfg.validation_prompt for s in subjects)
        self.logs = {}
        if self.is_main:
            output.pull(tuple(f"{s.name}/logs/*" for s in subjects), required=False)  # a resumed run appends
            for s in subjects:
                os.makedirs(os.path.join(s.cfg.output_dir, "logs"), exist_ok=True)
                self.logs[s.name] = open(os.path.join(s.cfg.output_dir, "logs", "metrics.jsonl"), "a",
                                         encoding="utf-8")

    def _log(self, pending) -> list[dict]:
        """Each subject's rows to its own log; the run's rows (returned, and in the run's log) hold the means
        over the subjects."""
        fetched = [(step, {k: np.asarray(v, np.float64) for k, v in jax.device_get(m).items()}, waited)
                   for step, m, waited in pending]
        for step, metrics, _ in fetched:
            bad = [s.name for k, s in enumerate(self.subjects) if not np.isfinite(metrics["loss"][k])]
            if bad:
                raise DivergedError(f"loss is not finite at step {step} for subject(s) {', '.join(bad)}; stopping "
                                    "(lower the learning rate, or check their data)")
            if self.is_main:
                for k, s in enumerate(self.subjects):
                    row = {"step": step, **{name: float(v[k]) for name, v in metrics.items()}}
                    self.logs[s.name].write(json.dumps(row) + "\n")
        if self.is_main:
            for f in self.logs.values():
                f.flush()
            self.output.push(*[f"{s.name}/logs" for s in self.subjects])
        return super()._log([(step, {k: v.mean() for k, v in m.items()}, waited) for step, m, waited in fetched])

    def export(self, state) -> None:
        """Each subject's result in `output_dir/<name>/`, as a run of it alone writes it."""
        for k, s in enumerate(self.subjects):
            written = export_lib.export(s.cfg, self.pipe, state.subject(k), self.spec.lora, step=self.step_count,
                                        write=self.is_main)
            if self.is_main:
                last = "model_index.json" if "model_index.json" in written else None
                self.output.push(*[f"{s.name}/{w}" for w in written], last=last and f"{s.name}/{last}")

    def validate(self, state, step: int, cfg=None) -> None:
        """Each subject's validation images (those with a validation prompt), into `<name>/validation/`."""
        for k, s in enumerate(self.subjects):
            if s.cfg.validation_prompt:
                super().validate(state.subject(k), step, s.cfg)

    def finish(self) -> None:
        super().finish()
        for f in self.logs.values():
            f.close()

