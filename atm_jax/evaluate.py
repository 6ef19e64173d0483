"""Per-task accuracy and the aggregates reported by ATM (arXiv 2411.03055).

The paper reports the average top-1 accuracy over tasks and the *normalized*
accuracy: each task's accuracy divided by a reference accuracy for that task
(the individually finetuned model's), averaged over tasks.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from atm_jax import batching
from atm_jax.errors import renamed_keyword
from atm_jax.models.heads import apply_head
from atm_jax.sharding import Placement

PyTree = Any
ApplyFn = Callable[[PyTree, jax.Array, bool], jax.Array]


def _make_count_correct(apply_fn: ApplyFn):
    """Jitted `(backbone, head, inputs [B,...], labels [B], mask [B]) -> correct count`."""

    def count_correct(backbone, head, inputs, labels, mask):
        logits = apply_head(head, apply_fn(backbone, inputs, False))
        return jnp.sum(jnp.where(mask, logits.argmax(-1) == labels, False), dtype=jnp.int32)

    return jax.jit(count_correct)


# One jitted forward per apply_fn, so repeated evaluations (every task, every ATM
# iteration) reuse the compilation when they pass the same apply_fn object.
_count_correct_for = functools.lru_cache(maxsize=32)(_make_count_correct)


@renamed_keyword("images", "inputs")
def accuracy(apply_fn: ApplyFn, backbone: PyTree, head: dict, inputs, labels, *,
             batch_size: int = 500, placement: Placement | None = None) -> float:
    """Top-1 accuracy of `apply_head(head, apply_fn(backbone, inputs, False))`.

    Every batch has exactly `batch_size` rows (the last is padded and masked), so one
    compilation serves every task with the same input shape and head shape.

    Args:
        apply_fn: `apply_fn(backbone, inputs, train) -> features [B, F]`; pass the
            same object every time to reuse the compiled forward.
        backbone: backbone params.
        head: {"kernel": [F, C], "bias": [C]}.
        inputs: [N, ...] model inputs, e.g. images or token ids; the old keyword
            ``images=`` still works for one release (warns).
        labels: [N] integer labels.
        batch_size: rows per forward pass.
        placement: a mesh (`atm_jax.sharding.Placement`): params placed by its
            rules, every batch padded to a multiple of its devices and split over
            them; None = one device (`atm_jax.sharding.Placement.single`).

    Returns:
        Fraction of correctly classified examples, in [0, 1].

    Raises:
        ValueError: on empty or mismatched data, or batch_size < 1.
    """
    inputs = np.asarray(inputs)
    if inputs.dtype.kind in "fb":
        inputs = inputs.astype(np.float32, copy=False)
    labels = np.asarray(labels, np.int32)
    if len(inputs) != len(labels) or len(inputs) == 0:
        raise ValueError(f"need as many labels as inputs, at least one: got "
                         f"{len(inputs)} inputs and {len(labels)} labels")
    try:
        count_correct = _count_correct_for(apply_fn)
    except TypeError:  # an unhashable apply_fn: no caching, compiles per call
        count_correct = _make_count_correct(apply_fn)

    if placement is None:
        placement = Placement.single()
    backbone, head = placement.params(backbone), placement.params(head)
    total = batching.padded_size(batch_size, placement.multiple)
    batches = batching.padded_batches([inputs, labels], batch_size, multiple=placement.multiple,
                                      rows=placement.local_rows(total))
    placed = batching.prefetch(
        (tuple(placement.put(a, total) for a in (x, y, mask > 0)) for (x, y), mask in batches))
    counts = [count_correct(backbone, head, x, y, m) for x, y, m in placed]
    return int(sum(jax.device_get(counts))) / len(inputs)


def average(accs: Mapping[str, float]) -> float:
    """Mean accuracy over tasks.

    Raises:
        ValueError: if `accs` is empty.
    """
    if not accs:
        raise ValueError("average of no tasks")
    return float(np.mean([float(a) for a in accs.values()]))


def normalized(accs: Mapping[str, float], reference: Mapping[str, float]) -> dict[str, float]:
    """Per-task normalized accuracy `accs[t] / reference[t]`.

    Args:
        accs: task name -> accuracy of the evaluated model.
        reference: task name -> reference accuracy (the paper uses each task's
            individually finetuned model); same task set as `accs`.

    Returns:
        task name -> ratio, in the order of `accs`.

    Raises:
        ValueError: if the task sets differ (naming the missing tasks on each side)
            or a reference accuracy is 0.
    """
    missing_ref = sorted(set(accs) - set(reference))
    missing_acc = sorted(set(reference) - set(accs))
    if missing_ref or missing_acc:
        raise ValueError(f"task sets differ: missing from reference {missing_ref}, "
                         f"missing from accs {missing_acc}")
    zero = sorted(t for t in accs if float(reference[t]) == 0.0)
    if zero:
        raise ValueError(f"reference accuracy is 0 for tasks {zero}: cannot normalize")
    return {t: float(a) / float(reference[t]) for t, a in accs.items()}


def normalized_average(accs: Mapping[str, float], reference: Mapping[str, float]) -> float:
    """The paper's normalized accuracy: mean over tasks of `accs[t] / reference[t]`.

    Raises:
        ValueError: as `normalized`, or if there are no tasks.
    """
    return average(normalized(accs, reference))
