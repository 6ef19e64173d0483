"""The mini suite: small 28x28 grayscale classification tasks and their splits.

The CPU-sized stand-in for the paper's eight vision tasks (ATM, arXiv 2411.03055,
Sec. 5): four real 10-class datasets that reach this machine through package
registries (see `atm_jax.data.sources`), all as float32 images [N, 28, 28, 1] in
[0, 1] with bright strokes on a dark background, and int32 labels [N].

Every task has three fixed *pools*, the same for every ``seed``:

* ``test``: the source's own test set where it has one (MNIST, Fashion-MNIST);
  otherwise (animals, digits) a class-stratified share of the source carved out
  with the fixed seed 0 before anything else, so test images never reach
  training or validation whatever ``seed`` is.
* ``validation``: held out from the source's *training* data, never from its
  test set (MNIST's own validation set, the last 10k of the original training
  set; a stratified carve for the others).
* ``train``: the rest.

`load_task` then draws a class-stratified, seeded subsample of each pool when a
size is asked for, in a seeded random order.
"""

from __future__ import annotations

import dataclasses
import os
import zlib

import numpy as np

from atm_jax.data import sources
from atm_jax.data.splits import carve, stratified_sample
from atm_jax.data.tasks import SPLITS, TaskData


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """How a task's pools are cut from its source.

    Attributes:
      name: Task name, a key of `TASK_SPECS`.
      source: Key of `atm_jax.data.sources.SOURCES`.
      class_names: Names of the labels 0..C-1.
      test_fraction: Share of the source's training data carved out as the test
        pool, or None where the source has its own test set.
      validation_fraction: Share of the remaining training data carved out as the
        validation pool, or None where the source has its own validation set.
    """

    name: str
    source: str
    class_names: tuple[str, ...]
    test_fraction: float | None = None
    validation_fraction: float | None = None


_DIGITS = tuple(str(d) for d in range(10))

TASK_SPECS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("mnist", "mnist", _DIGITS),
        TaskSpec(
            "fashion_mnist",
            "fashion_mnist",
            (
                "T-shirt/top",
                "Trouser",
                "Pullover",
                "Dress",
                "Coat",
                "Sandal",
                "Shirt",
                "Sneaker",
                "Bag",
                "Ankle boot",
            ),
            # 10k of the 60k training images, the size of MNIST's validation set.
            validation_fraction=1 / 6,
        ),
        TaskSpec(
            "animals",
            "animals",
            (
                "bear",
                "bird",
                "cat",
                "cow",
                "dog",
                "elephant",
                "giraffe",
                "horse",
                "sheep",
                "zebra",
            ),
            # 20% test, then 12.5% of the rest (10% of all) for validation.
            test_fraction=0.2,
            validation_fraction=0.125,
        ),
        TaskSpec("digits", "digits", _DIGITS, test_fraction=0.2, validation_fraction=0.125),
    )
}

MINI_TASKS: tuple[str, ...] = tuple(TASK_SPECS)
"""Names of the registered mini-suite tasks."""

# Tags that keep the random streams of different splits and carves apart.
_STREAM = {"train": 1, "validation": 2, "test": 3, "carve_test": 11, "carve_validation": 12}


def _rng(seed: int, stream: str, task: str) -> np.random.Generator:
    # The task name enters the seed so tasks sharing a seed draw unrelated orders. The
    # integer stream tags (not `splits.named_rng`'s CRC-32 of the stream's name) are
    # this suite's own seeding: other tags would draw other splits.
    return np.random.default_rng([seed, _STREAM[stream], zlib.crc32(task.encode())])


def _carve(
    labels: np.ndarray, fraction: float, stream: str, task: str
) -> tuple[np.ndarray, np.ndarray]:
    """Splits positions 0..N-1 into (kept, held out), stratified, with fixed seed 0."""
    return carve(labels, round(fraction * len(labels)), _rng(0, stream, task))


