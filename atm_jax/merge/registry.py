"""The merge registry: every operator by name, with its defaults and its reference.

``merge.get(name)`` returns the function ``fn(stacked, *, key=None, **hparams)``;
``merge.info(name)`` its :class:`MergeMethod` (defaults read from the signature,
the paper it follows, whether it needs a PRNG key or the base weights).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import jax

from atm_jax import checks

PyTree = Any

__all__ = ["MergeMethod", "register", "names", "info", "get", "OPTIONS", "USES"]

# Keyword arguments that are not hyperparameters: how to run, not what to compute.
OPTIONS = ("method", "check_finite", "like")


@dataclasses.dataclass(frozen=True)
class MergeMethod:
    """A registered merge operator with its defaults and where it comes from.

    ``needs_base``: the operator also takes the base weights as ``base=`` (SLERP
    interpolates weights, not deltas); `atm_jax.merge_spec.merge_step` passes them.
    ``validate``: checks the operator's own hyperparameters (beyond
    `atm_jax.checks.check_hparams`, which knows the shared ones).
    ``uses``: what it looks at beyond the task vectors: ``"nothing"`` (data-free),
    ``"statistics"`` (per-task statistics of a little data, passed as the keyword
    arguments named by ``data``: RegMean's ``grams``, Fisher's ``fishers``) or
    ``"model"`` (the model and its inputs: ``base``, ``apply_fn``, ``inputs``, … in
    ``data``). `atm_jax.merge_spec.merge_step` computes them from a
    `atm_jax.merge_spec.MergeData`.
    """
    name: str
    fn: Callable[..., PyTree]
    defaults: dict
    reference: str
    stochastic: bool = False
    compat: bool = False
    options: tuple[str, ...] = ()  # keyword arguments beyond the hyperparameters
    needs_base: bool = False
    validate: Callable[..., None] | None = None
    uses: str = "nothing"
    data: tuple[str, ...] = ()

    def __call__(self, stacked: PyTree, *, key: jax.Array | None = None, **hparams) -> PyTree:
        return self.fn(stacked, key=key, **hparams)

    def check(self, **hparams) -> None:
        """Validates hyperparameters without merging anything (configs call this)."""
        unknown = sorted(set(hparams) - set(self.defaults) - set(self.options))
        if unknown:
            raise ValueError(f"merge {self.name!r} has no hyperparameter {unknown[0]!r}; "
                             f"it takes {sorted(self.defaults) + sorted(self.options)}.")
        given = {**self.defaults, **hparams}
        if self.validate is not None:
            self.validate(**{k: v for k, v in given.items() if k in self.defaults})
        else:
            checks.check_hparams(**given)


_REGISTRY: dict[str, MergeMethod] = {}


USES = ("nothing", "statistics", "model")


def register(name: str, *, reference: str, stochastic: bool = False, compat: bool = False,
             needs_base: bool = False, validate: Callable[..., None] | None = None,
             uses: str = "nothing", data: tuple[str, ...] = ()):
    """Decorator: registers ``fn`` under ``name``; defaults come from its signature
    (``data``: the keyword arguments that carry data, not hyperparameters)."""
    if uses not in USES or (uses == "nothing") != (not data):
        raise ValueError(f"merge {name!r}: uses={uses!r} must be one of {USES}, with data "
                         f"arguments exactly when it is not 'nothing' (got {data!r}).")

    def wrap(fn):
        params = inspect.signature(fn).parameters
        keyword = [k for k, p in params.items() if p.kind is p.KEYWORD_ONLY and k != "key"]
        extra = (("base",) if needs_base else ()) + tuple(data)
        options = tuple(k for k in keyword if k in OPTIONS + extra)
        defaults = {k: params[k].default for k in keyword if k not in options}
        _REGISTRY[name] = MergeMethod(name, fn, defaults, reference, stochastic, compat, options,
                                      needs_base, validate, uses, tuple(data))
        return fn
    return wrap


def names(*, include_compat: bool = True) -> tuple[str, ...]:
    """Registered merge names."""
    return tuple(n for n, m in _REGISTRY.items() if include_compat or not m.compat)


def info(name: str) -> MergeMethod:
    """The registry entry for ``name`` (defaults, reference, stochastic)."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"Unknown merge {name!r}; registered merges: {', '.join(_REGISTRY)}.") from None


def get(name: str) -> Callable[..., PyTree]:
    """The merge function ``fn(stacked, *, key=None, **hparams)`` registered as ``name``."""
    return info(name).fn
