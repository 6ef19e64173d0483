"""Merge operators: many task vectors in, one delta out.

Every operator takes a *stacked* pytree (leaves ``[T, *shape]``, see
``atm_jax.tree.stack``) and returns one delta pytree of the unstacked structure;
the caller applies ``base + alpha * delta`` (``atm_jax.tree.apply``). ``None``
leaves (from ``tree.split``) are skipped, so heads stay out by construction.

Operators are pure functions built from jitted pieces: an exact magnitude
threshold (``atm_jax.select``: host introselect on CPU, jitted bisection or
``lax.top_k`` elsewhere) and one jitted program that applies every mask and the
consensus over all leaves at once, with the task axis unrolled (on CPU XLA reduces
over a leading axis ~30x slower than it adds T slices). Following mergekit, TIES,
Breadcrumbs and DARE are one generalized method, *sparsify x consensus*:

==============  ==========================================  ========================
name            sparsify (per task)                          consensus
==============  ==========================================  ========================
mean / sum      none                                         mean / sum over tasks
ties            keep top ``density`` by |tau|                sign election, disjoint mean
breadcrumbs     keep |tau| in the [beta, gamma] percentiles  mean (or sum) over tasks
dare            drop w.p. ``p``, rescale by 1/(1-p)           mean (or sum) over tasks
dare_ties       drop w.p. ``p``, rescale by 1/(1-p)           sign election, disjoint mean
==============  ==========================================  ========================

Exact semantics (shared/REFERENCE.md §3):

* **Trim** (TIES): ``k = ceil(density * n)`` where ``n`` is the number of entries of
  one task vector in the scope: all merged leaves together (``scope="model"``, the
  official TIES default) or one tensor (``scope="leaf"``, as mergekit). Keep
  ``|tau| >= v_k``, ``v_k`` the exact k-th largest magnitude; entries tied with
  ``v_k`` are all kept (as the official ``kthvalue`` mask does).
* **Elect**: ``s = sign(sum_t trimmed_t)`` per entry ("mass"). Where the mass is
  exactly 0 the entry takes the majority sign ``sign(sum of s over all merged
  entries)``, and where that is 0 too, the negative side (both as the official
  code's ``resolve_zero_signs`` followed by ``where(s > 0, x > 0, x < 0)``).
* **Disjoint merge**: per entry, over the tasks whose trimmed value is non-zero with
  sign ``s``: their mean (``aggregate="mean"``, official) or sum (``"sum"``, as
  FusionBench). No such task: 0.
* **Breadcrumbs**: per task and scope (default per tensor, as the official code),
  with ``n`` entries sorted by magnitude, drop the ``floor(beta*n)`` smallest and the
  ``n - ceil(gamma*n)`` largest; the band's boundary values are found exactly and
  entries tied with them are kept. Defaults 0.85 / 0.993 keep ≈14%. Then the
  plain mean (or sum) over tasks, zeros included.
* **DARE**: each entry of each task is kept with probability ``1 - p`` (explicit
  PRNG ``key``; one independent stream per leaf) and rescaled by ``1/(1-p)``, so the
  expectation equals the input; then the plain mean (``dare``) or TIES' sign
  election and disjoint mean without trimming (``dare_ties``).

Compatibility modes reproduce what the ATM authors' code ran (REFERENCE.md §3); use
them only to compare with their numbers:

* ``ties_atm_code``: one threshold over all T task vectors pooled, keep the top
  ``density`` (0.15), no sign election, plain mean with zeros included.
* ``breadcrumbs_atm_code``: per task over the whole model, keep the band between
  the 15th and 99.3rd percentile (β read inverted: ≈84% kept), plain mean.
"""

from __future__ import annotations

import builtins
import dataclasses
import math
from fractions import Fraction
from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from atm_jax import select
from atm_jax import tree as tree_lib

PyTree = Any

__all__ = [
    "MergeMethod", "register", "get", "info", "names",
    "mean", "sum", "ties", "breadcrumbs", "dare", "dare_ties",
    "ties_atm_code", "breadcrumbs_atm_code",
]

