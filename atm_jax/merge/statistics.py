"""Merges that weigh the tasks by statistics of a little of their data.

Like every merge they take task vectors and return one delta; the statistics are
explicit arguments (`atm_jax.capture` computes them; `atm_jax.merge_spec.MergeData`
does it for `merge_step`, the runner and the ATM loop).

**RegMean** (Jin et al., ICLR 2023, "Dataless Knowledge Fusion by Merging Weights of
Language Models"): per linear layer, with ``K_t`` the task's kernel as ``[in, out]``
(the transpose of the matrix view, `atm_jax.merge.matrix`) and ``G_t`` the Gram of
the layer's inputs on task t's data,

    G̃_t = a·G_t + (1 − a)·diag(G_t),     K* = (Σ_t G̃_t)⁻¹ Σ_t G̃_t K_t,

the minimiser of ``Σ_t ‖X_t K − X_t K_t‖²`` when ``a = 1``; ``a < 1`` shrinks the
off-diagonal entries towards the mean (``off_diagonal_scale``, FusionBench's CLIP
default 0.95). Because the weights ``(ΣG̃)⁻¹G̃_t`` sum to the identity, merging
task vectors gives the same model as merging weights. The system is solved (LU),
never inverted. An input feature that is zero on every task's data (a zero row of
``ΣG̃``) does not constrain its kernel row: it takes the mean over tasks. Leaves
with no matrix view, or none given a Gram, take the mean.

**RegMean++** (Nguyen et al. 2025, "RegMean++: Enhancing Effectiveness and
Generalization of Regression Mean for Model Merging"): the same solve, but the
inputs of layer ``l`` come from the *merged* model's earlier layers: layers are
merged one group at a time in forward order, and each task's Grams for a group are
captured with the groups before it already merged (the group and those after it
still the task's own). A group is a block: the path up to its first component
with a digit (``encoder/layer_3``, ``block_2``, ``layers/0``), else the layer's
module. Leaves outside every group that holds a linear layer (embeddings, tables
before the first block, a final norm) take the mean from the start.

**Fisher merging** (Matena & Raffel, NeurIPS 2022): per entry,

    θ* = Σ_t F̃_t θ_t / Σ_t F̃_t,    F̃_t = c_t (F_t + floor),

with ``F_t`` the diagonal Fisher and ``floor`` FusionBench's ``minimal_fisher_weight``.
``normalize=True`` is FusionBench's ``normalize_fisher_weight``: ``c_t ∝ 1 / (‖F_t‖ +
floor)`` with the norm over every merged leaf, ``Σ c_t = 1``; the paper's own rule
is ``c_t = 1`` (the default here).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from atm_jax import capture, checks
from atm_jax.merge import matrix, sparsify
from atm_jax.merge.registry import register

PyTree = Any

__all__ = ["regmean", "regmean_pp", "fisher", "stacked_grams", "block_of"]


def _check_scale(off_diagonal_scale) -> None:
    checks.check_range("off_diagonal_scale", off_diagonal_scale, 0, 1, lo_open=False,
                       hi_open=False, hint="RegMean's a in [0, 1]: 1 is the least-squares solution, "
                            "FusionBench's CLIP default 0.95.")


def stacked_grams(grams, paths: Sequence[str]) -> dict[str, jax.Array]:
    """``{path: [T, in, in]}`` from a mapping of stacks or from T per-task mappings
    (a `atm_jax.capture.Grams` stands for its per-row mean, as RegMean's code uses)."""
    if isinstance(grams, Mapping):
        return {p: jnp.asarray(grams[p]) for p in paths if p in grams}
    per_task = [g.mean() if isinstance(g, capture.Grams) else g for g in grams]
    if not per_task:
        raise ValueError("regmean got no Gram matrices: pass one mapping per task.")
    return {p: jnp.stack([jnp.asarray(g[p]) for g in per_task]) for p in paths
            if all(p in g for g in per_task)}


@partial(jax.jit, static_argnames=("scale",))
def _solve(kernels: jax.Array, grams: jax.Array, *, scale: float) -> jax.Array:
    """``kernels [T, in, out]``, ``grams [T, in, in]`` → ``K* [in, out]``."""
    compute = jnp.promote_types(kernels.dtype, jnp.float32)
    k, g = kernels.astype(compute), grams.astype(compute)
    eye = jnp.eye(g.shape[-1], dtype=compute)
    shrink = scale + (1.0 - scale) * eye
    a = b = 0.0
    for t in range(g.shape[0]):  # unrolled: XLA:CPU reduces over a leading axis slowly
        gt = g[t] * shrink
        a = a + gt
        b = b + jnp.matmul(gt, k[t], precision=jax.lax.Precision.HIGHEST)
    dead = jnp.diagonal(a) == 0  # a zero row: the feature never fires on any task's data
    a = a + jnp.diag(dead.astype(compute))
    b = jnp.where(dead[:, None], jnp.mean(k, axis=0), b)
    return jnp.linalg.solve(a, b)


def _regmean_leaf(x: jax.Array, gram: jax.Array, v: matrix.MatrixView, scale: float, path: str):
    if gram.shape != (x.shape[0], v.in_features, v.in_features):
        raise ValueError(f"leaf {path!r}: its Gram stack has shape {tuple(gram.shape)}; a "
                         f"{x.shape[0]}-task stack of in={v.in_features} inputs needs "
                         f"{(x.shape[0], v.in_features, v.in_features)}.")
    kernels = jnp.swapaxes(v.to_matrix(x), -1, -2)
    merged = _solve(kernels, gram, scale=float(scale))
    if not isinstance(merged, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(merged))):
        raise ValueError(f"leaf {path!r}: the summed Gram is singular (more inputs than "
                         "independent rows at off_diagonal_scale=1?); use off_diagonal_scale "
                         "< 1 or more examples per task.")
    return v.from_matrix(jnp.swapaxes(merged, -1, -2)).astype(x.dtype)


