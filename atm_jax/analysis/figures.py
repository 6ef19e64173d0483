"""The analysis figures (PNG, matplotlib Agg), from `atm_jax.analysis.report`'s summary.

* ``cosine_heatmaps.png``: T×T |cos| of the task vectors at every ATM iteration
  (one row per ATM method) and of the one-shot task vectors (Figs. 9/10);
* ``mean_abs_cosine.png``: mean |cos| per ATM iteration, one-shot dashed;
* ``trajectory_pca.png``: 2-D PCA of the models (Fig. 8);
* ``loss_bookkeeping.png``: the example-weighted joint loss at each ATM base
  (Theorem 5.1), hollow markers where it rose;
* ``alpha_tuning.png``: validation accuracy against α for every α-tuned row;
* ``gradient_structure.png``: per-epoch gradient-norm share and cosine to the
  first epoch per task (Fig. 3), when `atm_jax.analysis.theory` ran.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from atm_jax import files

__all__ = ["write_all", "heatmap_rgb"]


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path, written: list) -> None:
    plt = _plt()
    files.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100, bbox_inches="tight"))
    plt.close(fig)
    written.append(str(path))


def heatmap_rgb(cosine, title: str = "") -> np.ndarray:
    """A |cos| heatmap as an [H, W, 3] uint8 image (for TensorBoard)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(3, 3))
    ax.imshow(np.abs(np.asarray(cosine)), vmin=0, vmax=1, cmap="viridis")
    ax.set_title(title, fontsize=8)
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return image


def _heatmaps(summary, folder, written):
    plt = _plt()
    ortho = summary["orthogonality"]
    rows = [(m, r) for m, r in ortho["atm"].items() if r]
    if ortho["one_shot"]:
        name, first = next(iter(ortho["one_shot"].items()))
        rows.append(("one-shot", [{"iteration": "budget", "cosine": first["cosine"]}]))
    if not rows:
        return
    cols = max(len(r) for _, r in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.6 * cols + 1, 1.7 * len(rows)),
                             squeeze=False)
    image = None
    for i, (method, records) in enumerate(rows):
        for j in range(cols):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j >= len(records):
                ax.axis("off")
                continue
            image = ax.imshow(np.abs(np.asarray(records[j]["cosine"])), vmin=0, vmax=1,
                              cmap="viridis")
            ax.set_title(f"it {records[j]['iteration']}", fontsize=7)
        axes[i, 0].set_ylabel(method, fontsize=7)
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.6, label="|cos|")
    fig.suptitle("|cos| between task vectors (rows: ATM methods per iteration; one-shot)",
                 fontsize=9)
    _save(fig, folder / "cosine_heatmaps.png", written)


def _mean_abs(summary, folder, written):
    plt = _plt()
    ortho = summary["orthogonality"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, rows in ortho["atm"].items():
        if rows:
            ax.plot([r["iteration"] for r in rows], [r["mean_abs_cos"] for r in rows],
                    marker="o", ms=3, label=method)
    if ortho["one_shot"]:
        value = next(iter(ortho["one_shot"].values()))["mean_abs_cos"]
        ax.axhline(value, ls="--", color="gray", label="one-shot task vectors")
    ax.set_xlabel("ATM iteration")
    ax.set_ylabel("mean |cos| between task vectors")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, folder / "mean_abs_cosine.png", written)


