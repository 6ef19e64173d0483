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
import mmap
import pathlib
import struct

import numpy as np

from atm_jax.errors import MergeConfigError

__all__ = ["Checkpoint", "AdapterModel", "ShardWriter", "open_model", "local_folder", "as_float32",
           "numpy_dtype", "INDEX", "FLOATING"]

INDEX = "model.safetensors.index.json"
# safetensors' names of the floating dtypes (the tensors that merge; others are copied).
FLOATING = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
# The safetensors dtypes read as NumPy views (others go through safetensors' reader).
_NUMPY = {"F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
          "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "I16": np.dtype(np.int16),
          "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_)}


def numpy_dtype(code: str) -> np.dtype | None:
    """NumPy's dtype for a safetensors dtype code, or None; bfloat16 through ml_dtypes,
    imported only when a checkpoint holds it (its import is slow:
    benchmarks/results/merge_models_micro_20261203.md)."""
    if code == "BF16" and code not in _NUMPY:
        import ml_dtypes

        _NUMPY[code] = np.dtype(ml_dtypes.bfloat16)
    return _NUMPY.get(code)


class Checkpoint:
    """A folder of safetensors shards, read tensor by tensor.

    Each shard is memory-mapped once; ``get`` returns a read-only NumPy view of a
    tensor's bytes in the page cache (no copy), read from the shard's header layout
    (8-byte length, JSON header, data); dtypes NumPy cannot view go through
    safetensors' own reader.
    """

    def __init__(self, source: str):
        self.source = source
        self.folder = local_folder(source)
        self._shards: dict[str, tuple[dict, mmap.mmap, int]] = {}
        index = self.folder / INDEX
        if index.is_file():
            self.weight_map = json.loads(index.read_text())["weight_map"]
        else:
            shards = sorted(p.name for p in self.folder.glob("*.safetensors"))
            if not shards:
                raise FileNotFoundError(f"{source}: no *.safetensors in {self.folder} (pickled "
                                        ".bin checkpoints are not read; convert them first).")
            self.weight_map = {name: shard for shard in shards
                               for name in self._layout(shard)[0] if name != "__metadata__"}

    def _layout(self, shard: str) -> tuple[dict, mmap.mmap, int]:
        """(header, memory map, offset of the data) of one shard."""
        if shard not in self._shards:
            path = self.folder / shard
            with open(path, "rb") as f:
                size = struct.unpack("<Q", f.read(8))[0]
                header = json.loads(f.read(size))
                mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) \
                    if path.stat().st_size > 8 + size else None
            if mapped is not None and hasattr(mmap, "MADV_SEQUENTIAL"):
                mapped.madvise(mmap.MADV_SEQUENTIAL)  # tensors are read front to back
            self._shards[shard] = (header, mapped, 8 + size)
        return self._shards[shard]

    def names(self) -> list[str]:
        return list(self.weight_map)

    def info(self, name: str) -> tuple[tuple[int, ...], str]:
        entry = self._layout(self.weight_map[name])[0][name]
        return tuple(entry["shape"]), entry["dtype"]

    def get(self, name: str) -> np.ndarray:
        """The tensor, a read-only view of the mapped file where NumPy can view its dtype."""
        shard = self.weight_map[name]
        header, mapped, data = self._layout(shard)
        entry = header[name]
        dtype = numpy_dtype(entry["dtype"])
        start, end = entry["data_offsets"]
        if dtype is None or mapped is None:
            from safetensors import safe_open

            with safe_open(self.folder / shard, framework="numpy") as f:
                return f.get_tensor(name)
        return np.frombuffer(mapped, dtype, (end - start) // dtype.itemsize,
                             data + start).reshape(entry["shape"])

    def release(self, name: str) -> None:
        """Unmaps the pages of a tensor read for the last time (they stay in the page cache,
        but leave this process's resident memory)."""
        header, mapped, data = self._layout(self.weight_map[name])
        if mapped is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start, end = header[name]["data_offsets"]
        first = (data + start) // mmap.PAGESIZE * mmap.PAGESIZE
        last = (data + end) // mmap.PAGESIZE * mmap.PAGESIZE  # the page shared with the next stays
        if last > first:
            mapped.madvise(mmap.MADV_DONTNEED, first, last - first)

    def weights(self, name: str, base: np.ndarray | None) -> np.ndarray:
        """The tensor as float32 (``base``: the base's, unused here)."""
        return as_float32(self.get(name))

    def task_vector(self, name: str, base: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """``θ − θ_base`` of one tensor, float32 (written into ``out`` if given)."""
        x = self.get(name)
        if x.dtype == np.float32:
            return np.subtract(x, base, out=out)
        out = as_float32(x, out)
        out -= base
        return out


def as_float32(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``x`` as float32, into ``out`` if given. bfloat16 is the high half of a float32,
    so it widens exactly by a 16-bit shift of its bits, faster than ml_dtypes' cast
    (benchmarks/results/merge_models_micro_20261203.md)."""
    if out is None:
        if x.dtype == np.float32:
            return x
        out = np.empty(x.shape, np.float32)
    if x.dtype.name == "bfloat16":
        np.left_shift(x.view(np.uint16), 16, out=out.view(np.uint32), dtype=np.uint32)
    else:
        out[...] = x
    return out


class AdapterModel:
    """A PEFT LoRA adapter as one of the merged models: its task vector is ``ΔW`` per
    targeted tensor (`atm_jax.lora`), zero elsewhere, against the merge's base."""

    def __init__(self, source: str, base: Checkpoint):
        from atm_jax import lora

        self.source = source
        self.adapter = lora.Adapter(source)
        self.adapter.resolve(base.names())  # fails now, naming the module, if it cannot apply

    def release(self, name: str) -> None:
        del name  # the adapter's tensors are small

    def weights(self, name: str, base: np.ndarray) -> np.ndarray:
        return base + self.adapter.task_vector(name, base)

    def task_vector(self, name: str, base: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        tau = self.adapter.task_vector(name, base)
        if out is None:
            return tau
        out[...] = tau
        return out


def local_folder(source: str) -> pathlib.Path:
    """A local folder as it is, else `atm_jax.models.hf.local_folder` (hub ids; it imports
    JAX, which a weighted average of local checkpoints never needs)."""
    path = pathlib.Path(source).expanduser()
    if path.is_dir():
        return path
    from atm_jax.models import hf

    return hf.local_folder(source)


def open_model(source: str, index: int, base: Checkpoint | None):
    """``models[index]`` of a merge: a checkpoint folder, or a LoRA adapter over ``base``."""
    from atm_jax import lora

    if not lora.is_adapter(local_folder(source)):
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
