"""One experiment from a config: tasks, base, every method, the table and plots.

``run_experiment(config, workdir)`` is what ``python -m atm_jax.main`` calls; it is
a plain function so research code and tests can call it without flags. The
config layout is the one of ``configs/mini.py``; :func:`validate` checks every
field before any data is loaded or any step is compiled.

Data flow: config → tasks (train / validation / test) → pretrained backbone +
per-task heads → references (pretrained heads, linear probe) → one-shot baselines
(finetune every task for the whole budget, merge once per method; also the
individually finetuned models) → ATM methods (K iterations × e epochs) → every
task evaluated after every iteration → metrics.jsonl, results.json, results.md,
plots.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import flax.serialization
import jax
import numpy as np

from atm_jax import atm as atm_lib
from atm_jax import checkpoint as checkpoint_lib
from atm_jax import evaluate as evaluate_lib
from atm_jax import setups
from atm_jax import tree as tree_lib
from atm_jax import files, writers
from atm_jax.errors import CheckpointFormatError, ConfigError
from atm_jax.finetune import Finetuner, OptimizerConfig

__all__ = ["validate", "run_experiment", "method_order", "DISPLAY_ORDER"]

HEAD_MODES = ("frozen_random", "trainable")
REFERENCES = ("pretrained", "linear_probe", "individual")
SPLITS = ("train", "validation")
KINDS = ("one_shot", "atm")
DISPLAY_ORDER = ("task_arithmetic", "ties", "breadcrumbs", "dare", "dare_ties",
                 "ties_atm_code", "breadcrumbs_atm_code", "valft_atm", "atm")
REFERENCE_LABELS = {"pretrained": "pretrained base (no finetuning)",
                    "linear_probe": "linear probe (frozen base)",
                    "individual": "individual finetuned (not merged)"}


def _field(config, path: str):
    node = config
    for part in path.split("."):
        if part not in node:
            raise ConfigError(f"config.{path} is missing.")
        node = node[part]
    return node


def _positive_int(config, path: str) -> int:
    value = _field(config, path)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"config.{path}={value!r} must be a positive integer.")
    return int(value)


RESUME_MODES = ("auto", "force")
SUITES = ("mini", "paper")
_COMMON = ("seed", "suite", "tasks", "data", "model", "heads", "head_seed", "optimizer", "budget",
           "merge_include", "merge_exclude", "references", "methods", "eval_batch_size", "progress",
           "resume", "checkpoint", "save_params")
_TOP_LEVEL = {"mini": _COMMON + ("pretrain",), "paper": _COMMON + ("export_hf",)}
_OPTIMIZER_KEYS = ("name", "learning_rate", "weight_decay", "grad_clip", "batch_size", "schedule",
                   "warmup_steps", "decay_steps")
_SECTIONS = {
    "mini": {"data": ("train_size", "validation_size", "test_size", "cap_to_available"),
             "optimizer": _OPTIMIZER_KEYS, "checkpoint": ("keep",)},
    "paper": {"data": ("source", "data_dir", "folder", "tokenizer", "train_size", "test_size",
                       "validation_fraction", "validation_cap", "image_size", "max_length",
                       "augment"),
              "model": ("name", "weights", "allow_pickle", "init_seed"),
              "optimizer": _OPTIMIZER_KEYS, "checkpoint": ("keep",)},
}
_METHOD_KEYS = ("kind", "merge", "merge_kwargs", "alpha", "iterations", "split")
# Paper suite: which heads each model uses, and which data sources exist.
PAPER_HEADS = {"clip": "zero_shot", "bert": "frozen_random", "roberta": "frozen_random"}
DATA_SOURCES = ("tfds", "folder", "local")


def _check_keys(node, allowed, where: str) -> None:
    """Unknown keys are typos: ``--config.FIELD`` can't add them, but code can."""
    unknown = sorted(set(node.keys()) - set(allowed))
    if unknown:
        raise ConfigError(f"config.{where}{unknown[0]} is not a known field; "
                          f"config.{where or ''}* has {sorted(allowed)}.")


