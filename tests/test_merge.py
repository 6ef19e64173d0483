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
import jax.numpy as jnp
import numpy as np
import pytest

from atm_jax import merge
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
    """The keep masks DARE draws for ``key``, read back from the merge itself.

    Task t holds 2**t everywhere; the sum aggregate then returns
    sum_t keep_t * 2**t / (1 - p), whose integer code holds one keep bit per task.
    (A Bernoulli mask depends on key and shape only, not on the values.)
    """
    leaves, treedef = jax.tree.flatten(like)
    num_tasks = leaves[0].shape[0]
    coded = [np.broadcast_to((2.0 ** np.arange(num_tasks)).reshape((-1,) + (1,) * (x.ndim - 1)),
                             x.shape).astype(F32) for x in leaves]
    out = jax.tree.leaves(merge.dare(jax.tree.unflatten(treedef, coded), key=key, p=p, aggregate="sum"))
    masks = []
    for o in out:
        code = np.asarray(o, np.float64) * float(F32(1) - F32(p))
        ints = np.rint(code).astype(np.int64)
        assert np.all(np.abs(code - ints) < 1e-3)
        masks.append(np.stack([(ints >> t) & 1 for t in range(num_tasks)]).astype(bool))
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


ONES = {"a": np.ones((1, 64, 64), F32), "b": np.ones((1, 64, 64), F32)}


def test_dare_keep_rate_rescale_and_key_behaviour():
    for p in (0.5, 0.9):
        scale = F32(1) / (F32(1) - F32(p))
        out = merge.dare(ONES, key=jax.random.key(0), p=p)
        masks = {}
        for name, leaf in out.items():
            leaf = np.asarray(leaf)
            kept = leaf != 0
            np.testing.assert_allclose(leaf[kept], scale, rtol=1e-6)
            sigma = math.sqrt(p * (1 - p) / leaf.size)
            assert abs(kept.mean() - (1 - p)) < 5 * sigma, (name, p, kept.mean())
            masks[name] = kept
        assert (masks["a"] != masks["b"]).any(), "both leaves drew the same mask"
    same = merge.dare(ONES, key=jax.random.key(0), p=0.9)
    np.testing.assert_array_equal(np.asarray(same["a"]) != 0, masks["a"])
    other = merge.dare(ONES, key=jax.random.key(1), p=0.9)
    assert (np.asarray(other["a"] != 0) != masks["a"]).any()
    assert (np.asarray(other["b"] != 0) != masks["b"]).any()


def test_dare_is_unbiased_over_keys():
    rng = np.random.default_rng(11)
    x = {"a": rng.normal(size=(1, 64, 64)).astype(F32), "b": rng.normal(size=(1, 64, 64)).astype(F32)}
    num_keys, p = 200, 0.5
    acc = jax.tree.map(lambda v: np.zeros(v.shape[1:]), x)
    for i in range(num_keys):
        out = merge.dare(x, key=jax.random.key(i), p=p)
        acc = jax.tree.map(lambda a, o: a + np.asarray(o, np.float64), acc, out)
    for name in x:
        avg, want = acc[name] / num_keys, x[name][0].astype(np.float64)
        # Each entry's average has std |x| * sqrt(p / (1 - p) / num_keys) ~ 0.07 |x|.
        std = np.abs(want) * math.sqrt(p / (1 - p) / num_keys)
        assert np.all(np.abs(avg - want) <= 6 * std + 1e-12)
        assert abs(np.mean(avg / want) - 1) < 0.01


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


def test_zero_mass_takes_the_majority_sign():
    # Entry 0 has mass +1 - 1 = 0; the other entries set the majority over the model.
    # (dare_ties shares the election: test_dare_with_p_zero... compares it with ties.)
    def fn(s, **kw):
        return merge.ties(s, density=1.0, **kw)
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
        size = merge._merge._cache_size()
        call(second, 1)
        assert merge._merge._cache_size() == size


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


NONFINITE_CASES = [(name, {}) for name in merge.names()] + [
    ("ties", {"scope": "leaf"}), ("ties", {"method": "bisect"}), ("breadcrumbs", {"scope": "model"}),
    ("ties_atm_code", {"method": "top_k"})]


@pytest.mark.parametrize("bad", (np.nan, np.inf, -np.inf), ids=("nan", "inf", "-inf"))
@pytest.mark.parametrize("name,kw", NONFINITE_CASES, ids=lambda v: v if isinstance(v, str) else
                         ",".join(f"{k}={w}" for k, w in v.items()))
def test_nonfinite_task_vector_names_the_leaf(name, kw, bad):
    s = random_tree(50)
    s["enc"]["b"][1, 2] = bad
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
        assert entry.stochastic == name.startswith("dare")
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
