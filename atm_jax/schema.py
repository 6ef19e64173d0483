"""The config schema: which fields exist, what values they take, checked up front.

The allowed fields of a suite are the union of what its recipe builders in
`atm_jax.recipes` produce (the optimizer section: `OptimizerConfig`'s fields), so a
field is added in one place. :func:`validate_common` checks the fields every suite
shares; each suite module checks its own (``atm_jax.suites.<suite>.validate``),
with the helpers here. Validation is cheap: no data is loaded and nothing is
compiled, so a typo fails in a second, not after an hour of finetuning.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable

import numpy as np

from atm_jax import atm as atm_lib
from atm_jax import files, recipes, sharding
from atm_jax import tree as tree_lib
from atm_jax.errors import ConfigError
from atm_jax.finetune import PRECISIONS, OptimizerConfig

__all__ = ["HEAD_MODES", "REFERENCES", "SPLITS", "KINDS", "RESUME_MODES", "TASK_OWNERSHIP",
           "PER_PROCESS_SUITES", "DISPLAY_ORDER",
           "REFERENCE_LABELS", "field", "positive_int", "integer", "flag", "check_keys",
           "allowed_fields", "field_defaults", "validate_common", "check_mesh",
           "check_merge_filter", "merge_spec", "method_order"]

HEAD_MODES = ("frozen_random", "trainable")
REFERENCES = ("pretrained", "linear_probe", "individual")
SPLITS = ("train", "validation")
KINDS = ("one_shot", "atm")
RESUME_MODES = ("auto", "force")
TASK_OWNERSHIP = ("all", "per_process")  # atm_jax.distributed.TASK_OWNERSHIP
# The suites whose build loads only this process's tasks (PA-ATM).
PER_PROCESS_SUITES = ("mini",)
DISPLAY_ORDER = ("mean", "ties", "breadcrumbs", "dare", "dare_ties",
                 "ties_atm_code", "breadcrumbs_atm_code",
                 # fair baselines (α tuned on validation, sum aggregation), PH-ATM
                 "mean_tuned", "ties_tuned", "breadcrumbs_tuned", "dare_tuned",
                 "ties_sum", "ties_sum_tuned", "dare_sum", "dare_sum_tuned",
                 # the data-free merges of the :study rows (recipes.STUDY_MERGES)
                 "tsv", "tsv_tuned", "iso_c_tuned", "iso_cts_tuned", "wudi", "wudi_tuned",
                 "consensus_tuned", "della", "della_tuned", "model_stock", "model_stock_tuned",
                 "valft_atm", "valft_atm_authors", "ph_atm", "atm", "atm_ties", "atm_tsv",
                 "atm_iso_c")
REFERENCE_LABELS = {"pretrained": "pretrained base (no finetuning)",
                    "linear_probe": "linear probe (frozen base)",
                    "individual": "individual finetuned (not merged)"}
# Sections whose keys are not checked against the builders: method entries are
# named by the user (their keys are checked per method), and pretraining checks
# its own fields (atm_jax.pretrain.resolve_configs).
_FREE_SECTIONS = ("methods", "pretrain")


# -- field helpers (used by the suites too) --------------------------------------------

def field(config, path: str):
    """``config.<path>``, or ConfigError when it is missing."""
    node = config
    for part in path.split("."):
        if part not in node:
            raise ConfigError(f"config.{path} is missing.")
        node = node[part]
    return node


def positive_int(config, path: str) -> int:
    value = field(config, path)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"config.{path}={value!r} must be a positive integer.")
    return int(value)


def integer(config, path: str) -> int:
    value = field(config, path)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ConfigError(f"config.{path}={value!r} must be an integer >= 0.")
    return int(value)


def flag(config, path: str) -> bool:
    value = field(config, path)
    if not isinstance(value, bool):
        raise ConfigError(f"config.{path}={value!r} must be True or False.")
    return value


def check_keys(node, allowed: Iterable[str], where: str) -> None:
    """Unknown keys are typos: ``--config.FIELD`` can't add them, but code can."""
    unknown = sorted(set(node.keys()) - set(allowed))
    if unknown:
        raise ConfigError(f"config.{where}{unknown[0]} is not a known field; "
                          f"config.{where or ''}* has {sorted(allowed)}.")