def _integer(config, path: str) -> int:
    value = _field(config, path)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ConfigError(f"config.{path}={value!r} must be an integer >= 0.")
    return int(value)


def method_order(config) -> list[str]:
    """Method names in table order (ml_collections sorts keys, so order is ours)."""
    names = list(config.methods.keys())
    known = [n for n in DISPLAY_ORDER if n in names]
    return known + sorted(n for n in names if n not in DISPLAY_ORDER)


def validate(config) -> None:
    """Checks every field a run uses; raises ConfigError naming the first bad one.

    Cheap: no data is loaded and nothing is compiled, so a typo fails in a second,
    not after an hour of finetuning.
    """
    suite = _field(config, "suite")
    if suite not in SUITES:
        raise ConfigError(f"config.suite={suite!r} must be one of {SUITES}.")
    _check_keys(config, _TOP_LEVEL[suite], "")
    for section, allowed in _SECTIONS[suite].items():
        _check_keys(_field(config, section), allowed, section + ".")
    _integer(config, "seed")
    _integer(config, "head_seed")
    for flag in ("progress", "save_params"):
        if not isinstance(_field(config, flag), bool):
            raise ConfigError(f"config.{flag}={config[flag]!r} must be True or False.")
    if _field(config, "resume") not in RESUME_MODES:
        raise ConfigError(f"config.resume={config.resume!r} must be one of {RESUME_MODES}: 'auto' "
                          "continues a run found in the workdir when its config is the same, "
                          "'force' continues it even when the config differs.")
    keep = _positive_int(config, "checkpoint.keep")
    if keep < 2:
        raise ConfigError(f"config.checkpoint.keep={keep} must be at least 2, so a damaged newest "
                          "checkpoint leaves an older one to resume from.")
    tasks = _field(config, "tasks")
    if isinstance(tasks, str) or not all(isinstance(t, str) for t in tasks):
        raise ConfigError(f"config.tasks={tasks!r} must be a tuple of task names.")
    tasks = tuple(tasks)
    if not tasks:
        raise ConfigError("config.tasks is empty: name at least one task.")
    if len(set(tasks)) != len(tasks):
        raise ConfigError(f"config.tasks={tasks!r} names a task twice.")
    if suite == "mini":
        _validate_mini(config, tasks)
    else:
        _validate_paper(config, tasks)
    budget = _positive_int(config, "budget")
    _positive_int(config, "eval_batch_size")
    for ref in config.references:
        if ref not in REFERENCES:
            raise ConfigError(f"config.references has unknown entry {ref!r}; allowed: {REFERENCES}.")
    try:
        OptimizerConfig(**config.optimizer.to_dict())
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.optimizer: {e}") from None
    _validate_batch_size(config)
    _validate_merge_filter(config)
    if not config.methods:
        raise ConfigError("config.methods is empty: add at least one method.")
    for name in config.methods:
        spec = config.methods[name]
        where = f"methods.{name}"
        if not hasattr(spec, "keys"):
            raise ConfigError(f"config.{where}={spec!r} must be a ConfigDict with kind, merge, alpha.")
        _check_keys(spec, _METHOD_KEYS, where + ".")
        if spec.get("kind") not in KINDS:
            raise ConfigError(f"config.{where}.kind={spec.get('kind')!r} must be one of {KINDS}.")
        for required in ("merge", "alpha"):
            _field(config, f"{where}.{required}")
        try:
            _merge_spec(config, spec)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"config.{where}: {e}") from None
        if spec.kind == "atm":
            iterations = _positive_int(config, f"{where}.iterations")
            split = _field(config, f"{where}.split")
            if split not in SPLITS:
                raise ConfigError(f"config.{where}.split={split!r} must be one of {SPLITS}.")
            if budget % iterations:
                raise ConfigError(
                    f"config.{where}.iterations={iterations} does not divide config.budget={budget}: "
                    "every method gets the same epochs per task, split into equal iterations.")
    if "individual" in config.references and not any(
            config.methods[n].kind == "one_shot" for n in config.methods):
        raise ConfigError("config.references has 'individual' but no one_shot method finetunes "
                          "the individual models; add one or drop the reference.")


