"""Tests of atm_jax.tree: exact values on hand-written trees, NumPy references."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from atm_jax import tree


def _base():
    return {"enc": {"w": np.array([[1.0, 2.0], [3.0, 4.0]], np.float32),
                    "b": np.array([0.5, -0.5], np.float32)},
            "head": {"kernel": np.array([1.0, -1.0, 2.0], np.float32)}}


def _finetuned():
    return {"enc": {"w": np.array([[1.5, 1.0], [3.0, 6.0]], np.float32),
                    "b": np.array([0.0, 0.5], np.float32)},
            "head": {"kernel": np.array([2.0, -1.0, 0.0], np.float32)}}


def _assert_tree_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ----------------------------------------------------------------------------
# Arithmetic
# ----------------------------------------------------------------------------


def test_task_vector_is_finetuned_minus_base():
    tv = tree.task_vector(_finetuned(), _base())
    _assert_tree_equal(tv, {"enc": {"w": np.array([[0.5, -1.0], [0.0, 2.0]], np.float32),
                                    "b": np.array([-0.5, 1.0], np.float32)},
                            "head": {"kernel": np.array([1.0, 0.0, -2.0], np.float32)}})


def test_apply_scales_delta_and_scale_is_traced():
    base, ft = _base(), _finetuned()
    tv = tree.task_vector(ft, base)
    _assert_tree_equal(tree.apply(base, tv), jax.tree.map(jnp.asarray, ft))
    tree.apply(base, tv, 0.5)  # compile for a traced (weak float) scale
    size = tree._apply._cache_size()
    out = tree.apply(base, tv, 2.5)
    assert tree._apply._cache_size() == size, "changing scale recompiled apply"
    expected = jax.tree.map(lambda b, d: b + np.float32(2.5) * d, base, tv)
    _assert_tree_equal(out, jax.tree.map(jnp.asarray, expected))
    out = tree.apply(base, tv, -1.0)
    assert tree._apply._cache_size() == size
    np.testing.assert_array_equal(out["enc"]["w"], np.array([[0.5, 3.0], [3.0, 2.0]], np.float32))


def test_apply_keeps_base_dtype():
    base = {"w": jnp.array([1.0, 2.0], jnp.bfloat16)}
    delta = {"w": jnp.array([0.5, -1.0], jnp.float32)}
    out = tree.apply(base, delta, 2.0)
    assert out["w"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out["w"], np.float32), [2.0, 0.0])


def test_stack_unstack_round_trip():
    trees = [_base(), _finetuned(), tree.task_vector(_finetuned(), _base())]
    stacked = tree.stack(trees)
    assert stacked["enc"]["w"].shape == (3, 2, 2)
    assert stacked["head"]["kernel"].shape == (3, 3)
    np.testing.assert_array_equal(stacked["enc"]["b"][1], _finetuned()["enc"]["b"])
    back = tree.unstack(stacked)
    assert len(back) == 3
    for got, want in zip(back, trees):
        _assert_tree_equal(got, jax.tree.map(jnp.asarray, want))
    assert tree.unstack({}) == []


def test_stack_rejects_empty_and_incompatible():
    with pytest.raises(ValueError, match="empty"):
        tree.stack([])
    bad = _base()
    bad["enc"]["b"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match=r"'enc/b'.*\(3,\).*\(2,\)"):
        tree.stack([_base(), bad])


def test_ravel_concatenates_leaves_in_order_and_inverts():
    import jax.flatten_util  # noqa: F401  (see test_ravel_works_without_prior_flatten_util_import)
    t = _base()
    flat, unravel = tree.ravel(t)
    # jax.tree order: dict keys sorted -> enc/b, enc/w, head/kernel.
    np.testing.assert_array_equal(flat, [0.5, -0.5, 1, 2, 3, 4, 1, -1, 2])
    _assert_tree_equal(unravel(flat), jax.tree.map(jnp.asarray, t))
    back = unravel(jnp.arange(9, dtype=jnp.float32))
    np.testing.assert_array_equal(back["enc"]["w"], [[2, 3], [4, 5]])


def test_ravel_works_without_prior_flatten_util_import():
    code = textwrap.dedent("""
        import numpy as np
        from atm_jax import tree
        flat, _ = tree.ravel({"a": np.ones(3, np.float32)})
        assert flat.shape == (3,)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-800:]


