"""The paper's vision setup: CLIP ViT-B/16 on seven image tasks (arXiv 2411.03055,
Tables 1 and 3; recipe in atm_jax/recipes.py).

Frozen zero-shot heads from the CLIP text tower; only the image encoder is finetuned
and merged. Adam 1e-5, batch 32, grad clip 10, no schedule; budget 10 epochs per
task; ATM 10 iterations × 1 epoch (and valFT ATM on the validation split); TA (the
row ``mean``), TIES (15% kept), Breadcrumbs (0.85 / 0.993), mean aggregation, α = 1.

Run (GPU or TPU host, with network once for weights and data)::

  python -m atm_jax.data.prepare tfds vision --data_dir=$TFDS_DATA_DIR
  python -m atm_jax.main --config=configs/vit.py --workdir=runs/vit \\
      --config.data.data_dir=$TFDS_DATA_DIR --config.data.folder=/data/local  # GTSRB

Shrink (``:runlocal``): a tiny random-init CLIP of the same architecture on three
generated glyph tasks; the whole path runs on a CPU in seconds::

  python -m atm_jax.main --config=configs/vit.py:runlocal --workdir=/tmp/vit_local
"""

from atm_jax import recipes


def get_config(arg=None):
    return recipes.apply_arg(recipes.paper_config("clip"), arg, "configs/vit.py")
