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

The loop has the shape of a federated algorithm (fedjax's ``init`` / ``apply``):
an immutable :class:`State`, :func:`init`, :func:`finetune_next` (one task) and
:func:`iteration` (the remaining tasks, then the merge) returning
``(state, diagnostics)``. :func:`run` and :func:`one_shot` are thin loops over
them; a caller that checkpoints keeps the latest state and passes it back as
``start`` (see `atm_jax.checkpoint` for its serialisation).

Which leaves merge: only the ``params`` collection when ``base`` is a Flax
variables dict (``{"params": …, "batch_stats": …}``): running statistics are not
task-vector material (a mean of variances scaled by α can go negative), and they
keep the base's values. ``MergeSpec(collections=(…))`` widens this on purpose.
Inside the merged collection, ``include`` / ``exclude`` regexes choose leaves.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from atm_jax import closures
from atm_jax import merge as merge_lib
from atm_jax import tree as tree_lib
from atm_jax.errors import DivergedError

PyTree = Any
FinetuneFn = Callable[[PyTree, PyTree, str, int, jax.Array], tuple[PyTree, PyTree, dict]]
# finetune_tasks(base, {task: head}, epochs, {task: key}) -> {task: (params, head, metrics)}:
# several tasks of one iteration in one call (e.g. at the same time on disjoint devices).
FinetuneTasksFn = Callable[[PyTree, Mapping[str, PyTree], int, Mapping[str, jax.Array]],
                           Mapping[str, tuple[PyTree, PyTree, dict]]]
EvaluateFn = Callable[[PyTree, Mapping[str, PyTree]], dict[str, float]]
Callback = Callable[[dict], None]
Log = Callable[[str], None]

__all__ = ["MergeSpec", "State", "init", "finetune_next", "finetune_group", "iteration", "merge_step", "run",
           "one_shot", "task_key", "merge_key"]


@dataclasses.dataclass(frozen=True, init=False)
class MergeSpec:
    """How task vectors become the next base.

    ``MergeSpec("ties", density=0.15, alpha=1.0)`` or, equivalently,
    ``MergeSpec("ties", {"density": 0.15})``.

    Attributes:
      name: a registered merge (``atm_jax.merge.names()``).
      kwargs: its hyperparameters (e.g. ``{"density": 0.15}``).
      alpha: scale of the merged delta: ``base + alpha * merge(...)`` (α > 0).
      include / exclude: leaf-path regexes selecting what merges; leaves left out
        keep the base's value.
      collections: for a Flax variables dict, the collections that merge (default
        ``("params",)``; see the module docstring).
    """
    name: str
    kwargs: Mapping[str, Any]
    alpha: float
    include: str | Sequence[str] | None
    exclude: str | Sequence[str] | None
    collections: tuple[str, ...]

    def __init__(self, name: str = "mean", kwargs: Mapping[str, Any] | None = None, *,
                 alpha: float = 1.0, include: str | Sequence[str] | None = None,
                 exclude: str | Sequence[str] | None = None,
                 collections: Sequence[str] = ("params",), **hparams):
        if kwargs is not None and not isinstance(kwargs, Mapping):
            raise TypeError(f"MergeSpec kwargs={kwargs!r} must be a dict of hyperparameters; "
                            f"or pass them as keywords: MergeSpec({name!r}, density=0.2).")
        both = set(kwargs or {}) & set(hparams)
        if both:
            raise TypeError(f"MergeSpec got {sorted(both)} both in kwargs and as keywords.")
        kwargs = {**(kwargs or {}), **hparams}
        if isinstance(collections, str):
            collections = (collections,)
        for field, value in (("name", name), ("kwargs", dict(kwargs)), ("alpha", alpha),
                             ("include", include), ("exclude", exclude),
                             ("collections", tuple(collections))):
            object.__setattr__(self, field, value)
        # Raises on unknown names (listing the known ones) and on bad values.
        merge_lib.info(self.name).check(**self.kwargs)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.floating)) \
                or not (np.isfinite(alpha) and alpha > 0):
            raise ValueError(f"alpha={alpha!r} must be a positive number (the paper uses 1).")


