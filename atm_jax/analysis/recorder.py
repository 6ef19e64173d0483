"""What the runner records for the analysis while a run goes (``config.analysis``).

Data that exists only during a run is written under ``<workdir>/analysis/`` as it
appears, one file per (method, iteration), so a resumed run rewrites exactly the
files it redoes and none is lost:

* ``bases/<name>.npy`` and ``bases/<method>/iteration<k>.npy``: flattened float32
  backbones (the pretrained base, every one-shot merge, every ATM base) for the
  trajectory PCA (`atm_jax.analysis.geometry.pca_from_files` reads two at a time);
* ``one_shot/<method>.json``: the T×T cosine matrix of the one-shot task vectors,
  their norms, and for α-tuned rows the validation accuracy of every α;
* ``atm/<method>/iteration<k>.json``: after merge k (k = 0: the start), the cosine
  matrix of the task vectors merged, and every task's mean loss on the split the
  method trains on at the new base (Theorem 5.1's bookkeeping);
* ``atm/<method>/finetuned<k>.json``: each finetuned model's loss on its own task
  in iteration k, before the merge.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from atm_jax import files
from atm_jax import tree as tree_lib
from atm_jax.analysis.losses import LossFn

__all__ = ["Recorder", "flat"]

PyTree = Any


def flat(params: PyTree) -> np.ndarray:
    """A backbone as one float32 vector (every leaf, in pytree order)."""
    return np.asarray(tree_lib.ravel(params)[0], np.float32)


class Recorder:
    """Writes the analysis files of one run (process 0 only, through `atm_jax.files`).

    Args:
      workdir: the run's workdir; files go to ``<workdir>/analysis``.
      setup: the suite's `Setup` (tasks, apply_fn) for the loss bookkeeping.
      batch_size: rows per loss forward pass.
    """

    def __init__(self, workdir, setup, *, batch_size: int = 500):
        self.folder = files.as_path(workdir) / "analysis"
        self.setup = setup
        self.batch_size = batch_size
        self.loss_fn = LossFn(setup.apply_fn)

    # -- files ----------------------------------------------------------------------------
    def write_json(self, relative: str, content: Mapping) -> None:
        files.write_json(self.folder / relative, json.loads(json.dumps(content, default=files.jsonable)))

    def save_base(self, relative: str, params: PyTree) -> None:
        buffer = io.BytesIO()
        np.save(buffer, flat(params))
        files.write_bytes(self.folder / "bases" / f"{relative}.npy", buffer.getvalue())

    # -- losses ---------------------------------------------------------------------------
    def losses(self, params: PyTree, heads: Mapping[str, dict], split: str) -> dict:
        out = {}
        for task, head in heads.items():
            inputs, labels = self.setup.tasks[task].split(split)
            out[task] = self.loss_fn.mean(params, head, inputs, labels, batch_size=self.batch_size)
        return out

    def sizes(self, split: str) -> dict[str, int]:
        return {t: len(task.split(split)[1]) for t, task in self.setup.tasks.items()}

    # -- the events -----------------------------------------------------------------------
    def pretrained(self, base: PyTree) -> None:
        self.save_base("pretrained", base)

    def one_shot(self, method: str, params: PyTree, diagnostics: Mapping, *,
                 alpha: float, alpha_validation: Mapping[float, float] | None = None) -> None:
        self.save_base(method, params)
        content = {"method": method, "alpha": alpha, "cosine": diagnostics["cosine"],
                   "task_vector_norm": diagnostics["task_vector_norm"],
                   "delta_norm": diagnostics["delta_norm"]}
        if alpha_validation is not None:
            content["alpha_validation"] = [[float(a), float(v)] for a, v in alpha_validation.items()]
        self.write_json(f"one_shot/{method}.json", content)

    def atm_progress(self, method: str, split: str, *, start: str = "pretrained"
                     ) -> Callable[[Any], None]:
        """An ``on_progress(state)`` that records the merge-time data of ``method``."""
        def on_progress(state) -> None:
            tasks = state.tasks
            k = state.iteration
            if len(state.finetuned) == len(tasks):  # every task finetuned: before the merge
                own = {}
                for task, params in zip(tasks, state.finetuned):
                    inputs, labels = self.setup.tasks[task].split(split)
                    own[task] = self.loss_fn.mean(params, state.finetuned_heads[task], inputs,
                                                  labels, batch_size=self.batch_size)
                self.write_json(f"atm/{method}/finetuned{k + 1}.json",
                                {"iteration": k + 1, "split": split, "losses": own})
            elif not state.finetuned and state.history and state.history[-1]["iteration"] == k:
                record = state.history[-1]
                merge = record.get("merge", {})
                content = {"iteration": k, "split": split, "start": start,
                           "losses": self.losses(state.base, state.heads, split),
                           "sizes": self.sizes(split),
                           "accuracy": record.get("accuracy")}
                if merge:
                    content.update(cosine=merge["cosine"],
                                   task_vector_norm=merge["task_vector_norm"],
                                   delta_norm=merge["delta_norm"])
                self.write_json(f"atm/{method}/iteration{k}.json", content)
                self.save_base(f"{method}/iteration{k}", state.base)
        return on_progress
