"""Validation shared by ``atm_jax.tree`` and ``atm_jax.merge``.

Pytree checks (structure, shapes, dtypes, stacking, finiteness, the collection
rule) and merge hyperparameter checks. Every error names the first offending leaf
path or the parameter, the bad value and the fix. ``atm_jax.tree`` re-exports the
pytree checks and ``atm_jax.merge`` re-exports :func:`check_hparams`.
"""

from __future__ import annotations

import numbers
import os
import sys
import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from atm_jax import select

PyTree = Any

__all__ = [
    "StateMergeWarning", "path_str", "leaf_paths", "leaf_dict", "structure_error", "check_compatible",
    "require_floating", "state_paths", "nnx_collections", "refuse_rng_state", "check_stacked",
    "all_finite", "check_finite", "SCOPES", "AGGREGATES", "check_hparams", "require_key",
    "check_static", "check_range", "check_choice",
]

class StateMergeWarning(UserWarning):
    """A merge or task vector touches model state (BatchNorm statistics, caches), not weights.

    Silence it where merging state is intended:
    ``warnings.filterwarnings("ignore", category=atm_jax.tree.StateMergeWarning)``.
    """


def path_str(path) -> str:
    """'encoder/block_0/attn/kernel' from a jax key path.

    A Flax NNX ``Variable`` (``nnx.Param``, ``nnx.BatchStat``, …) flattens to its
    ``.value``; that last attribute is left out, so an ``nnx.State`` leaf has the same
    path as the linen dict leaf it corresponds to (``dense/kernel``, not
    ``dense/kernel/value``) and one path filter serves both.
    """
    if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
        path = path[:-1]
    parts = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            parts.append(str(key.key))
        elif isinstance(key, jax.tree_util.SequenceKey):
            parts.append(str(key.idx))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            parts.append(str(key.name))
        elif isinstance(key, jax.tree_util.FlattenedIndexKey):
            parts.append(str(key.key))
        else:  # pragma: no cover - future key types
            parts.append(str(key))
    return "/".join(parts)


def leaf_paths(tree: PyTree) -> list[str]:
    """Slash-joined paths of the leaves of ``tree``, in ``jax.tree.leaves`` order."""
    return [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def leaf_dict(tree: PyTree) -> dict[str, Any]:
    """``{leaf path: leaf}`` of ``tree`` (None leaves are not leaves)."""
    return dict(zip(leaf_paths(tree), jax.tree.leaves(tree)))


# ----------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------


def structure_error(name: str, ref_name: str, ref_paths, paths, ref_def, treedef) -> ValueError:
    missing = [p for p in ref_paths if p not in set(paths)]
    extra = [p for p in paths if p not in set(ref_paths)]
    detail = []
    if missing:
        detail.append(f"missing leaf {missing[0]!r}")
    if extra:
        detail.append(f"unexpected leaf {extra[0]!r}")
    if not detail:
        detail.append(f"containers differ: {ref_def} vs {treedef}")
    return ValueError(f"{name} has a different tree structure from {ref_name}: " + "; ".join(detail)
                      + ". All trees must come from the same model.")


def check_compatible(trees: Sequence[PyTree], *, names: Sequence[str] | None = None,
                     what: str = "task vector", dtypes: bool = True) -> None:
    """Raises ValueError unless all ``trees`` share structure, leaf shapes and dtypes.

    The message names the first offending leaf path and both values, so a user
    sees *which* parameter differs, not just that something does. Shapes must be
    equal, not broadcastable. ``dtypes=False`` skips the dtype comparison.
    """
    if not trees:
        raise ValueError(f"Expected at least one {what}, got an empty list.")
    names = list(names) if names is not None else [f"{what} {i}" for i in range(len(trees))]
    ref_leaves, ref_def = jax.tree_util.tree_flatten_with_path(trees[0])
    ref_paths = [path_str(p) for p, _ in ref_leaves]
    for name, tree in zip(names[1:], trees[1:]):
        leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
        paths = [path_str(p) for p, _ in leaves]
        if treedef != ref_def:
            raise structure_error(name, names[0], ref_paths, paths, ref_def, treedef)
        for path, (_, a), (_, b) in zip(paths, ref_leaves, leaves):
            if np.shape(a) != np.shape(b):
                raise ValueError(f"Leaf {path!r}: {name} has shape {np.shape(b)} but {names[0]} has "
                                 f"{np.shape(a)}. All trees must come from the same model "
                                 "(shapes must be equal; nothing is broadcast).")
            if dtypes and jnp.result_type(a) != jnp.result_type(b):
                raise ValueError(f"Leaf {path!r}: {name} has dtype {jnp.result_type(b)} but {names[0]} has "
                                 f"{jnp.result_type(a)}. Cast them to one dtype before merging.")


def require_floating(path: str, x, what: str) -> None:
    dtype = jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"Leaf {path!r} of the {what} has dtype {dtype}; only floating leaves are "
                         "task-vector material (integer arithmetic would truncate or wrap). Exclude it "
                         "with atm_jax.tree.split and a path_filter.")


