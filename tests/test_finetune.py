"""Tests of the finetuning loop and of accuracy / normalized accuracy.

Most tests use a linear "backbone" (features = flattened images @ w) so results can
be checked by hand with NumPy and compile in milliseconds.
"""

import functools

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
    return {"inputs": images, "labels": labels, "mask": np.ones(len(labels), np.float32)}


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
    padded = {"inputs": np.concatenate([images, garbage]),
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


def numpy_epochs(backbone, head, images, labels, *, key, epochs, batch_size, lr):
    """Plain SGD over the documented batching, in float64 NumPy.

    Epoch ``e`` visits the examples in ``epoch_order(key, e, N)`` (the shuffle's own
    test: test_epochs_visit_the_examples_in_different_orders) in consecutive batches of ``batch_size``; the last, shorter
    batch holds only the remaining real examples, so its gradient is the mean over
    those alone. Metrics are taken before each update, as the step does.

    Returns:
        (backbone, head, [per-epoch metrics {"loss", "accuracy", "steps",
        "grad_norm"}]).
    """
    w = np.asarray(backbone["w"], np.float64)
    k, b = (np.asarray(head[n], np.float64) for n in ("kernel", "bias"))
    history = []
    for epoch in range(epochs):
        order = np.asarray(epoch_order(key, epoch, len(labels)))
        loss_sum, correct, norms = 0.0, 0, []
        for start in range(0, len(labels), batch_size):
            rows = order[start:start + batch_size]
            x, y = images[rows], labels[rows]
            loss, grads = numpy_grads({"w": w}, {"kernel": k, "bias": b}, x, y)
            logits = x.reshape(len(x), -1) @ w @ k + b
            loss_sum += loss * len(rows)
            correct += int((logits.argmax(-1) == y).sum())
            norms.append(np.sqrt(sum((g ** 2).sum() for g in grads.values())))
            w, k, b = w - lr * grads["w"], k - lr * grads["kernel"], b - lr * grads["bias"]
        history.append({"loss": loss_sum / len(labels), "accuracy": correct / len(labels),
                        "steps": len(norms), "grad_norm": float(np.mean(norms))})
    return {"w": w}, {"kernel": k, "bias": b}, history


def test_epochs_use_every_example_once_and_padding_adds_nothing():
    # 10 examples in batches of 4: the last batch holds 2 real rows and 2 padding
    # rows (copies of an example). Padding that counted, a dropped last batch, a
    # skipped or repeated example, or one shuffle for every epoch all change the
    # result away from the NumPy reference.
    backbone, head, images, labels = make_problem(n=10)
    lr, key = 0.5, jax.random.key(3)
    finetuner = Finetuner(linear_apply, OptimizerConfig(lr, grad_clip=None, name="sgd",
                                                        batch_size=4), train_head=True)
    seen = []
    got_backbone, got_head, metrics = finetuner.finetune(
        backbone, head, images, labels, epochs=3, key=key,
        on_epoch=lambda epoch, m: seen.append((epoch, m)))
    want_backbone, want_head, history = numpy_epochs(backbone, head, images, labels, key=key,
                                                     epochs=3, batch_size=4, lr=lr)
    np.testing.assert_allclose(got_backbone["w"], want_backbone["w"], rtol=1e-5, atol=1e-5)
    for name in ("kernel", "bias"):
        np.testing.assert_allclose(got_head[name], want_head[name], rtol=1e-5, atol=1e-5)
    # on_epoch gets every epoch's metrics in order; finetune's lists agree with them.
    assert [epoch for epoch, _ in seen] == [0, 1, 2]
    for (_, got), want in zip(seen, history, strict=True):
        assert got["steps"] == want["steps"] == 3
        assert got["accuracy"] == pytest.approx(want["accuracy"], abs=1e-12)
        np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-5)
        np.testing.assert_allclose(got["grad_norm"], want["grad_norm"], rtol=1e-5)
    assert metrics["loss"] == [m["loss"] for _, m in seen]
    assert metrics["accuracy"] == [m["accuracy"] for _, m in seen]
    assert (metrics["steps"], metrics["examples"], metrics["epochs"]) == (9, 30, 3)
    # The reference does move: a wrong batching could not pass by standing still.
    assert len({round(m["loss"], 6) for m in history}) == 3


