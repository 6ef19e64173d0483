"""atm_jax: ATM (Alternating Tuning and Merging, arXiv 2411.03055) in JAX/Flax.

The functional core is importable at once::

  from atm_jax import tree, merge, atm

``tree`` holds task-vector pytree math, ``merge`` the merge operators and their
registry, ``select`` the exact magnitude thresholds, ``atm`` the alternating loop
and the one-shot baselines. Models, data, finetuning and the experiment runner
live in their own modules (``atm_jax.finetune``, ``atm_jax.data``, ...).
"""

from atm_jax import atm, merge, select, tree

__all__ = ["atm", "merge", "select", "tree"]
__version__ = "0.1.0"