def _validate_mini(config, tasks) -> None:
    from atm_jax import data

    for task in tasks:
        if task not in data.MINI_TASKS:
            raise ConfigError(f"config.tasks has unknown task {task!r}; "
                              f"the mini suite has {list(data.MINI_TASKS)}.")
    name = _field(config, "model").get("name", "vit_tiny")
    if name != "vit_tiny":
        raise ConfigError(f"config.model.name={name!r} is not available in the mini suite; "
                          "use 'vit_tiny' (or suite='paper' for clip / bert / roberta).")
    try:
        from atm_jax.models.vit_tiny import vit_from_config

        vit_from_config(config.model)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.model: {e}") from None
    _validate_pretrain(config)
    for split in ("train_size", "validation_size", "test_size"):
        _positive_int(config, f"data.{split}")
    if config.heads not in HEAD_MODES:
        raise ConfigError(f"config.heads={config.heads!r} must be one of {HEAD_MODES}.")


def _validate_paper(config, tasks) -> None:
    from atm_jax.data import local, paper

    name = _field(config, "model.name")
    if name not in PAPER_HEADS:
        raise ConfigError(f"config.model.name={name!r} must be one of {tuple(PAPER_HEADS)}.")
    modality = "image" if name == "clip" else "text"
    source = _field(config, "data.source")
    if source not in DATA_SOURCES:
        raise ConfigError(f"config.data.source={source!r} must be one of {DATA_SOURCES}.")
    if source == "local":
        known = local.IMAGE_TASKS if modality == "image" else local.TEXT_TASKS
    else:
        known = {t: v for t, v in paper.PAPER_TASKS.items() if v.modality == modality}
    for task in tasks:
        if task not in known and not (source == "folder" and modality == "image"):
            raise ConfigError(f"config.tasks has unknown task {task!r} for model {name!r} and "
                              f"data.source={source!r}; known: {sorted(known)}.")
    if config.heads != PAPER_HEADS[name]:
        raise ConfigError(f"config.heads={config.heads!r}: model {name!r} uses "
                          f"{PAPER_HEADS[name]!r} heads (the paper's recipe).")
    for field in ("data.train_size", "data.test_size", "data.validation_cap", "data.image_size",
                  "model.init_seed"):
        _integer(config, field)
    _positive_int(config, "data.max_length")
    fraction = _field(config, "data.validation_fraction")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise ConfigError(f"config.data.validation_fraction={fraction!r} must be in (0, 1).")
    for flag in ("data.augment", "model.allow_pickle", "export_hf"):
        if not isinstance(_field(config, flag), bool):
            raise ConfigError(f"config.{flag}={_field(config, flag)!r} must be True or False.")
    weights = _field(config, "model.weights")
    folder = pathlib.Path(weights).expanduser() if weights else None
    if folder is not None and folder.is_dir() and not (folder / "config.json").is_file():
        raise ConfigError(f"config.model.weights={weights!r} is a folder without config.json; "
                          "point it at a Hugging Face model folder or a hub id.")
    if not weights and source != "local":
        raise ConfigError("config.model.weights is empty (random init) but config.data.source="
                          f"{source!r}: random init is for smoke runs on local data only.")


def _validate_batch_size(config) -> None:
    batch = config.optimizer.batch_size
    train = config.data.train_size
    if train and batch > train:
        raise ConfigError(f"config.optimizer.batch_size={batch} is larger than "
                          f"config.data.train_size={train}: every step would be "
                          "mostly padding. Lower the batch size or raise the train size.")
    validation = config.data.get("validation_size") or config.data.get("validation_cap")
    if validation and batch > validation and any(
            m.kind == "atm" and m.split == "validation" for m in config.methods.values()):
        raise ConfigError(f"config.optimizer.batch_size={batch} is larger than the validation split "
                          f"({validation} examples), which valFT ATM trains on.")