def test_num_params():
    assert tree.num_params(_base()) == 9
    assert tree.num_params(tree.stack([_base()] * 4)) == 36
    assert tree.num_params({}) == 0
    assert tree.num_params({"a": np.zeros((0, 5)), "b": np.zeros((7, 3, 2))}) == 42


def test_global_norm_matches_numpy():
    rng = np.random.default_rng(0)
    t = {"a": rng.normal(size=(5, 7)).astype(np.float32), "b": {"c": rng.normal(size=(11,)).astype(np.float32)},
         "d": jnp.asarray(rng.normal(size=(3,)), jnp.bfloat16)}
    want = np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in jax.tree.leaves(t)))
    np.testing.assert_allclose(float(tree.global_norm(t)), want, rtol=1e-6)
    np.testing.assert_allclose(float(tree.global_norm({"x": np.array([3.0, 4.0], np.float32)})), 5.0, rtol=0)


def test_cosine_matrix_matches_numpy_and_zero_vector_gives_zero():
    rng = np.random.default_rng(1)
    t = 4
    stacked = {"a": rng.normal(size=(t, 3, 5)).astype(np.float32),
               "b": {"c": rng.normal(size=(t, 7)).astype(np.float32)}}
    stacked["a"][2] = 0.0
    stacked["b"]["c"][2] = 0.0  # task 2 is the zero vector
    stacked["b"]["c"][3] = -stacked["b"]["c"][0]
    flat = np.concatenate([np.asarray(x, np.float64).reshape(t, -1) for x in jax.tree.leaves(stacked)], 1)
    norms = np.linalg.norm(flat, axis=1)
    want = np.zeros((t, t))
    for i in range(t):
        for j in range(t):
            if norms[i] > 0 and norms[j] > 0:
                want[i, j] = flat[i] @ flat[j] / (norms[i] * norms[j])
    got = np.asarray(tree.cosine_matrix(stacked))
    assert got.shape == (t, t)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, atol=1e-6)
    np.testing.assert_array_equal(got[2], np.zeros(t))
    np.testing.assert_array_equal(got[:, 2], np.zeros(t))
    np.testing.assert_allclose(np.diagonal(got)[[0, 1, 3]], 1.0, atol=1e-6)
    # Hand case: orthogonal and opposite vectors.
    hand = {"x": np.array([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]], np.float32)}
    np.testing.assert_allclose(tree.cosine_matrix(hand),
                               [[1, 0, -1], [0, 1, 0], [-1, 0, 1]], atol=1e-7)


# ----------------------------------------------------------------------------
# Which leaves merge
# ----------------------------------------------------------------------------


def test_leaf_paths():
    t = {"enc": {"w": 1, "b": 2}, "blocks": [{"k": 3}, {"k": 4}]}
    assert tree.leaf_paths(t) == ["blocks/0/k", "blocks/1/k", "enc/b", "enc/w"]


def test_path_filter_include_exclude_semantics():
    everything = tree.path_filter()
    assert everything("a/b") and everything("")
    inc = tree.path_filter(include="enc")
    assert inc("model/enc/w") and not inc("model/head/w")  # re.search, not fullmatch
    exc = tree.path_filter(exclude=r"head")
    assert exc("enc/w") and not exc("task_head/kernel")
    both = tree.path_filter(include=["^enc/", "^dec/"], exclude=["bias$", "ln"])
    assert both("enc/w") and both("dec/kernel")
    assert not both("enc/bias")       # excluded wins over included
    assert not both("dec/ln/scale")
    assert not both("head/w")         # not included
    anchored = tree.path_filter(include="^w$")
    assert anchored("w") and not anchored("enc/w")


def test_path_filter_invalid_regex_names_pattern():
    with pytest.raises(ValueError, match=r"Invalid leaf-path regex '\(unclosed'"):
        tree.path_filter(include=["ok", "(unclosed"])
    with pytest.raises(ValueError, match=r"'\[a-'"):
        tree.path_filter(exclude="[a-")


def test_split_join_round_trip_with_heads_excluded():
    t = _base()
    selected, rest = tree.split(t, tree.path_filter(exclude="head"))
    assert selected["head"]["kernel"] is None
    assert rest["enc"]["w"] is None and rest["enc"]["b"] is None
    np.testing.assert_array_equal(selected["enc"]["w"], t["enc"]["w"])
    np.testing.assert_array_equal(rest["head"]["kernel"], t["head"]["kernel"])
    assert len(jax.tree.leaves(selected)) == 2 and len(jax.tree.leaves(rest)) == 1
    _assert_tree_equal(tree.join(selected, rest), t)
    # Arithmetic on the selected part skips the None leaves.
    delta = tree.task_vector(tree.split(_finetuned(), tree.path_filter(exclude="head"))[0], selected)
    assert delta["head"]["kernel"] is None
    np.testing.assert_array_equal(delta["enc"]["b"], [-0.5, 1.0])


