"""Merges called eagerly vs inside the caller's ``jax.jit``, side by side.

Researchers often wrap a whole update (merge + apply) in ``jax.jit``. On CPU that
changes which selection TIES/Breadcrumbs run: eagerly the host selection reads the
arrays directly; under ``jit`` it is called back from the compiled program
(``select.on_host``). The target: jit within 1.5× of eager. Each operator
runs in its own process on T task vectors shaped like the first ``--blocks``
transformer blocks of CLIP ViT-B/16 (3 blocks ≈ 21M float32 per task); the median
of ``--repeats`` timed calls after one warm-up call (compilation excluded).

Run::

  python benchmarks/jit_bench.py                  # 3 tasks × 3 blocks, writes results/
  python benchmarks/jit_bench.py --tasks 7 --blocks 12 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402

OPERATORS = [
    ("mean", {}),
    ("ties", {"density": 0.2}),
    ("ties", {"density": 0.2, "scope": "leaf"}),
    ("breadcrumbs", {"beta": 0.85, "gamma": 0.993}),
    ("dare", {"p": 0.9}),
]


def _label(name: str, hparams: dict) -> str:
    return name + "".join(f" {k}={v}" for k, v in hparams.items())


def worker(name: str, hparams: dict, tasks: int, blocks: int, repeats: int) -> dict:
    import jax

    from atm_jax import merge

    rng = np.random.default_rng(0)
    stacked = {path: jax.numpy.asarray(rng.standard_normal((tasks, *shape), np.float32) * 1e-3)
               for path, shape in common.vit_b16_shapes(blocks).items()}
    fn = merge.get(name)
    key = jax.random.key(0)
    kwargs = dict(hparams, key=key) if merge.info(name).stochastic else dict(hparams)
    eager = lambda s: fn(s, **kwargs)  # noqa: E731
    jitted = jax.jit(eager)

    def timed(f):
        jax.block_until_ready(f(stacked))  # warm-up (compiles)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(f(stacked))
            times.append(time.perf_counter() - start)
        return float(np.median(times))

    eager_s, jit_s = timed(eager), timed(jitted)
    same = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
               zip(jax.tree.leaves(eager(stacked)), jax.tree.leaves(jitted(stacked))))
    entries = sum(int(np.prod(s)) for s in common.vit_b16_shapes(blocks).values())
    return {"eager": eager_s, "jit": jit_s, "identical": same, "entries": entries}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=3)
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        name, hparams = json.loads(args.worker)
        print(json.dumps(worker(name, hparams, args.tasks, args.blocks, args.repeats)))
        return
    rows = []
    for name, hparams in OPERATORS:
        out = common.run_worker(__file__, ["--worker", json.dumps([name, hparams]),
                                           "--tasks", str(args.tasks), "--blocks", str(args.blocks),
                                           "--repeats", str(args.repeats)])
        if out is None:
            continue
        ratio = out["jit"] / out["eager"]
        rows.append(f"| {_label(name, hparams)} | {out['eager']:.3f} | {out['jit']:.3f} | "
                    f"{ratio:.2f}× | {'yes' if out['identical'] else 'NO'} |")
        print(rows[-1], flush=True)
        entries = out["entries"]
    body = "\n".join([
        f"{args.tasks} task vectors × {entries / 1e6:.1f}M float32 (ViT-B/16's first "
        f"{args.blocks} blocks), median of {args.repeats} calls after a warm-up.", "",
        "| operator | eager s | under jax.jit s | jit ÷ eager | identical |",
        "|---|---|---|---|---|", *rows])
    print(body)
    if not args.no_write:
        path = common.write_results("jit_bench", [common.versions("jax", "numpy")], body)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
