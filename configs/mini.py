"""The embedded default: ATM vs one-shot merging on real data, on a laptop CPU.

Four real 28×28 grayscale tasks that ship in registry packages (MNIST,
Fashion-MNIST, animal silhouettes, 8×8 digits upsampled), a ~0.8M-parameter ViT
that the project pretrains itself on font glyphs (no ViT weights reach an offline
machine), and the ATM paper's protocol scaled down (arXiv 2411.03055, §4):

* budget ``b = 10`` epochs per task for every method;
* one-shot baselines: every task finetuned for ``b`` epochs from the pretrained
  base, then merged once with task arithmetic (mean), TIES (15% kept),
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
  python -m atm_jax.main --config=configs/mini.py --config.budget=5 \\
      --config.methods.atm.iterations=5 --config.methods.valft_atm.iterations=5
"""

import ml_collections


def _one_shot(merge, alpha=1.0, **kwargs):
    return ml_collections.ConfigDict(
        {"kind": "one_shot", "merge": merge, "merge_kwargs": kwargs, "alpha": alpha})


def _atm(iterations, split="train", merge="mean", alpha=1.0, **kwargs):
    return ml_collections.ConfigDict(
        {"kind": "atm", "iterations": iterations, "split": split, "merge": merge,
         "merge_kwargs": kwargs, "alpha": alpha})


def get_config(arg=None):
    """``arg``: None for the real run, ``"tiny"`` for a seconds-long smoke run."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.suite = "mini"
    config.tasks = ("mnist", "fashion_mnist", "animals", "digits")
    # Sizes are caps: digits has only 1,258 / 180 / 359 examples, animals 1,943 test.
    config.data = ml_collections.ConfigDict(
        {"train_size": 3000, "validation_size": 500, "test_size": 2000, "cap_to_available": True})
    config.model = ml_collections.ConfigDict(
        {"name": "vit_tiny", "patch_size": 7, "width": 128, "depth": 4, "num_heads": 4,
         "mlp_dim": 512})
    config.pretrain = ml_collections.ConfigDict(
        {"seed": 0, "num_images": 80_000, "epochs": 2, "batch_size": 32,
         "learning_rate": 1e-3, "schedule": "warmup_cosine", "warmup_steps": 200,
         "held_out": 4_000})
    config.heads = "frozen_random"
    config.head_seed = 0
    config.optimizer = ml_collections.ConfigDict(
        {"name": "adam", "learning_rate": 1e-4, "weight_decay": 0.0, "grad_clip": 10.0,
         "batch_size": 32})
    config.budget = 10  # epochs per task, for every method
    # Leaf-path regexes of the backbone deciding what merges (heads never do).
    config.merge_include = ()
    config.merge_exclude = ()
    config.references = ("pretrained", "linear_probe", "individual")
    config.methods = ml_collections.ConfigDict()
    config.methods.task_arithmetic = _one_shot("mean")
    config.methods.ties = _one_shot("ties", density=0.15)
    config.methods.breadcrumbs = _one_shot("breadcrumbs", beta=0.85, gamma=0.993)
    config.methods.dare = _one_shot("dare", p=0.9)
    config.methods.valft_atm = _atm(10, split="validation")
    config.methods.atm = _atm(10)
    config.eval_batch_size = 500
    config.progress = False  # True forces step progress bars; a terminal gets them anyway
    # Checkpoints after every finetune and merge; a run found in the workdir resumes
    # ("auto": only with the same config; "force": even with a different one).
    config.resume = "auto"
    config.checkpoint = ml_collections.ConfigDict({"keep": 3})
    config.save_params = True  # <workdir>/params/<method>.msgpack: each method's final backbone

    if arg == "tiny":
        config.data.train_size = 128
        config.data.validation_size = 64
        config.data.test_size = 128
        config.model.width = 32
        config.model.depth = 1
        config.model.num_heads = 2
        config.model.mlp_dim = 64
        config.pretrain.num_images = 1024
        config.pretrain.epochs = 1
        config.pretrain.held_out = 256
        config.pretrain.warmup_steps = 2
        config.optimizer.learning_rate = 1e-3
        config.budget = 2
        config.methods.valft_atm.iterations = 2
        config.methods.atm.iterations = 2
    elif arg not in (None, ""):
        raise ValueError(f"configs/mini.py takes no argument or 'tiny', got {arg!r}.")
    return config
