"""Running a Pallas kernel on each device's share of the batch.

XLA cannot split a Pallas custom call over devices: inside a jitted program whose batch is sharded, it would
gather the whole batch onto every device and run the kernel there. So a kernel call is wrapped in
`shard_map` over the batch, using the mesh the caller set (`jax.set_mesh`, as the trainer and the sampler
do): each device runs the kernel on its own examples, and per-example kernels need no communication. The
weights a kernel takes (norm scale and bias) are whole on every device; their gradients are summed over
the batch shards by `shard_map`'s transpose.
"""

from __future__ import annotations

import jax
from jax.sharding import PartitionSpec as P

from dreambooth_jax.parallel import SUBJECT_AXIS  # a run of several subjects vmaps its step over this axis


def batch_parallel(fn, *args, num_batched: int = 1):
    """`fn(*args)`, with the first `num_batched` args ([B, ...] each) split over every axis of the current
    mesh (but `subject`) and the others whole on every device.

    Falls back to one call on the whole arrays (XLA's choice) without a mesh, on one device, or when B does
    not divide evenly over the mesh (e.g. a batch of 1 on 8 devices), where a split is not possible anyway.
    """
    mesh = jax.sharding.get_abstract_mesh()
    axes = tuple(a for a in mesh.axis_names if a != SUBJECT_AXIS) if not mesh.empty else ()
    size = 1
    for a in axes:
        size *= mesh.shape[a]
    if mesh.empty or size == 1 or args[0].shape[0] % size:
        return fn(*args)
    spec = P(axes)
    # check_vma=False: Pallas outputs carry no varying-axes annotation. The shared weights' in_spec P()
    # makes shard_map's transpose sum their per-device cotangents over the mesh.
    specs = (spec,) * num_batched + (P(),) * (len(args) - num_batched)
    return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=spec, check_vma=False)(*args)
