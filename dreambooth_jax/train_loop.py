"""The training loop around the compiled step: host batches, checkpoints, validation, logs, preemption."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import time

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from dreambooth_jax import images as image_io
from dreambooth_jax import parallel, train_step
from dreambooth_jax.sampling import generate, tokenize

log = logging.getLogger("dreambooth_jax.train")


def _peak_memory() -> str:
    stats = jax.local_devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    if peak is None:
        import resource

        return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB host RSS"
    return f"{peak / 2**30:.2f} GiB per device"


class TrainLoop:
    """Owns the compiled step and everything the loop writes (process 0 only)."""

    def __init__(self, cfg, pipe, mesh, spec, schedules: dict, data, max_steps: int, global_batch: int):
        self.cfg, self.pipe, self.mesh, self.data, self.spec = cfg, pipe, mesh, data, spec
        self.max_steps, self.global_batch = max_steps, global_batch
        self.is_main = jax.process_index() == 0
        self.max_length = cfg.tokenizer_max_length or pipe.tokenizer.model_max_length
        self._token_cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.context_for = self._precompute_text() if cfg.pre_compute_text_embeddings else None
        self.latent_cache = self._precompute_latents() if cfg.cache_latents else None
        self.rng = parallel.put_replicated(jax.random.PRNGKey(cfg.seed), mesh)
        self.batch_sharding = NamedSharding(mesh, PartitionSpec(None, parallel.DATA_AXIS))
        self.step = functools.partial(train_step.train_step, spec=spec, schedules=schedules)
        self.compiled = None
        self._last_log = time.perf_counter()
        self.summary: dict = {}
        self.writer = None
        if self.is_main:
            os.makedirs(os.path.join(cfg.output_dir, "logs"), exist_ok=True)
            self.jsonl = open(os.path.join(cfg.output_dir, "logs", "metrics.jsonl"), "a", encoding="utf-8")
            if cfg.report_to == "tensorboard":
                from tensorboardX import SummaryWriter

                self.writer = SummaryWriter(os.path.join(cfg.output_dir, "logs"))

    # --- inputs ---------------------------------------------------------------------------------------
    def tokenize(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        for p in set(prompts) - set(self._token_cache):
            tok = self.pipe.tokenizer
            ids = tokenize(tok, [p]) if self.max_length == tok.model_max_length else tok(
                [p], padding="max_length", max_length=self.max_length, truncation=True,
                return_tensors="np").input_ids.astype(np.int32)
            pad = tok.pad_token_id
            # The padding mask keeps the first end-of-text token (CLIP pads with it).
            mask = np.ones_like(ids) if pad is None else (np.cumsum(ids == pad, axis=-1) <= 1).astype(np.int32)
            self._token_cache[p] = (ids[0], mask[0])
        return (np.stack([self._token_cache[p][0] for p in prompts]),
                np.stack([self._token_cache[p][1] for p in prompts]))

    def _precompute_text(self) -> dict[str, np.ndarray]:
        prompts = sorted(self.data.prompts())
        ids, mask = self.tokenize(prompts)
        mask = mask if self.cfg.text_encoder_use_attention_mask else None
        te, params = self.pipe.text_encoder, self.pipe.params["text_encoder"]
        out = jax.jit(lambda p, i, m: te.apply({"params": p}, i, m).last_hidden_state)(params, ids, mask)
        return dict(zip(prompts, np.asarray(out, np.float32)))

    def _precompute_latents(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """(mean, logvar) [N, 2 (flip), h, w, c] of every image's center crop, unflipped and flipped."""
        vae, params = self.pipe.vae, self.pipe.params["vae"]
        encode = jax.jit(lambda p, x: vae.apply({"params": p}, x, method=vae.encode))
        cache = {}
        kinds = {"instance": self.data.num_instance_images}
        if self.cfg.with_prior_preservation:
            kinds["class"] = self.data.num_class_images
        for kind, n in kinds.items():
            means, logvars = [], []
            for i in range(n):
                views = np.stack([self.data.fixed_view(kind, i, flip=f) for f in (False, True)])
                m, lv = encode(params, views)
                means.append(np.asarray(m))
                logvars.append(np.asarray(lv))
            cache[kind] = (np.stack(means), np.stack(logvars))
        log.info("cached VAE latents of %s", ", ".join(f"{n} {k} images" for k, n in kinds.items()))
        return cache

    def host_batch(self, step: int) -> dict:
        """This process's rows of step `step`, laid out [A, rows, ...]; see `layout_batch`."""
        return layout_batch(self.data, step, per_device=self.cfg.train_batch_size,
                            accum=self.cfg.gradient_accumulation_steps,
                            with_prior=self.cfg.with_prior_preservation, tokenize=self.tokenize,
                            context_for=self.context_for, latent_cache=self.latent_cache,
                            use_mask=self.cfg.text_encoder_use_attention_mask)

    def device_batch(self, step: int):
        host = self.host_batch(step)
        if jax.process_count() == 1:
            return jax.device_put(host, self.batch_sharding)
        return jax.tree.map(lambda x: jax.make_array_from_process_local_data(self.batch_sharding, x), host)

    # --- the loop -------------------------------------------------------------------------------------
    def compile(self, state, batch):
        """The step, compiled ahead of time with explicit shardings: state and rng replicated (donated
        state), batch split over `data` along its example axis, metrics replicated."""
        repl = parallel.replicated(self.mesh)
        state_sharding = jax.tree.map(lambda _: repl, state)
        jitted = jax.jit(self.step, in_shardings=(state_sharding, self.batch_sharding, repl),
                         out_shardings=(state_sharding, repl), donate_argnums=(0,))
        return jitted.lower(state, batch, self.rng).compile()

    def train(self, state, ckpt, meta: dict):
        from tqdm.auto import tqdm

        from dreambooth_jax.checkpointing import PreemptionWatch

        start = int(state.step)
        watch = PreemptionWatch()
        history, pending = [], []
        bar = tqdm(total=self.max_steps, initial=start, desc="training", unit="step", disable=not self.is_main)
        t_loop = None
        try:
            for step in range(start, self.max_steps):
                if step == self.cfg.stop_text_encoder_training and self.cfg.text_encoder_part in state.params:
                    state, self.compiled = state.freeze(self.cfg.text_encoder_part), None  # a step without it
                    log.info("text encoder frozen from step %d on", step)
                batch = self.device_batch(step)
                if self.compiled is None:
                    t0 = time.perf_counter()
                    self.compiled = self.compile(state, batch)
                    self.summary["compile_s"] = self.summary.get("compile_s", 0.0) + time.perf_counter() - t0
                    log.info("compiled the train step in %.1fs", self.summary["compile_s"])
                state, metrics = self.compiled(state, batch, self.rng)
                pending.append((step + 1, metrics))
                if step == start:
                    jax.block_until_ready(state)
                    t_loop = self._last_log = time.perf_counter()  # throughput: steps after the first
                done = step + 1
                if len(pending) >= 10 or done == self.max_steps or done % self.cfg.checkpointing_steps == 0:
                    history += self._log(pending)
                    pending = []
                    bar.set_postfix(loss=f"{history[-1]['loss']:.4f}", refresh=False)
                bar.update(1)
                if ckpt.save(state, meta) and self.cfg.export_at_checkpoints:
                    self.export(state)
                if self.cfg.validation_prompt and done % self.cfg.validation_steps == 0:
                    self.validate(state, done)
                if watch.should_stop(ckpt.manager, done) and done < self.max_steps:
                    history += self._log(pending)
                    pending = []
                    ckpt.save(state, meta, force=True)
                    ckpt.wait()
                    log.warning("stopped at step %d on SIGTERM; checkpoint saved. Resume with "
                                "--resume_from_checkpoint latest", done)
                    break
            else:
                if self.cfg.validation_prompt and self.max_steps % self.cfg.validation_steps and start < self.max_steps:
                    self.validate(state, self.max_steps)
        finally:
            watch.restore()
            bar.close()
        history += self._log(pending)
        steps_timed = int(state.step) - start - 1
        if t_loop is not None and steps_timed > 0:
            elapsed = time.perf_counter() - t_loop
            per_step = self.global_batch * (2 if self.cfg.with_prior_preservation else 1)
            self.summary.update(steps_per_s=steps_timed / elapsed, samples_per_s=steps_timed * per_step / elapsed)
        self.summary["peak_memory"] = _peak_memory()
        if int(state.step) > start:
            ckpt.save(state, meta, force=True)  # the final (or last reached) step is always kept
        return state, history

    def pipeline_params(self, state) -> dict:
        """Every network's weights as the pipeline needs them: EMA where kept, LoRA factors merged in."""
        from dreambooth_jax import lora

        params = dict(state.export_params())
        for net in ("unet", "text_encoder"):
            factors = params.pop(f"{net}_lora", None)
            if factors is not None:
                params[net] = lora.merge(params[net], factors, self.spec.lora)
        return params

    def export(self, state) -> None:
        """Process 0 writes the result to --output_dir: the diffusers pipeline, or with LoRA the adapter files
        (diffusers/PEFT and kohya formats) and, with --merge_lora, the pipeline with them merged in."""
        if not self.is_main:
            return
        from dreambooth_jax import lora
        from dreambooth_jax.pipeline import export_pipeline, load_pipeline

        out, step = self.cfg.output_dir, int(state.step)
        if not self.cfg.use_lora:
            export_pipeline(self.pipe, out, params=jax.device_get(self.pipeline_params(state)))
            log.info("exported the pipeline of step %d to %s", step, out)
            return
        exported = state.export_params()
        loras = {k.removesuffix("_lora"): jax.device_get(v) for k, v in exported.items() if k.endswith("_lora")}
        lora.save_diffusers(out, loras, self.spec.lora)
        lora.save_kohya(os.path.join(out, lora.KOHYA_WEIGHT_NAME), loras, self.spec.lora)
        log.info("exported the LoRA of step %d to %s (diffusers and kohya formats)", step, out)
        if self.cfg.merge_lora:  # merged into the fp32 base weights, not the compute-dtype copy trained against
            base = load_pipeline(self.cfg.pretrained_model_name_or_path, revision=self.cfg.revision,
                                 variant=self.cfg.variant).params
            merged = {**base, **{net: lora.merge(base[net], f, self.spec.lora) for net, f in loras.items()}}
            export_pipeline(self.pipe, out, params=jax.device_get(merged))
            log.info("exported the pipeline with the LoRA merged in to %s", out)

    def _log(self, pending) -> list[dict]:
        rows = []
        now = time.perf_counter()
        interval = now - self._last_log
        self._last_log = now
        per_step = self.global_batch * (2 if self.cfg.with_prior_preservation else 1)
        rate = per_step * len(pending) / interval if interval > 0 else float("nan")
        for step, metrics in pending:
            row = {"step": step, **{k: float(v) for k, v in jax.device_get(metrics).items()},
                   "samples_per_s": rate}
            if not np.isfinite(row["loss"]):
                raise FloatingPointError(f"loss is {row['loss']} at step {step}; stopping (lower the learning "
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
        return rows

    def validate(self, state, step: int) -> str | None:
        """Validation images of the current weights: a PNG grid (and TensorBoard image)."""
        # The state's own arrays (the pipeline's were donated with the first state); EMA ones where kept.
        pipe = dataclasses.replace(self.pipe, params=self.pipeline_params(state))
        images = generate(pipe, [self.cfg.validation_prompt] * self.cfg.num_validation_images,
                          num_inference_steps=self.cfg.validation_inference_steps, seed=self.cfg.seed)
        if not self.is_main:
            return None
        folder = os.path.join(self.cfg.output_dir, "validation")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"step-{step:06d}.png")
        sheet = image_io.contact_sheet(images)
        image_io.save_png(sheet, path, {"prompt": self.cfg.validation_prompt, "step": step, "seed": self.cfg.seed})
        if self.writer is not None:
            self.writer.add_image("validation", sheet, step, dataformats="HWC")
        log.info("validation images at step %d: %s", step, path)
        return path

    def finish(self) -> None:
        if self.is_main:
            self.jsonl.close()
            if self.writer is not None:
                self.writer.close()


