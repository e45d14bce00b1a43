"""The memory preflight: the train step compiled ahead of time from shapes alone, and what each device will
hold.

Nothing is allocated here: the state is traced with `jax.eval_shape` from the pipeline's parameter shapes
(read from its configs), sharded by the fsdp rule (`parallel.state_shardings`), and the step is lowered and
compiled with explicit shardings. XLA's `memory_analysis()` of that executable gives the per-device
temporaries; the persistent state's per-device bytes follow from the shardings. The executable is the one the
run then uses.

    plan = preflight.plan(shapes, step_spec, StateSpec.of(cfg), BatchSpec.of(cfg), max_steps=1000,
                          global_batch=8)
    plan.report  # {"devices": 8, "mesh": {"data": 1, "fsdp": 8}, "per_device_bytes": {...}, "fits": ...}
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dreambooth_jax import parallel
from dreambooth_jax.errors import UsageError
from dreambooth_jax.kernels import choose
from dreambooth_jax.training import state as state_lib
from dreambooth_jax.training import step as train_step
from dreambooth_jax.training.specs import BatchSpec, StateSpec

log = logging.getLogger("dreambooth_jax.train")

# A run "fits" when XLA's total is within this share of the device's memory (the rest: the runtime, allocator
# fragmentation, the input batches in flight); --fsdp auto keeps replication only below the lower share.
FITS = 0.95
FITS_COMFORTABLY = 0.85


class OutOfMemoryError(UsageError, MemoryError):
    """The run would not fit in device memory (known before anything is allocated)."""


def shape_structs(params) -> Any:
    """`jax.ShapeDtypeStruct`s of a param tree (arrays or structs)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), params)


