"""Merge operators: many task vectors in, one delta out.

Every operator takes a *stacked* pytree (leaves ``[T, *shape]``, see
``atm_jax.tree.stack``) and returns one delta pytree of the unstacked structure;
the caller applies ``base + alpha * delta`` (``atm_jax.tree.apply``). ``None``
leaves (from ``tree.split``) are skipped, so heads stay out by construction.

Operators are pure functions built from jitted pieces: an exact magnitude
threshold (``atm_jax.select``: host introselect on CPU, jitted bisection or
``lax.top_k`` elsewhere) and one jitted program that applies every mask and the
consensus over all leaves at once, with the task axis unrolled (on CPU XLA reduces
over a leading axis ~30x slower than it adds T slices). Following mergekit, TIES,
Breadcrumbs and DARE are one generalized method, *sparsify x consensus*:

==============  ==========================================  ========================
name            sparsify (per task)                          consensus
==============  ==========================================  ========================
mean / sum      none                                         mean / sum over tasks
ties            keep top ``density`` by |tau|                sign election, disjoint mean
breadcrumbs     keep |tau| in the [beta, gamma] percentiles  mean (or sum) over tasks
dare            drop w.p. ``p``, rescale by 1/(1-p)           mean (or sum) over tasks
dare_ties       drop w.p. ``p``, rescale by 1/(1-p)           sign election, disjoint mean
==============  ==========================================  ========================

Exact semantics (shared/REFERENCE.md §3):

* **Trim** (TIES): ``k = ceil(density * n)`` where ``n`` is the number of entries of
  one task vector in the scope: all merged leaves together (``scope="model"``, the
  official TIES default) or one tensor (``scope="leaf"``, as mergekit). Keep
  ``|tau| >= v_k``, ``v_k`` the exact k-th largest magnitude; entries tied with
  ``v_k`` are all kept (as the official ``kthvalue`` mask does).
* **Elect**: ``s = sign(sum_t trimmed_t)`` per entry ("mass"). Where the mass is
  exactly 0 the entry takes the majority sign ``sign(sum of s over all merged
  entries)``, and where that is 0 too, the negative side (both as the official
  code's ``resolve_zero_signs`` followed by ``where(s > 0, x > 0, x < 0)``).
* **Disjoint merge**: per entry, over the tasks whose trimmed value is non-zero with
  sign ``s``: their mean (``aggregate="mean"``, official) or sum (``"sum"``, as
  FusionBench). No such task: 0.
* **Breadcrumbs**: per task and scope (default per tensor, as the official code),
  with ``n`` entries sorted by magnitude, drop the ``floor(beta*n)`` smallest and the
  ``n - ceil(gamma*n)`` largest; the band's boundary values are found exactly and
  entries tied with them are kept. Defaults 0.85 / 0.993 keep ≈14%. Then the
  plain mean (or sum) over tasks, zeros included.
* **DARE**: each entry of each task is kept with probability ``1 - p`` (explicit
  PRNG ``key``) and rescaled by ``1/(1-p)``, so the expectation equals the input;
  then the plain mean (``dare``) or TIES' sign election and disjoint mean without
  trimming (``dare_ties``). Key derivation (stable, eager or jitted): the i-th
  non-None leaf (``jax.tree.leaves`` order) uses ``k_i = fold_in(key, i)``, its task
  ``t`` keeps where ``jax.random.bernoulli(fold_in(k_i, t), 1 - p, leaf.shape[1:])``.

Inputs and rules (every error names the first offending leaf path or parameter):

* ``stacked`` is ONE pytree with leaves ``[T, ...]``. A list or tuple of trees is
  refused (``tree.stack`` it first: stacking is never implicit). Leading task axes
  must agree. An unstacked tree whose leaves share a leading size cannot be told from
  a stack by shapes alone: pass ``like=base`` (any unstacked tree of the model) and
  every leaf must be ``(T, *like_shape)``.
* Only floating leaves merge (integers are refused: exclude them with ``tree.split``).
  Leaves in ``batch_stats`` or outside ``params`` of a Flax variables dict warn with
  ``tree.StateMergeWarning`` (``tree.state_paths``): they are state, not weights.
* Hyperparameters are static Python numbers/strings (TypeError if traced or of the
  wrong type, ValueError if out of range); under ``jax.jit`` close over them or mark
  them static.
* Non-finite inputs: wherever any task's entry is NaN or ±Inf the merged entry is
  NaN, eagerly or under ``jax.jit`` (a diverged task is never silently trimmed
  away). ``check_finite=True`` (default) raises ValueError naming the leaf and task
  when called eagerly; under ``jax.jit`` it cannot raise, so the NaN is the signal.
  ``check_finite="checkify"`` adds a ``jax.experimental.checkify`` check per leaf
  that raises with the leaf path under ``jit``: run the merge inside
  ``checkify.checkify(f)`` and call ``err.throw()``. ``check_finite=False`` skips checks.
* Numerics: the T slices are summed at scale ``2**-ceil(log2 T)`` (exact above ~1e-37),
  so finite inputs give a finite mean and a sum overflows only if its exact value
  does; then the eager check raises an overflow ValueError naming the leaf.

Compatibility modes reproduce what the ATM authors' code ran (REFERENCE.md §3); use
them only to compare with their numbers:

* ``ties_atm_code``: one threshold over all T task vectors pooled, keep the top
  ``density`` (0.15), no sign election, plain mean with zeros included.
* ``breadcrumbs_atm_code``: per task over the whole model, keep the band between
  the 15th and 99.3rd percentile (β read inverted: ≈84% kept), plain mean.
"""

