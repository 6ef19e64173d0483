"""Tests of the finetuning loop and of accuracy / normalized accuracy.

Most tests use a linear "backbone" (features = flattened images @ w) so results can
be checked by hand with NumPy and compile in milliseconds.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from atm_jax import evaluate
from atm_jax.finetune import Finetuner, OptimizerConfig, epoch_order, make_optimizer

IMAGE_SHAPE = (2, 3, 1)
IN_DIM = 6
FEATURES = 4


def linear_apply(params, images, train):
    del train
    return images.reshape(images.shape[0], -1) @ params["w"]


def make_problem(seed=0, n=10, num_classes=3):
    rng = np.random.default_rng(seed)
    backbone = {"w": jnp.asarray(rng.normal(size=(IN_DIM, FEATURES)), jnp.float32)}
    head = {"kernel": jnp.asarray(rng.normal(size=(FEATURES, num_classes)), jnp.float32),
            "bias": jnp.asarray(rng.normal(size=(num_classes,)), jnp.float32)}
    images = rng.normal(size=(n,) + IMAGE_SHAPE).astype(np.float32)
    labels = rng.integers(0, num_classes, size=n).astype(np.int32)
    return backbone, head, images, labels


def numpy_grads(backbone, head, images, labels):
    """Mean softmax cross-entropy and its gradients, by hand."""
    x = images.reshape(len(images), -1).astype(np.float64)
    w, k, b = (np.asarray(a, np.float64) for a in (backbone["w"], head["kernel"], head["bias"]))
    features = x @ w
    logits = features @ k + b
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    onehot = np.eye(k.shape[1])[labels]
    loss = -np.mean(np.log(p[np.arange(len(labels)), labels]))
    g = (p - onehot) / len(labels)  # dL/dlogits
    return loss, {"w": x.T @ (g @ k.T), "kernel": features.T @ g, "bias": g.sum(0)}


def full_batch(images, labels):
    return {"images": images, "labels": labels, "mask": np.ones(len(labels), np.float32)}


@pytest.mark.parametrize("train_head", [False, True])
def test_one_sgd_step_matches_hand_computed_gradient(train_head):
    backbone, head, images, labels = make_problem()
    lr = 0.1
    finetuner = Finetuner(linear_apply, OptimizerConfig(lr, grad_clip=None, name="sgd"),
                          train_head=train_head)
    state, metrics = finetuner.train_step(finetuner.init_state(backbone, head),
                                          full_batch(images, labels))
    loss, grads = numpy_grads(backbone, head, images, labels)
    np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-5)
    np.testing.assert_allclose(state["backbone"]["w"], np.asarray(backbone["w"]) - lr * grads["w"],
                               rtol=1e-5, atol=1e-6)
    if train_head:
        for name in ("kernel", "bias"):
            np.testing.assert_allclose(state["head"][name],
                                       np.asarray(head[name]) - lr * grads[name],
                                       rtol=1e-5, atol=1e-6)
    else:
        np.testing.assert_array_equal(state["head"]["kernel"], head["kernel"])
    assert int(state["step"]) == 1 and state["step"].dtype == jnp.int32
    assert float(metrics["count"]) == len(labels)


def test_padded_batch_has_the_loss_and_gradient_of_the_real_rows():
    backbone, head, images, labels = make_problem(n=5)
    finetuner = Finetuner(linear_apply, OptimizerConfig(0.1, grad_clip=None, name="sgd"),
                          train_head=True)
    garbage = np.full((3,) + IMAGE_SHAPE, 7.0, np.float32)
    padded = {"images": np.concatenate([images, garbage]),
              "labels": np.concatenate([labels, [2, 1, 0]]).astype(np.int32),
              "mask": np.array([1, 1, 1, 1, 1, 0, 0, 0], np.float32)}
    state_p, metrics_p = finetuner.train_step(finetuner.init_state(backbone, head), padded)
    state_u, metrics_u = finetuner.train_step(finetuner.init_state(backbone, head),
                                              full_batch(images, labels))
    np.testing.assert_allclose(metrics_p["loss"], metrics_u["loss"], rtol=1e-6)
    assert float(metrics_p["count"]) == 5
    # SGD: the update is -lr * grad, so equal updates mean equal gradients.
    for a, b in zip(jax.tree.leaves(state_p), jax.tree.leaves(state_u)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_finetune_uses_every_example_and_reports_metrics():
    backbone, head, images, labels = make_problem(n=10)
    finetuner = Finetuner(linear_apply, OptimizerConfig(0.05, batch_size=4), train_head=True)
    _, _, metrics = finetuner.finetune(backbone, head, images, labels, epochs=3,
                                       key=jax.random.key(0))
    assert metrics["steps"] == 9 and metrics["examples"] == 30 and metrics["epochs"] == 3
    assert len(metrics["loss"]) == 3 and len(metrics["accuracy"]) == 3
    assert metrics["loss"][-1] < metrics["loss"][0]
    # Each epoch visits every example exactly once, in a key-dependent order.
    order = epoch_order(jax.random.key(0), 1, 10)
    assert sorted(order) == list(range(10))
    assert not np.array_equal(order, epoch_order(jax.random.key(0), 2, 10))


def test_frozen_head_is_unchanged_and_has_no_optimizer_state():
    backbone, head, images, labels = make_problem()
    finetuner = Finetuner(linear_apply, OptimizerConfig(0.05, batch_size=4), train_head=False)
    new_backbone, new_head, _ = finetuner.finetune(backbone, head, images, labels, epochs=2,
                                                   key=jax.random.key(0))
    for name in ("kernel", "bias"):
        np.testing.assert_array_equal(new_head[name], head[name])
    assert not np.array_equal(new_backbone["w"], backbone["w"])
    opt_state = finetuner.init_state(backbone, head)["opt_state"]
    assert jax.tree.structure(opt_state) == jax.tree.structure(
        finetuner.tx.init({"backbone": backbone}))


def test_callers_backbone_survives_donation_and_repeat_calls_are_identical():
    backbone, head, images, labels = make_problem()
    before = jax.tree.map(np.array, (backbone, head))
    finetuner = Finetuner(linear_apply, OptimizerConfig(0.05, batch_size=4), train_head=True)
    first = finetuner.finetune(backbone, head, images, labels, epochs=2, key=jax.random.key(1))
    # The donated step must not have consumed the caller's arrays (the ATM base).
    for leaf in jax.tree.leaves((backbone, head)):
        assert not leaf.is_deleted()
    for a, b in zip(jax.tree.leaves((backbone, head)), jax.tree.leaves(before)):
        np.testing.assert_array_equal(a, b)
    # A fresh optimizer every call: the same inputs give bitwise the same result.
    second = finetuner.finetune(backbone, head, images, labels, epochs=2, key=jax.random.key(1))
    for a, b in zip(jax.tree.leaves(first[:2]), jax.tree.leaves(second[:2])):
        np.testing.assert_array_equal(a, b)
    assert first[2]["loss"] == second[2]["loss"]
    other = finetuner.finetune(backbone, head, images, labels, epochs=2, key=jax.random.key(2))
    assert not np.array_equal(other[0]["w"], first[0]["w"])


def test_step_compiles_once_across_tasks_epochs_and_calls():
    finetuner = Finetuner(linear_apply, OptimizerConfig(0.05, batch_size=4), train_head=True)
    for task in range(2):  # two "tasks": same shapes, different data and sizes
        backbone, head, images, labels = make_problem(seed=task, n=10 + task)
        finetuner.finetune(backbone, head, images, labels, epochs=2, key=jax.random.key(task))
    assert finetuner.train_step._cache_size() == 1
    # A head with another number of classes is another shape: one more compile.
    backbone, head, images, labels = make_problem(seed=3, num_classes=5)
    finetuner.finetune(backbone, head, images, labels, epochs=2, key=jax.random.key(3))
    assert finetuner.train_step._cache_size() == 2


def test_empty_backbone_trains_the_head_alone():
    # A linear probe on precomputed features: apply_fn ignores its (empty) params.
    def identity(_, features, train):
        return features

    rng = np.random.default_rng(0)
    features = rng.normal(size=(40, 3)).astype(np.float32)
    labels = (features[:, 0] > 0).astype(np.int32)
    head = {"kernel": jnp.zeros((3, 2)), "bias": jnp.zeros(2)}
    finetuner = Finetuner(identity, OptimizerConfig(0.1, batch_size=16), train_head=True)
    backbone, head, metrics = finetuner.finetune({}, head, features, labels, epochs=10,
                                                 key=jax.random.key(0))
    assert backbone == {} and metrics["loss"][-1] < metrics["loss"][0]
    assert evaluate.accuracy(identity, {}, head, features, labels) > 0.9


def test_non_finite_loss_raises_naming_epoch_and_step():
    backbone, head, images, labels = make_problem(n=8)
    backbone = {"w": backbone["w"].at[0, 0].set(jnp.nan)}
    finetuner = Finetuner(linear_apply, OptimizerConfig(0.05, batch_size=4), train_head=True)
    with pytest.raises(FloatingPointError, match=r"epoch 0 at step 0"):
        finetuner.finetune(backbone, head, images, labels, epochs=2, key=jax.random.key(0))


def test_finetune_argument_errors():
    backbone, head, images, labels = make_problem()
    finetuner = Finetuner(linear_apply, OptimizerConfig(), train_head=True)
    with pytest.raises(ValueError, match="epochs=0"):
        finetuner.finetune(backbone, head, images, labels, epochs=0, key=jax.random.key(0))
    with pytest.raises(ValueError, match="9 labels"):
        finetuner.finetune(backbone, head, images, labels[:9], epochs=1, key=jax.random.key(0))


def test_progress_bar_runs(capsys):
    backbone, head, images, labels = make_problem()
    finetuner = Finetuner(linear_apply, OptimizerConfig(batch_size=4), train_head=True,
                          progress=True)
    finetuner.finetune(backbone, head, images, labels, epochs=1, key=jax.random.key(0))
    captured = capsys.readouterr()
    assert captured.out == ""  # the bar goes to stderr, not into results on stdout
    assert "step" in captured.err and "/" in captured.err


@pytest.mark.parametrize("field, value, allowed", [
    ("learning_rate", 0.0, "> 0"),
    ("learning_rate", float("nan"), "> 0"),
    ("weight_decay", -1e-4, ">= 0"),
    ("grad_clip", 0.0, "None or a number > 0"),
    ("batch_size", 0, ">= 1"),
    ("batch_size", 2.5, ">= 1"),
    ("name", "lion", "'adam', 'adamw', 'sgd'"),
    ("schedule", "linear", "'constant', 'warmup_cosine'"),
    ("decay_steps", 10, "None when"),
])
def test_optimizer_config_validation(field, value, allowed):
    with pytest.raises(ValueError) as error:
        OptimizerConfig(**{field: value})
    message = str(error.value)
    assert f"OptimizerConfig.{field}={value!r}" in message and allowed in message


def test_optimizer_variants_and_schedule():
    assert OptimizerConfig() == OptimizerConfig(1e-4, 0.0, 10.0, 32, "adam")
    with pytest.raises(ValueError, match="decay_steps=None"):
        OptimizerConfig(schedule="warmup_cosine", warmup_steps=5)
    cfg = OptimizerConfig(1.0, name="sgd", grad_clip=None, schedule="warmup_cosine",
                          warmup_steps=2, decay_steps=4)
    tx = make_optimizer(cfg)
    params = {"x": jnp.zeros(())}
    state = tx.init(params)
    steps = []
    for _ in range(5):  # SGD with gradient 1: the update is -lr(step)
        updates, state = tx.update({"x": jnp.ones(())}, state, params)
        steps.append(-float(updates["x"]))
    np.testing.assert_allclose(steps, [0.0, 0.5, 1.0, 0.5, 0.0], atol=1e-6)
    for name in ("adam", "adamw"):
        tx = make_optimizer(dataclasses.replace(OptimizerConfig(), name=name, weight_decay=0.1))
        updates, _ = tx.update(params, tx.init(params), params)
        assert isinstance(updates, dict)
    # grad_clip bounds the global norm of what reaches the optimizer.
    tx = make_optimizer(OptimizerConfig(1.0, name="sgd", grad_clip=1.0))
    updates, _ = tx.update({"x": jnp.full((4,), 10.0)}, tx.init({"x": jnp.zeros(4)}))
    np.testing.assert_allclose(optax.tree.norm(updates), 1.0, rtol=1e-6)


# --------------------------------------------------------------------------- evaluate


def test_accuracy_matches_numpy_argmax_with_padded_last_batch():
    backbone, head, images, labels = make_problem(n=23, num_classes=3)
    logits = linear_apply(backbone, images, False) @ head["kernel"] + head["bias"]
    expected = float(np.mean(np.argmax(np.asarray(logits), -1) == labels))
    assert 0.0 < expected < 1.0
    got = evaluate.accuracy(linear_apply, backbone, head, images, labels, batch_size=5)
    assert got == pytest.approx(expected, abs=0)
    # The same shapes reuse one compilation, whatever N is.
    evaluate.accuracy(linear_apply, backbone, head, images[:7], labels[:7], batch_size=5)
    assert evaluate._count_correct_for(linear_apply)._cache_size() == 1
    assert evaluate.accuracy(linear_apply, backbone, head, images, labels, batch_size=100) == got
    with pytest.raises(ValueError, match="0 images"):
        evaluate.accuracy(linear_apply, backbone, head, images[:0], labels[:0])


def test_average_and_normalized_accuracy_by_hand():
    accs = {"mnist": 0.9, "fashion": 0.6}
    reference = {"mnist": 1.0, "fashion": 0.8}
    assert evaluate.average(accs) == pytest.approx(0.75)
    assert evaluate.normalized(accs, reference) == pytest.approx({"mnist": 0.9, "fashion": 0.75})
    assert evaluate.normalized_average(accs, reference) == pytest.approx(0.825)


def test_normalized_accuracy_errors():
    with pytest.raises(ValueError, match=r"missing from reference \['kmnist'\]"):
        evaluate.normalized({"mnist": 0.9, "kmnist": 0.5}, {"mnist": 1.0})
    with pytest.raises(ValueError, match=r"missing from accs \['kmnist'\]"):
        evaluate.normalized({"mnist": 0.9}, {"mnist": 1.0, "kmnist": 0.5})
    with pytest.raises(ValueError, match=r"reference accuracy is 0 for tasks \['mnist'\]"):
        evaluate.normalized_average({"mnist": 0.9}, {"mnist": 0.0})
    with pytest.raises(ValueError, match="no tasks"):
        evaluate.average({})
