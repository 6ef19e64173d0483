"""Hugging Face weights in and out for `atm_jax.models.clip` and `atm_jax.models.bert`.

`load` reads an HF folder (``config.json`` + ``model.safetensors``, or a sharded
``model.safetensors.index.json``) or a hub id into our plain-dict params; `export`
writes params back as a folder that ``transformers.AutoModel.from_pretrained`` opens.
Tensors are read with ``safetensors.numpy``: torch is needed only for pickled
checkpoints, and those only with ``allow_pickle=True``.

The key map is explicit per family (`hf_name`): our leaf path, e.g.
``("encoder", "layer_0", "attention", "self", "query", "kernel")``, names one HF
tensor, ``encoder.layer.0.attention.self.query.weight``, and a `Transform` between
the layouts:

- Dense ``kernel`` [in, out] ↔ Linear ``weight`` [out, in] (transpose);
- Conv ``kernel`` [kh, kw, in, out] (HWIO) ↔ Conv2d ``weight`` [out, in, kh, kw];
- LayerNorm ``scale`` ↔ ``weight``, Embed ``embedding`` ↔ ``weight``, everything
  else (biases, ``class_embedding``, ``logit_scale``) as is.

For CLIP, ``vision/...`` maps under ``vision_model.`` except ``vision/visual_projection``
→ ``visual_projection``; ``text/...`` likewise under ``text_model.`` with
``text_projection`` at the top. BERT / RoBERTa tensors may carry a prefix (``bert.``,
``roberta.``, ...) as task checkpoints (``BertForSequenceClassification``) do; task
heads (``cls.*``, ``classifier.*``, ``lm_head.*``) are ignored.

Loaded weights are cast to float32. A BERT / RoBERTa checkpoint without pooler weights
(``add_pooling_layer=False``) still loads: the pooler is initialised like HF does
(normal(initializer_range), zero bias, fixed seed), a warning says so and
`HFCheckpoint.initialized` names the tensors. Any other missing tensor is an error.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import numpy as np
from etils import epath

from atm_jax import files
from atm_jax.errors import HubUnavailableError, UnsafeCheckpointError, WeightsMismatchError
from atm_jax.models import bert, clip

FAMILIES = ("clip", "bert", "roberta")
ARCHITECTURES = {"clip": "CLIPModel", "bert": "BertModel", "roberta": "RobertaModel"}
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
# Fetched from the hub: config and weights only (never tokenizer or pickles unasked).
HUB_PATTERNS = ("config.json", "*.safetensors", SAFETENSORS_INDEX, "adapter_config.json")
HUB_PICKLE_PATTERNS = ("pytorch_model*.bin", "pytorch_model.bin.index.json")
# Tensors HF keeps as buffers (older checkpoints saved them); never weights.
BUFFER_SUFFIXES = ("position_ids", "token_type_ids")
# Seed of the pooler initialised when a checkpoint has none.
POOLER_SEED = 0


@dataclasses.dataclass(frozen=True)
class HFCheckpoint:
    """A loaded Hugging Face checkpoint.

    Attributes:
        family: ``"clip"``, ``"bert"`` or ``"roberta"``.
        config: the HF ``config.json`` dict as read.
        params: our pytree; for CLIP ``{"vision", "text", "logit_scale"}``.
        initialized: HF names of tensors the checkpoint lacked and that were
            initialised instead (only ever the BERT / RoBERTa pooler).
    """

    family: str
    config: dict
    params: dict
    initialized: tuple[str, ...] = ()


# ---------------------------------------------------------------------------
# The key map.


@dataclasses.dataclass(frozen=True)
class Transform:
    """A layout change between our array and HF's tensor (both directions).

    Attributes:
        name: short description, shown in errors.
        to_hf: ours → HF.
        from_hf: HF → ours.
    """

    name: str
    to_hf: Callable[[np.ndarray], np.ndarray]
    from_hf: Callable[[np.ndarray], np.ndarray]


IDENTITY = Transform("as is", lambda a: a, lambda a: a)
LINEAR = Transform("Dense [in, out] <-> Linear [out, in]", np.transpose, np.transpose)
CONV = Transform(
    "Conv HWIO <-> Conv2d OIHW",
    lambda a: np.transpose(a, (3, 2, 0, 1)),
    lambda a: np.transpose(a, (2, 3, 1, 0)),
)
_LIST_ITEM = re.compile(r"^(layers?)_(\d+)$")


def _module_name(path: tuple[str, ...]) -> tuple[str, Transform]:
    """Maps a path inside a tower to HF's dotted name; ``layer_3`` becomes ``layer.3``."""
    *modules, leaf = path
    parts = []
    for part in modules:
        item = _LIST_ITEM.match(part)
        parts.append(f"{item[1]}.{item[2]}" if item else part)
    if leaf == "kernel":
        transform = CONV if modules[-1] == "patch_embedding" else LINEAR
        return ".".join([*parts, "weight"]), transform
    if leaf in ("scale", "embedding"):
        return ".".join([*parts, "weight"]), IDENTITY
    return ".".join([*parts, leaf]), IDENTITY