from __future__ import annotations

import builtins
import functools
import math
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from atm_jax import checks, select
from atm_jax import tree as tree_lib
from atm_jax.merge.programs import PROGRAM_NAMES, Program, program
from atm_jax.merge.registry import register

PyTree = Any

__all__ = ["mean", "task_arithmetic", "ties", "breadcrumbs", "dare", "dare_ties",
           "ties_atm_code", "breadcrumbs_atm_code", "checkify_finite", "checked_leaves",
           "disjoint_merge", "Program", "program", "PROGRAM_NAMES", "merge_leaves", "sign_counts",
           "needs_negative"]  # Program / program / PROGRAM_NAMES: from atm_jax.merge.programs

check_hparams = checks.check_hparams


def _size(x) -> int:
    return int(np.prod(x.shape[1:], dtype=np.int64))


# ----------------------------------------------------------------------------
# The generalized merge: sparsify x consensus, one jitted program
# ----------------------------------------------------------------------------


def _sparsify(x, lo, hi, key, p, scale, *, band: bool, magnitude: bool):
    """Masked task slices of one leaf, times ``scale``: a list of T arrays."""
    out = []
    for t in range(x.shape[0]):
        xt = x[t]
        if magnitude or band:
            mag = jnp.abs(xt)
            m = mag >= lo[t]
            if band:
                m = m & (mag <= hi[t])
            xt = jnp.where(m, xt, jnp.zeros_like(xt))
        # A power of two: exact (above ~1e-37), and keeps sums of T slices in range.
        xt = xt * scale.astype(x.dtype)
        if p is not None:
            # One mask per task slice (not [T, ...] at once): a third of the memory.
            keep = jax.random.bernoulli(jax.random.fold_in(key, t), 1.0 - p, xt.shape)
            xt = jnp.where(keep, xt / (1.0 - p), jnp.zeros_like(xt)).astype(x.dtype)
        out.append(xt)
    return out


def _consensus(kept, bad, zero_positive, unscale, *, elect: bool, aggregate: str):
    """One leaf's merged value from its T sparsified (scaled-down) slices.

    Entries where ``bad`` (some task's input is NaN or Inf) come out NaN, so a
    diverged task shows in the result instead of being trimmed away. With ``elect``
    also returns an int8 code per entry: the elected sign (-1, 0, 1), or 2 where the
    mass is exactly 0 but some task is non-zero (the entries that depend on the
    model-wide majority sign). Elementwise codes fuse into the same loop, where a
    full reduction would cost more than the merge on CPU: the caller counts them.
    """
    acc = jnp.float32 if kept[0].dtype in (jnp.bfloat16, jnp.float16) else kept[0].dtype
    kept = [k.astype(acc) for k in kept]
    mass = kept[0]
    for k in kept[1:]:
        mass = mass + k
    code = None
    if not elect:
        merged = mass / len(kept) if aggregate == "mean" else mass
    else:
        sign = jnp.sign(mass)
        positive = jnp.where(sign == 0, zero_positive, sign > 0)
        total = jnp.zeros_like(mass)
        count = jnp.zeros_like(mass)
        for k in kept:
            chosen = jnp.where(positive, k > 0, k < 0)
            total = total + jnp.where(chosen, k, 0)
            count = count + chosen
        merged = total / jnp.maximum(count, 1) if aggregate == "mean" else total
        # Zero mass with a non-zero value means values of both signs cancel, so the
        # chosen side (either one) is non-empty exactly then.
        ambiguous = (sign == 0) & (count > 0)
        code = jnp.where(ambiguous, 2, sign).astype(jnp.int8)
    merged = jnp.where(bad, jnp.nan, merged * unscale.astype(acc))
    return merged, code


