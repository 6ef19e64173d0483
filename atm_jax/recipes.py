"""The recipes every ``configs/*.py`` builds on, and so the config schema.

* `mini()`: the embedded CPU default (configs/mini.py): four real 28×28 tasks, a
  small ViT the project pretrains itself, the paper's protocol scaled down;
  `tiny(config)` shrinks it to a seconds-long smoke run.
* `paper_config(model)`: the paper's full-scale setups (arXiv 2411.03055 §4,
  REFERENCE §4) of configs/vit.py, roberta.py and bert.py; `runlocal(config)`
  shrinks one to a tiny random-init model of the same architecture on tiny
  generated local data, so the whole path (weights → heads → finetune → merge →
  checkpoints → Hugging Face export) runs on a laptop CPU in seconds. Shrunk runs
  measure nothing: they check that the code path works.

The builders are the schema: `atm_jax.schema` derives the allowed fields of each
suite from what `BUILDERS` produce, so a new field is added here, once.

Method rows are named after their merge operator: the paper's "task arithmetic"
baseline, the mean of the task vectors at α = 1, is the row ``mean``, so that no
row is called ``task_arithmetic`` while `atm_jax.merge.task_arithmetic` is the sum.
"""

from __future__ import annotations

from atm_jax import extras

with extras.needed("atm_jax.recipes"):
    import ml_collections
    from ml_collections import config_dict

__all__ = ["PAPER", "BUILDERS", "SHRINKS", "ALPHA_GRID", "STUDY_MERGES", "STUDY_ATM", "STUDY_DATA_MERGES", "method",
           "mesh", "analysis_methods", "study_methods",
           "mini", "tiny", "paper_config", "runlocal", "pool_rows", "apply_arg"]

VISION_TASKS = ("cifar100", "dtd", "eurosat", "gtsrb", "mnist", "resisc45", "svhn")
GLUE_TASKS = ("cola", "sst2", "mrpc", "qqp", "mnli", "qnli", "rte")

# The recipe, field by field (checked against REFERENCE §4 by tests/test_configs.py).
PAPER = {
    "clip": {"weights": "openai/clip-vit-base-patch16", "tasks": VISION_TASKS,
             "heads": "zero_shot", "one_shot": ("mean", "ties", "breadcrumbs"),
             "atm": ("valft_atm", "atm"), "references": ("pretrained", "individual")},
    "bert": {"weights": "google-bert/bert-base-uncased", "tasks": GLUE_TASKS,
             "heads": "frozen_random",
             "one_shot": ("mean", "ties", "breadcrumbs", "dare"), "atm": ("atm",),
             "references": ("pretrained", "individual")},
    "roberta": {"weights": "FacebookAI/roberta-base", "tasks": GLUE_TASKS,
                "heads": "frozen_random",
                "one_shot": ("mean", "ties", "breadcrumbs", "dare"), "atm": ("atm",),
                "references": ("pretrained", "individual")},
}
BUDGET = 10  # epochs per task for every method
ITERATIONS = 10  # ATM: 10 iterations × 1 epoch
MERGES = {"mean": ("mean", {}), "ties": ("ties", {"density": 0.15}),
          "breadcrumbs": ("breadcrumbs", {"beta": 0.85, "gamma": 0.993}),
          "dare": ("dare", {"p": 0.9})}
RUNLOCAL_TASKS = {"clip": ("glyph_digits", "glyph_upper", "glyph_lower"),
                  "bert": ("keyword_sentiment", "keyword_topic", "keyword_pair"),
                  "roberta": ("keyword_sentiment", "keyword_topic", "keyword_pair")}


def method(kind: str, merge: str = "mean", kwargs: dict | None = None, *, alpha: float = 1.0,
           iterations: int | None = None, split: str = "train", tune_alpha: bool = False,
           start: str = "", alpha_from: str = "") -> ml_collections.ConfigDict:
    """One entry of ``config.methods``: a one-shot merge, or an ATM variant
    (``iterations`` × budget/iterations epochs on ``split``).

    ``tune_alpha`` (one-shot): α is chosen from ``config.alpha_grid`` on the
    validation split (the row reports the chosen α). ``start`` (ATM): the model the
    iterations start from instead of the pretrained base: a one-shot method of the
    same run (post-hoc ATM, e.g. ``"ties"``) or a ``.msgpack`` params file.
    ``alpha_from`` (ATM): the ``tune_alpha`` one-shot row of the same run whose
    chosen α scales every iteration's merge (fixed over the iterations)."""
    spec = {"kind": kind, "merge": merge, "merge_kwargs": dict(kwargs or {}), "alpha": alpha}
    if kind == "atm":
        spec.update(iterations=iterations, split=split)
    if tune_alpha:
        spec["tune_alpha"] = True
    if start:
        spec["start"] = start
    if alpha_from:
        spec["alpha_from"] = alpha_from
    return ml_collections.ConfigDict(spec)


