"""Finetuning one task: optimizer, jitted train step and the epoch loop.

ATM (Alternating Tuning and Merging, arXiv 2411.03055, Alg. 1) finetunes the shared
backbone on every task from the current base for a few epochs, turns the results
into task vectors and merges them into the next base. The paper resets the optimizer
at every iteration, so `Finetuner.finetune` starts from fresh optimizer state on
every call, while the jitted step is built once per run and reused for every task
and iteration.

Typical use::

    finetuner = Finetuner(apply_fn, OptimizerConfig(learning_rate=1e-4), train_head=False)
    backbone_t, head_t, metrics = finetuner.finetune(
        base, heads[t], inputs, labels, epochs=1, key=jax.random.fold_in(key, t))

`apply_fn(backbone_params, inputs, train)` returns features `[B, F]`; the head is a
linear `{"kernel": [F, C], "bias": [C]}` dict (`atm_jax.models.heads`).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Generator, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from atm_jax import batching, evaluate, extras
from atm_jax.errors import DivergedError, renamed_keyword
from atm_jax.models.heads import apply_head
from atm_jax.optim import OptimizerConfig, learning_rate_schedule, make_optimizer  # noqa: F401
from atm_jax.sharding import Placement

PyTree = Any
ApplyFn = Callable[[PyTree, jax.Array, bool], jax.Array]
Augment = Callable[[jax.Array, jax.Array], jax.Array]

def _trainable(state: dict, train_head: bool) -> dict:
    """The part of the state the optimizer sees: the backbone, and the head if trained."""
    if train_head:
        return {"backbone": state["backbone"], "head": state["head"]}
    return {"backbone": state["backbone"]}


def as_inputs(x) -> np.ndarray:
    """Host inputs as NumPy: floats become float32, integer inputs (uint8 images,
    token ids) keep their dtype so big datasets stay compact until the device."""
    x = np.asarray(x)
    return x.astype(np.float32, copy=False) if x.dtype.kind in "fb" else x


def _tqdm():
    """tqdm's progress bar class (an ``experiments`` package, imported when asked for)."""
    with extras.needed("a Finetuner with progress=True"):
        from tqdm import tqdm
    return tqdm


PRECISIONS = ("float32", "bfloat16")


def _cast_floats(tree: PyTree, dtype) -> PyTree:
    """Floating leaves of ``tree`` cast to ``dtype``; integer leaves (token ids) kept."""
    return jax.tree.map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def make_train_step(apply_fn: ApplyFn, tx: optax.GradientTransformation, *,
                    train_head: bool, augment: Augment | None = None,
                    precision: str = "float32", remat: bool = False
                    ) -> Callable[[dict, dict], tuple[dict, dict]]:
    """Builds the (unjitted) train step: masked cross-entropy, one optimizer update.

    Args:
        apply_fn: `apply_fn(backbone, inputs, train) -> features [B, F]`.
        tx: the optimizer.
        train_head: whether the head gets gradients and optimizer state.
        augment: optional `augment(inputs, key) -> inputs`, applied to every
            training batch with the batch's own key (`batch["key"]`).
        precision: "float32", or "bfloat16": the backbone's forward and backward run
            on a bfloat16 copy of its params and inputs (mixed precision for
            accelerators; the params, the gradients the optimizer sees, the optimizer
            state, the head and the loss stay float32).
        remat: recompute the backbone's activations in the backward pass
            (`jax.checkpoint`) instead of keeping them: less memory, more compute.

    Returns:
        `step(state, batch) -> (state, metrics)` with state
        `{"backbone", "head", "opt_state", "step": int32 []}` and batch
        `{"inputs": [B, ...], "labels": [B] int32, "mask": [B] float32}` (inputs
        float32, or integer: uint8 pixels, int32 token ids).
        Metrics are scalars: "loss" (mean CE over the real examples), "count"
        (real examples), "correct" (real examples classified right) and
        "grad_norm" (before clipping).
    """

    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} must be one of {PRECISIONS}.")

    def forward(backbone, inputs):
        if precision == "bfloat16":
            backbone, inputs = _cast_floats((backbone, inputs), jnp.bfloat16)
        return apply_fn(backbone, inputs, True).astype(jnp.float32)

    if remat:
        forward = jax.checkpoint(forward)

    def step(state, batch):
        mask = batch["mask"]

        def loss_fn(trainable):
            head = trainable["head"] if train_head else state["head"]
            inputs = batch["inputs"] if augment is None else augment(batch["inputs"], batch["key"])
            features = forward(trainable["backbone"], inputs)
            logits = apply_head(head, features).astype(jnp.float32)
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
            count = mask.sum()
            # Padded rows carry mask 0, so the loss (and its gradient) is exactly that
            # of the real rows; max() only guards an all-padding batch.
            loss = (mask * ce).sum() / jnp.maximum(count, 1.0)
            correct = (mask * (logits.argmax(-1) == batch["labels"])).sum()
            return loss, (count, correct)

        trainable = _trainable(state, train_head)
        (loss, (count, correct)), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
        updates, opt_state = tx.update(grads, state["opt_state"], trainable)
        trainable = optax.apply_updates(trainable, updates)
        new_state = {
            "backbone": trainable["backbone"],
            "head": trainable["head"] if train_head else state["head"],
            "opt_state": opt_state,
            "step": state["step"] + 1,
        }
        metrics = {"loss": loss, "count": count, "correct": correct,
                   "grad_norm": optax.tree.norm(grads)}
        return new_state, metrics

    return step


