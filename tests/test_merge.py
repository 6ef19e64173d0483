"""Tests of atm_jax.merge against hand-computed trees and independent NumPy references.

The references below are written from the semantics in the ``atm_jax.merge`` module
docstring (trim rank ``k = ceil(density * n)`` with ties kept, sign election by mass
with the zero-mass majority rule, disjoint mean/sum, the Breadcrumbs rank band,
DARE), not from the library code. Rank arithmetic is exact (``fractions``), so a
density like 0.993 means 993/1000.
"""

from __future__ import annotations

import math
from fractions import Fraction

import jax
from jax.experimental import checkify
import jax.numpy as jnp
import numpy as np
import pytest

from atm_jax import merge, select
from atm_jax import tree as tree_lib

F32 = np.float32


def rbg_key(seed):
    """A PRNG key for DARE on the shared random-tree shapes.

    DARE's program compiles ~2.5x faster on CPU with the "rbg" generator than with
    threefry, and the semantics hold for any key; the tests on ONES use the default.
    """
    return jax.random.key(seed, impl="rbg")


def _np_tree(t):
    return jax.tree.map(np.asarray, t)


def _assert_tree_close(got, want, *, exact=False):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        g, w = np.asarray(g), np.asarray(w)
        assert g.shape == w.shape and g.dtype == w.dtype, (g.shape, w.shape, g.dtype, w.dtype)
        if exact:
            np.testing.assert_array_equal(g, w)
        else:
            np.testing.assert_allclose(g.astype(np.float64), w.astype(np.float64), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------
# A hand-computed case: 3 tasks, leaves "w" [3, 2, 2] and "b" [3, 2]
# ----------------------------------------------------------------------------

HAND = {
    "w": np.array([[[4, -1], [2, -3]],
                   [[-5, 2], [1, 3]],
                   [[3, -4], [-6, 1]]], F32),
    "b": np.array([[0.5, -6],
                   [-2, 4],
                   [1, -0.5]], F32),
}


def _hand(w, b):
    return {"w": np.array(w, F32), "b": np.array(b, F32)}


def test_hand_mean_and_sum():
    # Column sums: w [[2, -3], [-3, 1]], b [-0.5, -2.5].
    _assert_tree_close(merge.sum(HAND), _hand([[2, -3], [-3, 1]], [-0.5, -2.5]), exact=True)
    _assert_tree_close(merge.mean(HAND), _hand(np.array([[2, -3], [-3, 1]], F32) / F32(3),
                                               np.array([-0.5, -2.5], F32) / F32(3)))


def test_hand_ties_model_scope():
    # n = 6 per task, density 0.6 -> k = 4. Thresholds: task0 |.|=2, task1 2 (tied: w[0,1]
    # and b[0] both kept, 5 entries), task2 1 (tied: w[1,1] and b[0], 5 entries).
    # Trimmed  t0 w [4, 0, 2,-3] b [0,-6]; t1 w [-5, 2, 0, 3] b [-2, 4]; t2 w [3,-4,-6, 1] b [1, 0]
    # Mass     w [2, -2, -4, 1]  b [-1, -2] -> signs w [+,-,-,+] b [-,-].
    got = merge.ties(HAND, density=0.6)
    _assert_tree_close(got, _hand([[3.5, -4], [-6, 2]], [-2, -6]), exact=True)
    got = merge.ties(HAND, density=0.6, aggregate="sum")
    _assert_tree_close(got, _hand([[7, -4], [-6, 4]], [-2, -6]), exact=True)


def test_hand_ties_leaf_scope_with_zero_mass():
    # density 0.75: w k = 3 of 4 per task, b k = ceil(1.5) = 2 of 2 (all kept).
    # Trimmed w: t0 [4, 0, 2,-3]; t1 [-5, 2, 0, 3]; t2 [3,-4,-6, 0]
    # Mass w [2, -2, -4, 0 (= -3 + 3)], b [-0.5, -2.5]. Sign sum over all merged entries
    # 1 - 1 - 1 + 0 - 1 - 1 = -3 < 0, so the zero-mass w[1,1] takes "-" (task0's -3).
    got = merge.ties(HAND, density=0.75, scope="leaf")
    _assert_tree_close(got, _hand([[3.5, -4], [-6, -3]], [-2, -3.25]), exact=True)
    got = merge.ties(HAND, density=0.75, scope="leaf", aggregate="sum")
    _assert_tree_close(got, _hand([[7, -4], [-6, -3]], [-2, -6.5]), exact=True)


def test_hand_breadcrumbs():
    # Leaf scope, beta 0.25 / gamma 0.75: w (n=4) drops floor(1)=1 smallest and
    # 4 - ceil(3) = 1 largest per task; b (n=2) drops none.
    # w kept: t0 [0, 0, 2,-3]; t1 [0, 2, 0, 3]; t2 [3,-4, 0, 0] -> sums [[3, -2], [2, 0]].
    got = merge.breadcrumbs(HAND, beta=0.25, gamma=0.75, aggregate="sum")
    _assert_tree_close(got, _hand([[3, -2], [2, 0]], [-0.5, -2.5]), exact=True)
    got = merge.breadcrumbs(HAND, beta=0.25, gamma=0.75)
    _assert_tree_close(got, _hand(np.array([[3, -2], [2, 0]], F32) / F32(3),
                                  np.array([-0.5, -2.5], F32) / F32(3)))
    # Model scope: n = 6, drops floor(1.5)=1 smallest and 6 - ceil(4.5) = 1 largest.
    # t0 keeps w [4,-1, 2,-3] b [0, 0]; t1 w [0, 2, 0, 3] b [-2, 4]; t2 w [3,-4, 0, 1] b [1, 0].
    got = merge.breadcrumbs(HAND, beta=0.25, gamma=0.75, scope="model", aggregate="sum")
    _assert_tree_close(got, _hand([[7, -3], [2, 1]], [-1, 4]), exact=True)


def test_hand_compat_modes():
    # ties_atm_code: one pool of 18 magnitudes, density 0.25 -> k = ceil(4.5) = 5; the 5th
    # largest is 4, tied three times, so 6 entries survive; plain mean over 3 tasks.
    got = merge.ties_atm_code(HAND, density=0.25)
    _assert_tree_close(got, _hand(np.array([[-1, -4], [-6, 0]], F32) / F32(3),
                                  np.array([0, -2], F32) / F32(3)))
    # breadcrumbs_atm_code: per task over the whole model, band 0.2 / 0.8 on n = 6
    # drops 1 smallest and 1 largest: the same band as the model-scope case above.
    got = merge.breadcrumbs_atm_code(HAND, beta=0.2, gamma=0.8)
    _assert_tree_close(got, _hand(np.array([[7, -3], [2, 1]], F32) / F32(3),
                                  np.array([-1, 4], F32) / F32(3)))


# ----------------------------------------------------------------------------
# NumPy references
# ----------------------------------------------------------------------------


def _ceil(frac, n):
    return math.ceil(Fraction(repr(frac)) * n)


def _floor(frac, n):
    return math.floor(Fraction(repr(frac)) * n)


def _mags(x):
    return np.abs(np.asarray(x, np.float64))


def _kth_largest(values, k):
    return np.sort(values.reshape(-1))[::-1][k - 1]


def _per_scope_masks(leaves, scope, mask_fn):
    """mask_fn(flat magnitudes of one task in one scope) -> (lo, hi) kept interval."""
    num_tasks = leaves[0].shape[0]
    masks = [np.zeros(x.shape, bool) for x in leaves]
    for t in range(num_tasks):
        if scope == "model":
            lo, hi = mask_fn(np.concatenate([_mags(x[t]).reshape(-1) for x in leaves]))
            for m, x in zip(masks, leaves):
                m[t] = (_mags(x[t]) >= lo) & (_mags(x[t]) <= hi)
        else:
            for m, x in zip(masks, leaves):
                lo, hi = mask_fn(_mags(x[t]))
                m[t] = (_mags(x[t]) >= lo) & (_mags(x[t]) <= hi)
    return masks


def _trim_masks(leaves, density, scope):
    return _per_scope_masks(leaves, scope, lambda m: (_kth_largest(m, _ceil(density, m.size)), np.inf))


def _band_masks(leaves, beta, gamma, scope):
    def band(m):
        asc = np.sort(m.reshape(-1))
        return asc[_floor(beta, m.size)], asc[_ceil(gamma, m.size) - 1]
    return _per_scope_masks(leaves, scope, band)


def _consensus(kept, *, elect, aggregate, dtype):
    """kept: per leaf [T, ...] arrays (already sparsified). Accumulates in float32."""
    kept = [np.asarray(k).astype(F32) for k in kept]
    num_tasks = kept[0].shape[0]
    if not elect:
        outs = []
        for k in kept:
            total = k[0].copy()
            for t in range(1, num_tasks):
                total = total + k[t]
            outs.append(total / F32(num_tasks) if aggregate == "mean" else total)
        return [o.astype(dtype) for o in outs]
    masses = []
    for k in kept:
        mass = k[0].copy()
        for t in range(1, num_tasks):
            mass = mass + k[t]
        masses.append(mass)
    majority = np.sign(sum(int(np.sign(m).sum()) for m in masses))
    outs = []
    for k, mass in zip(kept, masses):
        positive = (mass > 0) | ((mass == 0) & (majority > 0))
        total = np.zeros_like(mass)
        count = np.zeros_like(mass)
        for t in range(num_tasks):
            chosen = np.where(positive, k[t] > 0, k[t] < 0)
            total = total + np.where(chosen, k[t], F32(0))
            count = count + chosen
        outs.append(total / np.maximum(count, F32(1)) if aggregate == "mean" else total)
    return [o.astype(dtype) for o in outs]


def _ref(stacked, fn):
    leaves, treedef = jax.tree.flatten(_np_tree(stacked))
    return jax.tree.unflatten(treedef, fn(leaves))


def ref_mean(stacked, aggregate="mean"):
    return _ref(stacked, lambda ls: _consensus(ls, elect=False, aggregate=aggregate, dtype=ls[0].dtype))


def ref_ties(stacked, density, scope, aggregate):
    def fn(ls):
        kept = [np.where(m, x, 0).astype(x.dtype) for m, x in zip(_trim_masks(ls, density, scope), ls)]
        return _consensus(kept, elect=True, aggregate=aggregate, dtype=ls[0].dtype)
    return _ref(stacked, fn)


def ref_breadcrumbs(stacked, beta, gamma, scope, aggregate):
    def fn(ls):
        kept = [np.where(m, x, 0).astype(x.dtype) for m, x in zip(_band_masks(ls, beta, gamma, scope), ls)]
        return _consensus(kept, elect=False, aggregate=aggregate, dtype=ls[0].dtype)
    return _ref(stacked, fn)


def ref_ties_atm_code(stacked, density):
    def fn(ls):
        pooled = np.concatenate([_mags(x).reshape(-1) for x in ls])
        v = _kth_largest(pooled, _ceil(density, pooled.size))
        kept = [np.where(_mags(x) >= v, x, 0).astype(x.dtype) for x in ls]
        return _consensus(kept, elect=False, aggregate="mean", dtype=ls[0].dtype)
    return _ref(stacked, fn)


def ref_dare(stacked, masks, p, *, elect, aggregate):
    """masks: per-leaf boolean [T, ...] keep masks (in jax.tree leaf order)."""
    scale = F32(1) - F32(p)

    def fn(ls):
        kept = [np.where(m, x.astype(F32) / scale, F32(0)).astype(x.dtype) for m, x in zip(masks, ls)]
        return _consensus(kept, elect=elect, aggregate=aggregate, dtype=ls[0].dtype)
    return _ref(stacked, fn)


def dare_masks(like, key, p):
    """DARE's keep masks, drawn here from the documented key derivation (merge.py):
    leaf i (jax.tree.leaves order, None leaves skipped) uses fold_in(key, i), task t
    of it fold_in(that, t), and keeps an entry where bernoulli(., 1 - p, shape) is set.
    Nothing is read back from merge.dare, so a wrong derivation there fails the tests.
    """
    masks = []
    for i, x in enumerate(jax.tree.leaves(like)):
        leaf_key = jax.random.fold_in(key, i)
        masks.append(np.stack([np.asarray(jax.random.bernoulli(jax.random.fold_in(leaf_key, t), 1.0 - p,
                                                               x.shape[1:]))
                               for t in range(x.shape[0])]))
    return masks


# Random trees share these shapes, so every operator compiles once.
SHAPES = {"enc": {"w": (3, 6, 5), "b": (3, 5)}, "dec": {"w": (3, 4, 3)}}


def random_tree(seed, kind="normal", dtype=jnp.float32):
    rng = np.random.default_rng(seed)

    def leaf(shape):
        if kind == "normal":
            x = rng.normal(size=shape)
        else:  # heavy ties, exact zeros and exactly cancelling masses
            x = rng.integers(-3, 4, size=shape) * 0.5
        return np.array(jnp.asarray(x, dtype))
    return jax.tree.map(leaf, SHAPES, is_leaf=lambda s: isinstance(s, tuple))


SEEDS = (0, 1, 2)
KINDS = ("normal", "tied")
DENSITIES = (0.1, 0.35, 1.0)
BANDS = ((0.85, 0.993), (0.1, 0.6), (0.0, 1.0), (0.5, 0.51))


@pytest.mark.parametrize("kind", KINDS)
def test_mean_and_sum_match_numpy(kind):
    for seed in SEEDS:
        s = random_tree(seed, kind)
        _assert_tree_close(merge.mean(s), ref_mean(s, "mean"))
        _assert_tree_close(merge.sum(s), ref_mean(s, "sum"))


@pytest.mark.parametrize("aggregate", ("mean", "sum"))
@pytest.mark.parametrize("scope", ("model", "leaf"))
@pytest.mark.parametrize("kind", KINDS)
def test_ties_matches_numpy(kind, scope, aggregate):
    for seed in SEEDS:
        s = random_tree(seed, kind)
        for density in DENSITIES:
            got = merge.ties(s, density=density, scope=scope, aggregate=aggregate)
            _assert_tree_close(got, ref_ties(s, density, scope, aggregate))


def test_ties_matches_numpy_bfloat16():
    for seed in SEEDS:
        s = random_tree(seed, "normal", jnp.bfloat16)
        for scope in ("model", "leaf"):
            got = merge.ties(s, density=0.35, scope=scope)
            _assert_tree_close(got, ref_ties(s, 0.35, scope, "mean"), exact=True)


@pytest.mark.parametrize("aggregate", ("mean", "sum"))
@pytest.mark.parametrize("scope", ("leaf", "model"))
@pytest.mark.parametrize("kind", KINDS)
def test_breadcrumbs_matches_numpy(kind, scope, aggregate):
    for seed in SEEDS:
        s = random_tree(seed, kind)
        for beta, gamma in BANDS:
            got = merge.breadcrumbs(s, beta=beta, gamma=gamma, scope=scope, aggregate=aggregate)
            _assert_tree_close(got, ref_breadcrumbs(s, beta, gamma, scope, aggregate))


@pytest.mark.parametrize("kind", KINDS)
def test_compat_modes_match_numpy(kind):
    for seed in SEEDS:
        s = random_tree(seed, kind)
        for density in (0.15, 0.5, 1.0):
            _assert_tree_close(merge.ties_atm_code(s, density=density), ref_ties_atm_code(s, density))
        _assert_tree_close(merge.breadcrumbs_atm_code(s), ref_breadcrumbs(s, 0.15, 0.993, "model", "mean"))
        _assert_tree_close(merge.breadcrumbs_atm_code(s, beta=0.3, gamma=0.9),
                           ref_breadcrumbs(s, 0.3, 0.9, "model", "mean"))


@pytest.mark.parametrize("kind", KINDS)
def test_dare_and_dare_ties_match_numpy(kind):
    # DARE programs take seconds to compile on CPU: only the aggregates below are
    # compiled (dare_ties' sum is the consensus that ties' sum tests already cover).
    for seed in SEEDS:
        s = random_tree(seed, kind)
        for p in (0.0, 0.3, 0.9):
            key = rbg_key(100 + seed)
            masks = dare_masks(s, key, p)
            for aggregate in ("mean", "sum"):
                _assert_tree_close(merge.dare(s, key=key, p=p, aggregate=aggregate),
                                   ref_dare(s, masks, p, elect=False, aggregate=aggregate))
            _assert_tree_close(merge.dare_ties(s, key=key, p=p),
                               ref_dare(s, masks, p, elect=True, aggregate="mean"))


# ----------------------------------------------------------------------------
# Properties
# ----------------------------------------------------------------------------


def test_ties_density_one_with_shared_signs_is_mean():
    rng = np.random.default_rng(10)
    signs = jax.tree.map(lambda s: rng.choice([-1.0, 1.0], size=s[1:]), SHAPES,
                         is_leaf=lambda s: isinstance(s, tuple))
    s = jax.tree.map(lambda sg, shape: (sg * (np.abs(rng.normal(size=shape)) + 0.1)).astype(F32),
                     signs, SHAPES, is_leaf=lambda s: isinstance(s, tuple))
    # Not bit-exact for the mean: XLA turns mean's division by the constant T into a
    # multiplication by 1/T (<= 1 ulp), while the disjoint mean divides by a count.
    for scope in ("model", "leaf"):
        _assert_tree_close(merge.ties(s, density=1.0, scope=scope), merge.mean(s))
        _assert_tree_close(merge.ties(s, density=1.0, scope=scope, aggregate="sum"), merge.sum(s),
                           exact=True)


def test_dare_with_p_zero_is_mean_and_dare_ties_is_untrimmed_ties():
    for kind in KINDS:
        s = random_tree(3, kind)
        key = rbg_key(0)
        _assert_tree_close(merge.dare(s, key=key, p=0.0), merge.mean(s), exact=True)
        _assert_tree_close(merge.dare(s, key=key, p=0.0, aggregate="sum"), merge.sum(s), exact=True)
        _assert_tree_close(merge.dare_ties(s, key=key, p=0.0), merge.ties(s, density=1.0), exact=True)


CODED = {"a": np.broadcast_to(np.array([1, 2, 4], F32).reshape(3, 1, 1), (3, 64, 64)).copy(),
         "b": np.broadcast_to(np.array([1, 2, 4], F32).reshape(3, 1), (3, 4096)).copy()}


def _decode(out, p):
    """Per-task keep masks from a sum-DARE of CODED: task t contributes 2**t / (1 - p)."""
    code = np.asarray(out, np.float64) * float(F32(1) - F32(p))
    ints = np.rint(code).astype(np.int64)
    assert np.all(np.abs(code - ints) < 1e-3)
    return [(ints >> t) & 1 == 1 for t in range(3)]


def test_dare_keep_rate_independence_and_rescale_over_three_tasks():
    for p in (0.5, 0.9):
        out = merge.dare(CODED, key=jax.random.key(0), p=p, aggregate="sum")
        by_leaf = {name: _decode(leaf, p) for name, leaf in out.items()}
        for name, masks in by_leaf.items():
            n = masks[0].size
            sigma = math.sqrt(p * (1 - p) / n)
            for t, m in enumerate(masks):  # every task keeps 1 - p
                assert abs(m.mean() - (1 - p)) < 5 * sigma, (name, t, p, m.mean())
            # Independent tasks agree on an entry w.p. p^2 + (1-p)^2 (1 if they shared a mask).
            agree, q = (masks[0] == masks[1]).mean(), p * p + (1 - p) * (1 - p)
            assert abs(agree - q) < 5 * math.sqrt(q * (1 - q) / n), (name, p, agree)
        assert (by_leaf["a"][0].reshape(-1) != by_leaf["b"][0]).any(), "both leaves drew the same mask"
    same = merge.dare(CODED, key=jax.random.key(0), p=0.9, aggregate="sum")
    np.testing.assert_array_equal(np.asarray(same["a"]), np.asarray(out["a"]))
    other = merge.dare(CODED, key=jax.random.key(1), p=0.9, aggregate="sum")
    assert (np.asarray(other["a"]) != np.asarray(out["a"])).any()


def test_dare_is_unbiased_over_keys_with_three_tasks():
    rng = np.random.default_rng(11)
    x = {"a": rng.normal(size=(3, 32, 32)).astype(F32), "b": rng.normal(size=(3, 700)).astype(F32)}
    num_keys, p = 200, 0.5
    acc = jax.tree.map(lambda v: np.zeros(v.shape[1:]), x)
    for i in range(num_keys):
        out = merge.dare(x, key=rbg_key(i), p=p)
        acc = jax.tree.map(lambda a, o: a + np.asarray(o, np.float64), acc, out)
    for name, v in x.items():
        v = v.astype(np.float64)
        avg, want = acc[name] / num_keys, v.mean(axis=0)
        # Var of one draw: sum_t x_t^2 p / (1 - p) / T^2, averaged over num_keys draws.
        std = np.sqrt((v ** 2).sum(axis=0) * p / (1 - p) / num_keys) / 3
        assert np.all(np.abs(avg - want) <= 6 * std + 1e-12), name
        z = (avg - want) / std
        assert abs(z.mean()) < 5 / math.sqrt(z.size), (name, z.mean())  # no systematic bias


def test_dare_and_dare_ties_under_jit_match_numpy():
    s = random_tree(5)
    key = rbg_key(7)
    got = jax.jit(lambda t, k: (merge.dare(t, key=k, p=0.3), merge.dare_ties(t, key=k, p=0.3)))(s, key)
    masks = dare_masks(s, key, 0.3)
    _assert_tree_close(got[0], ref_dare(s, masks, 0.3, elect=False, aggregate="mean"))
    _assert_tree_close(got[1], ref_dare(s, masks, 0.3, elect=True, aggregate="mean"))


def test_breadcrumbs_keeps_the_band_fraction_per_tensor():
    rng = np.random.default_rng(12)
    s = {"a": rng.normal(size=(1, 1000)).astype(F32), "b": rng.normal(size=(1, 10, 37)).astype(F32)}
    out = merge.breadcrumbs(s, aggregate="sum")  # defaults 0.85 / 0.993
    for name, n in (("a", 1000), ("b", 370)):
        kept = int(np.count_nonzero(np.asarray(out[name])))
        assert kept == _ceil(0.993, n) - _floor(0.85, n)   # 143 and 54
        assert abs(kept / n - (0.993 - 0.85)) <= 2 / n
    assert int(np.count_nonzero(np.asarray(out["a"]))) == 143


def _two_task(a, b=None):
    t = {"a": np.array(a, F32).T.copy()}
    if b is not None:
        t["b"] = np.array(b, F32).T.copy()
    return t


@pytest.mark.parametrize("where", ["eager", "jit", "jit, counted by XLA"])
def test_zero_mass_takes_the_majority_sign(monkeypatch, where):
    # Entry 0 has mass +1 - 1 = 0; the other entries set the majority over the model.
    # (dare_ties shares the election: test_dare_with_p_zero... compares it with ties.)
    # Under jit on CPU the majority is counted on the host (a buffer callback); the
    # XLA reduction path is what accelerators run.
    if where == "jit, counted by XLA":
        monkeypatch.setattr(select, "host_callback_available", lambda: False)

    def fn(s, **kw):
        if where == "eager":
            return merge.ties(s, density=1.0, **kw)
        return jax.jit(lambda t: merge.ties(t, density=1.0, **kw))(s)
    positive = _two_task([(1, -1), (2, 1), (3, 0), (-1, 0)])    # signs 0 + 1 + 1 - 1 = +1
    np.testing.assert_array_equal(fn(positive)["a"], [1, 1.5, 3, -1])
    negative = _two_task([(1, -1), (2, 1), (-3, 0), (-1, 0)])   # 0 + 1 - 1 - 1 = -1
    np.testing.assert_array_equal(fn(negative)["a"], [-1, 1.5, -3, -1])
    zero = _two_task([(1, -1), (2, 1), (-3, 0), (0, 0)])        # 0 + 1 - 1 + 0 = 0 -> "-"
    np.testing.assert_array_equal(fn(zero)["a"], [-1, 1.5, -3, 0])
    np.testing.assert_array_equal(fn(zero, aggregate="sum")["a"], [-1, 3, -3, 0])
    # The majority counts every merged leaf, also with scope="leaf".
    across = _two_task([(1, -1), (0.5, -0.5)], [(2, 1), (1, 0)])
    kw = {"scope": "leaf"}
    out = fn(across, **kw)
    np.testing.assert_array_equal(out["a"], [1, 0.5])
    np.testing.assert_array_equal(out["b"], [1.5, 1])
    across_neg = _two_task([(1, -1), (0.5, -0.5)], [(-2, -1), (1, 0)])
    np.testing.assert_array_equal(fn(across_neg, **kw)["a"], [-1, -0.5])


def test_ties_keeps_every_entry_tied_with_the_threshold():
    s = {"a": np.array([[3, -3, 3, 1, -1, 0.5, 2, 0, -2, 0.25]], F32)}  # T = 1
    # density 0.2 -> k = 2; the 2nd largest |.| is 3, tied three times.
    for method in ("host", "bisect", "top_k"):
        np.testing.assert_array_equal(merge.ties(s, density=0.2, method=method)["a"],
                                      [3, -3, 3, 0, 0, 0, 0, 0, 0, 0])
        # k = 4 -> 2, tied twice: 5 kept.
        np.testing.assert_array_equal(merge.ties(s, density=0.4, scope="leaf", method=method)["a"],
                                      [3, -3, 3, 0, 0, 0, 2, 0, -2, 0])


def test_breadcrumbs_keeps_entries_tied_with_the_band_edges():
    # n = 7: beta 0.3 drops floor(2.1) = 2 smallest, gamma 0.8 drops 7 - ceil(5.6) = 1 largest.
    s = {"a": np.array([[1, -1, 1, 2, -3, 4, 5]], F32)}
    # Smallest kept |.| is 1, tied with the two dropped 1s: all three stay; 5 goes.
    np.testing.assert_array_equal(merge.breadcrumbs(s, beta=0.3, gamma=0.8, aggregate="sum")["a"],
                                  [1, -1, 1, 2, -3, 4, 0])
    s = {"a": np.array([[0.5, 0.25, 1, 2, -3, -4, 4]], F32)}
    # Largest kept |.| is 4, tied with the dropped outlier 4: both stay; 0.25 and 0.5 go.
    np.testing.assert_array_equal(merge.breadcrumbs(s, beta=0.3, gamma=0.8, aggregate="sum")["a"],
                                  [0, 0, 1, 2, -3, -4, 4])


def test_no_recompilation_when_only_values_change():
    calls = [
        lambda s, i: merge.mean(s),
        lambda s, i: merge.sum(s),
        lambda s, i: merge.ties(s, density=(0.1, 0.35)[i]),
        lambda s, i: merge.ties(s, density=(0.2, 0.7)[i], scope="leaf"),
        lambda s, i: merge.breadcrumbs(s, beta=(0.85, 0.1)[i], gamma=(0.993, 0.6)[i]),
        lambda s, i: merge.breadcrumbs(s, scope="model"),
        lambda s, i: merge.dare(s, key=rbg_key(i), p=(0.9, 0.3)[i]),
        lambda s, i: merge.dare_ties(s, key=rbg_key(i), p=(0.9, 0.3)[i]),
        lambda s, i: merge.ties_atm_code(s, density=(0.15, 0.5)[i]),
        lambda s, i: merge.breadcrumbs_atm_code(s),
    ]
    first, second = random_tree(20), random_tree(21, "tied")
    for call in calls:
        call(first, 0)
        size = merge.sparsify._merge._cache_size()
        call(second, 1)
        assert merge.sparsify._merge._cache_size() == size


def test_every_selection_method_gives_identical_results():
    s = random_tree(30, "tied")
    cases = [
        lambda m: merge.ties(s, density=0.35, method=m),
        lambda m: merge.ties(s, density=0.1, scope="leaf", method=m),
        lambda m: merge.breadcrumbs(s, beta=0.1, gamma=0.6, method=m),
        lambda m: merge.breadcrumbs(s, beta=0.5, gamma=0.51, scope="model", method=m),
        lambda m: merge.ties_atm_code(s, density=0.15, method=m),
        lambda m: merge.breadcrumbs_atm_code(s, method=m),
    ]
    for case in cases:
        want = case("auto")
        for method in ("host", "bisect", "top_k"):
            _assert_tree_close(case(method), want, exact=True)


def test_merges_work_under_jit():
    s = random_tree(40, "tied")

    @jax.jit
    def bisect(t):  # one program, so one compile for the three merges
        return (merge.ties(t, density=0.35, method="bisect"),
                merge.breadcrumbs(t, beta=0.1, gamma=0.6, method="bisect"),
                merge.ties_atm_code(t, method="bisect"))
    got = bisect(s)
    _assert_tree_close(got[0], ref_ties(s, 0.35, "model", "mean"))
    _assert_tree_close(got[1], ref_breadcrumbs(s, 0.1, 0.6, "leaf", "mean"))
    _assert_tree_close(got[2], ref_ties_atm_code(s, 0.15))

    @jax.jit
    def auto(t):
        return merge.ties(t, density=0.1, scope="leaf", aggregate="sum"), merge.mean(t)
    got = auto(s)
    _assert_tree_close(got[0], ref_ties(s, 0.1, "leaf", "sum"))
    _assert_tree_close(got[1], ref_mean(s))


def test_none_leaves_are_skipped():
    backbone = random_tree(60)
    trees = [dict(jax.tree.map(lambda x: x[t], backbone), head=np.full((2,), 100.0 * (t + 1), F32))
             for t in range(3)]
    selected, rest = tree_lib.split(tree_lib.stack(trees), tree_lib.path_filter(exclude="^head"))
    assert selected["head"] is None and rest["enc"]["w"] is None
    for name, kw in (("mean", {}), ("sum", {}), ("ties", {"density": 0.35}),
                     ("ties", {"density": 0.1, "scope": "leaf"}),
                     ("breadcrumbs", {"beta": 0.1, "gamma": 0.6, "scope": "model"}),
                     ("dare", {"p": 0.3}), ("dare_ties", {"p": 0.9}),
                     ("ties_atm_code", {}), ("breadcrumbs_atm_code", {})):
        key = rbg_key(0)
        got = merge.get(name)(selected, key=key, **kw)
        assert got["head"] is None, name
        want = merge.get(name)(backbone, key=key, **kw)
        _assert_tree_close({k: v for k, v in got.items() if k != "head"}, want, exact=True)
    # The head's large entries would have dominated every model-scope threshold.
    _assert_tree_close({k: v for k, v in merge.ties(selected, density=0.35).items() if k != "head"},
                       ref_ties(backbone, 0.35, "model", "mean"))


def test_breadcrumbs_band_rank_is_exact_on_a_large_tensor():
    n = 1_007_857
    x = np.random.default_rng(13).permutation(np.arange(1, n + 1, dtype=F32)).reshape(1, n)
    out = np.asarray(merge.breadcrumbs({"a": x}, aggregate="sum")["a"])
    # Distinct magnitudes: exactly ceil(0.993 n) - floor(0.85 n) = 1000803 - 856678 entries.
    assert int(np.count_nonzero(out)) == _ceil(0.993, n) - _floor(0.85, n)


def test_ties_trim_rank_is_exact_ceil():
    s = {"a": np.arange(10, 0, -1, dtype=F32).reshape(1, 10)}
    np.testing.assert_array_equal(merge.ties(s, density=0.1000000001)["a"], [10, 9] + [0] * 8)


# ----------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------


SMALL = {"a": np.ones((2, 3), F32)}


@pytest.mark.parametrize("fn,kw,pattern", [
    (merge.ties, {"density": 0}, r"density=0 is outside \(0, 1\]"),
    (merge.ties, {"density": 1.5}, r"density=1.5 is outside"),
    (merge.ties, {"density": float("nan")}, r"density=nan is outside"),
    (merge.ties_atm_code, {"density": 0.0}, r"density=0.0 is outside"),
    (merge.dare, {"p": 1}, r"p=1 is outside \[0, 1\)"),
    (merge.dare, {"p": -0.1}, r"p=-0.1 is outside"),
    (merge.dare_ties, {"p": 1.0}, r"p=1.0 is outside"),
    (merge.breadcrumbs, {"beta": 0.9, "gamma": 0.9}, r"beta=0.9 must be smaller than gamma=0.9"),
    (merge.breadcrumbs, {"beta": 0.95, "gamma": 0.9}, r"beta=0.95 must be smaller than gamma=0.9"),
    (merge.breadcrumbs, {"beta": -0.1}, r"beta=-0.1 is outside \[0, 1\)"),
    (merge.breadcrumbs, {"gamma": 1.5}, r"gamma=1.5 is outside \(0, 1\]"),
    (merge.breadcrumbs_atm_code, {"beta": 0.5, "gamma": 0.2}, r"beta=0.5 must be smaller"),
    (merge.ties, {"scope": "global"}, r"scope='global' is not one of \('model', 'leaf'\)"),
    (merge.breadcrumbs, {"scope": "tensor"}, r"scope='tensor'"),
    (merge.ties, {"aggregate": "median"}, r"aggregate='median' is not one of \('mean', 'sum'\)"),
    (merge.breadcrumbs, {"aggregate": "max"}, r"aggregate='max'"),
    (merge.dare, {"aggregate": "max"}, r"aggregate='max'"),
    (merge.ties, {"method": "sort"}, r"'sort'"),
])
def test_bad_hyperparameters_name_the_value(fn, kw, pattern):
    with pytest.raises(ValueError, match=pattern):
        fn(SMALL, key=jax.random.key(0), **kw)


def test_registry_check_validates_hyperparameters_with_defaults():
    merge.info("ties").check(density=0.5, scope="leaf")
    merge.info("breadcrumbs").check(beta=0.9)            # gamma defaults to 0.993
    merge.info("dare").check()
    with pytest.raises(ValueError, match=r"density=0 is outside"):
        merge.info("ties").check(density=0)
    with pytest.raises(ValueError, match=r"beta=0.995 must be smaller than gamma=0.993"):
        merge.info("breadcrumbs").check(beta=0.995)
    with pytest.raises(ValueError, match=r"merge 'dare' has no hyperparameter 'density'"):
        merge.info("dare").check(density=0.2)


def test_check_hparams_accepts_beta_alone():
    merge.check_hparams(beta=0.5)
    with pytest.raises(ValueError, match=r"beta=1.5"):
        merge.check_hparams(beta=1.5)


def test_unknown_merge_name():
    with pytest.raises(ValueError, match=r"Unknown merge 'tie'; registered merges: mean, sum, ties"):
        merge.get("tie")
    with pytest.raises(ValueError, match=r"Unknown merge 'TIES'"):
        merge.info("TIES")


@pytest.mark.parametrize("name", ("mean", "ties", "breadcrumbs", "dare"))
def test_bad_trees(name):
    fn = merge.get(name)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="Nothing to merge"):
        fn({}, key=key)
    with pytest.raises(ValueError, match="Nothing to merge"):
        fn({"head": None}, key=key)
    with pytest.raises(ValueError, match=r"task axis of size 0"):
        fn({"a": np.zeros((0, 3), F32)}, key=key)
    with pytest.raises(ValueError, match=r"Leaf 'enc/step' of the stacked task vectors has dtype int32; only floating"):
        fn({"enc": {"step": np.zeros((2, 3), np.int32), "w": np.zeros((2, 3), F32)}}, key=key)
    with pytest.raises(ValueError, match=r"Leaf 'b' stacks 3 tasks \(shape \(3, 3\)\) but 'a' stacks 2.*tree.stack\(\[tv\]\)"):
        fn({"a": np.ones((2, 3), F32), "b": np.ones((3, 3), F32)}, key=key)
    with pytest.raises(ValueError, match=r"Leaf 'a' is a scalar"):
        fn({"a": np.float32(1.0)}, key=key)


