"""Batches as a pure function of (seed, step), prefetched on a thread.

The order of examples is a function of (seed, step) alone: epoch e visits the split in the order of
``permutation(seed, e)``, and the global batch of step s is the next ``global_batch`` indices of that endless
sequence. So a resumed run sees exactly the batches an uninterrupted run would, whatever the number of hosts, and
process p of P reads rows ``[p * B/P, (p + 1) * B/P)`` of every global batch (disjoint shards). Random flips are drawn
from (seed, step) too.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from collections.abc import Callable, Iterator

import numpy as np

from jaxdiff.data.config import DataConfig
from jaxdiff.data.readers import InMemory, Streamed, open_split
from jaxdiff.errors import DataError
from jaxdiff.images import from_uint8

__all__ = ["Batches", "global_indices", "make_batches"]


def global_indices(num_examples: int, global_batch: int, seed: int, step: int) -> np.ndarray:
    """The dataset indices of the global batch at ``step``: the next ``global_batch`` entries of the concatenation of
    per-epoch permutations ``default_rng([seed, epoch]).permutation(num_examples)``."""
    start = step * global_batch
    out, filled = np.empty(global_batch, np.int64), 0
    while filled < global_batch:
        epoch, offset = divmod(start + filled, num_examples)
        perm = _epoch_order(num_examples, seed, epoch)
        take = min(num_examples - offset, global_batch - filled)
        out[filled : filled + take] = perm[offset : offset + take]
        filled += take
    return out


@functools.lru_cache(maxsize=2)
def _epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """One epoch's permutation, kept while the steps walk through it (a 3M-image split's takes ~50 ms to draw)."""
    order = np.random.default_rng([seed, epoch]).permutation(num_examples)
    order.flags.writeable = False
    return order


class Batches:
    """Batches of one process as a function of the step: ``batches.at(step)`` or iterate from a start step.

    Each batch is ``{'image': float32 [B/P, S, S, C] in [-1, 1], 'label': int32 [B/P]}`` (label 0 when the dataset
    has none). Only this process's rows of each global batch are read from ``data``
    (:class:`~jaxdiff.data.readers.InMemory` or :class:`~jaxdiff.data.readers.Streamed`), so both give the same
    batches. Iterating reads the next batches on a background thread.
    """

    def __init__(
        self,
        data: InMemory | Streamed,
        *,
        global_batch: int,
        seed: int,
        random_flip: bool = False,
        process_index: int = 0,
        process_count: int = 1,
    ):
        if global_batch % process_count:
            raise DataError(f"The global batch {global_batch} is not divisible by the {process_count} processes.")
        self.data = data
        self.global_batch, self.seed, self.random_flip = global_batch, seed, random_flip
        self.local_batch = global_batch // process_count
        self.rows = slice(process_index * self.local_batch, (process_index + 1) * self.local_batch)

    def at(self, step: int) -> dict[str, np.ndarray]:
        idx = global_indices(len(self.data), self.global_batch, self.seed, step)[self.rows]
        images, labels = self.data.read(idx)
        if self.random_flip:
            # Flips come from (seed, step) and the example's position in the global batch, like the order.
            flips = np.random.default_rng([self.seed, step, 1]).random(self.global_batch)[self.rows] < 0.5
            images = np.where(flips[:, None, None, None], images[:, :, ::-1], images)
        labels = labels if labels is not None else np.zeros(len(idx), np.int32)
        return {"image": from_uint8(images), "label": labels.astype(np.int32)}

    def iterate(
        self, start_step: int = 0, prefetch: int = 2, transfer: Callable[[dict], object] | None = None
    ) -> Iterator:
        """Batches for start_step, start_step + 1, ... read ``prefetch`` steps ahead on a thread.

        ``transfer`` (e.g. onto the devices: ``lambda b: parallel.global_batch(b, mesh)``) runs on that thread too, so
        that the step finds its batch already in place; the iterator then yields what it returns. Close the iterator
        (``.close()``) when done: that stops the thread and waits for it, so that no transfer is cut off by the
        process's exit (a daemon thread killed inside XLA aborts the interpreter).
        """
        results: dict[int, object] = {}
        ready = threading.Condition()
        stop = threading.Event()

        def produce():
            step = start_step
            while not stop.is_set():
                try:
                    batch = self.at(step)
                    batch = transfer(batch) if transfer is not None else batch
                except Exception as e:  # handed to the consumer, which raises it
                    batch = _Failed(e)
                with ready:
                    while len(results) >= prefetch and not stop.is_set():
                        ready.wait(0.1)
                    results[step] = batch
                    ready.notify_all()
                if isinstance(batch, _Failed):
                    return
                step += 1

        worker = threading.Thread(target=produce, daemon=True, name="jaxdiff-batches")
        worker.start()
        step = start_step
        try:
            while True:
                with ready:
                    while step not in results:
                        ready.wait(0.1)
                    batch = results.pop(step)
                    ready.notify_all()
                if isinstance(batch, _Failed):
                    raise batch.error
                yield batch
                step += 1
        finally:
            stop.set()
            worker.join()


@dataclasses.dataclass
class _Failed:
    """A batch that could not be read (the reading thread's exception)."""

    error: Exception


def make_batches(
    config: DataConfig, *, global_batch: int, seed: int, process_index: int = 0, process_count: int = 1
) -> Batches:
    """Open ``config``'s split (:func:`~jaxdiff.data.readers.open_split`) and return its :class:`Batches` for this
    process."""
    return Batches(
        open_split(config),
        global_batch=global_batch,
        seed=seed,
        random_flip=config.random_flip,
        process_index=process_index,
        process_count=process_count,
    )