def _regmean_leaves(leaves, paths, grams: Mapping[str, jax.Array], scale: float, skip=()):
    """Per leaf: the RegMean solve where there is a matrix view and a Gram, else None."""
    out = []
    for path, x in zip(paths, leaves):
        v = matrix.view(path, x.shape[1:])
        if v is None or path not in grams or path in skip:
            out.append(None)
        else:
            out.append(_regmean_leaf(x, grams[path], v, scale, path))
    return out


def _mean_where_none(out: list, leaves) -> list:
    todo = {str(i): leaves[i] for i, o in enumerate(out) if o is None}
    if todo:
        means = sparsify.mean(todo, check_finite=False)
        out = [means[str(i)] if o is None else o for i, o in enumerate(out)]
    return out


@register("regmean", reference="Jin et al. 2023 (RegMean), https://arxiv.org/abs/2212.09849",
          validate=lambda off_diagonal_scale: _check_scale(off_diagonal_scale),
          uses="statistics", data=("grams",))
def regmean(stacked: PyTree, *, key: jax.Array | None = None, grams=None,
            off_diagonal_scale: float = 0.95, check_finite: bool | str = True,
            like: PyTree | None = None) -> PyTree:
    """RegMean: per linear layer the kernel that best matches every task's outputs on
    its own inputs (module docstring).

    Args:
      grams: per task the Grams of its inputs: a sequence of T ``{kernel path: [in,
        in]}`` mappings (or `atm_jax.capture.Grams`, read as per-row means), or one
        ``{path: [T, in, in]}`` mapping.
      off_diagonal_scale: ``a``; 1 gives the joint least-squares solution.
    """
    del key
    if grams is None:
        raise ValueError("regmean needs each task's input Gram matrices: grams=[capture."
                         "input_grams(apply_fn, finetuned_t, inputs_t) for each task], or "
                         "merge_step(..., data=MergeData(...)).")
    _check_scale(off_diagonal_scale)
    leaves, treedef, paths = sparsify.checked_leaves(stacked, like=like, check_finite=check_finite)
    grams = stacked_grams(grams, paths)
    if not grams:
        raise ValueError(f"regmean: none of the {len(paths)} merged leaves has a Gram matrix "
                         f"(first leaf {paths[0]!r}); the Grams are keyed by kernel leaf path.")
    out = _mean_where_none(_regmean_leaves(leaves, paths, grams, off_diagonal_scale), leaves)
    return jax.tree.unflatten(treedef, out)