def allowed_fields(suite: str) -> dict[str, tuple[str, ...] | None]:
    """``{top-level field: its allowed sub-fields, or None for a plain value}`` of
    ``suite``, from its recipe builders."""
    out: dict[str, set[str] | None] = {}
    for build in recipes.BUILDERS[suite]:
        for name, value in build().items():
            if hasattr(value, "keys") and name not in _FREE_SECTIONS:
                out[name] = (out.get(name) or set()) | set(value.keys())
            else:
                out.setdefault(name, None)
    out["optimizer"] = {f.name for f in dataclasses.fields(OptimizerConfig)}
    return {k: (tuple(sorted(v)) if v is not None else None) for k, v in out.items()}


def field_defaults(suite: str) -> dict[str, list]:
    """``{dotted field: its values in the recipe}``: what a field is when nobody set it.

    Read from the suite's recipe builders (JSON values, one entry per distinct value
    when builders differ) and, under ``methods.*.<key>``, from `recipes.method` for
    both kinds. A workdir written before a field existed resumes when the field's
    current value is one of these (`atm_jax.workdir.config_differences`).
    """
    out: dict[str, list] = {}

    def walk(node, prefix: str) -> None:
        for name, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{name}.")
            elif value not in out.setdefault(prefix + name, []):
                out[prefix + name].append(value)

    for build in recipes.BUILDERS[suite]:
        built = json.loads(build().to_json())
        built.pop("methods", None)
        walk(built, "")
    for kind in KINDS:
        walk(json.loads(recipes.method(kind, iterations=None).to_json()), "methods.*.")
    return out


# -- the fields every suite shares ----------------------------------------------------

FISHER_LABELS = ("data", "sampled")


def validate_common(config) -> None:
    """Checks the shared fields (keys, seed, flags, resume, tasks, budget, optimizer,
    methods, references); raises ConfigError naming the first bad one."""
    suite = field(config, "suite")
    if suite not in recipes.BUILDERS:
        raise ConfigError(f"config.suite={suite!r} must be one of {tuple(recipes.BUILDERS)}.")
    allowed = allowed_fields(suite)
    check_keys(config, allowed, "")
    for section, keys in allowed.items():
        if keys is not None and section in config:
            check_keys(field(config, section), keys, section + ".")
    integer(config, "seed")
    integer(config, "head_seed")
    flag(config, "progress")
    flag(config, "save_params")
    flag(config, "remat")
    if field(config, "precision") not in PRECISIONS:
        raise ConfigError(f"config.precision={config.precision!r} must be one of {PRECISIONS}: "
                          "'bfloat16' computes the finetuning step's forward and backward in "
                          "bfloat16 on accelerators (params and optimizer stay float32).")
    if field(config, "resume") not in RESUME_MODES:
        raise ConfigError(f"config.resume={config.resume!r} must be one of {RESUME_MODES}: 'auto' "
                          "continues a run found in the workdir when its config is the same, "
                          "'force' continues it even when the config differs.")
    ownership = field(config, "task_ownership")
    if ownership not in TASK_OWNERSHIP:
        raise ConfigError(f"config.task_ownership={ownership!r} must be one of {TASK_OWNERSHIP}: "
                          "'all' (every process sees every task) or 'per_process' (PA-ATM: each "
                          "task's data stays on one process).")
    if ownership == "per_process" and suite not in PER_PROCESS_SUITES:
        raise ConfigError(f"config.task_ownership='per_process' is implemented for the "
                          f"{PER_PROCESS_SUITES} suite(s), not {suite!r} (its build loads every "
                          "task): use task_ownership='all'.")
    keep = positive_int(config, "checkpoint.keep")
    if keep < 2:
        raise ConfigError(f"config.checkpoint.keep={keep} must be at least 2, so a damaged newest "
                          "checkpoint leaves an older one to resume from.")
    tasks = field(config, "tasks")
    if isinstance(tasks, str) or not all(isinstance(t, str) for t in tasks):
        raise ConfigError(f"config.tasks={tasks!r} must be a tuple of task names.")
    tasks = tuple(tasks)
    if not tasks:
        raise ConfigError("config.tasks is empty: name at least one task.")
    if len(set(tasks)) != len(tasks):
        raise ConfigError(f"config.tasks={tasks!r} names a task twice.")
    budget = positive_int(config, "budget")
    positive_int(config, "eval_batch_size")
    positive_int(config, "eval_every")
    for ref in config.references:
        if ref not in REFERENCES:
            raise ConfigError(f"config.references has unknown entry {ref!r}; allowed: {REFERENCES}.")
    try:
        OptimizerConfig(**config.optimizer.to_dict())
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.optimizer: {e}") from None
    _validate_methods(config, budget)
    if "merge_data" in config:
        positive_int(config, "merge_data.examples")
        positive_int(config, "merge_data.batch_size")
        labels = field(config, "merge_data.fisher_labels")
        if labels not in FISHER_LABELS:
            raise ConfigError(f"config.merge_data.fisher_labels={labels!r} must be one of "
                              f"{FISHER_LABELS}: 'data' takes each example's label (the empirical "
                              "Fisher), 'sampled' draws it from the model (the true Fisher).")
    check_mesh(config)
    _validate_analysis(config)
    try:
        tree_lib.path_filter(tuple(config.merge_include) or None,
                             tuple(config.merge_exclude) or None)
    except ValueError as e:
        raise ConfigError(f"config.merge_include / config.merge_exclude: {e}") from None


