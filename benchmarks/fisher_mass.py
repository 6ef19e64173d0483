"""How the tasks' diagonal Fishers weigh against each other in the Fisher merge.

Finetunes every task of ``--config`` (default configs/mini.py) for the one-shot budget
from the base, with the runner's task keys, computes each task's empirical Fisher on
the first ``config.merge_data.examples`` training examples (what the `fisher` row of the
``:study`` variant sees), and prints per task: the Fisher's total mass, the share of
weights where that task's Fisher is the largest, and its mean weight
``F_t / Σ_s F_s`` in the merge ``θ* = Σ_t F_t θ_t / Σ_t F_t``.

Run::

  python benchmarks/fisher_mass.py                   # mini, seed 0: ≈ 2 min on 2 quiet cores
  python benchmarks/fisher_mass.py --config configs/mini.py:tiny --no-write
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/mini.py")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    import jax

    from atm_jax import capture
    from atm_jax.models.heads import apply_head

    config = common.load_config(args.config)
    setup, finetuned, heads, _ = common.finetuned_suite(config, epochs=config.budget)
    tasks = list(setup.heads)
    n = config.merge_data.examples

    def logits(backbone, inputs, head):
        return apply_head(head, setup.apply_fn(backbone, inputs, False))

    fishers = []
    for t, params in zip(tasks, finetuned):
        x, y = setup.tasks[t].train
        fisher = capture.diagonal_fisher(logits, params, x[:n], y[:n], extra=heads[t])
        fishers.append(np.concatenate([np.asarray(leaf, np.float64).ravel()
                                       for leaf in jax.tree.leaves(fisher)]))
        print(f"{t}: Fisher mass {fishers[-1].sum():.4g}", flush=True)
    stacked = np.stack(fishers)  # [T, weights]
    largest = np.bincount(stacked.argmax(0), minlength=len(tasks)) / stacked.shape[1]
    weight = (stacked / np.maximum(stacked.sum(0, keepdims=True), 1e-30)).mean(1)
    lines = ["| task | Fisher mass (sum over weights) | largest Fisher on (% of weights) | "
             "mean weight in the merge |", "|---|---:|---:|---:|"]
    for t, f, share, w in zip(tasks, stacked, largest, weight):
        lines.append(f"| {t} | {f.sum():.4g} | {100 * share:.1f} | {w:.3f} |")
    body = (f"{args.config}, seed {config.seed}: every task finetuned {config.budget} epochs "
            f"(the one-shot finetunes), empirical Fisher on the first {n} training examples, "
            f"{stacked.shape[1]:,} weights.\n\n" + "\n".join(lines) + "\n")
    print(body)
    if not args.no_write:
        path = common.write_results("fisher_mass", [f"config: {args.config}",
                                                    common.versions("jax", "flax")], body)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