def _task_scale(num_tasks: int) -> jax.Array:
    """2**-ceil(log2 T): slices are summed at this scale, so a sum of T finite values
    cannot overflow unless the exact result does (then it is scaled back up). Passed
    to the program as an argument: as a constant, XLA folds the scaling away."""
    return jnp.float32(2.0 ** -math.ceil(math.log2(num_tasks)) if num_tasks > 1 else 1.0)


@partial(jax.jit, static_argnames=("band", "magnitude", "elect", "aggregate", "dropout"))
def _merge(leaves, lo, hi, keys, p, zero_positive, scale, *, band, magnitude, elect, aggregate,
           dropout):
    """The merge of a list of leaves: (merged leaves, int8 sign codes or None).

    lo/hi: per-leaf [T] thresholds (or None); keys: per-leaf PRNG keys (dropout);
    zero_positive: the side zero-mass entries take (the model-wide majority sign,
    see :func:`_majority_needs_negative`); scale: :func:`_task_scale`.
    """
    outs, codes = [], []
    for i, x in enumerate(leaves):
        kept = _sparsify(x, lo[i] if lo is not None else None, hi[i] if hi is not None else None,
                         keys[i] if dropout else None, p if dropout else None, scale, band=band,
                         magnitude=magnitude)
        bad = ~jnp.isfinite(x[0])
        for t in range(1, x.shape[0]):
            bad = bad | ~jnp.isfinite(x[t])
        merged, code = _consensus(kept, bad, zero_positive, 1 / scale, elect=elect,
                                  aggregate=aggregate)
        outs.append(merged.astype(x.dtype))
        codes.append(code)
    return outs, (codes if elect else None)


def _majority_needs_negative(codes) -> bool | jax.Array:
    """True if some entry is ambiguous and the majority sign over all entries is not +.

    The official rule: zero-mass entries take sign(sum of elected signs over the
    model), and a zero majority selects the negative side.
    """
    if any(isinstance(c, jax.core.Tracer) for c in codes):
        if jax.default_backend() == "cpu" and select.host_callback_available():
            # XLA:CPU full reductions are slow (WORKSPACE): count on the host, in place.
            return select.on_host(_count_majority, jax.ShapeDtypeStruct((), jnp.bool_), *codes)
        ambiguous = builtins.sum(jnp.sum(c == 2) for c in codes)
        balance = builtins.sum(jnp.sum(jnp.where(c == 2, 0, c).astype(jnp.int32)) for c in codes)
        return (ambiguous > 0) & (balance <= 0)
    return _count_majority(*codes)


def _count_majority(*codes) -> bool:
    codes = [np.asarray(c) for c in codes]
    if not builtins.sum(int(np.count_nonzero(c == 2)) for c in codes):
        return False  # the common case: one pass, no balance needed
    return needs_negative(1, builtins.sum(sign_counts(c)[1] for c in codes))


def checkify_finite(leaves, paths) -> None:
    """``check_finite="checkify"``: a checkify check per leaf, usable under jax.jit."""
    for path, x in zip(paths, leaves):
        ok = jnp.all(jnp.isfinite(x.reshape(x.shape[0], -1)), axis=1)
        name = path.replace("{", "{{").replace("}", "}}")
        checkify.check(jnp.all(ok), f"Leaf {name!r} of the task vectors holds NaN or Inf values "
                       "(task index {task}). A finetune probably diverged.", task=jnp.argmin(ok))


def _check_output(out, paths, stacked, largest, aggregate: str) -> None:
    """Eager check that the merge is finite: NaN/Inf inputs (named) or an overflow."""
    num_tasks = jax.tree.leaves(stacked)[0].shape[0]
    if largest is not None:
        # Finite inputs (the caller checked ``largest``): a mean of finite values is
        # finite, and a sum can overflow only if T * max|x| exceeds the dtype's range.
        peak = builtins.max(float(np.max(np.asarray(m, np.float64))) for m in largest)
        limit = builtins.min(float(jnp.finfo(o.dtype).max) for o in out)
        if aggregate == "mean" or num_tasks * peak < limit:
            return
    ok = tree_lib.all_finite(out)
    if ok.all():
        return
    tree_lib.check_finite(stacked)  # NaN/Inf inputs propagate as NaN: name the input
    i = int(np.argmin(ok))
    raise ValueError(f"Leaf {paths[i]!r}: the merged task vector overflows {out[i].dtype} (its exact "
                     f"value is out of range: aggregate={aggregate!r} over {num_tasks} tasks, or DARE's "
                     "1/(1-p) rescale). Scale the task vectors down or use aggregate='mean'; "
                     "check_finite=False returns the Inf values.")


