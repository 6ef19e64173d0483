"""Flax NNX state as a first-class input: filters, the state rule, RNG state, the
ATM loop and checkpoints, checked against NumPy and against the same arrays in a
linen-style dict."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from atm_jax import atm, merge, tree

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


class Net(nnx.Module):
    def __init__(self, seed: int):
        rngs = nnx.Rngs(seed)
        self.dense = nnx.Linear(3, 4, rngs=rngs)
        self.bn = nnx.BatchNorm(4, rngs=rngs)
        self.head = nnx.Linear(4, 2, rngs=rngs)
        self.drop = nnx.Dropout(0.1, rngs=rngs)


def params_of(seed: int):
    return nnx.split(Net(seed), nnx.Param, ...)[1]


def as_dict(state) -> dict:
    """The same arrays in a plain nested dict, as linen's init gives them."""
    return state.to_pure_dict()


WEIGHTS = ["bn/bias", "bn/scale", "dense/bias", "dense/kernel", "head/bias", "head/kernel"]


def test_leaf_paths_and_anchored_filters_match_linen_dicts():
    state = params_of(0)
    assert tree.leaf_paths(state) == WEIGHTS == tree.leaf_paths(as_dict(state))
    predicate = tree.path_filter(exclude=["head/kernel$", "^bn/"])
    for t in (state, as_dict(state)):
        selected, rest = tree.split(t, predicate)
        kept = [p for p, x in zip(tree.leaf_paths(selected), jax.tree.leaves(selected))]
        assert kept == ["dense/bias", "dense/kernel", "head/bias"]
        assert tree.leaf_paths(rest) == ["bn/bias", "bn/scale", "head/kernel"]


