"""Devices and sharding: the mesh, batch and replicated shardings, global batches, and the one batch runner.

One 1-D mesh over every device of every process, axis ``data``: batches are split along it, parameters and states
are replicated. Training, sampling, evaluation and checkpoints all take their shardings from here; this module imports
nothing of jaxdiff.

:func:`map_batches` is the one loop that runs a compiled function over many images (drawing, the bound, the ODE's
bits/dim, the features of FID): the last batch padded in one place, each process feeding only its own rows of each
global batch (``jax.make_array_from_process_local_data``), the results gathered on every process
(``multihost_utils.process_allgather``). Image i's key is ``fold_in(key, i)`` (:func:`example_keys`), so a result
depends neither on the batch size nor on the device or process count.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxdiff.errors import ConfigError

__all__ = [
    "all_finite",
    "batch_sharding",
    "check_batch_size",
    "example_keys",
    "from_process_0",
    "global_batch",
    "jit_batched",
    "make_mesh",
    "map_batches",
    "process_rows",
    "process_verdicts",
    "replicate",
    "replicated",
    "round_up_batch",
    "to_host",
]


def make_mesh(devices=None) -> Mesh:
    """A 1-D mesh over all devices of all processes (or ``devices``), axis ``data``."""
    return Mesh(np.asarray(devices if devices is not None else jax.devices()), ("data",))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Split the leading (batch) axis over the mesh's ``data`` axis."""
    return NamedSharding(mesh, PartitionSpec("data"))


def replicated(mesh: Mesh) -> NamedSharding:
    """A whole copy on every device of the mesh."""
    return NamedSharding(mesh, PartitionSpec())


def replicate(tree, mesh: Mesh):
    """Put a pytree (e.g. a fresh TrainState, or parameters made on this host) on every device of the mesh.

    Arrays already replicated on the mesh stay as they are. On several processes, every process must pass the same
    values, and a value this process holds (a host array, or an array on its own devices: JAX cannot move those across
    hosts) is placed from the host onto this process's devices, with no check that the others hold the same
    (``device_put`` would gather every leaf from every process to compare them)."""
    sharding = replicated(mesh)
    across_hosts = not all(d.process_index == jax.process_index() for d in mesh.devices.flat)

    def put(x):
        if isinstance(x, jax.Array) and x.sharding == sharding:
            return x
        if across_hosts and (not isinstance(x, jax.Array) or x.is_fully_addressable):
            host = np.asarray(x)
            return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
        return jax.device_put(x, sharding)

    return jax.tree_util.tree_map(put, tree)


def round_up_batch(batch_size: int, mesh: Mesh) -> int:
    """The smallest multiple of the mesh's device count that is >= ``batch_size`` (a whole number per device)."""
    if batch_size < 1:
        raise ConfigError(f"batch_size must be positive, got {batch_size}.")
    return batch_size + (-batch_size % mesh.devices.size)


def check_batch_size(global_batch: int, mesh: Mesh) -> None:
    """Raise a ValueError unless the global batch splits evenly over the mesh's devices and processes."""
    devices = mesh.devices.size
    if global_batch < 1 or global_batch % devices or global_batch % jax.process_count():
        raise ConfigError(
            f"The batch size {global_batch} is not a positive multiple of the {devices} devices "
            f"({jax.process_count()} processes); use a multiple of {devices}."
        )


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
    """This process's rows of the batch -> the global batch as arrays sharded on the ``data`` axis."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}


def process_rows(mesh: Mesh, global_batch: int) -> slice:
    """The rows ``[start, stop)`` of a ``[global_batch]`` array split over the mesh that this process's devices hold.

    The mesh orders the devices by process (:func:`make_mesh`), so each process holds one contiguous block, and
    ``jax.make_array_from_process_local_data`` takes exactly those rows from it.
    """
    blocks = sorted(
        index[0].indices(global_batch)[:2]
        for index in batch_sharding(mesh).addressable_devices_indices_map((global_batch,)).values()
    )
    for (_, stop), (start, _) in itertools.pairwise(blocks):
        if stop != start:
            raise ConfigError(
                f"This process's devices hold rows {blocks} of the batch, not one block: build the mesh with "
                "parallel.make_mesh(), which orders the devices by process."
            )
    return slice(blocks[0][0], blocks[-1][1])


def process_verdicts(ok: bool) -> np.ndarray:
    """Every process's ``ok``, in process order (on one process, its own alone): for choices that every process must
    make alike (a cache file to read or not, a checkpoint to restore), since a process that goes another way never
    joins the others' next collective, and they wait for ever. Call it on every process."""
    if jax.process_count() == 1:
        return np.asarray([bool(ok)])
    return np.asarray(multihost_utils.process_allgather(np.int32(bool(ok)))).reshape(-1).astype(bool)


def from_process_0(value: int) -> int:
    """Process 0's ``value`` on every process (on one process, ``value``): for a choice that every process must make
    alike, read by each from files that one host may see otherwise than another. Call it on every process."""
    if jax.process_count() == 1:
        return int(value)
    return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


