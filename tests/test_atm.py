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
                            iterations=4, epochs_per_iteration=2, key=jax.random.key(0))
    assert calls == [(t, 2) for _ in range(4) for t in TASKS]
    assert [h["iteration"] for h in history] == [0, 1, 2, 3, 4]
    assert [h["epochs_per_task"] for h in history] == [0, 2, 4, 6, 8]
    assert all(h["method"] == "atm" for h in history)
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


def test_eval_every_evaluates_only_those_iterations_and_changes_nothing_else():
    finetune, evaluate, _, _ = _setup()
    evaluated = []

    def counting(params, heads):
        evaluated.append(params)
        return evaluate(params, heads)

    kw = dict(finetune=finetune, iterations=5, epochs_per_iteration=1, key=jax.random.key(0))
    base_all, _, every = atm.run(_base(), _heads(), evaluate=evaluate, **kw)
    base_some, _, some = atm.run(_base(), _heads(), evaluate=counting, eval_every=2, **kw)
    # the start, iterations 2 and 4, and always the last (5)
    assert [h["iteration"] for h in some if "accuracy" in h] == [0, 2, 4, 5]
    assert len(evaluated) == 4
    assert [h["iteration"] for h in some] == [0, 1, 2, 3, 4, 5]
    for a, b in zip(every, some, strict=True):
        if "accuracy" in b:
            assert a["accuracy"] == b["accuracy"]
    for a, b in zip(every[1:], some[1:], strict=True):  # the same finetunes and merges
        assert a["merge"]["task_vector_norm"] == b["merge"]["task_vector_norm"]
    _assert_trees_equal(base_all, base_some)


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
    ("eval_every", dict(iterations=2, epochs_per_iteration=1, eval_every=0)),
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


# -- by-hand references: a finetune whose result is known in closed form ------------------

def _documented_task_key(key, iteration, task_index):
    # atm.task_key's docstring: fold_in(fold_in(fold_in(key, iteration), 0), task_index).
    return jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(key, iteration), 0), task_index)


def _scripted(shift=None):
    """finetune -> base + epochs * c_task + 1e-3 * normal(key); heads + 1 per call."""
    shift = shift or {t: float(i + 1) for i, t in enumerate(TASKS)}
    seen = []

    def finetune(base, head, task, epochs, key):
        seen.append((task, np.asarray(jax.random.key_data(key)).tobytes(),
                     float(head["w"][0])))
        noise = jax.tree.map(lambda x: 1e-3 * jax.random.normal(key, x.shape), base)
        params = jax.tree.map(lambda b, n: b + epochs * shift[task] + n, base, noise)
        return params, {"w": head["w"] + 1.0}, {"loss": 0.25}

    return finetune, seen, shift