def batch_shapes(spec: BatchSpec, pipe, num_devices: int) -> dict:
    """The global batch of one step as `jax.ShapeDtypeStruct`s [A, rows, ...], exactly as
    `inputs.layout_batch` builds it (a test holds the two together). What the family adds (its token arrays,
    its text conditioning, its per-view inputs) is traced from the family's own functions on one example."""
    accum = spec.gradient_accumulation_steps
    rows = num_devices * spec.train_batch_size * spec.rows_per_example
    family = pipe.family

    def batched(tree) -> dict:
        return {k: jax.ShapeDtypeStruct((accum, rows, *np.shape(v)[1:]), v.dtype) for k, v in tree.items()}

    out = {}
    if spec.cache_latents:
        f = pipe.vae_scale_factor
        latent = (1, spec.resolution // f, spec.resolution // f, pipe.vae.config.latent_channels)
        out.update(batched({"latent_mean": jax.ShapeDtypeStruct(latent, jnp.float32),
                            "latent_logvar": jax.ShapeDtypeStruct(latent, jnp.float32)}))
    else:
        image = jax.ShapeDtypeStruct((1, spec.resolution, spec.resolution, 3), jnp.float32)
        out.update(batched({"images": image}))
    tokens = family.tokenize(pipe.tokenizers, [""], spec.tokenizer_max_length)
    if spec.pre_compute_text_embeddings:
        def encode(params, tokens):
            run = lambda name, *args: pipe.modules[name].apply({"params": params[name]}, *args)  # noqa: E731
            return family.encode(run, tokens, spec.text_encoder_use_attention_mask)

        text = {k: pipe.params[k] for k in family.text_encoders}
        cond = jax.eval_shape(encode, text, tokens)  # the cache holds float32 copies
        out.update(batched({k: jax.ShapeDtypeStruct(v.shape, jnp.float32) for k, v in cond.items()}))
    else:
        out.update(batched({k: v for k, v in tokens.items()
                            if k != "attention_mask" or spec.text_encoder_use_attention_mask}))
    out.update(batched(family.view_inputs(np.zeros((1, 6), np.float32))))
    out["is_prior"] = jax.ShapeDtypeStruct((accum, rows), jnp.bool_)
    out["example_id"] = jax.ShapeDtypeStruct((accum, rows), jnp.int32)
    return out


@dataclasses.dataclass
class Plan:
    """A compiled step and what it needs: the mesh, the state's abstract shapes and shardings, the report."""

    mesh: Any
    abstract_state: state_lib.TrainState
    state_shardings: Any
    param_shardings: Any  # of the pipeline's params (where the loaded weights go)
    batch_sharding: Any
    compiled: Any
    report: dict
    init: Any  # pipeline params -> initial TrainState (pure)
    compile_s: float = 0.0
    subjects: int = 0  # K > 0: a state of K subjects (slots)

    def place_params(self, host_params):
        """The pipeline's host (NumPy) params on the mesh, sharded by the fsdp rule."""
        return parallel.put_sharded(host_params, self.param_shardings)

    def init_state(self, params) -> state_lib.TrainState:
        """The initial train state from placed pipeline params (donated): built by one program whose outputs
        are the state's shardings."""
        init = jax.jit(self.init, out_shardings=self.state_shardings, donate_argnums=(0,))
        with warnings.catch_warnings():
            # their trained networks are stacked into new arrays (the donated ones are freed)
            if self.subjects:
                warnings.filterwarnings("ignore", "Some donated buffers were not usable")
            return init(params)


def _bytes_of(tree, shardings) -> int:
    return parallel.per_device_bytes(tree, shardings) if jax.tree.leaves(tree) else 0


# HBM per chip by device kind, for devices that cannot report it (compile-only TPU topology devices).
HBM_BYTES = {"TPU v5 lite": 16 * 2**30, "TPU v6 lite": 32 * 2**30, "TPU v4": 32 * 2**30, "TPU v5": 95 * 2**30}


def device_memory(devices=None) -> int | None:
    """Bytes of memory of one device of `devices` (default: this process's first), or None (e.g. CPU)."""
    device = jax.local_devices()[0] if devices is None else np.asarray(devices).flat[0]
    try:
        limit = (device.memory_stats() or {}).get("bytes_limit")
    except Exception:  # backends and compile-only devices that do not report
        limit = None
    return limit or HBM_BYTES.get(device.device_kind)


def _out_of_memory(error: Exception) -> bool:
    """Whether a compile error is XLA refusing a program larger than the device (TPU compilers check)."""
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "Ran out of memory" in text


def _compile(pipe, spec, schedules, abstract_state, init, batch_spec: BatchSpec, fsdp: int, devices,
             subjects: int = 0, groups: int | None = None) -> Plan:
    """The plan for one --fsdp; `subjects`: K > 0 for a run of K subjects (state, batch and rng with a leading
    subject axis, the mesh cut into `groups` device groups)."""
    mesh = parallel.train_mesh(fsdp, devices, groups)
    shardings = state_lib.shardings(abstract_state, mesh)
    repl = parallel.replicated(mesh)
    batch_sharding = parallel.batch_sharding(mesh, batch_axis=2 if subjects else 1)
    batch = batch_shapes(batch_spec, pipe, mesh.size // (groups or 1))
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32)
    step = functools.partial(train_step.train_step, spec=spec, schedules=schedules)
    if subjects:
        batch, rng = jax.tree.map(lambda s: jax.ShapeDtypeStruct((subjects, *s.shape), s.dtype), (batch, rng))
        step = functools.partial(train_step.subjects_train_step, spec=spec, schedules=schedules)
    jitted = jax.jit(step, in_shardings=(shardings, batch_sharding, repl), out_shardings=(shardings, repl),
                     donate_argnums=(0,))
    t0 = time.perf_counter()
    try:
        # Traced for the devices' own platform, also when they are compile-only (a TPU topology from a CPU
        # host), so that `auto` kernels are those the devices would run.
        with parallel.traced_on(mesh), choose.target_backend(mesh.devices.flat[0].platform):
            compiled = jitted.lower(abstract_state, batch, rng).compile()
    except Exception as e:
        if not _out_of_memory(e):
            raise
        log.info("XLA refused the program as larger than the device: %s", str(e).splitlines()[0][:300])
        compiled = None
    compile_s = time.perf_counter() - t0
    per_device = {
        "params": _bytes_of(abstract_state.params, shardings.params),
        "optimizer": _bytes_of(abstract_state.opt_state, shardings.opt_state),
        "ema": _bytes_of(abstract_state.ema, shardings.ema),
        "frozen": _bytes_of(abstract_state.frozen, shardings.frozen),
    }
    memory = None if compiled is None else parallel.compiled_memory(compiled)
    if compiled is None:  # the compiler's verdict: it does not fit; the total is not known
        per_device["temp"] = per_device["total"] = None
    elif memory is not None:  # the arguments (state, batch) included
        per_device["temp"], per_device["total"] = memory
    else:  # a backend without the analysis: the state alone, a lower bound
        per_device["temp"] = None
        batch_shardings = jax.tree.map(lambda _: batch_sharding, batch)
        per_device["total"] = sum(per_device.values()) + _bytes_of(batch, batch_shardings)
    limit = device_memory(devices)
    fits = (False if compiled is None else None if limit is None
            else bool(per_device["total"] <= FITS * limit))
    report = {"devices": mesh.size, "mesh": {k: int(v) for k, v in mesh.shape.items()},
              "per_device_bytes": per_device, "device_memory_bytes": limit, "fits": fits}
    if subjects:
        report["subject_slots"] = subjects
    param_shardings = parallel.state_shardings(shape_structs(pipe.params), mesh)  # shared by the subjects
    return Plan(mesh, abstract_state, shardings, param_shardings, batch_sharding, compiled, report, init,
                compile_s, subjects)


def plan(pipe, spec, state: StateSpec | list[StateSpec], batch: BatchSpec, *, max_steps: int,
         global_batch: int, fsdp: str | int = "auto", devices=None,
         subject_devices: int | None = None) -> Plan:
    """Compiles the step (`spec`: its `StepSpec`) for `--fsdp` (an int, or 'auto': 1 when the replicated run
    fits comfortably, else the smallest divisor of the device count that fits) and reports its per-device
    memory. `pipe.params` may be shapes only (`load_pipeline(..., weights="none")`). `state`: the initial
    state's spec, or a list of them (one per subject slot) for a run of several subjects, whose `global_batch`
    is then each subject's and whose groups of `subject_devices` devices (`parallel.subject_groups`) --fsdp
    divides."""
    devices = np.asarray(jax.devices() if devices is None else devices)
    params = shape_structs(pipe.params)
    subjects = state if isinstance(state, list) else None
    if subjects:
        make = functools.partial(state_lib.make_subjects_state, subjects, pipe.family, max_steps=max_steps,
                                 global_batch=global_batch)
    else:
        make = functools.partial(state_lib.make_state, state, pipe.family, max_steps=max_steps,
                                 global_batch=global_batch)
    abstract_state = jax.eval_shape(make, params)
    # Every call makes new optimizer objects (static fields of the state): keep the ones the step compiles
    # with.
    init = lambda p: make(p).replace(txs=abstract_state.txs)  # noqa: E731
    schedules = state_lib.lr_schedules(subjects[0] if subjects else state, pipe.family, abstract_state.params,
                                       max_steps, global_batch)
    k = len(subjects) if subjects else 0
    groups = parallel.subject_groups(k, devices.size, subject_devices) if k else None
    compile_for = functools.partial(_compile, pipe, spec, schedules, abstract_state, init, batch,
                                    devices=devices, subjects=k, groups=groups)
    if fsdp != "auto":
        return compile_for(int(fsdp))
    limit = device_memory(devices)
    per_group = devices.size // (groups or 1)
    divisors = [n for n in range(1, per_group + 1) if per_group % n == 0]
    first = compile_for(1)
    total = first.report["per_device_bytes"]["total"]
    if limit is None or (total is not None and total <= FITS_COMFORTABLY * limit):
        return first
    state_bytes = lambda n: parallel.per_device_bytes(  # noqa: E731
        abstract_state, state_lib.shardings(abstract_state, parallel.train_mesh(n, devices, groups)))
    best = first
    for n in divisors[1:]:
        if state_bytes(n) > FITS * limit:
            continue  # the state alone does not fit: no need to compile
        best = compile_for(n)
        if best.report["fits"]:
            break
    log.info("--fsdp auto: %s", best.report["mesh"])
    return best


def raise_if_too_large(report: dict, state: StateSpec, batch: BatchSpec, *,
                       gradient_checkpointing: bool) -> None:
    """Stops a run that will not fit, before anything is allocated, naming what would help (the options of the
    run's `state`, `batch` and --gradient_checkpointing that would lower its memory)."""
    if report["fits"] is not False:
        return
    gib = lambda b: f"{b / 2**30:.1f} GiB"  # noqa: E731
    parts = ", ".join(f"{k} {gib(v)}" for k, v in report["per_device_bytes"].items()
                      if v is not None and k != "total")
    helps = []
    if not gradient_checkpointing:
        helps.append("--gradient_checkpointing")
    group = report["devices"] // report["mesh"].get("subject", 1)  # the devices a (subject's) state may span
    where = "of a subject group's " if "subject" in report["mesh"] else "of "
    if report["mesh"]["fsdp"] < group:
        helps.append(f"--fsdp N (shard the state over N devices; now {report['mesh']['fsdp']} "
                     f"{where}{group})")
    elif group == 1:
        helps.append("more devices with --fsdp")
    if "subject_slots" in report:
        helps.append("fewer subjects per device group (--subject_devices N, or fewer --subjects per run)")
    if state.lora is None:
        helps.append("--use_lora")
    if state.optimizer != "adafactor" and state.lora is None:
        helps.append("--optimizer adafactor")
    if batch.train_batch_size > 1:
        helps.append("a smaller --train_batch_size (with --gradient_accumulation_steps for the same batch)")
    if not batch.cache_latents:
        helps.append("--cache_latents")
    total = report["per_device_bytes"]["total"]
    need = "more than a device has" if total is None else f"{gib(total)} per device"  # None: XLA refused it
    raise OutOfMemoryError(
        f"this run needs {need} ({parts}) but a device has {gib(report['device_memory_bytes'])}; try "
        f"{', '.join(helps) or 'a smaller model'} (--dry_run prints the numbers without loading weights)")