SCOPES = ("model", "leaf")
AGGREGATES = ("mean", "sum")


# ----------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MergeMethod:
    """A registered merge operator with its defaults and where it comes from."""
    name: str
    fn: Callable[..., PyTree]
    defaults: dict
    reference: str
    stochastic: bool = False
    compat: bool = False
    options: tuple[str, ...] = ()  # keyword arguments beyond the hyperparameters

    def __call__(self, stacked: PyTree, *, key: jax.Array | None = None, **hparams) -> PyTree:
        return self.fn(stacked, key=key, **hparams)

    def check(self, **hparams) -> None:
        """Validates hyperparameters without merging anything (configs call this)."""
        unknown = sorted(set(hparams) - set(self.defaults) - set(self.options))
        if unknown:
            raise ValueError(f"merge {self.name!r} has no hyperparameter {unknown[0]!r}; "
                             f"it takes {sorted(self.defaults) + sorted(self.options)}.")
        check_hparams(**{**self.defaults, **hparams})


_REGISTRY: dict[str, MergeMethod] = {}


def register(name: str, *, reference: str, stochastic: bool = False, compat: bool = False):
    """Decorator: registers ``fn`` under ``name``; defaults come from its signature."""
    def wrap(fn):
        import inspect
        params = inspect.signature(fn).parameters
        keyword = [k for k, p in params.items() if p.kind is p.KEYWORD_ONLY and k != "key"]
        options = tuple(k for k in keyword if k in ("method", "check_finite"))
        defaults = {k: params[k].default for k in keyword if k not in options}
        _REGISTRY[name] = MergeMethod(name, fn, defaults, reference, stochastic, compat, options)
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


# ----------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------


def _leaves(stacked: PyTree) -> tuple[list[jax.Array], Any, list[str]]:
    with_path, treedef = jax.tree_util.tree_flatten_with_path(stacked)
    paths = [tree_lib.path_str(p) for p, _ in with_path]
    leaves = [x for _, x in with_path]
    if not leaves:
        raise ValueError("Nothing to merge: the stacked task vectors have no leaves "
                         "(an empty tree, or a path filter that excludes everything).")
    num_tasks = None
    for path, x in zip(paths, leaves):
        if not hasattr(x, "shape") or len(x.shape) == 0:
            raise ValueError(f"Leaf {path!r} is a scalar; stacked task vectors need a leading "
                             "task axis [T, ...]. Build them with atm_jax.tree.stack.")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"Leaf {path!r} has dtype {x.dtype}; only floating leaves can be merged. "
                             "Exclude it with the path filter (atm_jax.tree.split).")
        if num_tasks is None:
            num_tasks, first = x.shape[0], path
        elif x.shape[0] != num_tasks:
            raise ValueError(f"Leaf {path!r} stacks {x.shape[0]} tasks but {first!r} stacks {num_tasks}; "
                             "every leaf needs the same leading task axis.")
    if num_tasks == 0:
        raise ValueError("Cannot merge an empty list of task vectors (task axis of size 0).")
    return leaves, treedef, paths


def _check_range(name: str, value, lo, hi, *, lo_open: bool, hi_open: bool, hint: str = ""):
    ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok or not np.isfinite(value):
        interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise ValueError(f"{name}={value!r} is outside {interval}.{(' ' + hint) if hint else ''}")


def _check_choice(name: str, value, choices):
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {choices}.")


def _require_key(name: str, key):
    if key is None:
        raise ValueError(f"merge {name!r} is stochastic: pass an explicit PRNG key, "
                         "e.g. key=jax.random.key(0).")


