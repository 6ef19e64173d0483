"""TensorBoard summaries of a run through tensorboardX (a maintained, TensorFlow-free
writer): accuracy per method / task / iteration, mean |cos| and the joint loss per
ATM iteration, and the |cos| heatmap of every ATM iteration as an image. Written
from the finished files, so a resumed run's events are not duplicated; process 0
only (the caller checks)."""

from __future__ import annotations

import shutil

from atm_jax import extras, files
from atm_jax.analysis import figures

__all__ = ["write"]


def write(folder, summary: dict, metrics_lines: list[dict]) -> None:
    """Replaces ``folder`` with one event file of the run's scalars and images."""
    with extras.needed("TensorBoard summaries (atm_jax.analysis)"):
        from tensorboardX import SummaryWriter
    path = files.as_path(folder)
    if path.exists():
        shutil.rmtree(str(path))
    writer = SummaryWriter(logdir=str(path))
    try:
        averages: dict = {}
        for line in metrics_lines:
            method, k = line["method"], int(line["iteration"])
            if "accuracy" not in line:  # an iteration eval_every skipped
                continue
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
