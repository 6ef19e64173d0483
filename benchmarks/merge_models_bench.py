"""atm-jax-merge vs mergekit on the same checkpoints and the same YAML.

    python benchmarks/merge_pools.py --pools a b c      # once: the checkpoint pools
    python benchmarks/peers.py --setup                   # once: mergekit's venv
    python benchmarks/merge_models_bench.py --pools a b c

Per pool (benchmarks/merge_pools.py) and method, each tool runs in its own process
(mergekit: ``mergekit-yaml CONFIG OUT`` with its default flags; ours: ``python -m
atm_jax.merge_models CONFIG OUT --no-progress``), both with this machine's default
thread count (every core: torch's intra-op pool, XLA:CPU and NumPy), after one untimed
read of every input file; the median of ``--repeats`` runs is reported with the peak
RSS (``/usr/bin/time``). Outputs are compared tensor by tensor: the max over tensors of
``max|ours − theirs| / max|theirs|``. DARE-TIES draws different masks in each tool, so
it is compared statistically: the fraction of entries that differ from the base and the
ratio of the two merged deltas' norms.

Also, for ours on the float32 pools: whole-model TIES (``scope: model``) against the
in-memory ``atm_jax.merge.ties(..., scope="model")`` of all tensors (bit for bit), and
the forward pass of the merged folder in transformers against the in-memory merge's.

mergekit 0.1.5 fails on BERT configs in ``plan_tensor`` (a tuple added to a list);
The script rewrites that one line in the peer venv (``--no-patch-mergekit`` skips it).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402
import peers  # noqa: E402

METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "slerp")
POOLS = pathlib.Path("~/.cache/atm_jax/merge_pools").expanduser()
BERT_LINE = "for name in [w_in.name] + (w_in.aliases or [])"
BERT_FIX = "for name in [w_in.name] + list(w_in.aliases or [])"


def patch_mergekit() -> str:
    """The one-line BERT fix in the peer venv's mergekit/plan.py (idempotent)."""
    python = peers.venv_python("mergekit")
    found = subprocess.run([str(python), "-c", "import mergekit.plan as p; print(p.__file__)"],
                           capture_output=True, text=True, check=True).stdout.strip()
    path = pathlib.Path(found)
    text = path.read_text()
    if BERT_LINE in text:
        path.write_text(text.replace(BERT_LINE, BERT_FIX))
        return f"patched {path}"
    return "already patched" if BERT_FIX in text else "line not found (mergekit changed?)"


def yaml_for(method: str, pool: pathlib.Path, models: int, dtype: str | None) -> dict:
    names = [str(pool / f"ft{i}") for i in range(models)]
    config: dict = {"merge_method": method}
    if method == "slerp":
        config.update(base_model=names[0], models=[{"model": n} for n in names[:2]],
                      parameters={"t": 0.5})
    elif method == "linear":
        config.update(models=[{"model": n, "parameters": {"weight": 1.0}} for n in names])
    else:
        config.update(base_model=str(pool / "base"),
                      models=[{"model": n, "parameters": {"weight": 1.0}} for n in names])
        if method == "task_arithmetic":
            config["parameters"] = {"lambda": 1.0}
        elif method == "ties":  # density 0.5: k = int(d·n) (mergekit) = ceil(d·n) (ours), n even
            config["parameters"] = {"density": 0.5, "normalize": True}
        elif method == "dare_ties":
            config["parameters"] = {"density": 0.5, "normalize": True}
    if dtype:
        config["dtype"] = dtype
    return config


def timed(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS GiB) of one command, from /usr/bin/time."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as report:
        start = time.perf_counter()
        proc = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", report.name, *cmd],
                              capture_output=True, text=True)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
        peak_kib = int(report.read().strip().splitlines()[-1])
    return wall, peak_kib / 2**20


def read_inputs(paths: list[pathlib.Path]) -> tuple[float, int]:
    """Reads every safetensors file once (the untimed warm-up); returns seconds and bytes."""
    start, total = time.perf_counter(), 0
    for folder in paths:
        for f in sorted(folder.glob("*.safetensors")):
            with open(f, "rb") as handle:
                while chunk := handle.read(64 << 20):
                    total += len(chunk)
    return time.perf_counter() - start, total


def load_folder(folder: pathlib.Path) -> dict[str, np.ndarray]:
    from atm_jax import merge_models

    ckpt = merge_models.Checkpoint(str(folder))
    return {n: np.asarray(ckpt.get(n)) for n in ckpt.names()}


