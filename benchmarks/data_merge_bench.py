"""What the merges that look at data cost beside one ATM iteration's finetuning.

On a suite's real tasks and backbone (``--config``, default configs/mini.py): every
task is finetuned for one epoch from the base (one ATM iteration's finetuning,
timed), then each data merge runs once through ``merge_step`` with the suite's
`runner.suite_merge_data` (the first ``config.merge_data.examples`` training examples
per task; AdaMerging the unlabeled test inputs). Times are wall seconds of the first
call (what a run pays: compilation included) and of a second call (warm), with the
statistics' share. The goal: capturing the statistics and merging with RegMean and
Fisher takes less than the iteration's finetuning.

Run::

  python benchmarks/data_merge_bench.py                          # mini, writes results/
  python benchmarks/data_merge_bench.py --config configs/mini_text.py
  python benchmarks/data_merge_bench.py --config configs/mini.py:tiny --no-write
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402

MERGES = {"regmean": {"off_diagonal_scale": 0.95}, "fisher": {},
          "regmean_pp": {"off_diagonal_scale": 0.95}, "adamerging": {"steps": 200, "batch_size": 16}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/mini.py")
    parser.add_argument("--only", default=",".join(MERGES), help="comma-separated merges")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    import jax

    from atm_jax import atm, runner

    config = common.load_config(args.config)
    setup, finetuned, heads, finetune_seconds = common.finetuned_suite(config, epochs=1)
    tasks = list(setup.heads)
    key = jax.random.key(config.seed)
    print(f"one ATM iteration's finetuning ({len(tasks)} tasks × 1 epoch): {finetune_seconds:.1f} s")

    def features(backbone, inputs):
        return setup.apply_fn(backbone, inputs, False)
    data = runner.suite_merge_data(setup, config.merge_data, tasks, features)
    data = atm.MergeData(**{**data.__dict__, "heads": heads})
    rows = []
    for name in args.only.split(","):
        spec = atm.MergeSpec(name, MERGES[name])
        seconds = []
        for _ in range(2):
            t0 = time.perf_counter()
            _, diag = atm.merge_step(setup.base, finetuned, spec, key=atm.merge_key(key, 0),
                                     data=data)
            seconds.append(time.perf_counter() - t0)
        used = diag["data"]
        stats = used.get("statistics_seconds")
        rows.append((name, seconds[0], seconds[1], stats, used))
        print(f"{name}: first {seconds[0]:.2f} s, warm {seconds[1]:.2f} s, statistics {stats} s")

    n = config.merge_data.examples
    lines = ["| merge | first call (s) | warm call (s) | statistics, warm (s) | ÷ finetuning "
             "(first) | data seen |", "|---|---|---|---|---|---|"]
    for name, first, warm, stats, used in rows:
        seen = (f"{sorted(set(used['unlabeled_per_task'].values()))} unlabeled test inputs / task"
                if "unlabeled_per_task" in used else
                f"{sorted(set(used['examples_per_task'].values()))} training examples / task"
                + (f", labels {used['fisher_labels']}" if "fisher_labels" in used else ""))
        lines.append(f"| {name} | {first:.2f} | {warm:.2f} | "
                     f"{'–' if stats is None else f'{stats:.2f}'} | {first / finetune_seconds:.3f} "
                     f"| {seen} |")
    body = (f"One ATM iteration's finetuning ({len(tasks)} tasks × 1 epoch, "
            f"{args.config}): **{finetune_seconds:.1f} s**. merge_data.examples = {n}.\n\n"
            + "\n".join(lines) + "\n")
    print(body)
    if not args.no_write:
        path = common.write_results("data_merge_bench", [f"config: {args.config}",
                                                         common.versions("jax", "flax")], body)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