RNG_COLLECTION = "rngs"
NNX_SPLIT_HINT = ("Merge the weights only: graphdef, params, rest = nnx.split(model, nnx.Param, ...); "
                  "merge params, then nnx.update(model, merged_params).")


def _collection_of(nnx, kind: type) -> str:
    if issubclass(kind, nnx.RngState):
        return RNG_COLLECTION
    for klass in kind.__mro__:  # a subclass of nnx.Param is a param
        try:
            return nnx.variablelib.variable_name_from_type(klass)
        except (ValueError, AttributeError):
            continue
    return kind.__name__


def nnx_collections(tree: PyTree) -> dict[str, str]:
    """Leaf path -> collection name for the Flax NNX ``Variable`` leaves of ``tree``.

    ``"params"`` for ``nnx.Param`` (and its subclasses), ``"batch_stats"`` for
    ``nnx.BatchStat``, ``"rngs"`` for RNG keys and counts, the registered NNX name or
    the class name otherwise. Empty for trees without NNX variables (linen dicts).
    """
    nnx = sys.modules.get("flax.nnx")  # not imported: the tree cannot hold its Variables
    if nnx is None:
        return {}

    def is_variable(x) -> bool:
        return isinstance(x, nnx.Variable)

    out = {}
    for path, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_variable)[0]:
        if is_variable(x) and jax.tree.leaves(x):  # a split leaves Variables holding None
            out[path_str(path)] = _collection_of(nnx, type(x))
    return out


def state_paths(tree: PyTree) -> list[str]:
    """Paths of leaves that are model state rather than weights (the collection rule).

    In a Flax variables dict (a mapping with a ``"params"`` key) every leaf outside
    ``params`` is state; anywhere, a path through ``batch_stats`` is BatchNorm state;
    in an ``nnx.State``, every variable that is not an ``nnx.Param`` (``nnx.BatchStat``,
    caches, intermediates, …) is state.
    """
    variables = isinstance(tree, Mapping) and "params" in tree
    kinds = nnx_collections(tree)
    out = []
    for path in leaf_paths(tree):
        parts = path.split("/")
        if ((variables and parts[0] != "params") or "batch_stats" in parts
                or kinds.get(path, "params") != "params"):
            out.append(path)
    return out


def refuse_rng_state(tree: PyTree, what: str) -> None:
    """Raises ValueError if ``tree`` holds NNX RNG state (``nnx.RngKey`` / ``nnx.RngCount``).

    A full ``nnx.state(model)`` carries them; they are not task-vector material.
    """
    rng = [path for path, kind in nnx_collections(tree).items() if kind == RNG_COLLECTION]
    if rng:
        raise ValueError(f"Leaf {rng[0]!r} of the {what} is NNX RNG state ({len(rng)} RNG leaves in "
                         f"all): keys and counters are not task-vector material. {NNX_SPLIT_HINT}")


def _sequence_of_trees(obj) -> bool:
    """A plain list or tuple of trees that all share one structure.

    Such an object is either T separate trees or one stacked tree whose top level
    is a list (per-layer params): the structure alone cannot tell. A NamedTuple has
    named fields, so it is a tree's own container, never a sequence of tasks.
    """
    if type(obj) not in (list, tuple) or not obj:
        return False
    first = jax.tree.structure(obj[0])
    return first.num_leaves > 0 and all(jax.tree.structure(t) == first for t in obj[1:])