@pytest.mark.parametrize("name", ("dare", "dare_ties"))
def test_stochastic_merge_needs_key(name):
    with pytest.raises(ValueError, match=rf"merge '{name}' is stochastic: pass an explicit PRNG key"):
        merge.get(name)(SMALL)
    assert merge.info(name).stochastic


NONFINITE_CASES = [(name, {}) for name in merge.names() if merge.info(name).uses == "nothing"] + [
    ("ties", {"scope": "leaf"}), ("ties", {"method": "bisect"}), ("breadcrumbs", {"scope": "model"}),
    ("ties_atm_code", {"method": "top_k"})]


@pytest.mark.parametrize("bad", (np.nan, np.inf, -np.inf), ids=("nan", "inf", "-inf"))
@pytest.mark.parametrize("name,kw", NONFINITE_CASES, ids=lambda v: v if isinstance(v, str) else
                         ",".join(f"{k}={w}" for k, w in v.items()))
def test_nonfinite_task_vector_names_the_leaf(name, kw, bad):
    s = random_tree(50)
    s["enc"]["b"][1, 2] = bad
    if merge.info(name).needs_base:  # SLERP: two models and their base
        s = jax.tree.map(lambda x: x[:2], s)
        kw = dict(kw, base=jax.tree.map(lambda x: np.zeros(x.shape[1:], F32), s))
    with pytest.raises(ValueError, match=r"Leaf 'enc/b' .*NaN or Inf.*task index 1"):
        merge.get(name)(s, key=rbg_key(0), **kw)


