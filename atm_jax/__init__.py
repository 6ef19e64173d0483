"""atm_jax: ATM (Alternating Tuning and Merging, arXiv 2411.03055) in JAX/Flax.

The functional core is importable at once::

  from atm_jax import tree, merge, atm

``tree`` holds task-vector pytree math, ``merge`` the merge operators and their
registry, ``select`` the exact magnitude thresholds, ``atm`` the alternating loop
and the one-shot baselines. Models, data, finetuning and the experiment runner
live in their own modules (``atm_jax.finetune``, ``atm_jax.data``, ...).

The four are imported on first use (``atm_jax.tree`` works after ``import
atm_jax``), so tools that need no JAX, such as ``atm-jax-merge`` with a weighted
average, start without importing it.
"""

import importlib

__all__ = ["atm", "merge", "select", "tree"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in __all__:
        return importlib.import_module(f"atm_jax.{name}")
    raise AttributeError(f"module 'atm_jax' has no attribute {name!r}")


def __dir__():
    return sorted({*globals(), *__all__})
