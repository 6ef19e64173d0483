"""benchmarks/accelerator_check.py at tiny size: each part's row lands in the output folder,
a failing part is a failed row while the others run, an out-of-memory batch moves the search
to the next one, a part past its time limit is killed with everything it started; and the
peak / MFU arithmetic against hand-computed numbers."""

import importlib
import json
import math
import pathlib
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
check = importlib.import_module("accelerator_check")
report = importlib.import_module("accelerator_report")


def test_tiny_run_records_each_part_and_survives_a_failing_one(tmp_path):
    # One part of each kind that runs on a CPU in seconds; the full --tiny list (all nine
    # parts, the tiny rehearsal included) takes minutes here: run by hand (docs/speed.md).
    # The failing part runs first, so the others must still run after it.
    parts = ["ours_clip_f32", "ours_bert_bf16", "torch_bert_bf16", "torch_bert_bf16_compile"]
    proc = subprocess.run(
        [sys.executable, "benchmarks/accelerator_check.py", "--tiny", "--parts", ",".join(parts),
         "--out", str(tmp_path), "--inject-failure", "ours_clip_f32",
         "--inject-oom", "ours_bert_bf16"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "parts.jsonl").read_text().splitlines()]
    assert [r["name"] for r in rows] == parts
    by_name = {r["name"]: r for r in rows}
    for name, count in (("ours_bert_bf16", "XLA"), ("torch_bert_bf16", "FlopCounterMode")):
        row = by_name[name]
        assert row["status"] == "ok", row
        assert count in row["flops_source"]
        for key in ("examples_per_s", "flops_per_step", "flops_per_example"):
            assert math.isfinite(row[key]) and row[key] > 0, (name, key, row[key])
        assert row["peak_source"] == "unknown" and row["mfu"] is None  # a CPU has no peak here
    # Both sides read back the same float32 matmul mode (TF32, the default).
    assert by_name["ours_bert_bf16"]["matmul"] == "jax_default_matmul_precision=tensorfloat32"
    assert ("allow_tf32=True" in by_name["torch_bert_bf16"]["matmul"]
            and "float32_matmul_precision=high" in by_name["torch_bert_bf16"]["matmul"])
    # The injected out-of-memory batch (the largest) moved the search to the next one.
    assert by_name["ours_bert_bf16"]["tried"] == {"8": "oom", "4": "ok"}
    assert by_name["ours_bert_bf16"]["batch"] == 4
    assert by_name["torch_bert_bf16"]["batch"] == 8
    assert by_name["ours_clip_f32"]["status"] == "failed"
    assert "injected" in by_name["ours_clip_f32"]["error"]
    assert by_name["torch_bert_bf16_compile"]["status"] == "skipped"
    md = (tmp_path / "accelerator_check.md").read_text()
    assert "| ours_clip_f32 | failed" in md and "| ours_bert_bf16 | ok | 4 (8 out of memory) |" in md
    assert "| BERT-base, seq 128 | not run | " in md and "| CLIP ViT-B/16 vision tower, 224² | failed |" in md
    assert "TINY shapes" in md
    assert "===== ours_clip_f32 batch 8: failed" in (tmp_path / "parts.log").read_text()


def _running(pid: int) -> bool:
    try:
        state = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie waits for its (new) parent to reap it: it no longer runs


def test_a_process_past_its_limit_is_killed_with_its_children(tmp_path):
    pid_file = tmp_path / "child.pid"
    code = ("import pathlib, subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', "
            f"'import time; time.sleep(60)']); pathlib.Path({str(pid_file)!r}).write_text("
            "str(p.pid)); time.sleep(60)")
    start = time.monotonic()
    status, result, error = check.run_process([sys.executable, "-c", code], 2.0,
                                              tmp_path / "log", "sleeper")
    assert (status, result, error) == ("timed out", None, "timed out after 2 s")
    assert time.monotonic() - start < 30
    assert "===== sleeper: timed out" in (tmp_path / "log").read_text()
    child = int(pid_file.read_text())
    for _ in range(50):
        if not _running(child):
            break
        time.sleep(0.1)
    assert not _running(child)


@pytest.mark.parametrize("kind, precision, matmul, expected", [
    ("NVIDIA H200", "bfloat16", "tf32", (989e12, "H200 bf16")),
    ("NVIDIA H200", "float32", "tf32", (494e12, "H200 tf32")),
    ("NVIDIA H100 80GB HBM3", "float32", "highest", (67e12, "H100 fp32")),
    ("NVIDIA H100 PCIe", "bfloat16", "tf32", (756e12, "H100 PCIe bf16")),
    ("NVIDIA A100-SXM4-80GB", "float32", "tf32", (156e12, "A100 tf32")),
    ("TPU v5 lite", "float32", "tf32", (197e12, "TPU v5 lite bf16")),  # TPUs: bf16 only
    ("TPU v4", "bfloat16", "tf32", (275e12, "TPU v4 bf16")),
    ("cpu", "bfloat16", "tf32", (None, "unknown")),
])
def test_peak_by_device_kind_and_precision(kind, precision, matmul, expected):
    assert report.peak(kind, precision, matmul) == expected


def test_mfu_is_examples_per_second_times_flops_per_example_over_peak():
    row = report.complete({"name": "ours_bert_bf16", "kind": "ours", "status": "ok",
                           "precision": "bfloat16", "matmul_precision": "tf32", "batch": 256,
                           "step_s": 0.5, "flops_per_step": 256e12, "device_kind": "NVIDIA H200"})
    # 256 / 0.5 s = 512 ex/s; 1e12 FLOPs per example; 512e12 / 989e12.
    assert row["examples_per_s"] == 512 and row["flops_per_example"] == 1e12
    assert row["mfu"] == pytest.approx(512 / 989)


class OutOfMemoryError(RuntimeError):  # stands in for torch.cuda.OutOfMemoryError
    pass


@pytest.mark.parametrize("error, oom", [
    (RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 9.2GiB."), True),
    (RuntimeError("RESOURCE_EXHAUSTED: Failed to allocate request for 2.0GiB on device"), True),
    (OutOfMemoryError("Tried to allocate 2.00 GiB"), True),
    (RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB"), True),
    (RuntimeError("INVALID_ARGUMENT: shapes do not match"), False),
    (ValueError("precision='fp8' must be one of ('float32', 'bfloat16')."), False),
])
def test_out_of_memory_errors_are_told_from_other_failures(error, oom):
    assert check.is_out_of_memory(error) is oom