def test_model_scope_needs_one_dtype():
    s = {"a": np.ones((2, 3), F32), "b": jnp.ones((2, 4), jnp.bfloat16)}
    for fn in (merge.ties, merge.breadcrumbs_atm_code, merge.ties_atm_code):
        with pytest.raises(ValueError, match=r"scope='model'.*\['bfloat16', 'float32'\]"):
            fn(s)
    with pytest.raises(ValueError, match=r"scope='model'"):
        merge.breadcrumbs(s, scope="model")
    out = merge.ties(s, density=1.0, scope="leaf")
    assert out["a"].dtype == jnp.float32 and out["b"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out["b"], F32), np.ones(4))


# ----------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------


def test_registry_names_and_lookup():
    names = merge.names()
    for name in ("mean", "sum", "ties", "breadcrumbs", "dare", "dare_ties",
                 "ties_atm_code", "breadcrumbs_atm_code"):
        assert name in names
    plain = merge.names(include_compat=False)
    assert "ties_atm_code" not in plain and "breadcrumbs_atm_code" not in plain
    assert "ties" in plain
    assert merge.get("ties") is merge.ties
    assert merge.get("mean") is merge.mean and merge.get("sum") is merge.sum
    assert merge.get("dare_ties") is merge.dare_ties
    for name in names:
        entry = merge.info(name)
        assert entry.name == name and entry.reference
        assert entry.compat == name.endswith("_atm_code")
        assert entry.stochastic == (name.startswith("dare") or name == "della")
    _assert_tree_close(merge.info("sum")(HAND), merge.sum(HAND), exact=True)