def _visited(finetuner, n, *, key, epoch):
    """The example indices one epoch's batches visit, in order (padding rows dropped)."""
    ids = np.arange(n, dtype=np.float32).reshape(n, 1, 1, 1) * np.ones((1,) + IMAGE_SHAPE,
                                                                        np.float32)
    labels = np.zeros(n, np.int32)
    out = []
    for batch in finetuner.epoch_batches(ids, labels, key=key, epoch=epoch):
        real = np.asarray(batch["mask"]) > 0
        out += [int(v) for v in np.asarray(batch["inputs"])[real, 0, 0, 0]]
    return out


def test_epochs_visit_the_examples_in_different_orders():
    # The NumPy reference above takes epoch_order as given, so an order that ignored
    # the epoch (or the key) would pass it; this pins the shuffle down by itself.
    n = 10
    finetuner = Finetuner(linear_apply, OptimizerConfig(0.1, name="sgd", batch_size=4),
                          train_head=True)
    key = jax.random.key(5)
    orders = [_visited(finetuner, n, key=key, epoch=e) for e in range(3)]
    for order in orders:
        assert sorted(order) == list(range(n))  # every example once per epoch
        assert order != list(range(n))  # shuffled, not the stored order
    assert len({tuple(o) for o in orders}) == 3  # each epoch its own order
    # Reproducible for one (key, epoch); another key gives another order.
    assert _visited(finetuner, n, key=key, epoch=1) == orders[1]
    assert _visited(finetuner, n, key=jax.random.key(6), epoch=1) != orders[1]
    # epoch_order itself: a permutation per epoch, distinct across epochs.
    direct = [epoch_order(key, e, n).tolist() for e in range(3)]
    assert direct == orders


def test_batches_carry_inputs_of_any_dtype():
    # Token ids travel the same path as pixels: the batch key says neither.
    tokens = np.arange(30, dtype=np.int32).reshape(10, 3)
    finetuner = Finetuner(linear_apply, OptimizerConfig(batch_size=4), train_head=True)
    batches = list(finetuner.epoch_batches(tokens, np.zeros(10, np.int32),
                                           key=jax.random.key(0), epoch=0))
    assert [set(b) for b in batches] == [{"inputs", "labels", "mask"}] * 3
    assert all(np.asarray(b["inputs"]).dtype == np.int32 for b in batches)


def _negate(images, key):
    del key
    return -images


def test_augment_transforms_every_training_batch():
    backbone, head, images, labels = make_problem(n=10)
    lr, key = 0.5, jax.random.key(4)
    opt = OptimizerConfig(lr, grad_clip=None, name="sgd", batch_size=4)
    finetuner = Finetuner(linear_apply, opt, train_head=True, augment=_negate)
    got_backbone, got_head, _ = finetuner.finetune(backbone, head, images, labels, epochs=2,
                                                   key=key)
    want_backbone, want_head, _ = numpy_epochs(backbone, head, -images, labels, key=key,
                                               epochs=2, batch_size=4, lr=lr)
    np.testing.assert_allclose(got_backbone["w"], want_backbone["w"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_head["kernel"], want_head["kernel"], rtol=1e-5, atol=1e-5)


def _augment_keys(key, epochs=2, n=10, batch_size=4):
    """The key every training step handed to `augment` (recorded from inside jit)."""
    keys = []

    def record(images, k):
        jax.debug.callback(lambda data: keys.append(np.asarray(data).tobytes()),
                           jax.random.key_data(k), ordered=True)
        return images

    backbone, head, images, labels = make_problem(n=n)
    finetuner = Finetuner(linear_apply, OptimizerConfig(0.1, batch_size=batch_size),
                          train_head=True, augment=record)
    finetuner.finetune(backbone, head, images, labels, epochs=epochs, key=key)
    return keys


def test_augment_gets_a_distinct_reproducible_key_per_step():
    keys = _augment_keys(jax.random.key(5))
    assert len(keys) == 6 and len(set(keys)) == 6  # 2 epochs x 3 steps, all distinct.
    assert _augment_keys(jax.random.key(5)) == keys
    assert not set(_augment_keys(jax.random.key(6))) & set(keys)


def test_augment_keys_follow_the_documented_derivation():
    key = jax.random.key(5)
    documented = [np.asarray(jax.random.key_data(
        jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(key, e), 1), i))).tobytes()
        for e in range(2) for i in range(3)]  # fmt: skip
    assert _augment_keys(key) == documented


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


