"""The paper's NLP setup with BERT-base-uncased on seven GLUE tasks (arXiv
2411.03055, Table 5; recipe in atm_jax/recipes.py).

Same protocol as configs/roberta.py: frozen random heads on the pooled output, max
length 128, Adam 1e-5, batch 32, budget 10 epochs, ATM 10 × 1 epoch, TA (the row
``mean``) / TIES / Breadcrumbs / DARE with mean aggregation and α = 1.

Run::

  python -m atm_jax.data.prepare tfds glue --data_dir=$TFDS_DATA_DIR
  python -m atm_jax.main --config=configs/bert.py --workdir=runs/bert \\
      --config.data.data_dir=$TFDS_DATA_DIR

Shrink: ``--config=configs/bert.py:runlocal`` (tiny random-init BERT, three
generated text tasks, seconds on a CPU).
"""

from atm_jax import recipes


def get_config(arg=None):
    return recipes.apply_arg(recipes.paper_config("bert"), arg, "configs/bert.py")
