"""A task's data as every suite hands it to the runner.

Each suite keeps its own registry of tasks (where its data comes from):
`atm_jax.data.mini.TASK_SPECS` (the CPU suite's registry-package sources),
`atm_jax.data.paper.PAPER_TASKS` (the paper's 14 tasks) and `atm_jax.data.local`
(generated smoke-run tasks); all of them load into one :class:`TaskData`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = ["SPLITS", "TaskData"]

SPLITS = ("train", "validation", "test")


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: arrays have no truth value.
class TaskData:
    """One task's splits.

    Attributes:
      name: Task name.
      class_names: Names of the labels 0..C-1.
      train: (inputs [N, ...], labels int32 [N]); inputs are float32 images
        [N, 28, 28, 1] in [0, 1] (mini), uint8 images [N, H, W, 3] or int32 tokens
        [N, 3, L] = ids / mask / types (paper).
      validation: Same layout, held out from the training data.
      test: Same layout, from the source's test set or a fixed held-out carve.
    """

    name: str
    class_names: tuple[str, ...]
    train: tuple[np.ndarray, np.ndarray]
    validation: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray]

    @property
    def num_classes(self) -> int:
        """Number of classes C."""
        return len(self.class_names)

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """Returns the (inputs, labels) of split ``name``.

        Raises:
          ValueError: If ``name`` is not "train", "validation" or "test".
        """
        if name not in SPLITS:
            raise ValueError(f"Unknown split {name!r}; expected one of {', '.join(SPLITS)}")
        return getattr(self, name)

    def __repr__(self) -> str:
        sizes = ", ".join(f"{s}={len(self.split(s)[1])}" for s in SPLITS)
        return f"TaskData(name={self.name!r}, num_classes={self.num_classes}, {sizes})"
