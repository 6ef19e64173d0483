"""Class-stratified, seeded subsamples and carves: the split helper every suite shares.

The mini and mini_text suites cut fixed pools out of a source and then draw seeded
subsamples of them, each class in proportion to its count (largest remainder). The
random stream is the caller's: each suite seeds its own generator (the mini suite
with its integer stream tags, mini_text with `named_rng`), so the one helper gives
each suite the splits it always had. `named_rng` also seeds the paper suite's fixed
test carve and the generated local tasks.
"""

from __future__ import annotations

import zlib

import numpy as np


def named_rng(seed: int, *names: str) -> np.random.Generator:
    """A generator seeded by ``seed`` and the CRC-32 of each name.

    Names (a task, a split) enter the seed so that streams sharing a seed draw
    unrelated orders.
    """
    return np.random.default_rng([seed, *(zlib.crc32(name.encode()) for name in names)])


def stratified_sample(labels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``size`` labels drawn per class in proportion to class counts, shuffled.

    Each class gets ``floor(size * n_c / N)``; the leftover goes one each to the
    classes with the largest remainders (ties to the lower class index). Integer
    arithmetic keeps the quotas exact.

    Args:
      labels: int labels [N], 0..C-1.
      size: How many to draw, at most N.
      rng: The caller's random stream (each suite seeds its own).

    Returns:
      int64 positions [size] into ``labels``, in random order.
    """
    counts = np.bincount(labels) if len(labels) else np.zeros(0, np.int64)
    n = int(counts.sum())
    if n == 0 or size == 0:
        return np.zeros(0, np.int64)
    quota = counts.astype(np.int64) * size
    take = quota // n
    extra = size - int(take.sum())
    take[np.argsort(-(quota % n), kind="stable")[:extra]] += 1
    chosen = [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in enumerate(take) if k]
    return rng.permutation(np.concatenate(chosen))


def carve(labels: np.ndarray, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Splits positions 0..N-1 into (kept, held out): ``size`` held out, stratified.

    Returns:
      (kept, held out): disjoint sorted int64 positions covering 0..N-1.
    """
    held = np.zeros(len(labels), bool)
    held[stratified_sample(labels, size, rng)] = True
    return np.flatnonzero(~held), np.flatnonzero(held)
