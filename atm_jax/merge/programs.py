"""What each sparsify x consensus merge computes, as data: a :class:`Program`.

The registry merges of `atm_jax.merge.sparsify` (mean, sum, TIES, Breadcrumbs,
DARE, DARE-TIES and the ATM authors' compatibility modes) differ only in how each
task is sparsified and how the tasks are combined. ``program(name, **hparams)``
turns a merge's hyperparameters into that description: the in-memory merges run
it on a whole tree, `atm_jax.merge.streamed` on a model read tensor by tensor.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from fractions import Fraction
from functools import partial

from atm_jax import checks

__all__ = ["Program", "program", "PROGRAM_NAMES"]


def _exact(fraction: float, n: int) -> Fraction:
    """``fraction * n`` in exact arithmetic, reading ``fraction`` as the decimal the
    user typed (float ``0.993 * 1000`` is 993.0000000000001, whose ceiling is off by one)."""
    return Fraction(repr(float(fraction))) * n


def _ceil(fraction: float, n: int) -> int:
    return math.ceil(_exact(fraction, n))


def _floor(fraction: float, n: int) -> int:
    return math.floor(_exact(fraction, n))


@dataclasses.dataclass(frozen=True)
class Program:
    """What one sparsify x consensus merge computes, built from its hyperparameters.

    ``magnitude_ranks`` / ``band_ranks``: ``n -> ranks`` (1-based, from the top) of
    the thresholds over ``n`` entries, or None; ``scope``: where the ``n`` entries
    come from (all merged leaves or one); ``joint``: all tasks pooled into one
    vector; ``p``: DARE's drop probability, or None; ``elect``: TIES' sign election
    and disjoint merge; ``method``: the selection backend (`atm_jax.select`).
    """
    magnitude_ranks: Callable[[int], list[int]] | None = None
    band_ranks: Callable[[int], list[int]] | None = None
    scope: str = "model"
    joint: bool = False
    p: float | None = None
    elect: bool = False
    aggregate: str = "mean"
    method: str = "auto"

    @property
    def ranks(self) -> Callable[[int], list[int]] | None:
        return self.magnitude_ranks or self.band_ranks

    @property
    def whole_model(self) -> bool:
        """True if the thresholds are taken over all merged leaves at once."""
        return self.ranks is not None and self.scope == "model"

    def static(self) -> dict:
        return dict(band=self.band_ranks is not None, magnitude=self.magnitude_ranks is not None,
                    elect=self.elect, aggregate=self.aggregate, dropout=self.p is not None)


def _top_fraction(density: float):
    return lambda n: [min(n, max(1, _ceil(density, n)))]


def _band(beta: float, gamma: float):
    # Drop floor(beta*n) smallest and n - ceil(gamma*n) largest: keep descending
    # ranks [n - ceil(gamma*n) + 1, n - floor(beta*n)]; never empty when beta < gamma.
    return lambda n: [n - _ceil(gamma, n) + 1, n - _floor(beta, n)]


def _magnitude(density, scope, aggregate, method="auto", *, elect=True, joint=False):
    checks.check_hparams(density=density, scope=scope, aggregate=aggregate, method=method)
    return Program(magnitude_ranks=_top_fraction(density), scope=scope, joint=joint, elect=elect,
                   aggregate=aggregate, method=method)


def _banded(beta, gamma, scope, aggregate, method="auto"):
    checks.check_hparams(beta=beta, gamma=gamma, scope=scope, aggregate=aggregate, method=method)
    return Program(band_ranks=_band(beta, gamma), scope=scope, aggregate=aggregate, method=method)


def _dropout(p, aggregate, *, elect):
    checks.check_hparams(p=p, aggregate=aggregate)
    return Program(p=p, elect=elect, aggregate=aggregate)


# The registry merges of atm_jax.merge.sparsify, each as its Program from the hyperparameters.
_PROGRAMS = {
    "mean": lambda: Program(aggregate="mean"),
    "sum": lambda: Program(aggregate="sum"),
    "ties": _magnitude,
    "breadcrumbs": _banded,
    "dare": partial(_dropout, elect=False),
    "dare_ties": partial(_dropout, elect=True),
    "ties_atm_code": partial(_magnitude, scope="model", aggregate="mean", elect=False, joint=True),
    "breadcrumbs_atm_code": partial(_banded, scope="model", aggregate="mean"),
}
PROGRAM_NAMES = tuple(_PROGRAMS)


def program(name: str, **hparams) -> Program:
    """The :class:`Program` the registry merge ``name`` runs with these hyperparameters
    (all of them, as keywords; checked as the merge checks them)."""
    if name not in _PROGRAMS:
        raise ValueError(f"{name!r} is not a sparsify x consensus merge; those are "
                         f"{', '.join(PROGRAM_NAMES)}.")
    return _PROGRAMS[name](**hparams)
