"""Statistics of a model on a little data, for the merges that use them.

* `input_grams`: per linear layer, the Gram matrix ``XᵀX`` of the layer's inputs
  and the number of rows ``X`` had, accumulated in float32 (RegMean, RegMean++).
* `diagonal_fisher`: per parameter, the mean over examples of the squared
  per-example gradient of the log-likelihood (Fisher merging).

Which layers are seen. A layer is a leaf with a matrix view (`atm_jax.merge.matrix`)
whose input the forward pass shows to the capture:

* linen ``nn.Dense`` and ``nn.DenseGeneral`` are seen on their own, through
  `flax.linen.intercept_methods`, wherever ``apply_fn`` calls them;
* NNX ``nnx.Linear`` and ``nnx.LinearGeneral`` are seen when the model is built
  inside ``apply_fn`` by `nnx_apply` (which knows each module's path);
* a layer of your own opts in by calling ``record_input(path, x)`` on its input,
  with ``path`` its kernel's leaf path; outside a capture the call does nothing.

The input ``x [..., in]`` (``[..., heads, head_dim]`` for an attention output
projection: the trailing axes its kernel contracts) becomes ``X [rows, in]``.
Padded rows are masked out: every batch is padded to ``batch_size`` and its padding
rows carry weight 0, and ``token_mask(inputs) -> [B, S]`` (text: the attention
mask) drops padded tokens from every layer whose input has ``[B, S]`` leading axes
(a pooled ``[B, in]`` input keeps an example when any of its tokens is real).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from atm_jax import batching

PyTree = Any

__all__ = ["Grams", "input_grams", "diagonal_fisher", "record_input", "nnx_apply",
           "FISHER_CHUNK"]

# Per-example gradients are taken for this many examples at a time (vmap over a
# chunk): memory is FISHER_CHUNK × the parameters' size, whatever the data size.
FISHER_CHUNK = 16


@dataclasses.dataclass(frozen=True)
class Grams:
    """Input Gram matrices of one model's linear layers.

    Attributes:
      sums: ``{kernel leaf path: XᵀX [in, in]}`` (float32), summed over real rows.
      rows: ``{path: number of real rows}``.
      order: the paths in the order the forward pass first reached them.
    """
    sums: Mapping[str, jax.Array]
    rows: Mapping[str, int]
    order: tuple[str, ...]

    def mean(self) -> dict[str, jax.Array]:
        """``XᵀX / rows`` per layer: RegMean's (and FusionBench's) per-row average."""
        return {p: g / max(self.rows[p], 1) for p, g in self.sums.items()}


_state = threading.local()


def _recording() -> dict | None:
    return getattr(_state, "found", None)


def record_input(path: str, x: jax.Array, *, in_axes: int = 1) -> None:
    """Shows the capture the input ``x [..., *in_dims]`` of the layer whose kernel is at
    ``path``; ``in_axes`` trailing axes of ``x`` are the layer's input features. Outside
    `input_grams` it does nothing, so a model can call it unconditionally."""
    found = _recording()
    if found is not None:
        found.setdefault(path, []).append((x, in_axes))


def _axes_count(axis) -> int:
    return len(axis) if isinstance(axis, (tuple, list)) else 1


def _linen_interceptor(next_fun, args, kwargs, context):
    from flax import linen as nn

    module = context.module
    if (context.method_name == "__call__" and args
            and isinstance(module, (nn.Dense, nn.DenseGeneral))
            and not getattr(module, "batch_dims", ())):
        record_input("/".join((*module.path, "kernel")), args[0],
                     in_axes=_axes_count(getattr(module, "axis", -1)))
    return next_fun(*args, **kwargs)


_NNX_LOCK = threading.Lock()


@contextlib.contextmanager
def _nnx_seen(model):
    """While active, NNX Linear / LinearGeneral calls of ``model``'s modules record
    their inputs (the classes' ``__call__`` is wrapped, then restored)."""
    from flax import nnx

    paths = {id(m): "/".join(str(p) for p in path) for path, m in nnx.iter_modules(model)}
    originals = {cls: cls.__call__ for cls in (nnx.Linear, nnx.LinearGeneral)}

    def wrapped(cls):
        def call(self, inputs, *args, **kwargs):
            if id(self) in paths:
                record_input(f"{paths[id(self)]}/kernel" if paths[id(self)] else "kernel",
                             inputs, in_axes=_axes_count(getattr(self, "axis", -1)))
            return originals[cls](self, inputs, *args, **kwargs)
        return call

    with _NNX_LOCK:
        try:
            for cls in originals:
                cls.__call__ = wrapped(cls)
            yield
        finally:
            for cls, fn in originals.items():
                cls.__call__ = fn


def nnx_apply(graphdef, call: Callable | None = None) -> Callable:
    """``apply_fn(state, inputs)`` for an NNX model: ``call(model, inputs)`` (default
    ``model(inputs)``) on ``nnx.merge(graphdef, state)``, with its Linear layers visible
    to `input_grams` under their leaf paths (``layers/0/kernel``)."""
    from flax import nnx

    def apply_fn(state, inputs):
        model = nnx.merge(graphdef, state)
        if _recording() is None:
            return call(model, inputs) if call else model(inputs)
        with _nnx_seen(model):
            return call(model, inputs) if call else model(inputs)
    return apply_fn


def _row_weights(lead: tuple[int, ...], example: jax.Array, tokens: jax.Array | None,
                 path: str) -> jax.Array:
    """Weight 1/0 of each row of an input with leading axes ``lead``."""
    if tokens is not None and lead == tokens.shape:
        return tokens * example[:, None]
    if lead == example.shape:
        return example if tokens is None else example * jnp.any(tokens > 0, axis=1)
    if tokens is None and lead[:1] == example.shape:
        return jnp.broadcast_to(example.reshape(example.shape + (1,) * (len(lead) - 1)), lead)
    raise ValueError(f"layer {path!r}: its input has leading axes {lead}, which match neither "
                     f"the batch {example.shape} nor the token mask "
                     f"{None if tokens is None else tokens.shape}; pass a token_mask that "
                     "matches, or capture this layer with record_input.")


def _batch_grams(apply_fn, token_mask, order: list, only):
    """The jitted step's function; ``order`` gets the layers' paths when it is traced."""
    def grams(params, inputs, example):
        found: dict = {}
        _state.found = found
        try:
            from flax import linen as nn
            with nn.intercept_methods(_linen_interceptor):
                apply_fn(params, inputs)
        finally:
            _state.found = None
        tokens = None if token_mask is None else jnp.asarray(token_mask(inputs), jnp.float32)
        sums, rows = {}, {}
        for path, calls in found.items():
            if only is not None and path not in only:
                continue
            g, n = 0.0, 0.0
            for x, in_axes in calls:
                lead = x.shape[:x.ndim - in_axes]
                w = _row_weights(lead, example, tokens, path).reshape(-1)
                flat = x.reshape(-1, int(np.prod(x.shape[x.ndim - in_axes:]))).astype(jnp.float32)
                g = g + jnp.matmul((flat * w[:, None]).T, flat,
                                   precision=jax.lax.Precision.HIGHEST)
                n = n + jnp.sum(w)
            sums[path], rows[path] = g, n
        order[:] = list(found)
        return sums, rows
    return grams


@functools.lru_cache(maxsize=8)
def _grams_step(apply_fn, token_mask, only):
    """The jitted batch step and the list its trace fills with the layers' paths (one
    per apply_fn: pass the same function to reuse the compilation)."""
    order: list[str] = []
    return jax.jit(_batch_grams(apply_fn, token_mask, order, only)), order


def _as_model_inputs(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32, copy=False) if x.dtype.kind in "fb" else x


def input_grams(apply_fn: Callable, params: PyTree, inputs, *, batch_size: int = 64,
                token_mask: Callable | None = None, only=None) -> Grams:
    """``XᵀX`` and the row count of every linear layer's input over ``inputs``.

    Args:
      apply_fn: ``(params, inputs [B, ...]) -> anything``: a forward pass that calls
        the layers (linen modules, an `nnx_apply` function, or layers calling
        `record_input`).
      params: what ``apply_fn`` takes first (a finetuned model).
      inputs: ``[N, ...]`` model inputs (images, token ids).
      batch_size: rows per forward pass; the last batch is padded and masked.
      token_mask: ``inputs [B, ...] -> [B, S]`` (1 = real token), or None when every
        position of every example is real.
      only: kernel paths to keep (the others' Grams are not formed), or None for all.

    Returns:
      `Grams` keyed by kernel leaf path.
    """
    inputs = np.asarray(inputs)
    if len(inputs) == 0:
        raise ValueError("input_grams got no inputs: pass at least one example.")
    step, order = _grams_step(apply_fn, token_mask, None if only is None else frozenset(only))
    sums, rows = {}, {}
    for (x,), mask in batching.padded_batches([inputs], batch_size):
        g, n = step(params, _as_model_inputs(x), jnp.asarray(mask))
        for path in g:
            sums[path] = g[path] if path not in sums else sums[path] + g[path]
            rows[path] = n[path] if path not in rows else rows[path] + n[path]
    if not sums:
        raise ValueError("input_grams saw no linear layer: apply_fn calls no nn.Dense / "
                         "nn.DenseGeneral, and no layer called capture.record_input (an NNX "
                         "model needs capture.nnx_apply(graphdef)).")
    rows = {p: int(round(float(r))) for p, r in rows.items()}
    return Grams(sums, rows, tuple(order))


def _log_likelihood(logits: jax.Array, label: jax.Array) -> jax.Array:
    return jax.nn.log_softmax(logits)[label]


@functools.lru_cache(maxsize=8)
def _fisher_chunk(logits_fn: Callable, sampled: bool, with_extra: bool):
    """The jitted per-chunk sum of squared per-example gradients (one per logits_fn)."""
    def one(p, x, y, k, extra):
        logits = (logits_fn(p, x[None], extra) if with_extra else logits_fn(p, x[None]))[0]
        if sampled:
            y = jax.random.categorical(k, jax.lax.stop_gradient(logits))
        return _log_likelihood(logits, y)

    @jax.jit
    def chunk_sum(p, x, y, keys, weight, extra):
        grads = jax.vmap(jax.grad(one), in_axes=(None, 0, 0, 0, None))(p, x, y, keys, extra)
        return jax.tree.map(
            lambda g: jnp.tensordot(weight, jnp.square(g.astype(jnp.float32)), axes=1), grads)
    return chunk_sum


def diagonal_fisher(logits_fn: Callable, params: PyTree, inputs, labels=None, *,
                    key: jax.Array | None = None, chunk: int = FISHER_CHUNK,
                    extra: PyTree = None) -> PyTree:
    """``F = mean_x (∂ log p(y | x) / ∂θ)²`` per parameter, float32, shaped like ``params``.

    Args:
      logits_fn: ``(params, inputs [B, ...]) -> logits [B, C]``, or ``(params, inputs,
        extra)`` when ``extra`` is given (e.g. a task head: not differentiated). Pass
        the same function every time to reuse its compilation.
      inputs: ``[N, ...]``.
      labels: ``[N]`` integer labels from the data (the empirical Fisher); or None,
        and ``y`` is sampled from the model's own prediction with ``key`` (the true
        Fisher, one draw per example).
      chunk: examples whose per-example gradients are taken at once (bounded memory).

    Returns:
      The diagonal Fisher as a pytree like ``params``.
    """
    inputs = np.asarray(inputs)
    n = len(inputs)
    if n == 0:
        raise ValueError("diagonal_fisher got no inputs: pass at least one example.")
    if (labels is None) == (key is None):
        raise ValueError("diagonal_fisher takes labels (the empirical Fisher) or key (labels "
                         "sampled from the model: the true Fisher), exactly one of them.")
    if labels is not None and len(labels) != n:
        raise ValueError(f"diagonal_fisher: {len(labels)} labels for {n} inputs.")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk={chunk!r} must be a positive int (default {FISHER_CHUNK}).")
    chunk_sum = _fisher_chunk(logits_fn, key is not None, extra is not None)
    labels = np.zeros(n, np.int32) if labels is None else np.asarray(labels, np.int32)
    keys = jax.random.split(jax.random.key(0) if key is None else key, n)
    total = None
    for (x, y, idx), mask in batching.padded_batches([inputs, labels, np.arange(n)], chunk):
        s = chunk_sum(params, _as_model_inputs(x), y, keys[idx], jnp.asarray(mask, jnp.float32),
                      extra)
        total = s if total is None else jax.tree.map(jnp.add, total, s)
    return jax.tree.map(lambda t: t / n, total)
