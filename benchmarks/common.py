"""Helpers every benchmark shares: results header, one process per measurement, timing.

A benchmark script imports this module by putting its own folder on ``sys.path``
(the scripts are run as files, not as a package)::

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    import common

Each results file in ``benchmarks/results/`` starts with the same header (date,
commit, machine, versions) so runs stay comparable across machines and commits.
"""

from __future__ import annotations

import datetime
import importlib
import importlib.metadata
import json
import os
import pathlib
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def commit(tree: str | os.PathLike = ROOT) -> str:
    """The short hash of ``tree``'s HEAD (default: this checkout), with "+dirty" when
    tracked files differ from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=tree, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, cwd=tree, check=True).stdout
        return head + ("+dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> str:
    """The machine line of every results header: CPU, cores, memory, OS."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name")), cpu)
    except OSError:
        pass
    cores = f"{os.cpu_count()} CPU cores"
    if cpu_count() != os.cpu_count():
        cores += f" ({cpu_count()} usable by this run)"
    return f"{cpu}, {cores}, {memory:.0f} GiB, {platform.platform()}"


def cpu_count() -> int:
    """The cores this process may run on (``taskset`` and cgroup pinning respected)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def versions(*modules: str) -> str:
    """``"jax 0.10.2, numpy 2.4.6"`` for the named modules that import (others skipped)."""
    found = [f"python {platform.python_version()}"]
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        version = getattr(module, "__version__", None)
        if version is None:  # e.g. orbax.checkpoint: ask the distribution (orbax-checkpoint)
            try:
                version = importlib.metadata.version(name.replace(".", "-"))
            except importlib.metadata.PackageNotFoundError:
                version = "?"
        found.append(f"{name} {version}")
    return ", ".join(found)


def utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def load_config(spec: str):
    """``get_config(arg)`` of ``path[:arg]`` (a config file under the repository root)."""
    import importlib.util

    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("bench_config", ROOT / path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def finetuned_suite(config, epochs: int):
    """``config``'s suite with every task finetuned ``epochs`` from the base, with the
    runner's one-shot task keys (``atm.task_key(key(seed), 0, i)``).

    Returns:
        ``(setup, finetuned, heads, seconds)``: the suite's `Setup`, the finetuned params
        in task order, ``{task: head}`` and the finetuning's wall seconds.
    """
    import jax

    from atm_jax import atm, suites
    from atm_jax.finetune import Finetuner, OptimizerConfig

    setup = suites.get(config.suite).build(config, print)
    finetuner = Finetuner(setup.apply_fn, OptimizerConfig(**config.optimizer.to_dict()),
                          train_head=config.heads == "trainable", progress=False,
                          augment=setup.augment)
    key = jax.random.key(config.seed)
    start = time.perf_counter()
    finetuned, heads = [], {}
    for i, t in enumerate(setup.heads):
        x, y = setup.tasks[t].train
        params, head, _ = finetuner.finetune(setup.base, setup.heads[t], x, y, epochs=epochs,
                                             key=atm.task_key(key, 0, i))
        finetuned.append(params)
        heads[t] = head
    jax.block_until_ready(finetuned)
    return setup, finetuned, heads, time.perf_counter() - start


def write_results(name: str, header: Sequence[str], body: str,
                  stamp: datetime.datetime | None = None, suffix: str = ".md"
                  ) -> pathlib.Path:
    """Writes ``benchmarks/results/<name>_<YYYYmmdd>_<HHMM><suffix>``.

    Args:
        name: benchmark name (the script's stem).
        header: bullet lines after the title (commit and machine are added first).
        body: the tables and notes, Markdown.
        stamp: UTC time of the run (default now); names the file and the title.
        suffix: file suffix.

    Returns:
        The written path.
    """
    stamp = stamp or utc_now()
    lines = [f"# {name} — {stamp:%Y-%m-%d %H:%M} UTC", "",
             f"- commit: {commit()}", f"- machine: {machine()}", *[f"- {h}" for h in header],
             "", ""]
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}_{stamp:%Y%m%d_%H%M}{suffix}"
    if path.exists():  # two runs in one minute (e.g. rows run side by side): keep both
        path = RESULTS / f"{name}_{stamp:%Y%m%d_%H%M%S}{suffix}"
    path.write_text("\n".join(lines) + body.rstrip("\n") + "\n")
    return path


def run_worker(script: str | os.PathLike, args: Sequence[str], *, env: dict | None = None,
               timeout: float | None = None) -> dict | None:
    """Runs one measurement in its own process and returns the JSON it printed last.

    One process per measurement keeps measurements from sharing compile caches,
    allocator state, thread pools or peak-memory counters. The worker prints one
    JSON object as its last stdout line.

    Args:
        script: the benchmark file to run with this interpreter.
        args: its command-line arguments.
        env: extra environment variables for the worker.
        timeout: seconds before the worker is killed (None: no limit).

    Returns:
        The parsed object, or None when the worker failed (its stderr tail is printed).
    """
    cmd = [sys.executable, str(script), *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                              env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired:
        print(f"  worker timed out after {timeout:.0f} s: {' '.join(args)}", file=sys.stderr)
        return None
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        print(f"  worker failed ({' '.join(args)}):\n{proc.stderr[-3000:]}", file=sys.stderr)
        return None
    return json.loads(lines[-1])


def timed_windows(call: Callable[[], None], *, windows: int, steps: int,
                  sync: Callable[[], None] = lambda: None) -> list[float]:
    """Seconds per call over each of `windows` timed windows of `steps` calls.

    Warm up (compile, first-touch page faults, allocator growth) before calling
    this. `sync` runs at the end of every window, inside the timing, so work that
    `call` only dispatched (JAX's asynchronous dispatch) is counted in its window.
    """
    sync()
    per_call = []
    for _ in range(windows):
        start = time.perf_counter()
        for _ in range(steps):
            call()
        sync()
        per_call.append((time.perf_counter() - start) / steps)
    return per_call


def median(values: Sequence[float]) -> float:
    return float(np.median(values))


def rss_bytes() -> int:
    """Resident memory of this process now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak() -> bool:
    """Resets the kernel's peak-resident counter (VmHWM); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_bytes() -> int:
    """Peak resident memory (VmHWM) since start or the last `reset_peak`."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def vit_b16_shapes(blocks: int = 12) -> dict[str, tuple[int, ...]]:
    """Leaf shapes of the CLIP ViT-B/16 image encoder (≈86M parameters at 12 blocks)."""
    w, mlp = 768, 3072
    shapes = {"conv1/kernel": (16, 16, 3, w), "class_embedding": (w,),
              "positional_embedding": (197, w), "ln_pre/scale": (w,), "ln_pre/bias": (w,)}
    for i in range(blocks):
        p = f"blocks_{i}"
        shapes.update({
            f"{p}/ln_1/scale": (w,), f"{p}/ln_1/bias": (w,),
            f"{p}/attn/in_proj/kernel": (w, 3 * w), f"{p}/attn/in_proj/bias": (3 * w,),
            f"{p}/attn/out_proj/kernel": (w, w), f"{p}/attn/out_proj/bias": (w,),
            f"{p}/ln_2/scale": (w,), f"{p}/ln_2/bias": (w,),
            f"{p}/mlp/fc/kernel": (w, mlp), f"{p}/mlp/fc/bias": (mlp,),
            f"{p}/mlp/proj/kernel": (mlp, w), f"{p}/mlp/proj/bias": (w,),
        })
    shapes.update({"ln_post/scale": (w,), "ln_post/bias": (w,), "proj": (w, 512)})
    return shapes