def _backbone_shapes(config):
    """The backbone's params as ShapeDtypeStructs, or None for hub weights."""
    return setups.backbone_shapes(config)


def _validate_merge_filter(config) -> None:
    """Every include/exclude regex must compile and match some backbone leaf: a typo
    would otherwise merge everything, or fail only at the first merge."""
    try:
        tree_lib.path_filter(tuple(config.merge_include) or None,
                             tuple(config.merge_exclude) or None)
    except ValueError as e:
        raise ConfigError(f"config.merge_include / config.merge_exclude: {e}") from None
    shapes = _backbone_shapes(config)
    if shapes is None:  # weights from the hub: checked once they are loaded
        return
    _check_filter_matches(config, shapes)


def _check_filter_matches(config, shapes) -> None:
    include = tuple(config.merge_include) or None
    exclude = tuple(config.merge_exclude) or None
    predicate = tree_lib.path_filter(include, exclude)
    paths = tree_lib.leaf_paths(shapes)
    for field, patterns in (("merge_include", include), ("merge_exclude", exclude)):
        for pattern in patterns or ():
            if not any(tree_lib.path_filter(pattern)(p) for p in paths):
                raise ConfigError(f"config.{field} pattern {pattern!r} matches no backbone leaf; "
                                  f"leaf paths look like {paths[:3]}.")
    if not any(predicate(p) for p in paths):
        raise ConfigError("config.merge_include / config.merge_exclude leave no backbone leaf to merge.")


def _validate_pretrain(config) -> None:
    from atm_jax import pretrain

    try:
        pretrain.resolve_configs(config.model, config.pretrain)  # checks the optimizer too
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.model / config.pretrain: {e}") from None


def _merge_spec(config, spec) -> atm_lib.MergeSpec:
    return atm_lib.MergeSpec(
        name=spec.merge, kwargs=dict(spec.get("merge_kwargs", {}) or {}), alpha=float(spec.alpha),
        include=tuple(config.merge_include) or None, exclude=tuple(config.merge_exclude) or None)


def run_experiment(config, workdir: str | pathlib.Path, *,
                   log: Callable[[str], None] = print) -> dict:
    """Runs every reference and method of ``config``; writes the results to ``workdir``.

    Resumable: a checkpoint is written after every reference, every finished task
    finetune and every merge (``<workdir>/checkpoints``, the newest
    ``config.checkpoint.keep`` kept). Started again on the same workdir, the run
    continues from the newest intact checkpoint and ends with bitwise the params
    and ``metrics.jsonl`` of an uninterrupted run.

    Returns:
      The content of ``results.json``.

    Raises:
      ConfigError: a bad config field, or the workdir holds a run of another
        config (and ``config.resume`` is not "force"), or it is not writable.
      FloatingPointError: a finetune diverged; the message names method, task,
        iteration and step, and the last good checkpoint stays in place.
    """
    validate(config)
    workdir = _writable_workdir(workdir)
    started = time.perf_counter()
    config_json = json.loads(config.to_json())
    ckpt = checkpoint_lib.Checkpointer(workdir / "checkpoints", keep=config.checkpoint.keep, log=log)
    try:
        try:
            restored = ckpt.latest()
        except CheckpointFormatError as e:
            raise ConfigError(str(e)) from None
        if restored is not None:
            _check_resumable(restored.meta["config"], config_json, config.resume, workdir)
            log(f"resuming from checkpoint step {restored.step} in {workdir / 'checkpoints'} "
                f"({_describe(restored.meta)})")
        elif (workdir / "config.json").is_file():
            # No checkpoint, but another run's files: don't overwrite them unasked.
            _check_resumable(json.loads((workdir / "config.json").read_text()), config_json,
                             config.resume, workdir)
        shapes = _backbone_shapes(config)
        if shapes is not None:
            _check_disk_space(workdir, shapes, len(config.tasks), config.checkpoint.keep)
        writers.write_json(workdir / "config.json", config_json)
        metrics = writers.MetricsWriter(workdir / "metrics.jsonl")
        metrics.reset(restored.meta["metrics"] if restored else [])
        s = setups.build(config, log)
        if shapes is None:
            shapes = jax.eval_shape(lambda: s.base)
            _check_filter_matches(config, shapes)
            _check_disk_space(workdir, shapes, len(config.tasks), config.checkpoint.keep)
        run = _Resumable(config, config_json, s, ckpt, metrics, restored, log)
        run.execute()
    finally:
        ckpt.close()
    seconds = time.perf_counter() - started
    return _write_results(config, workdir, s, run, seconds, log)


