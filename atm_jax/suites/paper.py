"""The paper's setups (configs/vit.py, roberta.py, bert.py).

CLIP ViT-B/16 with zero-shot heads on seven image tasks, or BERT / RoBERTa with
frozen random heads on seven GLUE tasks (arXiv 2411.03055 §4). Weights come from
Hugging Face safetensors (a local folder or a hub id); data from tfds, an image
folder, or (``data.source="local"``) tiny generated tasks for CPU smoke runs.
Only CLIP's image encoder (``params["vision"]``) is finetuned and merged.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp

from atm_jax import files, model_pool, schema
from atm_jax.errors import ConfigError
from atm_jax.suites.base import Setup

__all__ = ["validate", "backbone_shapes", "build", "hf_config", "MODEL_NAMES", "PAPER_HEADS",
           "DATA_SOURCES", "LOCAL_TEMPLATES"]

MODEL_NAMES = ("clip", "bert", "roberta")
# Which heads each model uses (the paper's recipe), and which data sources exist.
PAPER_HEADS = {"clip": "zero_shot", "bert": "frozen_random", "roberta": "frozen_random"}
DATA_SOURCES = ("tfds", "folder", "local")  # "folder": image folders, or TSVs for text
# Zero-shot prompts of the generated glyph tasks (the paper's tasks carry their own).
LOCAL_TEMPLATES = ("a photo of the character {c}.", "a rendering of {c}.", "the glyph {c}.")
CLIP_TEXT_LENGTH = 77  # OpenAI CLIP's context length


def validate(config) -> None:
    """The paper suite's own fields: model, data source, tasks, heads, sizes, weights."""
    from atm_jax.data import local, paper

    name = schema.field(config, "model.name")
    if name not in PAPER_HEADS:
        raise ConfigError(f"config.model.name={name!r} must be one of {tuple(PAPER_HEADS)}.")
    modality = "image" if name == "clip" else "text"
    source = schema.field(config, "data.source")
    if source not in DATA_SOURCES:
        raise ConfigError(f"config.data.source={source!r} must be one of {DATA_SOURCES}.")
    if source == "local":
        known = local.IMAGE_TASKS if modality == "image" else local.TEXT_TASKS
    else:
        known = {t: v for t, v in paper.PAPER_TASKS.items() if v.modality == modality}
    for task in config.tasks:
        if task not in known and not (source == "folder" and modality == "image"):
            raise ConfigError(f"config.tasks has unknown task {task!r} for model {name!r} and "
                              f"data.source={source!r}; known: {sorted(known)}.")
    if config.heads != PAPER_HEADS[name]:
        raise ConfigError(f"config.heads={config.heads!r}: model {name!r} uses "
                          f"{PAPER_HEADS[name]!r} heads (the paper's recipe).")
    for path in ("data.train_size", "data.test_size", "data.validation_cap", "data.image_size",
                 "model.init_seed"):
        schema.integer(config, path)
    schema.positive_int(config, "data.max_length")
    fraction = schema.field(config, "data.validation_fraction")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise ConfigError(f"config.data.validation_fraction={fraction!r} must be in (0, 1).")
    for path in ("data.augment", "model.allow_pickle", "export_hf"):
        schema.flag(config, path)
    weights = schema.field(config, "model.weights")
    folder = pathlib.Path(weights).expanduser() if weights else None
    if folder is not None and folder.is_dir() and not (folder / "config.json").is_file():
        raise ConfigError(f"config.model.weights={weights!r} is a folder without config.json; "
                          "point it at a Hugging Face model folder or a hub id.")
    if not weights and source != "local":
        raise ConfigError("config.model.weights is empty (random init) but config.data.source="
                          f"{source!r}: random init is for smoke runs on local data only.")
    schema.check_batch_sizes(config, config.data.train_size, config.data.validation_cap)
    model_pool.check(config)



def hf_config(model_cfg) -> dict | None:
    """The model's Hugging Face config without network: the tiny random-init config
    when no weights are named, a local folder's config.json, else None (a hub id)."""
    import json

    from atm_jax.models import bert, clip

    if not model_cfg.weights:
        if model_cfg.name == "clip":  # special ids of the local prompt tokenizer
            return clip.tiny_config(text_config={"pad_token_id": 0, "bos_token_id": 2,
                                                 "eos_token_id": 3})
        extra = {"pad_token_id": 0} if model_cfg.name == "roberta" else {}
        return bert.tiny_config(model_cfg.name, **extra)
    folder = pathlib.Path(model_cfg.weights).expanduser()
    if (folder / "config.json").is_file():
        return json.loads((folder / "config.json").read_text())
    return None


