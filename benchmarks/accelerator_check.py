"""Accelerator numbers in one run: train steps, ours vs PyTorch, a full-size rehearsal.

Each part runs in its own process, under its own timeout and an overall budget (6
minutes by default), and its row lands in the output folder as soon as it ends, so
a run killed halfway still leaves what finished:

* ``ours_<model>_<precision>``: `atm_jax.finetune.Finetuner`'s jitted, donating
  train step (frozen 10-class head, Adam 1e-5, clip 10, as ``train_bench.py``) of
  CLIP ViT-B/16's vision tower (224²) and BERT-base (seq 128), ``precision=float32``
  and ``"bfloat16"``; batches placed on the device once; step FLOPs from XLA
  (``jit(...).lower(...).compile().cost_analysis()``, the executable then timed);
* ``torch_<model>_bf16[_compile]``: the same models in PyTorch (transformers'
  modules, ``train_bench.torch_model``) under ``torch.autocast(bfloat16)``, eager and
  with ``torch.compile`` of the backbone; FLOPs from
  ``torch.utils.flop_counter.FlopCounterMode`` over one eager step (matrix products,
  convolutions and attention only; XLA's count also holds the elementwise ops and
  the Adam update, so it reads a few percent higher);
* ``rehearsal_vit``: one full-size ``configs/vit.py`` rehearsal iteration
  (``benchmarks/rehearsal.py``: random-init CLIP ViT-B/16 through
  ``python -m atm_jax.main``, budget 1, one ATM iteration) on three of the seven
  stand-in tasks, the three with 10 classes, so the step compiles once;
* ``merges`` (only when named): the merges on the default device against the CPU
  backend, time and largest difference (what this script checked before).

Training parts take the largest batch in {256, 128, 64, 32} that fits: each batch is
tried largest first in a fresh process, so an out-of-memory error (XLA
RESOURCE_EXHAUSTED, ``torch.cuda.OutOfMemoryError``) cannot poison the next try.
MFU = examples/s × FLOPs per example ÷ the device's peak dense FLOP/s (`PEAKS`:
bf16 for bfloat16 rows, TF32 or FP32 for float32 rows as the matmul precision says;
"unknown" on CPUs). Float32 matmul precision is set the same way on both sides
(``--matmul-precision``, default ``tf32``): JAX ``jax_default_matmul_precision =
"tensorfloat32"`` (or ``"highest"``), PyTorch ``torch.backends.cuda.matmul.allow_tf32``
and ``torch.backends.cudnn.allow_tf32`` True (False) and
``torch.set_float32_matmul_precision("high")`` (``"highest"``); each row records
what its process read back.

The output folder holds three files: ``parts.jsonl`` (one JSON object per part),
``accelerator_check.md`` (header, the part rows, ours vs PyTorch side by side;
rewritten after every part) and ``parts.log`` (each process's stderr tail).

Run::

  python benchmarks/accelerator_check.py --out /tmp/accel           # on the accelerator
  python benchmarks/accelerator_check.py --tiny --out /tmp/accel    # tiny shapes, CPU check
  python benchmarks/accelerator_check.py --parts ours_bert_bf16,torch_bert_bf16 --out DIR
  python benchmarks/accelerator_check.py --parts merges --tasks 7 --blocks 12 --out DIR
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import accelerator_report as report  # noqa: E402
import common  # noqa: E402

BATCHES, TINY_BATCHES = (256, 128, 64, 32), (8, 4)
BUDGET_S = 360.0
MIN_PART_S = 20.0  # a part is not started with less of the budget left
REHEARSAL_TASKS = ("mnist", "eurosat", "svhn")  # 10 classes each: one head shape


@dataclasses.dataclass(frozen=True)
class Part:
    """One part of the check, run in its own process."""

    name: str
    kind: str  # ours | torch | rehearsal | merges
    model: str = ""  # clip_b16 | bert_base (train_bench's row models)
    precision: str = ""  # float32 | bfloat16
    compile: bool = False  # torch.compile (torch parts)
    timeout_s: float = 75.0


# In the order they run: what the budget cuts comes last (rerun it with --parts).
PARTS = {p.name: p for p in [
    Part("ours_clip_bf16", "ours", "clip_b16", "bfloat16"),
    Part("ours_bert_bf16", "ours", "bert_base", "bfloat16"),
    Part("torch_clip_bf16", "torch", "clip_b16", "bfloat16", timeout_s=60),
    Part("torch_bert_bf16", "torch", "bert_base", "bfloat16", timeout_s=60),
    Part("ours_clip_f32", "ours", "clip_b16", "float32"),
    Part("ours_bert_f32", "ours", "bert_base", "float32"),
    Part("rehearsal_vit", "rehearsal", "clip_b16", "float32", timeout_s=150),
    Part("torch_clip_bf16_compile", "torch", "clip_b16", "bfloat16", True, timeout_s=120),
    Part("torch_bert_bf16_compile", "torch", "bert_base", "bfloat16", True, timeout_s=120),
    Part("merges", "merges", timeout_s=120),
]}
DEFAULT_PARTS = tuple(n for n in PARTS if n != "merges")

# train_bench's model builders read these shapes (its module constants) when called.
TINY_CONFIGS = {
    "CLIP_B16_CONFIG": {"model_type": "clip", "projection_dim": 512, "vision_config": {
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 2, "image_size": 224, "patch_size": 32, "num_channels": 3,
        "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "initializer_range": 0.02}},
    "BERT_BASE_CONFIG": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                         "num_attention_heads": 2},
}


class InjectedFailure(RuntimeError):
    """Raised by a part named in --inject-failure (to test the failure path)."""


def is_out_of_memory(error: BaseException) -> bool:
    text = f"{type(error).__name__}: {error}"
    return ("RESOURCE_EXHAUSTED" in text or "OutOfMemoryError" in text
            or "out of memory" in text.lower())


def train_row(part: Part, batch: int, tiny: bool):
    """train_bench's row for ``part`` at ``batch`` (its configs shrunk when tiny)."""
    import train_bench

    if tiny:
        train_bench.CLIP_B16_CONFIG = TINY_CONFIGS["CLIP_B16_CONFIG"]
        train_bench.BERT_BASE_CONFIG = {**train_bench.BERT_BASE_CONFIG,
                                        **TINY_CONFIGS["BERT_BASE_CONFIG"]}
    base = train_bench.ROWS[part.model]
    seq = (16 if tiny else base.seq) if base.is_text() else 0
    return train_bench, dataclasses.replace(base, batch=batch, seq=seq)


