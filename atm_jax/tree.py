"""Pytree math for task vectors.

A *task vector* is the parameter-wise difference ``finetuned - base`` (Ilharco et
al., 2023; ATM paper eq. 2). All functions here take and return plain pytrees
(nested dicts of arrays, as ``flax.linen`` ``init`` gives), so research code can
mix them freely with ``jax.tree``.

A *stacked* pytree has the same structure as a params pytree but every leaf gains
a leading task axis ``T``: leaf shape ``[T, *param_shape]``. Merge operators
(``atm_jax.merge``) consume stacked pytrees.

Leaves may be ``None``: that is how :func:`split` marks leaves that belong to the
other part (``jax.tree`` treats ``None`` as an empty subtree, so merges and
arithmetic skip them).
"""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np

PyTree = Any

__all__ = [
    "task_vector",
    "apply",
    "stack",
    "stacked_task_vectors",
    "unstack",
    "ravel",
    "num_params",
    "global_norm",
    "gram_matrix",
    "cosine_matrix",
    "leaf_paths",
    "path_filter",
    "split",
    "join",
    "check_compatible",
    "check_finite",
    "all_finite",
    "path_str",
]


def path_str(path) -> str:
    """'encoder/block_0/attn/kernel' from a jax key path."""
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


# ----------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------


