"""Fixed-shape batches: the one place where examples become batches.

Training, evaluation and feature passes all cut ``N`` examples into batches of
exactly ``batch_size`` rows: the last batch is padded with copies of row 0 and a
mask marks the real rows (1.0) and the padding (0.0). Every step therefore has the
same shapes, so a jitted function compiles once per task shape, and no example is
dropped. This is also where a data-parallel layout plugs in: a batch is a fixed
block of rows that can be split over devices.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

__all__ = ["num_batches", "batch_rows", "padded_batches", "map_batches"]


def num_batches(num_examples: int, batch_size: int) -> int:
    """How many fixed-size batches hold ``num_examples`` (the last one padded)."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} is invalid: must be >= 1")
    return -(-num_examples // batch_size)


def batch_rows(num_examples: int, batch_size: int, order: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """The row indices and mask of every batch.

    Args:
      num_examples: N >= 1.
      batch_size: B >= 1.
      order: optional [N] permutation (e.g. one epoch's shuffle); None = 0..N-1.

    Returns:
      ``rows`` int64 [S, B] and ``mask`` float32 [S, B], S = ceil(N / B): batch
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
    return rows.reshape(steps, batch_size), mask.reshape(steps, batch_size)


def padded_batches(arrays: Sequence[np.ndarray], batch_size: int,
                   order: np.ndarray | None = None
                   ) -> Iterator[tuple[tuple[np.ndarray, ...], np.ndarray]]:
    """Yields ``(tuple of [B, ...] slices of arrays, mask [B])`` per batch.

    All arrays share their first axis N. Rows are gathered on the host, so the
    arrays stay in their compact dtype (uint8 images, int32 tokens) until the step.
    """
    num_examples = len(arrays[0])
    if any(len(a) != num_examples for a in arrays):
        raise ValueError(f"arrays of different lengths: {[len(a) for a in arrays]}")
    rows, mask = batch_rows(num_examples, batch_size, order)
    for r, m in zip(rows, mask):
        yield tuple(a[r] for a in arrays), m


def map_batches(fn, inputs: np.ndarray, batch_size: int) -> np.ndarray:
    """``fn`` over fixed-size batches of ``inputs``, real rows concatenated: [N, ...]."""
    out = [np.asarray(fn(x))[m > 0] for (x,), m in padded_batches([inputs], batch_size)]
    return np.concatenate(out)