def _writable_workdir(workdir) -> pathlib.Path:
    """Creates the workdir and proves it writable before any data or compute."""
    workdir = pathlib.Path(workdir)
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / f".write_test_{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"workdir {str(workdir)!r} is not writable ({e.strerror or e}); pass "
                          "--workdir=<a folder you can write>.") from None
    return workdir


def _check_disk_space(workdir: pathlib.Path, base_shapes, num_tasks: int, keep: int) -> None:
    """Fails before training when the checkpoints cannot fit on the workdir's disk.

    Each of the ``keep`` steps (+ one being written) holds a base; the finetunes of
    an unfinished iteration are stored once each (up to one per task, plus one
    being replaced).
    """
    model_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(base_shapes))
    needed = model_bytes * (keep + 1 + num_tasks + 1)
    free = shutil.disk_usage(workdir).free
    if free < needed:
        raise ConfigError(
            f"workdir {str(workdir)!r} has {free / 2**30:.2f} GiB free but the checkpoints need "
            f"about {needed / 2**30:.2f} GiB ({keep} kept + 1 in flight, {num_tasks} finetunes, "
            f"{model_bytes / 2**20:.1f} MiB each); free space, lower config.checkpoint.keep "
            "(at least 2) or use another --workdir.")


_UNCHECKED_FIELDS = ("resume", "progress")


def config_differences(old, new, prefix: str = "") -> list[str]:
    """Dotted fields whose values differ between two config dicts, as "field: old -> new"."""
    out = []
    for name in sorted(set(old) | set(new)):
        path = f"{prefix}{name}"
        if not prefix and name in _UNCHECKED_FIELDS:
            continue
        a, b = old.get(name, "<absent>"), new.get(name, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, path + ".")
        elif a != b:
            out.append(f"{path}: {a!r} -> {b!r}")
    return out


def _check_resumable(saved: dict, current: dict, resume: str, workdir: pathlib.Path) -> None:
    diffs = config_differences(saved, current)
    if not diffs:
        return
    listing = "\n  ".join(diffs)
    if resume != "force":
        raise ConfigError(
            f"workdir {str(workdir)!r} holds a run with a different config:\n  {listing}\n"
            "Use another --workdir for a new run, or pass --config.resume=force to continue "
            "this one with the new values (its results then mix both configs).")


def _describe(meta: Mapping) -> str:
    position, done = meta["position"], meta["done"]
    unit = position.get("unit")
    if unit is None:
        return "after " + (", ".join(done) if done else "nothing") + " finished"
    text = f"in {unit}, after " + (", ".join(done) + " finished" if done else "the start")
    if position.get("iteration"):
        text += f"; {position['iteration']} merge(s) done"
    if position.get("tasks_done"):
        text += f"; {position['tasks_done']} task finetune(s) done since the last merge"
    return text


