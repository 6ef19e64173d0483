"""ATM: Alternating Tuning and Merging, and the one-shot merging baselines.

Paper: Zhou et al., "ATM: Improving Model Merging by Alternating Tuning and
Merging", arXiv 2411.03055. With base θ⁽⁰⁾ (pretrained), for k = 0..K-1::

    τ_t⁽ᵏ⁾  = finetune(θ⁽ᵏ⁾, task t, e epochs) − θ⁽ᵏ⁾        for every task t   ("tune")
    θ⁽ᵏ⁺¹⁾ = θ⁽ᵏ⁾ + α · merge(τ_1⁽ᵏ⁾ … τ_T⁽ᵏ⁾)                                  ("merge")

with the mean as the default merge and α = 1 (eq. 7). One-shot task arithmetic
is the same with K = 1 and all epochs in that one finetune (:func:`one_shot`).

Both functions are generic: ``base`` is any params pytree, and the caller passes
``finetune(base, head, task, epochs, key) -> (params, head, metrics)`` and
``evaluate(params, heads) -> {task: accuracy}`` closures (so data, splits, models
and optimizers stay outside). Heads are per task and never merged: ``heads`` is a
dict ``{task: head pytree}`` the finetune may update (trainable heads carried
from one iteration to the next) or leave alone (frozen heads).

Randomness: every finetune of task index ``i`` in iteration ``k`` uses
``task_key(key, k, i)``; the merge of iteration ``k`` uses ``merge_key(key, k)``.
So ATM with K = 1 and the mean merge reproduces one-shot task arithmetic exactly.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from atm_jax import merge as merge_lib
from atm_jax.errors import DivergedError
from atm_jax import tree as tree_lib

PyTree = Any
FinetuneFn = Callable[[PyTree, PyTree, str, int, jax.Array], tuple[PyTree, PyTree, dict]]
EvaluateFn = Callable[[PyTree, Mapping[str, PyTree]], dict[str, float]]
Callback = Callable[[dict], None]

__all__ = ["MergeSpec", "Progress", "merge_step", "run", "one_shot", "task_key", "merge_key"]


@dataclasses.dataclass(frozen=True)
class MergeSpec:
    """How task vectors become the next base.

    Attributes:
      name: a registered merge (``atm_jax.merge.names()``).
      kwargs: its hyperparameters (e.g. ``{"density": 0.15}``).
      alpha: scale of the merged delta: ``base + alpha * merge(...)`` (α > 0).
      include / exclude: leaf-path regexes selecting what merges; leaves left out
        keep the base's value.
    """
    name: str = "mean"
    kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    alpha: float = 1.0
    include: str | Sequence[str] | None = None
    exclude: str | Sequence[str] | None = None

    def __post_init__(self):
        # Raises on unknown names (listing the known ones) and on bad values.
        merge_lib.info(self.name).check(**self.kwargs)
        if not (np.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"alpha={self.alpha!r} must be a positive number (the paper uses 1).")


@dataclasses.dataclass
class Progress:
    """Where :func:`run` or :func:`one_shot` stands: enough to continue it exactly.

    Handed to ``on_progress`` after every finished task finetune and every merge,
    and accepted back as ``start`` (e.g. from a checkpoint) to continue from there.

    Attributes:
      iteration: merges done so far (0 for one_shot).
      base: the current base.
      heads: the heads the next finetunes start from.
      history: the records so far (see :func:`run`).
      finetuned: the finetuned params of the tasks already done in the current
        iteration, in task order (empty right after a merge).
      finetuned_heads: their heads, ``{task: head}``.
      finetune_metrics: their metrics, ``{task: metrics}``.
    """
    iteration: int
    base: PyTree
    heads: dict[str, PyTree]
    history: list[dict] = dataclasses.field(default_factory=list)
    finetuned: list[PyTree] = dataclasses.field(default_factory=list)
    finetuned_heads: dict[str, PyTree] = dataclasses.field(default_factory=dict)
    finetune_metrics: dict[str, dict] = dataclasses.field(default_factory=dict)


def task_key(key: jax.Array, iteration: int, task_index: int) -> jax.Array:
    """The PRNG key of task ``task_index``'s finetune in iteration ``iteration``."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(key, iteration), 0), task_index)


def merge_key(key: jax.Array, iteration: int) -> jax.Array:
    """The PRNG key of the merge that ends iteration ``iteration`` (DARE needs one)."""
    return jax.random.fold_in(jax.random.fold_in(key, iteration), 1)