def example_keys(key: jax.Array, index: jax.Array) -> jax.Array:
    """``[B]`` keys, the j-th ``fold_in(key, index[j])``: image i's randomness whatever batch it is drawn in."""
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, index)


@functools.lru_cache(maxsize=8)
def _folding(mesh: Mesh) -> Callable:
    """:func:`example_keys` jitted over ``mesh``: the key replicated, the item numbers and keys split."""
    sharding = batch_sharding(mesh)
    return jax.jit(example_keys, in_shardings=(replicated(mesh), sharding), out_shardings=sharding)


def _gather(tree):
    """Every element of a pytree of arrays, as numpy, on every process."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)


def map_batches(
    fn: Callable,
    inputs: Mapping[str, np.ndarray | None] | Callable[[np.ndarray], Mapping[str, np.ndarray]],
    count: int,
    batch_size: int,
    mesh: Mesh,
    *,
    key: jax.Array | None = None,
    progress: Callable[[int], None] | None = None,
):
    """``fn`` over ``count`` items in global batches of ``batch_size``, split over the mesh: results ``[count, ...]``.

    Each process reads and feeds only its rows of each batch (:func:`process_rows`); the last batch is padded with
    copies of the last item (their results dropped), so ``fn`` compiles once; the results come back gathered, the
    same numpy arrays on every process.

    Args:
      fn: ``fn(batch) -> pytree of arrays [batch_size, ...]``, where ``batch`` holds the inputs' arrays as global
        arrays ``[batch_size, ...]`` split on the ``data`` axis, ``index`` (int32, each row's item number) and, with
        ``key``, ``key`` (each row's key, ``fold_in(key, index)``). Usually it calls a function jitted over ``mesh``.
      inputs: ``{name: array [count, ...]}`` (None entries are left out), or ``read(index) -> {name: array}`` for the
        given item numbers (a split read from disk: each process reads its rows alone).
      batch_size: a multiple of the mesh's devices.
      key: a PRNG key (the same on every process): row i's key is ``fold_in(key, i)``, whatever the batch size,
        device count or process count.
      progress: called with the number of items done after each batch.

    Raises:
      ValueError: no items, or a batch size that does not split over the devices.
    """
    if count < 1:
        raise ConfigError("No items to run over: pass at least one image.")
    check_batch_size(batch_size, mesh)
    rows = process_rows(mesh, batch_size)
    sharding = batch_sharding(mesh)
    if callable(inputs):
        read = inputs
    else:
        given = {name: array for name, array in inputs.items() if array is not None}
        read = lambda index: {name: array[index] for name, array in given.items()}
    fold = _folding(mesh)
    outs = []
    for start in range(0, count, batch_size):
        index = np.minimum(np.arange(start + rows.start, start + rows.stop), count - 1)
        local = {**read(index), "index": index.astype(np.int32)}
        batch = {
            name: jax.make_array_from_process_local_data(sharding, np.asarray(v), (batch_size, *np.shape(v)[1:]))
            for name, v in local.items()
        }
        if key is not None:
            batch["key"] = fold(key, batch["index"])
        done = min(batch_size, count - start)
        outs.append(jax.tree_util.tree_map(lambda x, n=done: np.asarray(x)[:n], _gather(fn(batch))))
        if progress is not None:
            progress(done)
    return jax.tree_util.tree_map(lambda *parts: np.concatenate(parts), *outs)


def jit_batched(fn: Callable, mesh: Mesh, batch_args: tuple[bool, ...]) -> Callable:
    """``jax.jit`` of ``fn`` with its output's leading axis split over the mesh's ``data`` axis.

    Args:
      batch_args: one flag per positional argument of ``fn``: True to split it along its leading axis too (images,
        labels, per-example keys), False to replicate it (parameters, a key).
    """
    in_shardings = tuple(batch_sharding(mesh) if split else replicated(mesh) for split in batch_args)
    return jax.jit(fn, in_shardings=in_shardings, out_shardings=batch_sharding(mesh))


def all_finite(tree) -> bool:
    """True when every element of every array of ``tree`` is finite, checked on the host (:func:`to_host`), with
    nothing to compile. A jitted check compiled one reduction per leaf, ~3 s for the digits train state's 250 leaves,
    at every start that saves or restores; this one reads each array once (0.1 s for the 572 MB CIFAR-10 train
    state, which a save copies to the host anyway)."""
    return all(bool(np.isfinite(to_host(leaf)).all()) for leaf in jax.tree_util.tree_leaves(tree))


def to_host(x) -> np.ndarray:
    """The whole of ``x`` as a numpy array: a fully replicated array (a run's state is one) from this process's first
    copy, so that every process reads the same values; any other array only when this process holds all of it."""
    if isinstance(x, jax.Array):
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        if not x.is_fully_addressable:
            raise ConfigError(
                "to_host() reads a replicated array or one this process holds whole; this one is sharded over "
                "hosts: replicate it first (parallel.replicate)."
            )
    return np.asarray(x)
