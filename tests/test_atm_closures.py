"""What the caller's closures return to the ATM loop is checked at once: a finetune
of the wrong tree fails on its own task (before the next task is finetuned), an
evaluate that does not return one number per task fails on its first call, and
both messages name the closure and the task. Also DARE's ``key`` argument."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from atm_jax import atm, distributed, merge

TASKS = ("a", "b", "c")
KEY = jax.random.key(0)


def _base():
    return {"w": jnp.ones((2, 3)), "b": jnp.zeros(3)}


def _heads():
    return {t: {"h": np.zeros(2, np.float32)} for t in TASKS}


def _finetune(bad=None, on=("a",)):
    """finetune -> base + task index + 1; for the tasks in ``on`` ``bad(params)`` instead."""
    calls = []

    def finetune(base, head, task, epochs, key):
        calls.append(task)
        params = jax.tree.map(lambda x: x + TASKS.index(task) + 1.0, base)
        return (bad(params) if bad and task in on else params), head, {"loss": 0.5}

    return finetune, calls


def _evaluate(value=0.5, on=TASKS, after=0):
    """evaluate -> ``value`` for the tasks in ``on`` once ``after`` calls are done, else 0.5."""
    calls = []

    def evaluate(params, heads):
        calls.append(sorted(heads))
        return {t: value if t in on and len(calls) > after else 0.5 for t in heads}

    return evaluate, calls


def _missing_b(params):
    return {"w": params["w"]}


def _wide_b(params):
    return {**params, "b": jnp.zeros(4)}


def _half_b(params):
    return {**params, "b": params["b"].astype(jnp.float16)}


RUN = dict(evaluate=None, iterations=2, epochs_per_iteration=1, key=KEY)


def _hooked(finetune_tasks, per_call=None, *, iterations=2, name="atm"):
    """A caller's own loop through a "finetune these tasks" hook (as the runner drives)."""
    state = atm.init(_base(), _heads())
    while state.iteration < iterations:
        state, _ = atm.iteration(state, finetune=None, epochs=1, merge=atm.MergeSpec(), key=KEY,
                                 finetune_tasks=finetune_tasks, tasks_per_call=per_call,
                                 name=name)
    return state.base
WRONG = {
    "structure": (_missing_b, r"its params tree has a different tree structure from the base: "
                              r"missing leaf 'b'"),
    "shape": (_wide_b, r"Leaf 'b': its params tree has shape \(4,\) but the base has \(3,\)"),
    "dtype": (_half_b, r"Leaf 'b': its params tree has dtype float16 but the base has float32"),
}


# -- finetune ------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", sorted(WRONG))
def test_a_wrong_first_finetune_fails_before_the_second_task(kind):
    bad, detail = WRONG[kind]
    finetune, calls = _finetune(bad)
    with pytest.raises(ValueError, match=r"^atm, iteration 1: finetune\(base, head, task, epochs, "
                                         r"key\) returned params for task 'a' that do not match "
                                         r"the base: " + detail):
        atm.run(_base(), _heads(), finetune=finetune, **RUN)
    assert calls == ["a"]


def test_a_later_task_is_named_and_stops_the_iteration_there():
    finetune, calls = _finetune(_wide_b, on=("b",))
    with pytest.raises(ValueError, match=r"^method x, iteration 1: finetune\(.*\) returned params "
                                         r"for task 'b'"):
        _hooked(atm.sequential(finetune), 1, name="method x")
    assert calls == ["a", "b"]


def test_finetune_next_checks_against_the_state_base():
    finetune, calls = _finetune(_missing_b)
    state = atm.init(_base(), _heads())
    with pytest.raises(ValueError, match=r"task 'a' that do not match the base"):
        atm.finetune_next(state, finetune=finetune, epochs=1, key=KEY)
    assert state.finetuned == () and calls == ["a"]