def merge_step(base: PyTree, finetuned: Sequence[PyTree], spec: MergeSpec, *,
               key: jax.Array) -> tuple[PyTree, dict]:
    """``base + alpha * merge(finetuned_t - base)`` and diagnostics.

    Returns:
      The new base and ``{"task_vector_norm": [T], "cosine": [T, T], "delta_norm",
      "merge_seconds"}`` (plain Python numbers, ready for JSON).
    """
    start = time.perf_counter()
    predicate = tree_lib.path_filter(spec.include, spec.exclude)
    selected_base, rest = tree_lib.split(base, predicate)
    stacked = tree_lib.stacked_task_vectors([tree_lib.split(f, predicate)[0] for f in finetuned],
                                            selected_base)
    fn = merge_lib.get(spec.name)
    kwargs = dict(spec.kwargs)
    delta = fn(stacked, key=key, **kwargs) if merge_lib.info(spec.name).stochastic \
        else fn(stacked, **kwargs)
    delta = jax.block_until_ready(delta)
    seconds = time.perf_counter() - start
    full_delta = tree_lib.join(delta, jax.tree.map(jnp.zeros_like, rest))
    new_base = tree_lib.apply(base, full_delta, spec.alpha)
    gram = tree_lib.gram_matrix(stacked)
    diagnostics = {
        "task_vector_norm": np.sqrt(np.diagonal(np.asarray(gram))).tolist(),
        "cosine": np.asarray(tree_lib.cosine_from_gram(gram)).round(6).tolist(),
        "delta_norm": float(tree_lib.global_norm(delta)),
        "merge_seconds": round(seconds, 4),
    }
    return new_base, diagnostics


def _finetune_all(progress: Progress, tasks, finetune, epochs, key, log, on_progress, name):
    """Finetunes the tasks not yet in ``progress`` from ``progress.base``, in order."""
    for i in range(len(progress.finetuned), len(tasks)):
        task = tasks[i]
        start = time.perf_counter()
        try:
            params, head, m = finetune(progress.base, progress.heads[task], task, epochs,
                                       task_key(key, progress.iteration, i))
        except DivergedError as e:
            raise DivergedError(
                f"{name}: task {task!r}, iteration {progress.iteration + 1}: {e}") from None
        progress.finetuned.append(params)
        progress.finetuned_heads[task] = head
        progress.finetune_metrics[task] = dict(m, seconds=round(time.perf_counter() - start, 3))
        if log:
            loss = m.get("loss", [float("nan")])
            log(f"  finetune {task}: {epochs} epoch(s), final loss {loss[-1]:.4f}, "
                f"{progress.finetune_metrics[task]['seconds']:.1f}s")
        if on_progress:
            on_progress(progress)


def run(base: PyTree, heads: Mapping[str, PyTree], *, finetune: FinetuneFn,
        evaluate: EvaluateFn | None, iterations: int, epochs_per_iteration: int,
        merge: MergeSpec = MergeSpec(), key: jax.Array, carry_heads: bool = True,
        callback: Callback | None = None, log: Callable[[str], None] | None = None,
        name: str = "atm", start: Progress | None = None,
        on_progress: Callable[[Progress], None] | None = None
        ) -> tuple[PyTree, dict[str, PyTree], list[dict]]:
    """The ATM loop: ``iterations`` × (finetune every task → merge → apply).

    Args:
      base: the starting parameters (pretrained for ATM; an existing merged model
        for post-hoc ATM).
      heads: ``{task: head}``, the tasks in order.
      finetune: ``(base, head, task, epochs, key) -> (params, head, metrics)``; it
        chooses the split (train for ATM, validation for valFT ATM).
      evaluate: ``(params, heads) -> {task: accuracy}``, run before the first
        iteration (iteration 0 = the starting base) and after every merge; None
        skips evaluation.
      iterations: K ≥ 1.
      epochs_per_iteration: e ≥ 1; the budget per task is ``K * e`` epochs.
      merge: the merge and its scale α.
      key: PRNG key; see the module docstring for how it is split.
      carry_heads: keep each task's finetuned head for the next iteration
        (trainable heads); with frozen heads this changes nothing.
      callback: called with each iteration's record, as soon as it exists.
      log: a line printer for progress (None: silent).
      name: the method name put into records.
      start: continue from this :class:`Progress` instead of ``base``/``heads``
        (their values are then ignored): the result is bitwise that of an
        uninterrupted run, since every key derives from ``key``, the iteration
        and the task index.
      on_progress: called with the :class:`Progress` after every task finetune
        and every merge (e.g. to checkpoint).

    Returns:
      ``(final base, final heads, history)``; ``history[k]`` is the record after
      ``k`` iterations (``history[0]`` the starting point when ``evaluate`` is given).

    Raises:
      DivergedError: a finetune's loss became non-finite; the message names
        the method, task, iteration and step.
    """
    _check_positive("iterations", iterations)
    _check_positive("epochs_per_iteration", epochs_per_iteration)
    tasks = list(heads)
    if not tasks:
        raise ValueError("ATM needs at least one task (heads is empty).")
    if start is None:
        progress = Progress(0, base, dict(heads))
    else:
        progress = start
        if not 0 <= progress.iteration <= iterations or len(progress.finetuned) > len(tasks):
            raise ValueError(f"start is at iteration {progress.iteration} with "
                             f"{len(progress.finetuned)} tasks done, outside this run's "
                             f"{iterations} iterations × {len(tasks)} tasks.")

    def record(iteration, extra):
        rec = {"method": name, "iteration": iteration,
               "epochs_per_task": iteration * epochs_per_iteration, **extra}
        if evaluate is not None:
            rec["accuracy"] = {t: float(a) for t, a in evaluate(progress.base, progress.heads).items()}
            rec["average_accuracy"] = float(np.mean(list(rec["accuracy"].values())))
        progress.history.append(rec)
        if callback:
            callback(rec)
        if log and "average_accuracy" in rec:
            log(f"[{name}] iteration {iteration}/{iterations}: average accuracy "
                f"{rec['average_accuracy']:.4f}")

    if evaluate is not None and not progress.history:
        record(0, {})
        if on_progress:
            on_progress(progress)
    while progress.iteration < iterations:
        k = progress.iteration
        if log:
            done = len(progress.finetuned)
            log(f"[{name}] iteration {k + 1}/{iterations}"
                + (f" (resumed after {done} of {len(tasks)} tasks)" if done else ""))
        _finetune_all(progress, tasks, finetune, epochs_per_iteration, key, log, on_progress, name)
        new_base, diagnostics = merge_step(progress.base, progress.finetuned, merge,
                                           key=merge_key(key, k))
        ft_metrics = progress.finetune_metrics
        if carry_heads:
            progress.heads = dict(progress.finetuned_heads)
        progress.base, progress.iteration = new_base, k + 1
        progress.finetuned, progress.finetuned_heads, progress.finetune_metrics = [], {}, {}
        record(k + 1, {"finetune": ft_metrics, "merge": diagnostics})
        if on_progress:
            on_progress(progress)
    return progress.base, progress.heads, progress.history