def _check_pp(off_diagonal_scale, batch_size) -> None:
    _check_scale(off_diagonal_scale)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive int (default 64).")


def block_of(path: str) -> str:
    """RegMean++'s group of a leaf: the path through its first component with a digit,
    else its module (the path without the leaf name)."""
    parts = path.split("/")
    for i, part in enumerate(parts[:-1]):
        if re.search(r"\d", part):
            return "/".join(parts[:i + 1])
    return "/".join(parts[:-1])


@register("regmean_pp", reference="Nguyen et al. 2025 (RegMean++), https://arxiv.org/abs/2508.03121",
          validate=lambda off_diagonal_scale, batch_size: _check_pp(off_diagonal_scale,
                                                                    batch_size),
          uses="model", data=("base", "apply_fn", "inputs", "token_mask"))
def regmean_pp(stacked: PyTree, *, key: jax.Array | None = None, base: PyTree = None,
               apply_fn: Callable | None = None, inputs: Sequence | None = None,
               token_mask: Callable | None = None, off_diagonal_scale: float = 0.95,
               batch_size: int = 64, check_finite: bool | str = True,
               like: PyTree | None = None) -> PyTree:
    """RegMean++: RegMean block by block, each block's inputs from the merged blocks
    before it (module docstring).

    Args:
      base: the weights the task vectors start from (``θ_t = base + τ_t``).
      apply_fn: ``(params, inputs [B, ...]) -> anything`` calling the layers (see
        `atm_jax.capture.input_grams`).
      inputs: per task ``[N_t, ...]`` inputs, in the stack's task order.
      token_mask, batch_size: as `atm_jax.capture.input_grams` takes them.
      off_diagonal_scale: RegMean's ``a``.
    """
    del key
    if base is None or apply_fn is None or inputs is None:
        raise ValueError("regmean_pp runs the model: pass base=, apply_fn=(params, inputs) and "
                         "inputs=[per-task arrays], or merge_step(..., data=MergeData(...)).")
    _check_pp(off_diagonal_scale, batch_size)
    leaves, treedef, paths = sparsify.checked_leaves(stacked, like=like, check_finite=check_finite)
    if len(inputs) != leaves[0].shape[0]:
        raise ValueError(f"regmean_pp: {len(inputs)} input sets for {leaves[0].shape[0]} tasks.")
    base_leaves = [checks.leaf_dict(base)[p] for p in paths]
    tasks = range(leaves[0].shape[0])

    def model(choice: Sequence):
        """params with each leaf from the merged delta (array) or task t's (int)."""
        return jax.tree.unflatten(treedef, [b + (c if not isinstance(c, int) else x[c])
                                            for b, x, c in zip(base_leaves, leaves, choice)])

    def grams_for(choice, only) -> dict:
        per_task = []
        for t in tasks:
            params = model([t if isinstance(c, str) else c for c in choice])
            g = capture.input_grams(apply_fn, params, inputs[t], batch_size=batch_size,
                                    token_mask=token_mask, only=only)
            per_task.append(g.mean())
        return {p: jnp.stack([g[p] for g in per_task]) for p in only}

    first = capture.input_grams(apply_fn, model([0] * len(paths)), inputs[0][:1],
                                batch_size=1, token_mask=token_mask)
    linear = [p for p in first.order if p in set(paths) and matrix.view(
        p, leaves[paths.index(p)].shape[1:]) is not None]
    blocks = list(dict.fromkeys(block_of(p) for p in linear))
    out: list = ["own"] * len(paths)  # "own": still each task's; else the merged delta
    linear_set = set(linear)  # solved leaves need no mean
    means = _mean_where_none([0 if p in linear_set else None for p in paths], leaves)
    for i, p in enumerate(paths):
        if block_of(p) not in blocks:
            out[i] = means[i]
    for block in blocks:
        members = [i for i, p in enumerate(paths) if block_of(p) == block]
        only = [paths[i] for i in members if paths[i] in linear]
        grams = grams_for(out, only)
        solved = _regmean_leaves([leaves[i] for i in members], [paths[i] for i in members],
                                 grams, off_diagonal_scale)
        for i, s in zip(members, solved):
            out[i] = means[i] if s is None else s
    return jax.tree.unflatten(treedef, out)


