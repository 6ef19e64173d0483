"""Do the merges give the same answer on an accelerator as on the CPU?

On the CPU the exact k-th magnitude comes from the host selection; on a GPU or TPU
from the bit-pattern bisection (`atm_jax.select`). Both are exact, so TIES and
Breadcrumbs must agree bit for bit on the kept set; the merged values may differ
only by float summation order. This script merges the same random task vectors
(ViT-B/16-like leaf shapes, a given number of blocks) on the default device and on
the CPU backend and prints, per operator, the time on each and the largest
difference.

Run on a machine with an accelerator::

  python benchmarks/accelerator_check.py --tasks 7 --blocks 12
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from atm_jax import merge

OPS = {"mean": {}, "ties": {"density": 0.15}, "breadcrumbs": {"beta": 0.85, "gamma": 0.993},
       "dare": {"p": 0.9}, "dare_ties": {"p": 0.9}}


def task_vectors(tasks: int, blocks: int, seed: int = 0) -> dict:
    """Stacked [T, ...] float32 leaves in ViT-B/16 shapes (width 768, MLP 3072)."""
    rng = np.random.default_rng(seed)
    shapes = {"embed/kernel": (16, 16, 3, 768), "pos": (197, 768)}
    for b in range(blocks):
        shapes.update({f"block{b}/qkv": (768, 2304), f"block{b}/out": (768, 768),
                       f"block{b}/mlp_in": (768, 3072), f"block{b}/mlp_out": (3072, 768),
                       f"block{b}/ln": (768,)})
    return {k: (rng.standard_normal((tasks, *s), dtype=np.float32)
                * rng.uniform(0.5, 2.0, (tasks,) + (1,) * len(s)).astype(np.float32))
            for k, s in shapes.items()}


def timed(fn, *args, repeats=3, **kwargs):
    out = jax.block_until_ready(fn(*args, **kwargs))  # warm-up (compiles)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = jax.block_until_ready(fn(*args, **kwargs))
        times.append(time.perf_counter() - start)
    return out, float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=7)
    parser.add_argument("--blocks", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    accel, cpu = jax.devices()[0], jax.devices("cpu")[0]
    host = task_vectors(args.tasks, args.blocks)
    numel = sum(v[0].size for v in host.values())
    print(f"jax {jax.__version__}; default device {accel.device_kind} ({accel.platform}); "
          f"{args.tasks} task vectors × {numel / 1e6:.1f}M float32")
    on_accel = jax.device_put(host, accel)
    on_cpu = jax.device_put(host, cpu)
    key = jax.random.key(0)
    print("| operator | accelerator s | CPU s | max |difference| | kept sets equal |")
    print("|---|---:|---:|---:|---|")
    for name, hparams in OPS.items():
        fn = merge.get(name)
        kwargs = dict(hparams, **({"key": key} if merge.info(name).stochastic else {}))
        a, ta = timed(fn, on_accel, repeats=args.repeats, **kwargs)
        with jax.default_device(cpu):
            kw_cpu = dict(hparams, **({"key": jax.device_put(key, cpu)}
                                     if merge.info(name).stochastic else {}))
            c, tc = timed(fn, on_cpu, repeats=args.repeats, **kw_cpu)
        diff = max(float(jnp.max(jnp.abs(jnp.asarray(np.asarray(x)) - np.asarray(y))))
                   for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(c)))
        same_support = all(np.array_equal(np.asarray(x) != 0, np.asarray(y) != 0)
                           for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(c)))
        print(f"| {name} | {ta:.3f} | {tc:.3f} | {diff:.2e} | {same_support} |", flush=True)


if __name__ == "__main__":
    main()
