"""Fair baselines: a one-shot merge with α chosen on the validation split.

As Ilharco et al. (task arithmetic) and Yadav et al. (TIES) do, the scale α of the
merged task vector is picked from a grid by the average validation accuracy; the
test accuracy is then measured once, at the chosen α. The paper's protocol (α = 1,
mean aggregation) stays as its own rows; these are extra rows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from atm_jax import atm as atm_lib

__all__ = ["select_alpha", "tuned_merge"]

PyTree = Any


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


def tuned_merge(base: PyTree, finetuned: Sequence[PyTree], spec: atm_lib.MergeSpec,
                grid: Sequence[float], *, key, validate: Callable[[PyTree], Mapping[str, float]]
                ) -> dict:
    """Merges ``finetuned`` once per α of ``grid`` and keeps the best on validation.

    Args:
      spec: the merge (its own α is ignored).
      key: the merge key (DARE: the same masks for every α).
      validate: ``params -> {task: validation accuracy}``.

    Returns:
      ``{"alpha", "params", "diagnostics", "validation": {α: average accuracy}}``.
    """
    scores, merged = {}, {}
    for alpha in grid:
        params, diagnostics = atm_lib.merge_step(
            base, finetuned, dataclasses.replace(spec, alpha=float(alpha)), key=key)
        acc = validate(params)
        scores[float(alpha)] = float(np.mean(list(acc.values())))
        merged[float(alpha)] = (params, diagnostics)
        best = select_alpha(scores)
        merged = {best: merged[best]}  # hold two merged models at most
    alpha = select_alpha(scores)
    params, diagnostics = merged[alpha]
    return {"alpha": alpha, "params": params, "diagnostics": diagnostics, "validation": scores}