def backbone_shapes(config):
    """The backbone's params as ShapeDtypeStructs (no weights made or read), or None
    when they can only be known after fetching the weights (a hub id)."""
    from atm_jax.models import bert, clip

    cfg = hf_config(config.model)
    if cfg is None:
        return None
    return clip.param_shapes(cfg)["vision"] if config.model.name == "clip" else bert.param_shapes(cfg)


def _weights(config, log):
    """(HF config dict, full params, facts for results.json) from the named weights or a
    random init."""
    from atm_jax.models import bert, clip, hf

    name = config.model.name
    if not config.model.weights:
        cfg = hf_config(config.model)
        key = jax.random.key(config.model.init_seed)
        params = clip.init_params(cfg, key) if name == "clip" else bert.init_params(cfg, key)
        log(f"model: {name} with random init (tiny config, seed {config.model.init_seed}); "
            "a smoke run, not a pretrained model")
        return cfg, params, {"weights": "random init", "family": name}
    try:
        checkpoint = hf.load(config.model.weights, allow_pickle=config.model.allow_pickle)
    except hf.HubUnavailableError as e:
        raise ConfigError(f"{e}\nOn the command line: --config.model.weights=/path/to/folder "
                          "(the folder also needs the tokenizer files for text models, or set "
                          "--config.data.tokenizer).") from None
    except hf.UnsafeCheckpointError as e:
        raise ConfigError(f"{e}\nOn the command line: --config.model.allow_pickle=True.") from None
    if checkpoint.family != name:
        raise ConfigError(f"config.model.weights={config.model.weights!r} holds a "
                          f"{checkpoint.family} model but config.model.name={name!r}.")
    log(f"model: {name} weights from {config.model.weights}")
    return checkpoint.config, checkpoint.params, {"weights": str(config.model.weights),
                                                   "family": name}


def _local_root(kind: str) -> pathlib.Path:
    return files.cache_dir() / "local" / kind


def _load_tasks(config, tokenizer, log) -> dict:
    from atm_jax.data import local, paper

    d = config.data
    source, folder = d.source, d.folder or str(files.cache_dir() / "folders")
    if source == "local":
        if config.model.name == "clip":
            folder = local.make_image_folder(_local_root("images"), tasks=tuple(config.tasks))
            source = "folder"
        else:
            folder = local.make_text_tasks(_local_root("text"), tasks=tuple(config.tasks))
            source = "tsv"
    elif source == "folder" and config.model.name != "clip":
        source = "tsv"  # text tasks in a folder: <folder>/<task>/{train,test}.tsv (data.text)
    tasks = {}
    for name in config.tasks:
        spec = paper.PAPER_TASKS.get(name)
        task_source = "folder" if source == "tfds" and spec is not None and spec.tfds_name is None \
            else source  # GTSRB: no tfds builder, read from the image folder
        tasks[name] = paper.load_paper_task(
            name, source=task_source, data_dir=d.data_dir or None, folder=folder, seed=config.seed,
            validation_fraction=d.validation_fraction, validation_cap=d.validation_cap or None,
            tokenizer=tokenizer, max_length=d.max_length, train_size=d.train_size or None,
            test_size=d.test_size or None, image_size=d.image_size or None)
        t = tasks[name]
        log(f"data: {name}: {len(t.train[1])} train / {len(t.validation[1])} validation / "
            f"{len(t.test[1])} test, {t.num_classes} classes")
    return tasks


def _check_data_present(config) -> None:
    """Every tfds dataset of the run is prepared (a disk check only), or the error
    names the command that prepares it."""
    from atm_jax.data import paper, tfds_source

    if config.data.source != "tfds":
        return
    for name in config.tasks:
        spec = paper.PAPER_TASKS[name]
        if spec.tfds_name is not None:
            tfds_source.find_prepared(spec.tfds_name, config.data.data_dir or None, task=name)


def _tokenizer(config, default: str | None):
    """The configured tokenizer (config.data.tokenizer, else the weights' own)."""
    from atm_jax.data import local, text

    if config.data.tokenizer:
        return text.load_tokenizer(config.data.tokenizer)
    if config.data.source == "local" and config.model.name != "clip":
        return local.build_tokenizer()
    return text.load_tokenizer(default) if default else None


