"""Interpolation merges: SLERP (two models) and Model Stock, one leaf at a time.

* **SLERP** (as mergekit runs it, per tensor): the two finetuned weights
  ``v_i = base + τ_i``, flattened, meet at the angle ``Ω = arccos(v̂_0 · v̂_1)``
  (``v̂ = v / ‖v‖``, or ``v`` itself where ``‖v‖ ≤ 1e-8``); the merge is
  ``sin((1−t)Ω)/sin Ω · v_0 + sin(tΩ)/sin Ω · v_1``, or ``(1−t) v_0 + t v_1`` where
  the two are nearly parallel (``|cos Ω| > 0.9995``). Returned as the delta from
  ``base`` (computed from the τ_i, not by subtracting weights), so ``apply`` works.
* **Model Stock** (Jang et al., ECCV 2024), per leaf: ``cos φ`` is the mean over
  task pairs of the cosine between their task vectors, ``t = T cos φ / (1 + (T−1) cos φ)``,
  and the merged weights ``t · mean_t(w_t) + (1−t) · w_0`` are the delta
  ``t · mean_t(τ_t)``. A pair with a zero task vector counts as cosine 0.

NaN policy: a leaf where any input is NaN or Inf comes out NaN (the angle and the
cosines mix every entry); the eager check raises, naming leaf and task (SLERP runs it
only where its own sums come out non-finite).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from atm_jax import checks
from atm_jax import tree as tree_lib
from atm_jax.merge import sparsify
from atm_jax.merge.registry import register

PyTree = Any

__all__ = ["slerp", "model_stock", "PARALLEL_COSINE", "NORM_EPS"]

PARALLEL_COSINE = 0.9995  # above this |cos Ω|, SLERP falls back to linear interpolation
NORM_EPS = 1e-8


def _acc(x):
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


ROW = 128  # entries per partial sum of SLERP's one-pass reductions


def _rows(x, width):
    flat = x.ravel()
    return jnp.pad(flat, (0, -flat.size % width)).reshape(-1, width)


def _sums(v0, v1):
    """``(v0·v0, v1·v1, v0·v1)`` in one pass over both (one variadic reduce), accurate
    as a plain dot: each row of ``ROW`` entries sums apart, then the rows' sums."""
    v0, v1 = _rows(v0, ROW), _rows(v1, ROW)
    partial = jax.lax.reduce((v0 * v0, v1 * v1, v0 * v1), (0.0, 0.0, 0.0),
                             lambda a, b: (a[0] + b[0], a[1] + b[1], a[2] + b[2]), (1,))
    return tuple(jnp.sum(q) for q in partial)


@jax.jit
def _slerp_leaves(leaves, bases, t):
    """The merged deltas, and per leaf whether its sums are finite (False wherever an
    input holds NaN or Inf, so the eager check needs no pass of its own)."""
    out, finite = [], []
    for x, b in zip(leaves, bases):
        tau0, tau1, b = _acc(x[0]), _acc(x[1]), _acc(b)
        v0, v1 = b + tau0, b + tau1
        s00, s11, s01 = _sums(v0, v1)
        n0, n1 = jnp.sqrt(s00), jnp.sqrt(s11)
        cos = s01 / (jnp.where(n0 > NORM_EPS, n0, 1.0) * jnp.where(n1 > NORM_EPS, n1, 1.0))
        omega = jnp.arccos(jnp.clip(cos, -1.0, 1.0))
        sin = jnp.sin(omega)
        parallel = jnp.abs(cos) > PARALLEL_COSINE
        safe = jnp.where(parallel, 1.0, sin)
        s0 = jnp.where(parallel, 1.0 - t, jnp.sin((1.0 - t) * omega) / safe)
        s1 = jnp.where(parallel, t, jnp.sin(t * omega) / safe)
        # s0 v0 + s1 v1 - b, without forming the weights' difference.
        delta = s0 * tau0 + s1 * tau1 + (s0 + s1 - 1.0) * b
        out.append(delta.astype(x.dtype))
        finite.append(jnp.isfinite(s00 + s11 + s01))
    return out, jnp.stack(finite)


def _check_t(t) -> None:
    checks.check_range("t", t, 0, 1, lo_open=False, hi_open=False,
                       hint="It is the interpolation point: 0 is the first model, 1 the second.")