def test_registry_defaults_match_documentation():
    assert merge.info("ties").defaults == {"density": 0.2, "scope": "model", "aggregate": "mean"}
    assert merge.info("breadcrumbs").defaults == {"beta": 0.85, "gamma": 0.993, "scope": "leaf",
                                                  "aggregate": "mean"}
    assert merge.info("dare").defaults == {"p": 0.9, "aggregate": "mean"}
    assert merge.info("dare_ties").defaults == {"p": 0.9, "aggregate": "mean"}
    assert merge.info("ties_atm_code").defaults == {"density": 0.15}
    assert merge.info("breadcrumbs_atm_code").defaults == {"beta": 0.15, "gamma": 0.993}
    assert merge.info("mean").defaults == {} and merge.info("sum").defaults == {}
    assert merge.info("ties_atm_code").compat and merge.info("breadcrumbs_atm_code").compat
    assert not merge.info("ties").compat


# ----------------------------------------------------------------------------
# Input rules: inputs, NaN under jit, static hyperparameters, numerics, collections
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("container", (list, tuple))
def test_a_list_of_trees_is_refused_with_the_fix(container):
    tvs = container([{"w": np.ones((2, 2), F32)}, {"w": np.zeros((2, 2), F32)}])
    for name in ("mean", "ties", "dare"):
        with pytest.raises(ValueError, match=rf"Got a {container.__name__} of 2 trees.*tree.stack\(trees\)"):
            merge.get(name)(tvs, key=jax.random.key(0))


