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
an immutable :class:`State`, :func:`init`, :func:`finetune_group` (the next tasks,
through a "finetune these tasks" hook: :func:`sequential`, task parallel in
`atm_jax.parallel`, per process in `atm_jax.distributed`) and :func:`iteration`
(the remaining tasks, then the merge) returning ``(state, diagnostics)``;
:func:`record` makes an iteration's record (evaluated when due). A caller that
checkpoints or writes records drives its own loop over them, as
`atm_jax.runner` does; :func:`run` and :func:`one_shot` are the short loops for
research code. Evaluation stays outside the iteration.

Which leaves merge: see `atm_jax.merge_spec` (``params`` / ``nnx.Param`` only,
unless ``MergeSpec(collections=…)`` widens it; ``include`` / ``exclude`` regexes).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from atm_jax import closures
from atm_jax.errors import DivergedError
from atm_jax.merge_spec import MergeData, MergeSpec, merge_step, tuned_merge

PyTree = Any
FinetuneFn = Callable[[PyTree, PyTree, str, int, jax.Array], tuple[PyTree, PyTree, dict]]
# finetune_tasks(base, {task: head}, epochs, {task: key}) -> {task: (params, head, metrics)}:
# several tasks of one iteration in one call (e.g. at the same time on disjoint devices).
FinetuneTasksFn = Callable[[PyTree, Mapping[str, PyTree], int, Mapping[str, jax.Array]],
                           Mapping[str, tuple[PyTree, PyTree, dict]]]
EvaluateFn = Callable[[PyTree, Mapping[str, PyTree]], dict[str, float]]
Log = Callable[[str], None]

__all__ = ["MergeSpec", "MergeData", "State", "init", "finetune_next", "finetune_group", "sequential",
           "iteration", "record", "individual", "one_shot_merge", "merge_step", "run",
           "one_shot", "task_key", "merge_key"]


def task_key(key: jax.Array, iteration: int, task_index: int) -> jax.Array:
    """The PRNG key of task ``task_index``'s finetune in iteration ``iteration``:
    ``fold_in(fold_in(fold_in(key, iteration), 0), task_index)``."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(key, iteration), 0), task_index)


def merge_key(key: jax.Array, iteration: int) -> jax.Array:
    """The PRNG key of the merge that ends iteration ``iteration`` (DARE needs one):
    ``fold_in(fold_in(key, iteration), 1)``."""
    return jax.random.fold_in(jax.random.fold_in(key, iteration), 1)


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
    return finetune_group(state, finetune_tasks=sequential(finetune), count=1, epochs=epochs,
                          key=key, log=log, name=name)


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
    closure = "finetune" if hasattr(finetune_tasks, "finetune") else "finetune_tasks"
    for task in group:
        state = _appended(state, task, out[task], epochs, start, log, closure=closure, name=name)
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
              finetune_tasks: FinetuneTasksFn | None = None, tasks_per_call: int | None = None,
              data: MergeData | None = None) -> tuple[State, dict]:
    """One ATM iteration: finetune every remaining task, merge, apply.

    ``data``: for an inner merge that looks at data (RegMean, Fisher, …), its inputs;
    the statistics are recomputed on this iteration's finetuned models and heads.

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
                                       key=merge_key(key, state.iteration),
                                       data=_with_heads(data, state))
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


def sequential(finetune: FinetuneFn) -> FinetuneTasksFn:
    """The "finetune these tasks" hook that finetunes them one after another.

    ``finetune_group(state, finetune_tasks=sequential(finetune), count=1, …)`` is
    :func:`finetune_next`: the same calls, keys and results.
    """
    def finetune_tasks(base, heads, epochs, keys):
        return {task: finetune(base, head, task, epochs, keys[task]) for task, head in heads.items()}
    finetune_tasks.finetune = finetune  # the closure named in its errors
    return finetune_tasks


def record(state: State, extra: Mapping | None = None, *, name: str, epochs_per_iteration: int,
           evaluate: EvaluateFn | None = None) -> dict:
    """The record of ``state`` after ``state.iteration`` iterations of ``name``.

    ``{"method", "iteration", "epochs_per_task", **extra}`` (``extra``: the
    diagnostics :func:`iteration` returned), plus ``"accuracy"`` ``{task: acc}`` and
    ``"average_accuracy"`` when ``evaluate`` is given (pass it when an evaluation is
    due: every iteration, or every ``eval_every``-th).

    Raises:
      TypeError: ``evaluate`` returned something other than one number per task.
    """
    k = state.iteration
    rec = {"method": name, "iteration": k, "epochs_per_task": k * epochs_per_iteration,
           **(extra or {})}
    if evaluate is not None:
        rec["accuracy"] = _evaluated(evaluate, state.base, state.heads, f"iteration {k}")
        rec["average_accuracy"] = float(np.mean(list(rec["accuracy"].values())))
    return rec


def evaluation_due(iteration: int, iterations: int, eval_every: int) -> bool:
    """Whether the base after ``iteration`` merges is evaluated: the start, every
    ``eval_every``-th iteration and the last."""
    return iteration % eval_every == 0 or iteration == iterations