def hf_name(family: str, path: tuple[str, ...]) -> tuple[str, Transform]:
    """Returns the HF tensor name (without a task prefix) of one of our leaves.

    Args:
        family: ``"clip"``, ``"bert"`` or ``"roberta"``.
        path: our leaf path, e.g. ``("vision", "encoder", "layers_0", "mlp", "fc1",
            "kernel")``.

    Returns:
        (name, transform), e.g. ``("vision_model.encoder.layers.0.mlp.fc1.weight",
        LINEAR)``.
    """
    if family in ("bert", "roberta"):
        return _module_name(path)
    if family != "clip":
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    tower, *rest = path
    if tower == "logit_scale" and not rest:
        return "logit_scale", IDENTITY
    if tower == "vision" and rest[0] == "visual_projection":
        return _module_name(tuple(rest))
    if tower == "text" and rest[0] == "text_projection":
        return _module_name(tuple(rest))
    if tower in ("vision", "text"):
        name, transform = _module_name(tuple(rest))
        return f"{tower}_model.{name}", transform
    raise ValueError(f"{'/'.join(path)} is not a CLIP leaf")


def _family(config: Mapping[str, Any]) -> str:
    family = config.get("model_type")
    if family not in FAMILIES:
        raise ValueError(
            f"config model_type {family!r} is not supported; expected one of {FAMILIES}"
        )
    return family


def _abstract_params(family: str, config: Mapping[str, Any]) -> dict:
    """The shapes and dtypes `init_params` would give, without computing anything."""
    return clip.param_shapes(config) if family == "clip" else bert.param_shapes(config)


def _leaves(tree) -> list[tuple[tuple[str, ...], Any]]:
    """(path of dict keys, leaf) pairs of a nested dict, sorted by path."""
    out = []
    for keys, leaf in jax.tree_util.tree_leaves_with_path(tree):
        out.append((tuple(str(k.key) for k in keys), leaf))
    return sorted(out, key=lambda item: item[0])


def _unflatten(items: Iterable[tuple[tuple[str, ...], Any]]) -> dict:
    tree: dict = {}
    for path, leaf in items:
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = leaf
    return tree


def _contiguous(array: np.ndarray) -> np.ndarray:
    # np.ascontiguousarray would turn logit_scale's [] into [1].
    return np.array(array, dtype=np.float32, order="C", copy=True)


def _hf_shape(transform: Transform, shape: tuple[int, ...]) -> tuple[int, ...]:
    # A zero-stride view: the transpose costs nothing whatever the shape.
    return tuple(transform.to_hf(np.broadcast_to(np.float32(0), shape)).shape)


# ---------------------------------------------------------------------------
# Reading.


