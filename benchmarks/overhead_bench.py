"""Where an ATM iteration's wall time goes outside finetuning.

Runs one ATM method of a config through the real runner (``run_experiment``) with
timers around the parts of an iteration: the task finetunes, evaluation after each
merge, the merge itself, checkpoint writes (steps and finetuned-model items) and
the metrics lines. The rest of the ATM unit's wall time (state bookkeeping, key
derivation, logging) is reported as "other". The goal is finetuning ≥ 90 % of the
unit. Pretraining and data are cached first (a plain run of the same config), so
only the ATM unit is timed.

Run::

  python benchmarks/overhead_bench.py                      # configs/mini.py, method "atm"
  python benchmarks/overhead_bench.py --config configs/mini.py:tiny --no-write
  python benchmarks/overhead_bench.py --eval-every 2       # evaluate every 2nd iteration
"""

from __future__ import annotations

import argparse
import collections
import functools
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/mini.py")
    parser.add_argument("--method", default="atm", help="the ATM method of the config to time")
    parser.add_argument("--eval-batch-size", type=int, help="override config.eval_batch_size")
    parser.add_argument("--eval-every", type=int, help="override config.eval_every")
    parser.add_argument("--sync-checkpoints", action="store_true",
                        help="write checkpoints on the calling thread (as before 2026-12-01)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    import jax

    from atm_jax import atm, checkpoint, finetune, runner, writers

    config = common.load_config(args.config)
    if args.method not in config.methods or config.methods[args.method].kind != "atm":
        raise SystemExit(f"--method {args.method!r} is not an ATM method of {args.config}.")
    with config.unlocked():
        for name in list(config.methods):
            if name != args.method:
                del config.methods[name]
        config.references = ()
        config.progress = False
        if args.eval_batch_size:
            config.eval_batch_size = args.eval_batch_size
        if args.eval_every:
            config.eval_every = args.eval_every
    if args.sync_checkpoints:
        checkpoint.Checkpointer.__init__ = functools.partialmethod(
            checkpoint.Checkpointer.__init__, background=False)

    spent: dict[str, float] = collections.defaultdict(float)
    calls: dict[str, int] = collections.Counter()

    def timed(part, fn):
        @functools.wraps(fn)
        def wrapper(*a, **k):
            start = time.perf_counter()
            try:
                return jax.block_until_ready(fn(*a, **k))
            finally:
                spent[part] += time.perf_counter() - start
                calls[part] += 1
        return wrapper

    patches = [(finetune.Finetuner, "finetune", "finetune"),
               (runner.Runner, "evaluate", "evaluate"),
               (atm, "merge_step", "merge"),
               (checkpoint.Checkpointer, "save", "checkpoint step"),
               (checkpoint.Checkpointer, "save_item", "checkpoint item"),
               (writers.MetricsWriter, "__call__", "metrics line"),
               (checkpoint.Checkpointer, "close", "close")]
    for owner, attr, part in patches:
        setattr(owner, attr, timed(part, getattr(owner, attr)))

    with tempfile.TemporaryDirectory() as tmp:
        lines: list[str] = []
        out = runner.run_experiment(config, pathlib.Path(tmp) / "run", log=lines.append)
    unit = out["timings_seconds"][args.method]
    closing = spent.pop("close", 0.0)  # after the unit: the last writes finishing
    accounted = sum(spent.values())
    rows = [f"| {part} | {calls[part]} | {seconds:.1f} | {100 * seconds / unit:.1f} % |"
            for part, seconds in sorted(spent.items(), key=lambda kv: -kv[1])]
    rows.append(f"| other (bookkeeping, logging) | | {unit - accounted:.1f} | "
                f"{100 * (unit - accounted) / unit:.1f} % |")
    outside = unit - spent["finetune"]
    spec = config.methods[args.method]
    body = "\n".join([
        f"`{args.config}`, method `{args.method}`: {spec.iterations} iterations × "
        f"{len(config.tasks)} tasks × {config.budget // spec.iterations} epoch(s); the ATM unit "
        f"took {unit:.1f} s; eval batch {config.eval_batch_size}, test evaluation every "
        f"{config.eval_every} iteration(s) (and the last); checkpoints written "
        f"{'on the calling thread' if args.sync_checkpoints else 'in the background'} (the "
        "checkpoint rows time what the run waits for: host copies, CRCs, the previous "
        f"write; the last writes finished {closing:.1f} s after the unit, at close).", "",
        "| part | calls | seconds | share of the unit |", "|---|---|---|---|", *rows, "",
        f"**Outside finetuning: {outside:.1f} s = {100 * outside / unit:.1f} % of the unit** "
        "(goal ≤ 10 %)."])
    print(body)
    if not args.no_write:
        path = common.write_results("overhead_bench", [common.versions("jax", "flax", "orbax")], body)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