def test_one_shot_fails_on_the_first_wrong_finetune():
    finetune, calls = _finetune(_missing_b)
    evaluate, evaluated = _evaluate()
    with pytest.raises(ValueError, match=r"^one-shot, iteration 1: finetune\(base, head, task, "
                                         r"epochs, key\) returned params for task 'a'.*missing "
                                         r"leaf 'b'"):
        atm.one_shot(_base(), _heads(), finetune=finetune, evaluate=evaluate, epochs=2,
                     merges={"ta": atm.MergeSpec()}, key=KEY)
    assert calls == ["a"] and evaluated == []


@pytest.mark.parametrize("per_call,on,groups", [(1, "a", [("a",)]), (2, "b", [("a", "b")])],
                         ids=["one-per-call", "two-per-call"])
def test_a_wrong_finetune_tasks_result_fails_before_the_next_group(per_call, on, groups):
    finetune, _ = _finetune(_wide_b, on=(on,))
    calls = []

    def finetune_tasks(base, heads, epochs, keys):
        calls.append(tuple(heads))
        return {t: finetune(base, heads[t], t, epochs, keys[t]) for t in heads}

    with pytest.raises(ValueError, match=r"^atm, iteration 1: finetune_tasks\(base, heads, epochs, "
                                         rf"keys\) returned params for task '{on}'.*Leaf 'b'"):
        _hooked(finetune_tasks, per_call)
    assert calls == groups


def test_the_pa_atm_hook_checks_each_finetune_as_it_returns():
    finetune, calls = _finetune(_missing_b)
    hook = distributed.make_finetune_tasks(finetune, TASKS, num_processes=1, process=0)
    with pytest.raises(ValueError, match=r"^finetune\(base, head, task, epochs, key\) returned "
                                         r"params for task 'a'.*missing leaf 'b'"):
        _hooked(hook)
    assert calls == ["a"]  # one call holds all three tasks; 'b' and 'c' never start


def test_right_finetunes_pass_through_every_path_unchanged():
    finetune, calls = _finetune()
    seq = atm.run(_base(), _heads(), finetune=finetune, **RUN)[0]
    hook = distributed.make_finetune_tasks(finetune, TASKS, num_processes=1, process=0)
    par = _hooked(hook, 2)
    assert calls == list(TASKS) * 4
    for params in (seq, par):  # two mean merges of +1, +2, +3
        np.testing.assert_allclose(params["w"], 1.0 + 2 * 2.0)
        np.testing.assert_allclose(params["b"], 2 * 2.0)
    # NumPy leaves of the base's dtypes are the base's tree: accepted.
    numpy_ft = lambda b, h, t, e, k: (jax.tree.map(np.asarray, b), h, {})  # noqa: E731
    atm.run(_base(), _heads(), finetune=numpy_ft, **RUN)


# -- evaluate ------------------------------------------------------------------------------

class _OneElement:
    """An array-like whose float() takes its single element (as torch's and older
    NumPy's do): still not one accuracy per task."""
    shape = (1,)

    def __float__(self):
        return 0.9

    def __str__(self):
        return "[0.9]"


BAD_ACCURACY = {
    "numpy-shape1": (np.array([0.9]), r"an array of shape \(1,\): \[0\.9\]\. Reduce it to one"),
    "jax-shape1": (jnp.array([0.9]), r"an array of shape \(1,\)"),
    "one-element": (_OneElement(), r"an array of shape \(1,\)"),
    "str": ("0.9", r"the str '0\.9'\. Return the number, not its text"),
    "None": (None, r"None\. Return an accuracy for every task"),
    "dict": ({"accuracy": 0.9}, r"a dict with keys \['accuracy'\]\. Return the accuracy alone"),
    "bool": (True, r"the bool True"),
}


