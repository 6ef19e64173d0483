"""Data of the mini suite: real 28x28 grayscale tasks and generated glyphs.

Typical use::

  from atm_jax import data

  task = data.load_task("mnist", train_size=3000, seed=0)
  images, labels = task.train           # float32 [N, 28, 28, 1], int32 [N]
  glyphs, glyph_labels = data.render_glyphs(128, seed=step)

Run ``python -m atm_jax.data.prepare mini`` once to fetch every source into
`cache_dir()`; set ``ATM_JAX_OFFLINE=1`` to forbid network access.

The paper's own tasks (7 CLIP vision tasks, 7 GLUE tasks) load the same way from
prepared tfds datasets, image folders or TSV files::

  task = data.load_paper_task("cifar100", data_dir=DIR)   # uint8 [N, 32, 32, 3]
  glue = data.load_paper_task("rte", data_dir=DIR, tokenizer="bert-base-uncased")
"""

from atm_jax.data.glyphs import GLYPH_CLASSES, render_glyphs
from atm_jax.data.image_folder import ImageFolderError
from atm_jax.data.mini import MINI_TASKS, load_task
from atm_jax.data.paper import (
    GLUE_TASKS,
    PAPER_TASKS,
    VISION_TASKS,
    load_paper_task,
    split_indices,
)
from atm_jax.data.sources import (
    OFFLINE_ENV,
    PREPARE_COMMAND,
    ChecksumError,
    SourceUnavailableError,
    cache_dir,
)
from atm_jax.data.text import TokenizerUnavailableError, load_tokenizer, tokenize
from atm_jax.data.tasks import TaskData
from atm_jax.data.tfds_source import DatasetNotPreparedError

__all__ = [
    "GLUE_TASKS",
    "GLYPH_CLASSES",
    "MINI_TASKS",
    "OFFLINE_ENV",
    "PAPER_TASKS",
    "PREPARE_COMMAND",
    "VISION_TASKS",
    "ChecksumError",
    "DatasetNotPreparedError",
    "ImageFolderError",
    "SourceUnavailableError",
    "TaskData",
    "TokenizerUnavailableError",
    "cache_dir",
    "load_paper_task",
    "load_task",
    "load_tokenizer",
    "render_glyphs",
    "split_indices",
    "tokenize",
]
