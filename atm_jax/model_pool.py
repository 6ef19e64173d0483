"""Finetuned pools: one finetuned checkpoint per task instead of the one-shot finetunes.

``config.model_pool`` (configs/vit.py, bert.py, roberta.py) names one Hugging Face
folder or hub id per task, as a template or as a mapping:

* ``"tanganke/clip-vit-base-patch16_{task}"`` or ``"/ckpts/{task}"``: ``{task}`` is
  replaced by each name of ``config.tasks``;
* ``{"mnist": "/ckpts/mnist", "svhn": "org/svhn", ...}``: exactly the tasks of
  ``config.tasks``.

The "individual" and one-shot rows then evaluate and merge these checkpoints against
the base (``config.model.weights``). The task vectors are checkpoint − base, and no
task is finetuned. Rows that would train are refused: ATM methods and the linear
probe. Their finetunes would not be the pool's, so one table would compare two sets
of finetunes. ``configs/vit.py:pool`` keeps only the rows that train nothing
(`atm_jax.recipes.pool_rows`).

What a checkpoint may be:

* CLIP: a ``CLIPModel`` folder, or a vision tower alone (``CLIPVisionModel`` /
  ``CLIPVisionModelWithProjection``; FusionBench publishes its task checkpoints as
  ``CLIPVisionModel``). Only the image encoder is read. A tower without
  ``visual_projection`` keeps the base's projection, as FusionBench's classifier does.
  The heads stay the zero-shot heads built from the base's text tower.
* BERT / RoBERTa: a base-model or task-model folder (tensors under ``bert.`` /
  ``roberta.`` are found). A ``BertForSequenceClassification`` head (``classifier.weight``
  [C, H] and ``classifier.bias``, one linear layer on the pooled output) becomes the
  task's frozen head, for every row. Without one the task keeps the recipe's frozen
  random head, so the checkpoint must have been finetuned with that head.

Every tensor is checked against the base's shapes before anything is evaluated. The
errors name the task, the tensor and the fix.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from atm_jax.errors import ConfigError, HubUnavailableError, UnsafeCheckpointError
from atm_jax.errors import WeightsMismatchError

__all__ = ["TASK", "Pool", "sources", "check", "load", "finetuned_state"]

TASK = "{task}"  # the placeholder of a template pool
# Leaves a CLIP vision tower may lack (CLIPVisionModel has no projection): the base's.
CLIP_OPTIONAL = ("visual_projection",)
CLIP_TYPES = ("clip", "clip_vision_model")
CLIP_TOWER, CLIP_ANCHOR = "vision_model.", "embeddings.patch_embedding.weight"
# BertForSequenceClassification's head: one linear layer on the pooled output.
HEAD_TENSORS = ("classifier.weight", "classifier.bias")


@dataclasses.dataclass(frozen=True)
class Pool:
    """A loaded pool.

    Attributes:
      finetuned: ``{task: backbone}`` in ``config.tasks`` order, float32, shaped like
        the base.
      heads: ``{task: head}``: the checkpoint's classifier where it has one (text
        models), else the suite's head.
      notes: lines for the results table.
    """
    finetuned: dict
    heads: dict
    notes: list[str]


def sources(config) -> dict[str, str] | None:
    """``{task: folder or hub id}`` of ``config.model_pool`` in ``config.tasks`` order,
    or None when no pool is set (None or an empty value)."""
    pool = config.get("model_pool")
    if pool is None or (isinstance(pool, str) and not pool) or \
            (hasattr(pool, "items") and not len(pool)):
        return None
    tasks = [str(t) for t in config.tasks]
    example = "{'%s': '/path/to/%s', ...}" % (tasks[0], tasks[0]) if tasks else "{...}"
    if isinstance(pool, (str, os.PathLike)):
        pool = os.fspath(pool)
        if TASK not in pool:
            raise ConfigError(
                f"config.model_pool={pool!r} names no task: give a template with {TASK} (e.g. "
                f"'/ckpts/{TASK}' or 'org/model_{TASK}') or a mapping {example} of every task.")
        try:
            out = {t: pool.format(task=t) for t in tasks}
        except (KeyError, IndexError, ValueError) as e:
            raise ConfigError(f"config.model_pool={pool!r}: {TASK} is the only placeholder a "
                              f"template may hold ({type(e).__name__}: {e}).") from None
    elif hasattr(pool, "items"):
        given = {str(k): v for k, v in pool.items()}
        missing = [t for t in tasks if t not in given]
        if missing:
            raise ConfigError(
                f"config.model_pool has no checkpoint for task(s) {missing} of config.tasks: "
                f"add them ({example}), or drop them from config.tasks.")
        extra = [k for k in given if k not in tasks]
        if extra:
            raise ConfigError(f"config.model_pool names task(s) {extra} that config.tasks "
                              f"{tuple(tasks)} does not have (a typo?).")
        out = {t: given[t] for t in tasks}
    else:
        raise ConfigError(f"config.model_pool={pool!r} must be a template with {TASK} or a "
                          f"mapping {example}, not a {type(pool).__name__}.")
    for task, source in out.items():
        if not isinstance(source, (str, os.PathLike)) or not os.fspath(source):
            raise ConfigError(f"config.model_pool: task {task!r} has {source!r}; give a folder "
                              "or a Hugging Face hub id.")
    return {t: os.fspath(s) for t, s in out.items()}


def _looks_local(source: str) -> bool:
    # The rule of `atm_jax.models.hf.load`: "org/name" is a hub id, anything else a path.
    return pathlib.Path(source).expanduser().exists() or source.startswith((".", "/", "~")) \
        or source.count("/") != 1


def check(config) -> None:
    """The pool's form, its local folders, and no row that trains; loads nothing.

    Raises:
      ConfigError: naming the field, the task and the fix.
    """
    pool = sources(config)
    if pool is None:
        return
    training = [n for n in config.methods if config.methods[n].kind == "atm"]
    training += ["linear_probe (config.references)"] * ("linear_probe" in config.references)
    if training:
        raise ConfigError(
            f"config.model_pool evaluates finetuned checkpoints without training, but "
            f"{', '.join(training)} would train: ATM's finetunes would be this run's, not the "
            "pool's. Use the config's ':pool' argument (e.g. --config=configs/vit.py:pool), which "
            "keeps only the rows that train nothing; run ATM in another workdir without "
            "config.model_pool.")
    for task, source in pool.items():
        if not _looks_local(source):
            continue  # a hub id: fetched (or found in the cache) when the suite builds
        folder = pathlib.Path(source).expanduser()
        if not (folder / "config.json").is_file():
            what = "is a folder without config.json" if folder.is_dir() else "is not a folder"
            raise ConfigError(f"config.model_pool: task {task!r}: {source} {what}; give a "
                              "Hugging Face model folder (config.json + model.safetensors) or a "
                              "hub id 'org/name'.")


def _read(task: str, source: str, allow_pickle: bool):
    from atm_jax.models import hf

    try:
        return hf.read_folder(source, allow_pickle=allow_pickle)
    except HubUnavailableError as e:
        raise HubUnavailableError(
            f"config.model_pool: task {task!r}: {e}\nThen point the pool at the folders: "
            f"--config.model_pool='/path/to/{TASK}' or a mapping of every task.") from None
    except UnsafeCheckpointError as e:
        raise UnsafeCheckpointError(f"config.model_pool: task {task!r}: {e}\nOn the command "
                                    "line: --config.model.allow_pickle=True.") from None
    except FileNotFoundError as e:
        raise ConfigError(f"config.model_pool: task {task!r}: {e}") from None


def _mapped(task: str, source: str, family: str, tensors: Mapping[str, np.ndarray], base, *,
            root: tuple[str, ...] = (), optional: tuple[str, ...] = (), fix: str = ""):
    """The checkpoint's tensors as a pytree shaped like ``base`` (HF layouts transposed),
    and the HF names of the ``optional`` leaves it lacked (taken from ``base``)."""
    from atm_jax.models import hf

    prefix = hf.task_prefix(family, tensors)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(base)
    out, kept, missing, mismatched = [], [], [], []
    for keys, leaf in leaves:
        path = tuple(str(k.key) for k in keys)
        name, transform = hf.hf_name(family, root + path)
        tensor = tensors.get(prefix + name)
        if tensor is None:
            if path[0] in optional:
                kept.append(name)
                out.append(np.asarray(leaf))
            else:
                missing.append(prefix + name)
            continue
        want = tuple(transform.to_hf(np.broadcast_to(np.float32(0), np.shape(leaf))).shape)
        if tuple(tensor.shape) != want:
            mismatched.append(f"{prefix + name}: the checkpoint has {tuple(tensor.shape)}, "
                              f"the base {want}")
            continue
        out.append(np.array(transform.from_hf(np.asarray(tensor, np.float32)), np.float32))
    if mismatched:
        raise WeightsMismatchError(
            f"config.model_pool: task {task!r} ({source}): {len(mismatched)} tensor(s) do not "
            f"have the base's shapes:\n  " + "\n  ".join(mismatched[:20]) +
            f"\nThe pool must hold finetunes of config.model.weights (same architecture and "
            f"size){fix}.")
    if missing:
        raise WeightsMismatchError(
            f"config.model_pool: task {task!r} ({source}): {len(missing)} tensor(s) of the "
            "base are missing" + (f" (looked under the prefix {prefix!r})" if prefix else "") +
            ":\n  " + "\n  ".join(missing[:20]) +
            ("\nThe heads read the pooled output, so a checkpoint saved without its pooler "
             "cannot stand in for a finetune here." if any(".pooler." in f".{m}" for m in missing)
             else "\nGive a folder of the base model's family with every tensor."))
    return jax.tree_util.tree_unflatten(treedef, out), kept


def _tower_names(tensors: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
    """A vision tower's tensors under ``vision_model.``: transformers 5 saves a
    ``CLIPVisionModel`` without that prefix (transformers 4, FusionBench's, with it)."""
    if CLIP_TOWER + CLIP_ANCHOR in tensors or CLIP_ANCHOR not in tensors:
        return tensors
    return {n if n.startswith("visual_projection.") else CLIP_TOWER + n: t
            for n, t in tensors.items()}


def _text_head(task: str, source: str, tensors: Mapping[str, np.ndarray], head,
               num_classes: int):
    """The checkpoint's ``BertForSequenceClassification`` head as ours, or None."""
    other = sorted(n for n in tensors if n.startswith("classifier.") and n not in HEAD_TENSORS)
    if other:
        raise WeightsMismatchError(
            f"config.model_pool: task {task!r} ({source}): its classification head "
            f"({', '.join(other[:4])}) is not one linear layer on the pooled output (RoBERTa's "
            "dense + out_proj on the first token is not), which is what this suite's heads are. "
            "Save the encoder alone (it then keeps the recipe's frozen random head) or a "
            "BertForSequenceClassification-style head (classifier.weight, classifier.bias).")
    weight, bias = (tensors.get(n) for n in HEAD_TENSORS)
    if weight is None:
        return None
    width = int(np.shape(head["kernel"])[0])
    bias = np.zeros((num_classes,), np.float32) if bias is None else bias
    if tuple(weight.shape) != (num_classes, width) or tuple(bias.shape) != (num_classes,):
        raise WeightsMismatchError(
            f"config.model_pool: task {task!r} ({source}): classifier.weight is "
            f"{tuple(weight.shape)} and classifier.bias {tuple(bias.shape)}, but the task has "
            f"{num_classes} classes on {width}-wide pooled features ([{num_classes}, {width}] "
            f"and [{num_classes}]): this checkpoint was finetuned for another label set.")
    return {"kernel": np.array(np.asarray(weight, np.float32).T),
            "bias": np.array(bias, np.float32)}


def load(config, base, heads: Mapping[str, Any], tasks: Mapping[str, Any],
         log: Callable[[str], None]) -> Pool | None:
    """Reads every task's checkpoint of ``config.model_pool`` (None when unset).

    Args:
      config: the run's config (``model.name``, ``model.allow_pickle``, ``model_pool``).
      base: the pretrained backbone the pool's checkpoints are finetunes of (CLIP: the
        vision tower ``params["vision"]``; BERT / RoBERTa: the encoder).
      heads: the suite's ``{task: head}``.
      tasks: ``{task: TaskData}`` (class counts for the text heads).
      log: progress lines.

    Raises:
      WeightsMismatchError: a checkpoint of another model type, or tensors missing or
        shaped unlike the base's (the message names the task and the tensors).
      HubUnavailableError: a hub id could not be fetched (offline: the download command).
    """
    pool = sources(config)
    if pool is None:
        return None
    family = config.model.name
    finetuned, out_heads, projection, own_heads = {}, dict(heads), [], []
    for task, source in pool.items():
        _, hf_config, tensors = _read(task, source, config.model.allow_pickle)
        kind = hf_config.get("model_type")
        if family == "clip":
            if kind not in CLIP_TYPES:
                raise WeightsMismatchError(
                    f"config.model_pool: task {task!r} ({source}) holds a {kind!r} model; a CLIP "
                    f"pool takes CLIPModel or CLIPVisionModel folders (model_type {CLIP_TYPES}).")
            tensors = _tower_names(tensors)
            finetuned[task], kept = _mapped(
                task, source, "clip", tensors, base, root=("vision",), optional=CLIP_OPTIONAL,
                fix=" (ViT-B/32 task checkpoints go with config.model.weights="
                    "'openai/clip-vit-base-patch32')")
            projection += [task] if kept else []
        else:
            if kind != family:
                raise WeightsMismatchError(
                    f"config.model_pool: task {task!r} ({source}) holds a {kind!r} model but "
                    f"config.model.name={family!r}.")
            finetuned[task], _ = _mapped(task, source, family, tensors, base)
            head = _text_head(task, source, tensors, heads[task], tasks[task].num_classes)
            if head is not None:
                out_heads[task] = head
                own_heads.append(task)
        log(f"model pool: {task} from {source}")
    notes = [f"Finetuned models: config.model_pool ({len(pool)} checkpoints, e.g. "
             f"{next(iter(pool.values()))}); the individual and one-shot rows evaluate and merge "
             "them, nothing was finetuned in this run (epochs/task 0)."]
    if projection:
        notes.append(f"Vision towers without visual_projection ({', '.join(projection)}): the "
                     "base's projection is used (its task vector is zero), as FusionBench's "
                     "classifier does.")
    if family != "clip":
        keep = [t for t in pool if t not in own_heads]
        notes.append("Heads: " + "; ".join(
            ([f"the checkpoints' own classifier for {', '.join(own_heads)}"] if own_heads else [])
            + ([f"the recipe's frozen random head for {', '.join(keep)} (no classifier in the "
                "checkpoint)"] if keep else [])) + ".")
    for line in notes[1:]:
        log(f"model pool: {line}")
    return Pool(finetuned, out_heads, notes)


def finetuned_state(state, finetuned: Mapping[str, Any]):
    """An `atm.State` of the one-shot unit with the pool as its finetuned models, as
    if every task had been finetuned (each with the state's head)."""
    return dataclasses.replace(state, finetuned=tuple(finetuned[t] for t in state.tasks),
                               finetuned_heads=dict(state.heads), finetune_metrics={})
