"""What the train step eats: each step's batch, laid out for the mesh, from the data, tokens and optional
caches.

`TrainInputs.device_batch(step)` is a pure function of (seed, step): it reads the step's batch plan from
`DreamBoothData`, decodes and crops this process's rows (or picks their cached VAE latents), tokenizes their
prompts with the pipeline's tokenizer(s) (or picks precomputed text embeddings), adds the per-example inputs
the model family builds from each view's geometry (SDXL's size and crop ids) and places the rows on the
devices. The loop calls it from a `Prefetcher`, a thread that keeps the next two steps' batches ready.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

import jax
import numpy as np

from dreambooth_jax import parallel
from dreambooth_jax.training.specs import BatchSpec

log = logging.getLogger("dreambooth_jax.train")


class TrainInputs:
    """Batches of a run as `spec` (a `BatchSpec`) says, from the data and the pipeline's tokenizer(s), text
    encoder(s) and VAE."""

    def __init__(self, spec: BatchSpec, pipe, data, mesh, subject_devices: int | None = None):
        """`subject_devices`: in a run of several subjects, the devices of this subject's group (its batch
        spans them; `host_batch` then lays out all its rows, for `SubjectsInputs` to place)."""
        self.spec, self.pipe, self.data, self.mesh = spec, pipe, data, mesh
        self.subject_devices = subject_devices
        self._token_cache: dict[str, dict[str, np.ndarray]] = {}
        self.context_for = self._precompute_text() if spec.pre_compute_text_embeddings else None
        self.latent_cache = self._precompute_latents() if spec.cache_latents else None

    def tokens_of(self, prompts: list[str]) -> dict[str, np.ndarray]:
        """The family's token arrays of `prompts` ({"input_ids", "attention_mask", ...}: [N, length] int32,
        each tokenizer with its own padding); each distinct prompt tokenized once per run."""
        new = list(dict.fromkeys(p for p in prompts if p not in self._token_cache))
        if new:
            tokens = self.pipe.family.tokenize(self.pipe.tokenizers, new, self.spec.tokenizer_max_length)
            self._token_cache.update({p: {k: v[i] for k, v in tokens.items()} for i, p in enumerate(new)})
        cache = self._token_cache
        return {k: np.stack([cache[p][k] for p in prompts]) for k in cache[prompts[0]]}

    def _precompute_text(self) -> dict[str, dict[str, np.ndarray]]:
        """{prompt: {"context"[, "pooled"]}} of every prompt the data holds."""
        prompts = sorted(self.data.prompts())
        tokens = self.tokens_of(prompts)
        # The encoders whole on every device for this (they may be fsdp-sharded): the output is then
        # replicated, readable on every host.
        family, modules = self.pipe.family, self.pipe.modules
        params = parallel.put_replicated({k: self.pipe.params[k] for k in family.text_encoders}, self.mesh)
        use_mask = self.spec.text_encoder_use_attention_mask

        def encode(params, tokens):
            run = lambda name, *args: modules[name].apply({"params": params[name]}, *args)  # noqa: E731
            return family.encode(run, tokens, use_mask)

        out = jax.jit(encode, out_shardings=parallel.replicated(self.mesh))(params, tokens)
        out = {k: np.asarray(v, np.float32) for k, v in out.items()}
        return {p: {k: v[i] for k, v in out.items()} for i, p in enumerate(prompts)}

    def _precompute_latents(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """(mean, logvar) [N, 2 (flip), h, w, c] of every image's center crop, unflipped and flipped."""
        vae, params = self.pipe.vae, parallel.put_replicated(self.pipe.params["vae"], self.mesh)  # as above
        encode = jax.jit(lambda p, x: vae.apply({"params": p}, x, method=vae.encode),
                         out_shardings=parallel.replicated(self.mesh))
        cache = {}
        kinds = {"instance": self.data.num_instance_images}
        if self.spec.with_prior_preservation:
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
        spec = self.spec
        return layout_batch(self.data, step, per_device=spec.train_batch_size,
                            accum=spec.gradient_accumulation_steps, with_prior=spec.with_prior_preservation,
                            tokens_of=self.tokens_of, context_for=self.context_for,
                            latent_cache=self.latent_cache, use_mask=spec.text_encoder_use_attention_mask,
                            view_inputs=self.pipe.family.view_inputs, devices=self.subject_devices)

    def device_batch(self, step: int):
        """Step `step`'s batch on the mesh: [A, B, ...] arrays, the examples (axis 1) split over `data`."""
        return parallel.put_batch(self.host_batch(step), self.mesh, batch_axis=1, process_local=True)