def set_jax_precision(mode: str) -> str:
    import jax

    jax.config.update("jax_default_matmul_precision",
                      "tensorfloat32" if mode == "tf32" else "highest")
    return f"jax_default_matmul_precision={jax.config.jax_default_matmul_precision}"


def set_torch_precision(mode: str) -> str:
    import torch

    torch.backends.cuda.matmul.allow_tf32 = mode == "tf32"
    torch.backends.cudnn.allow_tf32 = mode == "tf32"
    torch.set_float32_matmul_precision("high" if mode == "tf32" else "highest")
    return (f"torch.backends.cuda.matmul.allow_tf32={torch.backends.cuda.matmul.allow_tf32}, "
            f"cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}, "
            f"float32_matmul_precision={torch.get_float32_matmul_precision()}")


def _timed_steps(call, sync, windows: int, window_s: float) -> dict:
    """First call (compiles where there is compiling), one more, then timed windows."""
    start = time.perf_counter()
    call()
    sync()
    first = time.perf_counter() - start
    start = time.perf_counter()
    call()
    sync()
    step = time.perf_counter() - start
    steps = max(1, math.ceil(window_s / step))
    times = common.timed_windows(call, windows=windows, steps=steps, sync=sync)
    return {"first_step_s": first, "step_s": common.median(times), "windows_s": times,
            "steps_per_window": steps}


# -- the attempt workers: one batch, one process ------------------------------------------


