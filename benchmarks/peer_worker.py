"""Runs one peer-library merge (FusionBench or mergekit) inside that peer's own venv.

Started by `benchmarks/peers.py` with the peer venv's Python; not imported by atm_jax.
Usage::

    python peer_worker.py --input IN.npz --config CFG.json --output OUT.npz

``IN.npz`` holds ``tv/<name>``: ``[T, *torch_shape]`` task vectors, optionally
``base/<name>`` (the base weights), ``inject/<name>``: ``[T, *torch_shape]`` (DELLA only)
and ``stat/<name>`` (RegMean's Grams / the Fishers, ``[T, ...]``).
``CFG.json``: ``{"method", "hparams", "names", "threads", "repeats", "inject_kind", "dtype"}``
(``dtype``: float32 by default; float64 loads, computes and returns float64).
``OUT.npz`` gets ``delta/<name>`` (float32, torch layout) and maybe ``extra/...`` arrays;
``OUT.npz.json`` gets the times (seconds, merge call only), peak RSS and notes.

Only the peer's merge call sits inside the ``perf_counter`` pair; building its inputs
(lists of state dicts, weights ``base + τ``, wrapper modules) and turning its output back
into a delta happen outside.

DELLA randomness: mergekit draws its keep-mask with ``torch.bernoulli(probs)`` in
``mergekit.sparsify.della_magprune``, once per (tensor, task), tensors in input order and
tasks in order inside each tensor. The worker swaps the name ``torch`` inside
``mergekit.sparsify`` for a proxy whose ``bernoulli(p)`` returns ``(u < p)`` for the given
uniform sample ``u`` (``inject_kind="uniform"``) or the given mask (``"mask"``) of that
(tensor, task); every other attribute is the real ``torch``. 1-D tensors reach
``bernoulli`` as ``[1, n]``; the injected array is reshaped to ``probs.shape``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import types

import numpy as np


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


class _Quiet(contextlib.ExitStack):
    """Sends the peers' per-key prints to /dev/null (they would otherwise flood stdout)."""

    def __enter__(self):
        super().__enter__()
        self.enter_context(contextlib.redirect_stdout(open(os.devnull, "w")))
        return self


# ---------------------------------------------------------------------------------------
# Method adapters. Each `prepare_*` returns (call, finish): `call()` is the timed peer call,
# `finish(result)` turns its output into ({name: delta ndarray}, {extra name: ndarray}).
# ---------------------------------------------------------------------------------------

def _task_dicts(torch, tv, names):
    num_tasks = next(iter(tv.values())).shape[0]
    return [{n: tv[n][t] for n in names} for t in range(num_tasks)]


def _weights(torch, tv, base, names):
    """The finetuned weights base + τ_t (base = zeros when not given)."""
    return [{n: base[n] + tv[n][t] for n in names} for t in range(tv[names[0]].shape[0])]


def _np(x):
    return x.detach().to("cpu").float().numpy().copy()


def prepare_fusionbench_matrix(method, torch, tv, base, names, hp):
    if method == "iso_c":
        from fusion_bench.method.isotropic_merging.iso_utils import iso_c as fn
        kwargs = {}
        scale = float(hp.get("scaling_factor", 1.0))
    elif method == "iso_cts":
        from fusion_bench.method.isotropic_merging.iso_utils import iso_cts as fn
        kwargs = {"common_space_fraction": float(hp.get("common_space_fraction", 0.8))}
        scale = float(hp.get("scaling_factor", 1.0))
    elif method == "tsv":
        from fusion_bench.method.task_singular_vector.utils.TSVM_utils import (
            compute_and_sum_svd_mem_reduction as fn)
        kwargs = {}
        scale = float(hp.get("alpha", 1.0))
    elif method == "wudi":
        from fusion_bench.method.wudi.wudi import wudi_merging as fn
        kwargs = {"iter_num": int(hp.get("iter_num", 300))}
        scale = 1.0
    else:
        raise ValueError(method)
    tvs = _task_dicts(torch, tv, names)
    exclude = list(hp.get("exclude_keys") or [])

    def call():
        if method == "wudi":  # it backpropagates: no torch.no_grad() here
            return fn(tvs, accelerator="cpu", exclude_keys=exclude, **kwargs)
        with torch.no_grad():
            return fn(tvs, accelerator="cpu", exclude_keys=exclude, **kwargs)

    def finish(out):
        return {n: _np(out[n]) * np.float32(scale) for n in names}, {}

    return call, finish


