"""The device mesh and shardings over every device of every host.

Two axes: `data` (examples split, state replicated) and `fsdp` (examples split too; trained state and frozen
networks sharded, each array along one dimension, gathered by XLA where a layer needs it). Sampling and
evaluation use a 1-D `data` mesh; training uses (data, fsdp), with fsdp = 1 meaning plain data parallelism.
A run of several subjects adds a leading `subject` axis: device groups, each training its share of the
subjects' independent models (their state stacked along a leading subject dimension, split over the groups),
with (data, fsdp) inside each group.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dreambooth_jax.errors import UsageError

SUBJECT_AXIS = "subject"
DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
# Arrays with fewer elements stay whole on every device under fsdp (biases, norms): sharding them saves
# nothing worth a collective.
FSDP_MIN_ELEMENTS = 4096


def maybe_initialize_distributed() -> None:
    """`jax.distributed.initialize()` on multi-process runs; every entry point calls it before anything
    touches a device. Multi-process means: `JAX_COORDINATOR_ADDRESS` is set (with `JAX_NUM_PROCESSES` and
    `JAX_PROCESS_ID` where JAX cannot detect them), or a TPU pod slice, or a SLURM / Open MPI job of several
    tasks (JAX detects the rest)."""
    env = os.environ
    if jax.distributed.is_initialized():
        return
    if env.get("JAX_COORDINATOR_ADDRESS"):
        names = (("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID"))
        kwargs = {k: int(env[v]) for k, v in names if env.get(v)}
        jax.distributed.initialize(env["JAX_COORDINATOR_ADDRESS"], **kwargs)
    elif ("," in env.get("TPU_WORKER_HOSTNAMES", "") or int(env.get("SLURM_NTASKS", "1")) > 1
          or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1):
        jax.distributed.initialize()


def is_main_process() -> bool:
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """All processes wait here for each other (a no-op on one host)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def data_mesh(devices=None) -> Mesh:
    """A 1-D mesh over `devices` (default: all devices of all processes) with one axis, `data`.

    Axis type Auto: classic jit sharding propagation (jax.make_mesh defaults to Explicit in recent JAX).
    """
    devices = np.asarray(jax.devices() if devices is None else devices)
    return Mesh(devices, (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


def train_mesh(fsdp: int = 1, devices=None, subject_groups: int | None = None) -> Mesh:
    """A 2-D mesh (`data`, `fsdp`) over `devices` (default: all devices of all processes), `fsdp` devices per
    group. Devices are taken in process order, so an fsdp group spans as few hosts as possible (its
    all-gathers stay inside a host when fsdp <= the devices per host). With `subject_groups` (a run of several
    subjects), 3-D: (`subject`, `data`, `fsdp`), the devices cut into that many consecutive groups, `fsdp`
    dividing a group."""
    devices = np.asarray(jax.devices() if devices is None else devices)
    groups = subject_groups or 1
    if groups < 1 or devices.size % groups:
        raise UsageError(f"{groups} subject groups do not divide the {devices.size} devices")
    per_group = devices.size // groups
    if fsdp < 1 or per_group % fsdp:
        where = (f"the {per_group} devices of a subject group" if subject_groups
                 else f"the {devices.size} devices")
        raise UsageError(f"--fsdp {fsdp} does not divide {where}")
    if subject_groups is None:
        return Mesh(devices.reshape(per_group // fsdp, fsdp), (DATA_AXIS, FSDP_AXIS),
                    axis_types=(jax.sharding.AxisType.Auto,) * 2)
    return Mesh(devices.reshape(groups, per_group // fsdp, fsdp), (SUBJECT_AXIS, DATA_AXIS, FSDP_AXIS),
                axis_types=(jax.sharding.AxisType.Auto,) * 3)


def subject_groups(num_subjects: int, num_devices: int, devices_per_subject: int | None = None) -> int:
    """How many device groups a run of `num_subjects` subjects on `num_devices` devices has: `num_devices /
    devices_per_subject` when given; else one group per subject where there are enough devices (the fewest
    groups that split the devices evenly and hold a subject each, e.g. 30 subjects on 64 chips: 32 groups of
    2), else one per device. Each subject's batch spans the devices of its group; `subject_slots` pads the
    subjects to fill every group alike."""
    if devices_per_subject is not None:
        if devices_per_subject < 1 or num_devices % devices_per_subject:
            raise UsageError(f"--subject_devices {devices_per_subject} does not divide the {num_devices} "
                             "devices")
        return num_devices // devices_per_subject
    if num_subjects >= num_devices:
        return num_devices
    return min(g for g in range(num_subjects, num_devices + 1) if num_devices % g == 0)


def subject_slots(num_subjects: int, num_devices: int, devices_per_subject: int | None = None) -> int:
    """The subjects a run trains, padded to a multiple of its groups (`subject_groups`): every group trains as
    many. The padding slots repeat the last subject; their results are dropped (e.g. 30 subjects on 64 chips:
    32 slots, 2 of them padding)."""
    groups = subject_groups(num_subjects, num_devices, devices_per_subject)
    return -(-num_subjects // groups) * groups


def fsdp_size(mesh: Mesh) -> int:
    return int(mesh.shape.get(FSDP_AXIS, 1))


def batch_sharding(mesh: Mesh, batch_axis: int = 0) -> NamedSharding:
    """Axis `batch_axis` (the examples) split over every mesh axis, the other axes whole; on a mesh with a
    `subject` axis, axis 0 (the subjects) is split over it and the examples over the others."""
    names = tuple(a for a in mesh.axis_names if a != SUBJECT_AXIS)
    lead = [SUBJECT_AXIS] if SUBJECT_AXIS in mesh.axis_names else []
    return NamedSharding(mesh, PartitionSpec(*lead, *([None] * (batch_axis - len(lead))), names))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def traced_on(mesh: Mesh):
    """Context for tracing a program that runs on `mesh`: Pallas kernels (`kernels.batch_parallel`) read the
    mesh from it to run on each device's share of the batch, which XLA cannot split for them."""
    return jax.set_mesh(mesh)


def fsdp_spec(shape: tuple[int, ...], size: int) -> PartitionSpec:
    """The rule for state under fsdp: an array is split over `fsdp` along its largest dimension divisible by
    the axis size (the first such, on ties); arrays under FSDP_MIN_ELEMENTS or with no such dimension stay
    whole."""
    if size <= 1 or int(np.prod(shape, dtype=np.int64)) < FSDP_MIN_ELEMENTS:
        return PartitionSpec()
    candidates = [i for i, d in enumerate(shape) if d % size == 0]
    if not candidates:
        return PartitionSpec()
    dim = max(candidates, key=lambda i: (shape[i], -i))
    return PartitionSpec(*([None] * dim), FSDP_AXIS)


def state_shardings(tree, mesh: Mesh):
    """NamedShardings for a tree of arrays (or ShapeDtypeStructs) by the fsdp rule (`fsdp_spec`)."""
    size = fsdp_size(mesh)
    return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(tuple(np.shape(x)), size)), tree)


def subject_shardings(tree, mesh: Mesh):
    """NamedShardings for a tree whose arrays have a leading subject dimension: that split over `subject`, the
    rest by the fsdp rule."""
    size = fsdp_size(mesh)
    return jax.tree.map(lambda x: NamedSharding(mesh, PartitionSpec(SUBJECT_AXIS,
                                                                   *fsdp_spec(tuple(np.shape(x))[1:], size))),
                        tree)


def per_device_bytes(tree, shardings) -> int:
    """Bytes one device holds of `tree` (arrays or ShapeDtypeStructs) under `shardings` (the largest
    shard)."""
    total = 0
    for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
        total += int(np.prod(s.shard_shape(tuple(np.shape(x))), dtype=np.int64)) * np.dtype(x.dtype).itemsize
    return total


def put_batch(tree, mesh: Mesh, *, batch_axis: int = 0, process_local: bool = False):
    """Places a batch of host arrays on the mesh, split over `data` along `batch_axis` (see `batch_sharding`).

    The arrays hold the *whole* batch (the same on every process; each process transfers only the rows of its
    own devices), or with `process_local` only this process's rows (each process built its own share, in
    process order).
    """
    sharding = batch_sharding(mesh, batch_axis)
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)
    if process_local:
        return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), tree)
    return jax.tree.map(lambda x: jax.make_array_from_callback(np.shape(x), sharding,
                                                               lambda idx: np.asarray(x)[idx]),
                        tree)


