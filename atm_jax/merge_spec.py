"""How task vectors become the next base: `MergeSpec`, `merge_step`, and α on validation.

``merge_step(base, finetuned, spec)`` is ``base + alpha * merge(finetuned_t - base)``
over the leaves the spec selects; ATM's iterations and the one-shot baselines both
end in it (`atm_jax.atm`). `tuned_merge` is the fair baseline of Ilharco et al. and
Yadav et al.: the scale α picked from a grid by the average validation accuracy,
the test accuracy then measured once, at that α.

Which leaves merge: only the ``params`` collection when ``base`` is a Flax
variables dict (``{"params": …, "batch_stats": …}``), or only ``nnx.Param`` in an
``nnx.State``: running statistics are not task-vector material (a mean of
variances scaled by α can go negative), and they keep the base's values.
``MergeSpec(collections=(…))`` widens this on purpose. Inside the merged
collection, ``include`` / ``exclude`` regexes choose leaves.
"""

from __future__ import annotations

import dataclasses
import functools
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from atm_jax import merge as merge_lib
from atm_jax import tree as tree_lib

PyTree = Any

__all__ = ["MergeSpec", "MergeData", "merge_delta", "merge_step", "select_alpha", "tuned_merge"]


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


@dataclasses.dataclass(frozen=True)
class MergeData:
    """What the merges that look at data see (`atm_jax.merge.info(name).uses`).

    Attributes:
      apply_fn: ``(backbone, inputs [B, ...]) -> features [B, F]`` on a whole finetuned
        tree (the one `merge_step` gets); each task's head maps features to logits.
      heads: ``{task: head}`` in the order of the finetuned models (the ATM loop fills
        it with each iteration's finetuned heads).
      inputs: ``{task: [N, ...]}`` examples for the statistics (RegMean's Grams, the
        Fisher, RegMean++'s forward passes).
      labels: ``{task: [N]}`` for the empirical Fisher; None samples the labels from
        each model (the true Fisher, keyed by the merge key).
      unlabeled: ``{task: [M, ...]}`` AdaMerging's inputs (the paper: the test inputs).
      token_mask: ``inputs -> [B, S]`` real-token mask (text), or None.
      batch_size: rows per forward pass while capturing.
    """
    apply_fn: Callable
    inputs: Mapping[str, Any]
    heads: Mapping[str, Any] | None = None
    labels: Mapping[str, Any] | None = None
    unlabeled: Mapping[str, Any] | None = None
    token_mask: Callable | None = None
    batch_size: int = 64

    def merge_arguments(self, info, finetuned: Sequence[PyTree], selected_base: PyTree,
                        rest: PyTree, predicate, key) -> tuple[dict, dict]:
        """The data keyword arguments of merge ``info`` and what they used (for the records)."""
        from atm_jax import capture

        if self.heads is None or len(self.heads) != len(finetuned):
            raise ValueError(f"MergeData.heads must name the {len(finetuned)} tasks in the "
                             f"finetuned models' order (got {None if self.heads is None else list(self.heads)}).")
        tasks = list(self.heads)
        field = "unlabeled" if info.name == "adamerging" else "inputs"
        given = getattr(self, field)
        missing = [t for t in tasks if given is None or t not in given]
        if missing:
            raise ValueError(f"merge {info.name!r} needs MergeData.{field} for task "
                             f"{missing[0]!r}.")
        used = {"examples_per_task": {t: int(len(self.inputs[t])) for t in tasks}}
        start = time.perf_counter()
        if "grams" in info.data:
            kwargs = {"grams": [capture.input_grams(self.apply_fn, f, self.inputs[t],
                                                    batch_size=self.batch_size,
                                                    token_mask=self.token_mask)
                                for t, f in zip(tasks, finetuned)]}
        elif "fishers" in info.data:
            fishers = []
            logits = _head_logits(self.apply_fn)
            for i, (t, f) in enumerate(zip(tasks, finetuned)):
                labels = None if self.labels is None else self.labels[t]
                fishers.append(tree_lib.split(capture.diagonal_fisher(
                    logits, f, self.inputs[t], labels, extra=self.heads[t],
                    key=None if labels is not None else jax.random.fold_in(key, i)), predicate)[0])
            kwargs = {"fishers": fishers}
            used["fisher_labels"] = "data" if self.labels is not None else "sampled"
        else:
            def joined(selected, x):
                return self.apply_fn(tree_lib.join(selected, rest), x)
            kwargs = {"base": selected_base, "apply_fn": joined}
            if info.name == "adamerging":
                kwargs.update(inputs=[self.unlabeled[t] for t in tasks],
                              heads=[self.heads[t] for t in tasks])
                used = {"unlabeled_per_task": {t: int(len(self.unlabeled[t])) for t in tasks}}
            else:
                kwargs.update(inputs=[self.inputs[t] for t in tasks])
            if "token_mask" in info.data:
                kwargs["token_mask"] = self.token_mask
            return kwargs, used
        used["statistics_seconds"] = round(time.perf_counter() - start, 4)
        return kwargs, used


