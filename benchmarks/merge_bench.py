"""Merge operators on ViT-B/16-sized task vectors: time and peak memory, side by side.

Every operator of ``atm_jax.merge`` on T task vectors shaped like the CLIP
ViT-B/16 image encoder (≈86M float32 each), against a NumPy reference and, when
torch is installed, an official-style PyTorch TIES (flatten, ``torch.kthvalue`` per
task, sign by sum, disjoint mean) and mean; the data-free merges of 2024-25 against
FusionBench's and mergekit's own functions in their venvs (``peers.py``; their
agreement with ours: ``peer_merges.py``). Each (implementation, operator) runs in
its own subprocess so peak memory is its own: the process builds the stacked
inputs, runs once to warm up (compiles), then runs ``--repeats`` times; we report
the median time of the timed runs and the peak resident memory from the warm-up
on (compilation included) as a multiple of the stacked inputs' bytes (1.0 =
nothing beyond the inputs).

Run::

  python benchmarks/merge_bench.py                 # 7 × 86M, writes benchmarks/results/
  python benchmarks/merge_bench.py --tasks 3 --blocks 2 --repeats 2 --no-write   # quick look
  python benchmarks/merge_bench.py --against /tmp/old --rounds 2   # this tree vs another

``--against TREE`` compares this checkout with another source tree (a ``git
worktree`` of an earlier commit): per operator, the two trees' workers alternate
``--rounds`` times (this, other, this, other, …), so slow spells of a shared machine
hit both; the table gives each side's median over all its timed runs and the spread
between its own rounds, which is the noise the ratio has to beat.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402
from common import vit_b16_shapes  # noqa: E402

# (operator, hyperparameters): the paper's settings where it states them.
OPERATORS = [
    ("mean", {}),
    ("sum", {}),
    ("ties", {"density": 0.2, "scope": "model"}),
    ("ties", {"density": 0.2, "scope": "leaf"}),
    ("breadcrumbs", {"beta": 0.85, "gamma": 0.993}),
    ("dare", {"p": 0.9}),
    ("dare_ties", {"p": 0.9}),
    ("ties_atm_code", {"density": 0.15}),
    ("breadcrumbs_atm_code", {}),
    # The data-free merges of 2024-25 (peer: FusionBench / mergekit, `peers.py`).
    ("tsv", {}),
    ("iso_c", {}),
    ("iso_cts", {"common_space_fraction": 0.8}),
    ("consensus", {"k": 2, "lam": 0.6}),
    ("della", {"density": 0.5, "epsilon": 0.15, "rescale": "l1"}),  # mergekit's rescale
    ("model_stock", {}),
    ("slerp", {"t": 0.5}),  # two tasks (the first two), with a base
]
# WUDI's 300 steps over every layer take ~25 min a layer on the peer's side here: only
# with --ops wudi; `peer_merges.py` times a subset of layers on both sides.
ON_REQUEST = {"wudi": {"steps": 300, "learning_rate": 1e-5}}
NUMPY_REFS = {"mean", "sum", "ties", "breadcrumbs", "dare"}
TORCH_REFS = {"mean", "ties"}
PEER_REFS = {"tsv", "iso_c", "iso_cts", "consensus", "della", "model_stock", "slerp", "wudi"}
# Our hyperparameter names -> the peer worker's (`peers.py`).
PEER_HPARAMS = {"consensus": lambda hp: {"tall_mask_lambda": hp["lam"], "k": hp["k"]},
                "wudi": lambda hp: {"iter_num": hp["steps"]},
                "della": lambda hp: {"density": hp["density"], "epsilon": hp["epsilon"]}}


def _make_inputs(tasks: int, blocks: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    out = {}
    for name, shape in vit_b16_shapes(blocks).items():
        # Task vectors are small and roughly Gaussian; the scale does not matter.
        out[name] = (rng.standard_normal((tasks, *shape), dtype=np.float32) * 1e-3)
    return out


# ----------------------------------------------------------------------------
# Reference implementations (independent of atm_jax)
# ----------------------------------------------------------------------------


def numpy_merge(op: str, stacked: dict[str, np.ndarray], hp: dict) -> dict[str, np.ndarray]:
    """Straightforward NumPy versions, written the way the papers describe them."""
    num_tasks = next(iter(stacked.values())).shape[0]
    if op in ("mean", "sum"):
        total = {k: v.sum(axis=0) for k, v in stacked.items()}
        return total if op == "sum" else {k: v / num_tasks for k, v in total.items()}
    if op == "ties":
        names = list(stacked)
        if hp["scope"] == "leaf":
            return {k: numpy_merge("ties", {k: stacked[k]}, dict(hp, scope="model"))[k] for k in names}
        flat = np.concatenate([stacked[k].reshape(num_tasks, -1) for k in names], axis=1)
        d = flat.shape[1]
        k = int(np.ceil(hp["density"] * d))
        kth = np.partition(np.abs(flat), d - k, axis=1)[:, d - k:d - k + 1]
        trimmed = np.where(np.abs(flat) >= kth, flat, 0)
        sign = np.sign(trimmed.sum(axis=0))
        sign[sign == 0] = np.sign(sign.sum())
        chosen = np.where(sign > 0, trimmed > 0, trimmed < 0)
        merged = (trimmed * chosen).sum(axis=0) / np.maximum(chosen.sum(axis=0), 1)
        out, offset = {}, 0
        for name in names:
            size = stacked[name][0].size
            out[name] = merged[offset:offset + size].reshape(stacked[name].shape[1:])
            offset += size
        return out
    if op == "breadcrumbs":
        out = {}
        for name, x in stacked.items():
            flat = np.abs(x.reshape(num_tasks, -1))
            n = flat.shape[1]
            lo_rank, hi_rank = n - int(np.floor(hp["beta"] * n)), n - int(np.ceil(hp["gamma"] * n)) + 1
            part = np.partition(flat, [n - lo_rank, n - hi_rank], axis=1)
            lo, hi = part[:, n - lo_rank:n - lo_rank + 1], part[:, n - hi_rank:n - hi_rank + 1]
            keep = (flat >= lo) & (flat <= hi)
            out[name] = np.where(keep.reshape(x.shape), x, 0).mean(axis=0)
        return out
    if op == "dare":
        rng = np.random.default_rng(0)
        p = hp["p"]
        return {k: np.where(rng.random(v.shape) >= p, v / (1 - p), 0).mean(axis=0)
                for k, v in stacked.items()}
    raise ValueError(op)


def torch_merge(op: str, stacked: dict, hp: dict) -> dict:
    """Official-style PyTorch: flatten to [T, d], kthvalue per task, sign by sum."""
    import torch

    if op == "mean":
        return {k: v.mean(dim=0) for k, v in stacked.items()}
    names = list(stacked)
    num_tasks = stacked[names[0]].shape[0]
    flat = torch.cat([stacked[k].reshape(num_tasks, -1) for k in names], dim=1)
    d = flat.shape[1]
    k = d - int(d * hp["density"])
    kth, _ = flat.abs().kthvalue(k, dim=1, keepdim=True)
    trimmed = flat * (flat.abs() >= kth)
    sign = torch.sign(trimmed.sum(dim=0))
    sign[sign == 0] = torch.sign(sign.sum())
    chosen = torch.where(sign.unsqueeze(0) > 0, trimmed > 0, trimmed < 0)
    merged = (trimmed * chosen).sum(dim=0) / chosen.sum(dim=0).clamp(min=1)
    out, offset = {}, 0
    for name in names:
        size = stacked[name][0].numel()
        out[name] = merged[offset:offset + size].reshape(stacked[name].shape[1:])
        offset += size
    return out


# ----------------------------------------------------------------------------
# One measurement, in a subprocess
# ----------------------------------------------------------------------------


def _peer(op: str, hp: dict, inputs: dict, base: dict | None, repeats: int) -> dict:
    """The peer's merge in its venv (`peers.py`): its own timing and resident peak."""
    import peer_merges
    import peers

    stacked_bytes = sum(v.nbytes for v in inputs.values())
    hp = PEER_HPARAMS.get(op, lambda h: dict(h))(hp)
    _, seconds, peak = peers.run_peer(op, peer_merges.to_torch(inputs), hp, repeats=repeats,
                                      base=None if base is None else peer_merges.to_torch(base))
    return {"times": seconds, "median": float(np.median(seconds)), "stacked_bytes": stacked_bytes,
            "peak_extra_bytes": None, "peak_rss_bytes": peak}