def test_the_old_images_keyword_still_works_with_a_deprecation_warning():
    backbone, head, images, labels = make_problem()
    finetuner = Finetuner(linear_apply, OptimizerConfig(batch_size=4), train_head=True)
    key = jax.random.key(0)
    want = finetuner.finetune(backbone, head, images, labels, epochs=1, key=key)
    with pytest.warns(DeprecationWarning, match=r"finetune\(images=...\) is deprecated.*inputs="):
        got = finetuner.finetune(backbone, head, images=images, labels=labels, epochs=1, key=key)
    for a, b in zip(jax.tree.leaves(want[:2]), jax.tree.leaves(got[:2]), strict=True):
        np.testing.assert_array_equal(a, b)
    state, _ = finetuner.train_epoch(finetuner.init_state(backbone, head), images, labels,
                                     key=key, epoch=0)
    with pytest.warns(DeprecationWarning, match=r"train_epoch\(images=...\)"):
        old, _ = finetuner.train_epoch(finetuner.init_state(backbone, head), images=images,
                                       labels=labels, key=key, epoch=0)
    np.testing.assert_array_equal(state["backbone"]["w"], old["backbone"]["w"])
    apply = functools.partial(linear_apply)  # its own compile cache entry, not linear_apply's
    with pytest.warns(DeprecationWarning, match=r"accuracy\(images=...\)"):
        acc = evaluate.accuracy(apply, backbone, head, images=images, labels=labels)
    assert acc == evaluate.accuracy(apply, backbone, head, inputs=images, labels=labels)
    with pytest.raises(TypeError, match="both inputs= and its deprecated old name images="):
        finetuner.finetune(backbone, head, inputs=images, images=images, labels=labels,
                           epochs=1, key=key)


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
    # grad_clip bounds the global norm of what reaches the optimizer.
    tx = make_optimizer(OptimizerConfig(1.0, name="sgd", grad_clip=1.0))
    updates, _ = tx.update({"x": jnp.full((4,), 10.0)}, tx.init({"x": jnp.zeros(4)}))
    np.testing.assert_allclose(optax.tree.norm(updates), 1.0, rtol=1e-6)


@pytest.mark.parametrize("name", ["adamw", "adam", "sgd"])
def test_weight_decay_one_step_by_hand(name):
    # p = 8, gradient g = -0.5, decay 0.1, lr 0.01. From fresh state Adam's first
    # step is -lr * u / (|u| + eps) for its input u (bias-corrected moments of u).
    # AdamW decays outside Adam: -lr * (g / |g| + wd * p) = +0.2 lr. Adam and SGD
    # add wd * p to the gradient first: u = g + wd * p = +0.3, so Adam steps -lr
    # (the sign flips) and SGD -0.3 lr. Without decay the three give +lr, +lr and
    # +0.5 lr: each differs from its decayed value.
    lr, wd, eps = 0.01, 0.1, 1e-8
    p, g = np.float32(8.0), np.float32(-0.5)
    expected = {"adamw": -lr * (g / (abs(g) + eps) + wd * p),
                "adam": -lr * (g + wd * p) / (abs(g + wd * p) + eps),
                "sgd": -lr * (g + wd * p)}[name]
    tx = make_optimizer(OptimizerConfig(lr, weight_decay=wd, grad_clip=None, name=name))
    params = {"p": jnp.asarray(p)}
    updates, _ = tx.update({"p": jnp.asarray(g)}, tx.init(params), params)
    np.testing.assert_allclose(updates["p"], expected, rtol=0, atol=2e-7)  # 6.7e-8 seen.


def test_weight_decay_shrinks_untouched_weights_and_spares_a_frozen_head():
    # AdamW through the Finetuner: a backbone weight the loss never sees has zero
    # gradient, so only the decoupled decay moves it: p * (1 - lr * wd) per step.
    # The frozen head gets no update at all, decay included.
    backbone, head, images, labels = make_problem(n=8)
    backbone = {**backbone, "unused": jnp.full((3,), 4.0)}
    lr, wd = 0.01, 0.5
    finetuner = Finetuner(linear_apply, OptimizerConfig(lr, weight_decay=wd, name="adamw",
                                                        batch_size=8), train_head=False)
    state, _ = finetuner.train_step(finetuner.init_state(backbone, head),
                                    full_batch(images, labels))
    np.testing.assert_allclose(state["backbone"]["unused"], 4.0 * (1 - lr * wd), rtol=1e-6)
    for name in ("kernel", "bias"):
        np.testing.assert_array_equal(state["head"][name], head[name])
    no_decay = Finetuner(linear_apply, OptimizerConfig(lr, name="adamw", batch_size=8),
                         train_head=False)
    state, _ = no_decay.train_step(no_decay.init_state(backbone, head),
                                   full_batch(images, labels))
    np.testing.assert_array_equal(state["backbone"]["unused"], 4.0)


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
    with pytest.raises(ValueError, match="0 inputs"):
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