def task_pools(
    name: str, arrays: dict[str, np.ndarray]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Cuts a decoded source into the task's fixed train/validation/test pools.

    Args:
      name: Task name.
      arrays: Decoded source (see `atm_jax.data.sources`).

    Returns:
      {split: (uint8 images [N, 28, 28], int32 labels [N])}.
    """
    spec = TASK_SPECS[name]
    images, labels = arrays["train_images"], arrays["train_labels"]
    pools = {}
    if spec.test_fraction is None:
        pools["test"] = (arrays["test_images"], arrays["test_labels"])
    else:
        keep, held = _carve(labels, spec.test_fraction, "carve_test", name)
        pools["test"] = (images[held], labels[held])
        images, labels = images[keep], labels[keep]
    if spec.validation_fraction is None:
        pools["validation"] = (arrays["validation_images"], arrays["validation_labels"])
    else:
        keep, held = _carve(labels, spec.validation_fraction, "carve_validation", name)
        pools["validation"] = (images[held], labels[held])
        images, labels = images[keep], labels[keep]
    pools["train"] = (images, labels)
    for split, (_, split_labels) in pools.items():
        if split_labels.size and split_labels.max() >= len(spec.class_names):
            raise ValueError(
                f"Task {name!r} {split}: label {split_labels.max()} out of range for "
                f"{len(spec.class_names)} classes; the cached source looks wrong."
            )
    return pools


def _check_size(name: str, split: str, size: int | None, available: int) -> int:
    if size is None:
        return available
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 0:
        raise ValueError(f"Task {name!r}: {split}_size must be a non-negative int, got {size!r}")
    if size > available:
        raise ValueError(
            f"Task {name!r}: requested {split}_size={size} but only {available} "
            f"{split} examples are available."
        )
    return int(size)


def load_task(
    name: str,
    *,
    train_size: int | None = None,
    validation_size: int | None = None,
    test_size: int | None = None,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    cap: bool = False,
) -> TaskData:
    """Loads a mini-suite task, fetching its source into the cache if needed.

    Same arguments give identical arrays. Fetching is skipped (and a missing
    source raises) when ``$ATM_JAX_OFFLINE=1``.

    Args:
      name: One of `MINI_TASKS`.
      train_size: Training examples to draw; None takes the whole pool.
      validation_size: Validation examples to draw; None takes the whole pool.
      test_size: Test examples to draw; None takes the whole pool.
      seed: Seed of the stratified subsampling and of the order of examples. It
        never moves examples between pools.
      cache_dir: Cache root; defaults to `atm_jax.data.cache_dir()`.
      cap: Treat the sizes as upper bounds: a split smaller than requested is taken
        whole instead of raising (suites mixing large and small tasks use this).

    Returns:
      The task's `TaskData`.

    Raises:
      ValueError: For an unknown task, a bad seed, or a size larger than a pool.
      sources.SourceUnavailableError: If the source is missing and not fetchable.
      sources.ChecksumError: If a raw file in the cache has been altered.
    """
    if name not in TASK_SPECS:
        raise ValueError(f"Unknown task {name!r}; registered tasks: {', '.join(MINI_TASKS)}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    spec = TASK_SPECS[name]
    requested = {"train": train_size, "validation": validation_size, "test": test_size}
    pools = task_pools(name, sources.load_source(spec.source, cache=cache_dir))
    splits = {}
    for split in SPLITS:
        images, labels = pools[split]
        wanted = requested[split]
        if cap and isinstance(wanted, (int, np.integer)) and not isinstance(wanted, bool):
            wanted = min(int(wanted), len(labels))
        size = _check_size(name, split, wanted, len(labels))
        index = stratified_sample(labels, size, _rng(int(seed), split, name))
        splits[split] = (
            (images[index].astype(np.float32) / 255.0)[..., None],
            labels[index].astype(np.int32),
        )
    return TaskData(name=name, class_names=spec.class_names, **splits)
