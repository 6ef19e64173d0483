"""One `:study` table over seeds, from the runs already made: mean ± std per row.

Each seed is given by one or more sources, whose rows are joined:

- a workdir of ``python -m atm_jax.main --config=configs/<suite>.py:study`` (or of
  ``benchmarks/data_merge_study.py``), read from its ``results.json``;
- a single-seed results page an earlier study wrote (``benchmarks/results/study_*.md``),
  read from its table (accuracies rounded there to 0.1 point).

A row found in two sources of one seed (the references, ``mean``, ``atm``) must agree
there to the rounding of the coarser one, else the sources did not come from the same
base, data and code, and the script stops naming the row. The table gives each row's
per-task and average test accuracy as mean ± std (ddof 1) over the seeds, the
normalized accuracy, the α the tuned rows chose per seed and the data each merge saw.

Run::

  python benchmarks/study_table.py --suite mini_text \\
      --seed 0=benchmarks/results/study_mini_text_20261202_1936.md,/tmp/atm_data_merge_study/seed0 \\
      --seed 1=/tmp/study/mini_text_s1 --seed 2=/tmp/study/mini_text_s2
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402

MD_PRECISION = 0.05  # points: half the 0.1 rounding of a results page
JSON_PRECISION = 1e-9


def rows_from_page(path: pathlib.Path) -> tuple[list[str], dict[str, dict]]:
    """The tasks and rows of a single-seed results page's accuracy table."""
    from atm_jax import schema

    labels = {label: name for name, label in schema.REFERENCE_LABELS.items()}
    tasks, rows = None, {}
    for line in path.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == "method" and "average" in cells:
            tasks = cells[2:cells.index("average")]
            continue
        if tasks is None or len(cells) != len(tasks) + 4 or cells[0].startswith("---"):
            continue
        label = cells[0]
        name = labels.get(label, label.split(" (")[0])
        row = {"method": name, "accuracy": {t: float(v) / 100 for t, v in zip(tasks, cells[2:])},
               "average": float(cells[-2]) / 100, "normalized": float(cells[-1]),
               "precision": MD_PRECISION}
        chosen = re.search(r"α = ([0-9.]+) on validation", label)
        if chosen:
            row["alpha"] = float(chosen.group(1))
        rows[name] = row
    if tasks is None:
        raise SystemExit(f"{path}: no accuracy table (a '| method | ... | average |' header) "
                         "found; give a single-seed study page or a workdir.")
    return tasks, rows


def rows_from_workdir(path: pathlib.Path) -> tuple[list[str], dict[str, dict], list[str]]:
    results = path / "results.json"
    if not results.exists():
        raise SystemExit(f"{path}: no results.json; the run has not finished (resume it with "
                         "the same command) or the path is wrong.")
    data = json.loads(results.read_text())
    rows = {r["method"]: dict(r, precision=JSON_PRECISION) for r in data["rows"]}
    return data["tasks"], rows, data.get("notes", [])


def joined_seed(sources: list[str]) -> tuple[list[str], dict[str, dict], list[str], list[str]]:
    """The rows of one seed from its sources, checking the rows they share."""
    tasks, joined, notes, order = None, {}, [], []
    for source in sources:
        path = pathlib.Path(source)
        if path.suffix == ".md":
            these_tasks, rows = rows_from_page(path)
            these_notes = []
        else:
            these_tasks, rows, these_notes = rows_from_workdir(path)
        if tasks is not None and these_tasks != tasks:
            raise SystemExit(f"{source}: tasks {these_tasks} differ from {tasks}.")
        tasks, notes = these_tasks, notes or these_notes
        for name, row in rows.items():
            if name in joined:
                tolerance = max(row["precision"], joined[name]["precision"]) + 1e-9
                worst = max(abs(100 * (row["accuracy"][t] - joined[name]["accuracy"][t]))
                            for t in tasks)
                if worst > tolerance:
                    raise SystemExit(
                        f"row {name!r}: {source} differs from {joined[name]['source']} by "
                        f"{worst:.2f} points on a task; these runs do not share base, data "
                        "and code, so their rows cannot be joined into one seed.")
                continue
            joined[name] = dict(row, source=source)
            order.append(name)
    return tasks, joined, notes, order


def mean_std(values, digits: int = 1) -> str:
    values = np.asarray(values, float)
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{values.mean():.{digits}f} ± {values.std(ddof=1):.{digits}f}"


def data_seen(row: dict) -> str:
    used = row.get("merge_data")
    if not used:
        return "–"
    if "unlabeled_per_task" in used:
        counts, kind = used["unlabeled_per_task"], "unlabeled test inputs"
    else:
        counts = used["examples_per_task"]
        labels = used.get("fisher_labels")
        kind = "training examples" + (" (labels from the data)" if labels == "data" else "")
    low, high = min(counts.values()), max(counts.values())
    return f"{low if low == high else f'{low} to {high}'} {kind} / task"


