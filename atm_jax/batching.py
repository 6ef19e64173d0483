"""Fixed-shape batches: the one place where examples become batches.

Training, evaluation and feature passes all cut ``N`` examples into batches of
exactly ``batch_size`` rows: the last batch is padded with copies of row 0 and a
mask marks the real rows (1.0) and the padding (0.0). Every step therefore has the
same shapes, so a jitted function compiles once per task shape, and no example is
dropped. This is also where the data-parallel layout plugs in (`atm_jax.sharding`):
with ``multiple=m`` every batch gets extra mask-0 rows up to a multiple of the m
devices that share it (the same real rows per step, so the same result up to float
reduction order), and ``rows=slice`` keeps only the rows this process's devices
hold (each process gathers its own part of the global batch).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

__all__ = ["num_batches", "padded_size", "batch_rows", "padded_batches", "map_batches", "prefetch"]


def num_batches(num_examples: int, batch_size: int) -> int:
    """How many fixed-size batches hold ``num_examples`` (the last one padded)."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} is invalid: must be >= 1")
    return -(-num_examples // batch_size)


def padded_size(batch_size: int, multiple: int = 1) -> int:
    """Rows of one batch: ``batch_size`` rounded up to a multiple of ``multiple``."""
    if multiple < 1:
        raise ValueError(f"multiple={multiple} is invalid: must be >= 1 (devices per batch)")
    return -(-batch_size // multiple) * multiple


def batch_rows(num_examples: int, batch_size: int, order: np.ndarray | None = None,
               multiple: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """The row indices and mask of every batch.

    Args:
      num_examples: N >= 1.
      batch_size: B >= 1 real rows per batch.
      order: optional [N] permutation (e.g. one epoch's shuffle); None = 0..N-1.
      multiple: every batch is padded to ``B' = padded_size(B, multiple)`` rows.

    Returns:
      ``rows`` int64 [S, B'] and ``mask`` float32 [S, B'], S = ceil(N / B): batch
      ``s`` holds examples ``rows[s]``; padding rows point at example 0 with mask 0.
    """
    steps = num_batches(num_examples, batch_size)
    padding = steps * batch_size - num_examples
    if order is None:
        order = np.arange(num_examples)
    elif len(order) != num_examples:
        raise ValueError(f"order has {len(order)} entries for {num_examples} examples")
    rows = np.concatenate([np.asarray(order, np.int64), np.zeros(padding, np.int64)])
    mask = np.concatenate([np.ones(num_examples, np.float32), np.zeros(padding, np.float32)])
    rows, mask = rows.reshape(steps, batch_size), mask.reshape(steps, batch_size)
    extra = padded_size(batch_size, multiple) - batch_size
    if extra:
        rows = np.concatenate([rows, np.zeros((steps, extra), np.int64)], axis=1)
        mask = np.concatenate([mask, np.zeros((steps, extra), np.float32)], axis=1)
    return rows, mask


def padded_batches(arrays: Sequence[np.ndarray], batch_size: int,
                   order: np.ndarray | None = None, *, multiple: int = 1,
                   rows: slice = slice(None)
                   ) -> Iterator[tuple[tuple[np.ndarray, ...], np.ndarray]]:
    """Yields ``(tuple of [B', ...] slices of arrays, mask [B'])`` per batch.

    All arrays share their first axis N. Rows are gathered on the host, so the
    arrays stay in their compact dtype (uint8 images, int32 tokens) until the step.
    ``multiple`` pads every batch (see `batch_rows`); ``rows`` keeps only that
    slice of each padded batch (this process's part of a global batch).
    """
    num_examples = len(arrays[0])
    if any(len(a) != num_examples for a in arrays):
        raise ValueError(f"arrays of different lengths: {[len(a) for a in arrays]}")
    index, mask = batch_rows(num_examples, batch_size, order, multiple)
    for r, m in zip(index[:, rows], mask[:, rows]):
        yield tuple(a[r] for a in arrays), m


def map_batches(fn, inputs: np.ndarray, batch_size: int) -> np.ndarray:
    """``fn`` over fixed-size batches of ``inputs``, real rows concatenated: [N, ...]."""
    out = [np.asarray(fn(x))[m > 0] for (x,), m in padded_batches([inputs], batch_size)]
    return np.concatenate(out)


class _End:
    """Marks the end of a prefetched stream (or carries the producer's exception)."""

    def __init__(self, error: BaseException | None = None):
        self.error = error


def prefetch(items: Iterable, depth: int = 2) -> Iterator:
    """``items`` produced ``depth`` ahead on a background thread, in order.

    The producer does the host work of the next batches (row gather, device
    transfer) while the device runs the current step; NumPy gathers and
    ``jax.device_put`` release the GIL. The order and the values are those of
    ``items``: prefetching changes when a batch is built, never what it holds.
    An exception in the producer is raised here, at the item where it happened;
    closing the generator early stops the producer.
    """
    if depth < 1:
        raise ValueError(f"depth={depth} is invalid: must be >= 1")
    out: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce():
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        out.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            out.put(_End())
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            out.put(_End(e))

    thread = threading.Thread(target=produce, name="atm_jax-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = out.get()
            if isinstance(item, _End):
                if item.error is not None:
                    raise item.error
                return
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                out.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.05)
