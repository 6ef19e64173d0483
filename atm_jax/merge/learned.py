"""Learned merges: WUDI's per-layer objective, minimised by Adam in one jitted program.

**WUDI** (Cheng et al., ICML 2025, "Whoever Started the Interference Should End
It"): for each linear layer, with the tasks' updates ``Δ_t ∈ R^{m×n}`` in the
papers' ``out × in`` layout (`atm_jax.merge.matrix`),

    τ* = argmin_τ  Σ_t ‖(τ − Δ_t) Δ_tᵀ‖²_F / ‖Δ_t‖²_F,

from ``τ = Σ_t Δ_t``, by ``steps`` steps of Adam (``learning_rate``; optax's
defaults b1 = 0.9, b2 = 0.999, eps = 1e-8). Leaves with no matrix take the mean.
The objective is quadratic, so its gradient is ``2 (τ A − B)`` with
``A = Σ_t Δ_tᵀΔ_t / ‖Δ_t‖²`` (n × n) and ``B = Σ_t Δ_t Δ_tᵀΔ_t / ‖Δ_t‖²``, both
formed once: a step costs one ``m × n × n`` product instead of ``2T``, with the
same gradient up to float32 rounding. All layers of one shape step together.

Edges: a task whose update of a layer is exactly zero adds nothing to that
layer's objective (its term is 0 for every τ; the ``0/0`` weight is taken as 0).
Orientation matters (the objective is not transpose-invariant): the rows of
``Δ_t`` are output units.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import optax

from atm_jax import checks
from atm_jax.merge import matrix
from atm_jax.merge.registry import register

PyTree = Any

__all__ = ["wudi"]


@partial(jax.jit, static_argnames=("steps", "learning_rate"))
def _wudi_batch(mats: jax.Array, *, steps: int, learning_rate: float) -> jax.Array:
    norms = jnp.sum(mats * mats, axis=(2, 3))  # [L, T]
    weight = jnp.where(norms > 0, 1.0 / jnp.where(norms > 0, norms, 1.0), 0.0)
    mats_t = jnp.swapaxes(mats, -1, -2)
    scaled = mats * weight[..., None, None]
    a = jnp.einsum("ltim,ltmn->lin", mats_t, scaled)  # Σ_t w_t Δ_tᵀ Δ_t
    b = jnp.einsum("ltmi,ltin->lmn", mats, mats_t @ scaled)  # Σ_t w_t Δ_t Δ_tᵀ Δ_t
    tau = jnp.sum(mats, axis=1)
    opt = optax.adam(learning_rate)

    def step(_, carry):
        tau, state = carry
        grad = 2.0 * (tau @ a - b)
        updates, state = opt.update(grad, state, tau)
        return optax.apply_updates(tau, updates), state

    tau, _ = jax.lax.fori_loop(0, steps, step, (tau, opt.init(tau)))
    return tau


def _check(steps, learning_rate, embeddings) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps={steps!r} must be a non-negative int (the paper runs 300).")
    checks.check_range("learning_rate", learning_rate, 0, float("inf"), lo_open=True, hi_open=True,
                       hint="The paper's Adam runs at 1e-5.")
    if not isinstance(embeddings, bool):
        raise TypeError(f"embeddings={embeddings!r} must be True or False.")


@register("wudi", reference="Cheng et al. 2025 (WUDI merging), https://arxiv.org/abs/2503.08099",
          validate=_check)
def wudi(stacked: PyTree, *, key: jax.Array | None = None, steps: int = 300,
         learning_rate: float = 1e-5, embeddings: bool = False, check_finite: bool | str = True,
         like: PyTree | None = None) -> PyTree:
    """WUDI: per linear layer, the τ that least disturbs each task's own directions.

    Args:
      steps: Adam steps (paper: 300); 0 returns the sum on matrix leaves.
      learning_rate: Adam's step size (paper: 1e-5).
      embeddings: also merge embedding tables as matrices (default: their mean).
    """
    del key
    _check(steps, learning_rate, embeddings)

    def batch(mats):
        return _wudi_batch(mats, steps=steps, learning_rate=float(learning_rate))
    return matrix.merge_matrices(stacked, batch, embeddings=embeddings,
                                 check_finite=check_finite, like=like)