def ours_attempt(part: Part, batch: int, args) -> dict:
    import jax

    from atm_jax import finetune
    from atm_jax.models import heads

    matmul = set_jax_precision(args.matmul_precision)
    train_bench, row = train_row(part, batch, args.tiny)
    apply_fn, backbone, width, note = train_bench.jax_model(row)
    head = heads.init_head(jax.random.key(1), width, train_bench.NUM_CLASSES)
    opt = finetune.OptimizerConfig(learning_rate=train_bench.LEARNING_RATE,
                                   grad_clip=train_bench.GRAD_CLIP, batch_size=batch, name="adam")
    finetuner = finetune.Finetuner(apply_fn, opt, train_head=False, precision=part.precision)
    holder = {"state": finetuner.init_state(backbone, head), "i": 0, "metrics": None}
    del backbone
    batches = [jax.device_put({**b, "mask": np.ones(batch, np.float32)})
               for b in train_bench.make_batches(row, batch)]
    start = time.perf_counter()
    compiled = finetuner.train_step.lower(holder["state"], batches[0]).compile()
    compile_s = time.perf_counter() - start
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost

    def call():
        b = batches[holder["i"] % len(batches)]
        holder["state"], holder["metrics"] = compiled(holder["state"], b)
        holder["i"] += 1

    timing = _timed_steps(call, lambda: jax.block_until_ready(holder["metrics"]),
                          args.windows, args.window_s)
    device = jax.devices()[0]
    stats = device.memory_stats() or {}
    return {**timing, "compile_s": compile_s, "flops_per_step": float(cost["flops"]),
            "flops_source": "XLA cost_analysis of the compiled step",
            "loss": float(holder["metrics"]["loss"]), "note": note, "matmul": matmul,
            "device_kind": device.device_kind, "platform": device.platform,
            "device_peak_bytes": stats.get("peak_bytes_in_use"),
            "versions": common.versions("jax", "jaxlib", "flax", "optax")}


def torch_attempt(part: Part, batch: int, args) -> dict:
    import torch
    from torch.nn import functional as F
    from torch.utils.flop_counter import FlopCounterMode

    device = "cuda" if torch.cuda.is_available() else "cpu"
    matmul = set_torch_precision(args.matmul_precision)
    torch.manual_seed(0)
    if device == "cpu":
        torch.set_num_threads(common.cpu_count())
    train_bench, row = train_row(part, batch, args.tiny)
    model, forward, width, note = train_bench.torch_model(row)
    model.to(device).train()  # dropout is 0 everywhere
    head = torch.nn.Linear(width, train_bench.NUM_CLASSES).to(device).requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=train_bench.LEARNING_RATE)
    batches = []
    for b in train_bench.make_batches(row, batch):
        x = torch.from_numpy(b["inputs"])
        x = x if row.is_text() else x.permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW
        batches.append((x.to(device), torch.from_numpy(b["labels"]).long().to(device)))
    holder = {"i": 0, "loss": None}

    def step(module):
        x, y = batches[holder["i"] % len(batches)]
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            features = forward(module, x)
        # The head and the loss in float32, as ours (bfloat16 backbone, float32 head).
        loss = F.cross_entropy(head(features.float()), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, train_bench.GRAD_CLIP)
        opt.step()
        holder["loss"] = loss
        holder["i"] += 1

    counter = FlopCounterMode(display=False)
    with counter:  # one eager step, counted (compiled code runs past the counter)
        step(model)
    module = torch.compile(model) if part.compile else model
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    timing = _timed_steps(lambda: step(module), sync, args.windows, args.window_s)
    if part.compile:
        timing["compile_s"] = timing["first_step_s"] - timing["step_s"]
    import transformers

    return {**timing, "flops_per_step": float(counter.get_total_flops()),
            "flops_source": "torch FlopCounterMode, one eager step",
            "loss": float(holder["loss"].detach()), "note": note, "matmul": matmul,
            "device_kind": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "platform": device,
            "device_peak_bytes": torch.cuda.max_memory_allocated() if device == "cuda" else None,
            "versions": f"torch {torch.__version__}, transformers {transformers.__version__}"}


def attempt(part: Part, batch: int, args) -> dict:
    """One batch of a training part; {"status": "ok"|"oom", ...} (other errors raise)."""
    try:
        if part.name in args.inject_failure:
            raise InjectedFailure(f"{part.name}: failure injected by --inject-failure")
        if part.name in args.inject_oom and batch == args.batches[0]:
            raise MemoryError(f"RESOURCE_EXHAUSTED: out of memory injected by --inject-oom "
                              f"(batch {batch})")
        run = ours_attempt if part.kind == "ours" else torch_attempt
        return {"status": "ok", "batch": batch, **run(part, batch, args)}
    except Exception as error:  # noqa: BLE001 - sorted into OOM (try smaller) or failure
        if not is_out_of_memory(error):
            raise
        return {"status": "oom", "batch": batch, "error": f"{type(error).__name__}: {error}"[:400]}