def individual(state: State, evaluate: EvaluateFn) -> dict[str, float]:
    """Each finetuned model of ``state`` on its own task (the "individual" reference
    that normalized accuracy divides by)."""
    return {task: _evaluated(evaluate, params, {task: state.finetuned_heads[task]},
                             f"the individual model of {task!r}")[task]
            for task, params in zip(state.tasks, state.finetuned)}


def _with_heads(data: MergeData | None, state: State) -> MergeData | None:
    """``data`` with the state's finetuned heads, in the finetuned models' order."""
    if data is None:
        return None
    heads = state.finetuned_heads
    return dataclasses.replace(data, heads={t: heads[t] for t in state.tasks})


def one_shot_merge(state: State, spec: MergeSpec, *, key: jax.Array, evaluate: EvaluateFn,
                   alpha_grid: Sequence[float] | None = None,
                   validate: EvaluateFn | None = None, data: MergeData | None = None) -> dict:
    """One merge of a finished one-shot state: every task finetuned, merged once.

    With ``alpha_grid`` (and ``validate(params, heads) -> {task: accuracy}`` on a
    validation split), α is the grid value with the best average validation accuracy
    (`atm_jax.merge_spec.tuned_merge`; the spec's own α is ignored); else the spec's α.

    Returns:
      ``{"params", "diagnostics", "accuracy": {task: test acc}, "alpha"}`` and, when
      tuned, ``"validation": {α: average validation accuracy}``.
    """
    heads = state.finetuned_heads
    if alpha_grid is None:
        params, diagnostics = merge_step(state.base, state.finetuned, spec, key=key,
                                         data=_with_heads(data, state))
        out = {"params": params, "diagnostics": diagnostics, "alpha": spec.alpha}
    else:
        if validate is None:
            raise TypeError("alpha_grid needs validate(params, heads) -> {task: accuracy} on a "
                            "validation split.")
        chosen = tuned_merge(state.base, state.finetuned, spec, alpha_grid, key=key,
                             validate=lambda params: validate(params, heads),
                             data=_with_heads(data, state))
        out = {"params": chosen["params"], "diagnostics": chosen["diagnostics"],
               "alpha": chosen["alpha"], "validation": chosen["validation"]}
    out["accuracy"] = _evaluated(evaluate, out["params"], heads, "the one-shot merge")
    return out


def _replaced(replacements: Mapping[str, str]):
    """Keeps a function's signature exact: a removed keyword raises a TypeError
    that names what replaces it (``inspect.signature`` still shows the real one)."""
    def wrap(fn):
        @functools.wraps(fn)
        def checked(*args, **kwargs):
            gone = sorted(set(kwargs) & set(replacements))
            if gone:
                raise TypeError(f"{fn.__name__}() no longer takes {gone[0]}=: "
                                f"{replacements[gone[0]]}")
            return fn(*args, **kwargs)
        checked.__signature__ = inspect.signature(fn)
        return checked
    return wrap


_OWN_LOOP = ("drive your own loop over atm.init / atm.finetune_group / atm.iteration / "
             "atm.record, as atm_jax.runner does")
_RUN_REMOVED = {
    "callback": f"records come back in run's history; to write each as it comes, {_OWN_LOOP}.",
    "on_progress": f"to checkpoint after every finetune and merge, {_OWN_LOOP}.",
    "start": f"to continue a State, {_OWN_LOOP} from that state.",
    "finetune_tasks": "pass the hook to atm.iteration / atm.finetune_group in your own loop.",
    "tasks_per_call": "pass count= to atm.finetune_group in your own loop.",
    "log": f"print from your own loop ({_OWN_LOOP}).",
    "name": "atm.record(state, name=...) labels records in your own loop.",
}


