"""Spectral merges: TSV-M, Iso-C and Iso-CTS, one SVD-based program per layer shape.

Each reads every linear layer's task update as the papers' ``Δ_t ∈ R^{m×n}``
(``out × in``, `atm_jax.merge.matrix`), ``r = min(m, n)``; leaves with no matrix
take the mean over tasks. ``polar(X)`` is the orthogonal factor ``P Qᵀ`` of the
thin SVD ``X = P S Qᵀ`` (the nearest matrix with orthonormal columns).

* **TSV-M** (Gargiulo et al., CVPR 2025): ``k = ⌊r/T⌋``; each task's top ``k``
  singular triplets ``(U_t,k, Σ_t,k, V_t,k)``; ``U = [U_1,k … U_T,k]``, ``V`` alike,
  ``Σ`` their singular values; ``Δ = polar(U) diag(Σ) polar(V)ᵀ``. Where ``k = 0``
  (a layer narrower than the number of tasks) the layer takes the mean.
* **Iso-C** (Marczak et al., ICML 2025): ``S = Σ_t Δ_t = U Σ Vᵀ``;
  ``Δ = σ̄ U Vᵀ`` with ``σ̄`` the mean of all ``r`` singular values of ``S``.
* **Iso-CTS** (same paper): the common space is ``S``'s top ``c`` directions,
  ``c = r − T·round((r − ⌊f·r⌋)/T)`` for ``common_space_fraction = f`` (at most
  ``T·⌊r/T⌋`` task directions, so ``c ≥ 0`` on narrow layers), so the
  ``r − c`` task-specific directions split evenly: each task adds the top
  ``s = (r − c)/T`` singular directions of ``Δ_t − U_c U_cᵀ Δ_t``;
  ``Δ = σ̄ polar([U_c, U_1,s …]) polar([V_c, V_1,s …])ᵀ`` with ``σ̄`` the mean of
  the kept singular values (``S``'s top ``c`` and each projected task's top ``s``).

Signs: every product above pairs a left with its own right singular vector, so
the result does not depend on the sign LAPACK gives each pair.

Decompositions (``method``): ``"svd"`` takes every singular triplet from LAPACK's
thin SVD. ``"auto"`` (default) gets the same numbers faster where only a few
triplets or an orthogonal factor are needed: a task's top ``k`` triplets from the
eigenvectors of its Gram matrix ``ΔᵀΔ`` (or ``ΔΔᵀ``), refined by one Rayleigh–Ritz
step (QR of ``Δ Q_k``, then the small SVD of ``Q_bᵀ Δ``); a polar factor from the
eigendecomposition of ``XᵀX`` plus one Newton–Schulz step, falling back to the SVD
when ``X`` is ill-conditioned (smallest/largest eigenvalue of ``XᵀX`` below
1e-4); Iso-C's flat spectrum likewise (the mean singular value is the mean square
root of those eigenvalues). How close the two are: docs/data_free_merges.md.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from atm_jax import checks
from atm_jax.merge import matrix
from atm_jax.merge.registry import register

PyTree = Any

__all__ = ["tsv", "iso_c", "iso_cts", "polar", "top_triplets", "common_space_size", "METHODS"]

METHODS = ("auto", "svd")
ILL_CONDITIONED = 1e-4  # λ_min/λ_max of XᵀX below which a polar factor takes the SVD


def _t(x):
    return jnp.swapaxes(x, -1, -2)


@jax.jit
def _polar_svd(x):
    p, _, qt = jnp.linalg.svd(x, full_matrices=False)
    return p @ qt


def _conditioned(w):
    """Per matrix: λ_min/λ_max of XᵀX (ascending ``w``) is large enough for the fast path."""
    return w[..., 0] >= ILL_CONDITIONED * jnp.maximum(w[..., -1], jnp.finfo(w.dtype).tiny)


def _inverse_root_polar(x, w, q):
    """``x (xᵀx)^(-1/2)`` from ``eigh(xᵀx) = (w, q)``, then one Newton–Schulz step for the
    rounding of the inverse root."""
    inv_sqrt = jax.lax.rsqrt(jnp.maximum(w, jnp.finfo(x.dtype).tiny))
    p = x @ ((q * inv_sqrt[..., None, :]) @ _t(q))
    eye = jnp.eye(x.shape[-1], dtype=x.dtype)
    return p @ (1.5 * eye - 0.5 * (_t(p) @ p))


@jax.jit
def _polar_eigh(x):
    w, q = jnp.linalg.eigh(_t(x) @ x)
    return _inverse_root_polar(x, w, q), _conditioned(w)


def _exact_where_needed(fast, ok, x, exact):
    """``fast``, with the matrices whose ``ok`` is False recomputed by ``exact``.

    Concrete arrays: the host picks those matrices and only they take ``exact``.
    Traced (under an outer ``jax.jit``): both are computed and selected, never
    ``lax.cond``: XLA:CPU deadlocks running two conditionals that hold LAPACK calls
    on a two-thread pool (seen here on TSV's two polar factors).
    """
    if isinstance(ok, jax.core.Tracer):
        return jnp.where(ok[..., None, None], fast, exact(x))
    bad = np.flatnonzero(~np.asarray(ok).reshape(-1))
    if bad.size == 0:
        return fast
    flat = fast.reshape(-1, *fast.shape[-2:])
    redo = exact(x.reshape(-1, *x.shape[-2:])[bad])
    return flat.at[bad].set(redo).reshape(fast.shape)


def polar(x: jax.Array, method: str = "svd") -> jax.Array:
    """``P Qᵀ`` from the thin SVD ``x = P S Qᵀ`` (batched; ``x`` is ``[..., m, p]``, p ≤ m)."""
    if method == "svd":
        return _polar_svd(x)
    p, ok = _polar_eigh(x)
    return _exact_where_needed(p, ok, x, _polar_svd)


def top_triplets(x: jax.Array, k: int, method: str = "svd"):
    """The top ``k`` singular triplets of ``x [..., m, n]``: ``u [..., m, k]``, ``s [..., k]``,
    ``v [..., n, k]`` (descending)."""
    if method == "svd":
        u, s, vt = jnp.linalg.svd(x, full_matrices=False)
        return u[..., :k], s[..., :k], _t(vt[..., :k, :])
    tall = x.shape[-2] >= x.shape[-1]
    y = x if tall else _t(x)  # [..., big, small]
    _, q = jnp.linalg.eigh(_t(y) @ y)
    basis, _ = jnp.linalg.qr(y @ q[..., ::-1][..., :k])  # [..., big, k]: the image of the top k
    ub, s, vbt = jnp.linalg.svd(_t(basis) @ y, full_matrices=False)  # the small k × small SVD
    big, small = basis @ ub, _t(vbt)
    return (big, s, small) if tall else (small, s, big)


def _columns(u: jax.Array) -> jax.Array:
    """``[L, T, m, k]`` → ``[L, m, T·k]``: the tasks' columns side by side, task-major."""
    num_layers, num_tasks, m, k = u.shape
    return jnp.moveaxis(u, 1, 2).reshape(num_layers, m, num_tasks * k)


@partial(jax.jit, static_argnames=("k", "method"))
def _tsv_parts(mats: jax.Array, *, k: int, method: str):
    u, s, v = top_triplets(mats, k, method)
    return _columns(u), s.reshape(s.shape[0], -1), _columns(v)


@jax.jit
def _recombine(u, s, v):
    return u @ (s[..., :, None] * _t(v))


def _tsv_batch(mats: jax.Array, *, k: int, method: str) -> jax.Array:
    if k == 0:
        return jnp.mean(mats, axis=1)
    u, s, v = _tsv_parts(mats, k=k, method=method)
    return _recombine(polar(u, method), s, polar(v, method))


def _check_common(**hp) -> None:
    embeddings = hp.pop("embeddings", False)
    if not isinstance(embeddings, bool):
        raise TypeError(f"embeddings={embeddings!r} must be True or False.")
    if "method" in hp:
        checks.check_choice("method", hp.pop("method"), METHODS)
    if "common_space_fraction" in hp:
        checks.check_range("common_space_fraction", hp.pop("common_space_fraction"), 0, 1,
                           lo_open=True, hi_open=True, hint="Iso-CTS default 0.8.")
    checks.check_hparams(**hp)


@register("tsv", reference="Gargiulo et al. 2025 (Task Singular Vectors, TSV-M), "
          "https://arxiv.org/abs/2412.00081", validate=_check_common)
def tsv(stacked: PyTree, *, key: jax.Array | None = None, embeddings: bool = False,
        method: str = "auto", check_finite: bool | str = True,
        like: PyTree | None = None) -> PyTree:
    """TSV-M: each task's top ``⌊r/T⌋`` singular triplets, orthogonalized, recombined.

    Args:
      stacked: task vectors, leaves ``[T, ...]``.
      key: unused (deterministic).
      embeddings: also merge embedding tables as matrices (default: their mean).
      method: ``"auto"`` or ``"svd"``: how the triplets and polar factors are computed
        (the module docstring).
      check_finite, like: see `atm_jax.merge.sparsify`.
    """
    del key
    _check_common(embeddings=embeddings, method=method)

    def batch(mats):
        return _tsv_batch(mats, k=min(mats.shape[2:]) // mats.shape[1], method=method)
    return matrix.merge_matrices(stacked, batch, embeddings=embeddings,
                                 check_finite=check_finite, like=like)


@jax.jit
def _flat_spectrum_svd(x):
    u, s, vt = jnp.linalg.svd(x, full_matrices=False)
    return jnp.mean(s, axis=-1)[..., None, None] * (u @ vt)


@jax.jit
def _flat_spectrum_eigh(x):
    tall = x.shape[-2] >= x.shape[-1]
    y = x if tall else _t(x)
    w, q = jnp.linalg.eigh(_t(y) @ y)
    sigma = jnp.mean(jnp.sqrt(jnp.maximum(w, 0.0)), axis=-1)[..., None, None]
    p = _inverse_root_polar(y, w, q)
    return sigma * (p if tall else _t(p)), _conditioned(w)


def flat_spectrum(x: jax.Array, method: str = "svd") -> jax.Array:
    """``σ̄ U Vᵀ`` for ``x = U Σ Vᵀ`` (``σ̄`` the mean of all ``r`` singular values), batched."""
    if method == "svd":
        return _flat_spectrum_svd(x)
    fast, ok = _flat_spectrum_eigh(x)
    return _exact_where_needed(fast, ok, x, _flat_spectrum_svd)


def _iso_c_batch(mats: jax.Array, *, method: str) -> jax.Array:
    return flat_spectrum(jnp.sum(mats, axis=1), method)


@register("iso_c", reference="Marczak et al. 2025 (Iso-C, No Task Left Behind), "
          "https://arxiv.org/abs/2502.04959", validate=_check_common)
def iso_c(stacked: PyTree, *, key: jax.Array | None = None, embeddings: bool = False,
          method: str = "auto", check_finite: bool | str = True,
          like: PyTree | None = None) -> PyTree:
    """Iso-C: the summed task matrix with a flat spectrum (its mean singular value).

    Args:
      method: ``"auto"`` or ``"svd"`` (as `tsv`).
    """
    del key
    _check_common(embeddings=embeddings, method=method)
    return matrix.merge_matrices(stacked, partial(_iso_c_batch, method=method),
                                 embeddings=embeddings, check_finite=check_finite, like=like)


def common_space_size(rank: int, num_tasks: int, fraction: float) -> int:
    """Iso-CTS's common-space size ``c``: ``⌊f·r⌋`` moved so that ``r − c`` splits evenly
    over the T tasks (Python's ``round``), never below 0 (narrow layers: all tasks'
    share then rounds down)."""
    specific = num_tasks * round((rank - int(fraction * rank)) / num_tasks)
    return rank - min(specific, num_tasks * (rank // num_tasks))


@partial(jax.jit, static_argnames=("c", "method"))
def _iso_cts_parts(mats: jax.Array, *, c: int, method: str):
    num_layers, num_tasks, m, n = mats.shape
    s_per = (min(m, n) - c) // num_tasks
    u, s, vt = jnp.linalg.svd(jnp.sum(mats, axis=1), full_matrices=False)
    u_c, v_c, s_c = u[..., :c], jnp.swapaxes(vt[..., :c, :], -1, -2), s[..., :c]
    if s_per == 0:
        u_all, v_all, kept = u_c, v_c, s_c
    else:
        # Each task's update with the common space projected out of its columns' span.
        residual = mats - u_c[:, None] @ (jnp.swapaxes(u_c, -1, -2)[:, None] @ mats)
        ut, st, vt_ = top_triplets(residual, s_per, method)
        u_all = jnp.concatenate([u_c, _columns(ut)], axis=-1)
        v_all = jnp.concatenate([v_c, _columns(vt_)], axis=-1)
        kept = jnp.concatenate([s_c, st.reshape(num_layers, -1)], axis=-1)
    return u_all, v_all, jnp.mean(kept, axis=-1)


@jax.jit
def _flat_recombine(u, v, sigma):
    return sigma[:, None, None] * (u @ _t(v))


def _iso_cts_batch(mats: jax.Array, *, c: int, method: str) -> jax.Array:
    u_all, v_all, sigma = _iso_cts_parts(mats, c=c, method=method)
    return _flat_recombine(polar(u_all, method), polar(v_all, method), sigma)


@register("iso_cts", reference="Marczak et al. 2025 (Iso-CTS, No Task Left Behind), "
          "https://arxiv.org/abs/2502.04959", validate=_check_common)
def iso_cts(stacked: PyTree, *, key: jax.Array | None = None, common_space_fraction: float = 0.8,
            embeddings: bool = False, method: str = "auto", check_finite: bool | str = True,
            like: PyTree | None = None) -> PyTree:
    """Iso-CTS: a common space of the summed matrix plus each task's own directions, flat spectrum.

    Args:
      common_space_fraction: the share of the ``r`` directions taken from the sum
        (default 0.8), adjusted so the task-specific rest splits evenly over tasks.
      method: ``"auto"`` or ``"svd"`` (as `tsv`; the sum's top ``c`` come from its SVD).
    """
    del key
    _check_common(common_space_fraction=common_space_fraction, embeddings=embeddings,
                  method=method)

    def batch(mats):
        rank, num_tasks = min(mats.shape[2:]), mats.shape[1]
        return _iso_cts_batch(mats, c=common_space_size(rank, num_tasks, common_space_fraction),
                              method=method)
    return matrix.merge_matrices(stacked, batch, embeddings=embeddings,
                                 check_finite=check_finite, like=like)