class _Resumable:
    """The run as a list of units (references, one-shot, each ATM method) with
    checkpoints inside them; restores where a checkpoint left off."""

    def __init__(self, config, config_json, s: setups.Setup, ckpt, metrics, restored, log):
        self.config, self.s, self.ckpt, self.metrics, self.log = config, s, ckpt, metrics, log
        self.config_json = config_json
        self.key = jax.random.key(config.seed)
        self.key_data = np.asarray(jax.random.key_data(self.key))
        self.opt = OptimizerConfig(**config.optimizer.to_dict())
        # A step-level progress bar in a terminal (or when asked); logs stay clean in CI.
        self.finetuner = Finetuner(s.apply_fn, self.opt, train_head=config.heads == "trainable",
                                   progress=bool(config.progress) or sys.stderr.isatty(),
                                   augment=s.augment)
        self.task_names = list(s.tasks)
        if restored is None:
            self.step, self.done, self.rows, self.curves = 0, [], [], {}
            self.timings, self.individual, self.position, self.arrays = {}, None, {}, {}
            self.items = {}
        else:
            m = restored.meta
            if not np.array_equal(np.asarray(restored.state["key"]), self.key_data):
                raise ConfigError("the checkpoint was made with another config.seed (its PRNG key "
                                  "differs); a run cannot change its seed midway, even with "
                                  "resume=force: use a new --workdir.")
            self.step, self.done, self.rows = restored.step, list(m["done"]), list(m["rows"])
            self.curves, self.timings = dict(m["curves"]), dict(m["timings"])
            self.individual, self.position = m["individual"], dict(m["position"])
            self.arrays, self.items = restored.state, restored.items

    # -- checkpoints --------------------------------------------------------------------
    def save(self, position: dict, arrays: Mapping[str, Any] | None = None,
             items: Mapping[str, dict] | None = None) -> None:
        self.step += 1
        meta = {"config": self.config_json, "done": self.done, "rows": self.rows,
                "curves": self.curves, "timings": self.timings, "individual": self.individual,
                "position": position, "metrics": self.metrics.lines}
        meta = json.loads(json.dumps(meta, default=files.jsonable))
        self.ckpt.save(self.step, {"key": self.key_data, **(arrays or {})}, meta, items)

    @staticmethod
    def _item_name(unit: str, iteration: int, task_index: int) -> str:
        return f"{unit}.iteration{iteration}.task{task_index}"

    def _progress_saver(self, unit: str, with_base: bool):
        """Checkpoints a Progress: each finished finetune is written once, as an item."""
        written: dict[str, dict] = {}

        def on_progress(p: atm_lib.Progress):
            names = [self._item_name(unit, p.iteration, i) for i in range(len(p.finetuned))]
            for name, params in zip(names, p.finetuned):
                if name not in written:
                    written[name] = self.ckpt.save_item(name, params)
            arrays = {"finetuned_heads": p.finetuned_heads, "heads": p.heads}
            if with_base:
                arrays["base"] = p.base
            self.save({"unit": unit, "iteration": p.iteration, "tasks_done": len(p.finetuned),
                       "history": p.history, "finetune_metrics": p.finetune_metrics}, arrays,
                      {n: written[n] for n in names})
        return on_progress

    def _restored_progress(self, unit: str, base) -> atm_lib.Progress | None:
        if self.position.get("unit") != unit:
            return None
        a, pos = self.arrays, self.position
        order = lambda d: {t: d[t] for t in self.task_names if t in d}  # noqa: E731
        finetuned = [self.items[self._item_name(unit, pos["iteration"], i)]
                     for i in range(pos["tasks_done"])]
        return atm_lib.Progress(
            iteration=pos["iteration"], base=a.get("base", base), heads=order(a["heads"]),
            history=list(pos["history"]), finetuned=finetuned,
            finetuned_heads=order(a.get("finetuned_heads", {})),
            finetune_metrics=dict(pos["finetune_metrics"]))

    def finish_unit(self, unit: str, params=None) -> None:
        """Marks ``unit`` done (its final params written first) and checkpoints."""
        if params:
            for name, p in params.items():
                writers.write_bytes(self.workdir / "params" / f"{name}.msgpack",
                                    flax.serialization.to_bytes(p))
                if self.config.get("export_hf") and self.s.export and writers.is_writer():
                    folder = self.workdir / "hf" / name
                    self.s.export(folder, p)
                    self.log(f"[{name}] exported as a Hugging Face folder: {folder}")
        self.done.append(unit)
        self.position = {}
        self.save({"unit": None})

    # -- the units ---------------------------------------------------------------------
    @property
    def workdir(self) -> pathlib.Path:
        return self.metrics.path.parent

    def units(self) -> list[str]:
        out = [r for r in ("pretrained", "linear_probe") if r in self.config.references]
        order = method_order(self.config)
        if any(self.config.methods[n].kind == "one_shot" for n in order):
            out.append("one_shot")
        return out + [n for n in order if self.config.methods[n].kind == "atm"]

    def execute(self) -> None:
        for unit in self.units():
            if unit in self.done:
                continue
            t0 = time.perf_counter()
            if unit == "pretrained":
                self.pretrained()
            elif unit == "linear_probe":
                self.linear_probe()
            elif unit == "one_shot":
                self.one_shot()
            else:
                self.atm(unit)
            self.timings[unit] = round(self.timings.get(unit, 0.0) + time.perf_counter() - t0, 1)

    def evaluate(self, params, heads):
        return {t: evaluate_lib.accuracy(self.s.apply_fn, params, h, *self.s.tasks[t].test,
                                         batch_size=self.config.eval_batch_size)
                for t, h in heads.items()}

    def make_finetune(self, split: str):
        def finetune(base, head, task, epochs, task_key):
            images, labels = self.s.tasks[task].split(split)
            return self.finetuner.finetune(base, head, images, labels, epochs=epochs, key=task_key)
        return finetune

    def add_row(self, method, accuracy, epochs, kind):
        self.rows.append({"method": method, "kind": kind, "epochs": epochs,
                          "accuracy": dict(accuracy), "average": evaluate_lib.average(accuracy)})

    def pretrained(self):
        acc = self.evaluate(self.s.base, self.s.heads)
        self.add_row("pretrained", acc, 0, "reference")
        self.metrics({"method": "pretrained", "iteration": 0, "epochs_per_task": 0, "accuracy": acc})
        self.log(f"[pretrained] average accuracy {evaluate_lib.average(acc):.4f}")
        self.finish_unit("pretrained")

    def linear_probe(self):
        budget = self.config.budget
        acc = _linear_probe(self.s, self.opt, budget, self.key, self.config.eval_batch_size)
        self.add_row("linear_probe", acc, budget, "reference")
        self.metrics({"method": "linear_probe", "iteration": 1, "epochs_per_task": budget,
                      "accuracy": acc})
        self.log(f"[linear_probe] average accuracy {evaluate_lib.average(acc):.4f}")
        self.finish_unit("linear_probe")

    def one_shot(self):
        config, budget = self.config, self.config.budget
        names = [n for n in method_order(config) if config.methods[n].kind == "one_shot"]
        merges = {n: _merge_spec(config, config.methods[n]) for n in names}
        out = atm_lib.one_shot(
            self.s.base, self.s.heads, finetune=self.make_finetune("train"), evaluate=self.evaluate,
            epochs=budget, merges=merges, key=self.key, callback=self.metrics, log=self.log,
            start=self._restored_progress("one_shot", self.s.base),
            on_progress=self._progress_saver("one_shot", with_base=False))
        self.individual = out["individual"]
        if "individual" in config.references:
            self.add_row("individual", self.individual, budget, "reference")
        for n in names:
            self.add_row(n, out["merged"][n], budget, "one_shot")
        self.finish_unit("one_shot", out["params"] if config.save_params else None)

    def atm(self, name: str):
        config, spec = self.config, self.config.methods[name]
        base, heads, history = atm_lib.run(
            self.s.base, self.s.heads, finetune=self.make_finetune(spec.split),
            evaluate=self.evaluate, iterations=spec.iterations,
            epochs_per_iteration=config.budget // spec.iterations, merge=_merge_spec(config, spec),
            key=self.key, carry_heads=config.heads == "trainable", callback=self.metrics,
            log=self.log, name=name, start=self._restored_progress(name, self.s.base),
            on_progress=self._progress_saver(name, with_base=True))
        self.curves[name] = history
        self.add_row(name, history[-1]["accuracy"], config.budget, "atm")
        self.finish_unit(name, {name: base} if config.save_params else None)


