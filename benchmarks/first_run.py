"""The README's run command as a newcomer meets it: wall time after install, from an empty cache.

Runs ``python -m atm_jax.main --config=configs/mini.py`` in a subprocess with
``ATM_JAX_CACHE`` pointing at an empty folder (data fetched, nothing compiled in the
project's cache; JAX's persistent compilation cache pointed there too), and records the
wall time, the child's CPU time (user + sys), the load average before and after, and
where the time went (results.json's per-unit timings). The goal is ≤ 300 s.

Run::

  python benchmarks/first_run.py                    # once, writes results/
  python benchmarks/first_run.py --runs 2
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402


def one_run(config: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="atm_first_run_") as tmp:
        tmp = pathlib.Path(tmp)
        env = {**os.environ, "ATM_JAX_CACHE": str(tmp / "cache"),
               "JAX_COMPILATION_CACHE_DIR": str(tmp / "xla")}
        load_before = os.getloadavg()
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "atm_jax.main", f"--config={config}",
                               f"--workdir={tmp / 'work'}"], cwd=common.ROOT, env=env,
                              capture_output=True, text=True)
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if proc.returncode:
            raise SystemExit(f"the run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        results = json.loads((tmp / "work" / "results.json").read_text())
        return {"wall": wall, "cpu": (after.ru_utime - before.ru_utime)
                + (after.ru_stime - before.ru_stime), "load_before": load_before,
                "load_after": os.getloadavg(), "timings": results.get("timings_seconds", {}),
                "total": results.get("total_seconds"),
                "average": {r["method"]: round(100 * r["average"], 1) for r in results["rows"]}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/mini.py")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    runs = []
    for i in range(args.runs):
        runs.append(one_run(args.config))
        print(json.dumps(runs[-1]), flush=True)
    lines = ["| run | wall (s) | CPU user+sys (s) | load before → after (1/5/15 min) | "
             "runner total (s) | units (s) |", "|---|---|---|---|---|---|"]
    for i, r in enumerate(runs):
        units = ", ".join(f"{k} {v:.0f}" for k, v in r["timings"].items())
        lb, la = (" / ".join(f"{x:.2f}" for x in r[k]) for k in ("load_before", "load_after"))
        lines.append(f"| {i + 1} | {r['wall']:.0f} | {r['cpu']:.0f} | {lb} → {la} | "
                     f"{r['total']} | {units} |")
    averages = ", ".join(f"{k} {v}" for k, v in runs[-1]["average"].items())
    body = (f"`python -m atm_jax.main --config={args.config}` from an empty ATM_JAX_CACHE and "
            "XLA cache (after install). Goal ≤ 300 s.\n\n" + "\n".join(lines)
            + f"\n\nAverages of the last run (%): {averages}.\n")
    print(body)
    if not args.no_write:
        print("wrote", common.write_results("first_run", [common.versions("jax", "flax")], body))


if __name__ == "__main__":
    main()
