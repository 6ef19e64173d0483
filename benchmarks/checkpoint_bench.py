"""What checkpointing costs at paper scale: save and restore of ATM checkpoints.

Inside an ATM iteration every task's finetune is checkpointed (so a preemption
loses at most one task's finetune). Table 1 times `atm_jax.checkpoint` (orbax,
synchronous, plus a CRC-32 of every array) for one checkpoint holding the base and
T finetuned copies of CLIP ViT-B/16 image-encoder sized params (≈86M float32 each).
Table 2 times the saves of one whole ATM iteration of T tasks, side by side: every
step holding all finetunes so far (the first design, O(T²) bytes) vs each finetune
written once as an item and the steps naming it (what `atm_jax.runner` does).

Run::

  python benchmarks/checkpoint_bench.py                  # writes benchmarks/results/
  python benchmarks/checkpoint_bench.py --copies 0 1 --no-write   # quick look
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402
from common import vit_b16_shapes  # noqa: E402


def params(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {path: rng.standard_normal(shape, dtype=np.float32)
            for path, shape in vit_b16_shapes().items()}


def measure(copies: int, directory: pathlib.Path, repeats: int) -> dict:
    from atm_jax import checkpoint

    state = {"key": np.arange(2, dtype=np.uint32), "base": params(0),
             "finetuned": {str(i): params(i + 1) for i in range(copies)}}
    nbytes = sum(a.nbytes for tree in [state["base"], *state["finetuned"].values()]
                 for a in tree.values())
    saves, restores, crcs = [], [], []
    for r in range(repeats):
        folder = directory / f"c{copies}_{r}"
        ckpt = checkpoint.Checkpointer(folder, keep=2, log=lambda *_: None)
        t0 = time.perf_counter()
        checkpoint.digest(state)
        crcs.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ckpt.save(1, state, {"position": {}})
        saves.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        restored = ckpt.latest()
        restores.append(time.perf_counter() - t0)
        assert restored is not None and restored.step == 1
        ckpt.close()
        shutil.rmtree(folder)
    return {"copies": copies, "gib": nbytes / 2**30, "save": float(np.median(saves)),
            "restore": float(np.median(restores)), "crc": float(np.median(crcs))}


def iteration(tasks: int, directory: pathlib.Path, items: bool) -> float:
    """Seconds of checkpoint saves in one ATM iteration of ``tasks`` task finetunes."""
    from atm_jax import checkpoint

    base = params(0)
    models = [params(i + 1) for i in range(tasks)]
    folder = directory / f"iteration_{'items' if items else 'full'}"
    ckpt = checkpoint.Checkpointer(folder, keep=3, log=lambda *_: None)
    t0 = time.perf_counter()
    crcs = {}
    for k in range(1, tasks + 1):
        if items:
            crcs[f"task{k}"] = ckpt.save_item(f"task{k}", models[k - 1])
            ckpt.save(k, {"base": base}, {}, crcs)
        else:
            ckpt.save(k, {"base": base, "finetuned": {str(i): m for i, m in enumerate(models[:k])}}, {})
    seconds = time.perf_counter() - t0
    ckpt.close()
    shutil.rmtree(folder)
    return seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, nargs="+", default=[0, 1, 3, 7],
                        help="finetuned models in the checkpoint besides the base")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    base = pathlib.Path(args.dir or tempfile.mkdtemp(prefix="ckpt_bench_"))
    rows = [measure(c, base, args.repeats) for c in args.copies]
    lines = ["| models in checkpoint | size | save (incl. CRC) | of which CRC-32 | restore + verify | save GiB/s |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| 1 + {r['copies']} | {r['gib']:.2f} GiB | {r['save']:.2f} s | {r['crc']:.2f} s | "
                     f"{r['restore']:.2f} s | {r['gib'] / r['save']:.2f} |")
    tasks = max(args.copies)
    if tasks:
        model_gib = rows[0]["gib"] / (1 + rows[0]["copies"])
        full = iteration(tasks, base, items=False)
        once = iteration(tasks, base, items=True)
        lines += ["", f"One ATM iteration of {tasks} tasks (a checkpoint after every task finetune):", "",
                  "| checkpoint layout | bytes written (from the sizes) | saves in the iteration |", "|---|---:|---:|",
                  f"| every step holds base + all finetunes so far | {(tasks + tasks * (tasks + 1) / 2) * model_gib:.1f} GiB | {full:.1f} s |",
                  f"| each finetune once as an item (atm_jax) | {2 * tasks * model_gib:.1f} GiB | {once:.1f} s |"]
    table = "\n".join(lines)
    print(table)
    if args.no_write:
        return
    import jax
    import orbax.checkpoint as ocp

    path = common.write_results("checkpoint_bench", [
        f"disk of {base}",
        f"jax {jax.__version__}, orbax-checkpoint {ocp.__version__}",
        f"each model: CLIP ViT-B/16 image encoder leaf shapes, "
        f"{sum(np.prod(s) for s in vit_b16_shapes().values()) / 1e6:.1f}M float32; "
        f"median of {args.repeats}; save is synchronous and atomic",
    ], table)
    print(f"\nwrote {path.relative_to(common.ROOT)}")


if __name__ == "__main__":
    main()