def _resolve(source: str | os.PathLike, allow_pickle: bool, revision: str | None) -> pathlib.Path:
    """Returns a local folder for ``source``: the folder itself or a hub snapshot."""
    path = pathlib.Path(source).expanduser()
    if path.is_dir():
        return path
    text = os.fspath(source)
    looks_local = path.exists() or text.startswith((".", "/", "~")) or text.count("/") > 1
    if looks_local or (os.sep != "/" and os.sep in text):
        raise FileNotFoundError(
            f"{text} is not a folder; pass a folder holding config.json and "
            f"{SAFETENSORS}, or a Hugging Face hub id such as 'org/name'"
        )
    import huggingface_hub  # Lazy: only hub ids need it.


    patterns = list(HUB_PATTERNS) + (list(HUB_PICKLE_PATTERNS) if allow_pickle else [])
    try:
        folder = huggingface_hub.snapshot_download(
            repo_id=text,
            revision=revision,
            allow_patterns=patterns,
            local_files_only=files.offline(),
        )
    except Exception as e:  # Any hub or network failure reads the same to the user.
        raise HubUnavailableError(
            f"could not fetch {text!r} from the Hugging Face hub ({type(e).__name__}: {e}). "
            "Without hub access, download the model on a connected machine (e.g. "
            f"`huggingface-cli download {text} config.json {SAFETENSORS}`), copy the "
            "folder here and pass its path: atm_jax.models.hf.load('/path/to/folder')."
        ) from e
    return pathlib.Path(folder)


def local_folder(source: str | os.PathLike, revision: str | None = None) -> pathlib.Path:
    """A local folder for ``source``: the folder itself, or the snapshot of a hub id with its
    safetensors and side files (offline: the cached one, else an error naming the download)."""
    return _resolve(source, allow_pickle=False, revision=revision)


def _read_safetensors_file(path: pathlib.Path) -> dict[str, np.ndarray]:
    from safetensors import safe_open
    from safetensors.numpy import load_file

    try:
        return load_file(path)
    except TypeError:
        # NumPy has no bfloat16: read through JAX (ml_dtypes) and cast on the host.
        with safe_open(path, framework="flax") as f:
            return {k: np.asarray(jax.device_get(f.get_tensor(k)), np.float32) for k in f.keys()}


def _read_safetensors(folder: pathlib.Path) -> dict[str, np.ndarray] | None:
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / SAFETENSORS).is_file():
        shards = [SAFETENSORS]
    else:
        shards = sorted(p.name for p in folder.glob("*.safetensors"))
    if not shards:
        return None
    tensors: dict[str, np.ndarray] = {}
    for shard in shards:
        tensors.update(_read_safetensors_file(folder / shard))
    return tensors


def _pickle_files(folder: pathlib.Path) -> list[pathlib.Path]:
    index = folder / "pytorch_model.bin.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / n for n in names]
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in PICKLE_SUFFIXES)


def _read_pickles(paths: list[pathlib.Path]) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            f"reading {paths[0].name} needs PyTorch (pip install torch), or convert the "
            "checkpoint to safetensors elsewhere"
        ) from e
    tensors: dict[str, np.ndarray] = {}
    for file in paths:
        state = torch.load(file, map_location="cpu", weights_only=True)
        if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
            state = state["state_dict"]  # Lightning-style .ckpt.
        for name, tensor in state.items():
            if isinstance(tensor, torch.Tensor):
                tensor = tensor.detach()
                if tensor.is_floating_point():
                    tensor = tensor.float()
                tensors[name] = tensor.numpy()
    return tensors


def _read_tensors(folder: pathlib.Path, allow_pickle: bool) -> dict[str, np.ndarray]:
    tensors = _read_safetensors(folder)
    if tensors is not None:
        return tensors
    pickles = _pickle_files(folder)
    if not pickles:
        raise FileNotFoundError(f"{folder} holds no {SAFETENSORS} (nor any weights file)")
    if not allow_pickle:
        names = ", ".join(p.name for p in pickles)
        raise UnsafeCheckpointError(
            f"{folder} has only pickled weights ({names}) and no {SAFETENSORS}. Loading a "
            "pickle can execute arbitrary code, so it is refused by default. If you trust "
            "the file, pass allow_pickle=True (it is then read with torch.load(..., "
            "weights_only=True), which needs torch); better, convert it to safetensors."
        )
    return _read_pickles(pickles)


def task_prefix(family: str, names: Iterable[str]) -> str:
    """The task-model prefix (``""``, ``"bert."``, ...) in front of the encoder's tensors."""
    if family == "clip":
        return ""
    anchor = "embeddings.word_embeddings.weight"
    found = sorted((n[: -len(anchor)] for n in names if n.endswith(anchor)), key=len)
    return found[0] if found else ""