def prepare_fusionbench_data(method, torch, tv, base, names, hp, stats):
    """RegMean's and Fisher's merge step given the statistics (FusionBench's functions
    take weights and dotted module names: ``a/b/weight`` → ``a.b.weight``)."""
    dotted = {n: n.replace("/", ".") for n in names}
    weights = _weights(torch, tv, base, names)
    params = {dotted[n]: [w[n] for w in weights] for n in names}
    tasks = len(weights)
    if method == "regmean":
        from fusion_bench.method.regmean.regmean import merging_with_regmean_weights as fn
        grams = [{dotted[n][:-len(".weight")]: stats[n][t] for n in stats} for t in range(tasks)]

        def call():
            with torch.no_grad():
                return fn(params, grams, reduce_non_diagonal_ratio=float(hp["off_diagonal_scale"]))
    else:
        from fusion_bench.method.fisher_merging.fisher_merging import (
            merging_with_fisher_weights as fn)
        fishers = [{dotted[n]: stats[n][t] for n in names} for t in range(tasks)]
        ones = torch.ones(tasks, dtype=tv[names[0]].dtype)

        def call():
            with torch.no_grad():
                return fn(params, fishers, ones, normalize_fisher_weight=bool(hp["normalize"]),
                          minimal_fisher_weight=float(hp["floor"]))

    def finish(out):
        return {n: out[dotted[n]].detach().cpu().numpy() - base[n].numpy() for n in names}, {}

    return call, finish


def prepare_consensus(method, torch, tv, base, names, hp):
    """TALL masks (FusionBench `generate_task_masks`) + consensus mask (FusionBench
    `construct_consensus_mask`, its disk loader swapped for the masks just made), then the
    consensus merge α · (m_cons ⊙ τ_MTL), τ_MTL = Σ_t τ_t (FusionBench has no merge
    step of its own)."""
    from fusion_bench.method.tall_mask import utils as tall
    from fusion_bench.utils import state_dict_to_vector, vector_to_state_dict

    lam = float(hp.get("tall_mask_lambda", 0.6))
    k = hp.get("prun_thre_k", hp.get("k", 2))
    alpha = float(hp.get("alpha", 1.0))
    tvs = _task_dicts(torch, tv, names)
    ptm = {n: base[n] for n in names}
    num_tasks = len(tvs)

    def call():
        with torch.no_grad():
            tv_flat = torch.stack([state_dict_to_vector(d) for d in tvs])
            flat_ptm = state_dict_to_vector(ptm)
            flat_ft = flat_ptm.unsqueeze(0) + tv_flat
            mtl = tv_flat.sum(0)
            masks = tall.generate_task_masks(tv_flat, flat_ft, flat_ptm, tv=mtl,
                                             tall_mask_lambda=lam)
            as_dicts = {f"task{t}": vector_to_state_dict(
                masks[t], {n: torch.empty(ptm[n].shape, dtype=torch.bool) for n in names})
                for t in range(num_tasks)}
            real_loader = tall.load_tall_mask
            tall.load_tall_mask = lambda remove_keys, ptm_check, config: as_dicts
            try:
                cons = tall.construct_consensus_mask(ptm, k, config=None)
            finally:
                tall.load_tall_mask = real_loader
            merged = vector_to_state_dict(alpha * cons.to(mtl.dtype) * mtl,
                                          {n: torch.empty_like(ptm[n]) for n in names})
            return merged, masks, cons

    def finish(out):
        merged, masks, cons = out
        cons_sd = vector_to_state_dict(cons, {n: torch.empty(ptm[n].shape, dtype=torch.bool)
                                              for n in names})
        extra = {}
        for n in names:
            extra[f"consensus_mask/{n}"] = cons_sd[n].numpy().astype(np.uint8)
        like = lambda: {n: torch.empty(ptm[n].shape, dtype=torch.bool) for n in names}  # noqa: E731
        mask_sds = [vector_to_state_dict(masks[t], like()) for t in range(num_tasks)]
        for n in names:
            extra[f"tall_mask/{n}"] = np.stack([m[n].numpy() for m in mask_sds]).astype(np.uint8)
        return {n: _np(merged[n]) for n in names}, extra

    return call, finish


