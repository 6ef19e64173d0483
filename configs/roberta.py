"""The paper's NLP setup with RoBERTa-base on seven GLUE tasks (arXiv 2411.03055,
Table 4; recipe in atm_jax/recipes.py).

Pooled output → a frozen random linear head per task (seed 0), never merged; max
length 128; Adam 1e-5, batch 32; budget 10 epochs; ATM 10 × 1 epoch; TA (the row
``mean``), TIES, Breadcrumbs, DARE (p 0.9), mean aggregation, α = 1; test on GLUE validation
(validation_matched for MNLI).

Run::

  python -m atm_jax.data.prepare tfds glue --data_dir=$TFDS_DATA_DIR
  python -m atm_jax.main --config=configs/roberta.py --workdir=runs/roberta \\
      --config.data.data_dir=$TFDS_DATA_DIR

Shrink: ``--config=configs/roberta.py:runlocal`` (tiny random-init RoBERTa, three
generated text tasks, seconds on a CPU).
"""

from atm_jax import recipes


def get_config(arg=None):
    return recipes.apply_arg(recipes.paper_config("roberta"), arg, "configs/roberta.py")