def _params_from_tensors(
    family: str, config: Mapping[str, Any], tensors: Mapping[str, np.ndarray], where: str
) -> tuple[dict, tuple[str, ...]]:
    expected = _leaves(_abstract_params(family, config))
    prefix = task_prefix(family, tensors)
    items, missing, mismatched, used = [], [], [], set()
    for path, spec in expected:
        name, transform = hf_name(family, path)
        tensor = tensors.get(prefix + name)
        if tensor is None:
            missing.append((path, spec, name))
            continue
        used.add(prefix + name)
        want = _hf_shape(transform, spec.shape)
        if tuple(tensor.shape) != want:
            mismatched.append(f"{prefix + name}: expected {want}, found {tuple(tensor.shape)}")
            continue
        array = _contiguous(transform.from_hf(np.asarray(tensor, np.float32)))
        items.append((path, array))
    if mismatched:
        raise WeightsMismatchError(
            f"{where}: {len(mismatched)} tensor(s) have shapes that do not match config.json "
            "(HF layout):\n  " + "\n  ".join(mismatched)
        )
    initialized: tuple[str, ...] = ()
    if missing and family != "clip" and all(path[0] == "pooler" for path, _, _ in missing):
        items += _pooler_init(config, missing)
        initialized = tuple(prefix + name for _, _, name in missing)
        warnings.warn(
            f"{where} has no pooler weights (a model saved without its pooling layer); "
            f"initialised {', '.join(initialized)} randomly (seed {POOLER_SEED}) as HF "
            "would. pooled_output is meaningless until trained; last_hidden_state is not "
            "affected.",
            stacklevel=3,
        )
    elif missing:
        names = [prefix + name for _, _, name in missing]
        raise WeightsMismatchError(
            f"{where}: {len(names)} tensor(s) that config.json requires are missing"
            f"{f' (looked for prefix {prefix!r})' if prefix else ''}:\n  " + "\n  ".join(names)
        )
    _warn_unexpected(family, tensors, used, prefix, where)
    return _unflatten(items), initialized


def _pooler_init(config: Mapping[str, Any], missing) -> list[tuple[tuple[str, ...], np.ndarray]]:
    std = float(bert.settings(config)["initializer_range"])
    rng = np.random.default_rng(POOLER_SEED)
    out = []
    for path, spec, _ in missing:
        if path[-1] == "kernel":
            array = (rng.standard_normal(spec.shape) * std).astype(np.float32)
        else:
            array = np.zeros(spec.shape, np.float32)
        out.append((path, array))
    return out


def _warn_unexpected(family, tensors, used, prefix, where) -> None:
    """Warns about unused tensors inside the encoder's namespace (not task heads)."""
    if family == "clip":
        roots = ("vision_model.", "text_model.", "visual_projection.", "text_projection.")
    else:
        roots = tuple(prefix + r for r in ("embeddings.", "encoder.", "pooler."))
    extra = [
        n for n in tensors
        if n not in used and n.startswith(roots) and not n.endswith(BUFFER_SUFFIXES)
    ]  # fmt: skip
    if extra:
        warnings.warn(
            f"{where}: ignored {len(extra)} tensor(s) config.json does not describe: "
            + ", ".join(sorted(extra)[:20]),
            stacklevel=4,
        )


def load(
    source: str | os.PathLike, *, allow_pickle: bool = False, revision: str | None = None
) -> HFCheckpoint:
    """Loads an HF CLIP / BERT / RoBERTa checkpoint into our params.

    Args:
        source: a local folder with ``config.json`` and ``model.safetensors`` (or a
            sharded ``model.safetensors.index.json``), or a hub id (fetched with
            ``huggingface_hub.snapshot_download`` only when no such folder exists;
            from the local hub cache only when ``ATM_JAX_OFFLINE=1``).
        allow_pickle: read ``.bin`` / ``.pt`` / ``.pth`` / ``.ckpt`` weights when no
            safetensors exist. Pickles can execute code on load, so this is off.
        revision: hub revision (branch, tag or commit) for hub ids.

    Returns:
        The `HFCheckpoint`; params are float32 NumPy arrays.

    Raises:
        WeightsMismatchError: tensors missing or shaped unlike ``config.json`` says.
        UnsafeCheckpointError: only pickles exist and ``allow_pickle`` is False.
        HubUnavailableError: a hub id could not be fetched.
    """
    folder, config = _folder_config(source, allow_pickle, revision)
    family = _family(config)
    tensors = _read_tensors(folder, allow_pickle)
    params, initialized = _params_from_tensors(family, config, tensors, str(folder))
    return HFCheckpoint(family, config, params, initialized)