def kind_of(name: str, seeds: dict[int, tuple]) -> str:
    """A row's kind (reference / one_shot / atm): recorded in workdirs, inferred from the
    name for rows read from a results page."""
    from atm_jax import schema

    for s in seeds.values():
        if name in s[1] and "kind" in s[1][name]:
            return s[1][name]["kind"]
    if name in schema.REFERENCE_LABELS:
        return "reference"
    return "atm" if name.startswith(("atm", "valft_atm", "ph_atm")) else "one_shot"


def table(seeds: dict[int, tuple], suite: str) -> tuple[str, dict]:
    tasks = next(iter(seeds.values()))[0]
    order = max((s[3] for s in seeds.values()), key=len)
    order += [n for s in seeds.values() for n in s[3] if n not in order]
    from atm_jax import schema

    lines = [f"### {suite}: test accuracy (%), mean ± std over seeds {sorted(seeds)}", "",
             "| method | " + " | ".join(tasks) + " | average | normalized | per seed | "
             "α per seed | data the merge saw |",
             "|---|" + "---:|" * (len(tasks) + 3) + "---|---|"]
    missing, averages = [], {}
    for name in order:
        rows = [s[1][name] for s in seeds.values() if name in s[1]]
        if len(rows) < len(seeds):
            missing.append(f"{name} ({len(rows)} of {len(seeds)} seeds)")
        cells = [mean_std([100 * r["accuracy"][t] for r in rows]) for t in tasks]
        averages[name] = [100 * r["average"] for r in rows]
        cells.append(mean_std(averages[name]))
        cells.append(mean_std([r["normalized"] for r in rows], 3))
        cells.append(", ".join(f"{v:.1f}" for v in averages[name]))
        alphas = [r.get("alpha") for r in rows]
        cells.append(", ".join(f"{a:g}" for a in alphas) if all(a is not None for a in alphas)
                     else "–")
        cells.append(data_seen(next((r for r in rows if "merge_data" in r), rows[0])))
        lines.append(f"| {schema.REFERENCE_LABELS.get(name, name)} | " + " | ".join(cells) + " |")
    lines.append("")
    if "atm" in averages:
        atm = np.mean(averages["atm"])
        ahead = [(np.mean(v), n) for n, v in averages.items()
                 if n != "atm" and n not in schema.REFERENCE_LABELS and np.mean(v) > atm]
        wins = {n: sum(a > b for a, b in zip(v, averages["atm"])) for n, v in averages.items()
                if len(v) == len(averages["atm"])}
        lines.append(f"- ATM (the mean inside, α = 1): {atm:.1f}. Merged rows above it on "
                     "average: " + (", ".join(f"{n} {v:.1f} (ahead on {wins.get(n, '?')} of "
                                              f"{len(averages['atm'])} seeds)"
                                              for v, n in sorted(ahead, reverse=True)) or "none")
                     + ".")
        one_shot = [n for n in averages if kind_of(n, seeds) == "one_shot"
                    and len(averages[n]) == len(averages["atm"])]
        if one_shot:
            per_seed = [max(averages[n][i] for n in one_shot) for i in range(len(averages["atm"]))]
            names = sorted({max(one_shot, key=lambda n: averages[n][i])
                            for i in range(len(per_seed))})
            lines.append(f"- ATM − the best one-shot row of each seed ({', '.join(names)}): "
                         f"{mean_std([a - b for a, b in zip(averages['atm'], per_seed)])} points.")
    lines.append("- α per seed: the α a `_tuned` row chose on validation in that seed; an "
                 "`atm_<merge>` row runs at the α its `<merge>_tuned` row chose.")
    if missing:
        lines.append("- Rows missing from some seeds: " + "; ".join(missing) + ".")
    record = {str(seed): {"tasks": s[0], "rows": list(s[1].values())} for seed, s in seeds.items()}
    return "\n".join(lines) + "\n", record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", required=True, help="names the results file (mini, mini_text)")
    parser.add_argument("--seed", action="append", required=True, metavar="N=SOURCE[,SOURCE]",
                        help="a seed and its sources: workdirs or single-seed results pages")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    seeds, sources = {}, {}
    for spec in args.seed:
        seed, _, paths = spec.partition("=")
        if not paths or not seed.isdigit():
            raise SystemExit(f"--seed {spec!r}: write it as N=SOURCE[,SOURCE], e.g. "
                             "1=/tmp/study/mini_s1")
        sources[int(seed)] = paths.split(",")
        seeds[int(seed)] = joined_seed(sources[int(seed)])
    body, record = table(seeds, args.suite)
    notes = max((s[2] for s in seeds.values()), key=len)
    body += "".join(f"- {n}\n" for n in notes if not n.startswith("Seed"))
    body += ("- adamerging is transductive: it learns its coefficients on the unlabeled test "
             "inputs it is then scored on.\n")
    print(body)
    if args.no_write:
        return
    header = [f"seed {s}: " + " + ".join(f"`{p}`" for p in paths) for s, paths in sources.items()]
    path = common.write_results(f"study_{args.suite}_seeds", header, body)
    path.with_suffix(".json").write_text(json.dumps(record, indent=1))
    print("wrote", path)


if __name__ == "__main__":
    main()