def task_key(key: jax.Array, iteration: int, task_index: int) -> jax.Array:
    """The PRNG key of task ``task_index``'s finetune in iteration ``iteration``:
    ``fold_in(fold_in(fold_in(key, iteration), 0), task_index)``."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(key, iteration), 0), task_index)


def merge_key(key: jax.Array, iteration: int) -> jax.Array:
    """The PRNG key of the merge that ends iteration ``iteration`` (DARE needs one):
    ``fold_in(fold_in(key, iteration), 1)``."""
    return jax.random.fold_in(jax.random.fold_in(key, iteration), 1)


def _merge_predicate(base: PyTree, spec: MergeSpec) -> Callable[[str], bool]:
    """Which leaf paths merge: the spec's regexes, inside the merged collections
    (`tree.split` applies the collection rule to Flax variables dicts)."""
    if isinstance(base, Mapping) and "params" in base:
        unknown = set(spec.collections) - set(base)
        if unknown:
            raise ValueError(f"MergeSpec collections {sorted(unknown)} are not in the base, "
                             f"which has {sorted(base)}.")
    return tree_lib.path_filter(spec.include, spec.exclude, collections=spec.collections)


def merge_step(base: PyTree, finetuned: Sequence[PyTree], spec: MergeSpec, *,
               key: jax.Array) -> tuple[PyTree, dict]:
    """``base + alpha * merge(finetuned_t - base)`` and diagnostics.

    Returns:
      The new base and ``{"task_vector_norm": [T], "cosine": [T, T], "delta_norm",
      "merge_seconds"}`` (plain Python numbers, ready for JSON).
    """
    start = time.perf_counter()
    predicate = _merge_predicate(base, spec)
    selected_base, rest = tree_lib.split(base, predicate)
    stacked = tree_lib.stacked_task_vectors([tree_lib.split(f, predicate)[0] for f in finetuned],
                                            selected_base)
    fn = merge_lib.get(spec.name)
    # The base tells a stack from a list of trees whatever container tops the params
    # (per-layer lists), and checks every leaf's task axis.
    kwargs = dict(spec.kwargs)
    if "like" in merge_lib.info(spec.name).options:
        kwargs["like"] = selected_base
    with warnings.catch_warnings():
        if set(spec.collections) - {"params"}:  # asked for on purpose: no warning
            warnings.simplefilter("ignore", tree_lib.StateMergeWarning)
        delta = fn(stacked, key=key, **kwargs) if merge_lib.info(spec.name).stochastic \
            else fn(stacked, **kwargs)
    delta = jax.block_until_ready(delta)
    seconds = time.perf_counter() - start
    new_base = tree_lib.join(tree_lib.apply(selected_base, delta, spec.alpha), rest)
    gram = tree_lib.gram_matrix(stacked, like=selected_base)
    diagnostics = {
        "task_vector_norm": np.sqrt(np.diagonal(np.asarray(gram))).tolist(),
        "cosine": np.asarray(tree_lib.cosine_from_gram(gram)).round(6).tolist(),
        "delta_norm": float(tree_lib.global_norm(delta)),
        "merge_seconds": round(seconds, 4),
    }
    return new_base, diagnostics


@dataclasses.dataclass(frozen=True)
class State:
    """Where ATM (or the one-shot finetunes) stands: enough to continue it exactly.

    Immutable: every step returns a new State (``dataclasses.replace``).

    Attributes:
      iteration: merges done so far (0 for one_shot).
      base: the current base.
      heads: ``{task: head}``, the heads the next finetunes start from; its key
        order is the task order.
      history: the evaluation records so far (see :func:`run`).
      finetuned: the finetuned params of the tasks already done in the current
        iteration, in task order (empty right after a merge).
      finetuned_heads: their heads, ``{task: head}``.
      finetune_metrics: their metrics, ``{task: metrics}``.
    """
    iteration: int
    base: PyTree
    heads: Mapping[str, PyTree]
    history: tuple[dict, ...] = ()
    finetuned: tuple[PyTree, ...] = ()
    finetuned_heads: Mapping[str, PyTree] = dataclasses.field(default_factory=dict)
    finetune_metrics: Mapping[str, dict] = dataclasses.field(default_factory=dict)

    @property
    def tasks(self) -> list[str]:
        return list(self.heads)


def init(base: PyTree, heads: Mapping[str, PyTree]) -> State:
    """The state before any finetune: ``base`` and the per-task ``heads``.

    Raises:
      TypeError: ``heads`` is not a dict keyed by task name.
      ValueError: ``heads`` is empty.
    """
    if not isinstance(heads, Mapping):
        raise TypeError(f"heads must be a dict {{task name: head pytree}} (the task order is "
                        f"its key order), got a {type(heads).__name__}; e.g. "
                        "heads = dict(zip(task_names, head_list)).")
    if not heads:
        raise ValueError("ATM needs at least one task (heads is empty).")
    bad = [t for t in heads if not isinstance(t, str)]
    if bad:
        raise TypeError(f"heads keys must be task names (str), got {bad[0]!r}.")
    return State(0, base, dict(heads))


def _loss_text(metrics: Mapping) -> str:
    loss = metrics.get("loss", float("nan"))
    if isinstance(loss, Sequence) and not isinstance(loss, str):
        loss = loss[-1] if len(loss) else float("nan")
    try:
        return f"{float(loss):.4f}"
    except (TypeError, ValueError):
        return repr(loss)


def finetune_next(state: State, *, finetune: FinetuneFn, epochs: int, key: jax.Array,
                  log: Log | None = None, name: str = "atm") -> State:
    """Finetunes the next task of the current iteration from ``state.base``.

    Task ``i = len(state.finetuned)`` with key ``task_key(key, state.iteration, i)``.
    Its result is checked at once, so a finetune that returns the wrong thing fails
    on its first task, not when the merge stacks all T of them.

    Raises:
      DivergedError: the finetune's loss became non-finite (the message names the
        method, task and iteration).
      TypeError: ``finetune`` did not return ``(params, head, metrics dict)``.
      ValueError: the params differ from ``state.base`` in tree structure, a leaf
        shape or dtype (the message names the task and the first such leaf).
    """
    tasks = state.tasks
    i = len(state.finetuned)
    if i >= len(tasks):
        raise ValueError(f"every task of iteration {state.iteration + 1} is already finetuned.")
    task = tasks[i]
    start = time.perf_counter()
    try:
        out = finetune(state.base, state.heads[task], task, epochs,
                       task_key(key, state.iteration, i))
    except DivergedError as e:
        raise DivergedError(f"{name}: task {task!r}, iteration {state.iteration + 1}: {e}") from None
    return _appended(state, task, out, epochs, start, log, closure="finetune", name=name)


def _appended(state: State, task: str, out, epochs: int, start: float, log: Log | None, *,
              closure: str, name: str) -> State:
    """``state`` with ``task``'s finetune result ``out`` checked and appended."""
    params, head, metrics = closures.finetune_result(
        out, state.base, task=task, closure=closure,
        where=f"{name}, iteration {state.iteration + 1}")
    metrics = dict(metrics, seconds=round(time.perf_counter() - start, 3))
    if log:
        log(f"  finetune {task}: {epochs} epoch(s), final loss {_loss_text(metrics)}, "
            f"{metrics['seconds']:.1f}s")
    return dataclasses.replace(
        state, finetuned=(*state.finetuned, params),
        finetuned_heads={**state.finetuned_heads, task: head},
        finetune_metrics={**state.finetune_metrics, task: metrics})


