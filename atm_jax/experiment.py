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

import dataclasses
import json
import pathlib
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from atm_jax import atm as atm_lib
from atm_jax import evaluate as evaluate_lib
from atm_jax import merge as merge_lib
from atm_jax import tree as tree_lib
from atm_jax import writers
from atm_jax.finetune import Finetuner, OptimizerConfig
from atm_jax.models.heads import init_head

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


class ConfigError(ValueError):
    """A config field has a bad value; the message names the field."""


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
    from atm_jax import data  # the registry of task names

    tasks = tuple(_field(config, "tasks"))
    if not tasks:
        raise ConfigError("config.tasks is empty: name at least one task.")
    if len(set(tasks)) != len(tasks):
        raise ConfigError(f"config.tasks={tasks!r} names a task twice.")
    if _field(config, "suite") != "mini":
        raise ConfigError(f"config.suite={config.suite!r} is not supported yet; use 'mini'.")
    for task in tasks:
        if task not in data.MINI_TASKS:
            raise ConfigError(f"config.tasks has unknown task {task!r}; "
                              f"the mini suite has {list(data.MINI_TASKS)}.")
    _validate_pretrain(config)
    for split in ("train_size", "validation_size", "test_size"):
        _positive_int(config, f"data.{split}")
    budget = _positive_int(config, "budget")
    _positive_int(config, "eval_batch_size")
    if config.heads not in HEAD_MODES:
        raise ConfigError(f"config.heads={config.heads!r} must be one of {HEAD_MODES}.")
    for ref in config.references:
        if ref not in REFERENCES:
            raise ConfigError(f"config.references has unknown entry {ref!r}; allowed: {REFERENCES}.")
    try:
        OptimizerConfig(**config.optimizer.to_dict())
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.optimizer: {e}") from None
    if config.optimizer.batch_size > config.data.validation_size and any(
            m.kind == "atm" and m.split == "validation" for m in config.methods.values()):
        raise ConfigError(f"config.optimizer.batch_size={config.optimizer.batch_size} is larger than "
                          f"config.data.validation_size={config.data.validation_size}, which "
                          "valFT ATM trains on.")
    _validate_merge_filter(config)
    if not config.methods:
        raise ConfigError("config.methods is empty: add at least one method.")
    for name in config.methods:
        spec = config.methods[name]
        where = f"methods.{name}"
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


def _model(config):
    from atm_jax.models.vit_tiny import vit_from_config

    name = _field(config, "model").get("name", "vit_tiny")
    if name != "vit_tiny":
        raise ConfigError(f"config.model.name={name!r} is not available in the mini suite; "
                          "use 'vit_tiny'.")
    try:
        return vit_from_config(config.model)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.model: {e}") from None