def mesh() -> ml_collections.ConfigDict:
    """``config.mesh`` (`atm_jax.sharding`): ``data`` devices split every batch (−1 =
    all devices left), ``task`` device groups finetune different tasks at the same
    time, ``params`` "replicated" or "fsdp" (big kernels split over the data axis)."""
    return ml_collections.ConfigDict({"task": 1, "data": -1, "params": "replicated"})


# α grid for the fair baselines (tune_alpha): mean aggregation over T tasks needs
# α up to T to reach the sum; sum aggregation needs α < 1.
ALPHA_GRID = (0.1, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0, 4.0)


def analysis_methods(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Adds, in place, the fair-baseline and analysis rows beside the paper-protocol ones: α-tuned
    one-shot baselines (``<name>_tuned``), TIES/DARE with sum aggregation (α = 1 and
    tuned), post-hoc ATM from TIES (``ph_atm``) and valFT ATM as the authors' final
    code ran it (``valft_atm_authors``: the ``mean`` one-shot merge, then iterations
    on the validation split); and turns ``config.analysis`` on."""
    config.analysis = True
    methods = config.methods
    one_shot = [n for n in methods if methods[n].kind == "one_shot"]
    for name in one_shot:
        spec = methods[name]
        methods[f"{name}_tuned"] = method("one_shot", spec.merge, spec.merge_kwargs.to_dict(),
                                          tune_alpha=True)
    for name in ("ties", "dare"):
        if name in one_shot:
            kwargs = dict(methods[name].merge_kwargs.to_dict(), aggregate="sum")
            methods[f"{name}_sum"] = method("one_shot", methods[name].merge, kwargs)
            methods[f"{name}_sum_tuned"] = method("one_shot", methods[name].merge, kwargs,
                                                  tune_alpha=True)
    atm_runs = [n for n in methods if methods[n].kind == "atm"]
    iterations = methods[atm_runs[0]].iterations if atm_runs else config.budget
    if "ties" in one_shot:
        methods.ph_atm = method("atm", iterations=iterations, split="validation", start="ties")
    if "mean" in one_shot:
        methods.valft_atm_authors = method("atm", iterations=iterations, split="validation",
                                           start="mean")
    return config


# The data-free merges of the study rows (`study_methods`): (merge, hyperparameters,
# whether the paper fixes α = 1). SLERP merges two models only: not in four-task suites.
STUDY_MERGES = {
    "tsv": ("tsv", {}, True),            # TSV-M: α = 1 (Gargiulo et al.; FusionBench)
    "iso_c": ("iso_c", {}, False),       # α chosen on validation in the paper
    "iso_cts": ("iso_cts", {"common_space_fraction": 0.8}, False),
    "wudi": ("wudi", {"steps": 300, "learning_rate": 1e-5}, True),
    "consensus": ("consensus", {"k": 2, "lam": 0.6}, False),  # TA's α tuned in the paper
    "della": ("della", {"density": 0.5, "epsilon": 0.15}, True),  # mergekit's λ = 1
    "model_stock": ("model_stock", {}, True),  # its own interpolation ratio
}
# The merges that look at data (`config.merge_data`), one-shot at α = 1 as their papers
# run them: RegMean's and Fisher's weights sum to one, AdaMerging learns its own scale.
# AdaMerging: 200 Adam steps at batch 16 per task for the mini suites (FusionBench: 1,000).
STUDY_DATA_MERGES = {
    "regmean": ("regmean", {"off_diagonal_scale": 0.95}),
    "regmean_pp": ("regmean_pp", {"off_diagonal_scale": 0.95}),
    "fisher": ("fisher", {}),
    "adamerging": ("adamerging", {"steps": 200, "batch_size": 16}),
}
# ATM with another inner merge, at α chosen by that merge's tuned one-shot row.
STUDY_ATM = {"atm_ties": ("ties", "ties_tuned"), "atm_tsv": ("tsv", "tsv_tuned"),
             "atm_iso_c": ("iso_c", "iso_c_tuned")}


def study_methods(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Adds, in place, the study rows (the `:study` variant): every data-free merge of
    `STUDY_MERGES` as a one-shot row at the paper's α where it fixes one and with α
    chosen on validation (``<name>_tuned``), the α-tuned rows of today's one-shot
    merges, and ATM with TIES, TSV-M and Iso-C as its inner merge (`STUDY_ATM`) at
    the α their tuned rows chose, beside ``atm`` (the mean, α = 1); and the merges that
    look at data (`STUDY_DATA_MERGES`, α = 1) with ``atm_regmean`` (RegMean inside ATM)."""
    methods = config.methods
    for name in [n for n in methods if methods[n].kind == "one_shot"
                 and not methods[n].get("tune_alpha", False) and f"{n}_tuned" not in methods]:
        spec = methods[name]
        methods[f"{name}_tuned"] = method("one_shot", spec.merge, spec.merge_kwargs.to_dict(),
                                          tune_alpha=True)
    for name, (merge, kwargs, fixed) in STUDY_MERGES.items():
        if fixed:
            methods[name] = method("one_shot", merge, kwargs)
        methods[f"{name}_tuned"] = method("one_shot", merge, kwargs, tune_alpha=True)
    atm_runs = [n for n in methods if methods[n].kind == "atm"]
    iterations = methods[atm_runs[0]].iterations if atm_runs else config.budget
    for name, (merge, source) in STUDY_ATM.items():
        kwargs = methods[source].merge_kwargs.to_dict()
        methods[name] = method("atm", merge, kwargs, iterations=iterations, alpha_from=source)
    for name, (merge, kwargs) in STUDY_DATA_MERGES.items():
        methods[name] = method("one_shot", merge, kwargs)
    # RegMean as ATM's inner merge: its Grams recomputed on every iteration's finetunes.
    methods.atm_regmean = method("atm", "regmean", STUDY_DATA_MERGES["regmean"][1],
                                 iterations=iterations)
    return config


def mini() -> ml_collections.ConfigDict:
    """The embedded default: ATM vs one-shot merging on four real tasks (configs/mini.py)."""
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
    config.heads = "frozen_random"  # or "trainable": carried from one iteration to the next
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
    for name, (merge, kwargs) in MERGES.items():
        config.methods[name] = method("one_shot", merge, kwargs)
    config.methods.valft_atm = method("atm", iterations=10, split="validation")
    config.methods.atm = method("atm", iterations=10)
    # Test forward batch: 64 was the fastest on a 2-core CPU with the same correct counts
    # (benchmarks/eval_bench.py; measured: see benchmarks/results/comments_moved_20261202.md).
    config.eval_batch_size = 64
    # Evaluate ATM's base on the test splits every this many iterations (and always
    # after the last): 1 draws the full curve; larger cuts evaluation's share of a run.
    config.eval_every = 1
    config.progress = False  # True forces step progress bars; a terminal gets them anyway
    # Checkpoints after every finetune and merge; a run found in the workdir resumes
    # ("auto": only with the same config; "force": even with a different one).
    config.resume = "auto"
    # Multi-host: "all" = every process sees every task; "per_process" = PA-ATM (paper
    # §6): task i is loaded and finetuned only by process i % P (atm_jax.distributed).
    config.task_ownership = "all"
    config.checkpoint = ml_collections.ConfigDict({"keep": 3})
    config.save_params = True  # <workdir>/params/<method>.msgpack: each method's final backbone
    config.mesh = mesh()
    _compute_fields(config)
    _analysis_fields(config)
    _merge_data_fields(config)
    return config


def _compute_fields(config: ml_collections.ConfigDict) -> None:
    # The finetuning step's compute: "bfloat16" runs the backbone on a bfloat16 copy of
    # its params (params, optimizer and loss stay float32); remat recomputes activations
    # in the backward pass. Options for accelerators; on a CPU both only cost time.
    config.precision = "float32"
    config.remat = False


def _merge_data_fields(config: ml_collections.ConfigDict) -> None:
    # The merges that look at data (RegMean, RegMean++, Fisher: `atm_jax.merge_spec.MergeData`)
    # see the first `examples` training examples of each task (FusionBench: 256); the
    # Fisher's labels come from the data ("data") or from the model ("sampled"); AdaMerging
    # sees the unlabeled test inputs, as its paper does (transductive).
    config.merge_data = ml_collections.ConfigDict(
        {"examples": 256, "fisher_labels": "data", "batch_size": 64})


def _analysis_fields(config: ml_collections.ConfigDict) -> None:
    # <workdir>/analysis/: cosines, losses, bases per iteration, figures (atm_jax.analysis).
    config.analysis = False
    config.alpha_grid = ALPHA_GRID  # tune_alpha methods choose α from here on validation


def tiny(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Shrinks the mini recipe in place to a seconds-long smoke run."""
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
    for name in config.methods:
        if config.methods[name].kind == "atm":
            config.methods[name].iterations = 2
    return config


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
    # Finetuned checkpoints in place of the one-shot finetunes (`atm_jax.model_pool`):
    # None, a template "org/name_{task}" / "/ckpts/{task}", or {task: folder or hub id}.
    config.model_pool = config_dict.placeholder(object)
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
        config.methods[name] = method("one_shot", merge, kwargs)
    for name in recipe["atm"]:
        config.methods[name] = method("atm", iterations=ITERATIONS,
                                      split="validation" if name == "valft_atm" else "train")
    config.eval_batch_size = 256
    config.eval_every = 1  # test evaluation every this many ATM iterations (and the last)
    config.progress = False
    config.resume = "auto"
    # Multi-host: "all" = every process sees every task; "per_process" = PA-ATM (paper
    # §6): task i is loaded and finetuned only by process i % P (atm_jax.distributed).
    config.task_ownership = "all"
    config.checkpoint = ml_collections.ConfigDict({"keep": 3})
    config.save_params = True
    config.export_hf = True  # <workdir>/hf/<method>/: loadable by transformers
    config.mesh = mesh()
    _compute_fields(config)
    _analysis_fields(config)
    _merge_data_fields(config)
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


# The builders of each suite (the schema is the union of their fields) and the
# shrinks a config file's argument may name.
BUILDERS = {"mini": (mini,), "paper": tuple(lambda m=m: paper_config(m) for m in PAPER)}
def pool_rows(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Keeps, in place, only the rows that train nothing: the pretrained and individual
    references and the one-shot merges (no ATM method, no linear probe), which is what
    a ``config.model_pool`` run evaluates (`atm_jax.model_pool`)."""
    for name in [n for n in config.methods if config.methods[n].kind == "atm"]:
        del config.methods[name]
    config.references = tuple(r for r in config.references if r != "linear_probe")
    return config


SHRINKS = {"mini": {"tiny": tiny}, "paper": {"runlocal": runlocal, "pool": pool_rows}}
# The order a config argument's parts apply in: shrinks, then the row sets, then `pool_rows`.
_ARG_ORDER = {"analysis": 1, "study": 1, "pool": 2}


def apply_arg(config: ml_collections.ConfigDict, arg: str | None, path: str
              ) -> ml_collections.ConfigDict:
    """A config file's argument: none for the full recipe, else a shrink of its suite
    (``tiny`` for mini, ``runlocal`` for the paper setups) and/or ``analysis``
    (`analysis_methods`) and/or ``study`` (`study_methods`), comma-separated:
    ``"tiny,analysis"``, ``"tiny,study"``; the paper setups also take ``pool``
    (`pool_rows`, applied last: ``"runlocal,analysis,pool"``)."""
    if arg in (None, ""):
        return config
    shrinks = {**SHRINKS.get(config.suite, {}), "analysis": analysis_methods,
               "study": study_methods}
    for part in arg.split(","):
        if part not in shrinks:
            named = " / ".join(repr(k) for k in shrinks)
            raise ValueError(f"{path} takes no argument or {named} (comma-separated), got {arg!r}.")
    for part in sorted(arg.split(","), key=lambda p: _ARG_ORDER.get(p, 0)):
        config = shrinks[part](config)
    return config


# -- the mini_text suite: MiniLM on real text (configs/mini_text.py) --------------------

MINI_TEXT_TASKS = ("movie_sentiment", "product_sentiment", "tweet_sentiment", "quote_topic")


def mini_text() -> ml_collections.ConfigDict:
    """A real pretrained transformer on real text: all-MiniLM-L6-v2 on four registry-
    package text tasks, with the mini protocol (configs/mini_text.py)."""
    config = mini()
    config.suite = "mini_text"
    config.tasks = MINI_TEXT_TASKS
    del config.pretrain
    # Sized for a 2-core CPU (why: configs/mini_text.py; measured: see
    # benchmarks/results/comments_moved_20261202.md).
    config.data = ml_collections.ConfigDict(
        {"train_size": 128, "validation_size": 64, "test_size": 200, "max_length": 32,
         "tokenizer": ""})  # "" = MiniLM's own tokenizer.json
    config.model = ml_collections.ConfigDict({"weights": "all-MiniLM-L6-v2", "init_seed": 0})
    config.heads = "frozen_random"  # the paper's NLP recipe
    config.optimizer.learning_rate = 1e-4
    config.optimizer.batch_size = 16
    config.eval_batch_size = 200
    return config


def mini_text_tiny(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Shrinks the mini_text recipe in place: a tiny random BERT on a 2-task slice.

    Two binary tasks: heads of one shape compile the train and eval steps once."""
    config.tasks = ("movie_sentiment", "product_sentiment")
    config.data.train_size = 32
    config.data.validation_size = 16
    config.data.test_size = 32
    config.data.max_length = 16
    config.model.weights = ""
    config.optimizer.learning_rate = 1e-3
    config.optimizer.batch_size = 8
    config.budget = 2
    for name in config.methods:
        if config.methods[name].kind == "atm":
            config.methods[name].iterations = 2
    config.eval_batch_size = 32
    config.checkpoint.keep = 2
    return config


BUILDERS["mini_text"] = (mini_text,)
SHRINKS["mini_text"] = {"tiny": mini_text_tiny}
__all__ += ["mini_text", "mini_text_tiny"]