def check_hparams(**hp) -> None:
    """Validates merge hyperparameters by name; raises ValueError naming value and range."""
    if "density" in hp:
        _check_range("density", hp["density"], 0, 1, lo_open=True, hi_open=False,
                     hint="It is the fraction of entries kept per task (TIES default 0.2).")
    if "p" in hp:
        _check_range("p", hp["p"], 0, 1, lo_open=False, hi_open=True,
                     hint="It is the drop probability (DARE paper: 0.9).")
    if "beta" in hp:
        _check_range("beta", hp["beta"], 0, 1, lo_open=False, hi_open=True)
    if "gamma" in hp:
        _check_range("gamma", hp["gamma"], 0, 1, lo_open=True, hi_open=False)
    if "beta" in hp and "gamma" in hp:
        beta, gamma = hp["beta"], hp["gamma"]
        if not beta < gamma:
            raise ValueError(f"beta={beta!r} must be smaller than gamma={gamma!r}: Breadcrumbs keeps "
                             "the magnitudes between the beta and gamma percentiles (paper: 0.85, 0.993).")
    if "scope" in hp:
        _check_choice("scope", hp["scope"], SCOPES)
    if "aggregate" in hp:
        _check_choice("aggregate", hp["aggregate"], AGGREGATES)
    if "method" in hp:
        _check_choice("method", hp["method"], select.METHODS)


def _exact(fraction: float, n: int) -> Fraction:
    """``fraction * n`` in exact arithmetic, reading ``fraction`` as the decimal the
    user typed (float ``0.993 * 1000`` is 993.0000000000001, whose ceiling is off by one)."""
    return Fraction(repr(float(fraction))) * n


def _ceil(fraction: float, n: int) -> int:
    return math.ceil(_exact(fraction, n))


def _floor(fraction: float, n: int) -> int:
    return math.floor(_exact(fraction, n))


def _size(x) -> int:
    return int(np.prod(x.shape[1:], dtype=np.int64))


# ----------------------------------------------------------------------------
# The generalized merge: sparsify x consensus, one jitted program
# ----------------------------------------------------------------------------


def _sparsify(x, lo, hi, key, p, *, band: bool, magnitude: bool):
    """Masked task slices of one leaf: a list of T arrays."""
    out = []
    for t in range(x.shape[0]):
        xt = x[t]
        if magnitude or band:
            mag = jnp.abs(xt)
            m = mag >= lo[t]
            if band:
                m = m & (mag <= hi[t])
            xt = jnp.where(m, xt, jnp.zeros_like(xt))
        if p is not None:
            # One mask per task slice (not [T, ...] at once): a third of the memory.
            keep = jax.random.bernoulli(jax.random.fold_in(key, t), 1.0 - p, xt.shape)
            xt = jnp.where(keep, xt / (1.0 - p), jnp.zeros_like(xt)).astype(x.dtype)
        out.append(xt)
    return out


def _consensus(kept, zero_positive, *, elect: bool, aggregate: str):
    """One leaf's merged value from its T sparsified slices.

    With ``elect`` also returns an int8 code per entry: the elected sign (-1, 0, 1),
    or 2 where the mass is exactly 0 but some task has a non-zero value (the only
    entries whose result depends on the model-wide majority sign). Codes are
    elementwise outputs, so they fuse into the same loop: on CPU, XLA's full
    reductions cost more than the merge itself, so the caller counts them instead.
    """
    acc = jnp.float32 if kept[0].dtype in (jnp.bfloat16, jnp.float16) else kept[0].dtype
    kept = [k.astype(acc) for k in kept]
    mass = kept[0]
    for k in kept[1:]:
        mass = mass + k
    if not elect:
        return (mass / len(kept) if aggregate == "mean" else mass), None
    sign = jnp.sign(mass)
    positive = jnp.where(sign == 0, zero_positive, sign > 0)
    total = jnp.zeros_like(mass)
    count = jnp.zeros_like(mass)
    for k in kept:
        chosen = jnp.where(positive, k > 0, k < 0)
        total = total + jnp.where(chosen, k, 0)
        count = count + chosen
    merged = total / jnp.maximum(count, 1) if aggregate == "mean" else total
    # Zero mass with a non-zero value means values of both signs cancel, so the
    # chosen side (either one) is non-empty exactly then.
    ambiguous = (sign == 0) & (count > 0)
    code = jnp.where(ambiguous, 2, sign).astype(jnp.int8)
    return merged, code


