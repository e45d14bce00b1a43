"""The device mesh and shardings: data parallel over every device of every host (`data` axis)."""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def maybe_initialize_distributed() -> None:
    """`jax.distributed.initialize()` on multi-process runs; every entry point calls it before anything touches
    a device. Multi-process means: `JAX_COORDINATOR_ADDRESS` is set (with `JAX_NUM_PROCESSES` and
    `JAX_PROCESS_ID` where JAX cannot detect them), or a TPU pod slice, or a SLURM / Open MPI job of several
    tasks (JAX detects the rest)."""
    env = os.environ
    if jax.distributed.is_initialized():
        return
    if env.get("JAX_COORDINATOR_ADDRESS"):
        kwargs = {k: int(env[v]) for k, v in (("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID"))
                  if env.get(v)}
        jax.distributed.initialize(env["JAX_COORDINATOR_ADDRESS"], **kwargs)
    elif ("," in env.get("TPU_WORKER_HOSTNAMES", "") or int(env.get("SLURM_NTASKS", "1")) > 1
          or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1):
        jax.distributed.initialize()


def barrier(name: str) -> None:
    """All processes wait here for each other (a no-op on one host)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def data_mesh(devices=None) -> Mesh:
    """A 1-D mesh over `devices` (default: all devices of all processes) with one axis, `data`.

    Axis type Auto: classic jit sharding propagation (jax.make_mesh defaults to Explicit in recent JAX).
    """
    devices = np.asarray(jax.devices() if devices is None else devices)
    return Mesh(devices, (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


def batch_sharding(mesh: Mesh, batch_axis: int = 0) -> NamedSharding:
    """Axis `batch_axis` (the examples) split over `data`, the other axes whole."""
    return NamedSharding(mesh, PartitionSpec(*([None] * batch_axis), DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def put_batch(tree, mesh: Mesh, *, batch_axis: int = 0, process_local: bool = False):
    """Places a batch of host arrays on the mesh, split over `data` along `batch_axis`.

    The arrays hold the *whole* batch (the same on every process; each process transfers only the rows of its
    own devices), or with `process_local` only this process's rows (each process built its own share, in
    process order).
    """
    sharding = batch_sharding(mesh, batch_axis)
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)
    if process_local:
        return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), tree)
    return jax.tree.map(lambda x: jax.make_array_from_callback(np.shape(x), sharding, lambda idx: np.asarray(x)[idx]),
                        tree)


def fetch(x) -> np.ndarray:
    """A sharded array, whole, on every process's host (gathered across hosts when there are several)."""
    if jax.process_count() == 1:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def put_replicated(tree, mesh: Mesh):
    return jax.device_put(tree, replicated(mesh))


def pad_to_multiple(n: int, multiple: int) -> int:
    """The smallest multiple of `multiple` that is >= n."""
    return -(-n // multiple) * multiple
