"""Peer libraries side by side: run FusionBench's and mergekit's merges on our inputs.

The peers need torch, which atm_jax's own environment does not have, so each peer lives
in its own venv (``fusion-bench==0.2.33`` / ``mergekit==0.1.5``, both on the CPU build of
``torch==2.13.0``) and a merge runs there in a subprocess (`benchmarks/peer_worker.py`).
Inputs and outputs travel as ``.npz`` in the torch layout (``[out, in]`` weights)::

    import peers
    peers.ensure_venvs()                       # once; or: python benchmarks/peers.py --setup
    delta, seconds, peak = peers.run_peer("tsv", {"w": tv_w, "b": tv_b}, {})

Method names and what they call:

============  ==========================================================================
iso_c         fusion_bench ...isotropic_merging.iso_utils.iso_c (× scaling_factor, 1.0)
iso_cts       ...iso_utils.iso_cts (common_space_fraction 0.8; × scaling_factor, 1.0)
tsv           ...task_singular_vector.utils.TSVM_utils.compute_and_sum_svd_mem_reduction
              (× alpha, 1.0)
wudi          ...wudi.wudi.wudi_merging (iter_num 300)
consensus     ...tall_mask.utils.generate_task_masks + construct_consensus_mask, then
              alpha · (m_cons ⊙ Σ_t τ_t) (tall_mask_lambda 0.6, prun_thre_k 2, alpha 1.0)
model_stock   fusion_bench.method.model_stock.ModelStock.run on wrapper modules
della         mergekit merge_state_dicts(..., "della") (weight 1, density 0.5,
              epsilon 0.15, lambda 1, normalize, rescale); variant="della_linear" too
slerp         mergekit merge_state_dicts(..., "slerp"), t = 0.5; needs T = 2; model 0
              (base + τ_0) is mergekit's base, so t = 0 gives it
============  ==========================================================================

Every method returns a delta (merged − base). Those that work on weights (model_stock,
della, slerp, consensus's masks) get ``base + τ_t``; without ``base`` they get base = 0,
which leaves the delta exact for della and model_stock and makes slerp interpolate the
task vectors themselves. Defaults above are ours where the peer has none (della's
density defaults to 1.0 in mergekit, which prunes nothing).

The semantics of each peer, read from its source: /tmp/peer_notes.md at the time of
writing (see docs of the matching atm_jax operators).

Environment: ``ATM_JAX_PEERS_DIR`` (default ``~/.cache/atm_jax/peers``) holds the venvs
``fusionbench/`` and ``mergekit/``; ``ATM_JAX_TORCH_WHEEL`` names a local CPU torch wheel
to install instead of asking an index.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
WORKER = HERE / "peer_worker.py"

TORCH = "torch==2.13.0"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
VENVS = {"fusionbench": "fusion-bench==0.2.33", "mergekit": "mergekit==0.1.5"}
METHOD_VENV = {"iso_c": "fusionbench", "iso_cts": "fusionbench", "tsv": "fusionbench",
               "wudi": "fusionbench", "consensus": "fusionbench", "model_stock": "fusionbench",
               "regmean": "fusionbench", "fisher": "fusionbench",
               "della": "mergekit", "slerp": "mergekit"}
METHODS = tuple(METHOD_VENV)


def peers_dir(path: str | os.PathLike | None = None) -> pathlib.Path:
    """Where the venvs live: ``path``, else $ATM_JAX_PEERS_DIR, else ~/.cache/atm_jax/peers."""
    if path is None:
        path = os.environ.get("ATM_JAX_PEERS_DIR") or "~/.cache/atm_jax/peers"
    return pathlib.Path(path).expanduser()


def venv_python(venv: str, path: str | os.PathLike | None = None) -> pathlib.Path:
    return peers_dir(path) / venv / "bin" / "python"


def _local_torch_wheel() -> str | None:
    """A CPU torch 2.13.0 wheel on disk for this Python, if there is one."""
    if os.environ.get("ATM_JAX_TORCH_WHEEL"):
        return os.environ["ATM_JAX_TORCH_WHEEL"]
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    dirs = os.environ.get("PIP_FIND_LINKS", "").split() + ["/opt/wheels"]
    for d in dirs:
        hits = sorted(glob.glob(os.path.join(d, f"torch-2.13.0+cpu-{tag}-{tag}-*linux*.whl")))
        if hits:
            return hits[0]
    return None


def _run(cmd, log):
    print("+", " ".join(map(str, cmd)), file=log, flush=True)
    subprocess.run([str(c) for c in cmd], check=True, stdout=log, stderr=subprocess.STDOUT)


def ensure_venvs(path: str | os.PathLike | None = None, *, force: bool = False,
                 log=sys.stderr) -> dict[str, pathlib.Path]:
    """Creates the peer venvs where missing and returns {venv name: its python}.

    torch goes in first (a local CPU wheel when one is found, else the PyTorch CPU
    index), then the peer package under the constraint ``torch==2.13.0`` so pip keeps
    that torch; a venv whose torch turns out to be a CUDA build is an error.
    """
    root = peers_dir(path)
    root.mkdir(parents=True, exist_ok=True)
    constraint = root / "torch-constraint.txt"
    constraint.write_text(TORCH + "\n")
    out = {}
    for venv, package in VENVS.items():
        py = root / venv / "bin" / "python"
        if py.exists() and not force and _venv_ok(py, package):
            out[venv] = py
            continue
        _run([sys.executable, "-m", "venv", "--clear", root / venv], log)
        _run([py, "-m", "pip", "install", "-q", "--upgrade", "pip"], log)
        wheel = _local_torch_wheel()
        if wheel:
            _run([py, "-m", "pip", "install", "-q", wheel], log)
        else:
            _run([py, "-m", "pip", "install", "-q", TORCH, "--index-url", TORCH_CPU_INDEX], log)
        _run([py, "-m", "pip", "install", "-q", package, "-c", constraint], log)
        if not _venv_ok(py, package):
            raise RuntimeError(f"{root / venv}: {package} with a CPU {TORCH} did not install")
        out[venv] = py
    return out


def _venv_ok(py: pathlib.Path, package: str) -> bool:
    name, version = package.split("==")
    code = ("import importlib.metadata as m, torch, sys; "
            f"ok = m.version({name!r}) == {version!r} and torch.__version__.startswith('2.13.0') "
            "and torch.version.cuda is None; sys.exit(0 if ok else 1)")
    return subprocess.run([str(py), "-c", code], capture_output=True).returncode == 0


def run_peer_full(method: str, stacked: dict[str, np.ndarray], hparams: dict | None = None, *,
                  base: dict[str, np.ndarray] | None = None, threads: int | None = None,
                  repeats: int = 3, inject: dict | None = None, warmup: bool = True,
                  path: str | os.PathLike | None = None, timeout: float | None = None,
                  stats: dict | None = None, dtype: str = "float32") -> dict:
    """`run_peer`, returning everything the worker reported: ``delta``, ``seconds``,
    ``peak_rss_bytes`` (VmHWM over the timed calls, inputs included), ``rss_before_bytes``
    (resident before them), ``extra`` (e.g. consensus's ``tall_mask/<name>`` [T, ...] and
    ``consensus_mask/<name>``), ``wall_s`` (the whole subprocess).

    ``stats``: regmean / fisher: ``{name: [T, ...]}`` per-task statistics (the Gram
    ``[T, in, in]`` of a ``…weight`` tensor's inputs; the Fisher of every tensor).
    ``dtype``: "float32" or "float64": what the worker loads, computes in and returns."""
    if method not in METHOD_VENV:
        raise ValueError(f"unknown peer method {method!r}; one of {METHODS}")
    py = venv_python(METHOD_VENV[method], path)
    if not py.exists():
        raise FileNotFoundError(f"{py} missing: run ensure_venvs() or "
                                "`python benchmarks/peers.py --setup` first")
    names = list(stacked)
    inject_kind = None
    arrays = {f"tv/{n}": np.asarray(stacked[n], dtype) for n in names}
    if base is not None:
        arrays.update({f"base/{n}": np.asarray(base[n], dtype) for n in names})
    arrays.update({f"stat/{n}": np.asarray(v, dtype) for n, v in (stats or {}).items()})
    if inject is not None:
        if method != "della":
            raise ValueError("inject is for della only")
        (inject_kind, draws), = inject.items()
        if inject_kind not in ("uniform", "mask"):
            raise ValueError('inject = {"uniform": {name: [T, ...] in [0, 1)}} '
                             'or {"mask": {name: [T, ...] keep mask}}')
        for n in names:
            arr = np.asarray(draws[n])
            if arr.shape != arrays[f"tv/{n}"].shape:
                raise ValueError(f"inject[{n!r}] has shape {arr.shape}, "
                                 f"wanted {arrays[f'tv/{n}'].shape}")
            arrays[f"inject/{n}"] = arr.astype(np.float32 if inject_kind == "uniform" else np.uint8)
    cfg = {"method": method, "hparams": hparams or {}, "names": names,
           "threads": threads or os.cpu_count(), "repeats": repeats, "warmup": warmup,
           "inject_kind": inject_kind, "dtype": dtype}
    with tempfile.TemporaryDirectory(prefix="atm_jax_peer_") as tmp:
        tmp = pathlib.Path(tmp)
        np.savez(tmp / "in.npz", **arrays)
        (tmp / "cfg.json").write_text(json.dumps(cfg))
        env = {**os.environ, "TQDM_DISABLE": "1",
               **{v: str(cfg["threads"]) for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                                   "OPENBLAS_NUM_THREADS")}}
        env.pop("PYTHONPATH", None)
        start = time.perf_counter()
        proc = subprocess.run([str(py), str(WORKER), "--input", str(tmp / "in.npz"),
                               "--config", str(tmp / "cfg.json"), "--output", str(tmp / "out.npz")],
                              capture_output=True, text=True, env=env, timeout=timeout)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise RuntimeError(f"peer {method} failed (exit {proc.returncode}):\n"
                               f"{proc.stderr[-4000:]}")
        meta = json.loads((tmp / "out.npz.json").read_text())
        with np.load(tmp / "out.npz") as z:
            delta = {n: z[f"delta/{n}"] for n in names}
            extra = {k[len("extra/"):]: z[k] for k in z.files if k.startswith("extra/")}
    return {**meta, "delta": delta, "extra": extra, "wall_s": wall}


def run_peer(method: str, stacked: dict[str, np.ndarray], hparams: dict | None = None, *,
             base: dict[str, np.ndarray] | None = None, threads: int | None = None,
             repeats: int = 3, inject: dict | None = None, **kwargs
             ) -> tuple[dict[str, np.ndarray], list[float], int]:
    """Runs one peer merge in its venv and returns (delta, seconds per call, peak RSS).

    Args:
      method: one of `METHODS` (see the module docstring for what each calls).
      stacked: {name: float32 [T, *torch_shape]} task vectors, torch layout ([out, in]).
      hparams: method hyperparameters (JSON-able); missing ones take the defaults above.
      base: {name: torch_shape} base weights (della/slerp/model_stock/consensus use them).
      threads: torch.set_num_threads in the worker (default os.cpu_count()).
      repeats: timed calls after one untimed warm-up call; ``seconds`` has one per call.
      inject: della only: ``{"uniform": {name: [T, ...] floats in [0, 1)}}`` keeps entry
        ``i`` of task ``t`` iff ``u < p_i`` (mergekit's keep probability), or
        ``{"mask": {name: [T, ...] 0/1}}`` keeps exactly the given entries.

    Returns:
      The merged delta {name: float32 torch_shape}, the seconds of each timed call (the
      peer call only), and the worker's peak resident bytes over the timed calls.
    """
    r = run_peer_full(method, stacked, hparams, base=base, threads=threads, repeats=repeats,
                      inject=inject, **kwargs)
    return r["delta"], r["seconds"], r["peak_rss_bytes"]


# ---------------------------------------------------------------------------------------
# Self-tests (CLI): small random inputs, and the ViT-B-block timing check.
# ---------------------------------------------------------------------------------------

def _small_inputs(num_tasks=3, seed=0):
    rng = np.random.default_rng(seed)
    shapes = {"a.weight": (64, 48), "a.bias": (64,), "b.weight": (48, 64), "b.bias": (48,),
              "ln.weight": (64,)}
    stacked = {n: rng.standard_normal((num_tasks, *s)).astype(np.float32) * 0.01
               for n, s in shapes.items()}
    base = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    return stacked, base


def vit_blocks(num_tasks=7, blocks=2, seed=0):
    """Two ViT-B-shaped transformer blocks in torch layout ([out, in])."""
    w, mlp = 768, 3072
    shapes = {}
    for i in range(blocks):
        p = f"blocks.{i}."
        shapes.update({p + "ln_1.weight": (w,), p + "ln_1.bias": (w,),
                       p + "attn.in_proj_weight": (3 * w, w), p + "attn.in_proj_bias": (3 * w,),
                       p + "attn.out_proj.weight": (w, w), p + "attn.out_proj.bias": (w,),
                       p + "ln_2.weight": (w,), p + "ln_2.bias": (w,),
                       p + "mlp.c_fc.weight": (mlp, w), p + "mlp.c_fc.bias": (mlp,),
                       p + "mlp.c_proj.weight": (w, mlp), p + "mlp.c_proj.bias": (w,)})
    rng = np.random.default_rng(seed)
    stacked = {n: rng.standard_normal((num_tasks, *s), dtype=np.float32) * 1e-3
               for n, s in shapes.items()}
    base = {n: rng.standard_normal(s, dtype=np.float32) * 0.02 for n, s in shapes.items()}
    return stacked, base


def _selftest(threads, repeats):
    stacked, base = _small_inputs()
    rows = []
    for method in METHODS:
        data = {n: v[:2] for n, v in stacked.items()} if method == "slerp" else stacked
        hp = {"iter_num": 50} if method == "wudi" else {}
        r = run_peer_full(method, data, hp, base=base, threads=threads, repeats=repeats)
        d = r["delta"]
        assert all(d[n].shape == data[n].shape[1:] and np.isfinite(d[n]).all() for n in d), method
        rows.append((method, r))
    # DELLA with an injected uniform sample equals DELLA with the mask it implies.
    rng = np.random.default_rng(1)
    u = {n: rng.random(v.shape, dtype=np.float32) for n, v in stacked.items()}
    a = run_peer_full("della", stacked, {"density": 0.4}, base=base, inject={"uniform": u},
                      repeats=1, threads=threads)["delta"]
    b = run_peer_full("della", stacked, {"density": 0.4}, base=base, inject={"uniform": u},
                      repeats=1, threads=threads)["delta"]
    assert all(np.array_equal(a[n], b[n]) for n in a), "injected della is not deterministic"
    keep_all = {n: np.ones(v.shape, np.uint8) for n, v in stacked.items()}
    c = run_peer_full("della", stacked, {"density": 0.4, "rescale": False}, base=base,
                      inject={"mask": keep_all}, repeats=1, threads=threads)["delta"]
    # keep everything, no rescale: della = TIES-style sign-consensus mean of the τ_t
    for n, x in stacked.items():
        sign = np.where(x.sum(0) >= 0, 1.0, -1.0)
        agree = np.sign(x) == sign
        want = (x * agree).sum(0) / np.maximum(agree.sum(0), 1)
        assert np.allclose(c[n], want, atol=1e-6), n
    return rows


def _table(rows):
    lines = ["| method | median s | min s | peak RSS MiB | subprocess s |", "|---|---|---|---|---|"]
    for method, r in rows:
        s = r["seconds"]
        lines.append(f"| {method} | {np.median(s):.4f} | {min(s):.4f} | "
                     f"{r['peak_rss_bytes'] / 2**20:.0f} | {r['wall_s']:.1f} |")
    return "\n".join(lines)


def _vit_check(threads, repeats, wudi_steps=300, wudi_probe=(3, 8), wudi_full=(768, 768),
               warmup=True):
    """Every method at T=7 on two ViT-B blocks; WUDI on single layers only (it is slow):
    ``wudi_steps`` steps on the layer of shape ``wudi_full``, and on each layer the
    per-step time from two short runs (``wudi_probe`` steps), extrapolated to
    ``wudi_steps``."""
    stacked, base = vit_blocks()
    rows = []
    for method in METHODS:
        if method == "wudi":
            continue
        data = {n: v[:2] for n, v in stacked.items()} if method == "slerp" else stacked
        hp = {"density": 0.5} if method == "della" else {}
        rows.append((method, run_peer_full(method, data, hp, base=base, threads=threads,
                                           repeats=repeats, warmup=warmup)))
        print(_table(rows[-1:]).splitlines()[-1], flush=True)
    for name in ("blocks.0.attn.out_proj.weight", "blocks.0.mlp.c_fc.weight"):
        layer = {name: stacked[name]}
        shape = tuple(stacked[name].shape[1:])
        probe = [run_peer_full("wudi", layer, {"iter_num": n}, threads=threads, repeats=1,
                               warmup=False)["seconds"][0] for n in wudi_probe]
        per_step = (probe[1] - probe[0]) / (wudi_probe[1] - wudi_probe[0])
        fixed = probe[0] - per_step * wudi_probe[0]
        print(f"wudi {shape}: {wudi_probe[0]} steps {probe[0]:.2f} s, {wudi_probe[1]} steps "
              f"{probe[1]:.2f} s -> {per_step:.3f} s/step; {wudi_steps} steps ≈ "
              f"{fixed + per_step * wudi_steps:.1f} s (extrapolated)", flush=True)
        if shape == tuple(wudi_full):
            r = run_peer_full("wudi", layer, {"iter_num": wudi_steps}, threads=threads,
                              repeats=1, warmup=False)
            rows.append((f"wudi {wudi_steps} steps {shape}", r))
            print(_table(rows[-1:]).splitlines()[-1], flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="FusionBench / mergekit peer merges")
    parser.add_argument("--setup", action="store_true", help="create the peer venvs")
    parser.add_argument("--selftest", action="store_true", help="every method on small inputs")
    parser.add_argument("--vit", action="store_true",
                        help="time every method at T=7 on two ViT-B blocks")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--wudi-steps", type=int, default=300)
    parser.add_argument("--no-warmup", action="store_true",
                        help="--vit: skip the untimed warm-up call (for the seconds-long merges)")
    args = parser.parse_args(argv)
    if args.setup:
        for venv, py in ensure_venvs().items():
            print(f"{venv}: {py}")
    if args.selftest:
        print(_table(_selftest(args.threads, args.repeats)))
    if args.vit:
        print(_table(_vit_check(args.threads, args.repeats, args.wudi_steps,
                                      warmup=not args.no_warmup)))
    if not (args.setup or args.selftest or args.vit):
        parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