@pytest.mark.parametrize("value,detail", BAD_ACCURACY.values(), ids=BAD_ACCURACY.keys())
def test_a_wrong_first_evaluate_fails_before_any_finetune(value, detail):
    finetune, calls = _finetune()
    evaluate, evaluated = _evaluate(value)
    with pytest.raises(TypeError, match=r"^evaluate\(params, heads\) must return \{task: accuracy"
                                        r"\}, one number per task; for iteration 0 it returned, "
                                        r"for task 'a', " + detail):
        atm.run(_base(), _heads(), finetune=finetune, **dict(RUN, evaluate=evaluate))
    assert calls == [] and len(evaluated) == 1


def test_a_later_evaluate_fails_before_the_next_iteration():
    finetune, calls = _finetune()
    evaluate, evaluated = _evaluate("n/a", on=("c",), after=1)
    with pytest.raises(TypeError, match=r"for iteration 1 it returned, for task 'c', the str"):
        atm.run(_base(), _heads(), finetune=finetune,
                **dict(RUN, evaluate=evaluate, iterations=3))
    assert calls == list(TASKS) and len(evaluated) == 2


def test_one_shot_fails_on_the_first_wrong_evaluate():
    finetune, _ = _finetune()
    evaluate, evaluated = _evaluate(np.array([0.9]))
    with pytest.raises(TypeError, match=r"for the individual model of 'a' it returned, for task "
                                        r"'a', an array of shape \(1,\)"):
        atm.one_shot(_base(), _heads(), finetune=finetune, evaluate=evaluate, epochs=1,
                     merges={"ta": atm.MergeSpec()}, key=KEY)
    assert evaluated == [["a"]]  # no merge was evaluated


@pytest.mark.parametrize("value", [0.25, 1, np.float32(0.25), np.float64(0.25), np.int64(1),
                                   np.array(0.25), jnp.asarray(0.25), float("nan")],
                         ids=["float", "int", "np.float32", "np.float64", "np.int64", "numpy-0d",
                              "jax-0d", "nan"])
def test_numbers_and_0d_arrays_are_accuracies(value):
    finetune, _ = _finetune()
    evaluate, _ = _evaluate(value, on=("b",))
    history = atm.run(_base(), _heads(), finetune=finetune, **dict(RUN, evaluate=evaluate))[2]
    for record in history:
        got = record["accuracy"]
        assert type(got["b"]) is float and got["a"] == 0.5
        np.testing.assert_equal(got["b"], float(value))
    out = atm.one_shot(_base(), _heads(), finetune=finetune, evaluate=evaluate, epochs=1,
                       merges={"ta": atm.MergeSpec()}, key=KEY)
    np.testing.assert_equal(out["merged"]["ta"]["b"], float(value))


# -- DARE's key (checks.require_key) -------------------------------------------------------

STACKED = {"w": jnp.ones((2, 3))}


@pytest.mark.parametrize("key,detail", [
    (0, r"got the int 0: a seed, not a key; pass key=jax\.random\.key\(0\)"),
    (1.5, r"got a float: 1\.5"),
    (np.zeros(3, np.uint32), r"dtype uint32 and shape \(3,\)"),
    (np.zeros(2, np.float32), r"dtype float32 and shape \(2,\)"),
    (jax.random.split(jax.random.key(0)), r"typed key array of shape \(2,\), several keys"),
], ids=["int", "float", "uint32-shape3", "float32-shape2", "two-keys"])
@pytest.mark.parametrize("name", ["dare", "dare_ties"])
def test_dare_refuses_what_is_not_one_key(name, key, detail):
    with pytest.raises(TypeError, match=rf"merge '{name}' needs one PRNG key, e\.g\. "
                                        r"key=jax\.random\.key\(0\) .*" + detail):
        merge.get(name)(STACKED, key=key, p=0.5)


@pytest.mark.parametrize("key", [jax.random.key(0), jax.random.PRNGKey(0),
                                 jax.random.key(0, impl="rbg")], ids=["typed", "raw", "rbg"])
def test_dare_takes_typed_and_raw_keys(key):
    assert merge.dare(STACKED, key=key, p=0.5)["w"].shape == (3,)
