"""Step time and examples/s on 1, 2, 4, 8 (fake) devices, and with task parallelism.

    python benchmarks/scale_bench.py                 # every row, ≈ 5-10 min on 2 cores
    python benchmarks/scale_bench.py --rows vit_tiny --meshes 1x1 1x8 2x4

Each measurement runs in its own process (the device count is fixed when JAX starts:
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` on a CPU; on a GPU/TPU host
the real devices are used and N must not exceed them). A mesh ``TxD`` is
``config.mesh = {"task": T, "data": D}``: ``1xD`` is D-way data parallel (the global
batch is split over D devices: same batch, same numbers); ``TxD`` with T > 1 runs T
tasks at once, one step of each per round, each on its own D devices
(`atm_jax.parallel`), so a round trains T batches.

On a CPU, fake devices share the same cores: the table shows the overhead of the
SPMD program (partitioning, collectives, per-device dispatch), not a speed-up.
The closing note gives what can only be argued on paper for real accelerators.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402
import train_bench  # noqa: E402

ROWS = {
    "vit_tiny": train_bench.Row("vit_tiny", "mini ViT (vit_tiny, 0.8M)", "vit_tiny", 64),
    "minilm": train_bench.Row("minilm", "BERT-base-shaped, MiniLM-sized (6 × 384, 22.7M), seq 32",
                              "minilm", 32, 32),
}
MESHES = ("1x1", "1x2", "1x4", "1x8", "2x4", "4x2")


def worker(row_name: str, mesh: str, windows: int, steps: int) -> dict:
    import jax

    from atm_jax import finetune, sharding
    from atm_jax.models import heads

    row = ROWS[row_name]
    task, data = (int(v) for v in mesh.split("x"))
    apply_fn, backbone, width, note = train_bench.jax_model(row)
    if row.model == "minilm" and note == "real weights":
        note = "all-MiniLM-L6-v2 weights"
    head = heads.init_head(jax.random.key(1), width, train_bench.NUM_CLASSES)
    opt = finetune.OptimizerConfig(learning_rate=train_bench.LEARNING_RATE,
                                   grad_clip=train_bench.GRAD_CLIP, batch_size=row.batch)
    full = sharding.make_mesh({"task": task, "data": data})
    groups = sharding.task_meshes(full) if task > 1 else [full]
    placements = [sharding.Placement(m) for m in groups]
    finetuner = finetune.Finetuner(apply_fn, opt, train_head=False)
    states, batches = [], []
    for g, placement in enumerate(placements):
        states.append(finetuner.init_state(placement.params(backbone), placement.params(head)))
        host = train_bench.make_batches(row, row.batch, seed=g)
        placed = []
        for b in host:
            arrays = {"inputs": b["inputs"], "labels": b["labels"],
                      "mask": np.ones(row.batch, np.float32)}
            total = placement.multiple * -(-row.batch // placement.multiple)
            arrays = {k: placement.put(np.concatenate(
                [v, np.zeros((total - len(v), *v.shape[1:]), v.dtype)]), total)
                for k, v in arrays.items()}
            placed.append(arrays)
        batches.append(placed)
    holder = {"i": 0, "metrics": []}

    def call():  # one round: one step of every task group (dispatch is asynchronous)
        i = holder["i"] % 3
        holder["metrics"] = []
        for g in range(len(states)):
            states[g], m = finetuner.train_step(states[g], batches[g][i])
            holder["metrics"].append(m)
        holder["i"] += 1

    def sync():
        jax.block_until_ready((states, holder["metrics"]))

    for _ in range(2):  # compile + warm up
        call()
    sync()
    per_round = common.timed_windows(call, windows=windows, steps=steps, sync=sync)
    seconds = common.median(per_round)
    return {"row": row_name, "mesh": mesh, "devices": jax.device_count(),
            "backend": jax.default_backend(),
            "round_s": seconds, "spread": [min(per_round), max(per_round)],
            "examples_per_s": len(states) * row.batch / seconds, "tasks": len(states),
            "cache_size": finetuner.train_step._cache_size(), "weights": note,
            "params": int(sum(np.size(x) for x in jax.tree.leaves(backbone)))}


def paper_note() -> str:
    """What a v4-32 pod would do, from FLOP and byte counts (not measured)."""
    lines = [
        "On paper (not measured): one data-parallel step costs ≈ 6 · P · T FLOPs (P params, "
        "T tokens in the global batch) and one all-reduce of the fp32 gradients, "
        "≈ 2 · 4 · P bytes through each chip (ring). Assumptions: TPU v4 chip 275 TFLOP/s "
        "bf16 peak at 40 % utilization, ≈ 100 GB/s effective all-reduce bandwidth per chip "
        "(ICI); a v4-32 slice = 16 chips (32 TensorCores) on one mesh axis.", "",
        "| model | P | global batch × tokens | compute / step, 16 chips | all-reduce / step "
        "| compute ÷ comm |", "|---|---:|---:|---:|---:|---:|"]
    for name, p, batch, tokens in (("CLIP ViT-B/16 (vision)", 86e6, 32 * 16, 197),
                                   ("BERT-base", 110e6, 32 * 16, 128),
                                   ("MiniLM (6 × 384)", 22.7e6, 32 * 16, 128)):
        compute = 6 * p * batch * tokens / (16 * 275e12 * 0.4)
        comm = 2 * 4 * p / 100e9
        lines.append(f"| {name} | {p / 1e6:.0f}M | {batch} × {tokens} | {compute * 1e3:.1f} ms | "
                     f"{comm * 1e3:.1f} ms | {compute / comm:.1f} |")
    lines += ["", "With the paper's batch of 32 per task, 16-way data parallel leaves 2 "
              "examples per chip: compute ÷ communication stays ≈ 1, so a pod is better used "
              "task parallel (`mesh.task` = the number of tasks, e.g. 7 or 8 groups of 2-4 "
              "chips), where the T finetunes of an iteration need no communication at all "
              "until the merge; the expected speed-up of an ATM iteration is then ≈ min(T, "
              "groups) over one group, bounded by the largest task (uneven sizes)."]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--meshes", nargs="+", default=list(MESHES))
    parser.add_argument("--windows", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4, help="rounds per timed window")
    parser.add_argument("--worker", nargs=2, metavar=("ROW", "MESH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args.windows, args.steps)))
        return
    results = []
    for row in args.rows:
        for mesh in args.meshes:
            t, d = (int(v) for v in mesh.split("x"))
            env = {"XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") +
                                 f" --xla_force_host_platform_device_count={t * d}").strip()}
            print(f"{row} mesh {mesh} ...", flush=True)
            out = common.run_worker(__file__, ["--worker", row, mesh, "--windows",
                                               str(args.windows), "--steps", str(args.steps)],
                                    env=env, timeout=1800)
            if out is not None:
                results.append(out)
                print(f"  {out['round_s'] * 1e3:.1f} ms per round, "
                      f"{out['examples_per_s']:.1f} examples/s", flush=True)
    base = {r["row"]: r["examples_per_s"] for r in results if r["mesh"] == "1x1"}
    table = ["| model | mesh task × data | devices | tasks per round | step (round) ms "
             "| examples/s | ÷ 1 device |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in results:
        ratio = r["examples_per_s"] / base[r["row"]] if r["row"] in base else float("nan")
        table.append(f"| {ROWS[r['row']].label} | {r['mesh'].replace('x', ' × ')} | "
                     f"{int(r['mesh'].split('x')[0]) * int(r['mesh'].split('x')[1])} | "
                     f"{r['tasks']} | {r['round_s'] * 1e3:.1f} ({r['spread'][0] * 1e3:.0f}–"
                     f"{r['spread'][1] * 1e3:.0f}) | {r['examples_per_s']:.1f} | {ratio:.2f}× |")
    on_cpu = all(r["backend"] == "cpu" for r in results)
    fake = "fake CPU devices" if on_cpu else "devices"
    body = "\n".join([
        "## Step time and throughput", "",
        f"Global batch per task: vit_tiny {ROWS['vit_tiny'].batch}, MiniLM-sized "
        f"{ROWS['minilm'].batch} × seq {ROWS['minilm'].seq}; adam, frozen head; median of "
        f"{args.windows} windows × {args.steps} rounds. One process per row.", "",
        *table, "",
        (f"**These are {fake} sharing this machine's {common.cpu_count()} cores: they show the "
         "overhead of the sharded program (partitioning, collectives, per-device dispatch), "
         "not a speed-up.** On real devices each device has its own compute; rerun there."
         if on_cpu else "Real accelerator devices."), "",
        paper_note()])
    header = [f"devices: XLA_FLAGS=--xla_force_host_platform_device_count=N per row "
              f"(CPU), {common.versions('jax', 'jaxlib', 'flax', 'optax')}",
              f"load average at the end: {os.getloadavg()[0]:.1f} (other jobs share the cores)",
              "MiniLM-sized row: " + next((r["weights"] for r in results if r["row"] == "minilm"),
                                          "not run")]
    path = common.write_results("scale_bench", header, body)
    print(body)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
