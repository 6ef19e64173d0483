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
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from atm_jax import checks
from atm_jax import tree as tree_lib
from atm_jax.merge import matrix, sparsify
from atm_jax.merge.registry import register

PyTree = Any

__all__ = ["consensus", "della", "tall_masks", "della_keep_probability", "CONSENSUS_BASES",
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
        for t in range(x.shape[0]):
            xt = x[t].astype(acc)
            count = count + (jnp.abs(xt) >= lam[t] * jnp.abs(total - xt)).astype(jnp.int32)
        out.append(jnp.where(count >= k, total, 0).astype(x.dtype))
        counts.append(count)
    return out, counts


def tall_masks(stacked: PyTree, mtl: PyTree, lam) -> PyTree:
    """Each task's TALL mask ``|τ_t| ≥ λ_t |τ_MTL − τ_t|``: booleans shaped ``[T, ...]``."""
    leaves, treedef, _ = tree_lib.check_stacked(stacked)
    lam = jnp.broadcast_to(jnp.asarray(lam, jnp.float32), (leaves[0].shape[0],))
    out = [jnp.abs(x) >= lam.reshape(-1, *([1] * (x.ndim - 1))) * jnp.abs(m[None] - x)
           for x, m in zip(leaves, jax.tree.leaves(mtl))]
    return jax.tree.unflatten(treedef, out)


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


def della_keep_probability(magnitudes: jax.Array, density: float, epsilon: float) -> jax.Array:
    """MAGPRUNE's keep probability of each entry of ``[..., n]`` rows, by rank within its row."""
    n = magnitudes.shape[-1]
    order = jnp.argsort(magnitudes, axis=-1, stable=True)
    iota = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), magnitudes.shape)
    # The inverse permutation of the sort: each entry's 0-based rank in its row.
    ranks = jnp.put_along_axis(jnp.zeros_like(iota), order, iota, axis=-1, inplace=False)
    step = 2.0 * epsilon / (n - 1) if n > 1 else 0.0
    start = density - epsilon if n > 1 else density
    return start + step * ranks.astype(jnp.float32)


def _rows(path: str, x) -> tuple:
    """(to_rows, from_rows) for one task's leaf: DELLA ranks within these rows."""
    v = matrix.view(path, x.shape, embeddings=True)
    if v is not None:
        return v.to_matrix, v.from_matrix
    return (lambda a: a.reshape(*a.shape[:a.ndim - x.ndim], -1)), \
        (lambda a: a.reshape(*a.shape[:-1], *x.shape))


@partial(jax.jit, static_argnames=("density", "epsilon", "rescale", "to_rows", "from_rows"))
def _della_leaf(x, key, *, density, epsilon, rescale, to_rows, from_rows):
    acc = jnp.promote_types(x.dtype, jnp.float32)
    out = []
    for t in range(x.shape[0]):
        xt = x[t].astype(acc)
        rows = to_rows(xt)
        keep_p = della_keep_probability(jnp.abs(rows), density, epsilon)
        u = to_rows(jax.random.uniform(jax.random.fold_in(key, t), xt.shape))
        kept = jnp.where(u < keep_p, rows, 0)
        if rescale == "entry":
            kept = kept / keep_p
        else:
            before, after = jnp.sum(jnp.abs(rows)), jnp.sum(jnp.abs(kept))
            ok = (before >= L1_FLOOR) & (after >= L1_FLOOR)
            kept = jnp.where(ok, kept * (before / jnp.where(ok, after, 1.0)), kept)
        out.append(from_rows(kept).astype(x.dtype))
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
    dropped = []
    for i, (path, x) in enumerate(zip(paths, leaves)):
        to_rows, from_rows = _rows(path, x[0])
        dropped.append(_della_leaf(x, jax.random.fold_in(key, i), density=float(density),
                                   epsilon=float(epsilon), rescale=rescale, to_rows=to_rows,
                                   from_rows=from_rows))
    return sparsify.disjoint_merge(jax.tree.unflatten(treedef, dropped),
                                   check_finite=False if check_finite is True else check_finite)


