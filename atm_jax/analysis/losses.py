"""Per-task losses for the analysis: mean cross-entropy over a split, and its gradient.

Written independently of `atm_jax.finetune`'s train step (the same loss, mean
softmax cross-entropy of ``head(apply_fn(backbone, inputs, True))`` over the real
examples), so Theorem 3.1's check compares the finetuner against a separate
computation of the gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from atm_jax import batching
from atm_jax.finetune import as_inputs
from atm_jax.models.heads import apply_head

__all__ = ["LossFn", "task_loss", "loss_and_grad"]

PyTree = Any


class LossFn:
    """Jitted summed cross-entropy (and its gradient w.r.t. the backbone) of one batch.

    ``apply_fn(backbone, inputs, train) -> features``; ``train=True`` as in finetuning
    (the models here have no dropout, so it only matters for suites that augment,
    which the analysis does not)."""

    def __init__(self, apply_fn: Callable):
        def summed(backbone, head, inputs, labels, mask):
            logits = apply_head(head, apply_fn(backbone, inputs, True)).astype(jnp.float32)
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
            return (mask * ce).sum()

        self.summed = jax.jit(summed)
        self.summed_grad = jax.jit(jax.value_and_grad(summed))

    def mean(self, backbone: PyTree, head: dict, inputs, labels, *, batch_size: int = 500
             ) -> float:
        """Mean cross-entropy over all ``len(labels)`` examples (float64 accumulation)."""
        total, n = 0.0, len(labels)
        for (x, y), m in batching.padded_batches([inputs, np.asarray(labels, np.int32)],
                                                 batch_size):
            total += float(self.summed(backbone, head, as_inputs(x), y, m))
        return total / n

    def gradient(self, backbone: PyTree, head: dict, inputs, labels, *, batch_size: int = 500
                 ) -> tuple[float, PyTree]:
        """``(mean loss, ∇ mean loss w.r.t. the backbone)`` over all examples."""
        total, grad, n = 0.0, None, len(labels)
        for (x, y), m in batching.padded_batches([inputs, np.asarray(labels, np.int32)],
                                                 batch_size):
            value, g = self.summed_grad(backbone, head, as_inputs(x), y, m)
            total += float(value)
            grad = g if grad is None else jax.tree.map(jnp.add, grad, g)
        return total / n, jax.tree.map(lambda g: g / n, grad)


def task_loss(apply_fn: Callable, backbone: PyTree, head: dict, inputs, labels, *,
              batch_size: int = 500) -> float:
    """Mean cross-entropy of ``backbone`` + ``head`` on ``(inputs, labels)``."""
    return LossFn(apply_fn).mean(backbone, head, inputs, labels, batch_size=batch_size)


def loss_and_grad(apply_fn: Callable, backbone: PyTree, head: dict, inputs, labels, *,
                  batch_size: int = 500) -> tuple[float, PyTree]:
    """Mean cross-entropy and its gradient w.r.t. ``backbone``."""
    return LossFn(apply_fn).gradient(backbone, head, inputs, labels, batch_size=batch_size)
