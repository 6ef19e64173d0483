"""The paper's experimental recipe as configs (arXiv 2411.03055 §4, REFERENCE §4).

`paper_config(model)` builds the full-scale config of configs/vit.py, roberta.py and
bert.py; `runlocal(config)` shrinks one in place to a tiny random-init model of the
same architecture on tiny generated local data, so the whole path (weights → heads →
finetune → merge → checkpoints → Hugging Face export) runs on a laptop CPU in
seconds. Shrunk runs measure nothing: they check that the code path works.
"""

from __future__ import annotations

import ml_collections

__all__ = ["PAPER", "paper_config", "runlocal", "apply_arg"]

VISION_TASKS = ("cifar100", "dtd", "eurosat", "gtsrb", "mnist", "resisc45", "svhn")
GLUE_TASKS = ("cola", "sst2", "mrpc", "qqp", "mnli", "qnli", "rte")

# The recipe, field by field (checked against REFERENCE §4 by tests/test_configs.py).
PAPER = {
    "clip": {"weights": "openai/clip-vit-base-patch16", "tasks": VISION_TASKS,
             "heads": "zero_shot", "one_shot": ("task_arithmetic", "ties", "breadcrumbs"),
             "atm": ("valft_atm", "atm"), "references": ("pretrained", "individual")},
    "bert": {"weights": "google-bert/bert-base-uncased", "tasks": GLUE_TASKS,
             "heads": "frozen_random",
             "one_shot": ("task_arithmetic", "ties", "breadcrumbs", "dare"), "atm": ("atm",),
             "references": ("pretrained", "individual")},
    "roberta": {"weights": "FacebookAI/roberta-base", "tasks": GLUE_TASKS,
                "heads": "frozen_random",
                "one_shot": ("task_arithmetic", "ties", "breadcrumbs", "dare"), "atm": ("atm",),
                "references": ("pretrained", "individual")},
}
BUDGET = 10  # epochs per task for every method
ITERATIONS = 10  # ATM: 10 iterations × 1 epoch
MERGES = {"task_arithmetic": ("mean", {}), "ties": ("ties", {"density": 0.15}),
          "breadcrumbs": ("breadcrumbs", {"beta": 0.85, "gamma": 0.993}),
          "dare": ("dare", {"p": 0.9})}
RUNLOCAL_TASKS = {"clip": ("glyph_digits", "glyph_upper", "glyph_lower"),
                  "bert": ("keyword_sentiment", "keyword_topic", "keyword_pair"),
                  "roberta": ("keyword_sentiment", "keyword_topic", "keyword_pair")}


def _method(kind, merge="mean", kwargs=None, iterations=None, split="train"):
    spec = {"kind": kind, "merge": merge, "merge_kwargs": dict(kwargs or {}), "alpha": 1.0}
    if kind == "atm":
        spec.update(iterations=iterations, split=split)
    return ml_collections.ConfigDict(spec)


def paper_config(model: str) -> ml_collections.ConfigDict:
    """The paper's full-scale setup for ``model`` in {"clip", "bert", "roberta"}."""
    recipe = PAPER[model]
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.suite = "paper"
    config.tasks = recipe["tasks"]
    config.data = ml_collections.ConfigDict({
        "source": "tfds",        # tfds | folder | local
        "data_dir": "",          # tfds data dir; "" = $TFDS_DATA_DIR or ~/.cache/atm_jax/tfds
        "folder": "",            # image-folder root for tasks without a tfds builder (GTSRB);
                                 # "" = ~/.cache/atm_jax/folders
        "tokenizer": "",         # "" = the tokenizer saved with the weights
        "train_size": 0,         # 0 = all of the 90% training part
        "test_size": 0,          # 0 = the whole test split
        "validation_fraction": 0.1,
        "validation_cap": 5000,
        "image_size": 0,         # 0 = native when uniform, else 224 at load time
        "max_length": 128,
        "augment": model == "clip",  # RandomResizedCrop(224, scale 0.9-1.0, bicubic)
    })
    config.model = ml_collections.ConfigDict({
        "name": model, "weights": recipe["weights"], "allow_pickle": False, "init_seed": 0})
    config.heads = recipe["heads"]
    config.head_seed = 0
    config.optimizer = ml_collections.ConfigDict({
        "name": "adam", "learning_rate": 1e-5, "weight_decay": 0.0, "grad_clip": 10.0,
        "batch_size": 32, "schedule": "constant"})
    config.budget = BUDGET
    config.merge_include = ()
    config.merge_exclude = ()
    config.references = recipe["references"]
    config.methods = ml_collections.ConfigDict()
    for name in recipe["one_shot"]:
        merge, kwargs = MERGES[name]
        config.methods[name] = _method("one_shot", merge, kwargs)
    for name in recipe["atm"]:
        config.methods[name] = _method("atm", iterations=ITERATIONS,
                                       split="validation" if name == "valft_atm" else "train")
    config.eval_batch_size = 256
    config.progress = False
    config.resume = "auto"
    config.checkpoint = ml_collections.ConfigDict({"keep": 3})
    config.save_params = True
    config.export_hf = True  # <workdir>/hf/<method>/: loadable by transformers
    return config


def runlocal(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Shrinks ``config`` in place: tiny random-init model, tiny generated tasks,
    2 epochs (ATM 2 × 1), small batches. Seconds on a CPU; the numbers mean nothing."""
    model = config.model.name
    config.tasks = RUNLOCAL_TASKS[model]
    config.data.source = "local"
    config.data.train_size = 96
    config.data.test_size = 64
    config.data.validation_cap = 32
    config.data.max_length = 24
    config.data.image_size = 0
    config.model.weights = ""  # random init of the tiny config
    config.optimizer.learning_rate = 1e-3
    config.optimizer.batch_size = 16
    config.budget = 2
    for name in config.methods:
        if config.methods[name].kind == "atm":
            config.methods[name].iterations = 2
    config.eval_batch_size = 64
    config.checkpoint.keep = 2
    return config


def apply_arg(config: ml_collections.ConfigDict, arg: str | None, path: str
              ) -> ml_collections.ConfigDict:
    """The config files' argument: none for the paper, ``runlocal`` to shrink."""
    if arg in (None, ""):
        return config
    if arg == "runlocal":
        return runlocal(config)
    raise ValueError(f"{path} takes no argument or 'runlocal', got {arg!r}.")
