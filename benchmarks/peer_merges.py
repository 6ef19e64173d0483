"""Our data-free merges beside FusionBench's and mergekit's, on the same task vectors.

For each method: the relative Frobenius distance ``‖Δ − Δ_peer‖ / ‖Δ_peer‖`` over
all compared leaves (float64), and the seconds of one merge call on each side (the
median of ``--repeats`` warm calls, the same thread count on both sides: XLA's and
OpenBLAS's pools here, torch.set_num_threads there; float32). The peers run in
their own venvs (`benchmarks/peers.py`), on the same arrays in torch layout
(``[out, in]`` weights).

Inputs: ``--blocks`` transformer blocks of the CLIP ViT-B/16 image encoder (Flax
layout, `common.vit_b16_shapes`), T = ``--tasks`` task vectors ~ N(0, 1e-3²), a base
~ N(0, 0.02²) for the merges that read weights. The patch-embedding conv, the
position table and the projection are left out: FusionBench merges every 2-D
tensor as a matrix where we take the mean of tables, and mergekit ranks a conv
kernel's entries along its input channels where we rank the whole leaf; the
linear layers, biases and norms are what both sides mean to treat alike.

What is compared (semantics that differ on purpose are listed by the table):

* ``tsv``, ``iso_c``, ``iso_cts``: FusionBench's ``compute_and_sum_svd_mem_reduction``,
  ``iso_c``, ``iso_cts`` (ours with ``method="auto"`` and ``"svd"``).
* ``wudi``: FusionBench's ``wudi_merging`` on a subset of layers (``--wudi-layers``)
  at 300 steps; its full-model time is extrapolated from ``--wudi-probe-steps`` steps
  on every distinct layer shape, times the count of each shape.
* ``consensus``: FusionBench's TALL masks (λ = 0.6) and consensus mask (k = 2) on
  the summed task vector.
* ``model_stock``: FusionBench's ``ModelStock`` at T = 2 (one angle: the same
  formula) and at T (it averages pairwise angles, we average cosines: REFERENCE §7).
* ``della``: mergekit's ``della`` with our keep masks injected (the same entries
  dropped whatever either side's rank tie-breaking) and ``rescale="l1"`` (mergekit's);
  ours' default ``rescale="entry"`` is the paper's 1/p.
* ``slerp``: mergekit's ``slerp`` between base + τ_0 and base + τ_1, t = 0.5.

Run::

  python benchmarks/peers.py --setup          # the two venvs, once (~3 GB with torch)
  python benchmarks/peer_merges.py --blocks 2 --threads 2       # writes benchmarks/results/
  python benchmarks/peer_merges.py --blocks 1 --repeats 1 --no-write --only tsv,della
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time


def _threads_from_argv(argv) -> int:
    for i, a in enumerate(argv):
        if a == "--threads" and i + 1 < len(argv):
            return int(argv[i + 1])
        if a.startswith("--threads="):
            return int(a.split("=", 1)[1])
    return os.cpu_count() or 1


# Thread pools are sized when the libraries load: set them before importing jax.
_THREADS = _threads_from_argv(sys.argv)
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = str(_THREADS)
if _THREADS == 1:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"
                               " intra_op_parallelism_threads=1").strip()

import numpy as np  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402
import peers  # noqa: E402

LEFT_OUT = ("conv1/kernel", "positional_embedding", "proj")
METHODS = ("tsv", "iso_c", "iso_cts", "wudi", "consensus", "model_stock", "della", "slerp",
           "regmean", "fisher")


def inputs(tasks: int, blocks: int, seed: int = 0):
    """(stacked, base) in Flax layout, the left-out leaves removed."""
    rng = np.random.default_rng(seed)
    shapes = {k: v for k, v in common.vit_b16_shapes(blocks).items() if k not in LEFT_OUT}
    stacked = {k: rng.standard_normal((tasks, *s), dtype=np.float32) * 1e-3 for k, s in shapes.items()}
    base = {k: rng.standard_normal(s, dtype=np.float32) * 0.02 for k, s in shapes.items()}
    return stacked, base


def to_torch(tree: dict) -> dict:
    """Flax kernels ``[in, out]`` become torch weights ``[out, in]`` (named ``…/weight``)."""
    out = {}
    for name, x in tree.items():
        if name.endswith("/kernel"):
            out[name[:-len("kernel")] + "weight"] = np.ascontiguousarray(np.swapaxes(x, -1, -2))
        else:
            out[name] = x
    return out


def from_torch(tree: dict) -> dict:
    return {(k[:-len("weight")] + "kernel" if k.endswith("/weight") else k):
            (np.swapaxes(v, -1, -2) if k.endswith("/weight") else v) for k, v in tree.items()}


def rel_error(ours: dict, peer: dict) -> float:
    num = sum(float(np.sum((np.asarray(ours[k], np.float64) - np.asarray(peer[k], np.float64)) ** 2))
              for k in peer)
    den = sum(float(np.sum(np.asarray(peer[k], np.float64) ** 2)) for k in peer)
    return float(np.sqrt(num / den))


def slerp64(stacked: dict, base: dict, t: float) -> dict:
    """SLERP in float64 from the formula (per tensor, lerp where |cos| > 0.9995)."""
    out = {}
    for k, x in stacked.items():
        b = base[k].astype(np.float64).ravel()
        v0, v1 = b + x[0].astype(np.float64).ravel(), b + x[1].astype(np.float64).ravel()
        cos = float(np.dot(v0, v1) / (np.linalg.norm(v0) * np.linalg.norm(v1)))
        if abs(cos) > 0.9995:
            w = (1 - t) * v0 + t * v1
        else:
            om = np.arccos(np.clip(cos, -1, 1))
            w = (np.sin((1 - t) * om) * v0 + np.sin(t * om) * v1) / np.sin(om)
        out[k] = (w - b).reshape(x.shape[1:])
    return out


def model_stock64(stacked: dict) -> dict:
    """Model Stock in float64 from the formula (mean pairwise cosine per leaf)."""
    out = {}
    for k, x in stacked.items():
        flat = x.reshape(x.shape[0], -1).astype(np.float64)
        n = np.linalg.norm(flat, axis=1)
        cos = [flat[i] @ flat[j] / (n[i] * n[j]) for i in range(len(flat)) for j in range(i + 1, len(flat))]
        c = float(np.mean(cos))
        t = len(flat) * c / (1 + (len(flat) - 1) * c)
        out[k] = (t * flat.mean(0)).reshape(x.shape[1:])
    return out


def time_ours(fn, repeats: int):
    """(result as NumPy, median seconds of the warm calls)."""
    import jax

    out = jax.block_until_ready(fn())  # warm-up: compilation
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return {k: np.asarray(v) for k, v in out.items()}, float(np.median(times))


def _della_uniforms(stacked: dict, key) -> dict:
    """The uniforms our della draws (its documented derivation), per leaf and task."""
    import jax

    out = {}
    for i, name in enumerate(sorted(stacked)):  # jax.tree.leaves order of a flat dict
        leaf = jax.random.fold_in(key, i)
        out[name] = np.stack([np.asarray(jax.random.uniform(jax.random.fold_in(leaf, t),
                                                            stacked[name].shape[1:]))
                              for t in range(stacked[name].shape[0])])
    return out


def _della_masks(torch_stacked: dict, uniforms: dict, density: float, epsilon: float) -> dict:
    """Our keep decisions, from the documented rule: per row of the torch layout (the last
    axis; a 1-D leaf is one row), stable ascending magnitude ranks, keep where
    u < density − ε + 2ε·rank/(n − 1). Injected as masks, so rank ties (frequent in long
    float32 rows) cannot make the two sides drop different entries."""
    out = {}
    for name, x in torch_stacked.items():
        mags = np.abs(x)
        ranks = np.argsort(np.argsort(mags, axis=-1, kind="stable"), axis=-1, kind="stable")
        n = x.shape[-1]
        keep_p = density - epsilon + 2 * epsilon * ranks / (n - 1)
        out[name] = (uniforms[name] < keep_p.astype(np.float32)).astype(np.uint8)
    return out


def compare(method: str, args, stacked: dict, base: dict) -> list[dict]:
    """Rows of the table for one method (several for variants)."""
    import jax

    from atm_jax import merge

    threads, repeats = args.threads, args.repeats
    rows = []

    def peer(name, st, hp, **kw):
        delta, seconds, peak = peers.run_peer(name, to_torch(st), hp, threads=threads,
                                              repeats=repeats, **kw)
        return from_torch(delta), float(np.median(seconds))

    if method in ("tsv", "iso_c", "iso_cts"):
        hp = {"common_space_fraction": 0.8} if method == "iso_cts" else {}
        theirs, t_peer = peer(method, stacked, hp)
        variants = ("auto", "svd") if method != "iso_c" else (None,)
        for variant in variants:
            kw = dict(hp, method=variant) if variant else hp
            ours, t_ours = time_ours(lambda: merge.get(method)(stacked, **kw), repeats)
            rows.append({"method": method + (f" ({variant})" if variant else ""),
                         "error": rel_error(ours, theirs), "ours": t_ours, "peer": t_peer})
    elif method == "consensus":
        theirs, t_peer = peer("consensus", stacked, {"tall_mask_lambda": 0.6, "k": 2})
        ours, t_ours = time_ours(lambda: merge.consensus(stacked, k=2, lam=0.6), repeats)
        rows.append({"method": "consensus", "error": rel_error(ours, theirs), "ours": t_ours,
                     "peer": t_peer})
    elif method == "model_stock":
        for label, st in (("T=2", {k: v[:2] for k, v in stacked.items()}), (f"T={args.tasks}", stacked)):
            b = to_torch(base)
            delta, seconds, _ = peers.run_peer("model_stock", to_torch(st), {}, base=b,
                                               threads=threads, repeats=repeats)
            theirs, t_peer = from_torch(delta), float(np.median(seconds))
            ours, t_ours = time_ours(lambda st=st: merge.model_stock(st), repeats)
            exact = model_stock64(st)
            note = (f"vs float64 formula: ours {rel_error(ours, exact):.1e}, peer "
                    f"{rel_error(theirs, exact):.1e}")
            if label != "T=2":
                note += "; the peer averages pairwise angles, we average cosines"
            rows.append({"method": f"model_stock {label}", "error": rel_error(ours, theirs),
                         "ours": t_ours, "peer": t_peer, "note": note})
    elif method == "della":
        key = jax.random.key(0)
        hp = {"density": 0.5, "epsilon": 0.15}
        masks = _della_masks(to_torch(stacked), to_torch(_della_uniforms(stacked, key)), **hp)
        delta, seconds, _ = peers.run_peer("della", to_torch(stacked), hp, threads=threads,
                                           repeats=repeats, inject={"mask": masks})
        theirs, t_peer = from_torch(delta), float(np.median(seconds))
        ours, t_ours = time_ours(lambda: merge.della(stacked, key=key, rescale="l1", **hp), repeats)
        rows.append({"method": "della (l1 rescale, our keep masks injected)",
                     "error": rel_error(ours, theirs),
                     "ours": t_ours, "peer": t_peer})
    elif method == "slerp":
        st = {k: v[:2] for k, v in stacked.items()}
        delta, seconds, _ = peers.run_peer("slerp", to_torch(st), {"t": 0.5}, base=to_torch(base),
                                           threads=threads, repeats=repeats)
        theirs, t_peer = from_torch(delta), float(np.median(seconds))
        ours, t_ours = time_ours(lambda: merge.slerp(st, t=0.5, base=base), repeats)
        exact = slerp64(st, base, 0.5)
        rows.append({"method": "slerp (T=2)", "error": rel_error(ours, theirs), "ours": t_ours,
                     "peer": t_peer, "note": f"vs float64 formula: ours {rel_error(ours, exact):.1e}, "
                     f"peer {rel_error(theirs, exact):.1e} (it interpolates float32 weights)"})
    elif method == "wudi":
        rows += compare_wudi(args, stacked)
    elif method in ("regmean", "fisher"):
        rows += compare_statistics(method, args, stacked, base)
    return rows


def statistics(method: str, stacked: dict, seed: int = 1) -> dict:
    """Per-task statistics in Flax naming: RegMean's per-row mean Grams ``XᵀX / n`` of
    random inputs (n = 512 rows, scaled features) for every 2-D kernel, or Fishers
    (squared normals, like squared gradients) for every leaf; float64."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, x in stacked.items():
        if method == "regmean" and name.endswith("/kernel") and x.ndim == 3:
            grams = []
            for _ in range(x.shape[0]):
                rows = rng.standard_normal((512, x.shape[1])) * rng.uniform(0.5, 2, x.shape[1])
                grams.append(rows.T @ rows / len(rows))
            out[name] = np.stack(grams)
        elif method == "fisher":
            out[name] = rng.standard_normal(x.shape) ** 2 * 1e-4
    return out


