"""The embedded default: ATM vs one-shot merging on real data, on a laptop CPU.

Recipe: ``atm_jax.recipes.mini``. Four real 28×28 grayscale tasks that ship in registry packages (MNIST,
Fashion-MNIST, animal silhouettes, 8×8 digits upsampled), a ~0.8M-parameter ViT
that the project pretrains itself on font glyphs (no ViT weights reach an offline
machine), and the ATM paper's protocol scaled down (arXiv 2411.03055, §4):

* budget ``b = 10`` epochs per task for every method;
* one-shot baselines: every task finetuned for ``b`` epochs from the pretrained
  base, then merged once with task arithmetic (the row ``mean``), TIES (15% kept),
  Breadcrumbs (0.85 / 0.993) and DARE (p = 0.9), all with mean aggregation and
  α = 1, as the paper's baselines;
* ATM: ``b`` iterations × 1 epoch, mean merge, α = 1; valFT ATM: the same on the
  validation split only;
* one optimizer setting for every method (Adam, no schedule, gradient clip 10);
* reference rows: the pretrained base with the task heads, a linear probe on the
  frozen base (head only, same optimizer and budget), and the individually
  finetuned models (the denominator of normalized accuracy).

Heads are per task and never merged: ``frozen_random`` (the paper's NLP recipe,
default) or ``trainable`` (each task carries its head from one ATM iteration to
the next).

Run::

  python -m atm_jax.main --config=configs/mini.py --workdir=/tmp/atm_mini
  python -m atm_jax.main --config=configs/mini.py:tiny --workdir=/tmp/atm_tiny   # seconds
  python -m atm_jax.main --config=configs/mini.py:study --workdir=/tmp/atm_study  # + the
      # data-free merges of 2024-25 and ATM with TIES / TSV-M / Iso-C inside
      # (docs/data_free_merges.md)
  python -m atm_jax.main --config=configs/mini.py --config.budget=5 \\
      --config.methods.atm.iterations=5 --config.methods.valft_atm.iterations=5
"""

from atm_jax import recipes


def get_config(arg=None):
    """``arg``: None for the real run, ``"tiny"`` for a seconds-long smoke run."""
    return recipes.apply_arg(recipes.mini(), arg, "configs/mini.py")
