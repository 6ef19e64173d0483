"""LoRA adapters (PEFT's folder format) as task vectors.

A LoRA adapter (Hu et al., 2021, arXiv:2106.09685) adds ``ΔW = scaling · B @ A``
(``A [r, in]``, ``B [out, r]``) to each tensor it targets and leaves the rest of its base
as it is; ``scaling = lora_alpha / r``, or ``lora_alpha / √r`` with ``use_rslora``
(Kalajdzievski 2023, arXiv:2312.03732), ``rank_pattern`` / ``alpha_pattern`` overriding
``r`` / ``lora_alpha`` per module. ``ΔW`` is the task vector ``θ_finetuned − θ_base`` of
that tensor, so an adapter merges like a finetuned checkpoint, one tensor at a time::

    adapter = Adapter("path/or/hub-id")   # adapter_config.json + adapter_model.safetensors
    adapter.resolve(base.names())         # base tensor name -> the adapter entry changing it
    tau = adapter.task_vector(name, base.get(name))   # float32; zeros where nothing changes

Keys as PEFT's ``save_pretrained`` writes them (peft/utils/save_and_load.py,
peft/tuners/lora/layer.py): ``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight``
(an adapter name such as ``.default`` before ``.weight`` is accepted too); embeddings as
bare ``<module>.lora_embedding_A [r, vocab]`` / ``_B [dim, r]``, ``ΔW = scaling · (B @ A)ᵀ``;
convolutions ``A [r, in, *k]``, ``B [out, r, 1, …]``; ``lora_B.bias`` (``lora_bias``) adds
``scaling · b`` to the bias; ``fan_in_fan_out: true`` (GPT-2's Conv1D, ``[in, out]``)
transposes ``ΔW``. Any other tensor is a full one (``modules_to_save`` such as a classifier
head, biases of ``bias: all`` / ``lora_only``, whole embedding layers; ``.base_layer``
dropped from the name): `Adapter.replaced`, entering the task vector as ``saved − base``.
Module paths match base tensor names by dotted suffix either way (a ``bert.`` / ``model.``
prefix on one side only), exactly one each. Refused by name (`REFUSED`): DoRA, the other
LoRA variants, base-rewriting inits (PiSSA, OLoRA, CorDA, LoRA-GA, LoftQ), and more.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
from safetensors import safe_open

from atm_jax.errors import AtmJaxError

__all__ = ["Adapter", "AdapterError", "is_adapter", "CONFIG", "WEIGHTS"]

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
FACTOR = re.compile(
    r"(?P<module>.+)\.lora_(?P<which>[AB])(?:\.(?P<name>[^.]+))?\.(?P<param>weight|bias)")
EMBEDDING = re.compile(r"(?P<module>.+)\.lora_embedding_(?P<which>[AB])(?:\.(?P<name>[^.]+))?")
DORA = ("DoRA rescales every column of W + ΔW by a learned magnitude (lora_magnitude_vector), "
        "so its task vector is not a low-rank delta")
# LoraConfig fields (truthy) refused: PEFT's `is_lora_variant` fields and other non-merges.
REFUSED = {
    "use_dora": DORA,
    "target_parameters": "LoRA on raw parameters (MoE expert tensors) is not read",
    "trainable_token_indices": "trainable tokens overwrite embedding rows; not read",
    "layer_replication": "the adapted model has layers the base lacks",
    "alora_invocation_tokens": "activated LoRA applies only after its invocation tokens",
    **dict.fromkeys(("use_qalora", "velora_config", "monteclora_config", "use_bdlora",
                     "arrow_config", "kasa_config"), "a LoRA variant atm_jax does not read"),
}
# Inits that train the adapter against a rewritten base (a residual, or a quantized one).
BASE_REWRITING_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq")


class AdapterError(AtmJaxError, ValueError):
    """An adapter that cannot become a task vector of this base; the message names the key."""


def is_adapter(folder: str | os.PathLike) -> bool:
    """True if ``folder`` holds a PEFT ``adapter_config.json``."""
    return (pathlib.Path(folder) / CONFIG).is_file()


class Adapter:
    """A PEFT LoRA adapter folder, read tensor by tensor (memory-mapped): ``source`` as
    given, its local ``folder``, ``config`` (adapter_config.json), ``base_model`` (its
    ``base_model_name_or_path`` or None), ``unmatched`` (saved full tensors the base lacks)."""

    def __init__(self, source: str | os.PathLike):
        from atm_jax.models import hf  # lazy: it imports JAX

        self.source, self.folder = os.fspath(source), hf.local_folder(source)
        if not is_adapter(self.folder):
            raise FileNotFoundError(f"{self.source}: no {CONFIG} in {self.folder}; not a PEFT "
                                    "adapter folder.")
        self.config = json.loads((self.folder / CONFIG).read_text())
        self.base_model = self.config.get("base_model_name_or_path")
        self._check_config()
        weights = self.folder / WEIGHTS
        if not weights.is_file():
            raise FileNotFoundError(f"{self.source}: no {WEIGHTS} in {self.folder} (a pickled "
                                    "adapter_model.bin is not read: save with safetensors).")
        self._file = safe_open(weights, framework="numpy")
        self._modules: dict[str, dict[str, str]] = {}  # module path -> "A" / "B" / "bias" -> key
        self._embeddings: set[str] = set()             # modules stored as lora_embedding_A/B
        self._full: dict[str, str] = {}                # base-style tensor name -> key
        self._plan: dict[str, dict[str, str]] | None = None
        self.unmatched: list[str] = []
        self._read_keys(list(self._file.keys()))

    def _fail(self, message: str) -> AdapterError:
        return AdapterError(f"adapter {self.source!r}: {message}")

    def _check_config(self) -> None:
        kind = self.config.get("peft_type")
        if kind != "LORA":
            raise self._fail(f"peft_type={kind!r} in {CONFIG}; only LoRA adapters (peft_type "
                             "'LORA') are read as task vectors.")
        for field, why in REFUSED.items():
            if self.config.get(field):
                raise self._fail(f"{CONFIG} sets {field}={self.config[field]!r}: {why}. "
                                 "atm_jax reads plain LoRA and rsLoRA adapters.")
        init = str(self.config.get("init_lora_weights", True)).lower()
        if init.startswith(BASE_REWRITING_INITS):
            raise self._fail(f"init_lora_weights={init!r} trains against a base rewritten at "
                             "init, so scaling · B @ A is not a change to the original base; "
                             "PEFT converts PiSSA / OLoRA / CorDA / LoRA-GA adapters with save_"
                             "pretrained(..., path_initial_model_for_weight_conversion=...).")

    def _read_keys(self, keys: Sequence[str]) -> None:
        names = set()
        for key in keys:
            path = key.removeprefix(PREFIX)
            if "lora_magnitude_vector" in path:
                raise self._fail(f"tensor {key!r}: {DORA}; merge the model PEFT's "
                                 "merge_and_unload() writes instead.")
            factor, embedding = FACTOR.fullmatch(path), EMBEDDING.fullmatch(path)
            if factor and factor["which"] + factor["param"] == "Abias":
                factor = None  # PEFT's lora_A has no bias
            if match := factor or embedding:
                names.add(match["name"])
                role = "bias" if factor and factor["param"] == "bias" else match["which"]
                self._modules.setdefault(match["module"], {})[role] = key
                if embedding:
                    self._embeddings.add(match["module"])
            elif any(part.startswith("lora_") or part == "trainable_tokens_delta"
                     for part in path.split(".")):
                raise self._fail(f"tensor {key!r} is not a LoRA factor atm_jax reads "
                                 "(lora_A / lora_B / lora_embedding_A / lora_embedding_B).")
            else:
                self._full[path.replace(".base_layer.", ".")] = key
        if len(names) > 1:
            raise self._fail(f"the file holds several adapters ({sorted(map(str, names))}); "
                             "save one adapter per folder.")
        for entry in self._modules.values():
            if "A" not in entry or "B" not in entry:
                raise self._fail(f"{next(iter(entry.values()))!r} has no lora_A / lora_B pair.")

    def scaling(self, module: str) -> float:
        """``lora_alpha / r`` (``/ √r`` with ``use_rslora``) of a module, after ``rank_pattern``
        / ``alpha_pattern``: PEFT's first key with ``(.*\\.)?(key)$`` matching the path wins."""
        r = _pattern(self.config.get("rank_pattern") or {}, module, self.config.get("r", 8))
        alpha = _pattern(self.config.get("alpha_pattern") or {}, module,
                         self.config.get("lora_alpha", 8))
        rank = self._file.get_slice(self._modules[module]["A"]).get_shape()[0]
        if rank != r:
            raise self._fail(f"module {module!r}: {CONFIG} gives r={r} (after rank_pattern) but "
                             f"its lora_A has rank {rank}.")
        return alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r

    def resolve(self, base_names: Sequence[str]) -> dict[str, str]:
        """Matches the adapter's entries to base tensor names: ``<module>.weight`` equal to a
        name, or ending with it or it with that at a dot (a model prefix on one side only).

        Returns base tensor name -> the module path of its low-rank ``ΔW`` (or the key of
        its LoRA bias or full tensor). Raises `AdapterError` when a module matches no
        base tensor or several, or two entries of one kind match one tensor."""
        known = set(base_names)
        ending: dict[str, list[str]] = {}  # dotted suffix -> the base names ending with it
        for name in known:
            parts = name.split(".")
            for i in range(len(parts)):
                ending.setdefault(".".join(parts[i:]), []).append(name)

        def find(target: str) -> list[str]:
            if target in known:
                return [target]
            parts = target.split(".")
            inner = {s for s in (".".join(parts[i:]) for i in range(1, len(parts))) if s in known}
            return sorted(set(ending.get(target, ())) | inner)

        plan: dict[str, dict[str, str]] = {}
        owner: dict[tuple[str, str], str] = {}
        unmatched = []
        entries = [(f"{m}.weight", "delta", e["A"], m) for m, e in self._modules.items()]
        entries += [(f"{m}.bias", "bias", e["bias"], m) for m, e in self._modules.items()
                    if "bias" in e]
        entries += [(name, "full", key, key) for name, key in self._full.items()]
        for target, role, key, value in entries:
            found = find(target)
            if not found and role == "full":
                unmatched.append(key)
                continue
            if len(found) != 1:
                raise self._fail(f"{key!r} (for {target!r}) matches {_count(found)} of the base's "
                                 f"tensors; the adapter was trained on {self.base_model!r}.")
            kind = "full" if role == "full" else "lowrank"
            if (found[0], kind) in owner:
                raise self._fail(f"{key!r} and {owner[found[0], kind]!r} both match base tensor "
                                 f"{found[0]!r}.")
            owner[found[0], kind] = key
            plan.setdefault(found[0], {})[role] = value
        if unmatched:
            warnings.warn(f"adapter {self.source!r}: the base has no tensor for "
                          f"{', '.join(unmatched)} (a task head on a headless base?); left out "
                          "of the merge (Adapter.unmatched).", stacklevel=2)
        self._plan, self.unmatched = plan, unmatched
        return {base: p.get("delta") or owner.get((base, "lowrank")) or p["full"]
                for base, p in plan.items()}

    def _planned(self, base_name: str | None = None) -> dict[str, str]:
        if self._plan is None:
            raise self._fail("call resolve(base tensor names) first.")
        return self._plan.get(base_name, {})

    @property
    def replaced(self) -> Mapping[str, np.ndarray]:
        """Base tensor name -> the full tensor the adapter saved for it (float32, read on
        access); its task vector is ``replaced[name] − base`` (`task_vector`)."""
        self._planned()
        return _Tensors(self._read, {b: p["full"] for b, p in self._plan.items() if "full" in p})

    def _read(self, key: str) -> np.ndarray:
        return np.asarray(self._file.get_tensor(key), np.float32)

    def delta(self, base_name: str, shape: tuple[int, ...]) -> np.ndarray:
        """The low-rank ``ΔW`` of one base tensor: float32, of exactly ``shape``."""
        plan, shape = self._planned(base_name), tuple(shape)
        if "bias" in plan:
            module = plan["bias"]
            made = (out := self._read(self._modules[module]["bias"])).shape
        elif "delta" in plan:
            module = plan["delta"]
            entry = self._modules[module]
            a_shape = tuple(self._file.get_slice(entry["A"]).get_shape())
            b_shape = tuple(self._file.get_slice(entry["B"]).get_shape())
            flip = module in self._embeddings or (
                len(a_shape) == 2 and bool(self.config.get("fan_in_fan_out")))
            made = (b_shape[0], *a_shape[1:])[::-1 if flip else 1]
            if len(b_shape) < 2 or any(d != 1 for d in b_shape[2:]):
                raise self._fail(f"module {module!r}: lora_B of shape {b_shape} is not "
                                 "[out, r, 1, ...].")
        else:
            raise self._fail(f"tensor {base_name!r} has no low-rank ΔW in this adapter"
                             + (" (it is a full tensor: see replaced)." if "full" in plan else "."))
        if made != shape:
            hint = (" (fan_in_fan_out in adapter_config.json: a Conv1D layer stores [in, out])"
                    if len(shape) == 2 and made == shape[::-1] else "")
            raise self._fail(f"tensor {base_name!r}: ΔW of module {module!r} has shape "
                             f"{made}, the base tensor {shape}{hint}.")
        if "delta" in plan:
            a, b = self._read(entry["A"]), self._read(entry["B"])
            out = b.reshape(b_shape[:2]) @ a.reshape(a_shape[0], -1)
            out = out.reshape(b_shape[0], *a_shape[1:])
            out = out.T if flip else out
        return np.ascontiguousarray(out * np.float32(self.scaling(module)), np.float32)

    def task_vector(self, base_name: str, base: np.ndarray) -> np.ndarray:
        """``θ_adapted − θ_base`` of one base tensor, float32, zeros where the adapter
        changes nothing: ``saved − base`` for a full tensor, plus the low-rank ``ΔW``."""
        plan = self._planned(base_name)
        base = np.asarray(base, np.float32)
        tau = np.zeros_like(base)
        if "full" in plan:
            if (saved := self._read(plan["full"])).shape != base.shape:
                raise self._fail(f"tensor {base_name!r}: the adapter saved {plan['full']!r} of "
                                 f"shape {saved.shape}, the base's is {base.shape} (a resized "
                                 "vocabulary?).")
            tau += saved - base
        if "delta" in plan or "bias" in plan:
            tau += self.delta(base_name, base.shape)
        return tau


class _Tensors(Mapping):  # name -> key, read on access (a saved embedding can be GiBs)
    def __init__(self, read, keys: dict[str, str]):
        self._read, self._keys = read, keys

    def __getitem__(self, name: str) -> np.ndarray:
        return self._read(self._keys[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def _pattern(patterns: Mapping[str, float], module: str, default: float) -> float:
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _count(found: Sequence[str]) -> str:
    more = ", …" if len(found) > 4 else ""
    return f"{len(found)} ({', '.join(found[:4])}{more})" if found else "none"
