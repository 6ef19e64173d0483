"""What a run leaves in its workdir: metrics JSONL, results JSON/Markdown, plots.

Only process 0 writes (``jax.process_index() == 0``); other processes get no-op
writers, so multi-host code can call these unconditionally. Files that are
rewritten whole (JSON, Markdown, PNG) are written atomically through
`atm_jax.files`, so an interrupted run never leaves a half-written result; the
workdir may be local or remote (``gs://…``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from atm_jax import files

__all__ = ["is_writer", "write_text", "write_bytes", "write_json", "MetricsWriter", "results_markdown", "plot_results"]


is_writer = files.is_writer
write_text = files.write_text
write_bytes = files.write_bytes
write_json = files.write_json


class MetricsWriter:
    """Appends one JSON line per task per (method, iteration) to ``metrics.jsonl``.

    The file is append-only: ``count`` is how many records it holds, which each
    checkpoint stores, and a resumed run :meth:`resume`-s the file to exactly that
    many (records written after the checkpoint, about to be written again, are
    dropped; a last line torn by a kill is dropped with them). On a local disk the
    file is truncated and appended to; an object store cannot append, so there the
    whole file is rewritten each time.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = files.as_path(path)
        self.count = 0
        self._lines: list[str] = []  # what an object store's file holds (no append)
        if is_writer():
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def resume(self, count: int = 0, lines: Sequence[str] | None = None) -> None:
        """Keeps the first ``count`` records (a fresh run: none).

        ``lines``: a checkpoint of an earlier release stored the records' text
        itself; the file is then rewritten with exactly those.

        Raises:
          ValueError: the file holds fewer than ``count`` whole records (it was
            edited or lost after the checkpoint).
        """
        if lines is not None:
            self._lines, self.count = list(lines), len(lines)
            write_text(self.path, "".join(line + "\n" for line in self._lines))
            return
        if not is_writer():  # another process's file: only process 0 reads and writes it
            self.count = count
            return
        text = self.path.read_text() if count and self.path.exists() else ""
        kept = text.split("\n")[:count] if count else []
        if len(kept) < count or any(not line for line in kept):
            raise ValueError(f"{self.path} holds {len([k for k in kept if k])} whole records but "
                             f"the checkpoint counts {count}: it was changed after the "
                             "checkpoint; restore it or start a new --workdir.")
        self._lines, self.count = kept, count
        if files.is_local(self.path):
            size = sum(len(line.encode()) + 1 for line in kept)
            with open(self.path, "a") as f:
                f.truncate(size)
        else:
            write_text(self.path, "".join(line + "\n" for line in kept))

    def __call__(self, record: Mapping[str, Any]) -> None:
        """Splits an iteration record (`atm_jax.atm.record` format) into per-task lines.

        Every task with an accuracy or a finetune in the record gets a line: an
        iteration that was not evaluated (``eval_every`` > 1) still writes its train
        loss and task-vector norms.
        """
        finetune = record.get("finetune", {})
        merge = record.get("merge", {})
        norms = merge.get("task_vector_norm")
        accuracy = record.get("accuracy", {})
        tasks = list(accuracy) or list(finetune)
        lines = []
        for i, task in enumerate(tasks):
            line = {"method": record["method"], "iteration": record["iteration"],
                    "epochs_per_task": record.get("epochs_per_task"), "task": task}
            if task in accuracy:
                line["accuracy"] = accuracy[task]
            if task in finetune:
                loss = finetune[task].get("loss") or [None]
                line["train_loss"] = loss[-1]
            if norms is not None and i < len(norms):
                line["task_vector_norm"] = norms[i]
            lines.append(json.dumps(line, default=files.jsonable))
        if not lines:
            return
        self.count += len(lines)
        if not is_writer():
            return
        if not files.is_local(self.path):  # object stores cannot append
            self._lines += lines
            write_text(self.path, "".join(line + "\n" for line in self._lines))
            return
        with open(self.path, "a") as f:
            f.write("\n".join(lines) + "\n")
            f.flush()
            os.fsync(f.fileno())


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def results_markdown(rows: Sequence[Mapping[str, Any]], tasks: Sequence[str], *,
                     title: str = "", notes: Sequence[str] = ()) -> str:
    """A Markdown table like the paper's Table 1: methods × tasks, average, normalized.

    Args:
      rows: ``{"method", "accuracy": {task: acc}, "average", "normalized"?, "epochs"?}``.
      tasks: column order.
      title: a heading line.
      notes: lines printed under the table.
    """
    head = ["method", "epochs/task", *tasks, "average", "normalized"]
    out = []
    if title:
        out += [f"### {title}", ""]
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|")
    for row in rows:
        acc = row["accuracy"]
        cells = [row["method"], str(row.get("epochs", "–"))]
        cells += [_pct(acc.get(t)) for t in tasks]
        cells.append(_pct(row.get("average")))
        norm = row.get("normalized")
        cells.append("–" if norm is None else f"{norm:.3f}")
        out.append("| " + " | ".join(cells) + " |")
    if notes:
        out.append("")
        out += [f"- {n}" for n in notes]
    return "\n".join(out) + "\n"