# -- precision and remat (config.precision / config.remat) ---------------------------------

def _tiny_vit_problem(n=64, classes=4):
    """configs/mini.py:tiny's ViT (random init) on random 28x28 images."""
    from atm_jax import recipes
    from atm_jax.models.heads import init_head
    from atm_jax.models.vit_tiny import vit_from_config

    model = vit_from_config(recipes.tiny(recipes.mini()).model)
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, (n, 28, 28, 1)).astype(np.float32)
    labels = rng.integers(0, classes, n).astype(np.int32)
    backbone = model.init(jax.random.key(0), images[:1])["params"]
    head = init_head(jax.random.key(1), model.width, classes)
    return (lambda p, x, train: model.apply({"params": p}, x, train=train)), backbone, head, images, labels


def _tuner(precision="float32", remat=False):
    apply_fn = _tiny_vit_problem(n=2)[0]
    return Finetuner(apply_fn, OptimizerConfig(learning_rate=1e-3, batch_size=16),
                     train_head=True, precision=precision, remat=remat)


@functools.cache  # the float32 run serves both tests below
def _tiny_finetune(precision="float32", remat=False):
    _, backbone, head, images, labels = _tiny_vit_problem()
    return _tuner(precision, remat).finetune(backbone, head, images, labels, epochs=3,
                                             key=jax.random.key(2))


def _step_program(precision="float32", remat=False) -> str:
    """The jaxpr of one train step, as text."""
    tuner = _tuner(precision, remat)
    _, backbone, head, images, labels = _tiny_vit_problem(n=16)
    batch = {"inputs": images, "labels": labels, "mask": np.ones(16, np.float32)}
    return str(jax.make_jaxpr(tuner.train_step)(tuner.init_state(backbone, head), batch))


def test_remat_trains_exactly_like_keeping_the_activations():
    b0, h0, m0 = _tiny_finetune()
    b1, h1, m1 = _tiny_finetune(remat=True)
    # The backbone's forward is rematerialized (a jax.checkpoint in the step's program).
    assert "remat2[" in _step_program(remat=True) and "remat2[" not in _step_program()
    # Recomputation reruns the same forward ops: measured bitwise equal on this CPU.
    assert m1["loss"] == m0["loss"]
    for x, y in zip(jax.tree.leaves((b0, h0)), jax.tree.leaves((b1, h1)), strict=True):
        np.testing.assert_array_equal(x, y)


def test_bfloat16_compute_keeps_float32_state_and_tracks_the_float32_loss():
    b0, h0, m0 = _tiny_finetune()
    b1, h1, m1 = _tiny_finetune(precision="bfloat16")
    # The params (and so the optimizer's view of them) stay float32.
    assert {x.dtype for x in jax.tree.leaves((b1, h1))} == {jnp.dtype(jnp.float32)}
    # The step really computes in bfloat16 (a dropped cast would still pass the
    # tolerance below): its program holds bfloat16 values, the float32 one none.
    assert "bf16" in _step_program("bfloat16") and "bf16" not in _step_program()
    # Per-epoch mean loss within 0.5 % of float32's (bfloat16 keeps 8 mantissa bits;
    # measured 0.20 %, 0.055 %, 0.010 % over these 3 epochs), and not bitwise the same.
    assert m1["loss"] != m0["loss"]
    np.testing.assert_allclose(m1["loss"], m0["loss"], rtol=5e-3)


def test_unknown_precision_is_refused():
    apply_fn, *_ = _tiny_vit_problem(n=2)
    with pytest.raises(ValueError, match="precision='float16' must be one of"):
        Finetuner(apply_fn, OptimizerConfig(), train_head=False, precision="float16")