def compare(ours: pathlib.Path, theirs: pathlib.Path, base: pathlib.Path | None,
            stochastic: bool) -> dict:
    a, b = load_folder(ours), load_folder(theirs)
    if set(a) != set(b):
        return {"note": f"tensor sets differ: {sorted(set(a) ^ set(b))[:3]}"}
    floating = [n for n in a if a[n].dtype.kind in "fV" or str(a[n].dtype) == "bfloat16"]
    if not stochastic:
        worst, where, differ, size = 0.0, "", 0, 0
        for n in floating:
            x, y = a[n].astype(np.float64), b[n].astype(np.float64)
            scale = max(np.abs(y).max(), 1e-30)
            rel = float(np.abs(x - y).max() / scale)
            differ += int(np.count_nonzero(np.abs(x - y) > 1e-6 * scale))
            size += x.size
            if rel > worst:
                worst, where = rel, n
        return {"max_rel": worst, "worst_tensor": where, "differ": differ, "size": size}
    ref = load_folder(base)
    changed = {k: [] for k in ("ours", "theirs")}
    norms = {k: 0.0 for k in ("ours", "theirs")}
    for n in floating:
        r = ref[n].astype(np.float64)
        for key, out in (("ours", a), ("theirs", b)):
            d = out[n].astype(np.float64) - r
            changed[key].append(np.count_nonzero(d))
            norms[key] += float((d * d).sum())
    size = sum(a[n].size for n in floating)
    return {"changed_ours": sum(changed["ours"]) / size, "changed_theirs": sum(changed["theirs"]) / size,
            "norm_ratio": float(np.sqrt(norms["ours"] / norms["theirs"]))}


def breakdown(config: dict, out: pathlib.Path) -> dict:
    """Where our time goes, in this process: reading (Checkpoint.get), writing the shards
    (ShardWriter's flush) and the rest (conversion, merge, bookkeeping)."""
    from atm_jax import hf_folders, merge_models

    spent = {"read": 0.0, "write": 0.0}
    get, flush = hf_folders.Checkpoint.get, hf_folders.ShardWriter._flush

    def timed_get(self, name):
        start = time.perf_counter()
        value = np.array(get(self, name))  # materialize: mmap page faults count as reading
        spent["read"] += time.perf_counter() - start
        return value

    def timed_flush(self):
        start = time.perf_counter()
        flush(self)
        spent["write"] += time.perf_counter() - start

    hf_folders.Checkpoint.get, hf_folders.ShardWriter._flush = timed_get, timed_flush
    try:
        start = time.perf_counter()
        merge_models.merge_checkpoints(config, out, overwrite=True, progress=False)
        total = time.perf_counter() - start
    finally:
        hf_folders.Checkpoint.get, hf_folders.ShardWriter._flush = get, flush
    return {"total": total, "read": spent["read"], "write": spent["write"],
            "compute": total - spent["read"] - spent["write"]}


