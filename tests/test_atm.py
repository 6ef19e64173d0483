"""The ATM loop and the one-shot baselines, against the paper's equations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from atm_jax import atm, tree
from atm_jax.finetune import Finetuner, OptimizerConfig
from atm_jax.models.heads import init_head

TASKS = ("a", "b", "c")
F, C, D = 6, 3, 5  # features, classes, input size


def _apply(params, x, train):
    del train
    return jnp.tanh(x @ params["dense"]["kernel"] + params["dense"]["bias"]) @ params["out"]


def _data(num=40, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for i, t in enumerate(TASKS):
        x = rng.standard_normal((num, D)).astype(np.float32) + i
        y = rng.integers(0, C, num).astype(np.int32)
        out[t] = (x, y)
    return out


def _base(seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {"dense": {"kernel": 0.3 * jax.random.normal(k1, (D, 8)), "bias": jnp.zeros(8)},
            "out": 0.3 * jax.random.normal(k2, (8, F))}


def _heads():
    return {t: init_head(jax.random.fold_in(jax.random.key(7), i), F, C) for i, t in enumerate(TASKS)}


def _setup(opt=None, train_head=False, num=40):
    data = _data(num)
    opt = opt or OptimizerConfig(learning_rate=1e-2, batch_size=8)
    finetuner = Finetuner(_apply, opt, train_head=train_head)
    calls = []

    def finetune(base, head, task, epochs, key):
        calls.append((task, epochs))
        return finetuner.finetune(base, head, *data[task], epochs=epochs, key=key)

    def evaluate(params, heads):
        out = {}
        for t, h in heads.items():
            x, y = data[t]
            logits = _apply(params, x, False) @ h["kernel"] + h["bias"]
            out[t] = float(np.mean(np.argmax(logits, -1) == y))
        return out

    return finetune, evaluate, calls, data


def _assert_trees_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("train_head", [False, True])
def test_atm_with_one_iteration_is_one_shot_task_arithmetic(train_head):
    finetune, evaluate, _, _ = _setup(train_head=train_head)
    key = jax.random.key(3)
    base = _base()
    merged, heads, history = atm.run(base, _heads(), finetune=finetune, evaluate=evaluate,
                                     iterations=1, epochs_per_iteration=3, key=key)
    out = atm.one_shot(base, _heads(), finetune=finetune, evaluate=evaluate, epochs=3,
                       merges={"ta": atm.MergeSpec("mean")}, key=key)
    assert history[-1]["accuracy"] == out["merged"]["ta"]
    # And the params themselves: recompute the one-shot merge by hand.
    finetuned = [finetune(base, _heads()[t], t, 3, atm.task_key(key, 0, i))[0]
                 for i, t in enumerate(TASKS)]
    by_hand = jax.tree.map(lambda b, *fs: b + sum(f - b for f in fs) / len(fs), base, *finetuned)
    for x, y in zip(jax.tree.leaves(merged), jax.tree.leaves(by_hand)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)


def test_one_atm_step_is_a_gradient_step_on_the_mean_loss():
    """Paper eq. 8 / Theorem 3.1: full-batch GD, one epoch = one step, so the mean of
    the task vectors is exactly -lr * grad of the mean of the task losses."""
    num, lr = 24, 0.05
    opt = OptimizerConfig(name="sgd", learning_rate=lr, grad_clip=None, batch_size=num)
    finetune, _, _, data = _setup(opt=opt, num=num)
    base, heads = _base(), _heads()
    new_base, _, _ = atm.run(base, heads, finetune=finetune, evaluate=None, iterations=1,
                             epochs_per_iteration=1, key=jax.random.key(0))

    def mean_loss(params):
        losses = []
        for t in TASKS:
            x, y = data[t]
            logits = _apply(params, x, True) @ heads[t]["kernel"] + heads[t]["bias"]
            losses.append(-jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(num), y]))
        return sum(losses) / len(losses)

    grad = jax.grad(mean_loss)(base)
    expected = jax.tree.map(lambda p, g: p - lr * g, base, grad)
    for x, y in zip(jax.tree.leaves(new_base), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)


def test_budget_accounting_and_history():
    finetune, evaluate, calls, _ = _setup()
    _, _, history = atm.run(_base(), _heads(), finetune=finetune, evaluate=evaluate,
                            iterations=4, epochs_per_iteration=2, key=jax.random.key(0), name="x")
    assert calls == [(t, 2) for _ in range(4) for t in TASKS]
    assert [h["iteration"] for h in history] == [0, 1, 2, 3, 4]
    assert [h["epochs_per_task"] for h in history] == [0, 2, 4, 6, 8]
    assert all(h["method"] == "x" for h in history)
    last = history[-1]
    assert set(last["accuracy"]) == set(TASKS)
    assert last["average_accuracy"] == pytest.approx(np.mean(list(last["accuracy"].values())))
    cos = np.array(last["merge"]["cosine"])
    assert cos.shape == (3, 3) and np.allclose(np.diag(cos), 1, atol=1e-5)
    assert len(last["merge"]["task_vector_norm"]) == 3
    assert all(last["finetune"][t]["steps"] == 2 * 5 for t in TASKS)  # 40 examples, batch 8
    calls.clear()
    atm.one_shot(_base(), _heads(), finetune=finetune, evaluate=evaluate, epochs=8,
                 merges={"ta": atm.MergeSpec()}, key=jax.random.key(0))
    assert calls == [(t, 8) for t in TASKS]  # the same 8 epochs per task, in one go


def test_frozen_heads_stay_and_trainable_heads_are_carried():
    finetune, evaluate, _, _ = _setup(train_head=False)
    heads = _heads()
    _, out_heads, _ = atm.run(_base(), heads, finetune=finetune, evaluate=None, iterations=2,
                              epochs_per_iteration=1, key=jax.random.key(0))
    _assert_trees_equal(out_heads, heads)
    finetune, _, _, _ = _setup(train_head=True)
    _, carried, _ = atm.run(_base(), heads, finetune=finetune, evaluate=None, iterations=2,
                            epochs_per_iteration=1, key=jax.random.key(0), carry_heads=True)
    _, reset, _ = atm.run(_base(), heads, finetune=finetune, evaluate=None, iterations=2,
                          epochs_per_iteration=1, key=jax.random.key(0), carry_heads=False)
    assert not np.array_equal(carried["a"]["kernel"], heads["a"]["kernel"])
    _assert_trees_equal(reset, heads)


def test_deterministic_and_key_sensitive():
    finetune, _, _, _ = _setup()
    kwargs = dict(finetune=finetune, evaluate=None, iterations=2, epochs_per_iteration=1,
                  merge=atm.MergeSpec("dare", {"p": 0.5}))
    a = atm.run(_base(), _heads(), key=jax.random.key(1), **kwargs)[0]
    b = atm.run(_base(), _heads(), key=jax.random.key(1), **kwargs)[0]
    c = atm.run(_base(), _heads(), key=jax.random.key(2), **kwargs)[0]
    _assert_trees_equal(a, b)
    assert not np.array_equal(a["out"], c["out"])


def test_merge_step_leaves_excluded_paths_at_base():
    base = _base()
    finetuned = [jax.tree.map(lambda x, i=i: x + i + 1.0, base) for i in range(3)]
    spec = atm.MergeSpec("mean", alpha=0.5, exclude="^out$")
    new, diag = atm.merge_step(base, finetuned, spec, key=jax.random.key(0))
    np.testing.assert_array_equal(new["out"], base["out"])
    np.testing.assert_allclose(new["dense"]["kernel"], base["dense"]["kernel"] + 0.5 * 2.0, rtol=1e-6)
    assert diag["task_vector_norm"] == pytest.approx(
        [float(np.sqrt((D * 8 + 8) * (i + 1.0) ** 2)) for i in range(3)], rel=1e-5)
    assert diag["delta_norm"] == pytest.approx(float(np.sqrt((D * 8 + 8) * 4.0)), rel=1e-5)


def test_mergespec_errors_name_the_problem():
    with pytest.raises(ValueError, match="Unknown merge 'tie'"):
        atm.MergeSpec("tie")
    with pytest.raises(ValueError, match="no hyperparameter 'densty'"):
        atm.MergeSpec("ties", {"densty": 0.2})
    with pytest.raises(ValueError, match="alpha=0"):
        atm.MergeSpec("mean", alpha=0)


@pytest.mark.parametrize("field,kwargs", [
    ("iterations", dict(iterations=0, epochs_per_iteration=1)),
    ("epochs_per_iteration", dict(iterations=1, epochs_per_iteration=-1)),
    ("iterations", dict(iterations=1.5, epochs_per_iteration=1)),
])
def test_run_rejects_non_positive_counts(field, kwargs):
    finetune, _, calls, _ = _setup()
    with pytest.raises(ValueError, match=field):
        atm.run(_base(), _heads(), finetune=finetune, evaluate=None, key=jax.random.key(0), **kwargs)
    assert not calls


def test_empty_task_list():
    finetune, evaluate, _, _ = _setup()
    with pytest.raises(ValueError, match="at least one task"):
        atm.run(_base(), {}, finetune=finetune, evaluate=None, iterations=1,
                epochs_per_iteration=1, key=jax.random.key(0))
    with pytest.raises(ValueError, match="at least one task"):
        atm.one_shot(_base(), {}, finetune=finetune, evaluate=evaluate, epochs=1, merges={},
                     key=jax.random.key(0))


def test_cosine_diagnostics_of_opposite_task_vectors():
    """Two opposite task vectors: cosine -1 off the diagonal."""
    base = _base()
    finetuned = [tree.apply(base, jax.tree.map(jnp.ones_like, base), s) for s in (1.0, -1.0)]
    _, diag = atm.merge_step(base, finetuned, atm.MergeSpec(), key=jax.random.key(0))
    np.testing.assert_allclose(diag["cosine"], [[1, -1], [-1, 1]], atol=1e-6)
