"""Orthogonality and trajectory numbers: mean |cos| of task vectors, PCA of models.

The PCA of the paper's Fig. 8 is computed from the Gram matrix of the flattened
models, filled pair by pair from ``.npy`` files (memory-mapped: at most two models
are read at a time), then double-centred and eigen-decomposed: for n models of d
parameters that is O(n² d) reads and O(n³) work, never an n × d matrix.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["mean_abs_cosine", "cosine_from_vectors", "gram_from_files", "pca_from_gram",
           "pca_from_files"]


def mean_abs_cosine(cosine) -> float:
    """Mean |cos| over the off-diagonal pairs of a T×T cosine matrix (Figs. 9/10);
    NaN for a single task."""
    c = np.asarray(cosine, np.float64)
    if c.ndim != 2 or c.shape[0] != c.shape[1]:
        raise ValueError(f"a cosine matrix is square T×T; got shape {c.shape}.")
    t = c.shape[0]
    if t < 2:
        return float("nan")
    return float(np.abs(c[~np.eye(t, dtype=bool)]).mean())


def cosine_from_vectors(vectors: np.ndarray) -> np.ndarray:
    """T×T cosine matrix of the rows of ``vectors`` (0 where a row is zero)."""
    v = np.asarray(vectors, np.float64)
    norms = np.linalg.norm(v, axis=1)
    denom = np.outer(norms, norms)
    gram = v @ v.T
    return np.where(denom > 0, gram / np.where(denom > 0, denom, 1.0), 0.0)


def gram_from_files(paths: Sequence, *, relative_to_first: bool = True) -> np.ndarray:
    """``G[i, j] = <x_i - x_0, x_j - x_0>`` (float64) of flattened models saved as
    ``.npy`` files, reading three at a time (``relative_to_first=False``: plain
    ``<x_i, x_j>``). Subtracting the first model (the pretrained base) changes no PCA
    but keeps the small differences between models out of cancellation."""
    n = len(paths)
    gram = np.zeros((n, n))
    first = np.load(paths[0], mmap_mode="r") if n else None

    def load(path):
        x = np.load(path, mmap_mode="r")
        if x.shape != first.shape:
            raise ValueError(f"{path} holds {x.shape} parameters but {paths[0]} {first.shape}: "
                             "the trajectory mixes models of different shapes.")
        x = x.astype(np.float64)
        return x - first if relative_to_first else x

    for i in range(n):
        xi = load(paths[i])
        for j in range(i, n):
            xj = xi if j == i else load(paths[j])
            gram[i, j] = gram[j, i] = float(np.dot(xi, xj))
    return gram


def pca_from_gram(gram, components: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """PCA scores of n points from their Gram matrix.

    Centring in feature space is ``H G H`` with ``H = I - 11ᵀ/n``; its eigenpairs
    ``(λ, u)`` give the scores ``u √λ`` (what an SVD of the centred n × d matrix
    gives). Signs are fixed so each component's largest-|score| entry is positive.

    Returns:
      ``(scores [n, components], explained variance ratio [components])``.
    """
    g = np.asarray(gram, np.float64)
    n = g.shape[0]
    h = np.eye(n) - np.full((n, n), 1.0 / n)
    centred = h @ g @ h
    centred = (centred + centred.T) / 2
    values, vectors = np.linalg.eigh(centred)
    order = np.argsort(values)[::-1]
    values = np.clip(values[order], 0.0, None)
    vectors = vectors[:, order]
    k = min(components, n)
    scores = vectors[:, :k] * np.sqrt(values[:k])
    for c in range(k):
        if scores[np.argmax(np.abs(scores[:, c])), c] < 0:
            scores[:, c] *= -1
    total = values.sum()
    ratio = values[:k] / total if total > 0 else np.zeros(k)
    return scores, ratio


def pca_from_files(paths: Sequence, components: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """`pca_from_gram` of `gram_from_files`."""
    return pca_from_gram(gram_from_files(paths), components)
