"""``python -m atm_jax.analysis <workdir>``: the analysis of a finished run.

Rebuilds the run's suite from ``<workdir>/config.json`` (data and the pretrained
base come from the cache) for Theorem 3.1's gap table and the gradient structure
(`atm_jax.analysis.theory`, written to ``analysis/theory.json`` / ``theory.md``),
then writes ``analysis/analysis.json``, ``analysis/figures/`` and
``<workdir>/tensorboard/analysis/`` from what the run recorded (`atm_jax.analysis.report`).
The run must have had ``config.analysis`` on (``configs/mini.py:analysis``).
"""

from __future__ import annotations

import argparse
import json
import sys

import jax

from atm_jax import files, suites
from atm_jax.analysis import report, theory
from atm_jax.finetune import OptimizerConfig


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def run_theory(workdir, *, etas, epochs, examples: int, structure_epochs: int | None,
               tasks: list[str] | None = None, log=print) -> dict:
    """Theorem 3.1's gap and the gradient structure on the run's tasks (or ``tasks``)
    and pretrained base, on the first ``examples`` training examples of each task."""
    import ml_collections

    workdir = files.as_path(workdir)
    config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
    config.tasks = tuple(config.tasks)
    setup = suites.get(config.suite).build(config, log)
    unknown = sorted(set(tasks or ()) - set(setup.tasks))
    if unknown:
        raise SystemExit(f"error: --tasks names {unknown}, not tasks of this run "
                         f"({list(setup.tasks)}).")
    data = {t: tuple(a[:examples] for a in task.train) for t, task in setup.tasks.items()
            if not tasks or t in tasks}
    log(f"theory: Theorem 3.1 on {examples} examples per task, η {etas}, k {epochs}")
    gap = theory.gradient_gap(setup.apply_fn, setup.base, setup.heads, data, etas=etas,
                              epochs=epochs)
    opt = OptimizerConfig(**config.optimizer.to_dict())
    e = structure_epochs or int(config.budget)
    log(f"theory: gradient structure, {e} epochs of {opt.name} per task")
    structure = theory.gradient_structure(setup.apply_fn, setup.base, setup.heads, data, opt,
                                          epochs=e, key=jax.random.key(int(config.seed)))
    out = {"theorem_3_1": gap, "gradient_structure": structure}
    folder = workdir / "analysis"
    files.write_json(folder / "theory.json", out)
    files.write_text(folder / "theory.md",
                     "Theorem 3.1: relative gap ‖Σ_t τ_t⁽ᵏ⁾ + kη Σ_t ∇L̄_t(θ_base)‖ / "
                     "‖kη Σ_t ∇L̄_t(θ_base)‖ (full-batch GD, SGD, no clipping) and the cosine "
                     f"between them; {examples} examples per task.\n\n" + theory.gap_table(gap))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m atm_jax.analysis", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdir")
    parser.add_argument("--no-theory", action="store_true",
                        help="skip Theorem 3.1 and the gradient structure (no data or model load)")
    parser.add_argument("--etas", default="0.001,0.01,0.1", help="SGD learning rates η")
    parser.add_argument("--epochs", default="1,2,5", help="full-batch GD epochs k")
    parser.add_argument("--examples", type=int, default=256,
                        help="training examples per task for the theory (each is one full batch)")
    parser.add_argument("--tasks", default="", help="comma-separated subset of the run's tasks "
                        "for the theory (default: all)")
    parser.add_argument("--structure-epochs", type=int, default=0,
                        help="epochs of the gradient structure (0: the run's budget)")
    args = parser.parse_args(argv)
    if not args.no_theory:
        run_theory(args.workdir, etas=_floats(args.etas), epochs=_ints(args.epochs),
                   examples=args.examples, structure_epochs=args.structure_epochs,
                   tasks=[t for t in args.tasks.split(",") if t])
    try:
        report.build(args.workdir)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
