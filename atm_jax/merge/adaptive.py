"""AdaMerging: merge coefficients learned by minimising prediction entropy at test time.

Yang et al., ICLR 2024 ("AdaMerging: Adaptive Model Merging for Multi-Task
Learning"): the merged model is

    θ(λ) = θ_0 + Σ_t λ_{t,l} τ_{t,l}

with one coefficient per task and leaf (``granularity="layer"``, the paper's
layer-wise AdaMerging) or per task (``"task"``), all starting at ``init`` (0.3).
``λ`` minimises the mean Shannon entropy of each task's predictions (its own head)
on unlabeled inputs of that task, by Adam (``learning_rate`` 1e-3, optax's other
defaults) for ``steps`` steps of ``batch_size`` inputs per task. Each step's batch
per task is the next slice of a per-epoch permutation drawn from ``key``.
``clamp=(lo, hi)`` clips λ after every step (FusionBench's ``clamp_weights``
clips to [0, 1]); ``None`` leaves it free. The inputs are the test inputs in the
paper: the method is transductive (no labels, but the evaluation's inputs).

It returns a delta like every merge: `AdaMergingResult` also carries the learned
coefficients and the entropy of every step, and `merge_step` records both.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from atm_jax import checks
from atm_jax.merge import sparsify
from atm_jax.merge.registry import register
from atm_jax.models.heads import apply_head

PyTree = Any

__all__ = ["adamerging", "AdaMergingResult", "entropy_objective", "GRANULARITIES"]

GRANULARITIES = ("layer", "task")


class AdaMergingResult(NamedTuple):
    """``delta``: the merged task vector ``Σ_t λ_t τ_t`` (apply with α = 1);
    ``coefficients``: ``[T, leaves]`` (layer-wise, leaves in ``jax.tree.leaves``
    order) or ``[T]``; ``entropy``: the mean entropy before each step and after the
    last (``steps + 1`` values); ``paths``: the leaves' paths."""
    delta: PyTree
    coefficients: np.ndarray
    entropy: list
    paths: tuple


def _combine(lam: jax.Array, leaves: Sequence[jax.Array]) -> list:
    """``Σ_t λ[t, l] τ_t,l`` per leaf (λ ``[T]`` broadcasts over leaves)."""
    out = []
    for i, x in enumerate(leaves):
        c = lam[:, i] if lam.ndim == 2 else lam
        compute = jnp.promote_types(x.dtype, jnp.float32)
        # Unrolled over tasks: XLA:CPU reduces over a leading axis slowly (WORKSPACE,
        # "Performance notes").
        total = c[0].astype(compute) * x[0].astype(compute)
        for t in range(1, x.shape[0]):
            total = total + c[t].astype(compute) * x[t].astype(compute)
        out.append(total.astype(x.dtype))
    return out


def _entropy(logits: jax.Array) -> jax.Array:
    logp = jax.nn.log_softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)))
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def entropy_objective(lam: jax.Array, leaves: Sequence[jax.Array], base_leaves: Sequence[jax.Array],
                      treedef, apply_fn: Callable, heads: Sequence, batches: Sequence) -> jax.Array:
    """The mean over tasks of the mean prediction entropy of ``θ(λ)`` on each task's batch."""
    params = jax.tree.unflatten(treedef, [b + d for b, d in zip(base_leaves, _combine(lam, leaves))])
    per_task = [jnp.mean(_entropy(apply_head(h, apply_fn(params, x)))) for h, x in zip(heads, batches)]
    return jnp.mean(jnp.stack(per_task))


