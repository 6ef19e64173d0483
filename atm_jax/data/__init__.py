"""Data of the mini suite: real 28x28 grayscale tasks and generated glyphs.

Typical use::

  from atm_jax import data

  task = data.load_task("mnist", train_size=3000, seed=0)
  images, labels = task.train           # float32 [N, 28, 28, 1], int32 [N]
  glyphs, glyph_labels = data.render_glyphs(128, seed=step)

Run ``python -m atm_jax.data.prepare mini`` once to fetch every source into
`cache_dir()`; set ``ATM_JAX_OFFLINE=1`` to forbid network access.
"""

from atm_jax.data.glyphs import GLYPH_CLASSES, render_glyphs
from atm_jax.data.mini import MINI_TASKS, TaskData, load_task
from atm_jax.data.sources import (
    OFFLINE_ENV,
    PREPARE_COMMAND,
    ChecksumError,
    SourceUnavailableError,
    cache_dir,
)

__all__ = [
    "GLYPH_CLASSES",
    "MINI_TASKS",
    "OFFLINE_ENV",
    "PREPARE_COMMAND",
    "ChecksumError",
    "SourceUnavailableError",
    "TaskData",
    "cache_dir",
    "load_task",
    "render_glyphs",
]