def _validate_methods(config, budget: int) -> None:
    if not config.methods:
        raise ConfigError("config.methods is empty: add at least one method.")
    method_keys = set(recipes.method("atm", iterations=1, tune_alpha=True, start="x",
                                     alpha_from="x").keys())
    for name in config.methods:
        spec = config.methods[name]
        where = f"methods.{name}"
        if not hasattr(spec, "keys"):
            raise ConfigError(f"config.{where}={spec!r} must be a ConfigDict with kind, merge, alpha.")
        check_keys(spec, method_keys, where + ".")
        if spec.get("kind") not in KINDS:
            raise ConfigError(f"config.{where}.kind={spec.get('kind')!r} must be one of {KINDS}.")
        for required in ("merge", "alpha"):
            field(config, f"{where}.{required}")
        try:
            merge_spec(config, spec)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"config.{where}: {e}") from None
        if spec.kind == "atm":
            iterations = positive_int(config, f"{where}.iterations")
            split = field(config, f"{where}.split")
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


def check_mesh(config) -> None:
    """``config.mesh`` fits this machine's devices (`atm_jax.sharding.mesh_shape`).
    A config without the field (written before it existed) runs on the default."""
    import jax

    mesh = config.get("mesh")
    if mesh is None:
        return
    if not hasattr(mesh, "keys"):
        raise ConfigError(f"config.mesh={mesh!r} must be a ConfigDict like "
                          f"{sharding.DEFAULT}.")
    try:
        sharding.check_mesh(dict(mesh.items()), jax.device_count())
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _validate_analysis(config) -> None:
    """``analysis``, ``alpha_grid`` and the methods' ``tune_alpha`` / ``start`` (the `:analysis` rows)."""
    if "analysis" in config:
        flag(config, "analysis")
    grid = tuple(config.get("alpha_grid", ()) or ())
    bad = [a for a in grid if isinstance(a, bool) or not isinstance(a, (int, float))
           or not (np.isfinite(a) and a > 0)]
    if bad:
        raise ConfigError(f"config.alpha_grid has {bad[0]!r}; every α must be a number > 0, "
                          f"e.g. {recipes.ALPHA_GRID}.")
    for name in config.methods:
        spec = config.methods[name]
        where = f"config.methods.{name}"
        if spec.get("tune_alpha", False):
            if not isinstance(spec.tune_alpha, bool) or spec.kind != "one_shot":
                raise ConfigError(f"{where}.tune_alpha={spec.tune_alpha!r}: only a one_shot method "
                                  "can tune α, and the value is True or False.")
            if not grid:
                raise ConfigError(f"{where}.tune_alpha needs a non-empty config.alpha_grid, e.g. "
                                  f"{recipes.ALPHA_GRID}.")
        source = spec.get("alpha_from", "")
        if source:
            tuned = [n for n in config.methods if config.methods[n].kind == "one_shot"
                     and config.methods[n].get("tune_alpha", False)]
            if spec.kind != "atm" or source not in tuned:
                raise ConfigError(f"{where}.alpha_from={source!r}: an ATM method takes its α from a "
                                  f"one_shot method of this config with tune_alpha=True ({tuned}).")
        start = spec.get("start", "")
        if not start:
            continue
        if spec.kind != "atm" or not isinstance(start, str):
            raise ConfigError(f"{where}.start={start!r}: only an ATM method has a start (a one_shot "
                              "method name of this config or a .msgpack params file).")
        if start.endswith(".msgpack"):
            if not files.as_path(start).exists():
                raise ConfigError(f"{where}.start={start!r}: no such params file; give a "
                                  "<workdir>/params/<method>.msgpack of the same model.")
            continue
        if start not in config.methods or config.methods[start].kind != "one_shot":
            one_shot = [n for n in config.methods if config.methods[n].kind == "one_shot"]
            raise ConfigError(f"{where}.start={start!r} must name a one_shot method of this config "
                              f"({one_shot}) or a .msgpack params file.")
        if not config.save_params:
            raise ConfigError(f"{where}.start={start!r} reads params/{start}.msgpack: set "
                              "config.save_params=True.")


