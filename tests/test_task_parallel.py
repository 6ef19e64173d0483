"""Task parallel: atm's finetune_tasks hook (groups, keys, resume, errors) and
atm_jax.parallel on 2 and 4 disjoint device groups of the 8 fake devices, with
uneven task sizes: every task's result equals its own sequential finetune."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from atm_jax import atm, parallel, sharding
from atm_jax.errors import DivergedError
from atm_jax.finetune import Finetuner, OptimizerConfig
from atm_jax.models.heads import init_head

TASKS = ("a", "b", "c", "d", "e")
SIZES = {"a": 29, "b": 8, "c": 45, "d": 17, "e": 3}  # uneven: 4, 1, 6, 3, 1 steps of 8


def _apply(params, x, train):
    return jnp.tanh(x @ params["w"] + params["b"])


def _data():
    rng = np.random.default_rng(0)
    return {t: (rng.normal(size=(n, 5)).astype(np.float32) + i,
                rng.integers(0, 3, n).astype(np.int32))
            for i, (t, n) in enumerate(SIZES.items())}


def _base():
    return {"w": 0.4 * jax.random.normal(jax.random.key(0), (5, 8)), "b": jnp.zeros(8)}


def _heads(tasks=TASKS):
    return {t: init_head(jax.random.fold_in(jax.random.key(1), i), 8, 3)
            for i, t in enumerate(tasks)}


def _leaves_equal(a, b):
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# -- the hook in atm: a fake finetune_tasks over the sequential finetune -----------------

def _hook_setup():
    data = _data()
    finetuner = Finetuner(_apply, OptimizerConfig(learning_rate=1e-2, batch_size=8),
                          train_head=True)
    calls = []

    def finetune(base, head, task, epochs, key):
        return finetuner.finetune(base, head, *data[task], epochs=epochs, key=key)

    def finetune_tasks(base, heads, epochs, keys):
        calls.append((tuple(heads), {t: np.asarray(jax.random.key_data(k)) for t, k in keys.items()}))
        return {t: finetune(base, heads[t], t, epochs, keys[t]) for t in reversed(list(heads))}

    return finetune, finetune_tasks, calls


def _loop(finetune_tasks, per_call, *, iterations, key, progress):
    """A caller's own ATM loop through the hook: groups of ``per_call`` tasks."""
    state = atm.init(_base(), _heads())
    while state.iteration < iterations:
        state, _ = atm.iteration(state, finetune=None, epochs=1, merge=atm.MergeSpec(), key=key,
                                 finetune_tasks=finetune_tasks, tasks_per_call=per_call,
                                 on_progress=progress.append)
        progress.append(state)
    return state


@pytest.mark.parametrize("per_call", [None, 2])
def test_a_loop_with_finetune_tasks_equals_the_sequential_run(per_call):
    finetune, finetune_tasks, calls = _hook_setup()
    key = jax.random.key(3)
    kwargs = dict(finetune=finetune, evaluate=None, iterations=2, epochs_per_iteration=1, key=key)
    seq = atm.run(_base(), _heads(), **kwargs)
    progress = []
    par = _loop(finetune_tasks, per_call, iterations=2, key=key, progress=progress)
    assert _leaves_equal(seq[0], par.base) and _leaves_equal(seq[1], par.heads)
    groups = [c[0] for c in calls]
    expected = [TASKS] if per_call is None else [("a", "b"), ("c", "d"), ("e",)]
    assert groups == expected * 2
    # Each task got exactly the sequential loop's key: task_key(key, k, i).
    for k in range(2):
        for group, keys in calls[k * len(expected):(k + 1) * len(expected)]:
            for t, data in keys.items():
                want = jax.random.key_data(atm.task_key(key, k, TASKS.index(t)))
                np.testing.assert_array_equal(data, want)
    assert len(progress) == 2 * (len(expected) + 1)  # each group, each merge
    # Results were appended in task order whatever order the dict came back in.
    assert list(progress[0].finetuned_heads) == list(expected[0])
    # The sequential hook is the sequential loop.
    state = atm.init(_base(), _heads())
    hook = atm.sequential(finetune)
    while len(state.finetuned) < len(TASKS):
        state = atm.finetune_group(state, finetune_tasks=hook, count=1, epochs=1, key=key)
    one = atm.one_shot(_base(), _heads(), finetune=finetune, evaluate=lambda p, h: {t: 0.5 for t in h},
                       epochs=1, merges={"ta": atm.MergeSpec()}, key=key)
    merged = atm.one_shot_merge(state, atm.MergeSpec(), key=atm.merge_key(key, 0),
                                evaluate=lambda p, h: {t: 0.5 for t in h})
    assert _leaves_equal(one["params"]["ta"], merged["params"])


def test_a_resumed_mid_iteration_state_continues_with_groups_from_there():
    finetune, finetune_tasks, calls = _hook_setup()
    key = jax.random.key(4)
    state = atm.init(_base(), _heads())
    for _ in range(3):
        state = atm.finetune_next(state, finetune=finetune, epochs=1, key=key)
    seq, _ = atm.iteration(state, finetune=finetune, epochs=1, merge=atm.MergeSpec(), key=key)
    par, _ = atm.iteration(state, finetune=finetune, epochs=1, merge=atm.MergeSpec(), key=key,
                           finetune_tasks=finetune_tasks, tasks_per_call=4)
    assert [c[0] for c in calls] == [("d", "e")]
    assert _leaves_equal(seq.base, par.base)