def _check_not_separate_trees(stacked, like, what: str) -> None:
    """Refuses a list or tuple of T trees given where one stacked tree is expected."""
    if not _sequence_of_trees(stacked):
        return
    kind, count = type(stacked).__name__, len(stacked)
    fix = ("Stack them first: atm_jax.tree.stack(trees) or "
           "tree.stacked_task_vectors(finetuned, base).")
    if like is not None:
        if jax.tree.structure(stacked) == jax.tree.structure(like):
            return  # one stacked tree with a list at the top, as the reference is
        if all(jax.tree.structure(t) == jax.tree.structure(like) for t in stacked):
            raise ValueError(f"Got a {kind} of {count} trees, each shaped like the reference "
                             f"(like=), but {what}s are passed as one stacked tree (leaves "
                             f"[T, ...]). {fix}")
        return  # the path checks against the reference name the difference
    leading = {}
    for path, x in zip(leaf_paths(stacked), jax.tree.leaves(stacked)):
        leading.setdefault(np.shape(x)[:1], path)
    if () in leading:
        raise ValueError(f"Got a {kind} of {count} trees, but {what}s are passed as one stacked "
                         f"tree (leaves [T, ...]); leaf {leading[()]!r} is a scalar, so these "
                         f"are {count} separate trees. {fix}")
    if len(leading) > 1:
        (a, first), (b, second) = list(leading.items())[:2]
        raise ValueError(f"Got a {kind} of {count} trees, but {what}s are passed as one stacked "
                         f"tree (leaves [T, ...]); these leaves share no leading task axis "
                         f"({first!r} leads with {a[0]}, {second!r} with {b[0]}), so they are "
                         f"{count} separate trees. {fix}")
    (size,), = leading
    raise ValueError(
        f"Got a {kind} of {count} trees of one structure whose leaves all lead with {size}: "
        f"ambiguous. It is either {count} separate trees ({fix[0].lower() + fix[1:]}) or one "
        f"stacked tree over {size} tasks whose top level is a {kind} (per-layer params). Pass "
        "like=<the unstacked params, e.g. the base> to say which.")


def check_stacked(stacked: PyTree, *, like: PyTree | None = None, what: str = "task vector",
                  floating: bool = True, warn_state: bool = False):
    """Validates a stacked pytree; returns ``(leaves, treedef, paths)`` of its non-None leaves.

    Args:
      stacked: leaves ``[T, *shape]`` (``None`` leaves are skipped).
      like: optional unstacked reference (e.g. the base params): every leaf must then
        have shape ``(T, *like_leaf.shape)``. This is the only way to tell an unstacked
        tree whose leaves happen to share a leading size from a stack, and it is
        required for a stacked tree whose top level is a plain list or tuple of
        subtrees of one structure (per-layer params): without it such a list is
        indistinguishable from T separate trees and is refused, the message saying
        which reading the leaves allow. With ``like=``, a tree structured as ``like``
        is the stack, and a list of trees each structured as ``like`` is T separate
        trees (refused: stack them first). NamedTuples and dicts at the top are
        trees, never sequences of tasks.
      what: the noun used in messages.
      floating: refuse non-floating leaves.
      warn_state: warn with :class:`StateMergeWarning` on :func:`state_paths` leaves.

    Raises:
      ValueError: naming the first offending leaf: no leaves, a scalar leaf, a list of
        trees (stack it first) or an ambiguous list without ``like=``, NNX RNG state, leading task axes that differ, a non-floating leaf, or
        a shape that is not ``(T, *like_shape)``.
    """
    _check_not_separate_trees(stacked, like, what)
    if floating:
        refuse_rng_state(stacked, f"stacked {what}s")
    with_path, treedef = jax.tree_util.tree_flatten_with_path(stacked)
    paths = [path_str(p) for p, _ in with_path]
    leaves = [x for _, x in with_path]
    if not leaves:
        raise ValueError(f"Nothing to merge: the stacked {what}s have no leaves "
                         "(an empty tree, or a path filter that excludes everything).")
    num_tasks = None
    for path, x in zip(paths, leaves):
        if not hasattr(x, "shape") or len(x.shape) == 0:
            raise ValueError(f"Leaf {path!r} is a scalar; stacked {what}s need a leading "
                             "task axis [T, ...]. Build them with atm_jax.tree.stack.")
        if floating:
            require_floating(path, x, f"stacked {what}s")
        if num_tasks is None:
            num_tasks, first = x.shape[0], path
        elif x.shape[0] != num_tasks:
            raise ValueError(f"Leaf {path!r} stacks {x.shape[0]} tasks (shape {tuple(x.shape)}) but "
                             f"{first!r} stacks {num_tasks}; every leaf needs the same leading task "
                             "axis. A single unstacked task vector? Use atm_jax.tree.stack([tv]).")
    if num_tasks == 0:
        raise ValueError(f"Cannot merge an empty list of {what}s (task axis of size 0).")
    if like is not None:
        ref = dict(zip(leaf_paths(like), jax.tree.leaves(like)))
        for path, x in zip(paths, leaves):
            if path not in ref:
                raise ValueError(f"Leaf {path!r} of the stacked {what}s is missing from the reference "
                                 "tree (like=); both must come from the same model.")
            want = (num_tasks, *np.shape(ref[path]))
            if tuple(x.shape) != want:
                raise ValueError(
                    f"Leaf {path!r} has shape {tuple(x.shape)} but the reference (like=) has "
                    f"{np.shape(ref[path])}: stacked over the {num_tasks} tasks that {first!r} "
                    f"implies, it should be {want}. Is it unstacked? Stack task vectors with "
                    "atm_jax.tree.stack([...]).")
    if warn_state:
        state = state_paths(stacked)
        if state:
            warnings.warn(
                f"Merging leaf {state[0]!r} ({len(state)} state leaves in all): BatchNorm statistics "
                "and other non-params collections are state, not weights (merged variances can turn "
                "negative). Merge variables['params'] only (tree.split with tree.path_filter() does; "
                "NNX: nnx.split(model, nnx.Param, ...)), or silence this warning with "
                "category=atm_jax.tree.StateMergeWarning.",
                StateMergeWarning, stacklevel=3)
    return leaves, treedef, paths