def finetune_group(state: State, *, finetune_tasks: FinetuneTasksFn, count: int, epochs: int,
                   key: jax.Array, log: Log | None = None, name: str = "atm") -> State:
    """Finetunes the next ``count`` tasks of the current iteration in one call.

    Tasks ``i = len(state.finetuned) … i + count - 1``, each with exactly the key
    the sequential loop gives it (``task_key(key, state.iteration, i)``); the
    results are checked like :func:`finetune_next`'s as soon as the call returns
    (before the next group starts) and appended in task order.

    Raises:
      DivergedError: a finetune's loss became non-finite (the message names the
        method, the group's tasks and the iteration).
      TypeError: ``finetune_tasks`` did not return ``{task: (params, head, metrics)}``
        for exactly the tasks it was given.
      ValueError: a task's params differ from ``state.base`` (as in
        :func:`finetune_next`).
    """
    tasks = state.tasks
    first = len(state.finetuned)
    group = tasks[first:first + count]
    if not group:
        raise ValueError(f"every task of iteration {state.iteration + 1} is already finetuned.")
    keys = {t: task_key(key, state.iteration, first + j) for j, t in enumerate(group)}
    start = time.perf_counter()
    try:
        out = finetune_tasks(state.base, {t: state.heads[t] for t in group}, epochs, keys)
    except DivergedError as e:
        named = group[0] if len(group) == 1 else group
        raise DivergedError(f"{name}: task {named!r}, iteration {state.iteration + 1}: {e}") from None
    if not isinstance(out, Mapping) or set(out) != set(group):
        raise TypeError(f"finetune_tasks(base, heads, epochs, keys) must return {{task: (params, "
                        f"head, metrics dict)}} for the tasks {group}; it returned "
                        f"{str(out)[:120]}.")
    for task in group:
        state = _appended(state, task, out[task], epochs, start, log, closure="finetune_tasks",
                          name=name)
    return state


