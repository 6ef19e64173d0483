"""What every suite hands the runner."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

PyTree = Any

__all__ = ["Setup"]


@dataclasses.dataclass
class Setup:
    """Everything the runner needs from a suite.

    Attributes:
      tasks: ``{name: TaskData}`` in config order.
      apply_fn: ``(backbone, inputs, train) -> features [B, F]``.
      base: the pretrained backbone (the pytree that is finetuned and merged).
      heads: ``{task: {"kernel": [F, C], "bias": [C]}}``.
      augment: ``(inputs, key) -> inputs`` for training batches, or None.
      export: ``(folder, backbone) -> None`` writing a Hugging Face folder, or None.
      token_mask: ``inputs [B, ...] -> [B, S]`` real-token mask for text inputs (the
        merges that capture layer inputs drop padded tokens), or None.
      base_info: facts about the base for results.json.
      notes: lines for the results table.
      model_pool: ``{task: finetuned backbone}`` read from ``config.model_pool``
        (`atm_jax.model_pool`): the one-shot rows merge these instead of finetuning;
        None: they finetune.
    """
    tasks: dict
    apply_fn: Callable
    base: PyTree
    heads: dict
    augment: Callable | None = None
    export: Callable[[Any, PyTree], None] | None = None
    token_mask: Callable | None = None
    base_info: dict = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)
    model_pool: dict | None = None