def _check(granularity, init, steps, learning_rate, batch_size, clamp) -> None:
    checks.check_choice("granularity", granularity, GRANULARITIES)
    checks.check_range("init", init, float("-inf"), float("inf"), lo_open=True, hi_open=True,
                       hint="The paper starts every coefficient at 0.3.")
    for name, value, least in (("steps", steps, 0), ("batch_size", batch_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name}={value!r} must be an int ≥ {least} (FusionBench: 1000 steps "
                             "at batch 16).")
    checks.check_range("learning_rate", learning_rate, 0, float("inf"), lo_open=True,
                       hi_open=True, hint="The paper's Adam runs at 1e-3.")
    if clamp is not None and (not isinstance(clamp, (tuple, list)) or len(clamp) != 2
                              or not clamp[0] < clamp[1]):
        raise ValueError(f"clamp={clamp!r} must be None or (lo, hi) with lo < hi, e.g. (0.0, 1.0).")


def _batches(inputs: Sequence[np.ndarray], steps: int, batch_size: int, key: jax.Array):
    """Per step and task, ``batch_size`` row indices: consecutive slices of per-epoch
    permutations (a task with fewer rows than a batch repeats rows)."""
    out = []
    for t, x in enumerate(inputs):
        n = len(x)
        need = steps * batch_size
        perms, epoch = [], 0
        while sum(len(p) for p in perms) < need:
            k = jax.random.fold_in(jax.random.fold_in(key, t), epoch)
            perms.append(np.asarray(jax.random.permutation(k, n)))
            epoch += 1
        rows = np.concatenate(perms)[:need] if need else np.zeros(0, np.int64)
        out.append(rows.reshape(steps, batch_size))
    return out


@register("adamerging", reference="Yang et al. 2024 (AdaMerging), https://arxiv.org/abs/2310.02575",
          validate=_check, uses="model", data=("base", "apply_fn", "inputs", "heads"))
def adamerging(stacked: PyTree, *, key: jax.Array | None = None, base: PyTree = None,
               apply_fn: Callable | None = None, inputs: Sequence | None = None,
               heads: Sequence | Mapping | None = None, granularity: str = "layer",
               init: float = 0.3, steps: int = 1000, learning_rate: float = 1e-3,
               batch_size: int = 16, clamp: tuple | None = None, check_finite: bool | str = True,
               like: PyTree | None = None) -> AdaMergingResult:
    """AdaMerging (module docstring): coefficients learned on unlabeled inputs.

    Args:
      base: the weights the task vectors start from.
      apply_fn: ``(params, inputs [B, ...]) -> features [B, F]``; each task's head
        (``{"kernel", "bias"}``, `atm_jax.models.heads.apply_head`) maps them to logits.
      inputs: per task ``[N_t, ...]`` unlabeled inputs, in the stack's task order.
      heads: per task its head, in the same order (a mapping is read in its order).
      key: orders the batches (default ``jax.random.key(0)``).
      granularity, init, steps, learning_rate, batch_size, clamp: see the module docstring.

    Returns:
      `AdaMergingResult` (its ``delta`` is the merge).
    """
    if base is None or apply_fn is None or inputs is None or heads is None:
        raise ValueError("adamerging runs the model: pass base=, apply_fn=(params, inputs) -> "
                         "features, inputs=[per-task unlabeled arrays] and heads=[per-task heads], "
                         "or merge_step(..., data=MergeData(...)).")
    _check(granularity, init, steps, learning_rate, batch_size, clamp)
    leaves, treedef, paths = sparsify.checked_leaves(stacked, like=like, check_finite=check_finite)
    heads = list(heads.values()) if isinstance(heads, Mapping) else list(heads)
    tasks = leaves[0].shape[0]
    if len(inputs) != tasks or len(heads) != tasks:
        raise ValueError(f"adamerging: {len(inputs)} input sets and {len(heads)} heads for "
                         f"{tasks} tasks; pass one of each per task.")
    base_map = checks.leaf_dict(base)
    base_leaves = [base_map[p] for p in paths]
    inputs = [np.asarray(x) for x in inputs]
    inputs = [x.astype(np.float32, copy=False) if x.dtype.kind in "fb" else x for x in inputs]
    shape = (tasks, len(leaves)) if granularity == "layer" else (tasks,)
    lam = jnp.full(shape, float(init), jnp.float32)
    opt = optax.adam(float(learning_rate))
    state = opt.init(lam)
    lo, hi = (None, None) if clamp is None else (float(clamp[0]), float(clamp[1]))
    objective = partial(entropy_objective, apply_fn=apply_fn, heads=heads, treedef=treedef)

    @jax.jit
    def step(lam, state, leaves, base_leaves, batch):
        value, grad = jax.value_and_grad(objective)(lam, leaves, base_leaves, batches=batch)
        updates, state = opt.update(grad, state, lam)
        lam = optax.apply_updates(lam, updates)
        if lo is not None:
            lam = jnp.clip(lam, lo, hi)
        return lam, state, value

    rows = _batches(inputs, steps, batch_size, jax.random.key(0) if key is None else key)
    curve = []
    for s in range(steps):
        batch = [x[r[s]] for x, r in zip(inputs, rows)]
        lam, state, value = step(lam, state, leaves, base_leaves, batch)
        curve.append(value)
    # The entropy after the last step, on the last batch: one more call of the same
    # compiled step (its update is dropped), not a second compilation.
    _, _, last = step(lam, state, leaves, base_leaves,
                      [x[r[-1]] if steps else x[:batch_size] for x, r in zip(inputs, rows)])
    entropy = [float(v) for v in jax.device_get(curve)] + [float(last)]
    delta = jax.tree.unflatten(treedef, _combine(lam, leaves))
    return AdaMergingResult(delta, np.asarray(lam), entropy, tuple(paths))