def _validate_merge_filter(config) -> None:
    """Every include/exclude regex must compile and match some backbone leaf: a typo
    would otherwise merge everything, or fail only at the first merge."""
    include = tuple(config.merge_include) or None
    exclude = tuple(config.merge_exclude) or None
    try:
        predicate = tree_lib.path_filter(include, exclude)
    except ValueError as e:
        raise ConfigError(f"config.merge_include / config.merge_exclude: {e}") from None
    model = _model(config)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 28, 28, 1), np.float32))
    paths = tree_lib.leaf_paths(shapes["params"])
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
        resolved = pretrain.resolve_configs(config.model, config.pretrain)["pretrain"]
        steps = resolved["epochs"] * -(-resolved["num_images"] // resolved["batch_size"])
        pretrain._optimizer_config(resolved, steps)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.model / config.pretrain: {e}") from None


def _merge_spec(config, spec) -> atm_lib.MergeSpec:
    return atm_lib.MergeSpec(
        name=spec.merge, kwargs=dict(spec.get("merge_kwargs", {}) or {}), alpha=float(spec.alpha),
        include=tuple(config.merge_include) or None, exclude=tuple(config.merge_exclude) or None)


@dataclasses.dataclass
class _Setup:
    tasks: dict
    apply_fn: Callable
    base: Any
    heads: dict
    base_info: dict
    width: int


def _setup(config, log) -> _Setup:
    from atm_jax import data
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
    model = _model(config)

    def apply_fn(params, images, train):
        return model.apply({"params": params}, images, train=train)

    head_key = jax.random.key(config.head_seed)
    heads = {name: init_head(jax.random.fold_in(head_key, i), model.width, t.num_classes)
             for i, (name, t) in enumerate(tasks.items())}
    return _Setup(tasks, apply_fn, base, heads, base_info, model.width)


def run_experiment(config, workdir: str | pathlib.Path, *,
                   log: Callable[[str], None] = print) -> dict:
    """Runs every reference and method of ``config``; writes the results to ``workdir``.

    Returns:
      The content of ``results.json``.
    """
    validate(config)
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    writers.write_json(workdir / "config.json", json.loads(config.to_json()))
    metrics_path = workdir / "metrics.jsonl"
    if writers.is_writer():
        metrics_path.unlink(missing_ok=True)  # a fresh run; resume is not supported yet
    metrics = writers.MetricsWriter(metrics_path)
    started = time.perf_counter()

    s = _setup(config, log)
    key = jax.random.key(config.seed)
    opt = OptimizerConfig(**config.optimizer.to_dict())
    # A step-level progress bar in a terminal (or when asked); logs stay clean in CI.
    finetuner = Finetuner(s.apply_fn, opt, train_head=config.heads == "trainable",
                          progress=bool(config.progress) or sys.stderr.isatty())

    def make_finetune(split: str):
        def finetune(base, head, task, epochs, task_key):
            images, labels = s.tasks[task].split(split)
            return finetuner.finetune(base, head, images, labels, epochs=epochs, key=task_key)
        return finetune

    def evaluate(params, heads):
        return {t: evaluate_lib.accuracy(s.apply_fn, params, h, *s.tasks[t].test,
                                         batch_size=config.eval_batch_size)
                for t, h in heads.items()}

    rows: list[dict] = []
    curves: dict[str, list[dict]] = {}
    timings: dict[str, float] = {}
    budget = config.budget

    def add_row(method, accuracy, epochs, kind):
        rows.append({"method": method, "kind": kind, "epochs": epochs,
                     "accuracy": dict(accuracy),
                     "average": evaluate_lib.average(accuracy)})

    if "pretrained" in config.references:
        acc = evaluate(s.base, s.heads)
        add_row("pretrained", acc, 0, "reference")
        metrics({"method": "pretrained", "iteration": 0, "epochs_per_task": 0, "accuracy": acc})
        log(f"[pretrained] average accuracy {evaluate_lib.average(acc):.4f}")
    if "linear_probe" in config.references:
        t0 = time.perf_counter()
        acc = _linear_probe(s, opt, budget, key, config.eval_batch_size)
        timings["linear_probe"] = time.perf_counter() - t0
        add_row("linear_probe", acc, budget, "reference")
        metrics({"method": "linear_probe", "iteration": 1, "epochs_per_task": budget,
                 "accuracy": acc})
        log(f"[linear_probe] average accuracy {evaluate_lib.average(acc):.4f}")

    order = method_order(config)
    one_shot_names = [n for n in order if config.methods[n].kind == "one_shot"]
    individual = None
    if one_shot_names:
        t0 = time.perf_counter()
        merges = {n: _merge_spec(config, config.methods[n]) for n in one_shot_names}
        out = atm_lib.one_shot(s.base, s.heads, finetune=make_finetune("train"), evaluate=evaluate,
                               epochs=budget, merges=merges, key=key, callback=metrics, log=log)
        timings["one_shot"] = time.perf_counter() - t0
        individual = out["individual"]
        if "individual" in config.references:
            add_row("individual", individual, budget, "reference")
        for n in one_shot_names:
            add_row(n, out["merged"][n], budget, "one_shot")

    for n in order:
        spec = config.methods[n]
        if spec.kind != "atm":
            continue
        t0 = time.perf_counter()
        _, _, history = atm_lib.run(
            s.base, s.heads, finetune=make_finetune(spec.split), evaluate=evaluate,
            iterations=spec.iterations, epochs_per_iteration=budget // spec.iterations,
            merge=_merge_spec(config, spec), key=key, carry_heads=config.heads == "trainable",
            callback=metrics, log=log, name=n)
        timings[n] = time.perf_counter() - t0
        curves[n] = history
        add_row(n, history[-1]["accuracy"], budget, "atm")

    if individual is not None:
        for row in rows:
            row["normalized"] = evaluate_lib.normalized_average(row["accuracy"], individual)
    seconds = time.perf_counter() - started
    notes = _notes(config, s, opt, seconds)
    tasks = list(config.tasks)
    results = {"tasks": tasks, "rows": rows, "timings_seconds": {k: round(v, 1) for k, v in timings.items()},
               "total_seconds": round(seconds, 1), "base": _base_summary(s.base_info),
               "heads": config.heads, "budget_epochs": budget, "notes": notes,
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


def _linear_probe(s: _Setup, opt: OptimizerConfig, epochs: int, key, eval_batch_size) -> dict:
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


def _base_summary(info: Mapping) -> dict:
    keep = ("held_out_accuracy", "seconds", "steps", "images", "from_cache", "path")
    return {k: info[k] for k in keep if k in info}


def _notes(config, s: _Setup, opt: OptimizerConfig, seconds: float) -> list[str]:
    resolved = s.base_info.get("config", {})
    model, pre = resolved.get("model", {}), resolved.get("pretrain", {})
    acc = s.base_info.get("held_out_accuracy")
    notes = [
        f"Base: a {tree_lib.num_params(s.base) / 1e6:.2f}M-parameter ViT (patch "
        f"{model.get('patch_size')}, width {model.get('width')}, depth {model.get('depth')}) "
        f"pretrained by this project on {pre.get('num_images')} rendered font glyphs "
        f"(62 classes, {pre.get('epochs')} epochs"
        + (f", {100 * acc:.1f}% held-out glyph accuracy" if acc is not None else "")
        + "); no public ViT weights were used.",
        f"Heads: {config.heads.replace('_', ' ')} per task, never merged.",
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