def make_init_state(tx: optax.GradientTransformation, *, train_head: bool
                    ) -> Callable[[PyTree, dict], dict]:
    """Builds `init_state(backbone, head) -> state` with fresh optimizer state.

    The params are copied explicitly so the state owns its buffers: the step donates
    the state, and the caller's arrays (the ATM base, reused for every task) must
    survive that.
    """

    def init_state(backbone, head):
        state = {"backbone": jax.tree.map(jnp.copy, backbone),
                 "head": jax.tree.map(jnp.copy, head)}
        state["opt_state"] = tx.init(_trainable(state, train_head))
        state["step"] = jnp.zeros((), jnp.int32)
        return state

    return init_state


def epoch_order(key: jax.Array, epoch: int, num_examples: int) -> np.ndarray:
    """The example order of one epoch: a permutation seeded by `fold_in(key, epoch)`.

    Drawn on the host with NumPy because batches are gathered on the host.

    Args:
        key: the finetuning call's PRNG key (typed or raw).
        epoch: 0-based epoch index.
        num_examples: N.

    Returns:
        [N] int64 permutation of range(N).
    """
    seed = np.asarray(jax.random.key_data(jax.random.fold_in(key, epoch))).ravel()
    return np.random.default_rng(seed.astype(np.uint64)).permutation(num_examples)


