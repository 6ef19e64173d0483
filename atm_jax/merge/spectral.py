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
top ``k`` eigenpairs of its Gram matrix ``ΔᵀΔ`` (or ``ΔΔᵀ``), refined by one
Rayleigh–Ritz step (QR of ``Δ Q_k``, then the small SVD of ``Q_bᵀ Δ``); a polar factor
from the eigendecomposition of ``XᵀX`` plus one Newton–Schulz step, or from the SVD
when ``X`` is ill-conditioned (smallest/largest eigenvalue of ``XᵀX`` below 1e-4);
Iso-C's flat spectrum likewise (the mean singular value is the mean square root of
those eigenvalues). On concrete inputs ``"auto"`` runs on the host through SciPy's
LAPACK, which can compute only the top ``k`` eigenpairs and screens the conditioning
by a Cholesky estimate before any eigendecomposition; there the Rayleigh–Ritz step runs
only where ``λ_k/λ_1 < 1e-3``. Traced (under ``jax.jit`` or a transformation), the
same formulas run in XLA. How close the paths are: docs/data_free_merges.md.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

from atm_jax import checks
from atm_jax.merge import matrix
from atm_jax.merge.registry import register

PyTree = Any

__all__ = ["tsv", "iso_c", "iso_cts", "polar", "top_triplets", "common_space_size", "METHODS"]

METHODS = ("auto", "svd")
ILL_CONDITIONED = 1e-4  # λ_min/λ_max of XᵀX below which a polar factor takes the SVD
# On the host, a task's top-k triplets come straight from its Gram's eigenpairs unless
# λ_k/λ_1 is below this; then one Rayleigh–Ritz step refines them.
RAYLEIGH_RITZ_BELOW = 1e-3


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
    if _concrete(x):
        return jnp.asarray(_host_polar(np.asarray(x).reshape(-1, *x.shape[-2:])).reshape(x.shape))
    p, ok = _polar_eigh(x)
    return _exact_where_needed(p, ok, x, _polar_svd)


def top_triplets(x: jax.Array, k: int, method: str = "svd"):
    """The top ``k`` singular triplets of ``x [..., m, n]``: ``u [..., m, k]``, ``s [..., k]``,
    ``v [..., n, k]`` (descending)."""
    if method == "svd":
        u, s, vt = jnp.linalg.svd(x, full_matrices=False)
        return u[..., :k], s[..., :k], _t(vt[..., :k, :])
    if _concrete(x):
        batch = x.shape[:-2]
        u, s, v = _host_top_triplets(np.asarray(x).reshape(-1, *x.shape[-2:]), k)
        return tuple(jnp.asarray(a.reshape(*batch, *a.shape[1:])) for a in (u, s, v))
    tall = x.shape[-2] >= x.shape[-1]
    y = x if tall else _t(x)  # [..., big, small]
    _, q = jnp.linalg.eigh(_t(y) @ y)
    basis, _ = jnp.linalg.qr(y @ q[..., ::-1][..., :k])  # [..., big, k]: the image of the top k
    ub, s, vbt = jnp.linalg.svd(_t(basis) @ y, full_matrices=False)  # the small k × small SVD
    big, small = basis @ ub, _t(vbt)
    return (big, s, small) if tall else (small, s, big)



# ---- The host path of method="auto": LAPACK through SciPy, one matrix at a time. ----
# Used when the inputs are concrete (not traced): SciPy's eigh can compute only the top
# k eigenpairs (driver "evr"), which XLA's eigh cannot on CPU, and a Cholesky condition
# estimate sends an ill-conditioned polar factor straight to the SVD instead of after
# a wasted eigendecomposition. The same formulas as the jitted path; under jax.jit or a
# transformation the jitted path runs.


def _concrete(*arrays) -> bool:
    return not any(isinstance(a, jax.core.Tracer) for a in arrays)


