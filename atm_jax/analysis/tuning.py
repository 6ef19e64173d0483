"""Fair baselines: a one-shot merge with α chosen on the validation split.

As Ilharco et al. (task arithmetic) and Yadav et al. (TIES) do, the scale α of the
merged task vector is picked from a grid by the average validation accuracy; the
test accuracy is then measured once, at the chosen α. The paper's protocol (α = 1,
mean aggregation) stays as its own rows; these are extra rows.
"""

from __future__ import annotations

# The selection lives beside merge_step, where the one-shot path uses it.
from atm_jax.merge_spec import select_alpha, tuned_merge

__all__ = ["select_alpha", "tuned_merge"]
