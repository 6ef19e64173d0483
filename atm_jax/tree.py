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

Rules every public function enforces (each error names the first offending leaf path):

* Shapes match exactly: nothing broadcasts, least of all across a task axis
  (``apply(base, stacked)`` is refused: merge first).
* Only floating leaves are task-vector material: integer or boolean leaves are refused
  by :func:`task_vector`, :func:`apply` and the merges (exclude them with
  :func:`split`; a ``None`` delta leaf leaves the base leaf unchanged).
* Collections: in a Flax variables dict (a mapping with a ``"params"`` key) only
  ``params`` holds weights. ``batch_stats``, ``cache`` and other collections are state:
  :func:`split` leaves them out of the selected part by default (``path_filter(...,
  collections=None)`` opts in), and a merge over them (or any ``batch_stats`` path)
  warns with :class:`StateMergeWarning` (BatchNorm variances can turn negative).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np

# Validation lives in atm_jax.checks; these names are part of tree's public API.
from atm_jax.checks import (StateMergeWarning, all_finite, check_compatible, check_finite,
                            check_stacked, leaf_paths, nnx_collections, path_str, refuse_rng_state,
                            require_floating, state_paths, structure_error)

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
    "check_stacked",
    "state_paths",
    "nnx_collections",
    "StateMergeWarning",
]


# ----------------------------------------------------------------------------
# Arithmetic
# ----------------------------------------------------------------------------


def task_vector(finetuned: PyTree, base: PyTree) -> PyTree:
    """``finetuned - base``, leaf by leaf (the sign of Ilharco et al. and the paper).

    Note fedjax's ``server - client`` has the opposite sign.

    Raises:
      ValueError: the trees differ in structure, shape (nothing broadcasts) or dtype,
        or a leaf is not floating; the message names the first such leaf.
    """
    check_compatible([base, finetuned], names=["base", "finetuned"], what="params tree")
    refuse_rng_state(base, "params tree")
    for path, x in zip(leaf_paths(base), jax.tree.leaves(base)):
        require_floating(path, x, "params tree")
    return _difference(finetuned, base)


@jax.jit
def _difference(finetuned, base):
    return jax.tree.map(lambda f, b: f - b, finetuned, base)


def _is_none(x) -> bool:
    return x is None


def apply(base: PyTree, delta: PyTree, scale: float | jax.Array = 1.0) -> PyTree:
    """``base + scale * delta``, leaf by leaf, keeping ``base``'s dtypes.

    Computed in float32 and rounded once to each base leaf's dtype: a bfloat16 or
    float16 leaf (with a delta of the same width) gets the correctly rounded value of
    the exact ``base + scale * delta`` (``scale`` taken as float32), so no entry is
    off by a second rounding and small cancellations keep their value; a float32
    leaf is within one float32 rounding of it. ``scale`` is traced, so changing it
    does not recompile. A ``None`` leaf in
    ``delta`` (as a merge of a :func:`split` part returns) leaves the base leaf as it is.

    Raises:
      ValueError: ``delta`` is not shaped like ``base`` (a stacked ``[T, ...]`` delta is
        named as such: merge it first), a non-scalar ``scale``, or a non-floating leaf
        that would be truncated; the message names the first offending leaf.
    """
    if jnp.ndim(scale) != 0:
        raise ValueError(f"scale must be a scalar, got shape {jnp.shape(scale)}.")
    b_leaves, b_def = jax.tree_util.tree_flatten_with_path(base, is_leaf=_is_none)
    d_leaves, d_def = jax.tree_util.tree_flatten_with_path(delta, is_leaf=_is_none)
    paths = [path_str(p) for p, _ in b_leaves]
    if b_def != d_def:
        raise structure_error("delta", "base", paths, [path_str(p) for p, _ in d_leaves], b_def, d_def)
    refuse_rng_state(delta, "delta")
    for path, (_, b), (_, d) in zip(paths, b_leaves, d_leaves):
        if d is None:
            continue
        if b is None:
            raise ValueError(f"Leaf {path!r}: delta has a value where base has None.")
        bs, ds = tuple(np.shape(b)), tuple(np.shape(d))
        if ds != bs:
            hint = (f" It looks stacked (a task axis of {ds[0]}): merge it first, e.g. "
                    "atm_jax.merge.mean(stacked)." if ds[1:] == bs else "")
            raise ValueError(f"Leaf {path!r}: delta has shape {ds} but base has {bs}; shapes must "
                             f"be equal (nothing is broadcast).{hint}")
        require_floating(path, b, "base")
        require_floating(path, d, "delta")
    return _apply(base, delta, scale)


@jax.jit
def _apply(base, delta, scale):
    return jax.tree.map(lambda b, d: b if d is None else _scaled_add(b, d, scale),
                        base, delta, is_leaf=_is_none)