def _write_results(config, workdir: pathlib.Path, s: setups.Setup, run: _Resumable, seconds: float,
                   log) -> dict:
    rows, curves = run.rows, run.curves
    if run.individual is not None:
        for row in rows:
            row["normalized"] = evaluate_lib.normalized_average(row["accuracy"], run.individual)
    notes = _notes(config, s, run.opt, seconds)
    tasks = list(config.tasks)
    timings = {k: v for k, v in run.timings.items() if k != "pretrained"}
    results = {"tasks": tasks, "rows": rows, "timings_seconds": timings,
               "total_seconds": round(seconds, 1), "base": dict(s.base_info),
               "heads": config.heads, "budget_epochs": config.budget, "notes": notes,
               "curves": {n: [{k: h[k] for k in ("iteration", "accuracy", "average_accuracy")}
                              for h in hist] for n, hist in curves.items()},
               "cosine_last_iteration": {n: hist[-1]["merge"]["cosine"] for n, hist in curves.items()
                                         if "merge" in hist[-1]}}
    writers.write_json(workdir / "results.json", results)
    labelled = [dict(r, method=REFERENCE_LABELS.get(r["method"], r["method"])) for r in rows]
    table = writers.results_markdown(labelled, tasks, title=f"{config.suite}: test accuracy (%)",
                                     notes=notes)
    writers.write_text(workdir / "results.md", table)
    plots = writers.plot_results(workdir, rows, curves, tasks)
    log("\n" + table)
    log(f"wrote {workdir}/results.md, results.json, metrics.jsonl, config.json and "
        f"{len(plots)} plots in {seconds:.0f}s")
    return results