def merge_leaves(leaves, program: Program, lo, hi, keys, zero_positive: bool):
    """One jitted merge of ``leaves`` (``[T, ...]`` each) at given thresholds.

    ``lo`` / ``hi``: per leaf, the ``[T]`` lowest (and, for a band, highest) kept
    magnitude, or None; ``keys``: per leaf, DARE's key; ``zero_positive``: the side
    zero-mass entries take (:func:`needs_negative` over the whole merge decides it).
    Returns (merged leaves, int8 sign codes per leaf or None), as the registry merges
    compute them: callers that stream a model leaf by leaf (`atm_jax.merge_models`)
    get the same values bit for bit.
    """
    p_arr, side, scale = _constants(program.p, bool(zero_positive), leaves[0].shape[0])
    return _merge(leaves, lo, hi, keys, p_arr, side, scale, **program.static())


@functools.lru_cache(maxsize=64)
def _constants(p, zero_positive: bool, num_tasks: int):
    """The program's scalar arguments, made once: a streamed model calls it per chunk."""
    return (jnp.float32(p if p is not None else 0.0), jnp.bool_(zero_positive),
            _task_scale(num_tasks))


def sign_counts(code) -> tuple[int, int]:
    """``(ambiguous entries, #positive - #negative elected signs)`` of one leaf's codes."""
    c = np.asarray(code)
    return int(np.count_nonzero(c == 2)), int(np.count_nonzero(c == 1)) - int(np.count_nonzero(c == -1))


def needs_negative(ambiguous: int, balance: int) -> bool:
    """The official zero-mass rule over a whole merge: the negative side when some entry
    is ambiguous and the elected signs do not sum to a positive majority."""
    return ambiguous > 0 and balance <= 0


def _generalized(stacked, program: Program, *, key=None, like=None, check_finite=True):
    """Shared driver: thresholds on the host/device, then one jitted merge."""
    magnitude_ranks, band_ranks, scope, joint = (program.magnitude_ranks, program.band_ranks,
                                                 program.scope, program.joint)
    p, elect, aggregate, method = program.p, program.elect, program.aggregate, program.method
    check_hparams(check_finite=check_finite)
    leaves, treedef, paths = tree_lib.check_stacked(stacked, like=like, warn_state=True)
    traced = any(isinstance(x, jax.core.Tracer) for x in leaves)
    if check_finite == "checkify":
        checkify_finite(leaves, paths)
    eager_check = check_finite is True and not traced
    lo = hi = largest = None
    rank_fn = magnitude_ranks or band_ranks
    if rank_fn is not None:
        if scope == "model":
            dtypes = {x.dtype for x in leaves}
            if len(dtypes) > 1:
                raise ValueError(f"scope='model' selects over all leaves at once, which needs one dtype; "
                                 f"got {sorted(map(str, dtypes))}. Cast the task vectors or use scope='leaf'.")
            n = builtins.sum(_size(x) for x in leaves) * (leaves[0].shape[0] if joint else 1)
            thr, largest = select.thresholds(leaves, rank_fn(n), joint=joint, method=method,
                                             return_largest=True)
            num_tasks = leaves[0].shape[0]
            thr = jnp.broadcast_to(thr, (num_tasks, thr.shape[1]))
            per_leaf = [thr] * len(leaves)
            largest = [largest]
        else:
            pairs = [select.thresholds([x], rank_fn(_size(x)), method=method, return_largest=True)
                     for x in leaves]
            per_leaf, largest = [t for t, _ in pairs], [m for _, m in pairs]
        # NaN and Inf have the largest bit patterns: the selection saw them for free.
        if eager_check and not all(np.isfinite(np.asarray(m)).all() for m in largest):
            tree_lib.check_finite(stacked)
        if band_ranks is not None:
            # ranks = (hi_rank, lo_rank): the largest kept magnitude, the smallest kept.
            hi = [t[:, 0] for t in per_leaf]
            lo = [t[:, 1] for t in per_leaf]
        else:
            lo = [t[:, 0] for t in per_leaf]
    dropout = p is not None
    keys = [jax.random.fold_in(key, i) for i in range(len(leaves))] if dropout else None
    p_arr = jnp.float32(p if dropout else 0.0)
    scale = _task_scale(leaves[0].shape[0])
    static = program.static()

    def run(zero_positive):
        if dropout and not traced:
            # One program per leaf: XLA:CPU otherwise schedules every leaf's random
            # masks early and holds them all (3.5x the inputs' memory at ViT-B size).
            pieces = [_merge([x], None if lo is None else [lo[i]], None if hi is None else [hi[i]],
                             [keys[i]], p_arr, zero_positive, scale, **static)
                      for i, x in enumerate(leaves)]
            return [o[0] for o, _ in pieces], ([c[0] for _, c in pieces] if elect else None)
        return _merge(leaves, lo, hi, keys, p_arr, zero_positive, scale, **static)

    # Optimistic: zero-mass entries take "+"; redo with "-" only when the majority
    # says so and such entries exist (rare outside hand-built examples).
    out, codes = run(jnp.bool_(True))
    if elect:
        negative = _majority_needs_negative(codes)
        del codes
        if isinstance(negative, jax.Array):  # traced: decide inside the program
            out = jax.lax.cond(negative, lambda: run(jnp.bool_(False))[0], lambda: out)
        elif negative:
            out = run(jnp.bool_(False))[0]
    if eager_check:
        # Every non-finite input entry comes out NaN, so checking the 1/T-sized output
        # finds bad inputs too (skipped when the selection's maximum proves it finite).
        _check_output(out, paths, stacked, largest, aggregate)
    return jax.tree.unflatten(treedef, out)