def _two_sum(a, b):
    """``a + b = s + e`` exactly, ``s`` the rounded sum (Knuth's TwoSum)."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def _split(x):
    """float32 ``x`` as ``high + low``, each with at most 12 significand bits (exact)."""
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    high = jax.lax.bitcast_convert_type(bits & jnp.uint32(0xFFFFF000), jnp.float32)
    return high, x - high


def _scaled_add(b, d, scale):
    """``b + scale * d`` computed in float32 and rounded once to ``b``'s dtype.

    ``scale * d`` is taken apart into products of at most 12 x 12 significand bits,
    each exact in float32, so no product is rounded (and none changes if the compiler
    fuses a multiply-add), and error-free sums carry what the additions round off.
    A 16-bit leaf with a 16-bit delta then gets the correctly rounded exact value:
    the float32 sum is rounded to odd, which makes the one rounding to the leaf's
    dtype the correct one (Boldo and Melquiond: rounding to odd with two or more
    extra bits, then to nearest, equals rounding to nearest once). Other leaves get
    the float32 sum of the pieces (compensated summation), within one float32 ulp
    of the exact value unless ``b`` and ``scale * d`` cancel to below about 2^-20 of
    their size, rounded once to the leaf's dtype.
    """
    f32 = jnp.float32
    dtype, scale = b.dtype, jnp.asarray(scale, f32)
    if jnp.finfo(dtype).bits > 32:  # float64 under x64: its own arithmetic is wider
        return b + scale.astype(dtype) * d.astype(dtype)
    narrow = jnp.finfo(dtype).bits < 32 and jnp.finfo(d.dtype).nmant <= 11
    b, d = b.astype(f32), d.astype(f32)
    plain = b + scale * d  # Inf and NaN as float32 arithmetic gives them
    scale_high, scale_low = _split(scale)
    if narrow:  # d has <= 12 significand bits: two exact products
        q, r = _two_sum(scale_high * d, scale_low * d)  # scale * d = q + r exactly
        s, e = _two_sum(b, q)
        t, f = _two_sum(e, r)
        u, g = _two_sum(s, t)  # b + scale * d = u + g + f; |f| < |g| unless g == 0
        rest = jnp.where(g != 0, g, f)
        odd = (jax.lax.bitcast_convert_type(u, jnp.uint32) & 1) == 1
        toward = jnp.nextafter(u, jnp.where(rest > 0, jnp.inf, -jnp.inf).astype(f32))
        result = jnp.where((rest == 0) | odd, u, toward)
    else:
        d_high, d_low = _split(d)
        total, error = b, jnp.zeros_like(b)
        for piece in (scale_high * d_high, scale_high * d_low, scale_low * d_high,
                      scale_low * d_low):
            total, e = _two_sum(total, piece)
            error = error + e
        result = total + error
    return jnp.where(jnp.isfinite(plain), result, plain).astype(dtype)


def _tree_list(trees, fn: str) -> list:
    if isinstance(trees, Mapping) or hasattr(trees, "shape") or not isinstance(trees, Iterable):
        kind = f"a {type(trees).__name__}"
        if isinstance(trees, Mapping):
            kind += f" with keys {list(trees)[:4]}"
        raise ValueError(f"tree.{fn} takes a list of T trees, got one tree ({kind}). "
                         f"For a single task pass a list: tree.{fn}([tree]).")
    return list(trees)


def stacked_task_vectors(finetuned: Sequence[PyTree], base: PyTree) -> PyTree:
    """``stack([task_vector(f, base) for f in finetuned])`` without the T intermediate
    task vectors: one jitted program writes the ``[T, ...]`` leaves directly.

    Raises:
      ValueError: as :func:`stack`, naming the first leaf that differs.
    """
    finetuned = _tree_list(finetuned, "stacked_task_vectors")
    check_compatible([base, *finetuned], names=["base"] + [f"finetuned {i}" for i in range(len(finetuned))],
                     what="params tree")
    refuse_rng_state(base, "params tree")
    for path, x in zip(leaf_paths(base), jax.tree.leaves(base)):
        require_floating(path, x, "params tree")
    return _stacked_differences(base, finetuned)


@jax.jit
def _stacked_differences(base, finetuned):
    return jax.tree.map(lambda b, *fs: jnp.stack([f - b for f in fs]), base, *finetuned)


def stack(trees: Sequence[PyTree]) -> PyTree:
    """Stacks T pytrees of one structure into one whose leaves are ``[T, ...]``.

    Raises:
      ValueError: empty input, one tree instead of a list of trees, or trees whose
        structure, shapes or dtypes differ (the message names the first differing leaf).
    """
    trees = _tree_list(trees, "stack")
    check_compatible(trees)
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def unstack(stacked: PyTree, *, like: PyTree | None = None) -> list[PyTree]:
    """Inverse of :func:`stack`: a list of T pytrees.

    ``like`` (an unstacked tree of the same structure) is needed when the stacked
    tree's top level is a list or tuple of subtrees of one structure (see
    :func:`check_stacked`).

    Raises:
      ValueError: leaves without a common leading task axis (names the leaf).
    """
    if not jax.tree.leaves(stacked):
        return []
    leaves, treedef, _ = check_stacked(stacked, like=like, floating=False)
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


def gram_matrix(stacked: PyTree, *, like: PyTree | None = None) -> jax.Array:
    """``[T, T]`` inner products between the T task vectors (float32), summed per leaf.

    ``like``: the unstacked reference, as in :func:`check_stacked`.

    Raises:
      ValueError: leaves without a common leading task axis (names the leaf).
    """
    check_stacked(stacked, like=like)
    return _gram(stacked)


@jax.jit
def _gram(stacked: PyTree) -> jax.Array:
    gram = jnp.zeros((), jnp.float32)
    for x in jax.tree.leaves(stacked):
        flat = x.reshape(x.shape[0], -1).astype(jnp.float32)
        gram = gram + flat @ flat.T
    return gram


def cosine_matrix(stacked: PyTree, *, like: PyTree | None = None) -> jax.Array:
    """``[T, T]`` cosine similarities between the T task vectors of ``stacked``.

    Each task vector is all of its leaves concatenated; computed from per-leaf Gram
    matrices, so nothing is ever concatenated. A zero vector has cosine 0 with
    everything (not NaN). ``like``: as in :func:`gram_matrix`.
    """
    return cosine_from_gram(gram_matrix(stacked, like=like))


def cosine_from_gram(gram: jax.Array) -> jax.Array:
    """Cosine similarities from a Gram matrix; 0 where a vector is zero."""
    norms = jnp.sqrt(jnp.diagonal(gram))
    denom = jnp.outer(norms, norms)
    return jnp.where(denom > 0, gram / jnp.where(denom > 0, denom, 1.0), 0.0)


# ----------------------------------------------------------------------------
# Which leaves merge
# ----------------------------------------------------------------------------


def path_filter(include: str | Iterable[str] | None = None,
                exclude: str | Iterable[str] | None = None, *,
                collections: Sequence[str] | None = ("params",)) -> Callable[[str], bool]:
    """A predicate on leaf paths: matches any ``include`` regex and no ``exclude`` one.

    Regexes use ``re.search`` on slash-joined paths such as ``"block_0/attention/query/kernel"``.
    ``include=None`` means everything. Task heads are kept out of merges by an
    ``exclude`` pattern in the config rather than by code.

    ``collections`` is read by :func:`split`: when the tree is a Flax variables dict
    (a mapping with a ``"params"`` key), only leaves under these top-level collections
    can be selected (default: ``params`` only, so ``batch_stats`` never merges);
    ``None`` selects from every collection.
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

    predicate.collections = None if collections is None else tuple(collections)
    return predicate


