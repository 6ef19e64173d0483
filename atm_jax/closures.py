"""Checks on what the caller's closures hand the ATM loop, as soon as they hand it.

`atm.run` and `atm.one_shot` take ``finetune`` (or ``finetune_tasks``) and
``evaluate`` closures. Each result is checked the moment it comes back, so a
closure that returns the wrong thing fails on its first task with a message that
names the closure, the task and what differs, instead of after all T finetunes of
an iteration (when the merge stacks them) or inside NumPy's float conversion.

The checks only read the results: tree structure, leaf shapes and dtypes are host
metadata, and an accuracy is converted to float where the loop converted it before.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from atm_jax import checks

__all__ = ["SIGNATURES", "finetune_result", "accuracy"]

PyTree = Any

# How each closure is called, for messages.
SIGNATURES = {"finetune": "finetune(base, head, task, epochs, key)",
              "finetune_tasks": "finetune_tasks(base, heads, epochs, keys)"}
_RETURNS = {"finetune": "(params, head, metrics dict)",
            "finetune_tasks": "{task: (params, head, metrics dict)}"}


def finetune_result(out, base: PyTree, *, task: str, closure: str = "finetune",
                    where: str = "") -> tuple[PyTree, PyTree, dict]:
    """``out``, one task's finetune result, as ``(params, head, metrics)`` once checked.

    Args:
      out: what ``closure`` returned for ``task``.
      base: the params the finetune started from; ``params`` must have its tree
        structure, leaf shapes and dtypes (the merge subtracts one from the other).
      task: the task's name.
      closure: ``"finetune"`` or ``"finetune_tasks"``, the closure that produced ``out``.
      where: what to put first in messages (e.g. ``"atm, iteration 2"``).

    Raises:
      TypeError: ``out`` is not a ``(params, head, metrics dict)`` tuple.
      ValueError: ``params`` differs from ``base``; the message names the first
        differing leaf path and both values.
    """
    prefix = f"{where}: " if where else ""
    if not (isinstance(out, tuple) and len(out) == 3 and isinstance(out[2], Mapping)):
        raise TypeError(f"{prefix}{SIGNATURES[closure]} must return {_RETURNS[closure]}; for task "
                        f"{task!r} it returned {type(out).__name__} {str(out)[:80]}.")
    params, head, metrics = out
    try:
        checks.check_compatible([base, params], names=["the base", "its params tree"],
                                what="params tree")
    except ValueError as e:
        raise ValueError(f"{prefix}{SIGNATURES[closure]} returned params for task {task!r} that "
                         f"do not match the base: {e}") from None
    return params, head, metrics


def accuracy(value, *, task: str, what: str) -> float:
    """``value``, what ``evaluate`` returned for ``task``, as a float.

    Python and NumPy numbers and 0-d arrays (NumPy or JAX) are accepted; NaN passes
    through (an empty test split has no accuracy, and that is not a closure bug).

    Args:
      value: the accuracy.
      task: the task's name.
      what: which model was evaluated, for messages (e.g. ``"iteration 0"``).

    Raises:
      TypeError: ``value`` is not one number (an array of another shape, a string,
        None, a bool, a dict of metrics, ...); the message shows it and the fix.
    """
    # A one-element array is refused like a longer one: an evaluate that forgot to
    # reduce its per-example scores fails the same on every NumPy version. A bool is
    # a comparison result, not an accuracy.
    if not _is_bool(value) and hasattr(value, "__float__") \
            and tuple(getattr(value, "shape", ())) == ():
        try:
            return float(value)
        except (TypeError, ValueError):
            pass
    raise TypeError(f"evaluate(params, heads) must return {{task: accuracy}}, one number per "
                    f"task; for {what} it returned, for task {task!r}, {_described(value)}.")


def _described(value) -> str:
    """``value`` and the likely fix, for :func:`accuracy`'s message."""
    kind = type(value).__name__
    if value is None:
        return "None. Return an accuracy for every task in heads"
    if isinstance(value, Mapping):
        return (f"a {kind} with keys {sorted(map(str, value))[:6]}. Return the accuracy alone, "
                "not a dict of metrics: e.g. {t: m['accuracy'] for t, m in metrics.items()}")
    if isinstance(value, (str, bytes)):
        return f"the {kind} {value!r}. Return the number, not its text"
    if _is_bool(value):
        return f"the {kind} {value!r}. An accuracy is a fraction, e.g. float(np.mean(correct))"
    shape = getattr(value, "shape", None)
    if shape is not None and tuple(shape) != ():
        return (f"an array of shape {tuple(shape)}: {str(value)[:80]}. Reduce it to one "
                "number, e.g. float(x.mean()), or x.item() for a single element")
    return f"a value of type {kind}: {str(value)[:80]}. Return a float"


def _is_bool(value) -> bool:
    return isinstance(value, (bool, np.bool_)) or getattr(value, "dtype", None) == np.bool_