def compare_statistics(method: str, args, stacked: dict, base: dict) -> list[dict]:
    """RegMean / Fisher given the same statistics, float64 on both sides (the solve and
    FusionBench's inverse round differently): whole-model and worst-leaf relative error."""
    import jax

    from atm_jax import merge

    stats = statistics(method, stacked)
    rows = []
    variants = ([("regmean a=0.95", {"off_diagonal_scale": 0.95})] if method == "regmean" else
                [("fisher", {"floor": 1e-6, "normalize": False}),
                 ("fisher normalize", {"floor": 1e-6, "normalize": True})])
    torch_stats = {(k[:-len("kernel")] + "weight" if k.endswith("/kernel") else k): v
                   for k, v in stats.items()}
    if method == "fisher":  # Fishers follow their tensors into torch layout
        torch_stats = to_torch(stats)
    for label, hp in variants:
        r = peers.run_peer_full(method, to_torch(stacked), hp, base=to_torch(base),
                                threads=args.threads, repeats=args.repeats, stats=torch_stats,
                                dtype="float64")
        theirs, t_peer = from_torch(r["delta"]), float(np.median(r["seconds"]))
        with jax.enable_x64(True):
            st64 = {k: np.asarray(v, np.float64) for k, v in stacked.items()}
            if method == "regmean":
                def fn():
                    return merge.regmean(st64, grams=stats, **hp)
            else:
                f64 = [{k: v[t] for k, v in stats.items()} for t in range(args.tasks)]

                def fn():
                    return merge.fisher(st64, fishers=f64, **hp)
            ours, t_ours = time_ours(fn, args.repeats)
        worst = max((float(np.linalg.norm(ours[k] - theirs[k]) / np.linalg.norm(theirs[k])), k)
                    for k in theirs)
        rows.append({"method": f"{label} (float64, same statistics)",
                     "error": rel_error(ours, theirs), "ours": t_ours, "peer": t_peer,
                     "note": f"worst leaf {worst[1]}: {worst[0]:.1e}"})
    return rows