def _finetune_remaining(state, *, finetune, epochs, key, log, name, on_progress,
                        finetune_tasks=None, tasks_per_call=None) -> State:
    if tasks_per_call is not None:
        _positive("tasks_per_call", tasks_per_call)
    while len(state.finetuned) < len(state.heads):
        if finetune_tasks is None:
            state = finetune_next(state, finetune=finetune, epochs=epochs, key=key, log=log,
                                  name=name)
        else:
            left = len(state.heads) - len(state.finetuned)
            state = finetune_group(state, finetune_tasks=finetune_tasks,
                                   count=min(left, tasks_per_call or left), epochs=epochs,
                                   key=key, log=log, name=name)
        if on_progress:
            on_progress(state)
    return state


def iteration(state: State, *, finetune: FinetuneFn, epochs: int, merge: MergeSpec,
              key: jax.Array, carry_heads: bool = True, log: Log | None = None,
              name: str = "atm", on_progress: Callable[[State], None] | None = None,
              finetune_tasks: FinetuneTasksFn | None = None, tasks_per_call: int | None = None
              ) -> tuple[State, dict]:
    """One ATM iteration: finetune every remaining task, merge, apply.

    With ``finetune_tasks`` the remaining tasks are finetuned by calls on
    consecutive groups of ``tasks_per_call`` tasks (None: all of them in one call),
    each task with the key the sequential loop gives it; ``on_progress`` runs
    after each group. Without it, ``finetune`` runs one task at a time.

    Returns:
      ``(state after the merge, {"finetune": {task: metrics}, "merge": diagnostics})``.
      With ``carry_heads`` each task keeps its finetuned head for the next iteration.
    """
    state = _finetune_remaining(state, finetune=finetune, epochs=epochs, key=key, log=log,
                                name=name, on_progress=on_progress,
                                finetune_tasks=finetune_tasks, tasks_per_call=tasks_per_call)
    new_base, diagnostics = merge_step(state.base, state.finetuned, merge,
                                       key=merge_key(key, state.iteration))
    heads = dict(state.finetuned_heads) if carry_heads else state.heads
    new_state = State(state.iteration + 1, new_base, heads, history=state.history)
    return new_state, {"finetune": dict(state.finetune_metrics), "merge": diagnostics}


def _positive(name: str, value) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer.")


