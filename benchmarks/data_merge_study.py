"""The merges that look at data over seeds, beside task arithmetic and ATM (a reduced study).

Runs ``--config`` (default configs/mini_text.py) with only these rows: the individual
reference, ``mean`` (task arithmetic, α = 1), ``atm``, and the `recipes.STUDY_DATA_MERGES`
rows with ``atm_regmean``, as the ``:study`` variant defines them, for each seed; prints and
writes mean ± std of the average test accuracy per row. The full ``:study`` table (every
data-free row too) is `benchmarks/mini_study.py`'s job.

Run::

  python benchmarks/data_merge_study.py                           # mini_text, seeds 0,1,2
  python benchmarks/data_merge_study.py --config configs/mini.py --seeds 0
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402

KEEP = ("mean", "atm", "regmean", "regmean_pp", "fisher", "adamerging", "atm_regmean")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/mini_text.py")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--workdir", default="/tmp/atm_data_merge_study")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    from atm_jax import runner

    rows: dict[str, list[float]] = {}
    notes: dict[str, str] = {}
    seconds = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        config = common.load_config(f"{args.config}:study")
        with config.unlocked():
            config.seed = seed
            config.references = ("individual",)
            for name in [n for n in config.methods if n not in KEEP]:
                del config.methods[name]
        start = time.perf_counter()
        out = runner.run_experiment(config, pathlib.Path(args.workdir) / f"seed{seed}",
                                    log=lambda line: print(line) if line.startswith("[") else None)
        seconds.append(time.perf_counter() - start)
        for r in out["rows"]:
            rows.setdefault(r["method"], []).append(100 * r["average"])
            if "merge_data" in r:
                used = r["merge_data"]
                seen = used.get("examples_per_task") or used.get("unlabeled_per_task")
                kind = "unlabeled test inputs" if "unlabeled_per_task" in used else "training examples"
                notes[r["method"]] = f"{sorted(set(seen.values()))} {kind} / task"
    lines = ["| row | average accuracy (%) | per seed | data the merge saw |", "|---|---|---|---|"]
    for name, values in rows.items():
        lines.append(f"| {name} | {np.mean(values):.1f} ± {np.std(values):.1f} | "
                     f"{', '.join(f'{v:.1f}' for v in values)} | {notes.get(name, '–')} |")
    body = (f"{args.config}, seeds {args.seeds}, {np.mean(seconds):.0f} s per seed. AdaMerging is "
            "transductive: it learns its coefficients on the unlabeled test inputs it is then "
            "scored on.\n\n" + "\n".join(lines) + "\n")
    print(body)
    if not args.no_write:
        name = "data_merge_study_" + pathlib.Path(args.config).stem
        print("wrote", common.write_results(name, [common.versions("jax", "flax")], body))


if __name__ == "__main__":
    main()
