"""Hugging Face safetensors folders, read one tensor at a time and written shard by shard.

`atm_jax.merge_models` merges checkpoints larger than memory through these: a
:class:`Checkpoint` memory-maps its shards (``safe_open``; bfloat16 through
``ml_dtypes``) and reads one tensor when asked; an :class:`AdapterModel` gives a PEFT
LoRA adapter's task vectors against the base (`atm_jax.lora`); a :class:`ShardWriter`
appends merged tensors to the shard being filled and names the shards as transformers
expects (``model-0000i-of-0000n.safetensors`` + the index, or ``model.safetensors``).
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import numpy as np

from atm_jax.errors import MergeConfigError

__all__ = ["Checkpoint", "AdapterModel", "ShardWriter", "open_model", "INDEX", "FLOATING"]

INDEX = "model.safetensors.index.json"
# safetensors' names of the floating dtypes (the tensors that merge; others are copied).
FLOATING = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


class Checkpoint:
    """A folder of safetensors shards, read tensor by tensor (memory-mapped)."""

    def __init__(self, source: str):
        from atm_jax.models import hf

        self.source = source
        self.folder = hf.local_folder(source)
        self._handles: dict[str, Any] = {}
        index = self.folder / INDEX
        if index.is_file():
            self.weight_map = json.loads(index.read_text())["weight_map"]
        else:
            shards = sorted(p.name for p in self.folder.glob("*.safetensors"))
            if not shards:
                raise FileNotFoundError(f"{source}: no *.safetensors in {self.folder} (pickled "
                                        ".bin checkpoints are not read; convert them first).")
            self.weight_map = {name: shard for shard in shards
                               for name in self._open(shard).keys()}

    def _open(self, shard: str):
        from safetensors import safe_open

        if shard not in self._handles:
            self._handles[shard] = safe_open(self.folder / shard, framework="numpy")
        return self._handles[shard]

    def names(self) -> list[str]:
        return list(self.weight_map)

    def info(self, name: str) -> tuple[tuple[int, ...], str]:
        piece = self._open(self.weight_map[name]).get_slice(name)
        return tuple(piece.get_shape()), piece.get_dtype()

    def get(self, name: str) -> np.ndarray:
        return self._open(self.weight_map[name]).get_tensor(name)

    def weights(self, name: str, base: np.ndarray | None) -> np.ndarray:
        """The tensor as float32 (``base``: the base's, unused here)."""
        return np.asarray(self.get(name), np.float32)

    def task_vector(self, name: str, base: np.ndarray) -> np.ndarray:
        """``θ − θ_base`` of one tensor, float32."""
        return np.asarray(self.get(name), np.float32) - base


class AdapterModel:
    """A PEFT LoRA adapter as one of the merged models: its task vector is ``ΔW`` per
    targeted tensor (`atm_jax.lora`), zero elsewhere, against the merge's base."""

    def __init__(self, source: str, base: Checkpoint):
        from atm_jax import lora

        self.source = source
        self.adapter = lora.Adapter(source)
        self.adapter.resolve(base.names())  # fails now, naming the module, if it cannot apply

    def weights(self, name: str, base: np.ndarray) -> np.ndarray:
        return base + self.adapter.task_vector(name, base)

    def task_vector(self, name: str, base: np.ndarray) -> np.ndarray:
        return self.adapter.task_vector(name, base)


def open_model(source: str, index: int, base: Checkpoint | None):
    """``models[index]`` of a merge: a checkpoint folder, or a LoRA adapter over ``base``."""
    from atm_jax import lora
    from atm_jax.models import hf

    if not lora.is_adapter(hf.local_folder(source)):
        return Checkpoint(source)
    if base is None:
        hint = lora.Adapter(source).base_model
        raise MergeConfigError(f"models[{index}]: {source} is a LoRA adapter; give base_model: the "
                               "checkpoint it was trained from"
                               + (f" ({hint}, says its adapter_config.json)." if hint else "."))
    return AdapterModel(source, base)


class ShardWriter:
    """Tensors appended to part files of at most ``max_bytes`` in ``folder``; ``close``
    names them as transformers expects and writes the index."""

    def __init__(self, folder: pathlib.Path, max_bytes: int):
        self.folder, self.max_bytes = folder, max_bytes
        self.pending: dict[str, np.ndarray] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.total = 0

    def add(self, name: str, array: np.ndarray) -> None:
        if self.pending and self.pending_bytes + array.nbytes > self.max_bytes:
            self._flush()
        self.pending[name] = np.ascontiguousarray(array)
        self.pending_bytes += array.nbytes
        self.total += array.nbytes

    def _flush(self) -> None:
        from safetensors.numpy import save_file

        part = self.folder / f"part-{len(self.shards):05d}.safetensors"
        save_file(self.pending, part, metadata={"format": "pt"})
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def patch(self, fixes: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
        """Sets entries of tensors already added, ``{name: (flat indices, values)}``, before
        ``close``: in memory if still pending, else by rewriting the part files holding them."""
        from safetensors.numpy import load_file, save_file

        for name, (index, values) in fixes.items():
            if name in self.pending:
                self.pending[name].reshape(-1)[index] = values
        for i, names in enumerate(self.shards):
            if not any(n in fixes for n in names):
                continue
            part = self.folder / f"part-{i:05d}.safetensors"
            tensors = {n: np.array(a) for n, a in load_file(part).items()}
            for name in names:
                if name in fixes:
                    tensors[name].reshape(-1)[fixes[name][0]] = fixes[name][1]
            fresh = part.with_suffix(".patched")
            save_file(tensors, fresh, metadata={"format": "pt"})
            fresh.replace(part)

    def close(self) -> None:
        if self.pending or not self.shards:
            self._flush()
        count = len(self.shards)
        if count == 1:
            (self.folder / "part-00000.safetensors").rename(self.folder / "model.safetensors")
            return
        weight_map = {}
        for i, names in enumerate(self.shards):
            final = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            (self.folder / f"part-{i:05d}.safetensors").rename(self.folder / final)
            weight_map.update(dict.fromkeys(names, final))
        (self.folder / INDEX).write_text(json.dumps(
            {"metadata": {"total_size": self.total}, "weight_map": weight_map}, indent=2) + "\n")