def exact_checks(pool: pathlib.Path, models: int, work: pathlib.Path) -> dict:
    """Whole-model TIES out of core vs in memory (bitwise), and the forward pass."""
    import jax
    import torch
    import transformers

    from atm_jax import merge, merge_models

    config = yaml_for("ties", pool, models, None)
    config["parameters"] = {"density": 0.2, "scope": "model"}
    out = merge_models.merge_checkpoints(config, work / "ties_model", overwrite=True, progress=False)
    got = load_folder(out)
    base = load_folder(pool / "base")
    tuned = [load_folder(pool / f"ft{i}") for i in range(models)]
    names = [n for n, b in base.items() if b.dtype.kind == "f"]
    tree = {n: np.stack([t[n].astype(np.float32) - base[n].astype(np.float32) for t in tuned])
            for n in names}
    start = time.perf_counter()
    delta = jax.device_get(merge.ties(tree, density=0.2, scope="model"))
    in_memory_s = time.perf_counter() - start
    del tree
    want = {n: base[n].astype(np.float32) + np.asarray(delta[n]) for n in names}
    equal = all(np.array_equal(got[n].view(np.uint32), want[n].view(np.uint32)) for n in names)
    hf_config = transformers.AutoConfig.from_pretrained(out)
    causal = any("CausalLM" in a for a in (hf_config.architectures or []))
    auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    model = auto.from_pretrained(out).eval()
    reference = auto.from_config(hf_config).eval()
    state = {n: torch.from_numpy(w) for n, w in want.items()}
    state.update({n: torch.from_numpy(base[n]) for n in base if n not in state})
    missing, unexpected = reference.load_state_dict(state, strict=False)
    if any("position_ids" not in n for n in [*missing, *unexpected]):
        raise RuntimeError(f"in-memory reference: missing {missing[:3]}, unexpected {unexpected[:3]}")
    ids = torch.arange(1, 33).reshape(2, 16) % 500
    with torch.no_grad():
        a = model(input_ids=ids)[0].float().numpy()
        b = reference(input_ids=ids)[0].float().numpy()
    return {"ties_model_bitwise": equal, "forward_max_abs": float(np.abs(a - b).max()),
            "in_memory_ties_s": in_memory_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pools", nargs="+", default=["a", "b"], choices=["a", "b", "c"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--root", type=pathlib.Path, default=POOLS)
    parser.add_argument("--no-patch-mergekit", action="store_true")
    parser.add_argument("--no-exact", action="store_true", help="skip the bitwise / forward checks")
    parser.add_argument("--no-breakdown", action="store_true")
    args = parser.parse_args()

    load_before = os.getloadavg()
    patched = "not patched" if args.no_patch_mergekit else patch_mergekit()
    mergekit = peers.venv_python("mergekit").parent / "mergekit-yaml"
    work = pathlib.Path(tempfile.mkdtemp(prefix="merge_models_bench_"))
    rows, notes = [], []
    try:
        for pool_name in args.pools:
            pool = args.root / pool_name
            if not (pool / "base" / "config.json").is_file():
                sys.exit(f"pool {pool_name} missing at {pool}: run benchmarks/merge_pools.py "
                         f"--pools {pool_name}")
            models = len(list(pool.glob("ft*")))
            dtype = "bfloat16" if pool_name == "c" else None
            folders = [pool / "base"] + [pool / f"ft{i}" for i in range(models)]
            seconds, size = read_inputs(folders)
            notes.append(f"pool {pool_name}: {models} models + base, {size / 2**30:.2f} GiB of "
                         f"safetensors; one warm read of all of them: {seconds:.1f} s")
            for method in args.methods:
                config = yaml_for(method, pool, models, dtype)
                path = work / f"{pool_name}_{method}.yaml"
                path.write_text(json.dumps(config))  # JSON is YAML
                row = {"pool": pool_name, "method": method}
                for tool in ("mergekit", "atm_jax"):
                    out = work / f"{pool_name}_{method}_{tool}"
                    cmd = ([str(mergekit), str(path), str(out)] if tool == "mergekit" else
                           [sys.executable, "-m", "atm_jax.merge_models", str(path), str(out),
                            "--no-progress", "--overwrite"])
                    runs = []
                    for _ in range(args.repeats):
                        shutil.rmtree(out, ignore_errors=True)
                        runs.append(timed(cmd))
                        print(f"  {pool_name} {method} {tool}: {runs[-1][0]:.1f} s, "
                              f"{runs[-1][1]:.2f} GiB", file=sys.stderr)
                    row[tool] = (common.median([r[0] for r in runs]), max(r[1] for r in runs))
                used = [pool / "base"] if method not in ("linear", "slerp") else []
                row["diff"] = compare(work / f"{pool_name}_{method}_atm_jax",
                                      work / f"{pool_name}_{method}_mergekit",
                                      used[0] if used else None, method == "dare_ties")
                if not args.no_breakdown:
                    row["parts"] = breakdown(config, work / f"{pool_name}_{method}_parts")
                rows.append(row)
                shutil.rmtree(work / f"{pool_name}_{method}_mergekit", ignore_errors=True)
                shutil.rmtree(work / f"{pool_name}_{method}_parts", ignore_errors=True)
            if pool_name != "c" and not args.no_exact:
                checks = exact_checks(pool, models, work)
                notes.append(f"pool {pool_name}: whole-model TIES (density 0.2) out of core equals "
                             f"the in-memory merge bit for bit: {checks['ties_model_bitwise']}; "
                             f"forward pass of the merged folder vs the in-memory merge's: max "
                             f"|Δ| {checks['forward_max_abs']:.1e} (in-memory merge "
                             f"{checks['in_memory_ties_s']:.1f} s)")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    table = ["| pool | method | mergekit s | ours s | speed-up | mergekit peak GiB | ours peak GiB | "
             "outputs | ours: read / compute / write s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        d = r["diff"]
        if "max_rel" in d:
            agree = f"max rel \\|Δ\\| {d['max_rel']:.1e}"
            if d["differ"]:
                agree += f"; {d['differ']} of {d['size']} entries > 1e-6"
        elif "norm_ratio" in d:
            agree = (f"changed {d['changed_ours']:.3f} vs {d['changed_theirs']:.3f}, "
                     f"‖δ‖ ratio {d['norm_ratio']:.3f}")
        else:
            agree = d["note"]
        parts = r.get("parts")
        split = f"{parts['read']:.1f} / {parts['compute']:.1f} / {parts['write']:.1f}" if parts else ""
        table.append(f"| {r['pool']} | {r['method']} | {r['mergekit'][0]:.1f} | {r['atm_jax'][0]:.1f} | "
                     f"{r['mergekit'][0] / r['atm_jax'][0]:.1f}× | {r['mergekit'][1]:.2f} | "
                     f"{r['atm_jax'][1]:.2f} | {agree} | {split} |")
    body = "\n".join(table) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    print(body)
    path = common.write_results("merge_models_bench", [
        f"median of {args.repeats} runs per tool, one process each, default thread count "
        f"({common.cpu_count()} cores), after one untimed read of the inputs",
        f"mergekit 0.1.5 ({patched}); {common.versions('jax', 'numpy', 'safetensors')}",
        "load average (1, 5, 15 min) before: {:.2f} {:.2f} {:.2f}, after: {:.2f} {:.2f} {:.2f}".format(
            *load_before, *os.getloadavg()),
    ], body)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