def test_hook_errors_name_method_task_and_iteration():
    finetune, _, _ = _hook_setup()

    def diverging(base, heads, epochs, keys):
        raise DivergedError("non-finite loss nan in epoch 0 at step 2")

    with pytest.raises(DivergedError, match=r"atm: task \['a', 'b'\], iteration 1: non-finite"):
        atm.iteration(atm.init(_base(), _heads()), finetune=finetune, epochs=1,
                      merge=atm.MergeSpec(), key=jax.random.key(0), finetune_tasks=diverging,
                      tasks_per_call=2)
    with pytest.raises(TypeError, match=r"must return \{task: \(params, head, metrics dict\)\} "
                                        r"for the tasks \['a'\]"):
        atm.iteration(atm.init(_base(), _heads()), finetune=finetune, epochs=1,
                      merge=atm.MergeSpec(), key=jax.random.key(0), tasks_per_call=1,
                      finetune_tasks=lambda b, h, e, k: {"z": None})
    with pytest.raises(ValueError, match="tasks_per_call=0 must be a positive integer"):
        atm.iteration(atm.init(_base(), _heads()), finetune=finetune, epochs=1,
                      merge=atm.MergeSpec(), key=jax.random.key(0), tasks_per_call=0,
                      finetune_tasks=lambda b, h, e, k: {})


# -- parallel.task_parallel on disjoint device groups -----------------------------------

@pytest.mark.parametrize("groups", [2, 4])
def test_task_parallel_equals_each_tasks_sequential_finetune(groups):
    data = _data()
    tasks = TASKS[:groups]  # 2: sizes 29 / 8; 4: 29 / 8 / 45 / 17 (1 to 6 steps per epoch)
    mesh = sharding.make_mesh({"task": groups, "data": -1})
    subs = [sharding.Placement(m) for m in sharding.task_meshes(mesh)]
    finetuner = Finetuner(_apply, OptimizerConfig(learning_rate=1e-2, batch_size=8),
                          train_head=True)
    run = parallel.task_parallel(finetuner, subs, lambda t: data[t],
                                 gather=sharding.Placement(mesh))
    keys = {t: jax.random.fold_in(jax.random.key(5), i) for i, t in enumerate(tasks)}
    out = run(_base(), _heads(tasks), 2, keys)
    assert list(out) == list(tasks)
    for j, t in enumerate(tasks):
        params, head, metrics = out[t]
        # The independent reference: this task alone, on its own group, nothing interleaved.
        ref = finetuner.finetune(_base(), _heads(tasks)[t], *data[t], epochs=2, key=keys[t],
                                 placement=subs[j])
        assert _leaves_equal(params, ref[0]) and _leaves_equal(head, ref[1]), t
        assert metrics["loss"] == ref[2]["loss"] and metrics["steps"] == ref[2]["steps"]
        assert params["w"].sharding.mesh.size == 8  # gathered onto the full mesh
        # And on one device: the same up to float reduction order (measured <= 3e-7).
        one = finetuner.finetune(_base(), _heads(tasks)[t], *data[t], epochs=2, key=keys[t],
                                 placement=None)
        np.testing.assert_allclose(np.asarray(params["w"]), np.asarray(one[0]["w"]), atol=2e-6)
    # One compilation per device group, reused by the second call (no recompilation).
    size = finetuner.train_step._cache_size()
    run(_base(), _heads(tasks), 1, keys)
    assert finetuner.train_step._cache_size() == size
    with pytest.raises(ValueError, match=f"but only {groups} device groups"):
        run(_base(), _heads(TASKS), 1, {t: jax.random.key(0) for t in TASKS})


def test_runner_builds_task_parallel_for_mesh_task_above_one():
    fn, per_call = parallel.for_mesh({"task": 2, "data": -1, "params": "replicated"},
                                     Finetuner(_apply, OptimizerConfig(), train_head=False),
                                     lambda t: None)
    assert callable(fn) and per_call == 2
    assert parallel.for_mesh({"task": 1, "data": -1}, None, None) == (None, None)


def test_a_diverging_task_is_named_and_the_others_are_stopped():
    data = _data()
    data["b"] = (np.full_like(data["b"][0], np.nan), data["b"][1])
    mesh = sharding.make_mesh({"task": 2, "data": 1})
    subs = [sharding.Placement(m) for m in sharding.task_meshes(mesh)]
    finetuner = Finetuner(_apply, OptimizerConfig(learning_rate=1e-2, batch_size=8),
                          train_head=False)
    run = parallel.task_parallel(finetuner, subs, lambda t: data[t])
    keys = {t: jax.random.key(0) for t in ("a", "b")}
    with pytest.raises(DivergedError, match=r"task 'b': non-finite loss"):
        run(_base(), _heads(("a", "b")), 1, keys)
    assert dataclasses.is_dataclass(atm.State)