@functools.lru_cache(maxsize=32)
def _head_logits(apply_fn: Callable) -> Callable:
    """``(backbone, inputs, head) -> logits``, one function per ``apply_fn`` (so the
    Fisher's compiled step is reused across tasks and iterations)."""
    from atm_jax.models.heads import apply_head

    def logits(backbone, inputs, head):
        return apply_head(head, apply_fn(backbone, inputs))
    return logits


def _merge_predicate(base: PyTree, spec: MergeSpec) -> Callable[[str], bool]:
    """Which leaf paths merge: the spec's regexes, inside the merged collections
    (`tree.split` applies the collection rule to Flax variables dicts)."""
    if isinstance(base, Mapping) and "params" in base:
        unknown = set(spec.collections) - set(base)
        if unknown:
            raise ValueError(f"MergeSpec collections {sorted(unknown)} are not in the base, "
                             f"which has {sorted(base)}.")
    return tree_lib.path_filter(spec.include, spec.exclude, collections=spec.collections)


def merge_delta(base: PyTree, finetuned: Sequence[PyTree], spec: MergeSpec, *,
                key: jax.Array, data: MergeData | None = None
                ) -> tuple[PyTree, PyTree, PyTree, dict]:
    """The merged delta before it is scaled: ``(selected base, rest, delta, diagnostics)``.

    ``selected base`` is the part of ``base`` that merges (`tree.split` by the spec),
    ``rest`` the part that keeps the base's values; `merge_step` applies the delta.
    ``data``: what a merge that looks at data needs (`MergeData`); its statistics are
    computed here, on ``finetuned``, every call.
    """
    start = time.perf_counter()
    predicate = _merge_predicate(base, spec)
    selected_base, rest = tree_lib.split(base, predicate)
    stacked = tree_lib.stacked_task_vectors([tree_lib.split(f, predicate)[0] for f in finetuned],
                                            selected_base)
    info = merge_lib.info(spec.name)
    # The base tells a stack from a list of trees whatever container tops the params
    # (per-layer lists), and checks every leaf's task axis.
    kwargs = dict(spec.kwargs)
    if "like" in info.options:
        kwargs["like"] = selected_base
    if info.needs_base:  # SLERP interpolates weights
        kwargs["base"] = selected_base
    used, report = None, {}
    if info.uses != "nothing":
        if data is None:
            raise ValueError(f"merge {spec.name!r} looks at data ({info.uses}: "
                             f"{', '.join(info.data)}): pass merge_step(..., data=MergeData(apply_fn"
                             "=..., inputs={task: examples}, heads={task: head}, ...)); the runner "
                             "builds it from config.merge_data.")
        extra, used = data.merge_arguments(info, finetuned, selected_base, rest, predicate, key)
        kwargs.update(extra)
    with warnings.catch_warnings():
        if set(spec.collections) - {"params"}:  # asked for on purpose: no warning
            warnings.simplefilter("ignore", tree_lib.StateMergeWarning)
        stochastic = info.stochastic or info.uses == "model"
        delta = info.fn(stacked, key=key, **kwargs) if stochastic else info.fn(stacked, **kwargs)
    if hasattr(delta, "delta"):  # a learned merge: its coefficients and curve go on record
        report = {"coefficients": np.round(np.asarray(delta.coefficients), 5).tolist(),
                  "entropy": [round(v, 6) for v in delta.entropy]}
        delta = delta.delta
    delta = jax.block_until_ready(delta)
    seconds = time.perf_counter() - start
    gram = tree_lib.gram_matrix(stacked, like=selected_base)
    diagnostics = {
        "task_vector_norm": np.sqrt(np.diagonal(np.asarray(gram))).tolist(),
        "cosine": np.asarray(tree_lib.cosine_from_gram(gram)).round(6).tolist(),
        "delta_norm": float(tree_lib.global_norm(delta)),
        "merge_seconds": round(seconds, 4),
    }
    if used is not None:
        diagnostics["data"] = used
    diagnostics.update(report)
    return selected_base, rest, delta, diagnostics