@partial(jax.jit, static_argnames=("band", "magnitude", "elect", "aggregate", "dropout"))
def _merge(leaves, lo, hi, keys, p, zero_positive, *, band, magnitude, elect, aggregate, dropout):
    """The merge of a list of leaves: (merged leaves, int8 sign codes or None).

    lo/hi: per-leaf [T] thresholds (or None); keys: per-leaf PRNG keys (dropout);
    zero_positive: the side zero-mass entries take (the model-wide majority sign,
    see :func:`_majority_needs_negative`).
    """
    outs, codes = [], []
    for i, x in enumerate(leaves):
        kept = _sparsify(x, lo[i] if lo is not None else None, hi[i] if hi is not None else None,
                         keys[i] if dropout else None, p if dropout else None, band=band,
                         magnitude=magnitude)
        merged, code = _consensus(kept, zero_positive, elect=elect, aggregate=aggregate)
        outs.append(merged.astype(x.dtype))
        codes.append(code)
    return outs, (codes if elect else None)


def _majority_needs_negative(codes) -> bool | jax.Array:
    """True if some entry is ambiguous and the majority sign over all entries is not +.

    The official rule: zero-mass entries take sign(sum of elected signs over the
    model), and a zero majority selects the negative side.
    """
    if any(isinstance(c, jax.core.Tracer) for c in codes):
        ambiguous = builtins.sum(jnp.sum(c == 2) for c in codes)
        balance = builtins.sum(jnp.sum(jnp.where(c == 2, 0, c).astype(jnp.int32)) for c in codes)
        return (ambiguous > 0) & (balance <= 0)
    codes = [np.asarray(c) for c in codes]
    if not builtins.sum(int(np.count_nonzero(c == 2)) for c in codes):
        return False
    balance = builtins.sum(int(np.count_nonzero(c == 1)) - int(np.count_nonzero(c == -1))
                           for c in codes)
    return balance <= 0


def _generalized(stacked, *, key=None, magnitude_ranks=None, band_ranks=None, scope="model",
                 joint=False, p=None, elect=False, aggregate="mean", method="auto",
                 check_finite=True):
    """Shared driver: thresholds on the host/device, then one jitted merge."""
    leaves, treedef, _ = _leaves(stacked)
    traced = any(isinstance(x, jax.core.Tracer) for x in leaves)
    check_finite = check_finite and not traced
    lo = hi = None
    rank_fn = magnitude_ranks or band_ranks
    if rank_fn is not None:
        if scope == "model":
            dtypes = {x.dtype for x in leaves}
            if len(dtypes) > 1:
                raise ValueError(f"scope='model' selects over all leaves at once, which needs one dtype; "
                                 f"got {sorted(map(str, dtypes))}. Cast the task vectors or use scope='leaf'.")
            n = builtins.sum(_size(x) for x in leaves) * (leaves[0].shape[0] if joint else 1)
            thr, largest = select.thresholds(leaves, rank_fn(n), joint=joint, method=method,
                                             return_largest=True)
            num_tasks = leaves[0].shape[0]
            thr = jnp.broadcast_to(thr, (num_tasks, thr.shape[1]))
            per_leaf = [thr] * len(leaves)
            largest = [largest]
        else:
            pairs = [select.thresholds([x], rank_fn(_size(x)), method=method, return_largest=True)
                     for x in leaves]
            per_leaf, largest = [t for t, _ in pairs], [m for _, m in pairs]
        # NaN and Inf have the largest bit patterns: the selection saw them for free.
        if check_finite and not all(np.isfinite(np.asarray(m)).all() for m in largest):
            tree_lib.check_finite(stacked)
        if band_ranks is not None:
            # ranks = (hi_rank, lo_rank): the largest kept magnitude, the smallest kept.
            hi = [t[:, 0] for t in per_leaf]
            lo = [t[:, 1] for t in per_leaf]
        else:
            lo = [t[:, 0] for t in per_leaf]
    elif check_finite and p is not None:
        tree_lib.check_finite(stacked)  # dropout could hide a NaN: check the inputs
    dropout = p is not None
    keys = [jax.random.fold_in(key, i) for i in range(len(leaves))] if dropout else None
    p_arr = jnp.float32(p if dropout else 0.0)
    static = dict(band=band_ranks is not None, magnitude=magnitude_ranks is not None, elect=elect,
                  aggregate=aggregate, dropout=dropout)

    def run(zero_positive):
        if dropout and not traced:
            # One program per leaf: XLA:CPU otherwise schedules every leaf's random
            # masks early and holds them all (3.5x the inputs' memory at ViT-B size).
            pieces = [_merge([x], None if lo is None else [lo[i]], None if hi is None else [hi[i]],
                             [keys[i]], p_arr, zero_positive, **static)
                      for i, x in enumerate(leaves)]
            return [o[0] for o, _ in pieces], ([c[0] for _, c in pieces] if elect else None)
        return _merge(leaves, lo, hi, keys, p_arr, zero_positive, **static)

    # Optimistic: zero-mass entries take "+"; redo with "-" only when the majority
    # says so and such entries exist (rare outside hand-built examples).
    out, codes = run(jnp.bool_(True))
    if elect:
        negative = _majority_needs_negative(codes)
        del codes
        if isinstance(negative, jax.Array):  # traced: decide inside the program
            out = jax.lax.cond(negative, lambda: run(jnp.bool_(False))[0], lambda: out)
        elif negative:
            out = run(jnp.bool_(False))[0]
    if check_finite and rank_fn is None and p is None and not elect:
        # A plain sum propagates every NaN/Inf: checking the 1/T-sized output suffices.
        if not tree_lib.all_finite(out).all():
            tree_lib.check_finite(stacked)
            raise ValueError("The merged task vector overflowed to Inf: the task vectors are too large.")
    return jax.tree.unflatten(treedef, out)


