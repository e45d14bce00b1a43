"""The training loop around the compiled step: host batches, checkpoints, validation, logs, preemption."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import resource
import time

import jax
import numpy as np
from tqdm.auto import tqdm

from dreambooth_jax import images as image_io
from dreambooth_jax import parallel
from dreambooth_jax.diffusion.generation import generate
from dreambooth_jax.errors import DivergedError
from dreambooth_jax.training import export as export_lib
from dreambooth_jax.training import state as state_lib
from dreambooth_jax.training import step as train_step
from dreambooth_jax.training.checkpoints import PreemptionWatch
from dreambooth_jax.training.inputs import Prefetcher
from dreambooth_jax.training.specs import LoopSpec

log = logging.getLogger("dreambooth_jax.train")


def _peak_memory() -> str:
    stats = jax.local_devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    if peak is None:
        return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB host RSS"
    return f"{peak / 2**30:.2f} GiB per device"


class TrainLoop:
    """Owns the compiled step and everything the loop writes (process 0 only)."""

    def __init__(self, spec: LoopSpec, pipe, mesh, step_spec, schedules: dict, inputs, max_steps: int,
                 global_batch: int, output):
        """`step_spec`: the step's `StepSpec`; `output`: the `storage.Folder` of --output_dir
        (`spec.output_dir` is its local twin); what the loop writes there is pushed to it."""
        self.spec, self.pipe, self.mesh, self.inputs, self.step_spec = spec, pipe, mesh, inputs, step_spec
        self.output = output
        self.max_steps, self.global_batch = max_steps, global_batch
        self.rows_per_step = global_batch * (2 if spec.with_prior_preservation else 1)
        self.is_main = parallel.is_main_process()
        self.rng = parallel.put_replicated(jax.random.PRNGKey(spec.seed), mesh)
        self.batch_sharding = parallel.batch_sharding(mesh, batch_axis=1)
        self.step = functools.partial(train_step.train_step, spec=step_spec, schedules=schedules)
        self.compiled = None
        self.validating = bool(spec.validation_prompt)
        self.step_count = 0
        self._last_log = time.perf_counter()
        self.summary: dict = {}
        self.writer = None
        if self.is_main:
            output.pull(("logs/*",), required=False)  # a resumed run appends to the logs so far
            os.makedirs(os.path.join(spec.output_dir, "logs"), exist_ok=True)
            self.jsonl = open(os.path.join(spec.output_dir, "logs", "metrics.jsonl"), "a", encoding="utf-8")
            if spec.report_to == "tensorboard":
                from tensorboardX import SummaryWriter  # optional: only --report_to tensorboard needs it

                self.writer = SummaryWriter(os.path.join(spec.output_dir, "logs"))

    # --- the loop -------------------------------------------------------------------------------------
    def compile(self, state, batch):
        """The step, compiled ahead of time with explicit shardings: the state by the fsdp rule (donated), the
        batch split over the mesh along its example axis, rng and metrics replicated. (The first program comes
        from the preflight; this one serves a changed state, e.g. after the text encoder stops training.)"""
        repl = parallel.replicated(self.mesh)
        state_sharding = state_lib.shardings(state, self.mesh)
        jitted = jax.jit(self.step, in_shardings=(state_sharding, self.batch_sharding, repl),
                         out_shardings=(state_sharding, repl), donate_argnums=(0,))
        with parallel.traced_on(self.mesh):
            return jitted.lower(state, batch, self.rng).compile()

    def train(self, state, ckpt, meta: dict):
        # The step counter lives on the host from here on: reading `state.step` would wait for the device.
        start = self.step_count = int(state.step)
        watch = PreemptionWatch()
        history, pending = [], []
        bar = tqdm(total=self.max_steps, initial=start, desc="training", unit="step",
                   disable=not self.is_main)
        batches = Prefetcher(self.inputs.device_batch, start, self.max_steps)
        t_loop = None
        try:
            for step in range(start, self.max_steps):
                parts = state_lib.text_encoder_parts(state.params, self.pipe.family)
                if step == self.spec.stop_text_encoder_training and parts:
                    state, self.compiled = state.freeze(*parts), None  # a step without them
                    log.info("text encoder%s frozen from step %d on", "s" if len(parts) > 1 else "", step)
                batch, waited = batches.next()
                if self.compiled is None:
                    t0 = time.perf_counter()
                    self.compiled = self.compile(state, batch)
                    self.summary["compile_s"] = self.summary.get("compile_s", 0.0) + time.perf_counter() - t0
                    log.info("compiled the train step in %.1fs", self.summary["compile_s"])
                state, metrics = self.compiled(state, batch, self.rng)
                self.step_count = done = step + 1
                pending.append((done, metrics, waited))
                if step == start:
                    jax.block_until_ready(state)
                    t_loop = self._last_log = time.perf_counter()  # throughput: steps after the first
                if len(pending) >= 10 or done == self.max_steps or done % self.spec.checkpointing_steps == 0:
                    history += self._log(pending)
                    pending = []
                    bar.set_postfix(loss=f"{history[-1]['loss']:.4f}", refresh=False)
                bar.update(1)
                if ckpt.save(state, meta, step=done) and self.spec.export_at_checkpoints:
                    self.export(state)
                if self.validating and done % self.spec.validation_steps == 0:
                    self.validate(state, done)
                if watch.should_stop(ckpt.manager, done) and done < self.max_steps:
                    history += self._log(pending)
                    pending = []
                    ckpt.save(state, meta, step=done, force=True)
                    ckpt.wait()
                    log.warning("stopped at step %d on SIGTERM; checkpoint saved. Resume with "
                                "--resume_from_checkpoint latest", done)
                    break
            else:
                if self.validating and self.max_steps % self.spec.validation_steps and start < self.max_steps:
                    self.validate(state, self.max_steps)
        finally:
            batches.close()
            watch.restore()
            bar.close()
        history += self._log(pending)
        steps_timed = self.step_count - start - 1
        if t_loop is not None and steps_timed > 0:
            elapsed = time.perf_counter() - t_loop
            self.summary.update(steps_per_s=steps_timed / elapsed,
                                samples_per_s=steps_timed * self.rows_per_step / elapsed)
        if history:
            self.summary["input_wait_s"] = sum(row["input_wait_s"] for row in history)
        self.summary["peak_memory"] = _peak_memory()
        if self.step_count > start:
            # the final (or last reached) step is kept
            ckpt.save(state, meta, step=self.step_count, force=True)
        return state, history

    def export(self, state) -> None:
        """The result of `state` in --output_dir (see `export.export`): every process gathers, process 0
        writes."""
        written = export_lib.export(self.spec.export, self.pipe, state, self.step_spec.lora,
                                    step=self.step_count, write=self.is_main)
        if self.is_main:
            self.output.push(*written, last="model_index.json" if "model_index.json" in written else None)

    def _log(self, pending) -> list[dict]:
        rows = []
        now = time.perf_counter()
        interval = now - self._last_log
        self._last_log = now
        rate = self.rows_per_step * len(pending) / interval if interval > 0 else float("nan")
        for step, metrics, waited in pending:
            row = {"step": step, **{k: float(v) for k, v in jax.device_get(metrics).items()},
                   "samples_per_s": rate, "input_wait_s": waited}
            if not np.isfinite(row["loss"]):
                raise DivergedError(f"loss is {row['loss']} at step {step}; stopping (lower the learning "
                                         "rate, or check the data)")
            rows.append(row)
            if self.is_main:
                self.jsonl.write(json.dumps(row) + "\n")
                if self.writer is not None:
                    for k, v in row.items():
                        if k != "step":
                            self.writer.add_scalar(f"train/{k}", v, step)
        if self.is_main:
            self.jsonl.flush()
            self.output.push("logs")
        return rows

    def validate(self, state, step: int, spec: LoopSpec | None = None) -> str | None:
        """Validation images of the current weights: a PNG grid (and TensorBoard image) in `spec.output_dir`
        (`spec`: the run's, or in a run of several subjects one subject's, with `state` its own)."""
        spec = spec or self.spec
        # The state's own arrays (the pipeline's were donated with the first state); EMA ones where kept.
        pipe = dataclasses.replace(self.pipe, params=export_lib.pipeline_params(state, self.step_spec.lora))
        images = generate(pipe, [spec.validation_prompt] * spec.num_validation_images,
                          num_inference_steps=spec.validation_inference_steps, seed=spec.seed)
        if not self.is_main:
            return None
        folder = os.path.join(spec.output_dir, "validation")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"step-{step:06d}.png")
        sheet = image_io.contact_sheet(images)
        image_io.save_png(sheet, path, {"prompt": spec.validation_prompt, "step": step, "seed": spec.seed})
        where = os.path.relpath(path, self.spec.output_dir)
        self.output.push(where)
        if self.writer is not None:
            self.writer.add_image(os.path.dirname(where).replace(os.sep, "/"), sheet, step, dataformats="HWC")
        log.info("validation images at step %d: %s", step, path)
        return path

    def finish(self) -> None:
        if self.is_main:
            self.jsonl.close()
            if self.writer is not None:
                self.writer.close()
            self.output.push("logs")