def merge_step(base: PyTree, finetuned: Sequence[PyTree], spec: MergeSpec, *,
               key: jax.Array, data: MergeData | None = None) -> tuple[PyTree, dict]:
    """``base + alpha * merge(finetuned_t - base)`` and diagnostics.

    Returns:
      The new base and ``{"task_vector_norm": [T], "cosine": [T, T], "delta_norm",
      "merge_seconds"}`` (plain Python numbers, ready for JSON).
    """
    selected_base, rest, delta, diagnostics = merge_delta(base, finetuned, spec, key=key,
                                                          data=data)
    return tree_lib.join(tree_lib.apply(selected_base, delta, spec.alpha), rest), diagnostics


def select_alpha(validation: Mapping[float, float]) -> float:
    """The α with the best validation score; a tie goes to the α closest to 1 (the
    paper's default), then to the smaller α.

    Args:
      validation: ``{α: average validation accuracy}``.

    Raises:
      ValueError: an empty grid or a non-finite score (names the α).
    """
    if not validation:
        raise ValueError("select_alpha got no α: config.alpha_grid is empty.")
    for alpha, score in validation.items():
        if not np.isfinite(score):
            raise ValueError(f"the validation score of α={alpha} is {score}; cannot choose α.")
    best = max(validation.values())
    return min((a for a, s in validation.items() if s == best), key=lambda a: (abs(a - 1.0), a))


def tuned_merge(base: PyTree, finetuned: Sequence[PyTree], spec: MergeSpec,
                grid: Sequence[float], *, key, validate: Callable[[PyTree], Mapping[str, float]],
                data: MergeData | None = None) -> dict:
    """Merges ``finetuned`` once per α of ``grid`` and keeps the best on validation.

    Args:
      spec: the merge (its own α is ignored).
      key: the merge key (DARE: the same masks for every α).
      validate: ``params -> {task: validation accuracy}``.

    Returns:
      ``{"alpha", "params", "diagnostics", "validation": {α: average accuracy}}``.
    """
    # One merge, scaled by each α: the delta does not depend on α (DARE's masks come
    # from the same key), so merging once gives the same params as merging per α.
    selected_base, rest, delta, diagnostics = merge_delta(base, finetuned, spec, key=key,
                                                          data=data)
    scores, merged = {}, {}
    for alpha in grid:
        params = tree_lib.join(tree_lib.apply(selected_base, delta, float(alpha)), rest)
        acc = validate(params)
        scores[float(alpha)] = float(np.mean(list(acc.values())))
        merged[float(alpha)] = (params, diagnostics)
        best = select_alpha(scores)
        merged = {best: merged[best]}  # hold two merged models at most
    alpha = select_alpha(scores)
    params, diagnostics = merged[alpha]
    return {"alpha": alpha, "params": params, "diagnostics": diagnostics, "validation": scores}