# -- the part processes ------------------------------------------------------------------


def run_process(cmd: list[str], timeout: float, log: pathlib.Path, label: str
                ) -> tuple[str, dict | None, str]:
    """Runs ``cmd`` in its own process group; (ok | failed | timed out, last JSON line, error).

    On timeout the whole group (the part and every process it started) is killed.
    """
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(common.ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    proc = subprocess.Popen(cmd, cwd=common.ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=max(1.0, timeout))
        status = "ok" if proc.returncode == 0 else "failed"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        try:  # a process that left the group could hold the pipes open: do not wait on it
            out, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            out, err = "", ""
        status = "timed out"
    with open(log, "a") as f:
        f.write(f"\n===== {label}: {status} (exit {proc.returncode}) =====\n{err[-4000:]}")
    lines = [line for line in out.strip().splitlines() if line.startswith("{")]
    result = json.loads(lines[-1]) if lines and status == "ok" else None
    error = "" if status == "ok" else (err.strip().splitlines() or [status])[-1][:300]
    if status == "timed out":
        error = f"timed out after {timeout:.0f} s"
    return status, result, error


def worker_flags(args) -> list[str]:
    flags = ["--matmul-precision", args.matmul_precision, "--windows", str(args.windows),
             "--window-s", str(args.window_s), "--batches", ",".join(map(str, args.batches)),
             "--tasks", str(args.tasks), "--blocks", str(args.blocks)]
    flags += ["--tiny"] * args.tiny + ["--tiny-compile"] * args.tiny_compile
    flags += ["--stamp", args.stamp] + [f"--note={n}" for n in args.note]
    for name in args.inject_failure:
        flags += ["--inject-failure", name]
    for name in args.inject_oom:
        flags += ["--inject-oom", name]
    return flags


def train_part(part: Part, args, deadline: float) -> dict:
    """The batch search: each batch largest first in a fresh process until one fits."""
    if part.compile and args.tiny and not args.tiny_compile:
        return {"status": "skipped", "error": "--tiny leaves torch.compile out (minutes of "
                "compiling on a CPU; --tiny-compile runs it)"}
    tried = {}
    for batch in args.batches:
        cmd = [sys.executable, __file__, "--attempt", part.name, "--batch", str(batch),
               *worker_flags(args)]
        status, result, error = run_process(cmd, deadline - time.monotonic(), args.log,
                                            f"{part.name} batch {batch}")
        if status != "ok":
            return {"status": status, "error": error, "tried": tried}
        tried[str(batch)] = result["status"]
        if result["status"] == "ok":
            return {**result, "tried": tried}
    return {"status": "failed", "error": f"out of memory at every batch {args.batches}",
            "tried": tried}


def rehearsal_part(args) -> dict:
    """One configs/vit.py rehearsal iteration (benchmarks/rehearsal.py), summarized."""
    import rehearsal

    root = pathlib.Path(tempfile.mkdtemp(prefix="accelerator_rehearsal_"))
    # The runner's process reads the float32 matmul precision from the environment.
    os.environ["JAX_DEFAULT_MATMUL_PRECISION"] = (
        "tensorfloat32" if args.matmul_precision == "tf32" else "highest")
    try:
        values = rehearsal.prepare("clip", root, tiny=args.tiny, tasks=REHEARSAL_TASKS)
        run = rehearsal.run_measured("clip", root, values, root / "workdir", root / "run.log")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    seen, steady = set(), []
    for epoch in run["epochs"]:  # the first epoch of a head shape compiles the step
        if epoch["classes"] in seen:
            steady.append(epoch["seconds"] / epoch["steps"])
        seen.add(epoch["classes"])
    step_s = rehearsal.median(steady)
    merges = {}
    for m in run["merges"]:
        merges.setdefault(m["merge"], []).append(m["seconds"])
    return {"status": "ok", "batch": rehearsal.BATCH, "examples_per_s": rehearsal.BATCH / step_s,
            "step_s": step_s, "steady_steps": len(steady), "epochs": len(run["epochs"]),
            "first_epoch_s": run["epochs"][0]["seconds"] if run["epochs"] else None,
            "run_wall_s": run["wall_seconds"], "peak_rss_bytes": run["peak_rss_bytes"],
            "merge_s": {k: rehearsal.median(v) for k, v in merges.items()},
            "checkpoint_writes": len(run["saves"]) + len(run["items"]),
            "tasks": list(REHEARSAL_TASKS), "config": "configs/vit.py",
            "matmul": f"JAX_DEFAULT_MATMUL_PRECISION={os.environ['JAX_DEFAULT_MATMUL_PRECISION']}"}


def task_vectors(tasks: int, blocks: int, seed: int = 0) -> dict:
    """Stacked [T, ...] float32 leaves in ViT-B/16 shapes, each task at its own scale."""
    rng = np.random.default_rng(seed)
    return {k: (rng.standard_normal((tasks, *s), dtype=np.float32)
                * rng.uniform(0.5, 2.0, (tasks,) + (1,) * len(s)).astype(np.float32))
            for k, s in common.vit_b16_shapes(blocks).items()}


def merges_part(args, repeats: int = 3) -> dict:
    """The merges on the default device against the CPU backend, on the same inputs.

    On a CPU the exact k-th magnitude comes from the host selection, on a GPU or TPU
    from the bit-pattern bisection (`atm_jax.select`); both are exact, so TIES and
    Breadcrumbs must keep the same entries, and the merged values may differ only by
    float summation order.
    """
    import jax
    import jax.numpy as jnp

    from atm_jax import merge

    ops = {"mean": {}, "ties": {"density": 0.15}, "breadcrumbs": {"beta": 0.85, "gamma": 0.993},
           "dare": {"p": 0.9}, "dare_ties": {"p": 0.9}}
    accel, cpu = jax.devices()[0], jax.devices("cpu")[0]
    host = task_vectors(args.tasks, args.blocks)

    def timed(fn, trees, **kwargs):
        out = jax.block_until_ready(fn(trees, **kwargs))  # compiles
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            out = jax.block_until_ready(fn(trees, **kwargs))
            times.append(time.perf_counter() - start)
        return out, common.median(times)

    results = {}
    for name, hparams in ops.items():
        fn, stochastic = merge.get(name), merge.info(name).stochastic
        key = jax.random.key(0)
        a, ta = timed(fn, jax.device_put(host, accel), **hparams,
                      **({"key": jax.device_put(key, accel)} if stochastic else {}))
        with jax.default_device(cpu):
            c, tc = timed(fn, jax.device_put(host, cpu), **hparams,
                          **({"key": jax.device_put(key, cpu)} if stochastic else {}))
        pairs = [(np.asarray(x), np.asarray(y))
                 for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(c))]
        results[name] = {
            "accelerator_s": ta, "cpu_s": tc,
            "max_abs_diff": max(float(jnp.max(jnp.abs(x - y))) for x, y in pairs),
            "kept_sets_equal": all(np.array_equal(x != 0, y != 0) for x, y in pairs)}
    return {"status": "ok", "merges": results, "device_kind": accel.device_kind,
            "platform": accel.platform, "task_vectors": f"{args.tasks} × {args.blocks} blocks",
            "versions": common.versions("jax", "jaxlib", "flax", "optax")}