# ----------------------------------------------------------------------------
# The operators
# ----------------------------------------------------------------------------


@register("mean", reference="ATM paper eq. 7, https://arxiv.org/abs/2411.03055")
def mean(stacked: PyTree, *, key: jax.Array | None = None, check_finite: bool = True) -> PyTree:
    """Task arithmetic with the mean: ``(1/T) sum_t tau_t`` (ATM's default merge)."""
    del key
    return _generalized(stacked, aggregate="mean", check_finite=check_finite)


@register("sum", reference="Ilharco et al. 2023, https://arxiv.org/abs/2212.04089")
def sum(stacked: PyTree, *, key: jax.Array | None = None,  # noqa: A001 - the paper's name
        check_finite: bool = True) -> PyTree:
    """Task arithmetic: ``sum_t tau_t`` (scale with ``alpha`` when applying)."""
    del key
    return _generalized(stacked, aggregate="sum", check_finite=check_finite)


def _top_fraction(density: float):
    return lambda n: [min(n, max(1, _ceil(density, n)))]


def _band(beta: float, gamma: float):
    # Drop floor(beta*n) smallest and n - ceil(gamma*n) largest: keep descending
    # ranks [n - ceil(gamma*n) + 1, n - floor(beta*n)]; never empty when beta < gamma.
    return lambda n: [n - _ceil(gamma, n) + 1, n - _floor(beta, n)]


@register("ties", reference="Yadav et al. 2023 (TIES-Merging), https://arxiv.org/abs/2306.01708")
def ties(stacked: PyTree, *, key: jax.Array | None = None, density: float = 0.2,
         scope: str = "model", aggregate: str = "mean", method: str = "auto",
         check_finite: bool = True) -> PyTree:
    """TIES: trim to the top ``density`` by magnitude, elect sign, disjoint mean.

    Args:
      stacked: task vectors, leaves ``[T, ...]``.
      key: unused (deterministic).
      density: fraction kept per task, in (0, 1]. Official default 0.2; the ATM
        paper states 15%.
      scope: ``"model"`` (one threshold per task over all leaves) or ``"leaf"``.
      aggregate: ``"mean"`` (official disjoint mean) or ``"sum"`` (FusionBench).
      method: selection backend, see ``atm_jax.select``.
      check_finite: raise on NaN/Inf inputs (one cheap pass).
    """
    del key
    check_hparams(density=density, scope=scope, aggregate=aggregate, method=method)
    return _generalized(stacked, magnitude_ranks=_top_fraction(density), scope=scope, elect=True,
                        aggregate=aggregate, method=method, check_finite=check_finite)


