"""TensorBoard summaries of a finished run's analysis through tensorboardX (a
maintained, TensorFlow-free writer): accuracy per method / task / iteration, mean
|cos| and the joint loss per ATM iteration, and the |cos| heatmap of every ATM
iteration as an image.

They are the TensorBoard run ``analysis`` (``<workdir>/tensorboard/analysis/``), beside
the runs the runner writes live, one per row (`atm_jax.event_files`). Each report
replaces its own earlier event files (named ``*.analysis``) and nothing else, so the
live events stay; files go through `atm_jax.files` (local or ``gs://…``); process 0
only (the caller checks)."""

from __future__ import annotations

from atm_jax import event_files, files
from atm_jax.analysis import figures

__all__ = ["RUN", "SUFFIX", "write"]

RUN = "analysis"  # the TensorBoard run: <workdir>/tensorboard/analysis/
SUFFIX = ".analysis"  # the end of this writer's event file names


def write(folder, summary: dict, metrics_lines: list[dict]) -> None:
    """Writes the analysis run to ``folder/analysis`` (``folder``: the runs' folder,
    ``<workdir>/tensorboard``), replacing the analysis run's earlier event files.

    Lines of ``metrics.jsonl`` without an accuracy (an iteration ``eval_every``
    skipped) are left out.
    """
    tensorboardx = event_files.tensorboardx()
    path = files.as_path(folder) / RUN
    if path.exists():
        for old in path.iterdir():
            if "tfevents" in old.name and old.name.endswith(SUFFIX):
                old.unlink()
    writer = tensorboardx.SummaryWriter(logdir=event_files.logdir(path), filename_suffix=SUFFIX)
    try:
        averages: dict = {}
        for line in metrics_lines:
            if "accuracy" not in line:
                continue
            method, k = line["method"], int(line["iteration"])
            writer.add_scalar(f"accuracy/{method}/{line['task']}", line["accuracy"], k)
            averages.setdefault((method, k), []).append(line["accuracy"])
        for (method, k), values in sorted(averages.items()):
            writer.add_scalar(f"average_accuracy/{method}", sum(values) / len(values), k)
        for method, rows in summary["orthogonality"]["atm"].items():
            for r in rows:
                writer.add_scalar(f"mean_abs_cos/{method}", r["mean_abs_cos"], r["iteration"])
                writer.add_image(f"cosine/{method}",
                                 figures.heatmap_rgb(r["cosine"], f"{method} it {r['iteration']}"),
                                 r["iteration"], dataformats="HWC")
        for method, rows in summary["loss_bookkeeping"].items():
            for r in rows:
                writer.add_scalar(f"joint_loss/{method}", r["joint_after"], r["iteration"])
    finally:
        writer.close()