@_replaced(_RUN_REMOVED)
def run(base: PyTree, heads: Mapping[str, PyTree], *, finetune: FinetuneFn,
        evaluate: EvaluateFn | None, iterations: int, epochs_per_iteration: int,
        merge: MergeSpec = MergeSpec(), key: jax.Array, carry_heads: bool = True,
        eval_every: int = 1) -> tuple[PyTree, dict[str, PyTree], list[dict]]:
    """The ATM loop: ``iterations`` × (finetune every task → merge → apply).

    Args:
      base: the starting parameters (pretrained for ATM; an existing merged model
        for post-hoc ATM).
      heads: ``{task: head}``, the tasks in order.
      finetune: ``(base, head, task, epochs, key) -> (params, head, metrics)``; it
        chooses the split (train for ATM, validation for valFT ATM). ``metrics`` is
        a dict; its ``"loss"`` (a number or a per-epoch list) is recorded.
      evaluate: ``(params, heads) -> {task: accuracy}``, run before the first
        iteration (iteration 0 = the starting base) and after every merge; None
        skips evaluation.
      iterations: K ≥ 1.
      epochs_per_iteration: e ≥ 1; the budget per task is ``K * e`` epochs.
      merge: the merge and its scale α.
      key: PRNG key; see the module docstring for how it is split.
      carry_heads: keep each task's finetuned head for the next iteration
        (trainable heads); with frozen heads this changes nothing.
      eval_every: run ``evaluate`` after every ``eval_every``-th iteration only (and
        always at the start and after the last); the other records carry no
        ``"accuracy"``. Nothing else changes: the finetunes and merges are the same.

    Returns:
      ``(final base, final heads, history)``; ``history[k]`` is the record after
      ``k`` iterations (:func:`record`; ``history[0]`` the starting point when
      ``evaluate`` is given).

    Raises:
      DivergedError: a finetune's loss became non-finite; the message names
        the method, task, iteration and step.
      TypeError, ValueError: ``finetune`` or ``evaluate`` returned something else
        than documented, e.g. params unlike the base or an accuracy that is not one
        number; raised as soon as that task's result comes back, naming the
        closure and the task. A keyword this function no longer takes (callback,
        on_progress, start, finetune_tasks, …) is a TypeError naming what replaces it.
    """
    _positive("iterations", iterations)
    _positive("epochs_per_iteration", epochs_per_iteration)
    _positive("eval_every", eval_every)
    if not isinstance(merge, MergeSpec):
        raise TypeError(f"merge={merge!r} must be an atm.MergeSpec, e.g. MergeSpec('mean').")
    state = init(base, heads)
    named = dict(name="atm", epochs_per_iteration=epochs_per_iteration)
    if evaluate is not None:
        state = dataclasses.replace(state, history=(record(state, evaluate=evaluate, **named),))
    while state.iteration < iterations:
        state, diagnostics = iteration(state, finetune=finetune, epochs=epochs_per_iteration,
                                       merge=merge, key=key, carry_heads=carry_heads)
        due = evaluate is not None and evaluation_due(state.iteration, iterations, eval_every)
        rec = record(state, diagnostics, evaluate=evaluate if due else None, **named)
        state = dataclasses.replace(state, history=(*state.history, rec))
    return state.base, dict(state.heads), list(state.history)


_ONE_SHOT_REMOVED = {
    "callback": "the records are in the returned dict; to write them as they come, drive "
                "atm.finetune_group and atm.one_shot_merge yourself, as atm_jax.runner does.",
    "on_progress": "to checkpoint after every finetune, drive atm.finetune_group and "
                   "atm.one_shot_merge yourself, as atm_jax.runner does.",
    "start": "to continue a State, call atm.finetune_group until every task is done, then "
             "atm.individual and atm.one_shot_merge.",
    "finetune_tasks": "pass the hook to atm.finetune_group in your own loop.",
    "tasks_per_call": "pass count= to atm.finetune_group in your own loop.",
    "log": "print from your own loop over atm.finetune_group and atm.one_shot_merge.",
}


@_replaced(_ONE_SHOT_REMOVED)
def one_shot(base: PyTree, heads: Mapping[str, PyTree], *, finetune: FinetuneFn,
             evaluate: EvaluateFn, epochs: int, merges: Mapping[str, MergeSpec],
             key: jax.Array, tune_alpha: Collection[str] = (),
             alpha_grid: Sequence[float] = (), validate: EvaluateFn | None = None) -> dict:
    """The one-shot baselines: finetune every task for the whole budget, merge once.

    Every task is finetuned from ``base`` for ``epochs`` (the same keys as ATM's
    first iteration), each finetuned model is evaluated on its own task (the
    "individual" reference), and then every merge in ``merges`` is applied once to
    the same task vectors (:func:`one_shot_merge`, with the key ``merge_key(key, 0)``).
    The merges named in ``tune_alpha`` take α from ``alpha_grid`` by the average
    accuracy ``validate(params, heads)`` gives (a validation split).

    Returns:
      ``{"individual": {task: acc}, "merged": {method: {task: acc}},
      "finetune": {task: metrics}, "merge": {method: diagnostics},
      "params": {method: merged params}, "alpha": {method: α}}``.
    """
    _positive("epochs", epochs)
    if not isinstance(merges, Mapping) or not all(isinstance(m, MergeSpec) for m in merges.values()):
        raise TypeError(f"merges must be a dict {{method name: atm.MergeSpec}}, got {merges!r}.")
    unknown = sorted(set(tune_alpha) - set(merges))
    if unknown:
        raise ValueError(f"tune_alpha names {unknown[0]!r}, which is not one of the merges "
                         f"{sorted(merges)}.")
    if tune_alpha and not alpha_grid:
        raise ValueError("tune_alpha needs a non-empty alpha_grid.")
    state = _finetune_remaining(init(base, heads), finetune=finetune, epochs=epochs, key=key,
                                log=None, name="one-shot", on_progress=None)
    out = {"individual": individual(state, evaluate), "merged": {},
           "finetune": dict(state.finetune_metrics), "merge": {}, "params": {}, "alpha": {}}
    for method, spec in merges.items():
        merged = one_shot_merge(state, spec, key=merge_key(key, 0), evaluate=evaluate,
                                alpha_grid=alpha_grid if method in tune_alpha else None,
                                validate=validate)
        out["merged"][method] = merged["accuracy"]
        out["merge"][method] = merged["diagnostics"]
        out["params"][method] = merged["params"]
        out["alpha"][method] = merged["alpha"]
    return out
