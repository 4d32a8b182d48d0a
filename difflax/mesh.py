"""The one module that owns the device mesh: data parallelism with jit + NamedSharding.

A 1-D mesh with axis "data" spans all devices of all processes (call
`jax.distributed.initialize()` before on multi-host set-ups). Parameters are replicated;
batches are split along their leading axis. The same code runs on one CPU, one accelerator
host or a pod, and per-step randomness comes from `jax.random.fold_in(key, step)` with
partitionable threefry, so results do not depend on the device count (up to float reduction
order). Training (`difflax.training.parallel`) and sampling (`difflax.samplers.factory`)
both shard through it.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh(devices=None) -> Mesh:
    """A 1-D ("data",) mesh over `devices` (default: `jax.devices()`, all processes)."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (parameters, optimiser state, keys, metrics)."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """The leading (batch) axis is split over the "data" axis."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def pad_to_mesh(arrays, mesh: Mesh):
    """Pads the leading (batch) axis of each host array with zeros to a multiple of the mesh
    size, so that the batch splits over "data"; slice the result back to the true size."""
    pad = -arrays[0].shape[0] % mesh.size
    return tuple(np.pad(np.asarray(a), ((0, pad),) + ((0, 0),) * (np.ndim(a) - 1))
                 for a in arrays)


def host_to_global(tree, sharding: NamedSharding):
    """Global jax.Arrays laid out as `sharding` from host values that every process holds in
    full and alike (a key, labels, noise drawn from a shared key).

    Unlike `jax.device_put`, this works when the sharding spans other processes' devices:
    each process fills its own devices from its copy. PRNG key arrays are supported.
    """

    def put(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            data = put(jax.random.key_data(x))
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(put, tree)


def shard_batch(batch, mesh: Mesh):
    """Puts this process's rows of a global batch (a pytree of numpy arrays) on the mesh.

    Each process passes its local rows (B / process_count); the result is a pytree of
    global jax.Arrays of batch size B sharded along "data".
    """
    sharding = batch_sharded(mesh)

    def put(x):
        x = np.asarray(x)
        if (x.shape[0] * jax.process_count()) % mesh.size:
            raise ValueError(f"global batch size {x.shape[0] * jax.process_count()} is not "
                             f"divisible by the {mesh.size} devices of the mesh")
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree.map(put, batch)