def _mm(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` through SciPy's BLAS. NumPy's wheel carries another OpenBLAS, whose
    spinning threads slow SciPy's LAPACK calls between them by ~1.5× on two cores."""
    gemm = scipy.linalg.blas.get_blas_funcs("gemm", (a, b))
    return gemm(1.0, a, b)


def _gram_upper(y: np.ndarray) -> np.ndarray:
    """``yᵀy``'s upper triangle (the lower holds zeros) by BLAS ?syrk, half a product's work;
    ``yᵀ`` goes in without a copy whichever order ``y`` is stored in."""
    a = y.T  # the product is a aᵀ
    syrk = scipy.linalg.blas.get_blas_funcs("syrk", (a,))
    if a.flags.f_contiguous:
        return syrk(1.0, a, trans=0)
    return syrk(1.0, a.T if a.flags.c_contiguous else np.asfortranarray(a.T), trans=1)


def _symmetric(upper: np.ndarray) -> np.ndarray:
    return upper + np.triu(upper, 1).T


def _host_top_one(x: np.ndarray, k: int):
    tall = x.shape[0] >= x.shape[1]
    y = x if tall else x.T  # [big, small]
    n = y.shape[1]
    w, q = scipy.linalg.eigh(_gram_upper(y), lower=False, subset_by_index=(n - k, n - 1),
                             driver="evr", overwrite_a=True, check_finite=False)
    w, q = w[::-1], np.ascontiguousarray(q[:, ::-1])
    if w[-1] >= RAYLEIGH_RITZ_BELOW * w[0]:
        s = np.sqrt(w)
        big, small = _mm(y, q) / s, q
    else:  # a steep spectrum: refine by one Rayleigh–Ritz step on the image of the top k
        basis, _ = scipy.linalg.qr(_mm(y, q), mode="economic", overwrite_a=True,
                                   check_finite=False)
        ub, s, vbt = scipy.linalg.svd(_mm(basis.T, y), full_matrices=False, overwrite_a=True,
                                      check_finite=False)
        big, small = _mm(basis, ub), vbt.T
    return (big, s, small) if tall else (small, s, big)


def _host_top_triplets(x: np.ndarray, k: int):
    """`top_triplets` of ``x [B, m, n]`` on the host (the Gram's top-k eigenpairs only)."""
    u, s, v = zip(*(_host_top_one(m, k) for m in x))
    return np.stack(u), np.stack(s), np.stack(v)


def _host_gram_eigh(x: np.ndarray):
    """``eigh(xᵀx)`` when ``xᵀx`` passes the conditioning test, else None (take the SVD).
    A Cholesky factor's condition estimate (LAPACK ?pocon, within a small factor of the
    truth) screens out the clearly ill-conditioned; the eigenvalues decide the rest."""
    gram = _gram_upper(x)  # every call below reads the upper triangle only
    potrf, pocon = scipy.linalg.lapack.get_lapack_funcs(("potrf", "pocon"), (gram,))
    factor, info = potrf(gram, lower=False, clean=False)
    if info != 0:
        return None
    size = np.abs(gram)  # the 1-norm of the symmetric matrix, from its upper triangle
    one_norm = float((size.sum(axis=0) + size.sum(axis=1) - np.diagonal(size)).max())
    rcond, info = pocon(factor, one_norm)
    if info != 0 or rcond < ILL_CONDITIONED / 10:
        return None
    w, q = scipy.linalg.eigh(gram, lower=False, driver="evd", overwrite_a=True,
                             check_finite=False)
    return (w, q) if w[0] >= ILL_CONDITIONED * max(w[-1], np.finfo(w.dtype).tiny) else None


def _host_inverse_root_polar(x, w, q):
    p = _mm(x, _mm(q * (1.0 / np.sqrt(w)), q.T))
    return 1.5 * p - 0.5 * _mm(p, _symmetric(_gram_upper(p)))  # one Newton–Schulz step


def _host_polar_one(x: np.ndarray) -> np.ndarray:
    eig = _host_gram_eigh(x)
    if eig is None:
        p, _, qt = scipy.linalg.svd(x, full_matrices=False, check_finite=False)
        return _mm(p, qt)
    return _host_inverse_root_polar(x, *eig)


def _host_polar(x: np.ndarray) -> np.ndarray:
    return np.stack([_host_polar_one(m) for m in x])


def _host_flat_spectrum_one(x: np.ndarray) -> np.ndarray:
    tall = x.shape[0] >= x.shape[1]
    y = x if tall else x.T
    eig = _host_gram_eigh(y)
    if eig is None:
        u, s, vt = scipy.linalg.svd(x, full_matrices=False, check_finite=False)
        return np.mean(s) * _mm(u, vt)
    w, q = eig
    p = np.mean(np.sqrt(np.maximum(w, 0.0))) * _host_inverse_root_polar(y, w, q)
    return p if tall else p.T


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


def _host_tsv_one(mats: np.ndarray, k: int) -> np.ndarray:
    u, s, v = (np.concatenate(parts, axis=-1) for parts in
               zip(*(_host_top_one(m, k) for m in mats)))
    return _mm(_host_polar_one(u) * s, _host_polar_one(v).T)


def _tsv_batch(mats: jax.Array, *, k: int, method: str) -> jax.Array:
    if k == 0:
        return jnp.mean(mats, axis=1)
    if method == "auto" and _concrete(mats):
        return jnp.asarray(np.stack([_host_tsv_one(np.asarray(m), k) for m in mats]))
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
    if _concrete(x):
        flat = np.asarray(x).reshape(-1, *x.shape[-2:])
        return jnp.asarray(np.stack([_host_flat_spectrum_one(m) for m in flat]).reshape(x.shape))
    fast, ok = _flat_spectrum_eigh(x)
    return _exact_where_needed(fast, ok, x, _flat_spectrum_svd)


def _task_sum(mats):
    """The sum over the task axis as T − 1 adds (XLA:CPU reduces a leading axis slowly)."""
    total = mats[:, 0]
    for t in range(1, mats.shape[1]):
        total = total + mats[:, t]
    return total


def _iso_c_batch(mats: jax.Array, *, method: str) -> jax.Array:
    return flat_spectrum(_task_sum(mats), method)


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


@partial(jax.jit, static_argnames=("c",))
def _common_space(mats: jax.Array, *, c: int):
    """The summed matrix's top ``c`` triplets and each task's update with that space
    projected out of its columns' span."""
    u, s, vt = jnp.linalg.svd(jnp.sum(mats, axis=1), full_matrices=False)
    u_c, v_c, s_c = u[..., :c], _t(vt[..., :c, :]), s[..., :c]
    residual = mats - u_c[:, None] @ (_t(u_c)[:, None] @ mats)
    return u_c, v_c, s_c, residual


def _iso_cts_parts(mats: jax.Array, *, c: int, method: str):
    num_layers, num_tasks, m, n = mats.shape
    s_per = (min(m, n) - c) // num_tasks
    u_c, v_c, s_c, residual = _common_space(mats, c=c)
    if s_per == 0:
        return u_c, v_c, jnp.mean(s_c, axis=-1)
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
