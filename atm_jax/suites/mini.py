"""The mini suite: the embedded CPU default (configs/mini.py).

Four real 28×28 tasks from registry packages (`atm_jax.data.mini`) and a small ViT
the project pretrains itself on font glyphs (`atm_jax.pretrain`; no ViT weights
reach an offline machine). Heads are per task, never merged: frozen random (the
paper's NLP recipe) or trainable.
"""

from __future__ import annotations

import time

import jax
import numpy as np

from atm_jax import schema
from atm_jax.errors import ConfigError
from atm_jax.suites.base import Setup

__all__ = ["validate", "backbone_shapes", "build"]


def validate(config) -> None:
    """The mini suite's own fields: tasks, model, pretraining, split sizes, heads."""
    from atm_jax import data, pretrain
    from atm_jax.models.vit_tiny import vit_from_config

    for task in config.tasks:
        if task not in data.MINI_TASKS:
            raise ConfigError(f"config.tasks has unknown task {task!r}; "
                              f"the mini suite has {list(data.MINI_TASKS)}.")
    name = schema.field(config, "model").get("name", "vit_tiny")
    if name != "vit_tiny":
        raise ConfigError(f"config.model.name={name!r} is not available in the mini suite; "
                          "use 'vit_tiny' (or suite='paper' for clip / bert / roberta).")
    try:
        vit_from_config(config.model)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.model: {e}") from None
    try:
        pretrain.resolve_configs(config.model, config.pretrain)  # checks its optimizer too
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.model / config.pretrain: {e}") from None
    for split in ("train_size", "validation_size", "test_size"):
        schema.positive_int(config, f"data.{split}")
    if config.heads not in schema.HEAD_MODES:
        raise ConfigError(f"config.heads={config.heads!r} must be one of {schema.HEAD_MODES}.")
    schema.check_batch_sizes(config, config.data.train_size, config.data.validation_size)


def backbone_shapes(config):
    """The ViT's params as ShapeDtypeStructs (nothing is initialised)."""
    from atm_jax.models.vit_tiny import vit_from_config

    model = vit_from_config(config.model)
    shapes = jax.eval_shape(model.init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, 28, 28, 1), np.float32))
    return shapes["params"]


def build(config, log) -> Setup:
    """Loads the tasks (fetched and cached on first use) and the pretrained base.

    Under ``config.task_ownership = "per_process"`` (PA-ATM) only this process's
    tasks are loaded (``Setup.tasks`` holds those); every task still gets its head,
    sized from the task registry's class names without opening the data.
    """
    from atm_jax import data, distributed
    from atm_jax.data.mini import TASK_SPECS
    from atm_jax import tree as tree_lib
    from atm_jax.models.heads import init_head
    from atm_jax.models.vit_tiny import vit_from_config
    from atm_jax.pretrain import pretrained_base

    start = time.perf_counter()
    tasks = {}
    for name in distributed.owned_tasks(config.tasks, config.get("task_ownership", "all")):
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
    heads = {name: init_head(jax.random.fold_in(head_key, i), model.width,
                             len(TASK_SPECS[name].class_names))
             for i, name in enumerate(config.tasks)}
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