def _worker(impl: str, op: str, hp: dict, tasks: int, blocks: int, repeats: int) -> dict:
    inputs = _make_inputs(tasks, blocks)
    base = None
    if op == "slerp":  # two models and the weights they were finetuned from
        inputs = {k: v[:2] for k, v in inputs.items()}
        rng = np.random.default_rng(1)
        base = {k: rng.standard_normal(v.shape[1:], dtype=np.float32) * 0.02 for k, v in inputs.items()}
    stacked_bytes = sum(v.nbytes for v in inputs.values())
    if impl == "peer":
        return _peer(op, hp, inputs, base, repeats)
    if impl == "atm_jax":
        import jax
        import jax.numpy as jnp

        from atm_jax import merge

        stacked = {k: jnp.asarray(v) for k, v in inputs.items()}
        del inputs
        fn = merge.get(op)
        key = jax.random.key(0)

        kwargs = dict(hp, key=key) if merge.info(op).stochastic else dict(hp)
        if base is not None:
            kwargs["base"] = {k: jnp.asarray(v) for k, v in base.items()}

        def call():
            return jax.block_until_ready(fn(stacked, **kwargs))
    elif impl == "numpy":
        stacked = inputs

        def call():
            return numpy_merge(op, stacked, hp)
    else:
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
        stacked = {k: torch.from_numpy(v) for k, v in inputs.items()}

        def call():
            return torch_merge(op, stacked, hp)

    # Peak memory counts from here on, warm-up (compilation) included: freed
    # buffers may stay resident in an allocator, so measuring only after a
    # warm-up would flatter the timed runs.
    base = common.rss_bytes()
    has_peak = common.reset_peak()
    out = call()  # warm-up: compilation, page faults
    del out
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = call()
        times.append(time.perf_counter() - start)
        del out
    peak = common.peak_bytes() if has_peak else 0
    return {"times": times, "median": float(np.median(times)), "stacked_bytes": stacked_bytes,
            "peak_extra_bytes": max(0, peak - base) if has_peak else None}