def test_like_detects_an_unstacked_tree_whose_leaves_share_a_leading_size():
    base = {"dense": {"kernel": np.zeros((8, 8), F32), "bias": np.zeros((8,), F32)}}
    tv = {"dense": {"kernel": np.ones((8, 8), F32), "bias": np.ones((8,), F32)}}
    with pytest.raises(ValueError, match=r"Leaf 'dense/bias' has shape \(8,\) but the reference "
                                         r"\(like=\) has \(8,\).*it should be \(8, 8\).*tree.stack"):
        merge.ties(tv, like=base)
    stacked = tree_lib.stack([tv, tv])
    np.testing.assert_array_equal(merge.mean(stacked, like=base)["dense"]["bias"], np.ones(8, F32))


NAN_CASES = [("mean", {}), ("ties", {}), ("ties", {"scope": "leaf"}), ("breadcrumbs", {}),
             ("ties_atm_code", {}), ("breadcrumbs_atm_code", {})]
# DARE shares the NaN rule in _merge; its eager NaN tests above go through it (the
# eager check reads the merged output), and its jitted program takes seconds to compile.


def test_a_nan_task_is_never_dropped_under_jit():
    # Task 1 entirely NaN: before, the jitted TIES/Breadcrumbs trimmed it away and
    # returned a finite merge of the other two. Now every entry is NaN.
    s = random_tree(70)
    s["enc"]["w"][1] = np.nan
    outs = jax.jit(lambda t: [merge.get(name)(t, key=rbg_key(0), **kw) for name, kw in NAN_CASES])(s)
    for (name, _), out in zip(NAN_CASES, outs):
        assert np.isnan(np.asarray(out["enc"]["w"])).all(), name
        assert np.isfinite(np.asarray(out["dec"]["w"])).all(), name  # other leaves untouched