def _check_keys(stats: Mapping, paths, fix: str) -> None:
    """Raises naming the first leaf of ``paths`` that ``stats`` lacks."""
    missing = [p for p in paths if p not in stats]
    if missing:
        raise ValueError(f"no Fisher for leaf {missing[0]!r} ({len(missing)} missing); {fix}")


def _check_fisher(floor, normalize) -> None:
    checks.check_range("floor", floor, 0, float("inf"), lo_open=False, hi_open=True,
                       hint="FusionBench's minimal_fisher_weight is 1e-6.")
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize={normalize!r} must be True or False.")


@register("fisher", reference="Matena & Raffel 2022 (Fisher merging), "
          "https://arxiv.org/abs/2111.09832", validate=_check_fisher, uses="statistics",
          data=("fishers",))
def fisher(stacked: PyTree, *, key: jax.Array | None = None, fishers=None, floor: float = 1e-6,
           normalize: bool = False, check_finite: bool | str = True,
           like: PyTree | None = None) -> PyTree:
    """Fisher merging: each entry the Fisher-weighted mean of the tasks' (module docstring).

    Args:
      fishers: per task the diagonal Fisher (`atm_jax.capture.diagonal_fisher`): a
        sequence of T trees like one task vector, or one stacked tree ``[T, ...]``.
      floor: added to every Fisher entry (a task with zero Fisher still counts).
      normalize: FusionBench's per-model normalisation by the Fisher's global norm.
    """
    del key
    if fishers is None:
        raise ValueError("fisher needs each task's diagonal Fisher: fishers=[capture."
                         "diagonal_fisher(logits_fn, finetuned_t, inputs_t, labels_t) for each "
                         "task], or merge_step(..., data=MergeData(...)).")
    _check_fisher(floor, normalize)
    leaves, treedef, paths = sparsify.checked_leaves(stacked, like=like, check_finite=check_finite)
    if isinstance(fishers, (list, tuple)):
        maps = [checks.leaf_dict(f) for f in fishers]
        _check_keys(maps[0], paths, "pass a Fisher tree per task with the task vectors' "
                    "leaves.")
        stacked_f = [jnp.stack([jnp.asarray(m[p]) for m in maps]) for p in paths]
    else:
        m = checks.leaf_dict(fishers)
        _check_keys(m, paths, "pass a stacked Fisher tree [T, ...] with the task vectors' "
                    "leaves.")
        stacked_f = [jnp.asarray(m[p]) for p in paths]
    for p, x, f in zip(paths, leaves, stacked_f):
        if f.shape != x.shape:
            raise ValueError(f"leaf {p!r}: Fisher stack {tuple(f.shape)} vs task vectors "
                             f"{tuple(x.shape)}.")
    weights = np.ones(leaves[0].shape[0])
    if normalize:
        flat = [np.asarray(f).reshape(f.shape[0], -1) for f in stacked_f]
        norms = np.sqrt(sum(np.einsum("ti,ti->t", f, f, dtype=np.float64) for f in flat))
        inverse = 1.0 / (norms + floor)
        weights = inverse / inverse.sum()
    dtype = jnp.promote_types(leaves[0].dtype, jnp.float32)
    out = [_fisher_leaf(x, f, jnp.asarray(weights, dtype), floor=float(floor))
           for x, f in zip(leaves, stacked_f)]
    return jax.tree.unflatten(treedef, out)


@partial(jax.jit, static_argnames=("floor",))
def _fisher_leaf(x: jax.Array, f: jax.Array, weights: jax.Array, *, floor: float) -> jax.Array:
    compute = jnp.promote_types(x.dtype, jnp.float32)
    num = den = 0.0
    for t in range(x.shape[0]):  # unrolled: XLA:CPU reduces over a leading axis slowly
        w = (f[t].astype(compute) + floor) * weights[t].astype(compute)
        num, den = num + w * x[t].astype(compute), den + w
    return (num / den).astype(x.dtype)

