"""The mini suites over seeds and budgets: ATM vs one-shot merging, mean ± std.

Runs ``configs/mini.py`` (or ``--config configs/mini_text.py``; unchanged but for the
fields named here) for budgets 5
and 10 epochs per task with seeds 0, 1, 2, and the budget split of the paper's
Fig. 5: 10 epochs = K iterations × 10/K epochs for K in 1, 2, 5, 10 (K = 1 is
one-shot task arithmetic; K = 10 is the main ATM run). The seed changes the data
subsample, the finetuning order and DARE's masks; the pretrained base and the
heads stay fixed. Nothing is tuned per method.

Run::

  python benchmarks/mini_study.py                      # ≈ 35 min on 2 CPU cores
  python benchmarks/mini_study.py --seeds 0 --budgets 10 --no-split   # one run
  python benchmarks/mini_study.py --config configs/mini_text.py --budgets 10 --no-split
  # the ':analysis' rows (α-tuned / sum baselines, PH-ATM, the authors' valFT)
  # and the recorded analysis (mean |cos| per iteration, Theorem 5.1 bookkeeping)
  python benchmarks/mini_study.py --analysis --budgets 10 --no-split
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402

ROOT = common.ROOT
ONE_SHOT = ("mean", "ties", "breadcrumbs", "dare")


DEFAULT_CONFIG = "configs/mini.py"
CONFIG = DEFAULT_CONFIG  # the --config of this run
ANALYSIS = False  # --analysis: get_config("analysis")


def _base_config():
    spec = importlib.util.spec_from_file_location("mini_config", ROOT / CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config("analysis" if ANALYSIS else None)


def analysis_section(runs: dict, workdirs: dict, budget: int, seeds: list[int]) -> list[str]:
    """The `:analysis` rows' numbers over seeds: ATM's margin over the paper-protocol and the
    α-tuned baselines, the chosen α, and mean |cos| per ATM iteration."""
    from atm_jax.analysis import report

    def rows(seed):
        return {r["method"]: r for r in runs[budget, seed]["rows"]}

    methods = list(rows(seeds[0]))
    paper = [m for m in ONE_SHOT if m in methods]
    tuned = [m for m in methods if rows(seeds[0])[m].get("alpha") is not None]
    out = [f"### Fair baselines and the recorded analysis (budget {budget}, seeds {seeds})", "",
           "| comparison | points (mean ± std over seeds) |", "|---|---:|"]
    atm = [100 * rows(s)["atm"]["average"] for s in seeds]
    for label, group in (("best paper-protocol one-shot (α = 1, mean)", paper),
                         ("best α-tuned one-shot (α on validation)", tuned)):
        if group:
            best = [max(100 * rows(s)[m]["average"] for m in group) for s in seeds]
            names = [max(group, key=lambda m: rows(s)[m]["average"]) for s in seeds]
            out.append(f"| ATM − {label} [{', '.join(names)}] | "
                       f"{_mean_std([a - b for a, b in zip(atm, best)])} |")
    for m in ("valft_atm", "valft_atm_authors", "ph_atm"):
        if m in methods:
            out.append(f"| {m} − ATM | {_mean_std([100 * rows(s)[m]['average'] - a for s, a in zip(seeds, atm)])} |")
    out += ["", "| α-tuned row | α chosen per seed | average % |", "|---|---|---:|"]
    for m in tuned:
        chosen = ", ".join(f"{rows(s)[m]['alpha']:g}" for s in seeds)
        out.append(f"| {m} | {chosen} | "
                   f"{_mean_std([100 * rows(s)[m]['average'] for s in seeds])} |")
    summaries = []
    for s in seeds:
        path = pathlib.Path(workdirs[budget, s]) / "analysis" / "analysis.json"
        summaries.append(json.loads(path.read_text()) if path.exists()
                         else report.build(workdirs[budget, s], log=lambda *_: None))
    out += ["", "| ATM method | mean abs cos per iteration (mean over seeds) | one-shot | joint loss fell |",
            "|---|---|---:|---:|"]
    one_shot = [next(iter(x["orthogonality"]["one_shot"].values()))["mean_abs_cos"]
                for x in summaries if x["orthogonality"]["one_shot"]]
    for m in summaries[0]["orthogonality"]["atm"]:
        per = np.array([[r["mean_abs_cos"] for r in x["orthogonality"]["atm"][m]] for x in summaries])
        fell = [sum(r["joint_decreased"] for r in x["loss_bookkeeping"][m]) for x in summaries]
        total = [len(x["loss_bookkeeping"][m]) for x in summaries]
        out.append(f"| {m} | {' → '.join(f'{v:.3f}' for v in per.mean(0))} | "
                   f"{np.mean(one_shot):.3f} | {sum(fell)} of {sum(total)} |")
    return out + [""]


def _mean_std(values) -> str:
    values = np.asarray(values, float)
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{values.mean():.1f} ± {values.std(ddof=1):.1f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=DEFAULT_CONFIG,
                        help="configs/mini.py or configs/mini_text.py")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--budgets", default="5,10")
    parser.add_argument("--splits", default="1,2,5,10", help="K values of the budget split (budget 10)")
    parser.add_argument("--no-split", action="store_true")
    parser.add_argument("--workdir", default="/tmp/atm_mini_study")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--analysis", action="store_true",
                        help="the config's ':analysis' variant (fair-baseline rows + recorded analysis)")
    args = parser.parse_args()
    global CONFIG, ANALYSIS
    CONFIG = args.config
    ANALYSIS = args.analysis
    study = "mini_study" if CONFIG == DEFAULT_CONFIG else \
        f"mini_study_{pathlib.Path(CONFIG).stem}"
    study += "_analysis" if ANALYSIS else ""

    from atm_jax import runner, schema

    seeds = [int(s) for s in args.seeds.split(",")]
    budgets = [int(b) for b in args.budgets.split(",")]
    quiet = lambda *_: None  # noqa: E731
    started = time.perf_counter()
    runs = {}  # (budget, seed) -> results
    workdirs = {}
    for budget in budgets:
        for seed in seeds:
            config = _base_config()
            config.seed = seed
            config.budget = budget
            config.methods.atm.iterations = budget
            config.methods.valft_atm.iterations = budget
            if ANALYSIS:
                for name in config.methods:
                    if config.methods[name].kind == "atm":
                        config.methods[name].iterations = budget
            t0 = time.perf_counter()
            workdirs[budget, seed] = pathlib.Path(args.workdir) / f"b{budget}_s{seed}"
            runs[budget, seed] = runner.run_experiment(config, workdirs[budget, seed], log=quiet)
            row = {r["method"]: r["average"] for r in runs[budget, seed]["rows"]}
            print(f"budget {budget} seed {seed}: ATM {100 * row['atm']:.1f}, "
                  f"best one-shot {100 * max(row[m] for m in ONE_SHOT):.1f} "
                  f"({time.perf_counter() - t0:.0f}s)", flush=True)

    split = {}  # (K, seed) -> average accuracy, normalized
    if not args.no_split and 10 in budgets:
        for k in [int(x) for x in args.splits.split(",")]:
            for seed in seeds:
                main_rows = {r["method"]: r for r in runs[10, seed]["rows"]}
                if k == 10:
                    row = main_rows["atm"]
                elif k == 1 and "mean" in main_rows:
                    row = main_rows["mean"]  # K = 1 is one-shot task arithmetic (the mean)
                else:
                    config = _base_config()
                    config.seed = seed
                    config.references = ()
                    atm = config.methods.atm
                    atm.iterations = k
                    config.methods = {"atm": atm}
                    out = runner.run_experiment(
                        config, pathlib.Path(args.workdir) / f"split_k{k}_s{seed}", log=quiet)
                    row = out["rows"][0]
                    individual = main_rows["individual"]["accuracy"]
                    row["normalized"] = float(np.mean([row["accuracy"][t] / individual[t]
                                                       for t in individual]))
                split[k, seed] = (row["average"], row["normalized"])
                print(f"split K={k} × {10 // k} epochs, seed {seed}: {100 * row['average']:.1f}",
                      flush=True)

    tasks = runs[budgets[0], seeds[0]]["tasks"]
    methods = [r["method"] for r in runs[budgets[0], seeds[0]]["rows"]]
    out = []
    for budget in budgets:
        out += [f"### Budget {budget} epochs per task (ATM: {budget} iterations × 1 epoch), "
                f"test accuracy %, mean ± std over seeds {seeds}", "",
                "| method | " + " | ".join(tasks) + " | average | normalized |",
                "|---|" + "---:|" * (len(tasks) + 2)]
        for m in methods:
            rows = [next(r for r in runs[budget, s]["rows"] if r["method"] == m) for s in seeds]
            cells = [_mean_std([100 * r["accuracy"][t] for r in rows]) for t in tasks]
            cells.append(_mean_std([100 * r["average"] for r in rows]))
            norm = [r["normalized"] for r in rows]
            cells.append(f"{np.mean(norm):.3f} ± {np.std(norm, ddof=1):.3f}" if len(norm) > 1
                         else f"{norm[0]:.3f}")
            out.append(f"| {schema.REFERENCE_LABELS.get(m, m)} | " + " | ".join(cells) + " |")
        best = [max(next(r for r in runs[budget, s]["rows"] if r["method"] == m)["average"]
                    for m in ONE_SHOT) for s in seeds]
        atm = [next(r for r in runs[budget, s]["rows"] if r["method"] == "atm")["average"]
               for s in seeds]
        out += ["", f"ATM − best one-shot baseline: "
                f"{_mean_std([100 * (a - b) for a, b in zip(atm, best)])} points.", ""]
        if ANALYSIS:
            out += analysis_section(runs, workdirs, budget, seeds)
    if split:
        out += ["### Budget split (paper Fig. 5): 10 epochs = K iterations × 10/K epochs", "",
                "| K × epochs | average accuracy % | normalized |", "|---|---:|---:|"]
        for k in sorted({k for k, _ in split}):
            vals = [split[k, s] for s in seeds]
            out.append(f"| {k} × {10 // k} | {_mean_std([100 * a for a, _ in vals])} | "
                       f"{np.mean([n for _, n in vals]):.3f} |")
        out.append("")
    first = runs[budgets[0], seeds[0]]
    notes = [n for n in first["notes"] if not n.startswith(("Seed", "Budget"))]
    out += [f"- {n}" for n in notes]
    table = "\n".join(out) + "\n"
    print()
    print(table)
    elapsed = time.perf_counter() - started
    print(f"total {elapsed / 60:.1f} min")
    if args.no_write:
        return
    stamp = common.utc_now()
    path = common.write_results(study, [
        f"{CONFIG}, seeds {seeds}, budgets {budgets}; {elapsed / 60:.0f} min in all",
    ], table, stamp=stamp)
    (common.RESULTS / f"{study}_{stamp:%Y%m%d_%H%M}.json").write_text(json.dumps(
        {"runs": {f"b{b}_s{s}": {k: v for k, v in r.items() if k in ("rows", "curves", "tasks")}
                  for (b, s), r in runs.items()},
         "split": {f"k{k}_s{s}": v for (k, s), v in split.items()}}, indent=1))
    print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