def _counting_heads():
    return {t: {"w": np.zeros(2, np.float32)} for t in TASKS}


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_atm_loop_equals_the_closed_form(alpha):
    """K iterations of mean merging, every key from the documented derivation:
    base_K = base_0 + alpha * sum_k mean_t(e * c_t + 1e-3 * normal(key_kt))."""
    finetune, seen, shift = _scripted()
    key, base, iterations, epochs = jax.random.key(5), _base(), 3, 2
    merged, _, history = atm.run(base, _counting_heads(), finetune=finetune, evaluate=None,
                                 iterations=iterations, epochs_per_iteration=epochs, key=key,
                                 merge=atm.MergeSpec("mean", alpha=alpha))
    expected = jax.tree.map(np.asarray, base)
    for k in range(iterations):
        deltas = []
        for i, t in enumerate(TASKS):
            k_t = _documented_task_key(key, k, i)
            deltas.append(jax.tree.map(
                lambda x, k_t=k_t, t=t: epochs * shift[t] + 1e-3 * np.asarray(
                    jax.random.normal(k_t, x.shape)), expected))
        expected = jax.tree.map(lambda b, *d: b + alpha * np.mean(d, axis=0), expected, *deltas)
    for x, y in zip(jax.tree.leaves(merged), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(np.asarray(x), y, rtol=1e-5, atol=1e-6)
    keys = [s[1] for s in seen]
    assert keys == [np.asarray(jax.random.key_data(_documented_task_key(key, k, i))).tobytes()
                    for k in range(iterations) for i in range(len(TASKS))]
    assert len(set(keys)) == len(keys)  # every (iteration, task) trains with its own key
    # evaluate=None: no iteration-0 record and no accuracies, only the merge records.
    assert [h["iteration"] for h in history] == [1, 2, 3]
    assert not any("accuracy" in h for h in history)


def test_carried_heads_are_the_previous_iterations_heads_exactly():
    finetune, seen, _ = _scripted()
    _, heads, _ = atm.run(_base(), _counting_heads(), finetune=finetune, evaluate=None,
                          iterations=3, epochs_per_iteration=1, key=jax.random.key(0),
                          carry_heads=True)
    # Each call adds 1 to the head it gets: iteration k must start from k.
    assert [s[2] for s in seen] == [k for k in range(3) for _ in TASKS]
    assert all(np.array_equal(h["w"], [3.0, 3.0]) for h in heads.values())
    seen.clear()
    _, heads, _ = atm.run(_base(), _counting_heads(), finetune=finetune, evaluate=None,
                          iterations=3, epochs_per_iteration=1, key=jax.random.key(0),
                          carry_heads=False)
    assert [s[2] for s in seen] == [0.0] * 9
    assert all(np.array_equal(h["w"], [0.0, 0.0]) for h in heads.values())


def test_one_shot_individual_and_merged_params_by_hand():
    finetune, _, shift = _scripted()
    base, key, epochs = _base(), jax.random.key(2), 4

    def evaluate(params, heads):  # "accuracy" = mean of params["out"], task-independent
        return {t: float(np.mean(params["out"])) + float(h["w"][0]) for t, h in heads.items()}

    out = atm.one_shot(base, _counting_heads(), finetune=finetune, evaluate=evaluate, epochs=epochs,
                       merges={"ta": atm.MergeSpec("mean"), "half": atm.MergeSpec("mean", alpha=0.5)},
                       key=key)
    for i, t in enumerate(TASKS):
        noise = 1e-3 * np.asarray(jax.random.normal(_documented_task_key(key, 0, i), base["out"].shape))
        own = np.mean(np.asarray(base["out"]) + epochs * shift[t] + noise) + 1.0  # its own head: +1
        assert out["individual"][t] == pytest.approx(own, rel=1e-5)
    mean_shift = epochs * np.mean(list(shift.values()))
    for name, alpha in (("ta", 1.0), ("half", 0.5)):
        got = np.asarray(out["params"][name]["dense"]["bias"])
        np.testing.assert_allclose(got, alpha * mean_shift, atol=3e-3)  # noise is 1e-3 scale
        assert out["merged"][name]["a"] == pytest.approx(
            float(np.mean(out["params"][name]["out"])) + 1.0, rel=1e-6)


def test_include_merges_only_matching_leaves():
    base = _base()
    finetuned = [jax.tree.map(lambda x, i=i: x + i + 1.0, base) for i in range(3)]
    new, _ = atm.merge_step(base, finetuned, atm.MergeSpec("mean", include=r"^dense/bias$"),
                            key=jax.random.key(0))
    np.testing.assert_allclose(new["dense"]["bias"], np.asarray(base["dense"]["bias"]) + 2.0)
    np.testing.assert_array_equal(new["dense"]["kernel"], base["dense"]["kernel"])
    np.testing.assert_array_equal(new["out"], base["out"])


def test_only_the_params_collection_merges_by_default():
    base = {"params": {"w": jnp.ones(3)}, "batch_stats": {"var": jnp.ones(3)}}
    finetuned = [{"params": {"w": jnp.full(3, v)}, "batch_stats": {"var": jnp.full(3, 0.1 * v)}}
                 for v in (2.0, 4.0)]
    new, _ = atm.merge_step(base, finetuned, atm.MergeSpec("mean", alpha=2.0), key=jax.random.key(0))
    np.testing.assert_allclose(new["params"]["w"], 1 + 2 * 2.0)  # 1 + 2 * mean(1, 3)
    np.testing.assert_array_equal(new["batch_stats"]["var"], base["batch_stats"]["var"])
    both = atm.MergeSpec("mean", collections=("params", "batch_stats"))
    new, _ = atm.merge_step(base, finetuned, both, key=jax.random.key(0))
    np.testing.assert_allclose(new["batch_stats"]["var"], 1 + np.mean([0.2 - 1, 0.4 - 1]), rtol=1e-6)
    with pytest.raises(ValueError, match=r"collections \['stats'\] are not in the base"):
        atm.merge_step(base, finetuned, atm.MergeSpec("mean", collections="stats"),
                       key=jax.random.key(0))


def test_mergespec_takes_hyperparameters_as_keywords():
    assert atm.MergeSpec("ties", density=0.2) == atm.MergeSpec("ties", {"density": 0.2})
    assert atm.MergeSpec("ties", density=0.2, alpha=0.5).alpha == 0.5
    with pytest.raises(TypeError, match=r"\['density'\] both in kwargs and as keywords"):
        atm.MergeSpec("ties", {"density": 0.2}, density=0.3)
    with pytest.raises(TypeError, match="must be a dict of hyperparameters"):
        atm.MergeSpec("ties", 0.2)
    with pytest.raises(ValueError, match="alpha='1'"):
        atm.MergeSpec("mean", alpha="1")


def test_inputs_are_checked_with_the_fix_in_the_message():
    finetune, _, _ = _scripted()
    run = dict(finetune=finetune, evaluate=None, iterations=1, epochs_per_iteration=1,
               key=jax.random.key(0))
    with pytest.raises(TypeError, match=r"heads must be a dict \{task name: head pytree\}.*list"):
        atm.run(_base(), list(_counting_heads().values()), **run)
    with pytest.raises(TypeError, match="must be an atm.MergeSpec"):
        atm.run(_base(), _counting_heads(), merge="mean", **run)
    bad = dict(run, finetune=lambda *a: a[0])
    with pytest.raises(TypeError, match=r"must return \(params, head, metrics dict\); for task 'a'"):
        atm.run(_base(), _counting_heads(), **bad)
    wrong = dict(run, evaluate=lambda p, h: {"zz": 1.0})
    with pytest.raises(TypeError, match=r"return \{task: accuracy\} for the tasks \['a', 'b', 'c'\]"):
        atm.run(_base(), _counting_heads(), **wrong)
    with pytest.raises(TypeError, match=r"merges must be a dict \{method name: atm.MergeSpec\}"):
        atm.one_shot(_base(), _counting_heads(), finetune=finetune, evaluate=lambda p, h: {},
                     epochs=1, merges={"ta": "mean"}, key=jax.random.key(0))


def test_scalar_metrics_are_logged():
    finetune, _, _ = _scripted()  # returns {"loss": 0.25}, a number, not a per-epoch list
    lines = []
    atm.iteration(atm.init(_base(), _counting_heads()), finetune=finetune, epochs=1,
                  merge=atm.MergeSpec(), key=jax.random.key(0), log=lines.append)
    assert any("finetune a: 1 epoch(s), final loss 0.2500" in line for line in lines)


def test_run_and_one_shot_take_exactly_their_parameters_and_name_what_replaced_the_rest():
    import inspect

    assert list(inspect.signature(atm.run).parameters) == [
        "base", "heads", "finetune", "evaluate", "iterations", "epochs_per_iteration", "merge",
        "key", "carry_heads", "eval_every"]
    assert list(inspect.signature(atm.one_shot).parameters) == [
        "base", "heads", "finetune", "evaluate", "epochs", "merges", "key", "tune_alpha",
        "alpha_grid", "validate"]
    finetune, seen, _ = _scripted()
    kwargs = dict(finetune=finetune, evaluate=None, iterations=1, epochs_per_iteration=1,
                  key=jax.random.key(0))
    for gone, replacement in (("callback", "atm.record"), ("on_progress", "atm.iteration"),
                              ("start", "from that state"), ("finetune_tasks", "atm.iteration"),
                              ("tasks_per_call", "count="), ("log", "your own loop"),
                              ("name", "atm.record")):
        with pytest.raises(TypeError, match=rf"run\(\) no longer takes {gone}=: .*{replacement}"):
            atm.run(_base(), _counting_heads(), **kwargs, **{gone: None})
    for gone in ("callback", "on_progress", "start", "finetune_tasks", "tasks_per_call", "log"):
        with pytest.raises(TypeError, match=rf"one_shot\(\) no longer takes {gone}=: .*atm\."):
            atm.one_shot(_base(), _counting_heads(), finetune=finetune, evaluate=None, epochs=1,
                         merges={}, key=jax.random.key(0), **{gone: None})
    assert not seen


def test_a_loop_over_iteration_continues_a_state_exactly_and_leaves_it_unchanged():
    finetune, _, _ = _scripted()
    key = jax.random.key(0)
    state = atm.finetune_next(atm.init(_base(), _counting_heads()), finetune=finetune,
                              epochs=1, key=key)
    snapshot = (state.iteration, len(state.finetuned), dict(state.heads), dict(state.finetuned_heads))
    resumed, _ = atm.iteration(state, finetune=finetune, epochs=1, merge=atm.MergeSpec(), key=key)
    fresh = atm.run(_base(), _counting_heads(), finetune=finetune, evaluate=None, iterations=1,
                    epochs_per_iteration=1, key=key)[0]
    _assert_trees_equal(resumed.base, fresh)
    assert (state.iteration, len(state.finetuned), dict(state.heads),
            dict(state.finetuned_heads)) == snapshot


def test_iteration_returns_the_next_state_and_its_diagnostics():
    finetune, _, shift = _scripted()
    state = atm.init(_base(), _counting_heads())
    new, diagnostics = atm.iteration(state, finetune=finetune, epochs=1, merge=atm.MergeSpec(),
                                     key=jax.random.key(0), carry_heads=True)
    assert (new.iteration, new.finetuned, dict(new.finetune_metrics)) == (1, (), {})
    assert state.iteration == 0 and state.finetuned == ()
    assert set(diagnostics) == {"finetune", "merge"} and set(diagnostics["finetune"]) == set(TASKS)
    assert diagnostics["merge"]["task_vector_norm"][2] > diagnostics["merge"]["task_vector_norm"][0]
    np.testing.assert_allclose(new.base["dense"]["bias"], np.mean(list(shift.values())), atol=3e-3)