def _glyph_tokenizer(class_names):
    """A word-level tokenizer over the local zero-shot prompts, for random-init CLIP."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    words = sorted({w for t in LOCAL_TEMPLATES for w in t.replace("{c}", " ").replace(".", " ").split()}
                   | {c.lower() for c in class_names} | {"."})
    # [PAD], [SOS], [EOS] = 0, 2, 3: the ids `hf_config` gives the tiny CLIP text tower.
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[SOS]", "[EOS]", *words])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[SOS] $A [EOS]", special_tokens=[("[SOS]", vocab["[SOS]"]), ("[EOS]", vocab["[EOS]"])])
    return tokenizer, vocab


def build(config, log) -> Setup:
    """Checks the datasets are prepared, loads tasks and weights, builds the heads."""
    from atm_jax.data import preprocess
    from atm_jax.models import bert, clip, hf, zero_shot

    name = config.model.name
    _check_data_present(config)  # a missing dataset fails before any download or decode
    if name == "clip":
        tasks = _load_tasks(config, None, log)
    cfg, params, info = _weights(config, log)
    notes = [f"Model: {name}, " + (f"weights {info['weights']}" if config.model.weights else
                                    "random init (tiny config): a smoke run, accuracies mean nothing")]
    if name == "clip":
        image_size = clip.vision_settings(cfg)["image_size"]
        vision = clip.vision_model(cfg)

        def apply_fn(backbone, images, train):
            if images.shape[1:3] != (image_size, image_size):
                images = preprocess.resize_center_crop(images, image_size)
            embeds = vision.apply({"params": backbone}, preprocess.normalize(images))
            return embeds / jnp.linalg.norm(embeds, axis=-1, keepdims=True)

        def random_crop(images, key):
            return preprocess.random_resized_crop(images, key, image_size, scale=(0.9, 1.0))

        augment = random_crop if config.data.augment else None

        heads = _zero_shot_heads(config, cfg, params, tasks, log)
        backbone = params["vision"]
        pool = model_pool.load(config, backbone, heads, tasks, log)

        def export(folder, merged):
            hf.export(folder, "clip", cfg, {**params, "vision": merged})

        notes.append("Heads: CLIP zero-shot classifiers from the text tower (prompt templates "
                     "averaged), frozen, never merged; only the image encoder is finetuned and "
                     "merged.")
        return Setup(tasks, apply_fn, backbone, heads, augment=augment, export=export,
                     base_info=info, notes=notes + (pool.notes if pool else []),
                     model_pool=pool.finetuned if pool else None)

    tokenizer = _tokenizer(config, config.model.weights or None)
    tasks = _load_tasks(config, tokenizer, log)
    encoder = bert.encoder(cfg)
    roberta = name == "roberta"

    def apply_fn(backbone, tokens, train):
        ids, mask, types = tokens[:, 0], tokens[:, 1], tokens[:, 2]
        if roberta:  # RoBERTa has a single segment embedding
            types = jnp.zeros_like(types)
        return encoder.apply({"params": backbone}, ids, mask, types)[1]

    width = bert.settings(cfg)["hidden_size"]
    head_key = jax.random.key(config.head_seed)
    heads = {t: zero_shot.glue_head(jax.random.fold_in(head_key, i), width, task.num_classes)
             for i, (t, task) in enumerate(tasks.items())}

    pool = model_pool.load(config, params, heads, tasks, log)
    if pool is not None:  # a checkpoint's own classifier replaces the random head
        heads = pool.heads

    def export(folder, merged):
        hf.export(folder, name, cfg, merged)

    notes.append(f"Heads: frozen random linear heads on the pooled output (seed "
                 f"{config.head_seed}), never merged; max length {config.data.max_length}.")
    return Setup(tasks, apply_fn, params, heads, export=export, base_info=info,
                 notes=notes + (pool.notes if pool else []),
                 model_pool=pool.finetuned if pool else None)


def _zero_shot_heads(config, cfg, params, tasks, log) -> dict:
    from atm_jax.data import paper, text
    from atm_jax.models import clip, zero_shot

    text_tower = clip.text_model(cfg)
    length = min(CLIP_TEXT_LENGTH, clip.text_settings(cfg)["max_position_embeddings"])
    if config.model.weights:
        tokenizer = _tokenizer(config, config.model.weights)
    else:
        names = [c for t in tasks.values() for c in t.class_names]
        tokenizer, vocab = _glyph_tokenizer(names)
        if len(vocab) > clip.text_settings(cfg)["vocab_size"]:
            raise ValueError(f"the local prompt vocabulary ({len(vocab)}) exceeds the tiny "
                             "CLIP's vocab_size")
    encode = jax.jit(lambda ids, mask: text_tower.apply({"params": params["text"]}, ids, mask))

    def tokenize(prompts):
        tokens = text.tokenize(tokenizer, prompts, max_length=length)
        return tokens[:, 0], tokens[:, 1]

    heads = {}
    for name, task in tasks.items():
        spec = paper.PAPER_TASKS.get(name)
        templates = spec.templates if spec is not None and spec.templates else LOCAL_TEMPLATES
        heads[name] = zero_shot.zero_shot_head(encode, tokenize, task.class_names, templates,
                                               params["logit_scale"])
    log(f"heads: zero-shot classifiers for {len(heads)} tasks")
    return heads