def layout_batch(data, step: int, *, per_device: int, accum: int, with_prior: bool, tokenize, context_for=None,
                 latent_cache=None, use_mask: bool = False) -> dict:
    """This process's rows of step `step`'s global batch, as [A, rows, ...] arrays.

    Micro-batch a of the global batch is [its D*per_device instance rows; as many class rows] whatever the
    number of devices, and `example_id` numbers every example of the step (instances first, then classes),
    so the noise each example gets, and hence the step's result, is the same for any device count and any
    split into accumulated micro-batches. Each process decodes only the rows its own devices hold.
    """
    n_inst = jax.device_count() * per_device  # instance rows per micro-batch
    kinds = ("instance", "class") if with_prior else ("instance",)
    local = jax.local_device_count() * per_device * len(kinds)
    lo = jax.process_index() * local
    plan = data.batch_plan(step, accum * n_inst)
    rows = []  # (kind, index into the step's plan, example id) of this process's rows
    for a in range(accum):
        for r in range(lo, lo + local):
            kind = kinds[r // n_inst]
            k = a * n_inst + r % n_inst
            rows.append((kind, k, k + (accum * n_inst if kind == "class" else 0)))
    out: dict[str, np.ndarray] = {}
    prompts = [plan[f"{kind}_prompts"][k] for kind, k, _ in rows]
    if latent_cache is not None:
        pick = [(latent_cache[kind], plan[f"{kind}_indices"][k], int(plan[f"{kind}_flips"][k])) for kind, k, _ in rows]
        out["latent_mean"] = np.stack([c[0][i, f] for c, i, f in pick])
        out["latent_logvar"] = np.stack([c[1][i, f] for c, i, f in pick])
    else:
        out["images"] = np.stack([
            data.view(kind, int(plan[f"{kind}_indices"][k]), tuple(int(x) for x in plan[f"{kind}_crops"][k]),
                      bool(plan[f"{kind}_flips"][k]))
            for kind, k, _ in rows])
    if context_for is not None:
        out["context"] = np.stack([context_for[p] for p in prompts])
    else:
        ids, mask = tokenize(prompts)
        out["input_ids"] = ids
        if use_mask:
            out["attention_mask"] = mask
    out["is_prior"] = np.array([kind == "class" for kind, _, _ in rows])
    out["example_id"] = np.array([e for _, _, e in rows], np.int32)
    return {k: v.reshape(accum, -1, *v.shape[1:]) for k, v in out.items()}