def test_one_nan_entry_comes_out_nan_and_the_rest_is_exact_under_jit():
    s = random_tree(71)
    s["enc"]["b"][2, 3] = np.nan
    got = jax.jit(merge.mean)(s)
    want = ref_mean(s)
    assert np.isnan(got["enc"]["b"][3])
    keep = np.arange(5) != 3
    np.testing.assert_allclose(np.asarray(got["enc"]["b"])[keep], want["enc"]["b"][keep], rtol=1e-6)
    _assert_tree_close(got["dec"], want["dec"])
    out = jax.jit(lambda t: merge.ties(t, density=0.5))(s)
    assert np.isnan(out["enc"]["b"][3]) and np.isfinite(np.asarray(out["enc"]["b"])[keep]).all()


def test_checkify_raises_with_the_leaf_path_under_jit():
    s = random_tree(72)
    s["enc"]["b"][1, 2] = np.inf
    f = jax.jit(checkify.checkify(lambda t: merge.ties(t, check_finite="checkify"),
                                  errors=checkify.user_checks))
    err, _ = f(s)
    with pytest.raises(Exception, match=r"Leaf 'enc/b' of the task vectors holds NaN or Inf.*task index 1"):
        err.throw()
    err, out = f(random_tree(72))
    assert err.get() is None and np.isfinite(np.asarray(out["enc"]["w"])).all()
    with pytest.raises(ValueError, match=r"check_finite='yes' is not one of True, False, 'checkify'"):
        merge.mean(s, check_finite="yes")


