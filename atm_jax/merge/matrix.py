"""The matrix view of a leaf: a layer's weight as the papers' ``W ∈ R^{out×in}``.

The spectral and interference merges (TSV-M, Iso-C/CTS, WUDI; RegMean later) treat
each linear layer's update as a matrix acting by ``W x``. Flax stores it otherwise:

==========================================  ===================  =====================
leaf (last path name, shape)                 stored as            matrix
==========================================  ===================  =====================
``kernel`` 2-D (``nn.Dense``, NNX Linear)    ``[in, out]``        ``kernelᵀ``
``kernel`` 3-D, q/k/v (``DenseGeneral``)     ``[d, heads, hd]``   ``reshape(d, heads·hd)ᵀ``
``kernel`` 3-D, attention output             ``[heads, hd, d]``   ``reshape(heads·hd, d)ᵀ``
``weight`` 2-D (PyTorch-style trees)         ``[out, in]``        as stored
``embedding`` (``nn.Embed``), ``*embed*``    ``[rows, d]``        as stored, if asked
anything else                                                     none: the mean
==========================================  ===================  =====================

A 3-D kernel is read by its module's name (``query``/``key``/``value`` take one
input axis, ``out``/``out_proj``/``o_proj`` two), else by its shape (``[d, h, k]``
with ``d = h·k`` is a projection in, ``[h, k, d]`` a projection out). Leaves with
no matrix take the mean over tasks in every matrix merge, as the papers do:
biases, norm scales, bare parameters (class tokens, position tables, CLIP's
``proj``), 1-D and 2-D conv kernels (3-D/4-D ``kernel`` of ``nn.Conv``, such as
the patch embedding), and embeddings unless ``embeddings=True``.

WUDI and Iso-CTS are not transpose-invariant, so the orientation is part of the
result: the tests compare against NumPy written in the papers' ``[out, in]`` layout.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from atm_jax.merge import sparsify

PyTree = Any

__all__ = ["MatrixView", "view", "merge_matrices", "CHUNK_BYTES"]

# Layers of one shape are merged in batches of at most this many input bytes: the
# decompositions run batched, and the copies they need stay a bounded size.
CHUNK_BYTES = 256 << 20

_INPUT_MODULES = ("query", "key", "value", "q", "k", "v", "qkv", "q_proj", "k_proj", "v_proj")
_OUTPUT_MODULES = ("out", "out_proj", "o", "o_proj", "output")


@dataclasses.dataclass(frozen=True)
class MatrixView:
    """How one leaf (shape ``shape``, one task) reads as an ``[out, in]`` matrix.

    ``in_axes``: the leading axes that index the layer's input (Flax kernels), or 0
    for a leaf stored as ``[out, in]`` already (``transpose`` False).
    """
    path: str = dataclasses.field(compare=False)  # views of one layout share programs
    shape: tuple[int, ...] = ()
    in_axes: int = 1
    transpose: bool = True

    @property
    def in_features(self) -> int:
        if not self.transpose:
            return self.shape[-1]
        return math.prod(self.shape[:self.in_axes])

    @property
    def out_features(self) -> int:
        if not self.transpose:
            return self.shape[0]
        return math.prod(self.shape[self.in_axes:])

    @property
    def matrix_shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features

    @property
    def rank(self) -> int:
        """``r = min(out, in)``, the most singular values the matrix has."""
        return min(self.matrix_shape)

    def to_matrix(self, x):
        """``x [..., *shape]`` → ``[..., out, in]`` (leading axes kept)."""
        lead = x.shape[:x.ndim - len(self.shape)]
        if not self.transpose:
            return x
        flat = x.reshape(*lead, self.in_features, self.out_features)
        return jnp.swapaxes(flat, -1, -2)

    def from_matrix(self, w):
        """``w [..., out, in]`` → ``[..., *shape]``: the inverse of :meth:`to_matrix`."""
        if not self.transpose:
            return w
        lead = w.shape[:-2]
        return jnp.swapaxes(w, -1, -2).reshape(*lead, *self.shape)


def _names(path: str) -> list[str]:
    """Path components; dots separate them too (flat PyTorch keys: ``encoder.fc.weight``)."""
    cleaned = path.replace("[", "/").replace("]", "").replace("'", "").replace(".", "/")
    return [p for p in cleaned.split("/") if p]


def view(path: str, shape, *, embeddings: bool = False) -> MatrixView | None:
    """The matrix view of a leaf at ``path`` with (one task's) ``shape``, or None.

    Args:
      path: the leaf path as `atm_jax.tree.leaf_paths` writes it (``a/b/kernel``), or a
        flat PyTorch key (``a.b.weight``).
      shape: the leaf's shape without the task axis.
      embeddings: also read embedding tables (``nn.Embed``'s ``embedding``, or a
        2-D ``weight`` whose path names an embedding) as matrices, rows as stored.
    """
    shape = tuple(int(s) for s in shape)
    names = _names(path)
    leaf = names[-1] if names else ""
    module = names[-2].lower() if len(names) > 1 else ""
    is_embedding = leaf == "embedding" or (leaf == "weight" and "embed" in path.lower())
    if is_embedding:
        if embeddings and len(shape) == 2:
            return MatrixView(path, shape, 0, False)
        return None
    if leaf == "weight" and len(shape) == 2:
        return MatrixView(path, shape, 0, False)
    if leaf != "kernel" or len(shape) not in (2, 3) or 0 in shape:
        return None
    if len(shape) == 2:
        return MatrixView(path, shape, 1, True)
    if module in _INPUT_MODULES:
        return MatrixView(path, shape, 1, True)
    if module in _OUTPUT_MODULES:
        return MatrixView(path, shape, 2, True)
    a, b, c = shape
    if a == b * c and c != a * b:
        return MatrixView(path, shape, 1, True)
    if c == a * b and a != b * c:
        return MatrixView(path, shape, 2, True)
    return None  # a 1-D conv kernel [width, in, out], or unreadable: the mean


def merge_matrices(stacked: PyTree, merge_batch: Callable[[jax.Array], jax.Array], *,
                   embeddings: bool = False, check_finite: bool | str = True,
                   like: PyTree | None = None) -> PyTree:
    """The driver of every matrix merge: ``merge_batch`` on the matrix leaves, the mean elsewhere.

    Args:
      stacked: task vectors, leaves ``[T, *shape]``.
      merge_batch: ``[L, T, out, in] -> [L, out, in]`` for L layers of one shape
        (float32 or wider), jitted by the caller with its hyperparameters static.
      embeddings, check_finite, like: as the operators take them (see `view` and
        `atm_jax.merge.sparsify`).

    A layer where any task holds NaN or Inf comes out NaN in full (its decomposition
    mixes every entry); the eager check raises first, naming the leaf and task.
    """
    if not isinstance(embeddings, bool):
        raise TypeError(f"embeddings={embeddings!r} must be True or False.")
    leaves, treedef, paths = sparsify.checked_leaves(stacked, like=like, check_finite=check_finite)
    views = [view(path, x.shape[1:], embeddings=embeddings) for path, x in zip(paths, leaves)]
    out: list = [None] * len(leaves)
    rest = [i for i, v in enumerate(views) if v is None]
    if rest:
        means = sparsify.mean({str(i): leaves[i] for i in rest}, check_finite=False)
        for i in rest:
            out[i] = means[str(i)]
    groups: dict[tuple, list[int]] = {}
    for i, v in enumerate(views):
        if v is not None:
            groups.setdefault((v.matrix_shape, leaves[i].dtype), []).append(i)
    for (shape, dtype), members in groups.items():
        per_layer = leaves[members[0]].shape[0] * math.prod(shape) * jnp.dtype(dtype).itemsize
        size = max(1, CHUNK_BYTES // per_layer)
        for start in range(0, len(members), size):
            chunk = members[start:start + size]
            mats = jnp.stack([views[i].to_matrix(leaves[i]) for i in chunk])
            merged = _merge_chunk(mats, merge_batch)
            for j, i in enumerate(chunk):
                out[i] = views[i].from_matrix(merged[j]).astype(leaves[i].dtype)
    return jax.tree.unflatten(treedef, out)


def _merge_chunk(mats: jax.Array, merge_batch) -> jax.Array:
    """Decompositions see finite float32 (or wider) input; a layer with NaN/Inf is NaN."""
    compute = jnp.promote_types(mats.dtype, jnp.float32)
    finite = jnp.isfinite(mats)
    bad = ~jnp.all(finite, axis=(1, 2, 3))
    merged = merge_batch(jnp.where(finite, mats, 0).astype(compute))
    return jnp.where(bad[:, None, None], jnp.nan, merged)
