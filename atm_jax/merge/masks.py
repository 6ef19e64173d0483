"""Mask-based merges: Consensus (TALL masks) and DELLA's magnitude-ranked drop.

* **Consensus** (Wang et al., ICML 2024, "Localizing Task Information for Improved
  Model Merging and Compression"): the multi-task vector ``τ_MTL`` is the sum of
  the task vectors (``base="task_arithmetic"``) or their TIES merge (``base="ties"``,
  `atm_jax.merge.sparsify.ties` at ``density``); task t's TALL mask is
  ``m_t = 1{|τ_t| ≥ λ_t |τ_MTL − τ_t|}`` (the paper's ``≥``; FusionBench's ``>``
  differs only where the two sides are exactly equal); the merge keeps
  ``τ_MTL`` where at least ``k`` tasks' masks agree: ``1{Σ_t m_t ≥ k} ⊙ τ_MTL``.
  Elementwise over every leaf, biases included, as the paper's flattened vectors.
* **DELLA** (Deep et al. 2024, MAGPRUNE then TIES' consensus): per task and row
  (a row: one output unit of a layer's matrix view, `atm_jax.merge.matrix`; one
  row of an embedding table; a whole leaf otherwise), entries are ranked by
  magnitude, ``rank = 1 … n`` from the smallest, and kept with probability
  ``density − ε + 2ε (rank − 1)/(n − 1)`` (``density`` for ``n = 1``), so the
  largest entries are the least likely to drop. Kept entries are rescaled,
  ``rescale="entry"`` by ``1/p_keep`` each (the paper: the expectation is kept),
  or ``rescale="l1"`` so each task's leaf keeps its L1 norm (mergekit's ``della``,
  skipped where either norm is below 1e-7). Then TIES' sign election and disjoint
  mean (`atm_jax.merge.sparsify.disjoint_merge`). Random draws (explicit ``key``):
  the i-th non-None leaf's task t keeps where
  ``jax.random.uniform(fold_in(fold_in(key, i), t), leaf_shape) < p_keep``, as DARE.
  Ranks come from a sort on the host for concrete CPU arrays, inside the program
  otherwise (jit, accelerators); both give the same ranks (ties by position).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from atm_jax import checks
from atm_jax import tree as tree_lib
from atm_jax.merge import matrix, sparsify
from atm_jax.merge.registry import register

PyTree = Any

__all__ = ["consensus", "della", "della_keep_probability", "CONSENSUS_BASES",
           "RESCALES"]

CONSENSUS_BASES = ("task_arithmetic", "ties")
RESCALES = ("entry", "l1")
L1_FLOOR = 1e-7


@jax.jit
def _masks_and_merge(leaves, mtl, lam, k):
    out, counts = [], []
    for x, total in zip(leaves, mtl):
        acc = jnp.promote_types(x.dtype, jnp.float32)
        total = total.astype(acc)
        count = jnp.zeros(x.shape[1:], jnp.int32)
        bad = ~jnp.isfinite(total)
        for t in range(x.shape[0]):
            xt = x[t].astype(acc)
            count = count + (jnp.abs(xt) >= lam[t] * jnp.abs(total - xt)).astype(jnp.int32)
            bad = bad | ~jnp.isfinite(xt)
        # NaN/Inf inputs fail every mask comparison: they must come out NaN, not 0.
        out.append(jnp.where(bad, jnp.nan, jnp.where(count >= k, total, 0)).astype(x.dtype))
        counts.append(count)
    return out, counts


def _check_consensus(k, lam, base, density) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"k={k!r} must be a non-negative int: the number of tasks whose masks must "
                         "agree (the paper's consensus: 2; 0 keeps everything).")
    values = lam if isinstance(lam, (tuple, list)) else (lam,)
    if not values:
        raise ValueError("lam=() is empty: give one λ, or one per task.")
    for value in values:
        checks.check_range("lam", value, 0, float("inf"), lo_open=False, hi_open=True,
                           hint="The paper picks it per task from 0.2–0.6; FusionBench's default 0.6.")
    checks.check_choice("base", base, CONSENSUS_BASES)
    checks.check_hparams(density=density)


@register("consensus", reference="Wang et al. 2024 (TALL masks / Consensus merging), "
          "https://arxiv.org/abs/2405.07813", validate=_check_consensus)
def consensus(stacked: PyTree, *, key: jax.Array | None = None, k: int = 2,
              lam: float | tuple[float, ...] = 0.6, base: str = "task_arithmetic",
              density: float = 0.2, check_finite: bool | str = True,
              like: PyTree | None = None) -> PyTree:
    """Consensus merging: ``τ_MTL`` kept where at least ``k`` tasks' TALL masks agree.

    Args:
      k: how many tasks must claim an entry (paper: 2).
      lam: the TALL masks' λ, one for all tasks or a tuple of one per task.
      base: ``"task_arithmetic"`` (``τ_MTL`` = the sum) or ``"ties"``.
      density: TIES' trim when ``base="ties"`` (unused otherwise).
    """
    del key
    _check_consensus(k, lam, base, density)
    leaves, treedef, paths = tree_lib.check_stacked(stacked, like=like, warn_state=True)
    num_tasks = leaves[0].shape[0]
    if isinstance(lam, (tuple, list)) and len(lam) != num_tasks:
        raise ValueError(f"lam has {len(lam)} values for {num_tasks} tasks: give one λ, or one per task.")
    if base == "ties":
        mtl = sparsify.ties(stacked, density=density, check_finite=check_finite, like=like)
    else:
        mtl = sparsify.task_arithmetic(stacked, check_finite=check_finite, like=like)
    lam_arr = jnp.broadcast_to(jnp.asarray(lam, jnp.float32), (num_tasks,))
    # NaN inputs: the eager check above raised; under jit NaN propagates through τ_MTL.
    out, _ = _masks_and_merge(leaves, jax.tree.leaves(mtl), lam_arr, jnp.int32(k))
    return jax.tree.unflatten(treedef, out)


def della_keep_probability(ranks: jax.Array, n: int, density: float, epsilon: float) -> jax.Array:
    """MAGPRUNE's keep probability from 0-based ascending magnitude ranks in rows of ``n``."""
    if n == 1:
        return jnp.full(ranks.shape, density, jnp.float32)
    return (density - epsilon) + (2.0 * epsilon / (n - 1)) * ranks.astype(jnp.float32)


