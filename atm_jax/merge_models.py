"""Merge finetuned Hugging Face checkpoints into one, without training.

    python -m atm_jax.merge_models merge.yaml out/        # or: atm-jax-merge merge.yaml out/

The YAML is mergekit's, for the keys both tools share (docs/merging_checkpoints.md)::

    merge_method: ties            # a data-free merge of atm_jax.merge, or linear / task_arithmetic
    base_model: path/or/hub-id
    models:
      - model: finetuned/a
      - model: finetuned/b
        parameters: {weight: 1.0}
    parameters: {density: 0.2, lambda: 1.0}
    dtype: bfloat16               # default: the base's floating dtype
    tokenizer_source: base

The checkpoints are read one tensor at a time from their memory-mapped safetensors
shards. Each tensor's task vectors ``θ_i − θ_base`` (float32) are merged,
``θ = θ_base + λ · merge(τ)`` is cast once to the output dtype, and the result is
appended to the shard being filled. Peak memory is a few tensors × the number of
models, whatever the model's size. The output goes to a temporary folder next to
``OUT_DIR``, renamed when complete.

The sparsify x consensus merges (mean, sum, ties, breadcrumbs, dare, dare_ties) run
through `atm_jax.merge.streamed`: ``scope: leaf`` (the default here, mergekit's
semantics) or ``scope: model`` (the official TIES, exact out of core), and equal the
in-memory merge of all tensors bit for bit. The other registry merges run on each
tensor as a one-leaf tree.

mergekit's methods:

* ``linear``: ``Σ_i w_i θ_i / Σ_i w_i`` (``normalize: false`` drops the division); no base.
* ``task_arithmetic``: ``θ_base + λ Σ_i w_i τ_i`` (``normalize: true`` divides by
  ``Σ_i w_i``); with unit weights it is the registry's ``sum`` at scale ``λ``.

Every other name is a registry merge with its own hyperparameters under ``parameters``
(``dare``/``dare_ties`` also take mergekit's ``density``, the kept fraction ``1 − p``);
``weight`` must be 1 for them; mergekit's ``normalize`` there picks ``aggregate``
(true: ``mean``, false: ``sum``; the registry's default is ``mean``, where mergekit's
dare_ties defaults to false). DARE's random draws derive from each tensor's name and
``seed``, so they do not depend on the order tensors are read in.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import shutil
import sys
import time
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from atm_jax.errors import MergeConfigError
from atm_jax.hf_folders import (FLOATING, INDEX, Checkpoint, ShardWriter, as_float32, numpy_dtype,
                                open_model)

__all__ = ["MergeConfig", "read_config", "merge_checkpoints", "main", "MergeConfigError",
           "Checkpoint", "ShardWriter", "INDEX"]

TOP_KEYS = ("merge_method", "base_model", "models", "parameters", "dtype", "tokenizer_source")
MODEL_KEYS = ("model", "parameters")
MERGEKIT_ONLY = ("linear", "task_arithmetic")
DTYPES = ("float32", "float16", "bfloat16")
# Merges that need no base checkpoint.
BASELESS = ("linear",)
# Files copied from the base (or the first model) next to the merged weights.
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
              "vocab.json", "merges.txt", "added_tokens.json", "spiece.model",
              "sentencepiece.bpe.model", "tokenizer.model", "generation_config.json")
DEFAULT_SHARD_BYTES = 2 << 30


@dataclasses.dataclass(frozen=True)
class MergeConfig:
    method: str
    models: tuple[str, ...]
    base: str | None
    weights: tuple[float, ...]
    hparams: Mapping[str, Any]
    scale: float = 1.0
    normalize: bool | None = None
    dtype: str | None = None
    seed: int = 0
    source: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False)


# ---------------------------------------------------------------------------
# The YAML.


def _refuse_unknown(where: str, given: Mapping, allowed: Sequence[str]) -> None:
    unknown = [k for k in given if k not in allowed]
    if unknown:
        raise MergeConfigError(f"{where}: unsupported key {unknown[0]!r}; atm_jax.merge_models "
                               f"reads {', '.join(allowed)} (mergekit's slices, layer_range and "
                               "the like are not supported).")


def read_config(source: str | os.PathLike | Mapping[str, Any]) -> MergeConfig:
    """Parses and checks a mergekit-style merge YAML (a path or the loaded mapping)."""
    if isinstance(source, Mapping):
        raw = dict(source)
    else:
        import yaml

        text = pathlib.Path(source).read_text()
        raw = yaml.safe_load(text)
        if not isinstance(raw, dict):
            raise MergeConfigError(f"{source}: expected a YAML mapping with merge_method and "
                                   f"models, got {type(raw).__name__}.")
    _refuse_unknown("the merge config", raw, TOP_KEYS)
    method = raw.get("merge_method")
    if method not in MERGEKIT_ONLY:  # the registry imports JAX: only when a merge needs it
        from atm_jax import merge
    names = MERGEKIT_ONLY if method in MERGEKIT_ONLY else (
        *MERGEKIT_ONLY, *[n for n in merge.names() if merge.info(n).uses == "nothing"])
    if method not in MERGEKIT_ONLY and method in merge.names() and method not in names:
        raise MergeConfigError(f"merge_method={method!r} looks at data ({merge.info(method).uses}"
                               "): checkpoints alone cannot feed it. Run it from Python "
                               "(docs/data_merges.md) or choose a data-free merge.")
    if method not in names:
        raise MergeConfigError(f"merge_method={method!r} is not a data-free merge we know; "
                               f"choose one of {', '.join(names)}.")
    models = raw.get("models")
    if not isinstance(models, list) or not models:
        raise MergeConfigError("models: give a list of `- model: <folder or hub id>` entries.")
    paths, weights, per_model = [], [], []
    for i, entry in enumerate(models):
        entry = {"model": entry} if isinstance(entry, str) else entry
        if not isinstance(entry, dict) or "model" not in entry:
            raise MergeConfigError(f"models[{i}]: expected `model: <folder or hub id>`, got {entry!r}.")
        _refuse_unknown(f"models[{i}]", entry, MODEL_KEYS)
        params = dict(entry.get("parameters") or {})
        weights.append(float(params.pop("weight", 1.0)))
        paths.append(str(entry["model"]))
        per_model.append(params)
    base = raw.get("base_model")
    base = None if base is None else str(base)
    if base is None and method not in BASELESS:
        raise MergeConfigError(f"merge_method={method!r} merges task vectors, so it needs "
                               "base_model: the checkpoint the models were finetuned from.")
    hparams = dict(raw.get("parameters") or {})
    for i, params in enumerate(per_model):  # per-model values must agree: one merge call
        for key, value in params.items():
            if key in hparams and hparams[key] != value:
                raise MergeConfigError(f"models[{i}].parameters.{key}={value!r} differs from "
                                       "another model's; atm_jax merges with one value per "
                                       f"hyperparameter: give {key} once under parameters.")
            hparams[key] = value
    scale = float(hparams.pop("lambda", 1.0))
    normalize = hparams.pop("normalize", None)
    seed = int(hparams.pop("seed", 0))
    if method == "slerp" and base is not None and base in paths:
        # mergekit's t = 0 is base_model: put it first.
        order = [paths.index(base)] + [i for i in range(len(paths)) if paths[i] != base]
        paths, weights = [paths[i] for i in order], [weights[i] for i in order]
    if method not in MERGEKIT_ONLY:
        if any(w != 1.0 for w in weights):
            raise MergeConfigError(f"models[].parameters.weight: {method} takes no per-model "
                                   "weights (set them to 1); scale the merge with lambda, or "
                                   "use linear / task_arithmetic for weighted sums.")
        if normalize is not None:
            # mergekit's normalize divides by the agreeing weights: aggregate mean vs sum.
            if "aggregate" not in merge.info(method).defaults:
                raise MergeConfigError(f"parameters.normalize: {method} has no normalize (it "
                                       "applies to linear, task_arithmetic and the merges with "
                                       "an aggregate).")
            aggregate = "mean" if normalize else "sum"
            if hparams.get("aggregate", aggregate) != aggregate:
                raise MergeConfigError(f"parameters: normalize={normalize} means aggregate="
                                       f"{aggregate!r}, but aggregate={hparams['aggregate']!r} "
                                       "is given too; give one of them.")
            hparams["aggregate"] = aggregate
        if method in ("dare", "dare_ties") and "density" in hparams:
            if "p" in hparams:
                raise MergeConfigError("parameters: give density (mergekit's kept fraction) or "
                                       "p (the drop probability), not both.")
            hparams["p"] = 1.0 - float(hparams.pop("density"))
        hparams = _leaf_scope(method, hparams)
        try:
            merge.info(method).check(**hparams)
        except (TypeError, ValueError) as e:
            raise MergeConfigError(f"parameters of {method}: {e}") from e
    elif hparams:
        raise MergeConfigError(f"parameters: {method} takes weight, normalize and lambda only; "
                               f"got {sorted(hparams)}.")
    dtype = raw.get("dtype")
    if dtype is not None and dtype not in DTYPES:
        raise MergeConfigError(f"dtype={dtype!r}: choose one of {', '.join(DTYPES)}.")
    tokenizer = raw.get("tokenizer_source", "base")
    if tokenizer != "base":
        raise MergeConfigError(f"tokenizer_source={tokenizer!r}: only 'base' is supported (the "
                               "tokenizer files are copied from the base model).")
    if method == "slerp" and len(paths) != 2:
        raise MergeConfigError(f"slerp merges exactly two models; models lists {len(paths)}.")
    return MergeConfig(method=method, models=tuple(paths), base=base, weights=tuple(weights),
                       hparams=hparams, scale=scale, normalize=normalize,
                       dtype=dtype, seed=seed, source=raw)


def _leaf_scope(method: str, hparams: dict) -> dict:
    """The merge's hyperparameters with ``scope`` set: ``leaf`` unless the YAML says
    ``model`` (mergekit's semantics are per tensor; the official TIES is per model)."""
    from atm_jax import merge

    if "scope" not in merge.info(method).defaults:
        if "scope" in hparams:
            raise MergeConfigError(f"parameters.scope: {method} has no scope.")
        return hparams
    scope = hparams.get("scope", "leaf")
    if scope not in ("leaf", "model"):
        raise MergeConfigError(f"parameters.scope={scope!r}: choose leaf (one threshold per "
                               "tensor, as mergekit) or model (one per task over all tensors, as "
                               "the official TIES).")
    return {**hparams, "scope": scope}


# ---------------------------------------------------------------------------
# The merge.


def _output_dtype(config: MergeConfig, reference: Checkpoint, names: Sequence[str]) -> np.dtype:
    codes = {name: code for code, name in FLOATING.items()}  # "bfloat16" -> "BF16", ...
    if config.dtype is not None:
        return numpy_dtype(codes[config.dtype])
    kinds = (reference.info(name)[1] for name in names)
    return numpy_dtype(next((k for k in kinds if k in FLOATING), "F32"))


def _check_same_tensors(reference: Checkpoint, others: Sequence[Checkpoint]) -> list[str]:
    names = reference.names()
    # Integer buffers (position ids and the like) are copied from the reference, so a
    # model may lack them (many BERT exports omit embeddings.position_ids).
    needed = [n for n in names if reference.info(n)[1] in FLOATING]
    for ckpt in others:
        theirs = set(ckpt.names())
        missing = [n for n in needed if n not in theirs]
        if missing:
            raise MergeConfigError(f"model {ckpt.source!r} has no tensor {missing[0]!r} (of "
                                   f"{reference.source!r}); all models must share one architecture.")
        extra = sorted(theirs - set(names))
        if extra:
            raise MergeConfigError(f"model {ckpt.source!r} holds tensor {extra[0]!r}, which "
                                   f"{reference.source!r} lacks.")
        for name in (n for n in names if n in theirs):
            theirs_shape, ours = ckpt.info(name)[0], reference.info(name)[0]
            if theirs_shape != ours:
                raise MergeConfigError(
                    f"tensor {name!r}: shape {theirs_shape} in {ckpt.source!r} but {ours} in "
                    f"{reference.source!r} (a resized vocabulary?); atm_jax does not merge "
                    "tensors of different shapes.")
    return names


def _tensor_seed(seed: int, name: str) -> int:
    """A tensor's seed for the streamed merges' DARE draws: ``seed`` and its name's CRC-32."""
    return (seed << 32) | zlib.crc32(name.encode())


def _tensor_key(seed: int, name: str):
    import jax

    return jax.random.fold_in(jax.random.key(seed), zlib.crc32(name.encode()) & 0x7FFFFFFF)


def _merge_tensor(config: MergeConfig, name: str, models: Sequence, base: np.ndarray | None
                  ) -> np.ndarray:
    """The merged float32 tensor ``name`` of the models (given the base's, float32)."""
    w = np.asarray(config.weights, np.float32)
    if config.method in MERGEKIT_ONLY:  # weighted sums, in place: one buffer per tensor
        shape = models[0].info(name)[0] if base is None else base.shape
        total, buf = np.zeros(shape, np.float32), np.empty(shape, np.float32)
        for wi, m in zip(w, models):
            if config.method == "linear":
                buf[...] = m.weights(name, base)
            else:
                m.task_vector(name, base, out=buf)
            if wi != 1:
                buf *= wi
            total += buf
        if config.method == "linear":
            return total / w.sum() if config.normalize is not False else total
        if config.normalize:
            total /= w.sum()
        total *= np.float32(config.scale)
        total += base
        return total
    taus = np.empty((len(models), *base.shape), np.float32)
    for i, m in enumerate(models):
        m.task_vector(name, base, out=taus[i])
    from atm_jax import merge

    tree = {name: taus}
    extra = {"base": {name: base}} if config.method == "slerp" else {}
    fn = merge.get(config.method)
    delta = fn(tree, key=_tensor_key(config.seed, name), **config.hparams, **extra)[name]
    return base + config.scale * np.asarray(delta, np.float32)


def merge_checkpoints(config: MergeConfig | str | os.PathLike | Mapping, out_dir: str | os.PathLike,
                      *, overwrite: bool = False, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                      progress: bool = True) -> pathlib.Path:
    """Merges the checkpoints ``config`` names into an HF folder at ``out_dir``.

    Returns the folder. Nothing appears at ``out_dir`` until the merge is complete.
    """
    from atm_jax import __version__

    if not isinstance(config, MergeConfig):
        config = read_config(config)
    out = pathlib.Path(out_dir).expanduser()
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass --overwrite to replace it.")
    base = Checkpoint(config.base) if config.base is not None else None
    models = [open_model(m, i, base) for i, m in enumerate(config.models)]
    reference = base if base is not None else models[0]
    names = _check_same_tensors(reference, [m for m in models if isinstance(m, Checkpoint)])
    dtype = _output_dtype(config, reference, names)

    floating = {n: reference.info(n)[0] for n in names if reference.info(n)[1] in FLOATING}
    streamed = _streamed(config, models, base, floating)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        if streamed is not None and streamed.passes():
            bar = _progress(len(floating) * streamed.passes(), progress, "thresholds")
            streamed.count(lambda name: bar.update(1))
            bar.close()
        _write_merged(config, names, floating, models, base, reference, dtype, tmp,
                      max_shard_bytes, progress, streamed)
        _side_files(reference.folder, tmp, dtype)
        _readme(tmp, config, __version__)
        if out.exists():
            trash = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(trash)
            tmp.rename(out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _streamed(config: MergeConfig, models: Sequence[Checkpoint], base: Checkpoint | None,
              shapes: Mapping[str, tuple[int, ...]]):
    """The out-of-core driver of a sparsify x consensus merge (None for other methods)."""
    if config.method in MERGEKIT_ONLY or base is None:
        return None
    from atm_jax import merge
    from atm_jax.merge import sparsify, streamed

    if config.method not in sparsify.PROGRAM_NAMES or base is None:
        return None
    hparams = {k: v for k, v in {**merge.info(config.method).defaults, **config.hparams}.items()
               if k in merge.info(config.method).defaults or k == "method"}
    program = sparsify.program(config.method, **hparams)

    # One buffer for every tensor's task vectors (the largest so far): fresh pages of a
    # new array per tensor cost a page fault each. The driver is done with a tensor's
    # task vectors before it asks for the next tensor's.
    buffer = np.empty(0, np.float32)

    def task_vectors(name: str) -> np.ndarray:
        nonlocal buffer
        base_t = as_float32(base.get(name))
        size = len(models) * base_t.size
        if buffer.size < size:
            buffer = np.empty(size, np.float32)
        out = buffer[:size].reshape(len(models), *base_t.shape)
        for i, m in enumerate(models):
            m.task_vector(name, base_t, out=out[i])
            m.release(name)
        return out

    return streamed.StreamedMerge(program, shapes, task_vectors,
                                  seed_for=lambda name: _tensor_seed(config.seed, name),
                                  sources=[m.source for m in models])


def _write_merged(config, names, floating, models, base, reference, dtype, tmp, max_shard_bytes,
                  progress, streamed) -> None:
    """The merge pass: every tensor merged (or copied) and written to shards in ``tmp``."""
    writer = ShardWriter(tmp, max_shard_bytes)
    bar = _progress(len(names), progress, "merging")
    deltas = streamed.deltas() if streamed is not None else None
    fixes = {}  # the zero-mass entries' values on the "-" side, as written
    start, done_bytes = time.perf_counter(), 0
    for name in names:
        if name not in floating:  # integer buffers: the reference's
            writer.add(name, np.asarray(reference.get(name)))
        else:
            base_t = None if base is None else as_float32(base.get(name))
            if deltas is not None:
                delta_name, delta = next(deltas)
                assert delta_name == name, (delta_name, name)
                merged = base_t + config.scale * delta
                if name in streamed.alternatives:
                    index, other = streamed.alternatives[name]
                    fixes[name] = (index, (base_t.reshape(-1)[index] + config.scale * other
                                           ).astype(dtype))
            else:
                merged = _merge_tensor(config, name, models, base_t)
            writer.add(name, merged.astype(dtype))
            done_bytes += merged.nbytes * (len(models) + (base is not None))
            for ckpt in (*models, *([base] if base is not None else [])):
                ckpt.release(name)
        bar.update(1)
        bar.set_postfix_str(f"{done_bytes / 2**30:.2f} GiB read as float32, "
                            f"{time.perf_counter() - start:.0f} s")
    bar.close()
    if streamed is not None and streamed.negative_side:
        writer.patch(fixes)
    writer.close()


def _progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="tensor", desc=desc, disable=not enabled, file=sys.stderr)


def _side_files(source: pathlib.Path, dest: pathlib.Path, dtype: np.dtype) -> None:
    config = source / "config.json"
    if config.is_file():
        data = json.loads(config.read_text())
        data["torch_dtype"] = dtype.name
        (dest / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    for name in SIDE_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, dest / name)


def _readme(folder: pathlib.Path, config: MergeConfig, version: str) -> None:
    import yaml

    text = yaml.safe_dump(dict(config.source), sort_keys=False)
    (folder / "README.md").write_text(
        "# Merged with atm_jax\n\n"
        f"`python -m atm_jax.merge_models` (atm_jax {version}), merge method "
        f"`{config.method}`, from this config:\n\n```yaml\n{text}```\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="atm-jax-merge", description="Merge finetuned Hugging Face checkpoints (a mergekit-"
        "style YAML) into one, tensor by tensor, without training.")
    parser.add_argument("config", help="the merge YAML")
    parser.add_argument("out_dir", help="the output folder (written atomically)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing out_dir")
    parser.add_argument("--max-shard-size", default="2GB",
                        help="largest output shard, e.g. 500MB or 5GB (default 2GB)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    _compilation_cache()
    try:
        merge_checkpoints(args.config, args.out_dir, overwrite=args.overwrite,
                          max_shard_bytes=_parse_size(args.max_shard_size),
                          progress=not args.no_progress)
    except (ValueError, FileExistsError, FileNotFoundError) as e:  # MergeConfigError, bad tensors
        print(f"atm-jax-merge: error: {e}", file=sys.stderr)
        return 2
    print(f"merged into {args.out_dir}")
    return 0


def _compilation_cache() -> None:
    """Keeps the merge programs XLA compiles (a few per method) in the local cache, so a
    second merge starts at once; a ``JAX_COMPILATION_CACHE_DIR`` the user set wins. Set
    through the environment, which JAX reads when (and only if) a merge imports it."""
    from atm_jax import files

    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        os.environ["JAX_COMPILATION_CACHE_DIR"] = str(files.cache_dir() / "xla")
        os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


def _parse_size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    upper = text.strip().upper()
    for unit in sorted(units, key=len, reverse=True):
        if upper.endswith(unit) and upper[:-len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(upper[:-len(unit)]) * units[unit])
    if upper.isdigit():
        return int(upper)
    raise SystemExit(f"atm-jax-merge: error: --max-shard-size={text!r}: give bytes or e.g. 500MB, 2GB.")


if __name__ == "__main__":
    sys.exit(main())