@register("slerp", reference="Shoemake 1985; mergekit's SLERP, https://github.com/arcee-ai/mergekit",
          needs_base=True, validate=lambda t: _check_t(t))
def slerp(stacked: PyTree, *, key: jax.Array | None = None, t: float = 0.5,
          base: PyTree | None = None, check_finite: bool | str = True,
          like: PyTree | None = None) -> PyTree:
    """Spherical interpolation between two finetuned models, per tensor, as a delta.

    Args:
      stacked: the two task vectors, leaves ``[2, ...]``.
      t: 0 gives the first model (``base + τ_0``), 1 the second.
      base: the base weights (same structure, unstacked): SLERP interpolates
        weights, not deltas. `atm_jax.merge_spec.merge_step` passes it.
    """
    del key
    _check_t(t)
    if base is None:
        raise ValueError("slerp interpolates weights, so it needs the base: pass base=<the base "
                         "params the task vectors were taken from> (MergeSpec/ATM pass it).")
    checks.check_hparams(check_finite=check_finite)
    # The eager check rides on the merge's own sums: only where a leaf's sums are not
    # finite does the full check run (it raises naming leaf and task).
    eager = check_finite is True
    leaves, treedef, paths = sparsify.checked_leaves(
        stacked, like=base if like is None else like,
        check_finite=False if eager else check_finite)
    if leaves[0].shape[0] != 2:
        raise ValueError(f"slerp merges exactly two models; got {leaves[0].shape[0]} task vectors "
                         f"(leaf {paths[0]!r}). For more, use model_stock or a mean.")
    ref = dict(zip(tree_lib.leaf_paths(base), jax.tree.leaves(base)))
    out, finite = _slerp_leaves(leaves, [jnp.asarray(ref[p]) for p in paths], jnp.float32(t))
    if eager and not isinstance(finite, jax.core.Tracer) and not np.asarray(finite).all():
        checks.check_finite(stacked)
    return jax.tree.unflatten(treedef, out)


@jax.jit
def _model_stock_leaves(leaves):
    out = []
    for x in leaves:
        num_tasks = x.shape[0]
        flat = _acc(x).reshape(num_tasks, -1)
        # Pairwise dots and the sum as separate fused passes: XLA:CPU runs the [T, n] x
        # [n, T] product and a reduction over the task axis several times slower.
        dots = {}
        for i in range(num_tasks):
            for j in range(i, num_tasks):
                dots[i, j] = dots[j, i] = jnp.vdot(flat[i], flat[j])
        gram = jnp.stack([jnp.stack([dots[i, j] for j in range(num_tasks)])
                          for i in range(num_tasks)])
        total = flat[0]
        for t in range(1, num_tasks):
            total = total + flat[t]
        norm = jnp.sqrt(jnp.diagonal(gram))
        denom = norm[:, None] * norm[None, :]
        cosine = jnp.where(denom > 0, gram / jnp.where(denom > 0, denom, 1.0), 0.0)
        pairs = num_tasks * (num_tasks - 1) / 2
        cos = (jnp.sum(cosine) - jnp.trace(cosine)) / (2 * pairs)
        ratio = num_tasks * cos / (1.0 + (num_tasks - 1) * cos)
        # A NaN/Inf task has no angle: the whole leaf comes out NaN (its cosines would read 0).
        ratio = jnp.where(jnp.all(jnp.isfinite(gram)), ratio, jnp.nan)
        out.append((ratio * (total / num_tasks)).reshape(x.shape[1:]).astype(x.dtype))
    return out


@register("model_stock", reference="Jang et al. 2024 (Model Stock), https://arxiv.org/abs/2403.19522")
def model_stock(stacked: PyTree, *, key: jax.Array | None = None, check_finite: bool | str = True,
                like: PyTree | None = None) -> PyTree:
    """Model Stock: the mean task vector shrunk per leaf by the tasks' mean pairwise cosine.

    No hyperparameters. Needs at least two task vectors.
    """
    del key
    leaves, treedef, paths = sparsify.checked_leaves(stacked, like=like,
                                                       check_finite=check_finite)
    if leaves[0].shape[0] < 2:
        raise ValueError("model_stock needs at least two task vectors (it reads the angle "
                         f"between them); got {leaves[0].shape[0]} (leaf {paths[0]!r}).")
    return jax.tree.unflatten(treedef, _model_stock_leaves(leaves))


