"""Test-split evaluation at several batch sizes: seconds and accuracies.

Evaluation after every merge is most of an ATM iteration's time outside finetuning
(`overhead_bench`). This times ``atm_jax.evaluate.accuracy`` over every task's test
split of a config's suite at each ``--batch-sizes`` value, for the backbones a run
saved (``<workdir>/params/<method>.msgpack``, ``save_params``) and the pretrained
base, and checks that every batch size gives the same number of correct answers per
task as the first one (a different batch may reorder float sums and flip an argmax).

Run::

  python -m atm_jax.main --config=configs/mini.py --workdir=/tmp/atm_mini   # saves params
  python benchmarks/eval_bench.py --workdir /tmp/atm_mini                   # a table
  python benchmarks/eval_bench.py --workdir /tmp/atm_mini --batch-sizes 500,64 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True,
                        help="a finished run's workdir (its config.json and params/*.msgpack)")
    parser.add_argument("--batch-sizes", default="500,256,128,64,32",
                        help="comma-separated; the first is the reference for the accuracies")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed passes over all test splits per batch size (median reported)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    import ml_collections
    from flax import serialization

    from atm_jax import evaluate, suites

    workdir = pathlib.Path(args.workdir)
    config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    if any(s < 1 for s in sizes):
        raise SystemExit(f"--batch-sizes must be positive integers, got {args.batch_sizes!r}")
    setup = suites.get(config.suite).build(config, log=lambda msg: None)
    backbones = {"pretrained": setup.base}
    for path in sorted((workdir / "params").glob("*.msgpack")):
        backbones[path.stem] = serialization.from_bytes(setup.base, path.read_bytes())
    if len(backbones) == 1:
        print(f"no params/*.msgpack in {workdir} (run with save_params): timing the base only")
    tasks = setup.tasks
    images = sum(len(t.test[1]) for t in tasks.values())

    def correct(backbone, batch_size):
        return {name: round(evaluate.accuracy(setup.apply_fn, backbone, setup.heads[name],
                                              *task.test, batch_size=batch_size)
                            * len(task.test[1]))
                for name, task in tasks.items()}

    rows, reference, mismatches = [], None, []
    for size in sizes:
        for backbone in backbones.values():  # compile and warm
            correct(backbone, size)
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            counts = {method: correct(backbone, size) for method, backbone in backbones.items()}
            times.append((time.perf_counter() - start) / len(backbones))
        if reference is None:
            reference = counts
        differ = [f"{m}/{t}: {counts[m][t]} vs {reference[m][t]}"
                  for m in counts for t in counts[m] if counts[m][t] != reference[m][t]]
        mismatches += [f"batch {size}: {d}" for d in differ]
        seconds = common.median(times)
        rows.append((size, seconds, images / seconds, len(differ)))
        print(f"batch {size}: {seconds:.2f} s per evaluation ({images / seconds:,.0f} images/s), "
              f"{len(differ)} task accuracies differ from batch {sizes[0]}", flush=True)

    first = rows[0][1]
    table = [(f"| eval batch | s per evaluation | images/s | vs batch {sizes[0]} "
              "| task accuracies that differ |"),
             "|---:|---:|---:|---:|---:|"]
    table += [f"| {s} | {sec:.2f} | {ips:,.0f} | {first / sec:.2f}× | {d} of "
              f"{len(backbones) * len(tasks)} |" for s, sec, ips, d in rows]
    body = "\n".join(table) + "\n"
    if mismatches:
        body += "\nDiffering correct counts:\n" + "".join(f"- {m}\n" for m in mismatches)
    header = [common.versions("jax", "flax"),
              (f"config: {workdir / 'config.json'} (suite {config.suite}); {len(tasks)} test "
               f"splits, {images:,} images; backbones: {', '.join(backbones)}"),
              (f"one evaluation = every task's test split once; median of {args.repeats} "
               "passes per batch size after a warm-up pass (compiles)")]
    print("\n" + body)
    if not args.no_write:
        print(f"wrote {common.write_results('eval_bench', header, body)}")


if __name__ == "__main__":
    main()