@jax.jit
def _leaf_finite(leaves):
    return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])


def _host_finite(x) -> bool:
    return bool(np.isfinite(np.asarray(x)).all())


def all_finite(leaves) -> np.ndarray:
    """Per-leaf finiteness; NumPy threads for CPU arrays (XLA:CPU reductions are slow)."""
    if not leaves:
        return np.ones((0,), bool)
    on_cpu = all(not isinstance(x, jax.Array) or all(d.platform == "cpu" for d in x.devices())
                 for x in leaves)
    if on_cpu:
        with ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1))) as pool:
            return np.array(list(pool.map(_host_finite, leaves)), bool)
    return np.asarray(_leaf_finite(leaves))


def check_finite(stacked: PyTree, *, what: str = "task vector") -> None:
    """Raises ValueError naming the first leaf (and task) that holds NaN or Inf.

    One fused reduction per leaf; the slow search for the task index only runs on
    the error path.
    """
    leaves_with_path = jax.tree_util.tree_flatten_with_path(stacked)[0]
    leaves = [x for _, x in leaves_with_path]
    ok = all_finite(leaves)
    if ok.all():
        return
    i = int(np.argmin(ok))
    path, x = leaves_with_path[i]
    x = np.asarray(x)
    per_task = [int(np.sum(~np.isfinite(x[t]))) for t in range(x.shape[0])] if x.ndim else []
    bad = [t for t, n in enumerate(per_task) if n]
    raise ValueError(
        f"Leaf {path_str(path)!r} of the {what}s holds NaN or Inf values "
        f"(task index {bad[0] if bad else '?'}, {per_task[bad[0]] if bad else '?'} entries). "
        "A finetune probably diverged: lower the learning rate or enable gradient clipping.")




# ----------------------------------------------------------------------------
# Merge hyperparameters
# ----------------------------------------------------------------------------