def describe(part: Part, args) -> dict:
    return {**dataclasses.asdict(part), "matmul_precision": args.matmul_precision,
            "tiny": args.tiny, "run_started": args.stamp, "notes": args.note}


def part_main(part: Part, args) -> dict:
    """One part end to end (in its own process); its row is recorded in ``--out``."""
    started = time.monotonic()
    deadline = started + (args.part_timeout_s or part.timeout_s)
    try:
        if part.kind in ("ours", "torch"):
            row = train_part(part, args, deadline)
        elif part.name in args.inject_failure:
            raise InjectedFailure(f"{part.name}: failure injected by --inject-failure")
        else:
            row = rehearsal_part(args) if part.kind == "rehearsal" else merges_part(args)
    except Exception as error:  # noqa: BLE001 - a failed part is a row, not the end of the run
        traceback.print_exc()
        row = {"status": "failed", "error": f"{type(error).__name__}: {error}"[:300]}
    row = report.complete({**describe(part, args), "wall_s": time.monotonic() - started, **row})
    report.record(args.out, row)
    return row


def drive(args, names: list[str]) -> None:
    """Every named part in its own process, in order, within the budget."""
    for name in ("parts.jsonl", "accelerator_check.md", "parts.log"):  # a fresh run's rows only
        (args.out / name).unlink(missing_ok=True)
    deadline = time.monotonic() + args.budget_s
    print(f"{len(names)} parts, budget {args.budget_s:.0f} s, matmul precision "
          f"{args.matmul_precision}; rows go to {args.out}", flush=True)
    for name in names:
        part, left = PARTS[name], deadline - time.monotonic()
        before = len(report.rows(args.out))
        if left < min(MIN_PART_S, part.timeout_s):
            report.record(args.out, report.complete(
                {**describe(part, args), "status": "not started",
                 "error": f"{left:.0f} s of the budget left"}))
        else:
            timeout = min(part.timeout_s, left)
            cmd = [sys.executable, __file__, "--part", name, "--out", str(args.out),
                   "--part-timeout-s", str(max(1.0, timeout - 5)), *worker_flags(args)]
            status, _, error = run_process(cmd, timeout, args.log, name)
            if len(report.rows(args.out)) == before:  # the part died before recording
                report.record(args.out, report.complete(
                    {**describe(part, args), "status": status,
                     "error": error, "wall_s": timeout if status == "timed out" else None}))
        row = report.rows(args.out)[-1]
        print(f"  {report.one_line(row)}", flush=True)
    print("\n" + report.render(args.out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=pathlib.Path, help="output folder (default: a new temporary one)")
    parser.add_argument("--parts", default="", help=f"comma-separated, from {list(PARTS)} "
                        f"(default: all but merges)")
    parser.add_argument("--tiny", action="store_true",
                        help=f"tiny models, batches {TINY_BATCHES}, short windows (a CPU check)")
    parser.add_argument("--budget-s", type=float, default=BUDGET_S, help="the whole run's limit")
    parser.add_argument("--matmul-precision", choices=["tf32", "highest"], default="tf32",
                        help="float32 matmuls on both sides: TF32 tensor cores or full float32")
    parser.add_argument("--windows", type=int, help="timed windows per measurement")
    parser.add_argument("--window-s", type=float, help="target seconds per window")
    parser.add_argument("--batches", type=lambda s: tuple(int(b) for b in s.split(",")),
                        help=f"batches to try, largest first (default {BATCHES})")
    parser.add_argument("--tasks", type=int, default=7, help="merges: task vectors")
    parser.add_argument("--blocks", type=int, default=12, help="merges: ViT-B/16 blocks")
    parser.add_argument("--note", action="append", default=[],
                        help="a line for the table's header (repeatable), e.g. the commit "
                             "where the machine has no git")
    parser.add_argument("--tiny-compile", action="store_true",
                        help="with --tiny, run the torch.compile parts too (minutes on a CPU)")
    parser.add_argument("--inject-failure", action="append", default=[], metavar="PART",
                        help="make PART fail (tests the failure path; repeatable)")
    parser.add_argument("--inject-oom", action="append", default=[], metavar="PART",
                        help="PART's largest batch reports out of memory (tests the search)")
    parser.add_argument("--part", help=argparse.SUPPRESS)
    parser.add_argument("--attempt", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--part-timeout-s", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--stamp", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.windows = args.windows or (2 if args.tiny else 3)
    args.window_s = args.window_s or (0.2 if args.tiny else 1.0)
    args.batches = args.batches or (TINY_BATCHES if args.tiny else BATCHES)
    args.stamp = args.stamp or common.utc_now().strftime("%Y-%m-%d %H:%M")
    if args.tiny and (args.tasks, args.blocks) == (7, 12):
        args.tasks, args.blocks = 3, 0
    names = [n for n in args.parts.split(",") if n] or list(DEFAULT_PARTS)
    unknown = [n for n in names + args.inject_failure + args.inject_oom if n not in PARTS]
    if unknown:
        parser.error(f"unknown parts {unknown}; choose from {list(PARTS)}")
    if args.attempt:
        print(json.dumps(attempt(PARTS[args.attempt], args.batch, args)))
        return
    args.out = args.out or pathlib.Path(tempfile.mkdtemp(prefix="accelerator_check_"))
    args.out.mkdir(parents=True, exist_ok=True)
    args.log = args.out / "parts.log"
    if args.part:
        print(json.dumps(part_main(PARTS[args.part], args)))
        return
    drive(args, names)


if __name__ == "__main__":
    main()
