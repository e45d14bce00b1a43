"""Many subjects in one run: K independent DreamBooth models trained by one compiled program.

`python -m dreambooth_jax.train --subjects subjects.json` (or `--dataset dreambooth:dog6,cat,can`): each subject
keeps its own data, class images (a folder shared when subjects name the same one), prompts, seed stream and
loss log, and is exported to `output_dir/<name>/` exactly as a run of it alone would be. The trained state
(params, optimizer state, EMA) of the K subjects is stacked along a leading subject axis, split over the mesh's
`subject` axis (device groups; data and fsdp inside each); the frozen networks (VAE, frozen text encoders, the
LoRA base) are shared. `step.subjects_train_step` is the ordinary step, vmapped over the subjects.

Subject k's batch spans the devices of its group (`parallel.subject_groups`: one group per subject where there
are enough devices): its global batch is --train_batch_size x those devices x --gradient_accumulation_steps, and
with the same global batch and seed its result is that of a run of it alone (up to the order of floating-point
sums). Where the subjects do not fill the groups evenly, padding slots repeat the last subject
(`parallel.subject_slots`); their results are dropped.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os

import jax
import numpy as np

from dreambooth_jax import parallel, storage
from dreambooth_jax.errors import DivergedError, UsageError
from dreambooth_jax.training import export as export_lib
from dreambooth_jax.training import preflight, trainer
from dreambooth_jax.training import state as state_lib
from dreambooth_jax.training import step as train_step
from dreambooth_jax.training.config import TrainConfig, read_concepts, read_subjects, resolve_dataset
from dreambooth_jax.training.inputs import SubjectsInputs, TrainInputs
from dreambooth_jax.training.loop import TrainLoop

log = logging.getLogger("dreambooth_jax.train")


def _max_steps(subjects, global_batch: int, count) -> int:
    """The step count every subject trains: each one's own (`trainer.count_steps` of `count(subject)`: its
    instance and class images); they must agree."""
    steps = {s.name: trainer.count_steps(s.cfg, global_batch, *count(s)) for s in subjects}
    if len(set(steps.values())) > 1:
        raise UsageError(f"the subjects would train different step counts ({steps}: --num_train_epochs over "
                         "different numbers of images); give --max_train_steps")
    return next(iter(steps.values()))


def _layout(cfg: TrainConfig, subjects: list, devices) -> tuple[int, int, int]:
    """(the slots: the subjects padded to fill the device groups, the groups, the devices per group); an --fsdp
    that does not divide a group's devices fails here."""
    n = len(devices)
    slots = parallel.subject_slots(len(subjects), n, cfg.subject_devices)
    groups = parallel.subject_groups(slots, n, cfg.subject_devices)
    if cfg.fsdp != "auto":
        parallel.train_mesh(int(cfg.fsdp), devices, groups)
    return slots, groups, n // groups


def _pad(items: list, slots: int) -> list:
    """`items` (one per subject), then the last repeated for the padding slots."""
    return items + items[-1:] * (slots - len(items))


def dry_run(cfg: TrainConfig, devices=None) -> dict:
    """`trainer.dry_run` of a run of several subjects: the memory preflight of the K-subject step."""
    devices = jax.devices() if devices is None else list(devices)
    subjects = read_subjects(cfg)
    slots, _, per_group = _layout(cfg, subjects, devices)
    shapes = trainer.model_shapes(cfg)
    global_batch = cfg.train_batch_size * per_group * cfg.gradient_accumulation_steps

    def count(s):
        concepts = read_concepts(s.cfg) if not s.cfg.dataset else []
        n = sum(storage.Folder(c.instance_data_dir).count_images() for c in concepts) or 1
        return n, trainer.expected_class_images(s.cfg, concepts)

    max_steps = _max_steps(subjects, global_batch, count)
    fsdp = cfg.fsdp if cfg.fsdp == "auto" else int(cfg.fsdp)
    plan = preflight.plan(cfg, shapes, trainer.step_spec(cfg, shapes), max_steps=max_steps,
                          global_batch=global_batch, fsdp=fsdp, devices=devices,
                          subjects=_pad([s.cfg for s in subjects], slots))
    return {**plan.report, "subjects": len(subjects)}


