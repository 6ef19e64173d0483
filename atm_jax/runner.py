"""One experiment from a config: tasks, base, every method, the table and plots.

``run_experiment(config, workdir)`` is what ``python -m atm_jax.main`` calls; it is
a plain function so research code and tests can call it without flags.

Data flow: config → :func:`validate` (`atm_jax.schema` + the suite's own checks,
before anything is loaded) → workdir checks (`atm_jax.workdir`) → the suite builds
the `Setup` (tasks, pretrained backbone, per-task heads; `atm_jax.suites`) → the
run's *units* in order: references (pretrained heads, linear probe), the one-shot
baselines (`atm.one_shot`: finetune every task for the whole budget, merge once
per method, also the individually finetuned models), each ATM method (`atm.run`:
K iterations × e epochs) → metrics.jsonl and TensorBoard events (`atm_jax.event_files`)
as it goes, results.json / results.md / plots at the end (`atm_jax.results`).

Resumable: a checkpoint (`atm_jax.checkpoint`) is written after every unit, every
finished task finetune and every merge; started again on the same workdir, the run
continues from the newest intact one and ends bitwise equal to an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import flax.serialization
import jax
import numpy as np

from atm_jax import atm as atm_lib
from atm_jax import merge as merge_lib
from atm_jax import checkpoint as checkpoint_lib
from atm_jax import evaluate as evaluate_lib
from atm_jax import distributed, event_files, files, parallel, results, schema, sharding, suites
from atm_jax import upgrades, writers
from atm_jax import model_pool
from atm_jax import workdir as workdir_lib
from atm_jax.analysis import recorder as recorder_lib
from atm_jax.analysis import report as report_lib
from atm_jax.errors import ConfigError
from atm_jax.finetune import Finetuner, OptimizerConfig, linear_probe
from atm_jax.merge_spec import MergeData

__all__ = ["validate", "run_experiment", "Runner", "suite_merge_data", "data_used"]

Log = Callable[[str], None]


def validate(config) -> None:
    """Checks every field a run uses; raises ConfigError naming the first bad one.

    Cheap: no data is loaded and nothing is compiled. Merge-filter regexes are
    checked against the backbone's real leaf paths when the suite knows them
    without weights (else once the weights are loaded).
    """
    schema.validate_common(config)
    suite = suites.get(config.suite)
    suite.validate(config)
    shapes = suite.backbone_shapes(config)
    if shapes is not None:
        schema.check_merge_filter(config, shapes)


def run_experiment(config, workdir: files.PathLike, *, log: Log = print) -> dict:
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
      DivergedError: a finetune diverged; the message names method, task,
        iteration and step, and the last good checkpoint stays in place.
    """
    validate(config)
    log(distributed.start_line(dict(config.get("mesh", sharding.DEFAULT)),
                               config.get("task_ownership", "all") == "per_process"))
    suite = suites.get(config.suite)
    workdir = workdir_lib.writable(workdir)
    started = time.perf_counter()
    config_json = json.loads(config.to_json())
    # TensorBoard, live: each record's scalars as it is written (steps already in the
    # event files are not written again after a resume).
    events = event_files.LiveEvents(workdir / "tensorboard")
    ckpt = checkpoint_lib.Checkpointer(workdir / "checkpoints", keep=config.checkpoint.keep, log=log)
    try:
        restored = ckpt.latest()
        defaults = schema.field_defaults(config.suite)
        saved_json = workdir_lib.saved_config(workdir)
        # A workdir of an earlier release: its fields and rows under today's names.
        renames = upgrades.renames_between(
            restored.meta["config"] if restored else saved_json, config_json)
        if renames:
            if restored is not None:
                restored.meta = upgrades.meta(restored.meta, renames)
            if saved_json is not None:
                saved_json = upgrades.config(saved_json, renames)
        # Both records of the run's config must agree with this one: the checkpoint's
        # and config.json (no checkpoint, but another run's files: keep them).
        for saved in (restored.meta["config"] if restored else None, saved_json):
            if saved is not None:
                workdir_lib.check_resumable(saved, config_json, config.resume, workdir,
                                            defaults=defaults)
        if renames:  # only a workdir this run continues is changed
            moved = upgrades.workdir_files(workdir, renames)
            log(f"workdir written by an earlier release: renamed {renames.describe()}"
                + (f" ({'; '.join(moved)})" if moved else ""))
        if restored is not None:
            log(f"resuming from checkpoint step {restored.step} in {workdir / 'checkpoints'} "
                f"({workdir_lib.describe_position(restored.meta)})")
        shapes = suite.backbone_shapes(config)
        if shapes is not None:
            workdir_lib.check_disk_space(workdir, shapes, len(config.tasks), config.checkpoint.keep)
        writers.write_json(workdir / "config.json", config_json)
        metrics = writers.MetricsWriter(workdir / "metrics.jsonl")
        if restored is not None and "metrics" in restored.meta:  # an earlier release's layout
            metrics.resume(lines=restored.meta["metrics"])
        else:
            metrics.resume(restored.meta["records"] if restored else 0)
        setup = suite.build(config, log)
        if jax.process_count() > 1:  # every process starts from process 0's base and heads
            setup.base, setup.heads = distributed.broadcast_from_first((setup.base, setup.heads))
        if shapes is None:
            shapes = jax.eval_shape(lambda: setup.base)
            schema.check_merge_filter(config, shapes)
            workdir_lib.check_disk_space(workdir, shapes, len(config.tasks), config.checkpoint.keep)
        runner = Runner(config, workdir, setup, ckpt, metrics, restored, log, events=events)
        runner.execute()
    finally:
        ckpt.close()
        events.close()
    out = results.write_results(
        config, workdir, setup, rows=runner.rows, curves=runner.curves,
        individual=runner.individual, timings=runner.timings,
        seconds=time.perf_counter() - started, log=log)
    if config.get("analysis", False):  # figures + analysis.json from <workdir>/analysis
        report_lib.build(workdir, log=log)
    return out