def test_check_finite_false_returns_the_nan_instead_of_raising():
    s = {"a": np.array([[1.0, 2.0], [np.nan, 4.0]], F32)}
    np.testing.assert_array_equal(merge.mean(s, check_finite=False)["a"], [np.nan, 3.0])
    with pytest.raises(ValueError, match=r"Leaf 'a' .*NaN or Inf.*task index 1"):
        merge.mean(s)


@pytest.mark.parametrize("value,pattern", [
    ("0.2", r"density='0.2' is a str; merge hyperparameters must be Python numbers"),
    (True, r"density=True is a bool"),
    (jnp.float32(0.2), r"density=.* is a ArrayImpl.*float\(x\)"),
])
def test_hyperparameters_of_the_wrong_type_name_the_parameter(value, pattern):
    with pytest.raises(TypeError, match=pattern):
        merge.ties(SMALL, density=value)


def test_a_traced_hyperparameter_says_it_must_be_static():
    with pytest.raises(TypeError, match=r"density is a traced JAX value.*static Python numbers.*"
                                        r"static_argnames=\['density'\]"):
        jax.jit(lambda t, d: merge.ties(t, density=d))(SMALL, 0.2)
    with pytest.raises(TypeError, match=r"p is a traced JAX value"):
        jax.jit(lambda t, p: merge.dare(t, key=jax.random.key(0), p=p))(SMALL, 0.5)
    got = jax.jit(merge.ties, static_argnames="density")(HAND, density=0.5)  # the documented fix
    _assert_tree_close(got, ref_ties(HAND, 0.5, "model", "mean"))
    assert merge.ties(HAND, density=np.float32(0.5)) is not None  # NumPy scalars are static