def check_compatible(trees: Sequence[PyTree], *, names: Sequence[str] | None = None,
                     what: str = "task vector") -> None:
    """Raises ValueError unless all ``trees`` share structure, leaf shapes and dtypes.

    The message names the first offending leaf path and both values, so a user
    sees *which* parameter differs, not just that something does.
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
            missing = sorted(set(ref_paths) - set(paths))
            extra = sorted(set(paths) - set(ref_paths))
            detail = []
            if missing:
                detail.append(f"missing leaf {missing[0]!r}")
            if extra:
                detail.append(f"unexpected leaf {extra[0]!r}")
            if not detail:
                detail.append(f"containers differ: {ref_def} vs {treedef}")
            raise ValueError(f"{name} has a different tree structure from {names[0]}: "
                             + "; ".join(detail) + ". All task vectors must come from the same model.")
        for path, (_, a), (_, b) in zip(paths, ref_leaves, leaves):
            if np.shape(a) != np.shape(b):
                raise ValueError(f"Leaf {path!r}: {name} has shape {np.shape(b)} but {names[0]} has "
                                 f"{np.shape(a)}. All task vectors must come from the same model.")
            if jnp.result_type(a) != jnp.result_type(b):
                raise ValueError(f"Leaf {path!r}: {name} has dtype {jnp.result_type(b)} but {names[0]} has "
                                 f"{jnp.result_type(a)}. Cast them to one dtype before merging.")


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
# Arithmetic
# ----------------------------------------------------------------------------


@jax.jit
def task_vector(finetuned: PyTree, base: PyTree) -> PyTree:
    """``finetuned - base``, leaf by leaf (the sign of Ilharco et al. and the paper).

    Note fedjax's ``server - client`` has the opposite sign.
    """
    return jax.tree.map(lambda f, b: f - b, finetuned, base)


@jax.jit
def apply(base: PyTree, delta: PyTree, scale: float | jax.Array = 1.0) -> PyTree:
    """``base + scale * delta``, leaf by leaf, keeping ``base``'s dtypes.

    ``scale`` is traced, so changing it does not recompile.
    """
    return jax.tree.map(lambda b, d: (b + scale * d).astype(b.dtype), base, delta)


def stacked_task_vectors(finetuned: Sequence[PyTree], base: PyTree) -> PyTree:
    """``stack([task_vector(f, base) for f in finetuned])`` without the T intermediate
    task vectors: one jitted program writes the ``[T, ...]`` leaves directly.

    Raises:
      ValueError: as :func:`stack`, naming the first leaf that differs.
    """
    finetuned = list(finetuned)
    check_compatible([base, *finetuned], names=["base"] + [f"finetuned {i}" for i in range(len(finetuned))],
                     what="params tree")
    return _stacked_differences(base, finetuned)


@jax.jit
def _stacked_differences(base, finetuned):
    return jax.tree.map(lambda b, *fs: jnp.stack([f - b for f in fs]), base, *finetuned)


def stack(trees: Sequence[PyTree]) -> PyTree:
    """Stacks T pytrees of one structure into one whose leaves are ``[T, ...]``.

    Raises:
      ValueError: empty input, or trees whose structure, shapes or dtypes differ
        (the message names the first differing leaf path).
    """
    trees = list(trees)
    check_compatible(trees)
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def unstack(stacked: PyTree) -> list[PyTree]:
    """Inverse of :func:`stack`: a list of T pytrees."""
    leaves, treedef = jax.tree.flatten(stacked)
    if not leaves:
        return []
    num = leaves[0].shape[0]
    return [jax.tree.unflatten(treedef, [x[t] for x in leaves]) for t in range(num)]


def ravel(tree: PyTree) -> tuple[jax.Array, Callable[[jax.Array], PyTree]]:
    """Flattens a pytree into one 1-D vector; returns it and the inverse function."""
    return jax.flatten_util.ravel_pytree(tree)


def num_params(tree: PyTree) -> int:
    """Number of scalar entries over all leaves."""
    return int(sum(np.prod(np.shape(x), dtype=np.int64) for x in jax.tree.leaves(tree)))


@jax.jit
def global_norm(tree: PyTree) -> jax.Array:
    """L2 norm of all leaves concatenated (float32 accumulation)."""
    sq = [jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)]
    return jnp.sqrt(sum(sq)) if sq else jnp.float32(0)


@jax.jit
def gram_matrix(stacked: PyTree) -> jax.Array:
    """``[T, T]`` inner products between the T task vectors (float32), summed per leaf."""
    gram = jnp.zeros((), jnp.float32)
    for x in jax.tree.leaves(stacked):
        flat = x.reshape(x.shape[0], -1).astype(jnp.float32)
        gram = gram + flat @ flat.T
    return gram


@jax.jit
def cosine_matrix(stacked: PyTree) -> jax.Array:
    """``[T, T]`` cosine similarities between the T task vectors of ``stacked``.

    Each task vector is all of its leaves concatenated; computed from per-leaf Gram
    matrices, so nothing is ever concatenated. A zero vector has cosine 0 with
    everything (not NaN).
    """
    return cosine_from_gram(gram_matrix(stacked))


def cosine_from_gram(gram: jax.Array) -> jax.Array:
    """Cosine similarities from a Gram matrix; 0 where a vector is zero."""
    norms = jnp.sqrt(jnp.diagonal(gram))
    denom = jnp.outer(norms, norms)
    return jnp.where(denom > 0, gram / jnp.where(denom > 0, denom, 1.0), 0.0)


# ----------------------------------------------------------------------------
# Which leaves merge
# ----------------------------------------------------------------------------


def path_filter(include: str | Iterable[str] | None = None,
                exclude: str | Iterable[str] | None = None) -> Callable[[str], bool]:
    """A predicate on leaf paths: matches any ``include`` regex and no ``exclude`` one.

    Regexes use ``re.search`` on slash-joined paths such as ``"block_0/attention/query/kernel"``.
    ``include=None`` means everything. Task heads are kept out of merges by an
    ``exclude`` pattern in the config rather than by code.
    """
    def compile_all(patterns):
        if patterns is None:
            return []
        if isinstance(patterns, str):
            patterns = [patterns]
        out = []
        for p in patterns:
            try:
                out.append(re.compile(p))
            except re.error as e:
                raise ValueError(f"Invalid leaf-path regex {p!r}: {e}.") from None
        return out

    inc, exc = compile_all(include), compile_all(exclude)

    def predicate(path: str) -> bool:
        if inc and not any(r.search(path) for r in inc):
            return False
        return not any(r.search(path) for r in exc)

    return predicate


def split(tree: PyTree, predicate: Callable[[str], bool]) -> tuple[PyTree, PyTree]:
    """Splits ``tree`` into ``(selected, rest)`` of the same structure.

    Leaves whose path satisfies ``predicate`` go to ``selected`` and are ``None`` in
    ``rest``, and the other way round. ``join(selected, rest)`` restores ``tree``.
    """
    selected = jax.tree_util.tree_map_with_path(
        lambda p, x: x if predicate(path_str(p)) else None, tree)
    rest = jax.tree_util.tree_map_with_path(
        lambda p, x: None if predicate(path_str(p)) else x, tree)
    return selected, rest


def join(selected: PyTree, rest: PyTree) -> PyTree:
    """Inverse of :func:`split`: takes each leaf from whichever part is not ``None``."""
    return jax.tree.map(lambda a, b: b if a is None else a, selected, rest,
                        is_leaf=lambda x: x is None)
