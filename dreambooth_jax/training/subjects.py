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

from dreambooth_jax import parallel
from dreambooth_jax.errors import DivergedError
from dreambooth_jax.training import export as export_lib
from dreambooth_jax.training import step as train_step
from dreambooth_jax.training.concepts import Subject, resolve_dataset
from dreambooth_jax.training.config import TrainConfig
from dreambooth_jax.training.loop import TrainLoop

log = logging.getLogger("dreambooth_jax.train")


def resolve(cfg: TrainConfig, subjects: list[Subject]) -> list[Subject]:
    """The subjects of a run writing to `cfg.output_dir` (its local twin): each one's output folder
    `output_dir/<name>`, and --dataset subjects' images and class folders (under --class_data_dir, default
    `output_dir/class_images`, one per class: subjects of one class share it)."""
    class_root = cfg.class_data_dir or os.path.join(cfg.output_dir, "class_images")
    out = []
    for s in subjects:
        own = dataclasses.replace(s.cfg, output_dir=os.path.join(cfg.output_dir, s.name))
        out.append(dataclasses.replace(s, cfg=resolve_dataset(own, class_root)))
    return out


def log_layout(subjects: list[Subject], layout) -> None:
    padding = f" and {layout.slots - len(subjects)} padding slot(s)" if layout.slots > len(subjects) else ""
    log.info("%d subjects (%s)%s in %d device group(s) of %d device(s)", len(subjects),
             ", ".join(s.name for s in subjects), padding, layout.groups, layout.per_subject)


def checkpoint_meta(meta: dict, subjects: list[Subject], layout) -> dict:
    """What a checkpoint of several subjects records beside the run's own (a resume with other subjects, or
    another layout of them, is refused): their names, slots and seeds instead of the run's one seed."""
    return {"model": meta["model"], "subjects": [s.name for s in subjects], "subject_slots": layout.slots,
            "seeds": [s.cfg.seed for s in subjects], **{k: meta[k] for k in ("global_batch", "optimizer", "use_ema")}}


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

