"""A finished run as files a person reads: results.json, results.md and the plots."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from atm_jax import evaluate as evaluate_lib
from atm_jax import files, schema, writers
from atm_jax.finetune import OptimizerConfig
from atm_jax.suites import Setup

__all__ = ["write_results", "notes"]


def write_results(config, workdir, setup: Setup, *, rows: Sequence[dict],
                  curves: Mapping[str, list], individual: Mapping[str, float] | None,
                  timings: Mapping[str, float], seconds: float,
                  log: Callable[[str], None]) -> dict:
    """Writes results.json, results.md and the plots; returns the results.json content.

    Rows gain ``normalized`` (accuracy ÷ the individually finetuned model's, averaged
    over tasks) when the individual models were finetuned.
    """
    rows = [dict(r) for r in rows]
    # A task whose individual model scored 0 leaves normalized out ("–" in the table)
    # rather than failing the run after all its finetuning (e.g. tiny test sets).
    if individual is not None and all(float(a) > 0 for a in individual.values()):
        for row in rows:
            row["normalized"] = evaluate_lib.normalized_average(row["accuracy"], individual)
    lines = notes(config, setup, seconds)
    tasks = list(config.tasks)
    results = {"tasks": tasks, "rows": rows,
               "timings_seconds": {k: v for k, v in timings.items() if k != "pretrained"},
               "total_seconds": round(seconds, 1), "base": dict(setup.base_info),
               "heads": config.heads, "budget_epochs": config.budget, "notes": lines,
               "curves": {n: [{k: h[k] for k in ("iteration", "accuracy", "average_accuracy")}
                              for h in hist if "accuracy" in h]  # eval_every skips some
                          for n, hist in curves.items()},
               "cosine_last_iteration": {n: hist[-1]["merge"]["cosine"] for n, hist in curves.items()
                                         if "merge" in hist[-1]}}
    workdir = files.as_path(workdir)
    writers.write_json(workdir / "results.json", results)
    labelled = [dict(r, method=schema.REFERENCE_LABELS.get(r["method"], r["method"])
                     + (f" (inner α = {r['alpha']:g} from {r['alpha_from']})" if "alpha_from" in r
                        else f" (α = {r['alpha']:g} on validation)" if "alpha" in r else ""))
                for r in rows]
    table = writers.results_markdown(labelled, tasks, title=f"{config.suite}: test accuracy (%)",
                                     notes=lines)
    writers.write_text(workdir / "results.md", table)
    plots = writers.plot_results(workdir, rows, curves, tasks)
    log("\n" + table)
    if files.is_writer():
        log(f"wrote {workdir}/results.md, results.json, metrics.jsonl, config.json and "
            f"{len(plots)} plots in {seconds:.0f}s")
    else:
        log(f"done in {seconds:.0f}s; process 0 writes the results to {workdir}")
    return results


def notes(config, setup: Setup, seconds: float) -> list[str]:
    """The lines under the results table: setup, budget, optimizer, valFT sizes, seed."""
    opt = OptimizerConfig(**config.optimizer.to_dict())
    out = list(setup.notes)
    if setup.model_pool is None:  # a pool run trains nothing (its notes say where from)
        out.append(f"Budget: {config.budget} epochs per task for every method; optimizer "
                   f"{opt.name} lr {opt.learning_rate}, batch {opt.batch_size}, grad clip "
                   f"{opt.grad_clip} (same for all).")
    for name in schema.method_order(config):
        spec = config.methods[name]
        start = spec.get("start", "") if spec.kind == "atm" else ""
        if name == "mean" and spec.kind == "one_shot" and spec.merge == "mean":
            out.append("mean: the paper's task arithmetic baseline, the mean of the task vectors "
                       "(atm_jax.merge.task_arithmetic is their sum).")
        if start:
            origin = f"the {start} one-shot merge of this run" if start in config.methods \
                else f"the params file {start}"
            out.append(f"{name}: post-hoc ATM: {spec.iterations} iterations × "
                       f"{config.budget // spec.iterations} epoch(s) on the {spec.split} split, "
                       f"starting from {origin} (so its tasks were first finetuned {config.budget} "
                       "epochs on the training split); iteration 0 of its curve is that model.")
        elif spec.kind == "atm" and spec.split == "validation":
            sizes = ", ".join(f"{t} {len(task.validation[1])}" for t, task in setup.tasks.items())
            out.append(
                f"{name}: trains only on the validation split ({sizes} examples) from the "
                f"pretrained base, {spec.iterations} iterations × {config.budget // spec.iterations} "
                "epoch(s): the same epochs but far fewer steps than training-split methods (the "
                "authors' final code instead starts valFT from the mean merge, task arithmetic).")
    out += [
        "Normalized = accuracy ÷ the individually finetuned model's accuracy, averaged over tasks.",
        *([f"Rows marked 'α on validation' chose α from {tuple(config.alpha_grid)} by average "
           "validation accuracy (the delta merged once, then scaled by each α; test evaluated "
           "at the chosen α only); 'inner α from X' rows are ATM at the α that row X chose, "
           "fixed over the iterations; the other rows use the paper's protocol (α as "
           "configured, 1 by default)."]
          if any(config.methods[n].get("tune_alpha", False) for n in config.methods) else []),
        *([f"ATM methods' test accuracy was evaluated every {config.eval_every} iterations "
           "and after the last (config.eval_every); the curves show those iterations."]
          if config.eval_every > 1 else []),
        f"Seed {config.seed}; wall time {seconds:.0f}s.",
    ]
    return out