def suite_merge_data(setup: suites.Setup, settings, tasks, features: Callable) -> MergeData:
    """`MergeData` of a suite: the first ``settings.examples`` training examples of each
    task (their labels too when ``settings.fisher_labels == "data"``) and, for
    AdaMerging, the unlabeled test inputs; ``features(backbone, inputs)``."""
    train = {t: setup.tasks[t].train for t in tasks}
    n = settings.examples
    labels = {t: y[:n] for t, (_, y) in train.items()} if settings.fisher_labels == "data" else None
    return MergeData(apply_fn=features, inputs={t: x[:n] for t, (x, _) in train.items()},
                     labels=labels, unlabeled={t: setup.tasks[t].test[0] for t in tasks},
                     token_mask=setup.token_mask, batch_size=settings.batch_size)


def data_used(diagnostics: Mapping) -> dict:
    """A row's record of the data its merge looked at (nothing for a data-free merge):
    examples per task, the statistics' and the merge's seconds, AdaMerging's entropy."""
    if "data" not in diagnostics:
        return {}
    out = {"merge_data": dict(diagnostics["data"]),
           "merge_seconds": diagnostics.get("merge_seconds")}
    if "entropy" in diagnostics:
        out["entropy_first_last"] = [diagnostics["entropy"][0], diagnostics["entropy"][-1]]
    return out