class Finetuner:
    """Finetunes a backbone (and optionally a head) on one task at a time.

    Built once per run: it holds the jitted step, which compiles once per distinct
    set of shapes and dtypes of (backbone, head, batch). Tasks with the same input
    shape and the same number of classes therefore share one compilation; every
    distinct head shape `[F, C]` compiles once more.

    Attributes:
        apply_fn: `apply_fn(backbone, inputs, train) -> features [B, F]`.
        opt: the optimizer settings.
        train_head: whether the head is trained (else frozen: no gradient, no
            optimizer state, returned bitwise unchanged).
        progress: show a tqdm bar over steps on stderr.
        augment: optional `augment(inputs, key) -> inputs` for training batches
            (e.g. random resized crops); step i of epoch e uses the key
            `fold_in(fold_in(fold_in(key, e), 1), i)` (the epoch's shuffle uses
            `fold_in(key, e)`), so runs stay reproducible.
        tx: the optax transformation.
        train_step: the jitted step `step(state, batch) -> (state, metrics)`; it
            donates `state`. On a mesh it runs SPMD on the sharded inputs (jit
            propagates the batch and param shardings; no pmap), one compilation
            per mesh.
        placement: the default mesh of `finetune` (`atm_jax.sharding.Placement`;
            None = `Placement.single()`, a 1 × 1 mesh on the first device).
        precision, remat: the step's compute dtype and activation recomputation
            (see `make_train_step`); the defaults are the exact float32 step.
    """

    def __init__(self, apply_fn: ApplyFn, opt: OptimizerConfig, *, train_head: bool,
                 progress: bool = False, augment: Augment | None = None,
                 placement: Placement | None = None, precision: str = "float32",
                 remat: bool = False):
        self.apply_fn = apply_fn
        self.placement = Placement.single() if placement is None else placement
        self.augment = augment
        self.opt = opt
        self.train_head = train_head
        self.progress = progress
        self.tx = make_optimizer(opt)
        self.train_step = jax.jit(make_train_step(apply_fn, self.tx, train_head=train_head,
                                                  augment=augment, precision=precision,
                                                  remat=remat), donate_argnums=0)
        self._init_state = jax.jit(make_init_state(self.tx, train_head=train_head))

    def init_state(self, backbone: PyTree, head: dict) -> dict:
        """A fresh train state holding copies of `backbone` and `head`.

        Args:
            backbone: backbone params pytree.
            head: {"kernel": [F, C], "bias": [C]}.

        Returns:
            {"backbone", "head", "opt_state", "step": int32 0}; safe to donate.
        """
        return self._init_state(backbone, head)

    def epoch_batches(self, inputs: np.ndarray, labels: np.ndarray, *, key: jax.Array,
                      epoch: int, placement: Placement | None = None) -> Iterator[dict]:
        """The batches of one epoch in its keyed order, built ahead on a thread.

        Batches of ``batch_size`` rows (the last padded and masked), padded to a
        multiple of the mesh size; this process's rows are assembled into global
        arrays sharded over the mesh (`atm_jax.sharding.Placement`; None: a 1 × 1
        mesh on the first device).
        """
        if placement is None:
            placement = Placement.single()
        order = epoch_order(key, epoch, len(inputs))
        epoch_key = jax.random.fold_in(jax.random.fold_in(key, epoch), 1)
        size = self.opt.batch_size
        total = batching.padded_size(size, placement.multiple)
        rows = placement.local_rows(total)

        def batches():
            for i, ((x, y), mask) in enumerate(batching.padded_batches(
                    [inputs, labels], size, order, multiple=placement.multiple, rows=rows)):
                batch = {k: placement.put(v, total)
                         for k, v in {"inputs": x, "labels": y, "mask": mask}.items()}
                if self.augment is not None:
                    batch["key"] = jax.random.fold_in(epoch_key, i)
                yield batch

        return batching.prefetch(batches(), depth=2)

    @renamed_keyword("images", "inputs")
    def train_epoch(self, state: dict, inputs: np.ndarray, labels: np.ndarray, *,
                    key: jax.Array, epoch: int, bar: Any | None = None,
                    placement: Placement | None = None) -> tuple[dict, dict]:
        """One pass over all examples in a keyed random order.

        The last partial batch is padded to `batch_size` with mask-0 rows, so every
        step has the same shapes and no example is dropped.

        Args:
            state: train state (donated: do not reuse it after the call).
            inputs: [N, ...] host array (float32, or integer pixels or token ids);
                the old keyword ``images=`` still works for one release (warns).
            labels: [N] int32 host array.
            key: PRNG key of the whole finetuning call.
            epoch: 0-based epoch index (mixed into the shuffle).
            bar: optional progress bar, advanced once per step.
            placement: the mesh the batches are sharded over (None: one device,
                `Placement.single()`).

        Returns:
            (state, metrics) with metrics {"loss": mean CE over the epoch's examples,
            "accuracy": training accuracy over the epoch, "steps": steps taken,
            "grad_norm": mean pre-clip gradient norm}.

        Raises:
            DivergedError: if a step's loss was not finite (checked once, after
                the epoch, to avoid a host sync per step).
        """
        steps = self.epoch_steps(state, inputs, labels, key=key, epoch=epoch, bar=bar,
                                 placement=placement)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                return done.value

    def epoch_steps(self, state: dict, inputs: np.ndarray, labels: np.ndarray, *,
                    key: jax.Array, epoch: int, bar: Any | None = None,
                    placement: Placement | None = None) -> Generator[None, None, tuple]:
        """`train_epoch` as a generator: yields after dispatching each step and
        returns ``(state, metrics)``; a caller can interleave several of them
        (task parallel: `atm_jax.parallel`)."""
        step_metrics = []
        for batch in self.epoch_batches(inputs, labels, key=key, epoch=epoch,
                                        placement=placement):
            state, metrics = self.train_step(state, batch)
            step_metrics.append(metrics)
            if bar is not None:
                bar.update(1)
            yield

        # One host transfer per epoch; dispatch stays asynchronous until here.
        step_metrics = jax.device_get(step_metrics)
        losses = np.array([m["loss"] for m in step_metrics])
        bad = np.flatnonzero(~np.isfinite(losses))
        if bad.size:
            i = int(bad[0])
            raise DivergedError(
                f"non-finite loss {losses[i]} in epoch {epoch} at step {i} of that epoch "
                f"(0-based; step {epoch * len(losses) + i} of this call); lower the learning "
                f"rate or enable grad_clip")
        counts = np.array([m["count"] for m in step_metrics])
        correct = sum(float(m["correct"]) for m in step_metrics)
        metrics = {
            "loss": float((losses * counts).sum() / counts.sum()),
            "accuracy": correct / len(inputs),
            "steps": len(losses),
            "grad_norm": float(np.mean([m["grad_norm"] for m in step_metrics])),
        }
        return state, metrics

    @renamed_keyword("images", "inputs")
    def finetune(self, backbone: PyTree, head: dict, inputs, labels, *, epochs: int,
                 key: jax.Array,
                 on_epoch: Callable[[int, dict], None] | None = None,
                 placement: Placement | None | str = "default"
                 ) -> tuple[PyTree, dict, dict]:
        """Finetunes from `backbone`/`head` with a fresh optimizer.

        The inputs are copied before the first (donating) step, so the caller's
        arrays stay valid and unchanged.

        Args:
            backbone: backbone params pytree (e.g. the current ATM base).
            head: the task's head {"kernel": [F, C], "bias": [C]}.
            inputs: [N, ...] model inputs, e.g. images or token ids (NumPy or JAX;
                floats become float32 on the host, integers keep their dtype); the old
                keyword ``images=`` still works for one release (warns).
            labels: [N] integer labels in [0, C).
            epochs: full passes over the data (>= 1).
            key: PRNG key; epoch e shuffles with `fold_in(key, e)`.
            on_epoch: optional callback `on_epoch(epoch, epoch_metrics)` after each
                epoch (for logging; see `train_epoch` for the metrics).
            placement: the mesh to train on (`atm_jax.sharding.Placement`): params
                and optimizer state placed by its rules, batches split over its
                devices; None = one device (`Placement.single()`); "default" =
                ``self.placement``.

        Returns:
            (backbone, head, metrics) with metrics {"loss": [mean loss per epoch],
            "accuracy": [training accuracy per epoch], "steps": int, "examples":
            epochs * N, "epochs": epochs, "seconds": wall time}. With a frozen head
            the returned head equals the input bitwise.

        Raises:
            ValueError: on mismatched or empty data, or epochs < 1.
            DivergedError: if the loss became non-finite.
        """
        steps = self.finetune_steps(backbone, head, inputs, labels, epochs=epochs, key=key,
                                    on_epoch=on_epoch, placement=placement)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                return done.value

    def finetune_steps(self, backbone: PyTree, head: dict, inputs, labels, *, epochs: int,
                       key: jax.Array, on_epoch: Callable[[int, dict], None] | None = None,
                       placement: Placement | None | str = "default"
                       ) -> Generator[None, None, tuple[PyTree, dict, dict]]:
        """`finetune` as a generator: checks its arguments at once, then yields
        after dispatching each step and returns ``(backbone, head, metrics)``.

        Interleaving the generators of tasks placed on disjoint devices runs them
        at the same time (JAX dispatch is asynchronous); a finished generator takes
        no further step, so each task's result is that of its own `finetune`.
        """
        inputs = as_inputs(inputs)
        labels = np.asarray(labels, np.int32)
        if len(inputs) != len(labels) or len(inputs) == 0:
            raise ValueError(f"need as many labels as inputs, at least one: got "
                             f"{len(inputs)} inputs and {len(labels)} labels")
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"epochs={epochs!r} is invalid: must be an integer >= 1")
        if isinstance(placement, str):
            placement = self.placement
        elif placement is None:
            placement = Placement.single()
        return self._finetune_steps(backbone, head, inputs, labels, epochs, key, on_epoch,
                                    placement)

    def _finetune_steps(self, backbone, head, inputs, labels, epochs, key, on_epoch, placement):
        start = time.perf_counter()
        backbone, head = placement.params(backbone), placement.params(head)
        state = self.init_state(backbone, head)
        steps_per_epoch = batching.num_batches(len(inputs), self.opt.batch_size)
        bar = (_tqdm()(total=epochs * steps_per_epoch, leave=False, file=sys.stderr,
                         unit="step") if self.progress else None)
        losses, accuracies = [], []
        try:
            for epoch in range(epochs):
                state, epoch_metrics = yield from self.epoch_steps(
                    state, inputs, labels, key=key, epoch=epoch, bar=bar, placement=placement)
                losses.append(epoch_metrics["loss"])
                accuracies.append(epoch_metrics["accuracy"])
                if on_epoch is not None:
                    on_epoch(epoch, epoch_metrics)
        finally:
            if bar is not None:
                bar.close()
        jax.block_until_ready(state["backbone"])
        metrics = {
            "loss": losses,
            "accuracy": accuracies,
            "steps": epochs * steps_per_epoch,
            "examples": epochs * len(inputs),
            "epochs": epochs,
            "seconds": time.perf_counter() - start,
        }
        return state["backbone"], state["head"], metrics