def check_batch_sizes(config, train: int | None, validation: int | None) -> None:
    """The batch fits the training split, and the validation split when a method
    trains on it (sizes as configured; 0/None = not capped, unknown here)."""
    batch = config.optimizer.batch_size
    if train and batch > train:
        raise ConfigError(f"config.optimizer.batch_size={batch} is larger than "
                          f"config.data.train_size={train}: every step would be "
                          "mostly padding. Lower the batch size or raise the train size.")
    if validation and batch > validation and any(
            m.kind == "atm" and m.split == "validation" for m in config.methods.values()):
        raise ConfigError(f"config.optimizer.batch_size={batch} is larger than the validation split "
                          f"({validation} examples), which valFT ATM trains on.")


def check_merge_filter(config, shapes) -> None:
    """Every include/exclude regex must match some backbone leaf of ``shapes``: a typo
    would otherwise merge everything, or fail only at the first merge."""
    include = tuple(config.merge_include) or None
    exclude = tuple(config.merge_exclude) or None
    predicate = tree_lib.path_filter(include, exclude)
    paths = tree_lib.leaf_paths(shapes)
    for name, patterns in (("merge_include", include), ("merge_exclude", exclude)):
        for pattern in patterns or ():
            if not any(tree_lib.path_filter(pattern)(p) for p in paths):
                raise ConfigError(f"config.{name} pattern {pattern!r} matches no backbone leaf; "
                                  f"leaf paths look like {paths[:3]}.")
    if not any(predicate(p) for p in paths):
        raise ConfigError("config.merge_include / config.merge_exclude leave no backbone leaf to merge.")


def merge_spec(config, spec) -> atm_lib.MergeSpec:
    """The `atm.MergeSpec` of one ``config.methods`` entry."""
    return atm_lib.MergeSpec(
        spec.merge, dict(spec.get("merge_kwargs", {}) or {}), alpha=float(spec.alpha),
        include=tuple(config.merge_include) or None, exclude=tuple(config.merge_exclude) or None)


def method_order(config) -> list[str]:
    """Method names in table order (ml_collections sorts keys, so order is ours)."""
    names = list(config.methods.keys())
    known = [n for n in DISPLAY_ORDER if n in names]
    return known + sorted(n for n in names if n not in DISPLAY_ORDER)