def fetch(x) -> np.ndarray:
    """A sharded array, whole, on every process's host (gathered across hosts when there are several)."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(jax.device_get(x))

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def put_replicated(tree, mesh: Mesh):
    """`tree` whole on every device of `mesh`: host arrays are transferred, arrays already placed so are kept,
    other device arrays (e.g. fsdp-sharded ones, possibly spread over hosts) are gathered by one program."""
    repl = replicated(mesh)
    leaves, treedef = jax.tree.flatten(tree)
    ndims = [np.ndim(x) for x in leaves]
    placed = [isinstance(x, jax.Array) and x.sharding.is_equivalent_to(repl, n)
              for x, n in zip(leaves, ndims)]
    regather = [i for i, x in enumerate(leaves) if isinstance(x, jax.Array) and not placed[i]]
    out = list(leaves)
    if regather:
        gathered = jax.jit(lambda xs: xs, out_shardings=repl)([leaves[i] for i in regather])
        for i, x in zip(regather, gathered):
            out[i] = x
    host = [i for i, x in enumerate(leaves) if not isinstance(x, jax.Array)]
    for i, x in zip(host, jax.device_put([leaves[i] for i in host], repl)):
        out[i] = x
    return jax.tree.unflatten(treedef, out)


def compiled_memory(compiled) -> tuple[int, int] | None:
    """(temporaries, total) bytes per device of a compiled program from XLA's `memory_analysis()`, or None
    where the backend gives none. Total: arguments + outputs not aliased to a donated argument +
    temporaries."""
    memory = compiled.memory_analysis()
    if memory is None:
        return None
    total = (memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
             + memory.temp_size_in_bytes)
    return int(memory.temp_size_in_bytes), int(total)


def put_sharded(tree, shardings):
    """Host (or device) arrays placed as `shardings` say; each process transfers only its own shards."""
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)

    def put(x, sharding):
        if isinstance(x, jax.Array):
            return jax.jit(lambda a: a, out_shardings=sharding)(x)
        return jax.make_array_from_callback(np.shape(x), sharding, lambda idx: np.asarray(x[idx]))

    return jax.tree.map(put, tree, shardings)


def host_copy(tree):
    """Every array of `tree` whole in host memory, on every process (`fetch`, leaf by leaf)."""
    return jax.tree.map(fetch, tree)


def pad_to_multiple(n: int, multiple: int) -> int:
    """The smallest multiple of `multiple` that is >= n."""
    return -(-n // multiple) * multiple