def split(tree: PyTree, predicate: Callable[[str], bool]) -> tuple[PyTree, PyTree]:
    """Splits ``tree`` into ``(selected, rest)`` of the same structure.

    Leaves whose path satisfies ``predicate`` go to ``selected`` and are ``None`` in
    ``rest``, and the other way round. ``join(selected, rest)`` restores ``tree``.

    The collection rule: if ``tree`` is a Flax variables dict (a mapping with a
    ``"params"`` key), only leaves under ``predicate.collections`` (``path_filter``'s
    argument; ``("params",)`` for any other callable) are selected. In an
    ``nnx.State`` the same names select variable types: ``"params"`` is
    ``nnx.Param``, ``"batch_stats"`` is ``nnx.BatchStat`` (see
    :func:`nnx_collections`), so a full ``nnx.state(model)`` splits into its
    weights and the rest.
    """
    collections = getattr(predicate, "collections", ("params",))
    variables = collections is not None and isinstance(tree, Mapping) and "params" in tree
    kinds = nnx_collections(tree) if collections is not None else {}

    def take(path) -> bool:
        path = path_str(path)
        if variables and path.split("/")[0] not in collections:
            return False
        if path in kinds and kinds[path] not in collections:
            return False
        return bool(predicate(path))

    selected = jax.tree_util.tree_map_with_path(lambda p, x: x if take(p) else None, tree)
    rest = jax.tree_util.tree_map_with_path(lambda p, x: None if take(p) else x, tree)
    return selected, rest


def join(selected: PyTree, rest: PyTree) -> PyTree:
    """Inverse of :func:`split`: takes each leaf from whichever part is not ``None``.

    Raises:
      ValueError: the parts differ in structure, or both (or neither) hold a leaf.
    """
    s_leaves, s_def = jax.tree_util.tree_flatten_with_path(selected, is_leaf=_is_none)
    r_leaves, r_def = jax.tree_util.tree_flatten_with_path(rest, is_leaf=_is_none)
    paths = [path_str(p) for p, _ in s_leaves]
    if s_def != r_def:
        raise structure_error("rest", "selected", paths, [path_str(p) for p, _ in r_leaves], s_def, r_def)
    for path, (_, a), (_, b) in zip(paths, s_leaves, r_leaves):
        if (a is None) == (b is None):
            raise ValueError(f"Leaf {path!r} is {'None' if a is None else 'set'} in both parts; "
                             "join takes the two halves that tree.split returned.")
    return jax.tree.map(lambda a, b: b if a is None else a, selected, rest,
                        is_leaf=lambda x: x is None)