def _linear_probe(s: setups.Setup, opt: OptimizerConfig, epochs: int, key, eval_batch_size) -> dict:
    """Head-only training on frozen-base features: same optimizer, same budget.

    The features are computed once, so the probe costs far less than a finetune;
    its training order uses the same per-task keys as every other method.
    """
    features_fn = jax.jit(lambda p, x: s.apply_fn(p, x, False))

    def features(images):
        return np.concatenate([np.asarray(features_fn(s.base, images[i:i + 500]))
                               for i in range(0, len(images), 500)])

    def identity(_, f, train):  # a probe's "backbone" is the precomputed features
        return f

    probe = Finetuner(identity, opt, train_head=True)
    acc = {}
    for i, (name, task) in enumerate(s.tasks.items()):
        train_x, train_y = task.train
        _, head, _ = probe.finetune({}, s.heads[name], features(train_x), train_y, epochs=epochs,
                                    key=atm_lib.task_key(key, 0, i))
        acc[name] = evaluate_lib.accuracy(identity, {}, head, features(task.test[0]), task.test[1],
                                          batch_size=eval_batch_size)
    return acc


def _notes(config, s: setups.Setup, opt: OptimizerConfig, seconds: float) -> list[str]:
    notes = list(s.notes) + [
        f"Budget: {config.budget} epochs per task for every method; optimizer "
        f"{opt.name} lr {opt.learning_rate}, batch {opt.batch_size}, grad clip {opt.grad_clip} "
        "(same for all).",
    ]
    for name in method_order(config):
        spec = config.methods[name]
        if spec.kind == "atm" and spec.split == "validation":
            sizes = ", ".join(f"{t} {len(task.validation[1])}" for t, task in s.tasks.items())
            notes.append(
                f"{name}: trains only on the validation split ({sizes} examples) from the "
                f"pretrained base, {spec.iterations} iterations × {config.budget // spec.iterations} "
                "epoch(s): the same epochs but far fewer steps than training-split methods (the "
                "authors' final code instead starts valFT from task arithmetic).")
    notes += [
        "Normalized = accuracy ÷ the individually finetuned model's accuracy, averaged over tasks.",
        f"Seed {config.seed}; wall time {seconds:.0f}s.",
    ]
    return notes