# ----------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------


def test_check_compatible_accepts_equal_trees():
    tree.check_compatible([_base(), _finetuned()])
    with pytest.raises(ValueError, match="at least one"):
        tree.check_compatible([])


def test_check_compatible_structure_names_leaf():
    missing = _base()
    del missing["enc"]["b"]
    with pytest.raises(ValueError, match=r"task vector 1 .*missing leaf 'enc/b'"):
        tree.check_compatible([_base(), missing])
    extra = _base()
    extra["enc"]["extra"] = np.zeros(1, np.float32)
    with pytest.raises(ValueError, match=r"unexpected leaf 'enc/extra'"):
        tree.check_compatible([_base(), _base(), extra], names=["cifar", "dtd", "svhn"])
    with pytest.raises(ValueError, match=r"^svhn has a different tree structure from cifar"):
        tree.check_compatible([_base(), _base(), extra], names=["cifar", "dtd", "svhn"])


def test_check_compatible_shape_names_first_offending_leaf():
    bad = _base()
    bad["enc"]["w"] = np.zeros((2, 3), np.float32)
    bad["head"]["kernel"] = np.zeros(4, np.float32)
    with pytest.raises(ValueError, match=r"^Leaf 'enc/w': task vector 1 has shape \(2, 3\) but "
                       r"task vector 0 has \(2, 2\)"):
        tree.check_compatible([_base(), bad])


def test_check_compatible_dtype_names_leaf():
    bad = _base()
    bad["head"]["kernel"] = bad["head"]["kernel"].astype(np.float16)
    with pytest.raises(ValueError, match=r"^Leaf 'head/kernel': b has dtype float16 but a has float32"):
        tree.check_compatible([_base(), bad], names=["a", "b"])


def test_check_finite_names_leaf_and_task():
    stacked = tree.stack([_base(), _base(), _base()])
    tree.check_finite(stacked)  # finite: no error
    bad = jax.tree.map(np.array, stacked)
    bad["head"]["kernel"][2, 1] = np.inf
    bad["enc"]["w"][1, 0, 0] = np.nan
    bad["enc"]["w"][1, 1, 1] = -np.inf
    # enc/w comes before head/kernel in leaf order.
    with pytest.raises(ValueError, match=r"Leaf 'enc/w' .*task index 1, 2 entries"):
        tree.check_finite(bad)
    bad["enc"]["w"][1] = 0.0
    with pytest.raises(ValueError, match=r"Leaf 'head/kernel' .*task index 2, 1 entries"):
        tree.check_finite(bad)
    with pytest.raises(ValueError, match=r"of the deltas"):
        tree.check_finite(bad, what="delta")


# ----------------------------------------------------------------------------
# Input rules: shapes never broadcast, lists vs trees, integers, collections
# ----------------------------------------------------------------------------


def test_apply_refuses_a_stacked_delta_and_names_the_leaf():
    base = {"w": np.zeros((8, 8), np.float32), "b": np.zeros((8,), np.float32)}
    stacked = tree.stack([base, base, base])
    with pytest.raises(ValueError, match=r"Leaf 'b': delta has shape \(3, 8\) but base has \(8,\).*"
                                         r"stacked \(a task axis of 3\).*merge.mean"):
        tree.apply(base, stacked)


def test_task_vector_does_not_broadcast_and_names_the_leaf():
    with pytest.raises(ValueError, match=r"Leaf 'a': finetuned has shape \(3, 8\) but base has \(8,\)"):
        tree.task_vector({"a": np.ones((3, 8), np.float32)}, {"a": np.ones((8,), np.float32)})
    with pytest.raises(ValueError, match=r"finetuned has a different tree structure from base: "
                                         r"missing leaf 'enc/b'"):
        tree.task_vector({"enc": {"w": np.ones(2, np.float32)}},
                         {"enc": {"w": np.ones(2, np.float32), "b": np.ones(2, np.float32)}})