def compare_wudi(args, stacked: dict) -> list[dict]:
    """Agreement at 300 steps on ``--wudi-layers``; full-model time extrapolated."""
    from atm_jax import merge

    rows = []
    layers = {k: stacked[k] for k in args.wudi_layers.split(",")}
    theirs, t_peer = (lambda r: (from_torch(r[0]), float(np.median(r[1]))))(
        peers.run_peer("wudi", to_torch(layers), {"iter_num": 300}, threads=args.threads,
                       repeats=1))
    ours, t_ours = time_ours(lambda: merge.wudi(layers, steps=300), 1)
    rows.append({"method": f"wudi 300 steps on {', '.join(layers)}", "error": rel_error(ours, theirs),
                 "ours": t_ours, "peer": t_peer})
    # Full model: each distinct kernel shape probed for a few steps on both sides.
    steps = args.wudi_probe_steps
    shapes: dict[tuple, list[str]] = {}
    for name, x in stacked.items():
        if name.endswith("/kernel"):
            shapes.setdefault(x.shape[1:], []).append(name)
    full_ours = full_peer = 0.0
    for shape, names in shapes.items():
        probe = {names[0]: stacked[names[0]]}
        _, t_o = time_ours(lambda: merge.wudi(probe, steps=steps), 1)
        _, seconds, _ = peers.run_peer("wudi", to_torch(probe), {"iter_num": steps},
                                       threads=args.threads, repeats=1)
        full_ours += len(names) * t_o * 300 / steps
        full_peer += len(names) * float(np.median(seconds)) * 300 / steps
    rows.append({"method": f"wudi 300 steps, every layer (extrapolated from {steps} steps per shape)",
                 "error": float("nan"), "ours": full_ours, "peer": full_peer})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| method | rel. Frobenius error | ours (s) | peer (s) | peer ÷ ours | note |",
             "|---|---:|---:|---:|---:|---|"]
    for r in rows:
        err = "—" if not np.isfinite(r["error"]) else f"{r['error']:.2e}"
        lines.append(f"| {r['method']} | {err} | {r['ours']:.3f} | {r['peer']:.3f} | "
                     f"{r['peer'] / r['ours']:.1f}× | {r.get('note', '')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=7)
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--threads", type=int, default=_THREADS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", default=",".join(METHODS))
    parser.add_argument("--wudi-layers", default="blocks_0/attn/out_proj/kernel")
    parser.add_argument("--wudi-probe-steps", type=int, default=10)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    stacked, base = inputs(args.tasks, args.blocks)
    rows = []
    for method in args.only.split(","):
        start = time.perf_counter()
        rows += compare(method, args, stacked, base)
        print(f"{method}: {time.perf_counter() - start:.0f}s", file=sys.stderr, flush=True)
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    body = table(rows)
    print(body)
    if not args.no_write:
        n = sum(v[0].size for v in stacked.values())
        header = [f"T = {args.tasks} task vectors of {args.blocks} ViT-B/16 block(s) "
                  f"({n / 1e6:.1f}M entries each; {', '.join(LEFT_OUT)} left out), float32, "
                  f"{args.threads} thread(s) on both sides, median of {args.repeats} warm calls",
                  f"versions: {common.versions('jax', 'numpy')}"]
        common.write_results("peer_merges", header, body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