def _evaluated(evaluate: EvaluateFn, params, heads, what: str) -> dict[str, float]:
    acc = evaluate(params, heads)
    if not isinstance(acc, Mapping) or set(acc) != set(heads):
        raise TypeError(f"evaluate(params, heads) must return {{task: accuracy}} for the tasks "
                        f"{sorted(heads)}; for {what} it returned {str(acc)[:120]}.")
    return {t: closures.accuracy(acc[t], task=t, what=what) for t in heads}


def run(base: PyTree, heads: Mapping[str, PyTree], *, finetune: FinetuneFn,
        evaluate: EvaluateFn | None, iterations: int, epochs_per_iteration: int,
        merge: MergeSpec = MergeSpec(), key: jax.Array, carry_heads: bool = True,
        callback: Callback | None = None, log: Log | None = None,
        name: str = "atm", start: State | None = None,
        on_progress: Callable[[State], None] | None = None,
        finetune_tasks: FinetuneTasksFn | None = None, tasks_per_call: int | None = None,
        eval_every: int = 1) -> tuple[PyTree, dict[str, PyTree], list[dict]]:
    """The ATM loop: ``iterations`` × (finetune every task → merge → apply).

    Args:
      base: the starting parameters (pretrained for ATM; an existing merged model
        for post-hoc ATM).
      heads: ``{task: head}``, the tasks in order.
      finetune: ``(base, head, task, epochs, key) -> (params, head, metrics)``; it
        chooses the split (train for ATM, validation for valFT ATM). ``metrics`` is
        a dict; its ``"loss"`` (a number or a per-epoch list) is logged.
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
      start: continue from this :class:`State` instead of ``base``/``heads``
        (their values are then ignored): the result is bitwise that of an
        uninterrupted run, since every key derives from ``key``, the iteration
        and the task index.
      on_progress: called with the :class:`State` after every task finetune
        (every group of them with ``finetune_tasks``) and every merge (e.g. to
        checkpoint).
      finetune_tasks: optional ``(base, {task: head}, epochs, {task: key}) ->
        {task: (params, head, metrics)}`` finetuning several tasks in one call
        (task parallel: `atm_jax.sharding`); the results equal ``finetune``'s.
      tasks_per_call: tasks per ``finetune_tasks`` call (None: all remaining).
      eval_every: run ``evaluate`` after every ``eval_every``-th iteration only (and
        always at the start and after the last); the other records carry no
        ``"accuracy"``. Nothing else changes: the finetunes and merges are the same.

    Returns:
      ``(final base, final heads, history)``; ``history[k]`` is the record after
      ``k`` iterations (``history[0]`` the starting point when ``evaluate`` is given).

    Raises:
      DivergedError: a finetune's loss became non-finite; the message names
        the method, task, iteration and step.
      TypeError, ValueError: ``finetune`` / ``finetune_tasks`` or ``evaluate``
        returned something else than documented, e.g. params unlike the base or
        an accuracy that is not one number; raised as soon as that task's result
        comes back, naming the closure and the task.
    """
    _positive("iterations", iterations)
    _positive("epochs_per_iteration", epochs_per_iteration)
    _positive("eval_every", eval_every)
    if not isinstance(merge, MergeSpec):
        raise TypeError(f"merge={merge!r} must be an atm.MergeSpec, e.g. MergeSpec('mean').")
    state = init(base, heads) if start is None else start
    if not 0 <= state.iteration <= iterations or len(state.finetuned) > len(state.heads):
        raise ValueError(f"start is at iteration {state.iteration} with {len(state.finetuned)} "
                         f"tasks done, outside this run's {iterations} iterations × "
                         f"{len(state.heads)} tasks.")

    def record(state: State, extra: dict) -> State:
        k = state.iteration
        rec = {"method": name, "iteration": k, "epochs_per_task": k * epochs_per_iteration,
               **extra}
        if evaluate is not None and (k % eval_every == 0 or k == iterations):
            rec["accuracy"] = _evaluated(evaluate, state.base, state.heads, f"iteration {k}")
            rec["average_accuracy"] = float(np.mean(list(rec["accuracy"].values())))
        if callback:
            callback(rec)
        if log and "average_accuracy" in rec:
            log(f"[{name}] iteration {k}/{iterations}: average accuracy "
                f"{rec['average_accuracy']:.4f}")
        return dataclasses.replace(state, history=(*state.history, rec))

    if evaluate is not None and not state.history:
        state = record(state, {})
        if on_progress:
            on_progress(state)
    while state.iteration < iterations:
        if log:
            done = len(state.finetuned)
            log(f"[{name}] iteration {state.iteration + 1}/{iterations}"
                + (f" (resumed after {done} of {len(state.heads)} tasks)" if done else ""))
        state, diagnostics = iteration(state, finetune=finetune, epochs=epochs_per_iteration,
                                       merge=merge, key=key, carry_heads=carry_heads, log=log,
                                       name=name, on_progress=on_progress,
                                       finetune_tasks=finetune_tasks,
                                       tasks_per_call=tasks_per_call)
        state = record(state, diagnostics)
        if on_progress:
            on_progress(state)
    return state.base, dict(state.heads), list(state.history)