def linear_probe(apply_fn: ApplyFn, base: PyTree, heads: dict, tasks: dict,
                 opt: OptimizerConfig, *, epochs: int, keys: dict, eval_batch_size: int,
                 feature_batch_size: int = 500) -> dict[str, float]:
    """Head-only training on frozen-base features, then test accuracy per task.

    The features of every split are computed once (fixed-size batches), so a probe
    costs far less than a finetune; the head is trained on them with the same
    optimizer and epochs as a finetune, task ``t`` with ``keys[t]``.

    Args:
      apply_fn: ``(backbone, inputs, train) -> features [B, F]``.
      base: the frozen backbone.
      heads: ``{task: head}`` the probes start from.
      tasks: ``{task: TaskData}``.
      opt: the optimizer settings.
      epochs: epochs per task.
      keys: ``{task: PRNG key}`` of each probe's example order.
      eval_batch_size: rows per test forward pass.
      feature_batch_size: rows per feature forward pass.

    Returns:
      ``{task: test accuracy}``.
    """
    features_fn = jax.jit(lambda p, x: apply_fn(p, x, False))

    def features(inputs):
        # Small splits are not padded up to a whole feature batch.
        return batching.map_batches(lambda x: features_fn(base, x), as_inputs(inputs),
                                    min(feature_batch_size, len(inputs)))

    def identity(_, f, train):  # a probe's "backbone" is the precomputed features
        return f

    probe = Finetuner(identity, opt, train_head=True)
    accuracy = {}
    for name, task in tasks.items():
        train_x, train_y = task.train
        _, head, _ = probe.finetune({}, heads[name], features(train_x), train_y, epochs=epochs,
                                    key=keys[name])
        accuracy[name] = evaluate.accuracy(identity, {}, head, features(task.test[0]),
                                           task.test[1], batch_size=eval_batch_size)
    return accuracy