def _measure(impl, op, hp, args, tree: pathlib.Path | None = None) -> dict | None:
    """One worker process; ``tree``: run that source tree's merge_bench and package."""
    script = __file__ if tree is None else tree / "benchmarks" / "merge_bench.py"
    env = None if tree is None else {"PYTHONPATH": str(tree)}
    return common.run_worker(script, ["--worker", json.dumps([impl, op, hp]),
                                      "--tasks", str(args.tasks), "--blocks", str(args.blocks),
                                      "--repeats", str(args.repeats)], env=env)


def compare_trees(ops, args, per_task: int) -> None:
    """This checkout against ``args.against``, the workers of each operator interleaved."""
    other = pathlib.Path(args.against).resolve()
    sides = {"this": None, "other": other}
    lines = ["| operator | this tree s | other tree s | this ÷ other | this: round spread "
             "| other: round spread |", "|---|---:|---:|---:|---:|---:|"]
    for op, hp in ops:
        label = _label(op, hp)
        runs = {name: [] for name in sides}
        for r in range(args.rounds):
            for name, tree in sides.items():
                print(f"  {label}: round {r + 1}/{args.rounds}, {name} tree", flush=True)
                result = _measure("atm_jax", op, hp, args, tree)
                if result is None:
                    raise SystemExit(f"the worker failed ({name} tree)")
                runs[name].append(result)

        def med(name):
            return common.median([t for r in runs[name] for t in r["times"]])

        def spread(name):
            rounds = [r["median"] for r in runs[name]]
            return f"{(max(rounds) - min(rounds)) / min(rounds):.0%}"

        lines.append(f"| {label} | {med('this'):.3f} | {med('other'):.3f} | "
                     f"{med('this') / med('other'):.2f} | {spread('this')} | {spread('other')} |")
    table = "\n".join(lines)
    print()
    print(table)
    if args.no_write:
        return
    path = common.write_results("merge_bench", [
        common.versions("jax", "numpy"), f"this tree: {common.commit()}; other tree: {other} "
        f"({common.commit(other)})",
        f"inputs: {args.tasks} × {per_task / 1e6:.1f}M float32 (ViT-B/16 leaf shapes); per "
        f"operator {args.rounds} rounds of one worker per tree, alternating, each worker "
        f"timing {args.repeats} runs after a warm-up; medians over all timed runs of a tree",
        "round spread: (slowest − fastest round median) ÷ fastest, within one tree",
    ], table)
    print(f"\nwrote {path.relative_to(common.ROOT)}")


def _label(op, hp):
    inner = ", ".join(f"{k}={v}" for k, v in hp.items())
    return f"{op}({inner})" if inner else op


def _fmt_time(r):
    return "–" if r is None else f"{r['median']:.3f}"