# ----------------------------------------------------------------------------
# The operators
# ----------------------------------------------------------------------------


@register("mean", reference="ATM paper eq. 7, https://arxiv.org/abs/2411.03055")
def mean(stacked: PyTree, *, key: jax.Array | None = None, check_finite: bool | str = True,
         like: PyTree | None = None) -> PyTree:
    """Task arithmetic with the mean: ``(1/T) sum_t tau_t`` (ATM's default merge).

    The configs' task arithmetic baseline is this merge, so its row is named ``mean``
    (`atm_jax.recipes`); ``task_arithmetic`` here is the sum.
    """
    del key
    return _generalized(stacked, program("mean"), check_finite=check_finite, like=like)


@register("sum", reference="Ilharco et al. 2023, https://arxiv.org/abs/2212.04089")
def sum(stacked: PyTree, *, key: jax.Array | None = None,  # noqa: A001 - the registry name
        check_finite: bool | str = True,
        like: PyTree | None = None) -> PyTree:
    """Task arithmetic: ``sum_t tau_t`` (scale with ``alpha`` when applying).

    Not in ``__all__`` (it would shadow the builtin on ``import *``): use
    ``merge.task_arithmetic`` (the same function) or ``merge.get("sum")``.
    """
    del key
    return _generalized(stacked, program("sum"), check_finite=check_finite, like=like)


task_arithmetic = sum  # Ilharco et al.'s name for the sum of task vectors


@register("ties", reference="Yadav et al. 2023 (TIES-Merging), https://arxiv.org/abs/2306.01708")
def ties(stacked: PyTree, *, key: jax.Array | None = None, density: float = 0.2,
         scope: str = "model", aggregate: str = "mean", method: str = "auto",
         check_finite: bool | str = True, like: PyTree | None = None) -> PyTree:
    """TIES: trim to the top ``density`` by magnitude, elect sign, disjoint mean.

    Args:
      stacked: task vectors, leaves ``[T, ...]``.
      key: unused (deterministic).
      density: fraction kept per task, in (0, 1]. Official default 0.2; the ATM
        paper states 15%.
      scope: ``"model"`` (one threshold per task over all leaves) or ``"leaf"``.
      aggregate: ``"mean"`` (official disjoint mean) or ``"sum"`` (FusionBench).
      method: selection backend, see ``atm_jax.select``.
      check_finite: see the module docstring (True, False or ``"checkify"``).
    """
    del key
    return _generalized(stacked, program("ties", density=density, scope=scope, aggregate=aggregate,
                                         method=method), check_finite=check_finite, like=like)


@register("breadcrumbs", reference="Davari & Belilovsky 2024 (Model Breadcrumbs), "
          "https://arxiv.org/abs/2312.06795")