def _dict_module(torch, sd):
    """An nn.Module whose state_dict is the given flat dict (names may contain dots)."""
    class DictModule(torch.nn.Module):
        def __init__(self, sd):
            super().__init__()
            self._sd = dict(sd)

        def state_dict(self, *args, **kwargs):
            return dict(self._sd)

        def load_state_dict(self, state_dict, strict=True, assign=False):
            missing = [k for k in self._sd if k not in state_dict]
            unexpected = [k for k in state_dict if k not in self._sd]
            self._sd.update({k: v for k, v in state_dict.items() if k in self._sd})
            return types.SimpleNamespace(missing_keys=missing, unexpected_keys=unexpected)

    return DictModule(sd)


def prepare_model_stock(method, torch, tv, base, names, hp):
    import logging
    from fusion_bench import BaseModelPool
    from fusion_bench.method.model_stock import ModelStock

    logging.getLogger("fusion_bench").setLevel(logging.ERROR)
    weights = _weights(torch, tv, base, names)
    ignore = list(hp.get("ignore_keys") or [])

    def call():
        pool = BaseModelPool(models={"_pretrained_": _dict_module(torch, base),
                                     **{f"model_{t}": _dict_module(torch, w)
                                        for t, w in enumerate(weights)}})
        with torch.no_grad():
            return ModelStock(ignore_keys=ignore, model_save_path=None).run(pool)

    def finish(model):
        sd = model.state_dict()
        return {n: _np(sd[n] - base[n]) for n in names}, {}

    return call, finish


class _BernoulliProxy(types.ModuleType):
    """Stands in for `torch` inside `mergekit.sparsify`: `bernoulli` replays injected draws."""

    def __init__(self, torch, draws, kind):
        super().__init__("torch_proxy")
        self._torch, self._draws, self._kind, self.calls = torch, draws, kind, 0

    def __getattr__(self, name):
        return getattr(self._torch, name)

    def bernoulli(self, probs, *args, **kwargs):
        if self.calls >= len(self._draws):
            raise RuntimeError("mergekit drew more Bernoulli masks than were injected")
        name, t, sample = self._draws[self.calls]
        self.calls += 1
        if sample.numel() != probs.numel():
            raise RuntimeError(f"injected draw for {name!r} task {t} has {sample.numel()} "
                               f"entries; mergekit asked for {tuple(probs.shape)}")
        sample = sample.reshape(probs.shape)
        if self._kind == "uniform":
            return (sample < probs).to(probs.dtype)
        return (sample != 0).to(probs.dtype)


