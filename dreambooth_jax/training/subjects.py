"""Many subjects in one run: K independent DreamBooth models trained by one compiled program.

`python -m dreambooth_jax.train --subjects subjects.json` (or `--dataset dreambooth:dog6,cat,can`): each
subject keeps its own data, class images (a folder shared when subjects name the same one), prompts, seed
stream and loss log, and is exported to `output_dir/<name>/` exactly as a run of it alone would be. The
trained state (params, optimizer state, EMA) of the K subjects is stacked along a leading subject axis, split
over the mesh's `subject` axis (device groups; data and fsdp inside each); the frozen networks (VAE, frozen
text encoders, the LoRA base) are shared. `step.subjects_train_step` is the ordinary step, vmapped over the
subjects.

Subject k's batch spans the devices of its group (`parallel.subject_groups`: one group per subject where there
are enough devices): its global batch is --train_batch_size x those devices x --gradient_accumulation_steps,
and with the same global batch and seed its result is that of a run of it alone (up to the order of
floating-point sums). Where the subjects do not fill the groups evenly, padding slots repeat the last subject
(`parallel.subject_slots`); their results are dropped.
"""

from __future__ import annotations

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
from dreambooth_jax.training.concepts import SubjectRun
from dreambooth_jax.training.loop import TrainLoop
from dreambooth_jax.training.specs import LoopSpec

log = logging.getLogger("dreambooth_jax.train")


def log_layout(subjects: list[SubjectRun], layout) -> None:
    padding = f" and {layout.slots - len(subjects)} padding slot(s)" if layout.slots > len(subjects) else ""
    log.info("%d subjects (%s)%s in %d device group(s) of %d device(s)", len(subjects),
             ", ".join(s.name for s in subjects), padding, layout.groups, layout.per_subject)


def checkpoint_meta(meta: dict, subjects: dict[str, LoopSpec], layout) -> dict:
    """What a checkpoint of several subjects records beside the run's own (a resume with other subjects, or
    another layout of them, is refused): their names, slots and seeds instead of the run's one seed."""
    return {"model": meta["model"], "subjects": list(subjects), "subject_slots": layout.slots,
            "seeds": [s.seed for s in subjects.values()],
            **{k: meta[k] for k in ("global_batch", "optimizer", "use_ema")}}


class SubjectsLoop(TrainLoop):
    """`TrainLoop` for several subjects: the vmapped step, each subject's seed stream, loss log
    (`<name>/logs/metrics.jsonl`; the run's own log holds the means over the subjects), validation images
    and export."""

    def __init__(self, spec: LoopSpec, subjects: dict[str, LoopSpec], seeds, pipe, mesh, step_spec, schedules,
                 inputs, max_steps, global_batch, output):
        """`spec`: the run's; `subjects`: {name: its own spec} of the run's subjects; `seeds`: those of every
        slot of the state and batches (the subjects', then the padding slots', which repeat the last
        subject)."""
        super().__init__(spec, pipe, mesh, step_spec, schedules, inputs, max_steps,
                         global_batch * len(subjects), output)
        self.subjects = subjects
        self.rng = parallel.put_replicated(np.stack([np.asarray(jax.random.PRNGKey(seed)) for seed in seeds]),
                                           mesh)
        self.batch_sharding = parallel.batch_sharding(mesh, batch_axis=2)
        self.step = functools.partial(train_step.subjects_train_step, spec=step_spec, schedules=schedules)
        self.validating = any(s.validation_prompt for s in subjects.values())
        self.logs = {}
        if self.is_main:
            output.pull(tuple(f"{name}/logs/*" for name in subjects), required=False)  # a resumed run appends
            for name, s in subjects.items():
                os.makedirs(os.path.join(s.output_dir, "logs"), exist_ok=True)
                self.logs[name] = open(os.path.join(s.output_dir, "logs", "metrics.jsonl"), "a",
                                       encoding="utf-8")

    def _log(self, pending) -> list[dict]:
        """Each subject's rows to its own log; the run's rows (returned, and in the run's log) hold the means
        over the subjects."""
        fetched = [(step, {k: np.asarray(v, np.float64) for k, v in jax.device_get(m).items()}, waited)
                   for step, m, waited in pending]
        for step, metrics, _ in fetched:
            bad = [name for k, name in enumerate(self.subjects) if not np.isfinite(metrics["loss"][k])]
            if bad:  # one program trains them all: the run stops (its last checkpoint holds every subject)
                raise DivergedError(f"loss is not finite at step {step} for subject(s) {', '.join(bad)}; "
                                    "stopping the run of every subject (lower the learning rate, or check "
                                    "their data; or train the others without them)")
            if self.is_main:
                for k, name in enumerate(self.subjects):
                    row = {"step": step, **{key: float(v[k]) for key, v in metrics.items()}}
                    self.logs[name].write(json.dumps(row) + "\n")
        if self.is_main:
            for f in self.logs.values():
                f.flush()
            self.output.push(*[f"{name}/logs" for name in self.subjects])
        k = len(self.subjects)  # (not the padding slots)
        return super()._log([(step, {key: v[:k].mean() for key, v in m.items()}, waited)
                             for step, m, waited in fetched])

    def export(self, state) -> None:
        """Each subject's result in `output_dir/<name>/`, as a run of it alone writes it."""
        run = self.spec.export
        base = export_lib.merge_base(run) if run.use_lora and run.merge_lora else None  # once
        for k, (name, s) in enumerate(self.subjects.items()):
            written = export_lib.export(s.export, self.pipe, state.subject(k), self.step_spec.lora,
                                        step=self.step_count, write=self.is_main, base=base)
            if self.is_main:
                last = "model_index.json" if "model_index.json" in written else None
                self.output.push(*[f"{name}/{w}" for w in written], last=last and f"{name}/{last}")

    def validate(self, state, step: int, spec: LoopSpec | None = None) -> None:
        """Each subject's validation images (those with a validation prompt), into `<name>/validation/`."""
        for k, s in enumerate(self.subjects.values()):
            if s.validation_prompt:
                super().validate(state.subject(k), step, s)

    def finish(self) -> None:
        super().finish()
        for f in self.logs.values():
            f.close()

