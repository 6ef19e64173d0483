"""What a run trains: tasks, the backbone to merge, its forward pass and the heads.

Two suites share one experiment loop (`atm_jax.experiment`):

* ``suite="mini"``: the embedded CPU default (configs/mini.py): 28×28 real tasks
  from registry packages and a small ViT the project pretrains itself.
* ``suite="paper"``: the paper's setups (configs/vit.py, roberta.py, bert.py):
  CLIP ViT-B/16 with zero-shot heads on seven image tasks, or BERT / RoBERTa with
  frozen random heads on seven GLUE tasks. Weights come from Hugging Face
  safetensors (a local folder or a hub id); data from tfds, an image folder, or
  (``data.source="local"``) tiny generated tasks for CPU smoke runs.

`build(config, log)` returns a `Setup`; nothing here trains or merges.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any

__all__ = ["Setup", "build", "backbone_shapes", "MODEL_NAMES", "LOCAL_TEMPLATES"]

MODEL_NAMES = {"mini": ("vit_tiny",), "paper": ("clip", "bert", "roberta")}
# Zero-shot prompts of the generated glyph tasks (the paper's tasks carry their own).
LOCAL_TEMPLATES = ("a photo of the character {c}.", "a rendering of {c}.", "the glyph {c}.")
CLIP_TEXT_LENGTH = 77  # OpenAI CLIP's context length


@dataclasses.dataclass
class Setup:
    """Everything the experiment loop needs from a suite.

    Attributes:
      tasks: ``{name: TaskData}`` in config order.
      apply_fn: ``(backbone, inputs, train) -> features [B, F]``.
      base: the pretrained backbone (the pytree that is finetuned and merged).
      heads: ``{task: {"kernel": [F, C], "bias": [C]}}``.
      augment: ``(inputs, key) -> inputs`` for training batches, or None.
      export: ``(folder, backbone) -> None`` writing a Hugging Face folder, or None.
      base_info: facts about the base for results.json.
      notes: lines for the results table.
    """
    tasks: dict
    apply_fn: Callable
    base: PyTree
    heads: dict
    augment: Callable | None = None
    export: Callable[[pathlib.Path, PyTree], None] | None = None
    base_info: dict = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)


def build(config, log: Callable[[str], None]) -> Setup:
    """The `Setup` of ``config.suite``."""
    return _mini(config, log) if config.suite == "mini" else _paper(config, log)


# -- the paper's setups ------------------------------------------------------------------

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
    if config.suite == "mini":
        from atm_jax.models.vit_tiny import vit_from_config

        model = vit_from_config(config.model)
        shapes = jax.eval_shape(model.init, jax.random.key(0),
                                jax.ShapeDtypeStruct((1, 28, 28, 1), np.float32))
        return shapes["params"]
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
    from atm_jax.errors import ConfigError

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


def _cache() -> pathlib.Path:
    from atm_jax.data import sources

    return sources.cache_dir()


def _local_root(kind: str) -> pathlib.Path:
    return _cache() / "local" / kind


def _load_tasks(config, tokenizer, log) -> dict:
    from atm_jax.data import local, paper

    d = config.data
    source, folder = d.source, d.folder or str(_cache() / "folders")
    if source == "local":
        if config.model.name == "clip":
            folder = local.make_image_folder(_local_root("images"), tasks=tuple(config.tasks))
            source = "folder"
        else:
            folder = local.make_text_tasks(_local_root("text"), tasks=tuple(config.tasks))
            source = "tsv"
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


def _paper(config, log) -> Setup:
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

        def export(folder, merged):
            hf.export(folder, "clip", cfg, {**params, "vision": merged})

        notes.append("Heads: CLIP zero-shot classifiers from the text tower (prompt templates "
                     "averaged), frozen, never merged; only the image encoder is finetuned and "
                     "merged.")
        return Setup(tasks, apply_fn, backbone, heads, augment=augment, export=export,
                     base_info=info, notes=notes)

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

    def export(folder, merged):
        hf.export(folder, name, cfg, merged)

    notes.append(f"Heads: frozen random linear heads on the pooled output (seed "
                 f"{config.head_seed}), never merged; max length {config.data.max_length}.")
    return Setup(tasks, apply_fn, params, heads, export=export, base_info=info, notes=notes)


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


# -- the mini suite ----------------------------------------------------------------------

def _mini(config, log) -> Setup:
    import time

    from atm_jax import data
    from atm_jax import tree as tree_lib
    from atm_jax.models.heads import init_head
    from atm_jax.models.vit_tiny import vit_from_config
    from atm_jax.pretrain import pretrained_base

    start = time.perf_counter()
    tasks = {}
    for name in config.tasks:
        tasks[name] = data.load_task(name, train_size=config.data.train_size,
                                     validation_size=config.data.validation_size,
                                     test_size=config.data.test_size, seed=config.seed,
                                     cap=config.data.get("cap_to_available", False))
    log(f"data: {len(tasks)} tasks loaded in {time.perf_counter() - start:.1f}s: "
        + ", ".join(f"{n} ({len(t.train[1])}/{len(t.validation[1])}/{len(t.test[1])}, "
                    f"{t.num_classes} classes)" for n, t in tasks.items()))
    base, base_info = pretrained_base(config.model, config.pretrain, log=log)
    model = vit_from_config(config.model)

    def apply_fn(params, images, train):
        return model.apply({"params": params}, images, train=train)

    head_key = jax.random.key(config.head_seed)
    heads = {name: init_head(jax.random.fold_in(head_key, i), model.width, t.num_classes)
             for i, (name, t) in enumerate(tasks.items())}
    resolved = base_info.get("config", {})
    m, pre = resolved.get("model", {}), resolved.get("pretrain", {})
    acc = base_info.get("held_out_accuracy")
    notes = [
        f"Base: a {tree_lib.num_params(base) / 1e6:.2f}M-parameter ViT (patch "
        f"{m.get('patch_size')}, width {m.get('width')}, depth {m.get('depth')}) "
        f"pretrained by this project on {pre.get('num_images')} rendered font glyphs "
        f"(62 classes, {pre.get('epochs')} epochs"
        + (f", {100 * acc:.1f}% held-out glyph accuracy" if acc is not None else "")
        + "); no public ViT weights were used.",
        f"Heads: {config.heads.replace('_', ' ')} per task, never merged.",
    ]
    keep = ("held_out_accuracy", "seconds", "steps", "images", "from_cache", "path")
    return Setup(tasks, apply_fn, base, heads,
                 base_info={k: base_info[k] for k in keep if k in base_info}, notes=notes)