def breadcrumbs(stacked: PyTree, *, key: jax.Array | None = None, beta: float = 0.85,
                gamma: float = 0.993, scope: str = "leaf", aggregate: str = "mean",
                method: str = "auto", check_finite: bool | str = True,
                like: PyTree | None = None) -> PyTree:
    """Model Breadcrumbs: keep magnitudes between the beta and gamma percentiles.

    Args:
      beta: lower percentile in [0, 1): the smallest ``floor(beta*n)`` are dropped.
      gamma: upper percentile in (0, 1], > beta: the largest ``n - ceil(gamma*n)``
        outliers are dropped.
      scope: ``"leaf"`` (per tensor, as the official code) or ``"model"``.
      aggregate: ``"mean"`` (the ATM paper's baselines) or ``"sum"``.
    """
    del key
    return _generalized(stacked, program("breadcrumbs", beta=beta, gamma=gamma, scope=scope,
                                         aggregate=aggregate, method=method),
                        check_finite=check_finite, like=like)


@register("dare", reference="Yu et al. 2024 (DARE), https://arxiv.org/abs/2311.03099", stochastic=True)
def dare(stacked: PyTree, *, key: jax.Array | None = None, p: float = 0.9,
         aggregate: str = "mean", check_finite: bool | str = True,
         like: PyTree | None = None) -> PyTree:
    """DARE: drop each entry w.p. ``p``, rescale by ``1/(1-p)``, then mean (or sum)."""
    checks.require_key("dare", key)
    return _generalized(stacked, program("dare", p=p, aggregate=aggregate), key=key,
                        check_finite=check_finite, like=like)


@register("dare_ties", reference="Yu et al. 2024 (DARE) + Yadav et al. 2023 (TIES)", stochastic=True)
def dare_ties(stacked: PyTree, *, key: jax.Array | None = None, p: float = 0.9,
              aggregate: str = "mean", check_finite: bool | str = True,
         like: PyTree | None = None) -> PyTree:
    """DARE's random drop and rescale, then TIES sign election and disjoint mean."""
    checks.require_key("dare_ties", key)
    return _generalized(stacked, program("dare_ties", p=p, aggregate=aggregate), key=key,
                        check_finite=check_finite, like=like)


def checked_leaves(stacked: PyTree, *, like: PyTree | None, check_finite: bool | str):
    """``(leaves, treedef, paths)`` of a stack, with the NaN policy's checks: the eager
    check raises naming leaf and task (``True``), or a checkify check per leaf."""
    check_hparams(check_finite=check_finite)
    leaves, treedef, paths = tree_lib.check_stacked(stacked, like=like, warn_state=True)
    if check_finite == "checkify":
        checkify_finite(leaves, paths)
    if check_finite is True and not any(isinstance(x, jax.core.Tracer) for x in leaves):
        tree_lib.check_finite(stacked)
    return leaves, treedef, paths


def disjoint_merge(stacked: PyTree, *, aggregate: str = "mean", check_finite: bool | str = True,
                   like: PyTree | None = None) -> PyTree:
    """TIES' sign election and disjoint mean (or sum) with no trimming: the consensus step
    of DARE-TIES and DELLA, for task vectors already sparsified by the caller."""
    check_hparams(aggregate=aggregate)
    return _generalized(stacked, Program(elect=True, aggregate=aggregate),
                        check_finite=check_finite, like=like)


@register("ties_atm_code", reference="ATM authors' code (compatibility; see REFERENCE.md §3)",
          compat=True)
def ties_atm_code(stacked: PyTree, *, key: jax.Array | None = None, density: float = 0.15,
                  method: str = "auto", check_finite: bool | str = True,
                like: PyTree | None = None) -> PyTree:
    """What the ATM authors ran as "TIES": one pooled top-k, no election, plain mean."""
    del key
    return _generalized(stacked, program("ties_atm_code", density=density, method=method),
                        check_finite=check_finite, like=like)


@register("breadcrumbs_atm_code", reference="ATM authors' code (compatibility; see REFERENCE.md §3)",
          compat=True)
def breadcrumbs_atm_code(stacked: PyTree, *, key: jax.Array | None = None, beta: float = 0.15,
                         gamma: float = 0.993, method: str = "auto",
                         check_finite: bool | str = True, like: PyTree | None = None) -> PyTree:
    """What the ATM authors ran as "Breadcrumbs": a 15th–99.3rd percentile band per task
    over the whole model (≈84% kept), plain mean."""
    del key
    return _generalized(stacked, program("breadcrumbs_atm_code", beta=beta, gamma=gamma,
                                         method=method), check_finite=check_finite, like=like)