def test_merge_on_nnx_state_excludes_the_anchored_head_and_equals_numpy():
    base, finetuned = params_of(0), [params_of(s) for s in (1, 2, 3)]
    predicate = tree.path_filter(exclude="head/kernel$")
    selected_base, rest = tree.split(base, predicate)
    stacked = tree.stacked_task_vectors([tree.split(f, predicate)[0] for f in finetuned],
                                        selected_base)
    merged = tree.join(tree.apply(selected_base, merge.mean(stacked), 0.5), rest)
    assert isinstance(merged, nnx.State)
    def by_path(state):
        return {p: np.asarray(x, np.float64) for p, x in zip(WEIGHTS, jax.tree.leaves(state))}

    b, fs = by_path(base), [by_path(f) for f in finetuned]
    want = {p: b[p] if p == "head/kernel" else b[p] + 0.5 * np.mean([f[p] - b[p] for f in fs], 0)
            for p in WEIGHTS}
    for path, got in zip(tree.leaf_paths(merged), jax.tree.leaves(merged)):
        np.testing.assert_allclose(got, want[path], rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(merged["head"]["kernel"].get_value(),
                                  base["head"]["kernel"].get_value())
    # TIES gives bitwise the same numbers on the NNX state as on the same arrays in dicts.
    nnx_ties = merge.ties(stacked, density=0.5)
    dict_stacked = tree.stack([tree.split(as_dict(f), predicate)[0] for f in finetuned])
    dict_stacked = jax.tree.map(lambda s, b: s - b, dict_stacked,
                                tree.split(as_dict(base), predicate)[0])
    dict_ties = merge.ties(dict_stacked, density=0.5)
    for a, b in zip(jax.tree.leaves(nnx_ties), jax.tree.leaves(dict_ties), strict=True):
        np.testing.assert_array_equal(a, b)


def test_batch_stats_and_other_non_param_variables_warn_when_merged():
    stats = nnx.split(Net(0), nnx.BatchStat, ...)[1]
    assert tree.state_paths(stats) == ["bn/mean", "bn/var"]
    assert tree.state_paths(params_of(0)) == []
    with pytest.warns(tree.StateMergeWarning, match=r"'bn/mean'.*nnx\.split"):
        merge.mean(tree.stack([stats, stats]))

    class Counter(nnx.Variable):
        pass

    class WithCounter(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.ones(2))
            self.seen = Counter(jnp.zeros(2))

    state = nnx.state(WithCounter())
    assert tree.nnx_collections(state) == {"seen": "Counter", "w": "params"}
    with pytest.warns(tree.StateMergeWarning, match="'seen'"):
        merge.mean(tree.stack([state, state]))
    with warnings.catch_warnings():
        warnings.simplefilter("error", tree.StateMergeWarning)
        merge.mean(tree.stack([params_of(0), params_of(1)]))  # weights only: silent


def test_rng_state_is_refused_with_the_param_split_shown():
    full = nnx.state(Net(0))
    other = nnx.state(Net(1))
    hint = r"'drop/rngs/count'.*RNG state.*nnx\.split\(model, nnx\.Param, \.\.\.\)"
    with pytest.raises(ValueError, match=hint):
        merge.mean(tree.stack([full, other]))
    with pytest.raises(ValueError, match=hint):
        tree.task_vector(other, full)
    with pytest.raises(ValueError, match=hint):
        tree.apply(full, other)
    # A full state still splits into its weights and the rest, RNG state included.
    selected, rest = tree.split(full, tree.path_filter())
    assert [p for p in tree.leaf_paths(selected)] == WEIGHTS
    assert "drop/rngs/key" in tree.leaf_paths(rest)


def _shift(state, c):
    return jax.tree.map(lambda x: x + c if jnp.issubdtype(x.dtype, jnp.floating) else x, state)


@pytest.mark.parametrize("collections", [("params",), ("params", "batch_stats")])
def test_atm_run_on_a_full_nnx_state(collections):
    # Every finetune shifts each float leaf by a per-task constant, so K iterations
    # of the mean move each merged leaf by K * mean(shifts), and nothing else moves.
    base = nnx.state(Net(0))
    shifts = {"a": 0.5, "b": -0.25, "c": 1.0}
    calls = []

    def finetune(params, head, task, epochs, key):
        calls.append(task)
        return _shift(params, shifts[task]), head, {"loss": 0.0}

    spec = atm.MergeSpec("mean", exclude="head/kernel$", collections=collections)
    with warnings.catch_warnings():
        warnings.simplefilter("error", tree.StateMergeWarning)  # asked for: no warning
        merged, _, records = atm.run(base, {t: {} for t in shifts}, finetune=finetune,
                                     evaluate=None, iterations=2, epochs_per_iteration=1,
                                     merge=spec, key=jax.random.key(0))
    assert calls == ["a", "b", "c"] * 2
    assert isinstance(merged, nnx.State)
    moved = {"dense/bias", "dense/kernel", "head/bias", "bn/bias", "bn/scale"}
    if "batch_stats" in collections:
        moved |= {"bn/mean", "bn/var"}
    step = 2 * np.mean(list(shifts.values()))

    def plain(x):  # RNG keys compare by their key data
        return np.asarray(jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
                          else x)

    before = dict(zip(tree.leaf_paths(base), map(plain, jax.tree.leaves(base))))
    for path, got in zip(tree.leaf_paths(merged), jax.tree.leaves(merged)):
        want = before[path] + step if path in moved else before[path]
        if path in moved or jnp.issubdtype(got.dtype, jnp.floating):
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6, err_msg=path)
        else:  # RNG keys and counts keep the base's values
            np.testing.assert_array_equal(plain(got), want, err_msg=path)
    model = Net(5)
    nnx.update(model, merged)
    np.testing.assert_allclose(model.dense.bias.get_value(), before["dense/bias"] + step,
                               rtol=1e-6, atol=1e-6)


def test_checkpoint_round_trip_keeps_the_nnx_structure(tmp_path):
    checkpoint = pytest.importorskip("atm_jax.checkpoint")
    base = params_of(0)
    state = atm.State(iteration=1, base=base, heads={"a": {"w": jnp.ones(2)}}, history=(),
                      finetuned=(params_of(1),), finetuned_heads={"a": {"w": jnp.zeros(2)}},
                      finetune_metrics={})
    position, arrays, finetuned = checkpoint.state_to_checkpoint("atm", state, with_base=True)
    ck = checkpoint.Checkpointer(tmp_path / "ck")
    items = {name: ck.save_item(name, tree_) for name, tree_ in finetuned.items()}
    ck.save(3, arrays, {"position": position}, items=items)
    ck.close()
    ck = checkpoint.Checkpointer(tmp_path / "ck")
    restored = ck.latest()  # a CRC mismatch would set the step aside and return None
    ck.close()
    assert restored is not None and restored.step == 3
    back = checkpoint.state_from_checkpoint(restored.meta["position"], restored.state,
                                            restored.items, tasks=["a"], base=params_of(7))
    for got, want in ((back.base, base), (back.finetuned[0], params_of(1))):
        assert isinstance(got, nnx.State)
        assert jax.tree.structure(got) == jax.tree.structure(want)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_array_equal(a, b)
    model = Net(9)
    nnx.update(model, back.base)
    np.testing.assert_array_equal(model.dense.kernel.get_value(),
                                  base["dense"]["kernel"].get_value())