def run(cfg: TrainConfig):
    """Trains the subjects of `cfg` together (see the module docstring) through `trainer.run`'s stages; returns a
    `trainer.Run` whose `summary["subjects"]` names them."""
    devices = jax.devices()
    subjects = read_subjects(cfg)
    slots, groups, per_group = _layout(cfg, subjects, devices)  # bad --fsdp / --subject_devices: before anything
    cfg, output = trainer.prepare_output(cfg)
    subjects = [dataclasses.replace(s, cfg=dataclasses.replace(s.cfg, output_dir=os.path.join(cfg.output_dir,
                                                                                              s.name)))
                for s in subjects]
    names = [s.name for s in subjects]
    shapes = trainer.model_shapes(cfg)
    # --dataset subjects get their class folders under --class_data_dir (default output_dir/class_images), one per
    # class: subjects of one class share it.
    class_root = cfg.class_data_dir or os.path.join(cfg.output_dir, "class_images")
    subjects = [dataclasses.replace(s, cfg=resolve_dataset(s.cfg, class_root)) for s in subjects]
    given = {s.name: read_concepts(s.cfg) for s in subjects}
    datas = [trainer.read_data(s.cfg, given[s.name]) for s in subjects]
    global_batch = cfg.train_batch_size * per_group * cfg.gradient_accumulation_steps  # each subject's
    expected = {s.name: trainer.expected_class_images(s.cfg, given[s.name]) for s in subjects}
    instances = {s.name: d.num_instance_images for s, d in zip(subjects, datas)}
    max_steps = _max_steps(subjects, global_batch, lambda s: (instances[s.name], expected[s.name]))
    spec = trainer.step_spec(cfg, shapes)
    cfgs = _pad([s.cfg for s in subjects], slots)
    padding = f" and {slots - len(subjects)} padding slot(s)" if slots > len(subjects) else ""
    log.info("%d subjects (%s)%s in %d device group(s) of %d device(s)", len(subjects), ", ".join(names), padding,
             groups, per_group)
    fsdp = cfg.fsdp if cfg.fsdp == "auto" else int(cfg.fsdp)
    plan, pipe = trainer.plan_and_load(cfg, shapes, spec, max_steps=max_steps, global_batch=global_batch, fsdp=fsdp,
                                       subjects=cfgs)

    if cfg.with_prior_preservation:
        folders = {}  # (folder, prompt) -> the seed of the first subject naming it: as that subject alone fills it
        for s in subjects:
            for c in given[s.name]:
                folders.setdefault((c.class_data_dir, c.class_prompt), s.cfg.seed)
        trainer.fill_class_images(cfg, pipe, folders)
        for data in datas:
            data.add_class_images()
        classes = {s.name: d.num_class_images for s, d in zip(subjects, datas)}
        counted = _max_steps(subjects, global_batch, lambda s: (instances[s.name], classes[s.name]))
        if counted != max_steps:  # fewer readable class images than expected: the schedule's length changes
            max_steps = counted
            plan = preflight.plan(cfg, shapes, spec, max_steps=max_steps, global_batch=global_batch,
                                  fsdp=plan.report["mesh"]["fsdp"], subjects=cfgs)
    trainer.log_recipe(cfg, per_group, global_batch, max_steps, min(instances.values()), prefix="each subject: ")

    inputs = [TrainInputs(s.cfg, pipe, d, plan.mesh, subject_devices=per_group) for s, d in zip(subjects, datas)]
    inputs = SubjectsInputs(_pad(inputs, slots), plan.mesh)
    schedules = state_lib.lr_schedules(cfg, plan.abstract_state.params, max_steps, global_batch)
    loop = SubjectsLoop(cfg, subjects, [c.seed for c in cfgs], pipe, plan.mesh, spec, schedules, inputs, max_steps,
                        global_batch, output)
    loop.summary["subjects"] = names
    meta = {"model": cfg.pretrained_model_name_or_path, "subjects": names, "subject_slots": slots,
            "seeds": [s.cfg.seed for s in subjects], "global_batch": global_batch, "optimizer": cfg.optimizer,
            "use_ema": cfg.use_ema}
    return trainer.train_and_export(cfg, plan, pipe, loop, meta, output)


class SubjectsLoop(TrainLoop):
    """`TrainLoop` for several subjects: the vmapped step, each subject's seed stream, loss log
    (`<name>/logs/metrics.jsonl`; the run's own log holds the means over the subjects), validation images
    and export."""

    def __init__(self, cfg, subjects, seeds, pipe, mesh, spec, schedules, inputs, max_steps, global_batch, output):
        """`subjects`: the run's; `seeds`: those of every slot of the state and batches (the subjects', then the
        padding slots', which repeat the last subject)."""
        super().__init__(cfg, pipe, mesh, spec, schedules, inputs, max_steps, global_batch * len(subjects), output)
        self.subjects = subjects
        self.rng = parallel.put_replicated(np.stack([np.asarray(jax.random.PRNGKey(seed)) for seed in seeds]), mesh)
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
            if bad:  # one program trains them all: the run stops (its last checkpoint holds every subject)
                raise DivergedError(f"loss is not finite at step {step} for subject(s) {', '.join(bad)}; stopping the "
                                    "run of every subject (lower the learning rate, or check their data; or train "
                                    "the others without them)")
            if self.is_main:
                for k, s in enumerate(self.subjects):
                    row = {"step": step, **{name: float(v[k]) for name, v in metrics.items()}}
                    self.logs[s.name].write(json.dumps(row) + "\n")
        if self.is_main:
            for f in self.logs.values():
                f.flush()
            self.output.push(*[f"{s.name}/logs" for s in self.subjects])
        k = len(self.subjects)  # (not the padding slots)
        return super()._log([(step, {key: v[:k].mean() for key, v in m.items()}, waited)
                             for step, m, waited in fetched])

    def export(self, state) -> None:
        """Each subject's result in `output_dir/<name>/`, as a run of it alone writes it."""
        base = export_lib.merge_base(self.cfg) if self.cfg.use_lora and self.cfg.merge_lora else None  # once
        for k, s in enumerate(self.subjects):
            written = export_lib.export(s.cfg, self.pipe, state.subject(k), self.spec.lora, step=self.step_count,
                                        write=self.is_main, base=base)
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