def check_static(name: str, value) -> None:
    # Hyperparameters pick the kept entries on the host and shape the program, so they
    # must be concrete Python numbers: a traced value cannot be compared or rounded.
    if isinstance(value, jax.core.Tracer):
        raise TypeError(f"{name} is a traced JAX value ({value.aval}); merge hyperparameters must "
                        f"be static Python numbers. Pass a float, and under jax.jit mark it static "
                        f"(jax.jit(f, static_argnames=[{name!r}])) or close over it.")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}={value!r} is a {type(value).__name__}; merge hyperparameters must be "
                        f"Python numbers, e.g. {name}=0.2 (convert arrays with float(x)).")


def check_range(name: str, value, lo, hi, *, lo_open: bool, hi_open: bool, hint: str = ""):
    check_static(name, value)
    ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok or not np.isfinite(value):
        interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise ValueError(f"{name}={value!r} is outside {interval}.{(' ' + hint) if hint else ''}")


def check_choice(name: str, value, choices):
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {choices}.")


def require_key(name: str, key) -> None:
    """Raises unless ``key`` is one PRNG key for the stochastic merge ``name``.

    Accepted: a typed key (``jax.random.key(0)``, any generator) or a legacy raw
    key (``jax.random.PRNGKey(0)``: uint32 ``[2]`` with the default threefry
    generator, ``[4]`` with rbg). Only dtype and shape are read, so a traced key
    passes too.

    Raises:
      ValueError: ``key`` is None.
      TypeError: anything else (an int seed, a float, an array of another dtype or
        shape, several keys); the message shows ``key=jax.random.key(0)``.
    """
    if key is None:
        raise ValueError(f"merge {name!r} is stochastic: pass an explicit PRNG key, "
                         "e.g. key=jax.random.key(0).")
    dtype, shape = getattr(key, "dtype", None), tuple(getattr(key, "shape", None) or ())
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        got = f"the int {int(key)}: a seed, not a key; pass key=jax.random.key({int(key)})"
    elif dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        if shape == ():
            return
        got = (f"a typed key array of shape {shape}, several keys; pass one, e.g. "
               "jax.random.split(key)[0]")
    elif dtype is not None and hasattr(key, "ndim"):
        raw = (2,) if jax.config.jax_default_prng_impl == "threefry2x32" else (4,)
        if dtype == np.uint32 and shape == raw:
            return
        got = (f"an array of dtype {dtype} and shape {shape} (a raw key, as "
               f"jax.random.PRNGKey makes, is uint32 of shape {raw})")
    else:
        got = f"a {type(key).__name__}: {str(key)[:60]}"
    raise TypeError(f"merge {name!r} needs one PRNG key, e.g. key=jax.random.key(0) (or a legacy "
                    f"jax.random.PRNGKey(0)); got {got}.")


SCOPES = ("model", "leaf")
AGGREGATES = ("mean", "sum")


def check_hparams(**hp) -> None:
    """Validates merge hyperparameters by name.

    Raises:
      TypeError: a value is traced or not a Python number / string (names it).
      ValueError: a value is out of range or not a known choice (names it and the range).
    """
    if "density" in hp:
        check_range("density", hp["density"], 0, 1, lo_open=True, hi_open=False,
                     hint="It is the fraction of entries kept per task (TIES default 0.2).")
    if "p" in hp:
        check_range("p", hp["p"], 0, 1, lo_open=False, hi_open=True,
                     hint="It is the drop probability (DARE paper: 0.9).")
    if "beta" in hp:
        check_range("beta", hp["beta"], 0, 1, lo_open=False, hi_open=True)
    if "gamma" in hp:
        check_range("gamma", hp["gamma"], 0, 1, lo_open=True, hi_open=False)
    if "beta" in hp and "gamma" in hp:
        beta, gamma = hp["beta"], hp["gamma"]
        if not beta < gamma:
            raise ValueError(f"beta={beta!r} must be smaller than gamma={gamma!r}: Breadcrumbs keeps "
                             "the magnitudes between the beta and gamma percentiles (paper: 0.85, 0.993).")
    if "scope" in hp:
        check_choice("scope", hp["scope"], SCOPES)
    if "aggregate" in hp:
        check_choice("aggregate", hp["aggregate"], AGGREGATES)
    if "method" in hp:
        check_choice("method", hp["method"], select.METHODS)
    if "check_finite" in hp and hp["check_finite"] not in (True, False, "checkify"):
        raise ValueError(f"check_finite={hp['check_finite']!r} is not one of True, False, 'checkify'.")