def plot_results(workdir: str | os.PathLike, rows: Sequence[Mapping[str, Any]],
                 curves: Mapping[str, Sequence[Mapping[str, Any]]], tasks: Sequence[str]) -> list[str]:
    """PNG plots: average and per-task accuracy vs iteration, and a per-task bar chart.

    Args:
      rows: the final table rows (as for :func:`results_markdown`).
      curves: ``{method: history}`` for iterative methods (records with
        ``iteration``, ``accuracy``, ``average_accuracy``).
      tasks: task order.

    Returns:
      The paths written (empty on processes other than 0).
    """
    if not is_writer():
        return []
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workdir = files.as_path(workdir)
    written = []
    flat = [r for r in rows if r["method"] not in curves]
    palette = plt.get_cmap("tab10").colors
    # One color per method across all plots, in table order.
    order = [r["method"] for r in rows] + [m for m in curves if m not in {r["method"] for r in rows}]
    color = {m: palette[i % len(palette)] for i, m in enumerate(order)}

    def save(fig, name):
        path = workdir / name
        files.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120, bbox_inches="tight"))
        plt.close(fig)
        written.append(str(path))

    def draw(ax, value_of, ylabel):
        max_it = max((h[-1]["iteration"] for h in curves.values() if h), default=1)
        for method, history in curves.items():
            history = [h for h in history if "accuracy" in h]  # eval_every > 1 skips some
            its = [h["iteration"] for h in history]
            ax.plot(its, [100 * value_of(h) for h in history], marker="o", ms=3, lw=2,
                    color=color[method], label=method)
        for row in flat:
            v = value_of({"accuracy": row["accuracy"], "average_accuracy": row["average"]})
            if v is None:
                continue
            ax.hlines(100 * v, 0, max_it, linestyles="--", lw=1, color=color[row["method"]],
                      label=row["method"])
        ax.set_xlabel("iteration")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    draw(ax, lambda h: h["average_accuracy"], "average test accuracy (%)")
    ax.set_title("Average accuracy vs iteration (one-shot methods dashed)")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    save(fig, "accuracy_vs_iteration.png")

    cols = min(4, len(tasks))
    nrows = int(np.ceil(len(tasks) / cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3.2 * nrows), squeeze=False)
    for ax, task in zip(axes.flat, tasks):
        draw(ax, lambda h, t=task: h["accuracy"].get(t), "test accuracy (%)")
        ax.set_title(task)
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    save(fig, "per_task_accuracy_vs_iteration.png")

    fig, ax = plt.subplots(figsize=(max(7, 1.6 * len(tasks) + 2), 4.5))
    width = 0.8 / max(1, len(rows))
    x = np.arange(len(tasks) + 1)
    for i, row in enumerate(rows):
        vals = [100 * row["accuracy"].get(t, np.nan) for t in tasks] + [100 * row["average"]]
        ax.bar(x + (i - (len(rows) - 1) / 2) * width, vals, width, label=row["method"],
               color=color[row["method"]])
    ax.set_xticks(x, [*tasks, "average"])
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Per-task accuracy by method")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.grid(axis="y", alpha=0.3)
    save(fig, "per_task_bars.png")
    return written