def test_apply_structure_and_scale_errors():
    base = _base()
    with pytest.raises(ValueError, match=r"delta has a different tree structure from base: missing leaf 'head/kernel'"):
        tree.apply(base, {"enc": base["enc"]})
    with pytest.raises(ValueError, match=r"scale must be a scalar, got shape \(2,\)"):
        tree.apply(base, base, np.ones(2, np.float32))


def test_integer_leaves_are_refused_or_passed_through_by_a_none_delta():
    base = {"w": np.array([1.0, 2.0], np.float32), "step": np.array([7], np.int32)}
    with pytest.raises(ValueError, match=r"Leaf 'step' of the base has dtype int32; only floating"):
        tree.apply(base, {"w": np.ones(2, np.float32), "step": np.array([0.6], np.float32)})
    with pytest.raises(ValueError, match=r"Leaf 'step' of the params tree has dtype int32"):
        tree.task_vector(base, base)
    out = tree.apply(base, {"w": np.array([0.5, -1.0], np.float32), "step": None}, 2.0)
    np.testing.assert_array_equal(out["w"], [2.0, 0.0])
    assert out["step"].dtype == np.int32 and int(out["step"][0]) == 7


@pytest.mark.parametrize("fn", ("stack", "stacked_task_vectors"))
def test_one_tree_instead_of_a_list_says_to_pass_a_list(fn):
    one = _base()
    call = (lambda t: tree.stack(t)) if fn == "stack" else (lambda t: tree.stacked_task_vectors(t, one))
    with pytest.raises(ValueError, match=rf"tree.{fn} takes a list of T trees, got one tree \(a dict "
                                         rf"with keys \['enc', 'head'\]\).*tree.{fn}\(\[tree\]\)"):
        call(one)


def test_unstack_and_cosine_name_a_leaf_with_another_task_count():
    bad = {"a": np.ones((3, 2), np.float32), "b": np.ones((2, 2), np.float32)}
    for fn in (tree.unstack, tree.cosine_matrix, tree.gram_matrix):
        with pytest.raises(ValueError, match=r"Leaf 'b' stacks 2 tasks \(shape \(2, 2\)\) but 'a' stacks 3"):
            fn(bad)


def test_check_stacked_with_like_catches_an_unstacked_tree():
    base = {"dense": {"kernel": np.zeros((8, 8), np.float32), "bias": np.zeros((8,), np.float32)}}
    with pytest.raises(ValueError, match=r"Leaf 'dense/bias' has shape \(8,\) but the reference"):
        tree.check_stacked(base, like=base)
    leaves, _, paths = tree.check_stacked(tree.stack([base, base]), like=base)
    assert paths == ["dense/bias", "dense/kernel"] and leaves[1].shape == (2, 8, 8)


def test_join_refuses_overlapping_parts():
    t = {"a": np.ones(2, np.float32), "b": np.zeros(2, np.float32)}
    with pytest.raises(ValueError, match=r"Leaf 'a' is set in both parts"):
        tree.join(t, {"a": np.ones(2, np.float32), "b": None})


def test_split_takes_only_params_from_a_variables_dict():
    variables = {"params": {"dense": {"kernel": np.ones((2, 2), np.float32)}},
                 "batch_stats": {"bn": {"mean": np.zeros(2, np.float32), "var": np.ones(2, np.float32)}}}
    assert tree.state_paths(variables) == ["batch_stats/bn/mean", "batch_stats/bn/var"]
    assert tree.state_paths({"bn": {"batch_stats": {"var": np.ones(2)}}, "w": np.ones(2)}) == \
        ["bn/batch_stats/var"]
    for predicate in (tree.path_filter(), lambda path: True):
        selected, rest = tree.split(variables, predicate)
        assert selected["batch_stats"]["bn"]["var"] is None and rest["params"]["dense"]["kernel"] is None
        np.testing.assert_array_equal(selected["params"]["dense"]["kernel"], np.ones((2, 2)))
        np.testing.assert_array_equal(rest["batch_stats"]["bn"]["var"], np.ones(2))
    everything, rest = tree.split(variables, tree.path_filter(collections=None))
    assert tree.leaf_paths(rest) == [] and len(tree.leaf_paths(everything)) == 3
    # Plain params trees (no "params" key at the top) are unaffected by the rule.
    sel, _ = tree.split(variables["params"], tree.path_filter())
    np.testing.assert_array_equal(sel["dense"]["kernel"], np.ones((2, 2)))