@register("breadcrumbs", reference="Davari & Belilovsky 2024 (Model Breadcrumbs), "
          "https://arxiv.org/abs/2312.06795")
def breadcrumbs(stacked: PyTree, *, key: jax.Array | None = None, beta: float = 0.85,
                gamma: float = 0.993, scope: str = "leaf", aggregate: str = "mean",
                method: str = "auto", check_finite: bool = True) -> PyTree:
    """Model Breadcrumbs: keep magnitudes between the beta and gamma percentiles.

    Args:
      beta: lower percentile in [0, 1): the smallest ``floor(beta*n)`` are dropped.
      gamma: upper percentile in (0, 1], > beta: the largest ``n - ceil(gamma*n)``
        outliers are dropped.
      scope: ``"leaf"`` (per tensor, as the official code) or ``"model"``.
      aggregate: ``"mean"`` (the ATM paper's baselines) or ``"sum"``.
    """
    del key
    check_hparams(beta=beta, gamma=gamma, scope=scope, aggregate=aggregate, method=method)
    return _generalized(stacked, band_ranks=_band(beta, gamma), scope=scope, aggregate=aggregate,
                        method=method, check_finite=check_finite)


@register("dare", reference="Yu et al. 2024 (DARE), https://arxiv.org/abs/2311.03099", stochastic=True)
def dare(stacked: PyTree, *, key: jax.Array | None = None, p: float = 0.9,
         aggregate: str = "mean", check_finite: bool = True) -> PyTree:
    """DARE: drop each entry w.p. ``p``, rescale by ``1/(1-p)``, then mean (or sum)."""
    _require_key("dare", key)
    check_hparams(p=p, aggregate=aggregate)
    return _generalized(stacked, key=key, p=p, aggregate=aggregate, check_finite=check_finite)


@register("dare_ties", reference="Yu et al. 2024 (DARE) + Yadav et al. 2023 (TIES)", stochastic=True)
def dare_ties(stacked: PyTree, *, key: jax.Array | None = None, p: float = 0.9,
              aggregate: str = "mean", check_finite: bool = True) -> PyTree:
    """DARE's random drop and rescale, then TIES sign election and disjoint mean."""
    _require_key("dare_ties", key)
    check_hparams(p=p, aggregate=aggregate)
    return _generalized(stacked, key=key, p=p, elect=True, aggregate=aggregate,
                        check_finite=check_finite)


@register("ties_atm_code", reference="ATM authors' code (compatibility; see REFERENCE.md §3)",
          compat=True)
def ties_atm_code(stacked: PyTree, *, key: jax.Array | None = None, density: float = 0.15,
                  method: str = "auto", check_finite: bool = True) -> PyTree:
    """What the ATM authors ran as "TIES": one pooled top-k, no election, plain mean."""
    del key
    check_hparams(density=density, method=method)
    return _generalized(stacked, magnitude_ranks=_top_fraction(density), scope="model", joint=True,
                        aggregate="mean", method=method, check_finite=check_finite)


@register("breadcrumbs_atm_code", reference="ATM authors' code (compatibility; see REFERENCE.md §3)",
          compat=True)
def breadcrumbs_atm_code(stacked: PyTree, *, key: jax.Array | None = None, beta: float = 0.15,
                         gamma: float = 0.993, method: str = "auto",
                         check_finite: bool = True) -> PyTree:
    """What the ATM authors ran as "Breadcrumbs": a 15th–99.3rd percentile band per task
    over the whole model (≈84% kept), plain mean."""
    del key
    check_hparams(beta=beta, gamma=gamma, method=method)
    return _generalized(stacked, band_ranks=_band(beta, gamma), scope="model", aggregate="mean",
                        method=method, check_finite=check_finite)
