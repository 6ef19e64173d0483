"""Merge operators: many task vectors in, one delta out.

Every operator takes a *stacked* pytree (leaves ``[T, *shape]``, see
``atm_jax.tree.stack``) and returns one delta pytree of the unstacked structure;
the caller applies ``base + alpha * delta`` (``atm_jax.tree.apply``). ``None``
leaves (from ``tree.split``) are skipped, so heads stay out by construction.
``merge.get(name)`` / ``merge.info(name)`` / ``merge.names()`` read the registry.

One module per family, each with its exact semantics in its docstring:

* `atm_jax.merge.sparsify`: elementwise sparsify × consensus: ``mean``, ``sum``
  (``task_arithmetic``), ``ties``, ``breadcrumbs``, ``dare``, ``dare_ties``, and the
  ATM authors' compatibility modes.
* `atm_jax.merge.masks`: ``consensus`` (TALL masks) and ``della`` (magnitude-ranked drop).
* `atm_jax.merge.spectral`: per-layer SVD merges on the matrix view of each leaf
  (`atm_jax.merge.matrix`): ``tsv`` (TSV-M), ``iso_c``, ``iso_cts``.
* `atm_jax.merge.learned`: ``wudi``, a per-layer objective solved by Adam.
* `atm_jax.merge.interpolation`: ``slerp`` and ``model_stock``.
* `atm_jax.merge.statistics`: merges weighted by statistics of a little data
  (`atm_jax.capture`): ``regmean``, ``regmean_pp`` (runs the model) and ``fisher``.
* `atm_jax.merge.adaptive`: ``adamerging``, coefficients learned on unlabeled inputs.

``merge.info(name).uses`` says what a merge looks at beyond the task vectors:
``"nothing"``, ``"statistics"`` (``grams=`` / ``fishers=``) or ``"model"`` (``base=``,
``apply_fn=``, ``inputs=``, …: ``info(name).data`` lists them); `merge_spec.merge_step`
computes them from a `merge_spec.MergeData`.

Shared rules (each family's docstring has the details): hyperparameters are static
Python values; ``check_finite`` (True, False or ``"checkify"``) makes a NaN/Inf task
vector raise eagerly and come out NaN under ``jax.jit``; ``like=`` tells a stack
from a list of trees; errors name the leaf path. No operator takes ``alpha``: that
is `atm_jax.merge_spec.MergeSpec`'s scale.
"""

from atm_jax import checks
# Registration order is the order of merge.names(): the elementwise family first.
from atm_jax.merge import sparsify  # isort: skip
from atm_jax.merge import masks  # isort: skip
from atm_jax.merge import spectral  # isort: skip
from atm_jax.merge import learned  # isort: skip
from atm_jax.merge import interpolation, matrix  # isort: skip
from atm_jax.merge import statistics  # isort: skip
from atm_jax.merge import adaptive  # isort: skip
from atm_jax.merge.adaptive import AdaMergingResult, adamerging
from atm_jax.merge.statistics import fisher, regmean, regmean_pp
from atm_jax.merge.interpolation import model_stock, slerp
from atm_jax.merge.learned import wudi
from atm_jax.merge.registry import MergeMethod, get, info, names, register
from atm_jax.merge.masks import consensus, della
from atm_jax.merge.sparsify import (breadcrumbs, breadcrumbs_atm_code, dare, dare_ties, mean,
                                    task_arithmetic, ties, ties_atm_code)
from atm_jax.merge.sparsify import sum  # noqa: A004 - the registry name; not in __all__
from atm_jax.merge.spectral import iso_c, iso_cts, tsv

# Hyperparameter validation lives in atm_jax.checks (shared with the configs).
SCOPES, AGGREGATES = checks.SCOPES, checks.AGGREGATES
check_hparams = checks.check_hparams

__all__ = [
    "MergeMethod", "register", "get", "info", "names", "check_hparams",
    "mean", "task_arithmetic", "ties", "breadcrumbs", "dare", "dare_ties", "della", "consensus",
    "ties_atm_code", "breadcrumbs_atm_code", "tsv", "iso_c", "iso_cts", "wudi", "slerp",
    "model_stock", "regmean", "regmean_pp", "fisher", "adamerging", "AdaMergingResult",
    "matrix", "masks", "sparsify", "spectral", "learned", "interpolation", "statistics",
    "adaptive",
]
