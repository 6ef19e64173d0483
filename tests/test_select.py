"""Tests of atm_jax.select: every method equals the k-th largest |x| from a NumPy sort."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from atm_jax import select

METHODS = ("host", "bisect", "top_k")
DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def _ref(values, ranks):
    """k-th largest |x| (1-based) of a flat array, computed in float64 (exact for these dtypes)."""
    desc = np.sort(np.abs(np.asarray(values, np.float64).reshape(-1)))[::-1]
    return desc[np.asarray(ranks) - 1]


def _hard_vector(dtype, n=64, seed=0):
    """Heavy ties, signed zeros, subnormals and normals of both signs, in ``dtype``."""
    rng = np.random.default_rng(seed)
    tiny = float(jnp.finfo(dtype).smallest_subnormal)
    pool = np.array([0.0, -0.0, tiny, -tiny, 3 * tiny, -7 * tiny, 1.0, -1.0, 0.5, 2.0, -2.0, 1.5, -0.25])
    x = rng.choice(pool, size=n)
    # Each kind appears, plus subnormals of different exponents (float32 only).
    big_sub = [2e-40, -5e-39] if dtype == jnp.float32 else [5 * tiny, -9 * tiny]
    x[:6] = [-0.0, 0.0, -0.0, -tiny] + big_sub
    return np.asarray(jnp.asarray(x, dtype))


def _as_float64(v):
    return np.asarray(jnp.asarray(v, jnp.float32), np.float64)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("method", METHODS)
def test_every_rank_matches_sort_with_ties_zeros_subnormals(method, dtype):
    x = _hard_vector(dtype)
    n = x.size
    mags = np.abs(x.astype(np.float64))
    assert np.sum(mags == 1.0) > 1  # ties
    assert np.any((mags > 0) & (mags < float(jnp.finfo(dtype).tiny)))  # subnormals
    assert np.signbit(x.astype(np.float32)[0]) and x[0] == 0  # a negative zero
    got = select.thresholds([jnp.asarray(x).reshape(1, -1)], [list(range(1, n + 1))], method=method)
    assert got.shape == (1, n) and got.dtype == dtype
    got = np.asarray(got)
    np.testing.assert_array_equal(_as_float64(got[0]), _ref(x, np.arange(1, n + 1)))
    assert not np.signbit(got.astype(np.float32)).any(), "a magnitude came back as -0.0"
    for k in (1, n):
        v = select.kth_largest_magnitude(jnp.asarray(x), k, method=method)
        assert v.shape == ()
        assert float(v) == _ref(x, [k])[0]


@pytest.mark.parametrize("method", METHODS)
def test_several_leaves_per_task_and_rank_rows(method):
    rng = np.random.default_rng(3)
    t = 3
    leaves = [np.round(rng.normal(size=(t, 3, 4)) * 2) / 2,       # heavy ties
              rng.normal(size=(t, 5)),
              np.zeros((t, 2, 2, 2))]
    leaves = [a.astype(np.float32) for a in leaves]
    n = 12 + 5 + 8
    ranks = np.array([[1, 5, n], [2, 13, 24], [n, n - 1, 7]])
    got = np.asarray(select.thresholds(leaves, ranks, method=method))
    for task in range(t):
        flat = np.concatenate([a[task].reshape(-1) for a in leaves])
        np.testing.assert_array_equal(got[task], _ref(flat, ranks[task]))
    # A single rank row is used for every task.
    got = np.asarray(select.thresholds(leaves, [4, 9], method=method))
    for task in range(t):
        flat = np.concatenate([a[task].reshape(-1) for a in leaves])
        np.testing.assert_array_equal(got[task], _ref(flat, [4, 9]))


@pytest.mark.parametrize("method", METHODS)
def test_joint_pools_all_tasks(method):
    rng = np.random.default_rng(4)
    leaves = [rng.integers(-4, 5, size=(3, 4, 2)).astype(np.float32),
              rng.normal(size=(3, 6)).astype(np.float32)]
    total = 3 * (8 + 6)
    ranks = [1, 2, 10, 21, total]
    got = np.asarray(select.thresholds(leaves, ranks, joint=True, method=method))
    assert got.shape == (1, len(ranks))
    flat = np.concatenate([a.reshape(-1) for a in leaves])
    np.testing.assert_array_equal(got[0], _ref(flat, ranks))


@pytest.mark.parametrize("method", ("host", "bisect"))
def test_large_input_uses_sampling_path_exactly(method):
    # > 2**18 entries per task, so "host" takes the sample-and-bracket path; two leaves
    # and two tasks (thread pool), one task with heavy ties.
    rng = np.random.default_rng(5)
    a = rng.normal(size=(2, 100_000)).astype(np.float32)
    b = rng.normal(size=(2, 200_003)).astype(np.float32)
    a[1] = rng.integers(-3, 4, size=100_000)
    b[1] = rng.integers(-3, 4, size=200_003) * 0.5
    d = a.shape[1] + b.shape[1]
    assert d > select._SMALL
    ranks = [1, 2, 777, d // 2, d - 3, d]
    got, largest = select.thresholds([a, b], ranks, method=method, return_largest=True)
    for task in range(2):
        flat = np.concatenate([a[task], b[task]])
        np.testing.assert_array_equal(np.asarray(got[task]), _ref(flat, ranks))
        assert float(largest[task]) == np.abs(flat).max()


def test_bracket_fallback_is_exact(monkeypatch):
    # A one-entry sample brackets [that entry, max]: every rank whose answer lies
    # below the sampled entry misses the bracket and must take the full fallback.
    monkeypatch.setattr(select, "_SAMPLE", 1)
    calls = []
    real_partition = np.partition

    def spy(a, kth, *args, **kwargs):
        calls.append(kth)
        return real_partition(a, kth, *args, **kwargs)

    monkeypatch.setattr(np, "partition", spy)
    d = select._SMALL + 1000
    x = np.random.default_rng(6).permutation(np.arange(1, d + 1, dtype=np.float32)).reshape(1, -1)
    ranks = [1, 2, d // 3, d // 2, d - 1, d]
    got = np.asarray(select.thresholds([x], ranks, method="host"))
    np.testing.assert_array_equal(got[0], _ref(x, ranks))
    assert calls, "no rank fell back to the full selection"


def test_largest_magnitude_is_returned_for_every_method():
    x = np.array([[1.0, -5.0, 2.0], [0.0, -0.0, 0.25]], np.float32)
    for method in METHODS:
        _, largest = select.thresholds([x], [1], method=method, return_largest=True)
        np.testing.assert_array_equal(np.asarray(largest), [5.0, 0.25])
        _, largest = select.thresholds([x], [1], joint=True, method=method, return_largest=True)
        np.testing.assert_array_equal(np.asarray(largest), [5.0])


@pytest.mark.parametrize("method", ("auto",) + METHODS)
def test_rank_out_of_range(method):
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    with pytest.raises(ValueError, match=r"ranks must lie in \[1, 3\], got 0\.\.0"):
        select.thresholds([x], [0], method=method)
    with pytest.raises(ValueError, match=r"ranks must lie in \[1, 3\], got 4\.\.4"):
        select.thresholds([x], [4], method=method)
    with pytest.raises(ValueError, match=r"ranks must lie in \[1, 6\]"):
        select.thresholds([x], [7], joint=True, method=method)
    with pytest.raises(ValueError, match=r"ranks must lie in \[1, 3\]"):
        select.kth_largest_magnitude(x[0], 0, method=method)


def test_bad_arguments():
    x = np.ones((2, 3), np.float32)
    with pytest.raises(ValueError, match="Unknown selection method 'sort'"):
        select.thresholds([x], [1], method="sort")
    with pytest.raises(ValueError, match="at least one leaf"):
        select.thresholds([], [1])
    with pytest.raises(ValueError, match="ranks has 3 rows, expected 2"):
        select.thresholds([x], [[1], [1], [1]])
    with pytest.raises(TypeError, match="floating dtype"):
        select.thresholds([np.ones((1, 3), np.int32)], [1], method="host")


def test_auto_is_host_on_concrete_cpu_arrays():
    x = jnp.ones((2, 3))
    assert select.resolve_method("auto", [x]) == "host"
    assert select.resolve_method("bisect", [x]) == "bisect"


@pytest.mark.parametrize("method", ("auto", "bisect", "top_k"))
def test_works_under_jit(method):
    x = _hard_vector(jnp.float32, n=40, seed=7)
    f = jax.jit(lambda v, w: select.thresholds([v, w], [1, 3, 40], method=method))
    a, b = x[:20].reshape(1, -1), x[20:].reshape(1, 20)
    got = np.asarray(f(a, b))
    np.testing.assert_array_equal(got[0], _ref(x, [1, 3, 40]))
    g = jax.jit(lambda v: select.kth_largest_magnitude(v, 5, method=method))
    assert float(g(jnp.asarray(x))) == _ref(x, [5])[0]


def test_bisect_does_not_recompile_for_new_ranks_or_values():
    x = np.random.default_rng(8).normal(size=(2, 50)).astype(np.float32)
    select.thresholds([x], [[1, 2], [3, 4]], method="bisect")
    size = select._bisect._cache_size()
    y = x[::-1] * 3
    got = np.asarray(select.thresholds([y], [[7, 50], [1, 25]], method="bisect"))
    assert select._bisect._cache_size() == size
    np.testing.assert_array_equal(got[0], _ref(y[0], [7, 50]))
    np.testing.assert_array_equal(got[1], _ref(y[1], [1, 25]))


def test_host_method_under_jit_names_the_alternatives():
    with pytest.raises(ValueError, match="method='host'.*'bisect' or 'top_k'"):
        jax.jit(lambda x: select.thresholds([x], [1], method="host"))(jnp.ones((1, 4)))


@pytest.mark.parametrize("in_place", [True, False])
def test_auto_under_jit_on_cpu_runs_the_host_selection_as_a_callback(monkeypatch, in_place):
    # Bisection's 31 counting passes made TIES under the caller's jit 6x slower than
    # eager on CPU: "auto" lowers to one host callback and stays exact.
    # buffer_callback reads XLA's buffers in place; pure_callback (the fallback for a
    # jax without it) copied 3 x 21M float32 inputs for 0.47 s, more than the selection.
    if not in_place:
        monkeypatch.setattr(select, "_buffer_callback", None)
    x = _hard_vector(jnp.float32, n=300, seed=9).reshape(3, 100)
    f = jax.jit(lambda v: select.thresholds([v], [[1, 17], [5, 100], [2, 3]], return_largest=True))
    jaxpr = str(jax.make_jaxpr(f)(x))
    assert ("buffer_callback" if in_place else "pure_callback") in jaxpr
    assert "while" not in jaxpr  # not the bisection
    values, largest = f(x)
    for t, ranks in enumerate(([1, 17], [5, 100], [2, 3])):
        np.testing.assert_array_equal(np.asarray(values[t]), _ref(x[t], ranks))
        assert float(largest[t]) == float(np.max(np.abs(x[t])))
    joint = jax.jit(lambda v: select.thresholds([v], [[7]], joint=True))(x)
    np.testing.assert_array_equal(np.asarray(joint)[0], _ref(x.reshape(-1), [7]))
    # vmapped inside jit: one host call per batch element, each exact.
    batched = jax.jit(jax.vmap(lambda v: select.thresholds([v], [[4]])))(jnp.stack([x, -2 * x]))
    np.testing.assert_array_equal(np.asarray(batched[0])[:, 0], [_ref(x[t], [4])[0] for t in range(3)])
    np.testing.assert_array_equal(np.asarray(batched[1])[:, 0], [_ref(2 * x[t], [4])[0] for t in range(3)])


def test_bisect_refuses_groups_past_int32_counts():
    # The guard is shape-only, so an abstract 2**31-entry input exercises it without memory.
    big = jax.ShapeDtypeStruct((1, 2**31), jnp.float32)
    with pytest.raises(ValueError, match=r"bisect counts in int32: groups of 2\*\*31 entries"):
        jax.eval_shape(lambda v: select.thresholds([v], [[1]], method="bisect"), big)
    ok = jax.ShapeDtypeStruct((1, 2**31 - 1), jnp.float32)
    assert jax.eval_shape(lambda v: select.thresholds([v], [[1]], method="bisect"), ok).shape == (1, 1)


def _streamed(arrays_per_group, ranks, order):
    """StreamedThresholds fed ``arrays_per_group[g]`` in the given array order, twice."""
    s = select.StreamedThresholds(ranks)
    for pass_index in range(2):
        for i in order:
            for g, arrays in enumerate(arrays_per_group):
                s.add(g, arrays[i])
        if pass_index == 0:
            s.bracket()
    return s.values()


def test_streamed_thresholds_match_sort_in_any_order():
    # Per group: a hard vector (ties, signed zeros, subnormals), a wide-range normal
    # vector and a constant one, so ranks land in crowded and in sparse buckets.
    rng = np.random.default_rng(4)
    groups = [[_hard_vector(jnp.float32, 300, seed=g),
               (rng.standard_normal(5000) * 10.0 ** rng.integers(-30, 30, 5000)).astype(np.float32),
               np.full(700, -0.375, np.float32)] for g in range(3)]
    n = 6000
    ranks = np.array([[1, 2, 700, 3000, n], [5, 4999, 5001, 5300, 5999], [n, 1, 701, 702, 42]])
    for order in ([0, 1, 2], [2, 0, 1]):
        got = _streamed(groups, ranks, order)
        for g in range(3):
            want = _ref(np.concatenate(groups[g]), ranks[g]).astype(np.float32)
            np.testing.assert_array_equal(got[g].view(np.uint32), want.view(np.uint32))
    # Neighbouring patterns at the top of one 16-bit bucket (keys 0xFFFF, 0xFFFE, ...).
    edge = np.array([0x3F80FFFF, 0x3F80FFFE, 0x3F80FFFE, 0x3F80FFFD, 0x3F81FFFF], np.uint32)
    got = _streamed([[edge.view(np.float32)]], [[1, 2, 3, 4, 5]], [0])
    np.testing.assert_array_equal(got[0].view(np.uint32), np.sort(edge)[::-1])
    pooled = [[a for arrays in groups for a in arrays]]
    got = _streamed(pooled, [[1, 9000, 3 * n]], range(9))
    np.testing.assert_array_equal(got[0], _ref(np.concatenate(pooled[0]), [1, 9000, 3 * n]))


def test_streamed_thresholds_count_nonfinite_and_check_ranks():
    s = select.StreamedThresholds([[3]])
    s.add(0, np.array([1.0, np.nan, -np.inf], np.float32))
    assert s.nonfinite.tolist() == [2]
    t = select.StreamedThresholds([[4]])
    t.add(0, np.ones(3, np.float32))
    with pytest.raises(ValueError, match=r"ranks must lie in \[1, 3\]"):
        t.bracket()
    with pytest.raises(TypeError, match="float32"):
        select.StreamedThresholds([[1]]).add(0, np.ones(3, np.float64))