def _trajectory(summary, folder, written):
    plt = _plt()
    traj = summary["trajectory"]
    if not traj["points"]:
        return
    fig, ax = plt.subplots(figsize=(6.5, 5))
    palette = plt.get_cmap("tab20").colors
    names = list(dict.fromkeys(p["method"] for p in traj["points"] if p["kind"] != "pretrained"))
    color = {m: palette[i % len(palette)] for i, m in enumerate(names)}
    atm = {}
    for p in traj["points"]:
        if p["kind"] == "atm":
            atm.setdefault(p["method"], []).append(p)
        elif p["kind"] == "pretrained":
            ax.scatter(*p["pc"][:2], marker="*", s=160, color="black", label="pretrained", zorder=3)
        else:
            ax.scatter(*p["pc"][:2], marker="^" if "tuned" in p["method"] else "s", s=30,
                       color=color[p["method"]], label=p["method"], zorder=3)
    for method, points in atm.items():
        points = sorted(points, key=lambda p: p["iteration"])
        xy = np.array([p["pc"][:2] for p in points])
        ax.plot(xy[:, 0], xy[:, 1], marker="o", ms=3, color=color[method],
                label=f"{method} (iterations)")
    ratio = traj["explained_variance_ratio"]
    ax.set_xlabel(f"PC1 ({100 * ratio[0]:.0f} %)" if ratio else "PC1")
    ax.set_ylabel(f"PC2 ({100 * ratio[1]:.0f} %)" if len(ratio) > 1 else "PC2")
    ax.set_title("2-D PCA of the flattened backbones")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    _save(fig, folder / "trajectory_pca.png", written)


def _losses(summary, folder, written):
    plt = _plt()
    book = summary["loss_bookkeeping"]
    if not any(book.values()):
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, rows in book.items():
        if not rows:
            continue
        its = [rows[0]["iteration"] - 1] + [r["iteration"] for r in rows]
        joint = [rows[0]["joint_before"]] + [r["joint_after"] for r in rows]
        line, = ax.plot(its, joint, marker="o", ms=3, label=f"{method} ({rows[0]['split']})")
        rose = [(r["iteration"], r["joint_after"]) for r in rows if not r["joint_decreased"]]
        if rose:
            ax.scatter(*zip(*rose), facecolors="none", edgecolors=line.get_color(), s=80)
    ax.set_xlabel("ATM iteration")
    ax.set_ylabel("example-weighted joint loss at the base")
    ax.set_title("Theorem 5.1 bookkeeping (hollow: the joint loss rose)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, folder / "loss_bookkeeping.png", written)


def _alpha(summary, folder, written):
    plt = _plt()
    tuned = summary["alpha_tuning"]
    if not tuned:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, content in tuned.items():
        grid = np.array(content["validation"])
        line, = ax.plot(grid[:, 0], 100 * grid[:, 1], marker="o", ms=3, label=method)
        chosen = grid[grid[:, 0] == content["alpha"]]
        ax.scatter(chosen[:, 0], 100 * chosen[:, 1], s=90, facecolors="none",
                   edgecolors=line.get_color())
    ax.set_xscale("log")
    ax.set_xlabel("α")
    ax.set_ylabel("average validation accuracy (%)")
    ax.set_title("α chosen on validation (circled)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    _save(fig, folder / "alpha_tuning.png", written)


def _gradients(summary, folder, written):
    plt = _plt()
    structure = (summary.get("theory") or {}).get("gradient_structure")
    if not structure:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for task, content in structure["tasks"].items():
        epochs = np.arange(1, len(content["norm_share"]) + 1)
        a.plot(epochs, content["norm_share"], marker="o", ms=3, label=task)
        b.plot(epochs, np.asarray(content["cosine"])[0], marker="o", ms=3, label=task)
    a.set_xlabel("epoch")
    a.set_ylabel("‖g_e‖ / Σ_e ‖g_e‖")
    a.set_title("per-epoch gradient-norm share")
    b.set_xlabel("epoch")
    b.set_ylabel("cos(g_1, g_e)")
    b.set_title("cosine to the first epoch's gradient")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    _save(fig, folder / "gradient_structure.png", written)


_FIGURES: tuple[Callable, ...] = (_heatmaps, _mean_abs, _trajectory, _losses, _alpha, _gradients)


def write_all(summary: dict, folder) -> list[str]:
    """Every figure the summary has data for; returns the paths written."""
    written: list[str] = []
    for draw in _FIGURES:
        draw(summary, files.as_path(folder), written)
    return written