class Runner:
    """The run as a list of units (references, one-shot, each ATM method) with
    checkpoints inside them; restores where a checkpoint left off.

    Attributes:
      rows: one result row per reference and method finished so far.
      curves: ``{ATM method: history}``.
      individual: the individually finetuned models' accuracies (after one_shot).
      timings: seconds per unit.
    """

    def __init__(self, config, workdir, setup: suites.Setup, ckpt: checkpoint_lib.Checkpointer,
                 metrics: writers.MetricsWriter, restored: checkpoint_lib.Restored | None,
                 log: Log, *, events: event_files.LiveEvents | None = None):
        self.config, self.workdir, self.setup = config, workdir, setup
        self.ckpt, self.metrics, self.events, self.log = ckpt, metrics, events, log
        self.config_json = json.loads(config.to_json())
        self.key = jax.random.key(config.seed)
        self.key_data = np.asarray(jax.random.key_data(self.key))
        self.opt = OptimizerConfig(**config.optimizer.to_dict())
        # The device mesh (a 1 × 1 mesh on one device). PA-ATM: each process
        # finetunes its own tasks alone, on a mesh of its local devices.
        self.mesh = dict(config.get("mesh", sharding.DEFAULT))
        self.per_process = config.get("task_ownership", "all") == "per_process"
        self.placement = distributed.local_placement(self.mesh) if self.per_process \
            else sharding.Placement.of(self.mesh)
        # A step-level progress bar in a terminal (or when asked); logs stay clean in CI.
        self.finetuner = Finetuner(setup.apply_fn, self.opt, train_head=config.heads == "trainable",
                                   progress=bool(config.progress) or sys.stderr.isatty(),
                                   augment=setup.augment, placement=self.placement,
                                   precision=config.get("precision", "float32"),
                                   remat=bool(config.get("remat", False)))
        self.task_names = list(setup.heads)  # config order; PA-ATM loads only its own tasks
        self.owners = {t: distributed.owner(i) for i, t in enumerate(self.task_names)}
        self.step, self.done, self.rows, self.curves = 0, [], [], {}
        self.timings: dict[str, float] = {}
        self.individual: dict[str, float] | None = None
        self.position: dict = {}
        self.arrays: dict = {}
        self.items: dict = {}
        self.written: dict[str, dict] = {}  # finetuned-model items on disk: their CRCs
        self.recorder = recorder_lib.Recorder(workdir, setup, batch_size=config.eval_batch_size) \
            if config.get("analysis", False) else None
        if self.recorder is not None:
            self.recorder.pretrained(setup.base)
        if restored is not None:
            if not np.array_equal(np.asarray(restored.state["key"]), self.key_data):
                raise ConfigError("the checkpoint was made with another config.seed (its PRNG key "
                                  "differs); a run cannot change its seed midway, even with "
                                  "resume=force: use a new --workdir.")
            m = restored.meta
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
                "position": position, "records": self.metrics.count}
        meta = json.loads(json.dumps(meta, default=files.jsonable))
        self.ckpt.save(self.step, {"key": self.key_data, **(arrays or {})}, meta, items)

    def write(self, record: Mapping[str, Any]) -> None:
        """A record to metrics.jsonl, then its scalars to TensorBoard (which never
        stops the run)."""
        self.metrics(record)
        if self.events is not None:
            self.events(record)

    def checkpoint_state(self, unit: str, state: atm_lib.State, *, with_base: bool) -> None:
        """Checkpoints an `atm.State` of ``unit``; each finished finetune is written
        once, as an item, and later steps only name it."""
        position, arrays, finetuned = checkpoint_lib.state_to_checkpoint(
            unit, state, with_base=with_base)
        for name, params in finetuned.items():
            if name not in self.written:
                self.written[name] = self.ckpt.save_item(name, params)
        self.save(position, arrays, {n: self.written[n] for n in finetuned})

    def restored_state(self, unit: str) -> atm_lib.State | None:
        """The state to continue ``unit`` from, when the checkpoint stopped inside it."""
        if self.position.get("unit") != unit:
            return None
        return checkpoint_lib.state_from_checkpoint(self.position, self.arrays, self.items,
                                                    tasks=self.task_names, base=self.setup.base)

    def finish_unit(self, unit: str, params: Mapping | None = None) -> None:
        """Marks ``unit`` done (its final params written first) and checkpoints."""
        for name, p in (params or {}).items():
            writers.write_bytes(self.workdir / "params" / f"{name}.msgpack",
                                flax.serialization.to_bytes(p))
            if self.config.get("export_hf") and self.setup.export and files.is_writer():
                folder = self.workdir / "hf" / name
                self.setup.export(folder, p)
                self.log(f"[{name}] exported as a Hugging Face folder: {folder}")
        self.done.append(unit)
        self.position = {}
        self.save({"unit": None})

    # -- the units ---------------------------------------------------------------------
    def units(self) -> list[str]:
        out = [r for r in ("pretrained", "linear_probe") if r in self.config.references]
        order = schema.method_order(self.config)
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

    def evaluate(self, params, heads) -> dict[str, float]:
        """Test accuracy per task; under PA-ATM each process evaluates its own tasks
        and the accuracies are gathered (every process gets all of them)."""
        local = {t: evaluate_lib.accuracy(self.setup.apply_fn, params, h, *self.setup.tasks[t].test,
                                          batch_size=self.config.eval_batch_size,
                                          placement=self.placement)
                 for t, h in heads.items() if t in self.setup.tasks}
        if self.per_process:
            return distributed.gather_accuracies(list(heads), local, self.owners)
        return local

    def make_finetune(self, split: str):
        def finetune(base, head, task, epochs, task_key):
            inputs, labels = self.setup.tasks[task].split(split)
            return self.finetuner.finetune(base, head, inputs, labels, epochs=epochs, key=task_key)
        return finetune

    def finetune_tasks(self, split: str) -> tuple[atm_lib.FinetuneTasksFn, int]:
        """The "finetune these tasks" hook and the tasks per call, chosen here alone:
        per process (PA-ATM, each process its own tasks: `atm_jax.distributed`), task
        parallel when ``config.mesh.task > 1`` (`atm_jax.parallel`), else sequential
        (one task per call, so every finished task is checkpointed)."""
        finetune = self.make_finetune(split)
        if self.per_process:
            return (distributed.make_finetune_tasks(finetune, self.task_names),
                    jax.process_count())
        fn, per_call = parallel.for_mesh(self.mesh, self.finetuner,
                                         lambda task: self.setup.tasks[task].split(split))
        return (fn, per_call) if fn is not None else (atm_lib.sequential(finetune), 1)

    def finetune_all(self, unit: str, state: atm_lib.State, split: str, epochs: int, *,
                     with_base: bool, on_progress=None) -> atm_lib.State:
        """Finetunes the tasks ``state`` has not finetuned yet in this iteration, a
        checkpoint after every call of the hook."""
        hook, per_call = self.finetune_tasks(split)
        name = "one-shot" if unit == "one_shot" else unit
        while len(state.finetuned) < len(state.heads):
            left = len(state.heads) - len(state.finetuned)
            state = atm_lib.finetune_group(state, finetune_tasks=hook, count=min(left, per_call),
                                           epochs=epochs, key=self.key, log=self.log, name=name)
            if on_progress is not None:
                on_progress(state)
            self.checkpoint_state(unit, state, with_base=with_base)
        return state

    def add_row(self, method: str, accuracy: Mapping[str, float], epochs: int, kind: str) -> None:
        self.rows.append({"method": method, "kind": kind, "epochs": epochs,
                          "accuracy": dict(accuracy), "average": evaluate_lib.average(accuracy)})

    def pretrained(self) -> None:
        acc = self.evaluate(self.setup.base, self.setup.heads)
        self.add_row("pretrained", acc, 0, "reference")
        self.write({"method": "pretrained", "iteration": 0, "epochs_per_task": 0, "accuracy": acc})
        self.log(f"[pretrained] average accuracy {evaluate_lib.average(acc):.4f}")
        self.finish_unit("pretrained")

    def linear_probe(self) -> None:
        budget = self.config.budget
        keys = {t: atm_lib.task_key(self.key, 0, i) for i, t in enumerate(self.task_names)}
        local = self.setup.tasks  # PA-ATM: this process's tasks; accuracies gathered
        acc = linear_probe(self.setup.apply_fn, self.setup.base,
                           {t: self.setup.heads[t] for t in local}, local, self.opt,
                           epochs=budget, keys={t: keys[t] for t in local},
                           eval_batch_size=self.config.eval_batch_size)
        if self.per_process:
            acc = distributed.gather_accuracies(self.task_names, acc, self.owners)
        self.add_row("linear_probe", acc, budget, "reference")
        self.write({"method": "linear_probe", "iteration": 1, "epochs_per_task": budget,
                    "accuracy": acc})
        self.log(f"[linear_probe] average accuracy {evaluate_lib.average(acc):.4f}")
        self.finish_unit("linear_probe")

    def one_shot(self) -> None:
        """Every task finetuned for the whole budget once, then each one-shot row
        merges the same task vectors: the paper's α, or α chosen on validation
        (``tune_alpha``: `atm_jax.atm.one_shot_merge` with ``config.alpha_grid``)."""
        config, budget = self.config, self.config.budget
        names = [n for n in schema.method_order(config) if config.methods[n].kind == "one_shot"]
        tuned = [n for n in names if config.methods[n].get("tune_alpha", False)]
        state = self.restored_state("one_shot") or atm_lib.init(self.setup.base, self.setup.heads)
        if self.setup.model_pool is not None:  # finetuned elsewhere: 0 epochs in these rows
            state, budget = model_pool.finetuned_state(state, self.setup.model_pool), 0
            self.log(f"[one-shot] the {len(state.finetuned)} finetuned models of "
                     "config.model_pool, no finetuning")
        else:
            done = len(state.finetuned)
            self.log(f"[one-shot] finetuning {len(state.heads)} task(s) for {budget} epoch(s) "
                     "each" + (f" (resumed: {done} already done)" if done else ""))
            state = self.finetune_all("one_shot", state, "train", budget, with_base=False)
        self.individual = atm_lib.individual(state, self.evaluate)
        self.write({"method": "individual", "iteration": 1, "epochs_per_task": budget,
                    "accuracy": self.individual,
                    "average_accuracy": float(np.mean(list(self.individual.values())))})
        if "individual" in config.references:
            self.add_row("individual", self.individual, budget, "reference")
        grid = [float(a) for a in config.alpha_grid] if tuned else None
        merged = {}
        for n in [n for n in names if n not in tuned] + tuned:  # the records' order
            spec = schema.merge_spec(config, config.methods[n])
            out = atm_lib.one_shot_merge(state, spec, key=atm_lib.merge_key(self.key, 0),
                                         evaluate=self.evaluate,
                                         alpha_grid=grid if n in tuned else None,
                                         validate=self.validate, data=self.merge_data(spec))
            merged[n] = out
            self.write({"method": n, "iteration": 1, "epochs_per_task": budget,
                        "accuracy": out["accuracy"],
                        "average_accuracy": float(np.mean(list(out["accuracy"].values()))),
                        "merge": out["diagnostics"]})
            average = evaluate_lib.average(out["accuracy"])
            if n in tuned:
                self.log(f"[{n}] α = {out['alpha']} chosen on validation from {grid}: average "
                         f"test accuracy {average:.4f}")
            else:
                self.log(f"[{n}] one-shot merge: average accuracy {average:.4f}")
            if self.recorder is not None:
                validation = {"alpha_validation": out["validation"]} if n in tuned else {}
                self.recorder.one_shot(n, out["params"], out["diagnostics"], alpha=out["alpha"],
                                       **validation)
        for n in names:
            self.add_row(n, merged[n]["accuracy"], budget, "one_shot")
            if n in tuned:
                self.rows[-1]["alpha"] = merged[n]["alpha"]
            self.rows[-1].update(data_used(merged[n]["diagnostics"]))
        params = {n: merged[n]["params"] for n in names}
        self.finish_unit("one_shot", params if config.save_params else None)

    def merge_data(self, spec) -> MergeData | None:
        """What a merge that looks at data sees (`config.merge_data`): the first
        ``examples`` training examples of each task (with labels for the empirical
        Fisher) and, for AdaMerging, the unlabeled test inputs; None for data-free merges."""
        if merge_lib.info(spec.name).uses == "nothing":
            return None
        if self.per_process:
            raise ConfigError(f"merge {spec.name!r} looks at every task's data, which "
                              "task_ownership='per_process' keeps apart; use 'all'.")
        return suite_merge_data(self.setup, self.config.merge_data, self.task_names,
                                self.features)

    def features(self, backbone, inputs):
        """The backbone's features in evaluation mode (what the data merges run)."""
        return self.setup.apply_fn(backbone, inputs, False)

    def chosen_alpha(self, method: str) -> float:
        """The α the tuned one-shot row ``method`` chose (its row of this run)."""
        for row in self.rows:
            if row["method"] == method and "alpha" in row:
                return float(row["alpha"])
        raise ConfigError(f"alpha_from={method!r}: that row has not chosen an α in this run "
                          "(it must be a one_shot method with tune_alpha=True).")

    def validate(self, params, heads) -> dict[str, float]:
        """Validation accuracy per task (choosing α for the ``tune_alpha`` rows)."""
        return {t: evaluate_lib.accuracy(self.setup.apply_fn, params, h,
                                         *self.setup.tasks[t].validation,
                                         batch_size=self.config.eval_batch_size)
                for t, h in heads.items()}

    def atm(self, name: str) -> None:
        """ATM's loop: finetune every task (a checkpoint after each), merge, write the
        iteration's record (evaluated every ``config.eval_every`` iterations and at
        the last), checkpoint; the records go forward once, into metrics.jsonl."""
        config, spec = self.config, self.config.methods[name]
        iterations = spec.iterations
        epochs = config.budget // iterations
        merge = schema.merge_spec(config, spec)
        source = spec.get("alpha_from", "")
        if source:  # the α its one-shot row chose on validation, fixed over the iterations
            merge = dataclasses.replace(merge, alpha=self.chosen_alpha(source))
            self.log(f"[{name}] inner merge {merge.name} at α = {merge.alpha:g} (chosen by {source})")
        record = self.recorder.atm_progress(name, spec.split, start=spec.get("start", "") or
                                            "pretrained") if self.recorder is not None else None
        state = self.restored_state(name) or atm_lib.init(self.start_base(spec), self.setup.heads)
        named = dict(name=name, epochs_per_iteration=epochs)
        if not state.history:
            state = self.recorded(state, atm_lib.record(state, evaluate=self.evaluate, **named),
                                  iterations, record)
        while state.iteration < iterations:
            done = len(state.finetuned)
            self.log(f"[{name}] iteration {state.iteration + 1}/{iterations}"
                     + (f" (resumed after {done} of {len(state.heads)} tasks)" if done else ""))
            state = self.finetune_all(name, state, spec.split, epochs, with_base=True,
                                      on_progress=record)
            state, diagnostics = atm_lib.iteration(
                state, finetune=None, epochs=epochs, merge=merge, key=self.key,
                carry_heads=config.heads == "trainable", log=self.log, name=name,
                data=self.merge_data(merge))
            due = atm_lib.evaluation_due(state.iteration, iterations, config.eval_every)
            rec = atm_lib.record(state, diagnostics, evaluate=self.evaluate if due else None,
                                 **named)
            state = self.recorded(state, rec, iterations, record)
        self.curves[name] = list(state.history)
        self.add_row(name, state.history[-1]["accuracy"], config.budget, "atm")
        self.rows[-1].update(data_used(state.history[-1].get("merge", {})))
        if source:
            self.rows[-1].update(alpha=merge.alpha, alpha_from=source)
        self.finish_unit(name, {name: state.base} if config.save_params else None)

    def recorded(self, state: atm_lib.State, rec: dict, iterations: int,
                 on_progress) -> atm_lib.State:
        """``state`` with ``rec`` in its history, written to metrics.jsonl, logged and
        checkpointed, in that order (a resumed run keeps the records its checkpoint
        counts)."""
        name = rec["method"]
        state = dataclasses.replace(state, history=(*state.history, rec))
        self.write(rec)
        if "average_accuracy" in rec:
            self.log(f"[{name}] iteration {rec['iteration']}/{iterations}: average accuracy "
                     f"{rec['average_accuracy']:.4f}")
        if on_progress is not None:
            on_progress(state)
        self.checkpoint_state(name, state, with_base=True)
        return state

    # -- post-hoc ATM: where a method starts -------------------------------------------
    def start_base(self, spec):
        """Where an ATM method starts: the pretrained base, or (post-hoc ATM) a one-shot
        row's merged params of this run or a ``.msgpack`` params file."""
        start = spec.get("start", "")
        if not start:
            return self.setup.base
        path = files.as_path(start) if start.endswith(".msgpack") else \
            self.workdir / "params" / f"{start}.msgpack"
        try:
            return flax.serialization.from_bytes(self.setup.base, path.read_bytes())
        except (FileNotFoundError, ValueError, KeyError) as e:
            raise ConfigError(f"ATM start={start!r}: cannot read {path} as this backbone's params "
                              f"({type(e).__name__}: {e}); give params/<method>.msgpack of a run "
                              "of the same model.") from None