def one_shot(base: PyTree, heads: Mapping[str, PyTree], *, finetune: FinetuneFn,
             evaluate: EvaluateFn, epochs: int, merges: Mapping[str, MergeSpec],
             key: jax.Array, callback: Callback | None = None,
             log: Log | None = None, start: State | None = None,
             on_progress: Callable[[State], None] | None = None,
             finetune_tasks: FinetuneTasksFn | None = None,
             tasks_per_call: int | None = None) -> dict:
    """The one-shot baselines: finetune every task for the whole budget, merge once.

    Every task is finetuned from ``base`` for ``epochs`` (the same keys as ATM's
    first iteration), each finetuned model is evaluated on its own task (the
    "individual" reference that normalized accuracy divides by), and then every
    merge in ``merges`` is applied once to the same task vectors.

    ``start`` / ``on_progress`` work as in :func:`run` (a :class:`State` after
    every task finetune), so a resumed call skips the finetunes already done;
    ``finetune_tasks`` / ``tasks_per_call`` as in :func:`run`.

    Returns:
      ``{"individual": {task: acc}, "merged": {method: {task: acc}},
      "finetune": {task: metrics}, "merge": {method: diagnostics},
      "params": {method: merged params}}``.
    """
    _positive("epochs", epochs)
    if not isinstance(merges, Mapping) or not all(isinstance(m, MergeSpec) for m in merges.values()):
        raise TypeError(f"merges must be a dict {{method name: atm.MergeSpec}}, got {merges!r}.")
    state = init(base, heads) if start is None else start
    tasks = state.tasks
    if log:
        done = len(state.finetuned)
        log(f"[one-shot] finetuning {len(tasks)} task(s) for {epochs} epoch(s) each"
            + (f" (resumed: {done} already done)" if done else ""))
    state = _finetune_remaining(state, finetune=finetune, epochs=epochs, key=key, log=log,
                                name="one-shot", on_progress=on_progress,
                                finetune_tasks=finetune_tasks, tasks_per_call=tasks_per_call)
    finetuned, new_heads = state.finetuned, state.finetuned_heads
    individual = {}
    for task, params in zip(tasks, finetuned):
        individual[task] = _evaluated(evaluate, params, {task: new_heads[task]},
                                      f"the individual model of {task!r}")[task]
    out = {"individual": individual, "merged": {}, "finetune": dict(state.finetune_metrics),
           "merge": {}, "params": {}}
    if callback:
        callback({"method": "individual", "iteration": 1, "epochs_per_task": epochs,
                  "accuracy": individual, "average_accuracy": float(np.mean(list(individual.values())))})
    for method, spec in merges.items():
        merged, diagnostics = merge_step(state.base, finetuned, spec, key=merge_key(key, 0))
        acc = _evaluated(evaluate, merged, new_heads, f"the {method} merge")
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