BIG = F32(3e38)


def test_mean_of_large_finite_values_is_finite_and_exact():
    s = {"a": np.array([[BIG, -BIG], [BIG, BIG], [F32(2e38), BIG]], F32)}
    want = np.asarray(s["a"], np.float64).mean(axis=0)
    for fn in (merge.mean, lambda t: merge.dare(t, key=rbg_key(0), p=0.0)):
        np.testing.assert_allclose(np.asarray(fn(s)["a"], np.float64), want, rtol=1e-7)
    # TIES elects "+" for column 1 and averages the two 3e38's there.
    np.testing.assert_allclose(np.asarray(merge.ties(s, density=1.0)["a"], np.float64),
                               [(3e38 + 3e38 + 2e38) / 3, 3e38], rtol=1e-7)


def test_sum_is_finite_when_the_exact_sum_is_and_overflow_names_the_leaf():
    # 3e38 + 3e38 - 3e38 overflowed as a running sum; its exact value is 3e38.
    s = {"a": np.array([[BIG], [BIG], [-BIG]], F32)}
    np.testing.assert_array_equal(merge.sum(s)["a"], [BIG])
    too_big = {"ok": np.ones((2, 3), F32), "a": np.array([[BIG], [BIG]], F32)}
    for fn in (merge.sum, lambda t, **kw: merge.ties(t, density=1.0, aggregate="sum", **kw)):
        with pytest.raises(ValueError, match=r"Leaf 'a': the merged task vector overflows float32.*"
                                             r"aggregate='sum' over 2 tasks.*check_finite=False"):
            fn(too_big)
        np.testing.assert_array_equal(fn(too_big, check_finite=False)["a"], [np.inf])


def test_dare_with_large_values_stays_finite():
    s = {"a": np.full((4, 2048), F32(1e38))}
    key = rbg_key(3)
    got = np.asarray(merge.dare(s, key=key, p=0.5)["a"], np.float64)
    kept = dare_masks(s, key, 0.5)[0].sum(axis=0)  # x / (1 - p) = 2e38 per kept entry
    np.testing.assert_allclose(got, kept * 2e38 / 4, rtol=1e-6)
    assert got.max() == pytest.approx(2e38, rel=1e-6)  # all four kept somewhere: 8e38 / 4


def test_merging_batch_stats_warns_and_params_only_does_not():
    variables = {"params": {"w": np.ones((2, 3), F32)},
                 "batch_stats": {"bn": {"var": np.ones((2, 3), F32)}}}
    with pytest.warns(tree_lib.StateMergeWarning, match=r"Merging leaf 'batch_stats/bn/var'.*"
                                                        r"BatchNorm statistics"):
        merge.mean(variables)
    selected, _ = tree_lib.split(variables, tree_lib.path_filter())
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = merge.mean(selected)
    assert out["batch_stats"]["bn"]["var"] is None
    np.testing.assert_array_equal(out["params"]["w"], np.ones(3, F32))


def test_all_has_no_builtin_names_and_task_arithmetic_is_the_sum():
    import builtins
    assert not [n for n in merge.__all__ if hasattr(builtins, n)]
    assert all(hasattr(merge, n) for n in merge.__all__)
    np.testing.assert_array_equal(merge.task_arithmetic(HAND)["w"], HAND["w"].sum(axis=0))
