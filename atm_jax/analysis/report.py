"""From ``<workdir>/analysis/`` files to ``analysis.json``, figures and TensorBoard.

`build` reads what `atm_jax.analysis.recorder` wrote during the run (and the
Theorem 3.1 / gradient-structure results of `atm_jax.analysis.theory`, when they
were computed), derives the numbers of the paper's Figs. 8–10 and Theorem 5.1, and
writes ``analysis/analysis.json``, ``analysis/figures/*.png`` and the TensorBoard run
``<workdir>/tensorboard/analysis/`` (process 0 only; the runs written live stay).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable

import numpy as np

from atm_jax import files
from atm_jax.analysis import figures, geometry, tensorboard

__all__ = ["load", "orthogonality", "loss_bookkeeping", "trajectory", "alpha_tuning", "build"]

Log = Callable[[str], None]


def _iteration_files(folder, prefix: str) -> list[tuple[int, dict]]:
    out = []
    if not folder.exists():
        return out
    for path in folder.iterdir():
        m = re.fullmatch(prefix + r"(\d+)\.json", path.name)
        if m:
            out.append((int(m.group(1)), json.loads(path.read_text())))
    return sorted(out, key=lambda x: x[0])


def load(workdir) -> dict:
    """The recorded files: ``{"one_shot": {method: content}, "atm": {method: {"iterations":
    [(k, content)], "finetuned": [(k, content)]}}, "theory": … or None}``."""
    folder = files.as_path(workdir) / "analysis"
    if not folder.exists():
        raise FileNotFoundError(
            f"{folder} does not exist: run with --config.analysis=True (or the config argument "
            "':analysis', e.g. configs/mini.py:analysis) so the run records what the analysis needs.")
    one_shot = {}
    if (folder / "one_shot").exists():
        for path in sorted((folder / "one_shot").iterdir()):
            if path.name.endswith(".json"):
                one_shot[path.name[:-5]] = json.loads(path.read_text())
    atm = {}
    if (folder / "atm").exists():
        for sub in sorted((folder / "atm").iterdir()):
            atm[sub.name] = {"iterations": _iteration_files(sub, "iteration"),
                             "finetuned": _iteration_files(sub, "finetuned")}
    theory = folder / "theory.json"
    return {"folder": folder, "one_shot": one_shot, "atm": atm,
            "theory": json.loads(theory.read_text()) if theory.exists() else None}


def orthogonality(data: dict) -> dict:
    """Figs. 9/10: the cosine matrices and mean |cos| per ATM iteration and per
    one-shot merge (all one-shot rows share the same task vectors)."""
    out = {"atm": {}, "one_shot": {}}
    for method, content in data["atm"].items():
        out["atm"][method] = [{"iteration": k, "mean_abs_cos": geometry.mean_abs_cosine(c["cosine"]),
                               "cosine": c["cosine"]}
                              for k, c in content["iterations"] if "cosine" in c]
    for method, content in data["one_shot"].items():
        out["one_shot"][method] = {"mean_abs_cos": geometry.mean_abs_cosine(content["cosine"]),
                                   "cosine": content["cosine"]}
    return out


def loss_bookkeeping(data: dict) -> dict:
    """Theorem 5.1 per ATM iteration: each task's mean loss at the base before and
    after the iteration (on the split the method trains on), the finetuned model's,
    ΔL̄_t = before − after, ΔL_ATM = mean_t ΔL̄_t, the theorem's δ, and whether the
    example-weighted joint loss (the target loss) decreased."""
    out = {}
    for method, content in data["atm"].items():
        bases = dict(content["iterations"])
        finetuned = dict(content["finetuned"])
        rows = []
        for k in sorted(bases):
            if k == 0 or k - 1 not in bases:
                continue
            before, after = bases[k - 1]["losses"], bases[k]["losses"]
            sizes = bases[k]["sizes"]
            tasks = list(before)
            delta = {t: before[t] - after[t] for t in tasks}
            n = np.array([sizes[t] for t in tasks], float)
            joint_before = float(np.dot(n, [before[t] for t in tasks]) / n.sum())
            joint_after = float(np.dot(n, [after[t] for t in tasks]) / n.sum())
            dec = [t for t in tasks if delta[t] > 0]
            inc = [t for t in tasks if delta[t] <= 0]
            if dec and inc:
                delta_bound = (1 - min(sizes[t] for t in inc) / max(sizes[t] for t in dec)) \
                    * sum(abs(delta[t]) for t in inc) / len(tasks)
            else:
                delta_bound = 0.0
            atm_drop = float(np.mean(list(delta.values())))
            rows.append({
                "iteration": k, "split": bases[k]["split"], "loss_before": before,
                "loss_after": after, "loss_finetuned": finetuned.get(k, {}).get("losses"),
                "delta": delta, "delta_atm": atm_drop, "delta_bound": delta_bound,
                "condition_holds": atm_drop > delta_bound,
                "joint_before": joint_before, "joint_after": joint_after,
                "joint_decreased": joint_after < joint_before})
        out[method] = rows
    return out


def trajectory(data: dict) -> dict:
    """Fig. 8: 2-D PCA of the pretrained base, every one-shot merge and every ATM
    base, from the saved flattened models (two or three read at a time)."""
    folder = data["folder"] / "bases"
    labels, paths = [], []
    if (folder / "pretrained.npy").exists():
        labels.append(("pretrained", "pretrained", 0))
        paths.append(folder / "pretrained.npy")
    for method in data["one_shot"]:
        if (folder / f"{method}.npy").exists():
            labels.append((method, "one_shot", 1))
            paths.append(folder / f"{method}.npy")
    for method, content in data["atm"].items():
        for k, _ in content["iterations"]:
            path = folder / method / f"iteration{k}.npy"
            if path.exists():
                labels.append((method, "atm", k))
                paths.append(path)
    if len(paths) < 2:
        return {"points": [], "explained_variance_ratio": []}
    scores, ratio = geometry.pca_from_files([str(p) for p in paths])
    points = [{"method": m, "kind": kind, "iteration": k, "pc": s.tolist()}
              for (m, kind, k), s in zip(labels, scores)]
    return {"points": points, "explained_variance_ratio": ratio.tolist()}


def alpha_tuning(data: dict) -> dict:
    """The α-tuned rows: validation accuracy per α and the chosen α."""
    return {m: {"alpha": c["alpha"], "validation": c["alpha_validation"]}
            for m, c in data["one_shot"].items() if "alpha_validation" in c}


def build(workdir, *, log: Log = print) -> dict:
    """Writes ``analysis/analysis.json``, the figures and TensorBoard; returns the JSON."""
    workdir = files.as_path(workdir)
    data = load(workdir)
    summary = {"orthogonality": orthogonality(data), "loss_bookkeeping": loss_bookkeeping(data),
               "trajectory": trajectory(data), "alpha_tuning": alpha_tuning(data)}
    if data["theory"] is not None:
        summary["theory"] = data["theory"]
    summary["headline"] = headline(summary)
    files.write_json(data["folder"] / "analysis.json", summary)
    written = figures.write_all(summary, data["folder"] / "figures") if files.is_writer() else []
    metrics = workdir / "metrics.jsonl"
    lines = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.exists() else []
    if files.is_writer():
        tensorboard.write(workdir / "tensorboard", summary, lines)
    log(f"analysis: wrote {data['folder'] / 'analysis.json'}, {len(written)} figures in "
        f"{data['folder'] / 'figures'} and TensorBoard events in "
        f"{workdir / 'tensorboard' / tensorboard.RUN}")
    for line in summary["headline"]:
        log("  " + line)
    return summary


def headline(summary: dict) -> list[str]:
    """One line per finding: mean |cos| first → last ATM iteration vs one-shot, and
    how often the joint loss fell."""
    out = []
    one_shot = summary["orthogonality"]["one_shot"]
    reference = next(iter(one_shot.values()))["mean_abs_cos"] if one_shot else None
    for method, rows in summary["orthogonality"]["atm"].items():
        if rows:
            out.append(f"{method}: mean |cos| {rows[0]['mean_abs_cos']:.4f} (iteration "
                       f"{rows[0]['iteration']}) -> {rows[-1]['mean_abs_cos']:.4f} (iteration "
                       f"{rows[-1]['iteration']})" + (f"; one-shot task vectors {reference:.4f}"
                                                     if reference is not None else ""))
    for method, rows in summary["loss_bookkeeping"].items():
        if rows:
            fell = sum(r["joint_decreased"] for r in rows)
            out.append(f"{method}: the example-weighted joint loss fell in {fell} of {len(rows)} "
                       "iterations")
    return out