def _folder_config(source, allow_pickle: bool, revision: str | None) -> tuple[pathlib.Path, dict]:
    folder = _resolve(source, allow_pickle, revision)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json")
    return folder, json.loads(config_path.read_text())


def read_folder(
    source: str | os.PathLike, *, allow_pickle: bool = False, revision: str | None = None
) -> tuple[pathlib.Path, dict, dict[str, np.ndarray]]:
    """(local folder, its ``config.json``, every tensor by HF name) of any HF model folder
    or hub id, whatever its ``model_type`` (a ``CLIPVisionModel``'s too); the same reading
    rules and errors as `load`, without mapping the tensors to our params."""
    folder, config = _folder_config(source, allow_pickle, revision)
    return folder, config, _read_tensors(folder, allow_pickle)


# ---------------------------------------------------------------------------
# Writing.


def to_hf_tensors(family: str, config: Mapping[str, Any], params: Mapping) -> dict[str, np.ndarray]:
    """Our params as HF tensors: {HF name: float32 contiguous array in HF layout}.

    Raises:
        WeightsMismatchError: ``params`` lacks leaves the config describes, has extra ones,
            or shapes differ.
    """
    expected = {path: spec.shape for path, spec in _leaves(_abstract_params(family, config))}
    given = dict(_leaves(params))
    problems = [f"missing {'/'.join(p)}" for p in expected if p not in given]
    problems += [f"unexpected {'/'.join(p)}" for p in given if p not in expected]
    problems += [
        f"{'/'.join(p)}: expected {expected[p]}, found {tuple(np.shape(a))}"
        for p, a in given.items()
        if p in expected and tuple(np.shape(a)) != tuple(expected[p])
    ]
    if problems:
        raise WeightsMismatchError(
            f"params do not match the {family} config:\n  " + "\n  ".join(problems)
        )
    tensors = {}
    for path, leaf in given.items():
        name, transform = hf_name(family, path)
        array = np.asarray(jax.device_get(leaf), np.float32)
        tensors[name] = _contiguous(transform.to_hf(array))
    return tensors


def export(
    folder: str | os.PathLike, family: str, config: Mapping[str, Any], params: Mapping
) -> epath.Path:
    """Writes params as an HF folder: ``model.safetensors`` + ``config.json``.

    ``transformers.AutoModel.from_pretrained(folder)`` then builds ``CLIPModel`` /
    ``BertModel`` / ``RobertaModel`` with every weight loaded, and `load` gives the
    params back bit for bit. After merging only CLIP's image encoder, pass the full
    params with the merged tower: ``{**checkpoint.params, "vision": merged}``.

    Args:
        folder: output folder (created; existing files of the same names are replaced
            atomically).
        family: ``"clip"``, ``"bert"`` or ``"roberta"``.
        config: the HF config dict (e.g. `HFCheckpoint.config`).
        params: our params for that config.

    Returns:
        The folder.
    """
    from safetensors.numpy import save_file

    if _family(config) != family:
        raise ValueError(f"family {family!r} but config model_type {config.get('model_type')!r}")
    tensors = to_hf_tensors(family, config, params)
    folder = files.as_path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # Only the base model is written, so the config names the base class even when
    # it came from a task checkpoint (BertForSequenceClassification, ...).
    out_config = {**config, "architectures": [ARCHITECTURES[family]]}
    files.atomic_write_file(
        folder / SAFETENSORS, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"})
    )
    files.write_text(folder / "config.json", json.dumps(out_config, indent=2, sort_keys=True) + "\n")
    # A stale sharded index would win over the fresh single file on the next load.
    (folder / SAFETENSORS_INDEX).unlink(missing_ok=True)
    return folder
