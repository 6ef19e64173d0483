"""Pytree shapes that real research code brings: list-, tuple- and NamedTuple-topped
params (stacked or not), and low-precision params under `tree.apply`."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from atm_jax import merge, tree

F32 = np.float32


class Layer(NamedTuple):
    w: np.ndarray
    b: np.ndarray


def per_layer(seed, top):
    """Params with two layers of one structure under a ``top`` container."""
    rng = np.random.default_rng(seed)
    layers = [{"w": rng.normal(size=(2, 3)).astype(F32), "b": rng.normal(size=(3,)).astype(F32)}
              for _ in range(2)]
    if top is Layer:
        return Layer(*layers)
    if top is dict:
        return {"l0": layers[0], "l1": layers[1]}
    return top(layers)


TOPS = [list, tuple, Layer, dict]


@pytest.mark.parametrize("top", TOPS, ids=lambda t: t.__name__)
def test_a_stacked_tree_may_have_any_container_at_its_top(top):
    base = per_layer(0, top)
    finetuned = [per_layer(s, top) for s in (1, 2, 3)]
    stacked = tree.stacked_task_vectors(finetuned, base)
    assert type(stacked) is type(base)
    want = [np.mean([np.asarray(f) - np.asarray(b) for f in fl], 0)
            for b, *fl in zip(jax.tree.leaves(base), *map(jax.tree.leaves, finetuned))]
    ambiguous = top in (list, tuple)  # two layers of one structure, leaves leading with 3
    if ambiguous:
        for fn in (merge.mean, tree.unstack, tree.cosine_matrix):
            with pytest.raises(ValueError, match=rf"Got a {top.__name__} of 2 trees of one "
                               r"structure whose leaves all lead with 3: ambiguous.*like="):
                fn(stacked)
    got = merge.mean(stacked, like=base)
    for g, w in zip(jax.tree.leaves(got), want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7)
    if not ambiguous:
        for g, w in zip(jax.tree.leaves(merge.mean(stacked)), want, strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7)
    parts = tree.unstack(stacked, like=base)
    assert len(parts) == 3 and all(jax.tree.structure(p) == jax.tree.structure(base)
                                   for p in parts)
    np.testing.assert_array_equal(jax.tree.leaves(parts[1])[0],
                                  jax.tree.leaves(finetuned[1])[0] - jax.tree.leaves(base)[0])
    flat = np.stack([np.concatenate([np.ravel(np.asarray(f) - np.asarray(b)) for f, b in
                                     zip(jax.tree.leaves(t), jax.tree.leaves(base))])
                     for t in finetuned]).astype(np.float64)
    norms = np.linalg.norm(flat, axis=1)
    np.testing.assert_allclose(tree.cosine_matrix(stacked, like=base),
                               flat @ flat.T / np.outer(norms, norms), rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("inner", TOPS, ids=lambda t: t.__name__)
@pytest.mark.parametrize("outer", [list, tuple], ids=lambda t: t.__name__)
def test_a_sequence_of_task_trees_is_refused_whatever_their_containers(outer, inner):
    base = per_layer(0, inner)
    tvs = outer(tree.task_vector(per_layer(s, inner), base) for s in (1, 2, 3))
    # Leaves of shapes (2, 3) and (3,): no common leading axis, so separate trees.
    with pytest.raises(ValueError, match=rf"Got a {outer.__name__} of 3 trees.*no leading "
                       r"task axis.*3 separate trees.*tree\.stack\(trees\)"):
        merge.ties(tvs)
    with pytest.raises(ValueError, match=rf"Got a {outer.__name__} of 3 trees, each shaped "
                       r"like the reference.*tree\.stack\(trees\)"):
        merge.mean(tvs, like=base)
    # Leaves that happen to share a leading size: ambiguous without like=, never merged.
    square = outer(jax.tree.map(lambda x: jnp.zeros((3, 3), x.dtype), tv) for tv in tvs)
    with pytest.raises(ValueError, match="ambiguous"):
        merge.mean(square)
    with pytest.raises(ValueError, match=r"Got a .* of 3 trees of one structure.*ambiguous"):
        tree.unstack(square)


def test_a_scalar_leaf_marks_separate_trees():
    with pytest.raises(ValueError, match=r"leaf '0/a' is a scalar.*2 separate trees"):
        merge.mean([{"a": np.float32(1)}, {"a": np.float32(2)}])


# -- one rounding in apply ------------------------------------------------------------------


def round_once(x: np.ndarray, significand_bits: int, min_exponent: int) -> np.ndarray:
    """float64 ``x`` rounded to nearest-even at the given precision, subnormals included
    (exact in float64: ``x / quantum`` only shifts the exponent)."""
    _, exponent = np.frexp(x)
    quantum = np.ldexp(1.0, np.maximum(exponent, min_exponent + 1) - significand_bits)
    return np.round(x / quantum) * quantum


FORMATS = {"bfloat16": (jnp.bfloat16, 8, -126), "float16": (jnp.float16, 11, -14)}


def low_precision_case(dtype, n=200_000, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.normal(size=n).astype(dtype)
    delta = (rng.normal(size=n) * rng.choice([1e-3, 0.1, 1.0, 3.0], n)).astype(dtype)
    # Near-cancellations: scale * delta close to -base.
    k = n // 10
    delta[:k] = (-np.asarray(base[:k], np.float64) / 0.7 * (1 + rng.normal(size=k) * 1e-3)
                 ).astype(dtype)
    return base, delta


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("scale", [0.7, 1 / 3, 0.1234567, 1.0, -2.5])
def test_apply_rounds_low_precision_params_once(name, scale):
    dtype, bits, emin = FORMATS[name]
    base, delta = low_precision_case(dtype)
    got = tree.apply({"w": jnp.asarray(base)}, {"w": jnp.asarray(delta)}, scale)["w"]
    assert got.dtype == dtype
    exact = (np.asarray(base, np.float64)
             + np.float64(np.float32(scale)) * np.asarray(delta, np.float64))
    want = round_once(exact, bits, emin)
    np.testing.assert_array_equal(np.asarray(got, np.float64), want)
    if scale in (0.7, 1 / 3, 0.1234567):  # scale * delta inexact in float32: the reference
        # tells the roundings apart, float32 arithmetic and then a cast does not match it
        twice = (jnp.asarray(base, jnp.float32) + jnp.float32(scale) * jnp.asarray(delta, jnp.float32)
                 ).astype(dtype)
        assert np.sum(np.asarray(twice, np.float64) != want) > 0


def test_apply_keeps_inf_and_nan_as_float32_arithmetic_does():
    base = jnp.array([3e38, jnp.inf, jnp.nan, 1.0], jnp.bfloat16)
    delta = jnp.array([3e38, 1.0, 1.0, jnp.inf], jnp.bfloat16)
    got = np.asarray(tree.apply({"w": base}, {"w": delta}, 0.9)["w"], np.float64)
    np.testing.assert_array_equal(got, [np.inf, np.inf, np.nan, np.inf])


def test_apply_float32_is_within_one_ulp_of_the_exact_value():
    rng = np.random.default_rng(1)
    n = 100_000
    base = rng.normal(size=n).astype(F32)
    delta = (rng.normal(size=n) * 10.0 ** rng.integers(-4, 2, n)).astype(F32)
    # A tenth cancel: 0.7 * delta within about 1e-5 of -base (a naive b + s * d is
    # thousands of ulps off there unless the compiler fuses it into one FMA).
    k = n // 10
    delta[:k] = (-base[:k].astype(np.float64) / np.float32(0.7)
                 * (1 + rng.normal(size=k) * 1e-5)).astype(F32)
    got = np.asarray(tree.apply({"w": base}, {"w": delta}, 0.7)["w"], np.float64)
    exact = base.astype(np.float64) + np.float64(np.float32(0.7)) * delta.astype(np.float64)
    ulp = np.spacing(np.abs(got).astype(F32)).astype(np.float64)
    ratio = np.abs(got - exact) / ulp
    assert ratio.max() <= 0.5 + 1e-6, ratio.max()  # correctly rounded on these cases


def test_mixed_dtypes_across_tasks_are_refused_with_the_leaf_path():
    a = {"enc": {"w": np.ones((2,), jnp.bfloat16)}}
    b = {"enc": {"w": np.ones((2,), F32)}}
    with pytest.raises(ValueError, match=r"Leaf 'enc/w'.*dtype float32.*bfloat16"):
        tree.stack([a, b])
    with pytest.raises(ValueError, match=r"Leaf 'enc/w'.*dtype"):
        tree.stacked_task_vectors([a, b], a)


def test_atm_merges_per_layer_list_params():
    from atm_jax import atm

    base = per_layer(0, list)
    shifts = {"a": 0.5, "b": -0.25, "c": 1.0}

    def finetune(params, head, task, epochs, key):
        return jax.tree.map(lambda x: x + shifts[task], params), head, {"loss": 0.0}

    for name in ("mean", "ties"):
        merged, _, _ = atm.run(base, {t: {} for t in shifts}, finetune=finetune, evaluate=None,
                               iterations=2, epochs_per_iteration=1,
                               merge=atm.MergeSpec(name), key=jax.random.key(0))
        assert type(merged) is list
        if name == "mean":
            for got, want in zip(jax.tree.leaves(merged), jax.tree.leaves(base), strict=True):
                np.testing.assert_allclose(got, np.asarray(want) + 2 * np.mean([0.5, -0.25, 1.0]),
                                           rtol=1e-6, atol=1e-6)