def _fmt_mem(r):
    if r is not None and r.get("peak_rss_bytes"):
        return f"{r['peak_rss_bytes'] / r['stacked_bytes']:.2f}× rss"
    if r is None or r["peak_extra_bytes"] is None:
        return "–"
    return f"{1 + r['peak_extra_bytes'] / r['stacked_bytes']:.2f}×"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=7)
    parser.add_argument("--blocks", type=int, default=12, help="transformer blocks (12 = ViT-B/16)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ops", default="", help="comma-separated operator names (default: all)")
    parser.add_argument("--no-reference", action="store_true", help="skip NumPy and torch")
    parser.add_argument("--no-peers", action="store_true",
                        help="skip FusionBench / mergekit (their venvs: benchmarks/peers.py --setup)")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--against", help="another source tree to compare this one with")
    parser.add_argument("--rounds", type=int, default=2, help="with --against: rounds per tree")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        impl, op, hp = json.loads(args.worker)
        print(json.dumps(_worker(impl, op, hp, args.tasks, args.blocks, args.repeats)))
        return

    try:
        import torch  # noqa: F401
        have_torch = True
    except ImportError:
        have_torch = False
    per_task = sum(int(np.prod(s)) for s in vit_b16_shapes(args.blocks).values())
    wanted = set(filter(None, args.ops.split(",")))
    ops = [(op, hp) for op, hp in OPERATORS if not wanted or op in wanted]
    ops += [(op, hp) for op, hp in ON_REQUEST.items() if op in wanted]
    print(f"{args.tasks} task vectors × {per_task / 1e6:.1f}M float32 "
          f"({args.tasks * per_task * 4 / 2**30:.2f} GiB stacked), median of {args.repeats} runs")
    if args.against:
        compare_trees(ops, args, per_task)
        return
    rows = []
    for op, hp in ops:
        label = _label(op, hp)
        print(f"  {label} ...", flush=True)
        ours = _measure("atm_jax", op, hp, args)
        np_ref = _measure("numpy", op, hp, args) \
            if (op in NUMPY_REFS and not args.no_reference) else None
        torch_ref = _measure("torch", op, hp, args) \
            if (op in TORCH_REFS and have_torch and not args.no_reference and hp.get("scope", "model") == "model") \
            else None
        peer = _measure("peer", op, hp, args) if (op in PEER_REFS and not args.no_peers) else None
        rows.append((label, ours, np_ref, torch_ref, peer))

    head = ("| operator | atm_jax s | atm_jax peak | NumPy s | NumPy peak | PyTorch s | PyTorch peak "
            "| peer s | peer peak | vs NumPy | vs PyTorch | vs peer |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label, ours, np_ref, torch_ref, peer in rows:
        def speedup(ref):
            return "–" if ref is None or ours is None else f"{ref['median'] / ours['median']:.1f}×"
        lines.append(f"| {label} | {_fmt_time(ours)} | {_fmt_mem(ours)} | {_fmt_time(np_ref)} | "
                     f"{_fmt_mem(np_ref)} | {_fmt_time(torch_ref)} | {_fmt_mem(torch_ref)} | "
                     f"{_fmt_time(peer)} | {_fmt_mem(peer)} | "
                     f"{speedup(np_ref)} | {speedup(torch_ref)} | {speedup(peer)} |")
    table = "\n".join(lines)
    print()
    print(table)
    print("\npeak = (stacked inputs + peak extra resident memory from the first call on) ÷ stacked inputs")
    if args.no_write:
        return
    path = common.write_results("merge_bench", [
        common.versions("jax", "numpy", "torch"),
        f"inputs: {args.tasks} × {per_task / 1e6:.1f}M float32 (ViT-B/16 leaf shapes), "
        f"median of {args.repeats} runs after one warm-up, each in its own process",
        "peak = (stacked inputs + peak extra resident memory from the first call on) ÷ stacked inputs; "
        "'rss' (the peers): the worker's peak resident memory, interpreter and torch included, ÷ "
        "stacked inputs",
        "peers: FusionBench 0.2.33 (tsv, iso_c, iso_cts, consensus, model_stock, wudi) and mergekit "
        "0.1.5 (della, slerp), torch 2.13.0 CPU, their own venvs (benchmarks/peers.py), same thread "
        "count; slerp on the first two task vectors with a base",
    ], table)
    print(f"\nwrote {path.relative_to(common.ROOT)}")


if __name__ == "__main__":
    main()