def one_shot(base: PyTree, heads: Mapping[str, PyTree], *, finetune: FinetuneFn,
             evaluate: EvaluateFn, epochs: int, merges: Mapping[str, MergeSpec],
             key: jax.Array, callback: Callback | None = None,
             log: Callable[[str], None] | None = None, start: Progress | None = None,
             on_progress: Callable[[Progress], None] | None = None) -> dict:
    """The one-shot baselines: finetune every task for the whole budget, merge once.

    Every task is finetuned from ``base`` for ``epochs`` (the same keys as ATM's
    first iteration), each finetuned model is evaluated on its own task (the
    "individual" reference that normalized accuracy divides by), and then every
    merge in ``merges`` is applied once to the same task vectors.

    ``start`` / ``on_progress`` work as in :func:`run` (a :class:`Progress` after
    every task finetune), so a resumed call skips the finetunes already done.

    Returns:
      ``{"individual": {task: acc}, "merged": {method: {task: acc}},
      "finetune": {task: metrics}, "merge": {method: diagnostics},
      "params": {method: merged params}}``.
    """
    _check_positive("epochs", epochs)
    tasks = list(heads)
    if not tasks:
        raise ValueError("one_shot needs at least one task (heads is empty).")
    progress = start if start is not None else Progress(0, base, dict(heads))
    if log:
        done = len(progress.finetuned)
        log(f"[one-shot] finetuning {len(tasks)} task(s) for {epochs} epoch(s) each"
            + (f" (resumed: {done} already done)" if done else ""))
    _finetune_all(progress, tasks, finetune, epochs, key, log, on_progress, "one-shot")
    finetuned, new_heads = progress.finetuned, progress.finetuned_heads
    individual = {}
    for task, params in zip(tasks, finetuned):
        individual[task] = float(evaluate(params, {task: new_heads[task]})[task])
    out = {"individual": individual, "merged": {}, "finetune": progress.finetune_metrics,
           "merge": {}, "params": {}}
    if callback:
        callback({"method": "individual", "iteration": 1, "epochs_per_task": epochs,
                  "accuracy": individual, "average_accuracy": float(np.mean(list(individual.values())))})
    for method, spec in merges.items():
        merged, diagnostics = merge_step(progress.base, finetuned, spec, key=merge_key(key, 0))
        acc = {t: float(a) for t, a in evaluate(merged, new_heads).items()}
        out["merged"][method] = acc
        out["merge"][method] = diagnostics
        out["params"][method] = merged
        rec = {"method": method, "iteration": 1, "epochs_per_task": epochs, "accuracy": acc,
               "average_accuracy": float(np.mean(list(acc.values()))), "merge": diagnostics}
        if callback:
            callback(rec)
        if log:
            log(f"[{method}] one-shot merge: average accuracy {rec['average_accuracy']:.4f}")
    return out


def _check_positive(name: str, value) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer.")