def _device_row_ranks(mags: jax.Array) -> jax.Array:
    n = mags.shape[-1]
    order = jnp.argsort(mags, axis=-1, stable=True)
    iota = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), mags.shape)
    # The inverse permutation of the sort: each entry's 0-based rank in its row.
    return jnp.put_along_axis(jnp.zeros_like(iota), order, iota, axis=-1, inplace=False)


def _host_row_ranks(mags: np.ndarray) -> np.ndarray:
    """The same ranks on the host (XLA:CPU sorts ~3x slower than NumPy): each row's
    non-negative float32 bit patterns, which order as the values do, packed above the
    entry's position into one uint64 and sorted (ties go by position, as a stable sort),
    rows split over a thread pool."""
    n = mags.shape[-1]
    flat = np.ascontiguousarray(mags, np.float32).reshape(-1, n)
    out = np.empty(flat.shape, np.int32)
    positions = np.arange(n, dtype=np.uint64)
    iota = np.arange(n, dtype=np.int32)[None]

    def work(lo, hi):
        packed = (flat[lo:hi].view(np.uint32).astype(np.uint64) << np.uint64(32)) | positions
        packed.sort(axis=-1)
        order = (packed & np.uint64(0xFFFFFFFF)).astype(np.intp)
        np.put_along_axis(out[lo:hi], order, np.broadcast_to(iota, order.shape), axis=-1)

    step = max(1, -(-flat.shape[0] // (4 * _WORKERS)))
    with ThreadPoolExecutor(_WORKERS) as pool:
        list(pool.map(lambda lo: work(lo, min(lo + step, flat.shape[0])),
                      range(0, flat.shape[0], step)))
    return out.reshape(mags.shape)


_WORKERS = max(1, min(8, os.cpu_count() or 1))


def _host_leaf_ranks(path: str, x: np.ndarray) -> tuple[np.ndarray, int]:
    """Ranks within DELLA's rows, in the leaf's own layout ``[T, *shape]``, and the row length.

    A Flax kernel's rows (one output unit) run along its input axes: viewed as
    ``[T, in, out]`` they are ranked as ``[T, out, in]`` (one NumPy transpose each way).
    """
    v = matrix.view(path, x.shape[1:], embeddings=True)
    mags = np.abs(x.astype(np.float32, copy=False))
    if v is not None and v.transpose:
        cols = mags.reshape(x.shape[0], v.in_features, v.out_features)
        ranks = _host_row_ranks(np.ascontiguousarray(cols.transpose(0, 2, 1)))
        return np.ascontiguousarray(ranks.transpose(0, 2, 1)).reshape(x.shape), v.in_features
    rows = mags if v is not None else mags.reshape(x.shape[0], -1)
    return _host_row_ranks(rows).reshape(x.shape), rows.shape[-1]


@partial(jax.jit, static_argnames=("view",))
def _row_magnitudes(x, *, view):
    """``|x|`` as DELLA's rows ``[T, rows, n]``: the matrix view's rows (one output unit),
    or the whole leaf as one row. ``view`` (a hashable `matrix.MatrixView` or None) keys
    the compile cache."""
    mags = jnp.abs(x.astype(jnp.promote_types(x.dtype, jnp.float32)))
    return view.to_matrix(mags) if view is not None else mags.reshape(x.shape[0], 1, -1)


@partial(jax.jit, static_argnames=("view", "shape"))
def _leaf_layout(ranks, *, view, shape):
    return view.from_matrix(ranks) if view is not None else ranks.reshape(ranks.shape[0], *shape)


@partial(jax.jit, static_argnames=("n", "density", "epsilon", "rescale"))
def _della_leaf(x, ranks, key, *, n, density, epsilon, rescale):
    """One leaf's dropped and rescaled task slices, in the leaf's own layout (``ranks``
    too: the transposes of the row view stay out of the elementwise work)."""
    acc = jnp.promote_types(x.dtype, jnp.float32)
    out = []
    for t in range(x.shape[0]):
        xt = x[t].astype(acc)
        keep_p = della_keep_probability(ranks[t], n, density, epsilon)
        u = jax.random.uniform(jax.random.fold_in(key, t), xt.shape)
        kept = jnp.where(u < keep_p, xt, 0)
        if rescale == "entry":
            kept = kept / keep_p
        else:
            before, after = jnp.sum(jnp.abs(xt)), jnp.sum(jnp.abs(kept))
            ok = (before >= L1_FLOOR) & (after >= L1_FLOOR)
            kept = jnp.where(ok, kept * (before / jnp.where(ok, after, 1.0)), kept)
        out.append(kept.astype(x.dtype))
    return jnp.stack(out)


def _check_della(density, epsilon, rescale) -> None:
    checks.check_hparams(density=density)
    checks.check_range("epsilon", epsilon, 0, 1, lo_open=False, hi_open=True,
                       hint="mergekit's default 0.15.")
    if not (0 < density - epsilon and density + epsilon <= 1):
        raise ValueError(f"density={density!r} ± epsilon={epsilon!r} must stay inside (0, 1]: the keep "
                         "probabilities span [density − epsilon, density + epsilon].")
    checks.check_choice("rescale", rescale, RESCALES)


@register("della", reference="Deep et al. 2024 (DELLA-Merging), https://arxiv.org/abs/2406.11617",
          stochastic=True, validate=_check_della)
def della(stacked: PyTree, *, key: jax.Array | None = None, density: float = 0.5,
          epsilon: float = 0.15, rescale: str = "entry", check_finite: bool | str = True,
          like: PyTree | None = None) -> PyTree:
    """DELLA: magnitude-ranked random drop, rescale, then TIES' sign election and disjoint mean.

    Args:
      key: the PRNG key of the drops (required).
      density: the mean keep probability (mergekit's name; its default 1.0 drops nothing).
      epsilon: the spread of keep probabilities around ``density`` (mergekit: 0.15).
      rescale: ``"entry"`` (the paper's ``1/p_keep``) or ``"l1"`` (mergekit's).
    """
    checks.require_key("della", key)
    _check_della(density, epsilon, rescale)
    checks.check_hparams(check_finite=check_finite)
    leaves, treedef, paths = tree_lib.check_stacked(stacked, like=like, warn_state=True)
    if check_finite is True and not any(isinstance(x, jax.core.Tracer) for x in leaves):
        tree_lib.check_finite(stacked)
    host = not any(isinstance(a, jax.core.Tracer) for a in [*leaves, key]) and all(
        d.platform == "cpu" for a in leaves if isinstance(a, jax.Array) for d in a.devices())
    dropped = []
    for i, (path, x) in enumerate(zip(paths, leaves)):
        if host:
            ranks, n = _host_leaf_ranks(path, np.asarray(x))
            ranks = jnp.asarray(ranks)
        else:
            view = matrix.view(path, x.shape[1:], embeddings=True)
            mags = _row_magnitudes(x, view=view)
            n = mags.shape[-1]
            ranks = _leaf_layout(_device_row_ranks(mags), view=view, shape=tuple(x.shape[1:]))
        dropped.append(_della_leaf(x, ranks, jax.random.fold_in(key, i), n=n, density=float(density),
                                   epsilon=float(epsilon), rescale=rescale))
    merged = sparsify.disjoint_merge(jax.tree.unflatten(treedef, dropped),
                                     check_finite=False if check_finite is True else check_finite)
    # A NaN/Inf entry the draw dropped must still show: NaN wherever any task's input is.
    return jax.tree.unflatten(treedef, _nan_where_bad(leaves, jax.tree.leaves(merged)))


@jax.jit
def _nan_where_bad(leaves, merged):
    out = []
    for x, m in zip(leaves, merged):
        bad = ~jnp.isfinite(x[0])
        for t in range(1, x.shape[0]):
            bad = bad | ~jnp.isfinite(x[t])
        out.append(jnp.where(bad, jnp.nan, m).astype(m.dtype))
    return out