def layout_batch(data, step: int, *, per_device: int, accum: int, with_prior: bool, tokens_of,
                 context_for=None, latent_cache=None, use_mask: bool = False, view_inputs=None,
                 devices: int | None = None) -> dict:
    """This process's rows of step `step`'s global batch, as [A, rows, ...] arrays; or with `devices` (a
    subject of a run of several: the devices of its group) all the rows of a batch spread over that many
    devices.

    Micro-batch a of the global batch is [its D*per_device instance rows; as many class rows] whatever the
    number of devices, and `example_id` numbers every example of the step (instances first, then classes),
    so the noise each example gets, and hence the step's result, is the same for any device count and any
    split into accumulated micro-batches. Each process decodes only the rows its own devices hold.
    `view_inputs` (the model family's) makes per-row inputs from the geometry of the view each row holds
    (`DreamBoothData.geometry`; the centre crop where latents are cached), e.g. SDXL's size and crop ids.
    """
    n_inst = (devices or jax.device_count()) * per_device  # instance rows per micro-batch
    kinds = ("instance", "class") if with_prior else ("instance",)
    local = n_inst * len(kinds) if devices else jax.local_device_count() * per_device * len(kinds)
    lo = 0 if devices else jax.process_index() * local
    plan = data.batch_plan(step, accum * n_inst)
    rows = []  # (kind, index into the step's plan, example id) of this process's rows
    for a in range(accum):
        for r in range(lo, lo + local):
            kind = kinds[r // n_inst]
            k = a * n_inst + r % n_inst
            rows.append((kind, k, k + (accum * n_inst if kind == "class" else 0)))
    # (kind, image index, crop, flip) of each row's view
    views = [(kind, int(plan[f"{kind}_indices"][k]), tuple(int(x) for x in plan[f"{kind}_crops"][k]),
              bool(plan[f"{kind}_flips"][k])) for kind, k, _ in rows]
    if latent_cache is not None:  # the cache holds centre crops
        views = [(kind, i, data.centered_crop(kind, i), flip) for kind, i, _, flip in views]
    out: dict[str, np.ndarray] = {}
    prompts = [plan[f"{kind}_prompts"][k] for kind, k, _ in rows]
    if latent_cache is not None:
        out["latent_mean"] = np.stack([latent_cache[kind][0][i, int(flip)] for kind, i, _, flip in views])
        out["latent_logvar"] = np.stack([latent_cache[kind][1][i, int(flip)] for kind, i, _, flip in views])
    else:
        out["images"] = np.stack([data.view(*view) for view in views])
    if context_for is not None:
        out.update({key: np.stack([context_for[p][key] for p in prompts]) for key in context_for[prompts[0]]})
    else:
        tokens = tokens_of(prompts)
        out.update({k: v for k, v in tokens.items() if k != "attention_mask" or use_mask})
    if view_inputs is not None:
        out.update(view_inputs(np.stack([data.geometry(*view) for view in views])))
    out["is_prior"] = np.array([kind == "class" for kind, _, _ in rows])
    out["example_id"] = np.array([e for _, _, e in rows], np.int32)
    return {k: v.reshape(accum, -1, *v.shape[1:]) for k, v in out.items()}


class SubjectsInputs:
    """The batches of a run of several subjects: each subject's `TrainInputs` (its own data, prompts, caches)
    lays out its rows; `device_batch(step)` stacks them [K, A, B, ...] and places them, the subjects split
    over the mesh's `subject` axis and each one's examples over its group's devices. A process builds the rows
    of the subjects its devices train (the others' entries, never read, are zeros). `subjects` may name one
    object twice (padding slots): its rows are built once."""

    def __init__(self, subjects: list[TrainInputs], mesh):
        self.subjects, self.mesh = subjects, mesh
        per_group = len(subjects) // mesh.shape[parallel.SUBJECT_AXIS]
        me = jax.process_index()
        self.mine = [k for k in range(len(subjects))
                     if any(d.process_index == me for d in mesh.devices[k // per_group].flat)]

    def device_batch(self, step: int):
        built: dict[int, dict] = {}
        for k in self.mine:
            if id(self.subjects[k]) not in built:
                built[id(self.subjects[k])] = self.subjects[k].host_batch(step)
        first = next(iter(built.values()))
        rows = [built.get(id(s)) for s in self.subjects]
        batch = {key: np.stack([np.zeros_like(first[key]) if r is None else r[key] for r in rows])
                 for key in first}
        return parallel.put_batch(batch, self.mesh, batch_axis=2)


class Prefetcher:
    """The batches of steps [start, stop), made by `make(step)` in a background thread that stays `depth`
    steps ahead, so decoding, augmentation and the transfer overlap the device's work. `next()` returns
    (batch, seconds waited for it); an error raised while making a batch is raised there, for that step."""

    def __init__(self, make, start: int, stop: int, depth: int = 2):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._work, args=(make, start, stop), name="train-inputs",
                                        daemon=True)
        self._thread.start()

    def _work(self, make, start: int, stop: int) -> None:
        for step in range(start, stop):
            try:
                item = (make(step), None)
            except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
                item = (None, e)
            while not self._closed.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item[1] is not None or self._closed.is_set():
                return

    def next(self):
        t0 = time.perf_counter()
        batch, error = self._queue.get()
        if error is not None:
            raise error
        return batch, time.perf_counter() - t0

    def close(self) -> None:
        self._closed.set()
        self._thread.join()