def prepare_mergekit(method, torch, tv, base, names, hp, inject=None, inject_kind=None):
    import mergekit.sparsify as sparsify_mod
    from mergekit.merge_methods import merge_state_dicts

    weights = _weights(torch, tv, base, names)
    if method == "della":
        models = {"base": base, **{f"model_{t}": w for t, w in enumerate(weights)}}
        params = {"weight": hp.get("weight", 1.0), "density": hp.get("density", 0.5),
                  "epsilon": hp.get("epsilon", 0.15), "lambda": hp.get("lambda", 1.0),
                  "normalize": hp.get("normalize", True), "rescale": hp.get("rescale", True),
                  "int8_mask": hp.get("int8_mask", False)}
        mk_method = hp.get("variant", "della")  # "della_linear" also works
    else:  # slerp: the first model (base + τ_0) is mergekit's base, i.e. t = 0
        if len(weights) != 2:
            raise ValueError(f"slerp needs exactly 2 task vectors, got {len(weights)}")
        models = {"model_0": weights[0], "model_1": weights[1]}
        params = {"t": hp.get("t", 0.5)}
        mk_method = "slerp"
    base_id = "base" if method == "della" else "model_0"
    draws = None
    if inject is not None:
        draws = [(n, t, inject[n][t]) for n in names for t in range(tv[n].shape[0])]
    seed = int(hp.get("seed", 0))
    state = {}

    def call():
        if draws is not None:
            state["proxy"] = proxy = _BernoulliProxy(torch, draws, inject_kind)
            real = sparsify_mod.torch
            sparsify_mod.torch = proxy
        else:
            torch.manual_seed(seed)
        try:
            with torch.no_grad():
                return merge_state_dicts(models, mk_method, base=base_id, parameters=params)
        finally:
            if draws is not None:
                sparsify_mod.torch = real

    def finish(out):
        extra = {}
        if draws is not None and state["proxy"].calls != len(draws):
            raise RuntimeError(f"mergekit drew {state['proxy'].calls} masks, "
                               f"{len(draws)} were injected (density >= 1 draws none)")
        return {n: _np(out[n] - base[n]) for n in names}, extra

    return call, finish


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True)
    parser.add_argument("--config", required=True)
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    with open(args.config) as f:
        cfg = json.load(f)
    threads = int(cfg.get("threads") or os.cpu_count() or 1)
    os.environ.setdefault("TQDM_DISABLE", "1")

    import torch

    torch.set_num_threads(threads)
    method, hp, names = cfg["method"], cfg.get("hparams") or {}, cfg["names"]
    dtype = np.dtype(cfg.get("dtype") or "float32")
    with np.load(args.input) as z:
        tv = {n: torch.from_numpy(np.ascontiguousarray(z[f"tv/{n}"], dtype=dtype))
              for n in names}
        has_base = f"base/{names[0]}" in z.files
        base = {n: (torch.from_numpy(np.ascontiguousarray(z[f"base/{n}"], dtype=dtype))
                    if has_base else torch.zeros(tv[n].shape[1:], dtype=getattr(torch, dtype.name)))
                for n in names}
        stats = {k[len("stat/"):]: torch.from_numpy(np.ascontiguousarray(z[k], dtype=dtype))
                 for k in z.files if k.startswith("stat/")}
        inject = ({n: torch.from_numpy(np.ascontiguousarray(z[f"inject/{n}"])) for n in names}
                  if cfg.get("inject_kind") else None)

    if method in ("iso_c", "iso_cts", "tsv", "wudi"):
        call, finish = prepare_fusionbench_matrix(method, torch, tv, base, names, hp)
    elif method in ("regmean", "fisher"):
        call, finish = prepare_fusionbench_data(method, torch, tv, base, names, hp, stats)
    elif method == "consensus":
        call, finish = prepare_consensus(method, torch, tv, base, names, hp)
    elif method == "model_stock":
        call, finish = prepare_model_stock(method, torch, tv, base, names, hp)
    elif method in ("della", "slerp"):
        call, finish = prepare_mergekit(method, torch, tv, base, names, hp, inject,
                                        cfg.get("inject_kind"))
    else:
        raise ValueError(f"unknown method {method!r}")

    repeats = int(cfg.get("repeats", 3))
    warmup = bool(cfg.get("warmup", True))
    with _Quiet():
        out = call() if warmup else None  # warm-up (imports, allocator, thread pool)
        rss_before = _rss_now()
        peak_reset = _reset_peak()
        seconds = []
        for _ in range(max(repeats, 0 if warmup else 1)):
            del out
            start = time.perf_counter()
            out = call()
            seconds.append(time.perf_counter() - start)
        peak = _peak()
    delta, extra = finish(out)

    arrays = {f"delta/{n}": np.asarray(delta[n]).astype(dtype) for n in names}
    arrays.update({f"extra/{k}": v for k, v in extra.items()})
    np.savez(args.output, **arrays)
    meta = {"seconds": seconds, "peak_rss_bytes": peak, "rss_before_bytes": rss_before,
            "peak_is_since_reset": peak_reset, "threads": threads,
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "extra": sorted(extra)}
    with open(args.output + ".json", "w") as f:
        json.dump(meta, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
