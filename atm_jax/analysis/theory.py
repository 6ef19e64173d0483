"""Task vectors as gradients (Theorem 3.1) and the per-epoch gradient structure (Fig. 3).

Theorem 3.1 / Remark 3.1 (arXiv 2411.03055): finetuning with full-batch gradient
descent (one step per epoch, plain SGD with learning rate η, no clipping, no decay)
for one epoch gives the task vector ``τ_t = −η ∇L̄_t(θ_base)`` exactly, and the sum
over tasks ``Σ_t τ_t = −η ∇ Σ_t L̄_t(θ_base)``. For k > 1 epochs the identity holds
only to first order; :func:`gradient_gap` measures how far ``τ_t⁽ᵏ⁾`` is from
``−kη ∇L̄_t(θ_base)`` for several η and k. The task vectors come from the project's
`Finetuner` (the code every run uses); the gradient from `losses.LossFn`, a separate
computation, so k = 1 checks the finetuner against the theorem.

:func:`gradient_structure`: finetunes each task with the run's optimizer and
mini-batches for E epochs and accumulates every epoch's gradients ``g_e`` (the sum
of its mini-batch gradients over the number of steps); reports the norm share
``‖g_e‖ / Σ_e ‖g_e‖`` and the E × E cosine matrix of the ``g_e`` (Fig. 3a / 3b).
Holds E flattened gradients per task.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from atm_jax import batching
from atm_jax import tree as tree_lib
from atm_jax.analysis import geometry
from atm_jax.analysis.losses import LossFn
from atm_jax.finetune import (
    Finetuner,
    OptimizerConfig,
    as_inputs,
    epoch_order,
    make_optimizer,
)
from atm_jax.models.heads import apply_head

__all__ = ["gradient_gap", "gradient_structure", "gap_table"]

PyTree = Any
Data = Mapping[str, tuple[np.ndarray, np.ndarray]]


def _flat(tree) -> np.ndarray:
    return np.asarray(tree_lib.ravel(tree)[0], np.float64)


def _compare(tau: np.ndarray, target: np.ndarray) -> dict:
    scale = np.linalg.norm(target)
    gap = np.linalg.norm(tau - target)
    cos = float(tau @ target / (np.linalg.norm(tau) * scale)) if scale > 0 and np.any(tau) else 0.0
    return {"relative_gap": float(gap / scale) if scale > 0 else float("nan"),
            "max_abs_gap": float(np.max(np.abs(tau - target))),
            "target_norm": float(scale), "cosine": cos}


def gradient_gap(apply_fn: Callable, base: PyTree, heads: Mapping[str, dict], data: Data, *,
                 etas: Sequence[float] = (1e-3, 1e-2, 1e-1), epochs: Sequence[int] = (1, 2, 5),
                 key: jax.Array | None = None) -> dict:
    """Theorem 3.1's gap, per task and for the sum over tasks.

    Args:
      data: ``{task: (inputs, labels)}``; each task is one full batch.
      etas: SGD learning rates η.
      epochs: the k to compare ``τ⁽ᵏ⁾`` with ``−kη∇L̄(θ_base)``.

    Returns:
      ``{"rows": [{"task" ("sum" for the sum over tasks), "eta", "epochs",
      "relative_gap", "max_abs_gap", "target_norm", "cosine"}], "examples": {task: n}}``.
    """
    key = jax.random.key(0) if key is None else key
    loss_fn = LossFn(apply_fn)
    grads = {}
    for task, (inputs, labels) in data.items():
        _, g = loss_fn.gradient(base, heads[task], inputs, labels, batch_size=len(labels))
        grads[task] = _flat(g)
    rows = []
    base_flat = _flat(base)
    finetuners = {}  # one per (η, batch size): each compiles once for every k
    for eta in etas:
        for k in epochs:
            total_tau = np.zeros_like(base_flat)
            for task, (inputs, labels) in data.items():
                n = len(labels)
                if (eta, n) not in finetuners:
                    opt = OptimizerConfig(name="sgd", learning_rate=float(eta), grad_clip=None,
                                          batch_size=n, weight_decay=0.0)
                    finetuners[eta, n] = Finetuner(apply_fn, opt, train_head=False)
                tuned, _, _ = finetuners[eta, n].finetune(base, heads[task], inputs, labels,
                                                          epochs=int(k), key=key)
                tau = _flat(tuned) - base_flat
                total_tau += tau
                rows.append({"task": task, "eta": float(eta), "epochs": int(k),
                             **_compare(tau, -k * eta * grads[task])})
            total_grad = sum(grads.values())
            rows.append({"task": "sum", "eta": float(eta), "epochs": int(k),
                         **_compare(total_tau, -k * eta * total_grad)})
    return {"rows": rows, "examples": {t: len(d[1]) for t, d in data.items()}}


def gradient_structure(apply_fn: Callable, base: PyTree, heads: Mapping[str, dict], data: Data,
                       opt: OptimizerConfig, *, epochs: int, key: jax.Array) -> dict:
    """Per-epoch accumulated gradients of each task's finetune (Fig. 3).

    Returns:
      ``{"tasks": {task: {"norm": [E], "norm_share": [E], "cosine": [E, E]}},
      "optimizer": name, "epochs": E}``.
    """
    tx = make_optimizer(opt)

    def loss(backbone, head, x, y, m):
        logits = apply_head(head, apply_fn(backbone, x, True)).astype(jnp.float32)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        return (m * ce).sum() / jnp.maximum(m.sum(), 1.0)

    @jax.jit
    def step(backbone, opt_state, head, x, y, m):
        g = jax.grad(loss)(backbone, head, x, y, m)
        updates, opt_state = tx.update(g, opt_state, backbone)
        return optax.apply_updates(backbone, updates), opt_state, g

    out = {}
    for i, (task, (inputs, labels)) in enumerate(data.items()):
        backbone, opt_state = base, tx.init(base)
        task_key = jax.random.fold_in(key, i)
        per_epoch = []
        for e in range(epochs):
            order = epoch_order(task_key, e, len(labels))
            total, steps = None, 0
            for (x, y), m in batching.padded_batches([inputs, np.asarray(labels, np.int32)],
                                                     opt.batch_size, order):
                backbone, opt_state, g = step(backbone, opt_state, heads[task], as_inputs(x), y, m)
                total = g if total is None else jax.tree.map(jnp.add, total, g)
                steps += 1
            per_epoch.append(_flat(total) / steps)
        vectors = np.stack(per_epoch)
        norms = np.linalg.norm(vectors, axis=1)
        out[task] = {"norm": norms.tolist(), "norm_share": (norms / norms.sum()).tolist(),
                     "cosine": geometry.cosine_from_vectors(vectors).round(6).tolist()}
    return {"tasks": out, "optimizer": dataclasses.asdict(opt), "epochs": epochs}


def gap_table(gap: dict) -> str:
    """Theorem 3.1's gap as a Markdown table: relative gap ‖τ⁽ᵏ⁾ + kη∇L̄‖ / ‖kη∇L̄‖ of
    the sum over tasks, rows η, columns k."""
    rows = [r for r in gap["rows"] if r["task"] == "sum"]
    etas = sorted({r["eta"] for r in rows})
    ks = sorted({r["epochs"] for r in rows})
    value = {(r["eta"], r["epochs"]): r for r in rows}
    out = ["| η \\ k | " + " | ".join(f"k = {k}" for k in ks) + " |",
           "|---|" + "---:|" * len(ks)]
    for eta in etas:
        out.append(f"| {eta:g} | " + " | ".join(
            f"{value[eta, k]['relative_gap']:.2e} (cos {value[eta, k]['cosine']:.4f})"
            for k in ks) + " |")
    return "\n".join(out) + "\n"
