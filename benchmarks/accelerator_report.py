"""The accelerator check's rows and tables: peak FLOP/s by device, MFU, the output folder.

`accelerator_check.py` runs the parts; this module turns each part's result into a
row (examples/s, FLOPs per example, the device's peak, MFU), appends it to
``parts.jsonl`` and rewrites ``accelerator_check.md`` from every row so far.
It imports nothing heavy (the driver process never starts JAX or PyTorch).
"""

from __future__ import annotations

import json
import math
import os
import pathlib

import common

# Peak dense FLOP/s per JAX device (one GPU; one TPU chip, or core where a core is the
# device) by matrix-unit input type. Sources: NVIDIA's datasheets (H100 Tensor Core GPU,
# SXM and PCIe columns; H200 Tensor Core GPU, SXM and NVL; A100 Tensor Core GPU, the
# same for 40 and 80 GB; L4; L40S), where the figures printed "with sparsity" are twice
# these; Google Cloud's TPU system-architecture pages (bf16 per chip; v3's chip has two
# cores, each its own device). TPUs list bf16 only: their float32 matmuls run as
# bfloat16 passes, so every TPU row is read against bf16. Matched in order, by substring
# of ``device_kind`` (JAX) / ``torch.cuda.get_device_name()``.
PEAKS = (
    ("H200 NVL", {"bf16": 835e12, "tf32": 418e12, "fp32": 60e12}),
    ("H200", {"bf16": 989e12, "tf32": 494e12, "fp32": 67e12}),
    ("H100 PCIe", {"bf16": 756e12, "tf32": 378e12, "fp32": 51e12}),
    ("H100", {"bf16": 989e12, "tf32": 494e12, "fp32": 67e12}),  # SXM
    ("A100", {"bf16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
    ("L40S", {"bf16": 362e12, "tf32": 183e12, "fp32": 91.6e12}),
    ("L4", {"bf16": 121e12, "tf32": 60e12, "fp32": 30.3e12}),
    ("TPU v6 lite", {"bf16": 918e12}),  # v6e (Trillium)
    ("TPU v5 lite", {"bf16": 197e12}),  # v5e
    ("TPU v5", {"bf16": 459e12}),  # v5p
    ("TPU v4", {"bf16": 275e12}),
    ("TPU v3", {"bf16": 123e12 / 2}),
)
TRAIN_KINDS = ("ours", "torch")


def peak(device_kind: str | None, precision: str, matmul_precision: str
         ) -> tuple[float | None, str]:
    """(peak FLOP/s or None, what it is) for a row's device and step precision."""
    unit = "bf16" if precision == "bfloat16" else ("tf32" if matmul_precision == "tf32" else "fp32")
    for key, peaks in PEAKS:
        if key in (device_kind or ""):
            unit = unit if unit in peaks else "bf16"
            return peaks[unit], f"{key} {unit}"
    return None, "unknown"


def complete(row: dict) -> dict:
    """Adds examples/s, FLOPs per example, the peak and MFU where the row measured them."""
    row = {**row, "finished_utc": common.utc_now().isoformat(timespec="seconds")}
    if row.get("status") != "ok" or row.get("kind") not in TRAIN_KINDS:
        return row
    batch = row["batch"]
    row["examples_per_s"] = batch / row["step_s"]
    row["flops_per_example"] = row["flops_per_step"] / batch
    row["peak_flops"], row["peak_source"] = peak(row.get("device_kind"), row["precision"],
                                                 row.get("matmul_precision", "tf32"))
    row["mfu"] = (row["examples_per_s"] * row["flops_per_example"] / row["peak_flops"]
                  if row["peak_flops"] else None)
    return row


def rows(out: pathlib.Path) -> list[dict]:
    path = pathlib.Path(out) / "parts.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def record(out: pathlib.Path, row: dict) -> None:
    """Appends ``row`` to parts.jsonl and rewrites accelerator_check.md (atomically)."""
    out = pathlib.Path(out)
    with open(out / "parts.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    tmp = out / "accelerator_check.md.tmp"
    tmp.write_text(render(out))
    os.replace(tmp, out / "accelerator_check.md")


def _num(value, fmt: str, missing: str = "–") -> str:
    return missing if value is None or not math.isfinite(value) else format(value, fmt)


def _mfu(row: dict) -> str:
    return f"{row['mfu']:.1%}" if row.get("mfu") is not None else "unknown"


def _memory(row: dict) -> str:
    peak_bytes = row.get("device_peak_bytes")
    return f"{peak_bytes / 2**30:.1f} GiB" if peak_bytes else "–"


def one_line(row: dict) -> str:
    if row.get("status") != "ok":
        return f"{row['name']}: {row.get('status')} ({row.get('error', '')})"
    if row["kind"] in TRAIN_KINDS:
        return (f"{row['name']}: batch {row['batch']}, {row['examples_per_s']:.1f} ex/s, "
                f"{row['flops_per_example'] / 1e9:.3g} GFLOP/example, MFU {_mfu(row)}")
    return f"{row['name']}: ok in {row.get('wall_s', 0):.0f} s"


def _batch(row: dict) -> str:
    tried = row.get("tried") or {}
    ooms = [b for b, s in tried.items() if s == "oom"]
    return str(row.get("batch", "–")) + (f" ({', '.join(ooms)} out of memory)" if ooms else "")


def part_table(all_rows: list[dict]) -> str:
    lines = ["| part | status | batch | ex/s | step ms | GFLOP/example (count) | peak | MFU | "
             "compile s | device memory | wall s |",
             "|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
    for r in all_rows:
        wall = _num(r.get("wall_s"), ".0f")
        if r.get("status") != "ok":
            lines.append(f"| {r['name']} | {r.get('status')}: {r.get('error', '')} | "
                         f"{_batch(r) if r.get('tried') else '–'} | | | | | | | | {wall} |")
        elif r["kind"] in TRAIN_KINDS:
            count = "XLA" if r["kind"] == "ours" else "FlopCounterMode"
            lines.append(
                f"| {r['name']} | ok | {_batch(r)} | {r['examples_per_s']:.1f} | "
                f"{1000 * r['step_s']:.1f} | {r['flops_per_example'] / 1e9:.3g} ({count}) | "
                f"{r['peak_source']} | {_mfu(r)} | {_num(r.get('compile_s'), '.1f', 'eager')} | "
                f"{_memory(r)} | {wall} |")
        else:
            lines.append(f"| {r['name']} | ok | {r.get('batch', '–')} | "
                         f"{_num(r.get('examples_per_s'), '.1f')} | "
                         f"{_num(1000 * r['step_s'] if r.get('step_s') else None, '.1f')} | "
                         f"| | | | | {wall} |")
    return "\n".join(lines)


def _cell(row: dict | None) -> str:
    if row is None:
        return "not run"
    if row.get("status") != "ok":
        return row.get("status", "?")
    return f"{row['examples_per_s']:.1f} ex/s, MFU {_mfu(row)} (batch {row['batch']})"


def side_by_side(all_rows: list[dict]) -> str:
    """Ours vs PyTorch per model: examples/s and MFU, and ours ÷ PyTorch in bf16."""
    by_name = {r["name"]: r for r in all_rows}
    lines = ["| model | ours float32 | ours bfloat16 | PyTorch bf16 autocast | "
             "PyTorch bf16 autocast + torch.compile | ours bf16 ÷ PyTorch (eager / compiled) |",
             "|---|---|---|---|---|---|"]
    for short, label in (("clip", "CLIP ViT-B/16 vision tower, 224²"), ("bert", "BERT-base, seq 128")):
        cells = [by_name.get(f"{side}_{short}_{p}") for side, p in
                 (("ours", "f32"), ("ours", "bf16"), ("torch", "bf16"), ("torch", "bf16_compile"))]
        if not any(cells):
            continue
        ours = cells[1]

        def ratio(theirs):
            ok = all(r is not None and r.get("status") == "ok" for r in (ours, theirs))
            return f"{ours['examples_per_s'] / theirs['examples_per_s']:.2f}×" if ok else "–"

        lines.append(f"| {label} | " + " | ".join(_cell(c) for c in cells)
                     + f" | {ratio(cells[2])} / {ratio(cells[3])} |")
    return "\n".join(lines)


def rehearsal_lines(row: dict) -> list[str]:
    if row.get("status") != "ok":
        return [f"- {row.get('status')}: {row.get('error', '')}"]
    merges = ", ".join(f"{k} {v:.1f} s" for k, v in row["merge_s"].items())
    size = "tiny shapes" if row.get("tiny") else "full size (CLIP ViT-B/16, 12-layer text tower)"
    return [f"- {row['config']}, {size}, random init, tasks {', '.join(row['tasks'])}, "
            f"batch {row['batch']}, budget 1, one ATM iteration: run "
            f"{row['run_wall_s']:.0f} s, peak host memory {row['peak_rss_bytes'] / 2**30:.1f} GiB",
            f"- train step (steady median of {row['steady_steps']}) "
            f"{_num(row['step_s'], '.3f')} s = {_num(row['examples_per_s'], '.1f')} ex/s; "
            f"first epoch incl. compile {_num(row['first_epoch_s'], '.1f')} s; {row['epochs']} epochs",
            f"- merges (median): {merges}; {row['checkpoint_writes']} checkpoint writes"]


def merge_lines(row: dict) -> list[str]:
    if row.get("status") != "ok":
        return [f"- {row.get('status')}: {row.get('error', '')}"]
    lines = [f"{row['task_vectors']} (ViT-B/16 leaf shapes), float32, on "
             f"{row['device_kind']} vs the CPU backend", "",
             "| operator | accelerator s | CPU s | max |difference| | kept sets equal |",
             "|---|---:|---:|---:|---|"]
    for name, m in row["merges"].items():
        lines.append(f"| {name} | {m['accelerator_s']:.3f} | {m['cpu_s']:.3f} | "
                     f"{m['max_abs_diff']:.2e} | {m['kept_sets_equal']} |")
    return lines


def render(out: pathlib.Path) -> str:
    """accelerator_check.md from every row recorded in ``out`` so far."""
    all_rows = rows(out)
    started = all_rows[0].get("run_started", "?") if all_rows else "?"
    devices = sorted({f"{r['device_kind']} ({r.get('platform')})" for r in all_rows
                      if r.get("device_kind")})
    versions = sorted({r["versions"] for r in all_rows if r.get("versions")})
    matmul = sorted({r["matmul"] for r in all_rows if r.get("matmul")})
    tiny = any(r.get("tiny") for r in all_rows)
    done = sum(r.get("status") == "ok" for r in all_rows)
    lines = [f"# accelerator_check — run started {started} UTC", "",
             f"- commit: {common.commit()}", f"- machine: {common.machine()}",
             f"- devices: {', '.join(devices) or '?'}",
             *[f"- {v}" for v in versions],
             *[f"- {n}" for n in dict.fromkeys(n for r in all_rows for n in r.get("notes", []))],
             f"- float32 matmul precision, as each side read it back: {'; '.join(matmul) or '?'}",
             f"- {len(all_rows)} parts recorded, {done} ok; "
             f"{sum(r.get('wall_s') or 0 for r in all_rows):.0f} s of part wall time",
             "- ex/s = batch ÷ median step time over the timed windows after compile + one "
             "step; batches on the device; MFU = ex/s × FLOPs per example ÷ the device's peak "
             "dense FLOP/s (accelerator_report.PEAKS); FLOPs per example from each side's own "
             "count (XLA: every op of the step; FlopCounterMode: matmuls, convolutions and "
             "attention)"]
    if tiny:
        lines.append("- TINY shapes and batches: a check of the machinery, not a measurement")
    cut = [r["name"] for r in all_rows if r.get("status") in ("timed out", "not started")]
    if cut:
        lines.append(f"- cut by their time limit or the budget: {', '.join(cut)}; run them "
                     f"with `python benchmarks/accelerator_check.py --parts {','.join(cut)} "
                     "--out DIR`")
    lines += ["", "## Parts", "", part_table(all_rows), "", "## Ours vs PyTorch", "",
              side_by_side(all_rows)]
    for name, title, fn in (("rehearsal_vit", "Rehearsal iteration (benchmarks/rehearsal.py)", rehearsal_lines),
                            ("merges", "Merges: accelerator vs CPU backend", merge_lines)):
        row = next((r for r in all_rows if r["name"] == name), None)
        if row is not None:
            lines += ["", f"## {title}", "", *fn(row)]
    return "\n".join(lines) + "\n"
