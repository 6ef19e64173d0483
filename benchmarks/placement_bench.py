"""What the one-device placement (a 1 × 1 mesh) costs: finetune and evaluate, two trees.

Times ``Finetuner.finetune`` (the mini suite's ViT, random init, 28×28 inputs) and
``evaluate.accuracy`` on one CPU device, for this checkout and for another source
tree (``--against``, e.g. a ``git worktree`` of a commit from before the change),
each in its own process, the two interleaved round by round so machine noise hits
both. Also checks that both trees give bitwise the same finetuned params and the
same accuracy.

Run::

  git worktree add /tmp/before 7660785
  python benchmarks/placement_bench.py --against /tmp/before          # table + results file
  python benchmarks/placement_bench.py --against /tmp/before --rounds 2 --no-write
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODEL = {"patch_size": 7, "width": 128, "depth": 4, "num_heads": 4, "mlp_dim": 512}  # mini's ViT


def worker(examples: int, epochs: int, repeats: int) -> dict:
    """Median seconds of a finetune and an evaluation under the tree on PYTHONPATH."""
    import jax
    import numpy as np

    from atm_jax import evaluate
    from atm_jax.finetune import Finetuner, OptimizerConfig
    from atm_jax.models import heads, vit_tiny

    model = vit_tiny.vit_from_config(MODEL)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (examples, 28, 28, 1), dtype=np.uint8).astype(np.float32) / 255
    y = rng.integers(0, 10, examples).astype(np.int32)
    backbone = model.init(jax.random.key(0), x[:1], False)["params"]
    head = heads.init_head(jax.random.key(1), MODEL["width"], 10)

    def apply_fn(params, inputs, train):
        return model.apply({"params": params}, inputs, train)

    ft = Finetuner(apply_fn, OptimizerConfig(learning_rate=1e-4, batch_size=32), train_head=False)
    times = {"finetune": [], "evaluate": []}
    for r in range(repeats + 1):  # the first round compiles
        start = time.perf_counter()
        params, _, _ = ft.finetune(backbone, head, x, y, epochs=epochs, key=jax.random.key(2))
        jax.block_until_ready(params)
        middle = time.perf_counter()
        acc = evaluate.accuracy(apply_fn, params, head, x, y, batch_size=500)
        end = time.perf_counter()
        if r:
            times["finetune"].append(middle - start)
            times["evaluate"].append(end - middle)
    digest = hashlib.sha256(b"".join(np.asarray(leaf).tobytes()
                                     for leaf in jax.tree.leaves(params))).hexdigest()[:16]
    return {"finetune": times["finetune"], "evaluate": times["evaluate"], "accuracy": acc,
            "params_sha256": digest, "devices": jax.device_count()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", help="another source tree to compare with (required)")
    parser.add_argument("--examples", type=int, default=1024)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per process")
    parser.add_argument("--rounds", type=int, default=3, help="processes per tree, interleaved")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.examples, args.epochs, args.repeats)))
        return
    if not args.against:
        parser.error("--against TREE is required: the source tree to compare this one with")
    trees = {"before (--against)": pathlib.Path(args.against).resolve(), "after (this)": ROOT}
    out = {name: [] for name in trees}
    for r in range(args.rounds):
        for name, tree in trees.items():
            result = common.run_worker(
                __file__, ["--worker", f"--examples={args.examples}", f"--epochs={args.epochs}",
                           f"--repeats={args.repeats}"],
                env={"PYTHONPATH": str(tree), "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""})
            if result is None:
                raise SystemExit(f"the worker failed under {tree}")
            out[name].append(result)
            print(f"round {r + 1}/{args.rounds} {name}: finetune "
                  f"{common.median(result['finetune']):.3f} s, evaluate "
                  f"{common.median(result['evaluate']):.3f} s", file=sys.stderr)
    (before, after) = (out[n] for n in trees)
    same_params = {r["params_sha256"] for r in before} == {r["params_sha256"] for r in after}
    same_acc = {r["accuracy"] for r in before} == {r["accuracy"] for r in after}
    rows = ["| part | before (s) | after (s) | after / before |", "|---|---|---|---|"]
    for part in ("finetune", "evaluate"):
        b = common.median([t for r in before for t in r[part]])
        a = common.median([t for r in after for t in r[part]])
        rows.append(f"| {part} | {b:.3f} | {a:.3f} | {a / b:.3f} |")
    body = "\n".join(rows) + (
        f"\n\nMedians over {args.rounds} processes × {args.repeats} repeats per tree, "
        f"interleaved; finetune = {args.epochs} epochs of {args.examples} examples "
        f"(batch 32, the mini ViT), evaluate = the same {args.examples} examples "
        f"(batch 500), one CPU device.\n"
        f"Finetuned params bitwise equal across trees: {'yes' if same_params else 'NO'}; "
        f"accuracy equal: {'yes' if same_acc else 'NO'}.\n")
    print(body)
    if not args.no_write:
        path = common.write_results("placement_bench", [
            f"before: {trees['before (--against)']}", "after: this checkout",
            common.versions("jax", "flax", "optax")], body)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
