"""Pretraining the tiny ViT on rendered font glyphs: the base of the mini suite.

No vision transformer weights reach this machine, so ATM (arXiv 2411.03055) in the
CPU mini suite starts from a base the project pretrains itself: the ViT of
`atm_jax.models.vit_tiny` learns to tell the 62 characters 0-9, A-Z, a-z apart on
images from `atm_jax.data.render_glyphs`, through a 62-way head that is then
discarded. Training reuses `Finetuner` (head trained), so there is one training loop
in the package.

The result is cached under `cache_dir()/bases/<key>.msgpack` (+ `.json` info),
keyed by the SHA-256 of the canonical JSON of the resolved model config,
pretraining config and `FORMAT_VERSION`; a second call loads it in well under a
second.

The base of the embedded default (configs/mini.py's recipe) ships with the package
(`SHIPPED`: ``atm_jax/assets/bases/<key>.msgpack`` with its info and the SHA-256 of
its bytes), so a first run does not pretrain, and every machine starts from the same
base. A recipe with a shipped base loads it (checked against its SHA-256) before
looking in the cache; any other recipe pretrains as before. Regenerate it with::

  python -m atm_jax.pretrain --write-shipped     # pretrains mini's recipe, writes the asset
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import flax.serialization
import jax
import jax.numpy as jnp

from atm_jax import files
from atm_jax.errors import ChecksumError
from atm_jax.evaluate import accuracy
from atm_jax.finetune import Finetuner, OptimizerConfig
from atm_jax.models.heads import init_head
from atm_jax.models.vit_tiny import ViT, vit_from_config

PyTree = Any

# Bump when the training recipe changes in a way the configs do not capture, so
# stale cached bases are not reused.
FORMAT_VERSION = 1

# Offset between the seeds of the training pool and of the held-out glyphs, so the
# two never share a rendering stream.
HELD_OUT_SEED_OFFSET = 1_000_003

# Chosen on a 2-core CPU by held-out glyph accuracy after a fixed number of images
# seen: batch 32 over 64, a larger pool over more epochs of a smaller one, Adam 1e-3
# over 2e-3 (measured: see benchmarks/results/comments_moved_20261202.md). The default
# sees 160k images (2 epochs of 80k) in 5,000 steps of 32.
PRETRAIN_DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "num_images": 80_000,
    "epochs": 2,
    "batch_size": 32,
    "learning_rate": 1e-3,
    "weight_decay": 0.0,
    "grad_clip": 10.0,
    "optimizer": "adam",
    "schedule": "warmup_cosine",
    "warmup_steps": 200,
    "held_out": 4_000,
}
"""Every pretraining field with its default; a config may override any of them."""


def _as_dict(cfg: Mapping[str, Any] | Any) -> dict[str, Any]:
    """A plain dict from a ConfigDict or a mapping."""
    return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)


def resolve_configs(model_cfg, pretrain_cfg) -> dict[str, Any]:
    """Fills in defaults and checks field names.

    Args:
        model_cfg: ViT config (ConfigDict or mapping; a "name" key is ignored).
        pretrain_cfg: pretraining config; missing fields take `PRETRAIN_DEFAULTS`.

    Returns:
        {"model": every ViT field, "pretrain": every pretraining field,
        "format": FORMAT_VERSION}: what the cache key hashes.

    Raises:
        ValueError: on an unknown pretraining field or a bad value.
    """
    model = vit_from_config(model_cfg)
    model_fields = {f: getattr(model, f) for f in ("patch_size", "width", "depth",
                                                    "num_heads", "mlp_dim")}
    given = _as_dict(pretrain_cfg)
    unknown = sorted(set(given) - set(PRETRAIN_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown pretraining config fields {unknown}; allowed: "
                         f"{sorted(PRETRAIN_DEFAULTS)}")
    pretrain = {**PRETRAIN_DEFAULTS, **given}
    for field in ("num_images", "epochs", "held_out", "batch_size", "seed"):
        value = pretrain[field]
        low = 0 if field == "seed" else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"pretrain_cfg.{field}={value!r} is invalid: must be an "
                             f"integer >= {low}")
    # Fail before rendering and compiling, not after.
    optimizer_config(pretrain, _total_steps(pretrain))
    return {"model": model_fields, "pretrain": pretrain, "format": FORMAT_VERSION}


def cache_key(resolved: Mapping[str, Any]) -> str:
    """SHA-256 hex digest of the canonical JSON of resolved configs."""
    canonical = json.dumps(resolved, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _total_steps(pretrain: Mapping[str, Any]) -> int:
    return pretrain["epochs"] * -(-pretrain["num_images"] // pretrain["batch_size"])


def optimizer_config(pretrain: Mapping[str, Any], total_steps: int) -> OptimizerConfig:
    cosine = pretrain["schedule"] == "warmup_cosine"
    return OptimizerConfig(
        learning_rate=pretrain["learning_rate"],
        weight_decay=pretrain["weight_decay"],
        grad_clip=pretrain["grad_clip"],
        batch_size=pretrain["batch_size"],
        name=pretrain["optimizer"],
        schedule=pretrain["schedule"],
        warmup_steps=pretrain["warmup_steps"] if cosine else 0,
        decay_steps=total_steps if cosine else None,
    )


def _train(model: ViT, pretrain: Mapping[str, Any], log: Callable[[str], None]
           ) -> tuple[PyTree, dict]:
    """Renders the glyphs, trains backbone + 62-way head, measures held-out accuracy."""
    from atm_jax import data  # glyph rendering pulls in Pillow and matplotlib's fonts

    start = time.perf_counter()
    images, labels = data.render_glyphs(pretrain["num_images"], seed=pretrain["seed"])
    held_images, held_labels = data.render_glyphs(
        pretrain["held_out"], seed=pretrain["seed"] + HELD_OUT_SEED_OFFSET)
    num_classes = len(data.GLYPH_CLASSES)
    render_seconds = time.perf_counter() - start
    log(f"pretrain: rendered {len(images)} + {len(held_images)} held-out glyphs "
        f"in {render_seconds:.1f}s")

    init_key, head_key, shuffle_key = jax.random.split(jax.random.key(pretrain["seed"]), 3)
    backbone = jax.jit(model.init)(init_key, images[:1])["params"]
    head = init_head(head_key, model.width, num_classes)

    def apply_fn(params, x, train):
        return model.apply({"params": params}, x, train=train)

    finetuner = Finetuner(apply_fn, optimizer_config(pretrain, _total_steps(pretrain)),
                          train_head=True)

    epoch_start = [time.perf_counter()]

    def on_epoch(epoch, metrics):
        now = time.perf_counter()
        rate = len(images) / (now - epoch_start[0])
        epoch_start[0] = now
        log(f"pretrain epoch {epoch + 1}/{pretrain['epochs']}: loss {metrics['loss']:.4f}, "
            f"train accuracy {metrics['accuracy']:.3f}, {rate:.0f} images/s")

    backbone, head, metrics = finetuner.finetune(
        backbone, head, images, labels, epochs=pretrain["epochs"], key=shuffle_key,
        on_epoch=on_epoch)
    # Plain (uncommitted) arrays, as a base loaded from the cache is: the run places it.
    backbone = jax.tree.map(jnp.asarray, jax.device_get(backbone))
    held_out_accuracy = accuracy(apply_fn, backbone, head, held_images, held_labels)
    seconds = time.perf_counter() - start
    log(f"pretrain: held-out glyph accuracy {held_out_accuracy:.4f} after "
        f"{metrics['steps']} steps, {seconds:.0f}s in all")
    info = {
        "held_out_accuracy": held_out_accuracy,
        "seconds": seconds,
        "render_seconds": render_seconds,
        "steps": metrics["steps"],
        "images": metrics["examples"],
        "train_loss": metrics["loss"],
        "train_accuracy": metrics["accuracy"],
    }
    return backbone, info


# The shipped bases: <key>.msgpack and <key>.json (its info, with "sha256" of the bytes).
SHIPPED = pathlib.Path(__file__).resolve().parent / "assets" / "bases"


def shipped_base(key: str, *, folder: str | os.PathLike | None = None
                 ) -> tuple[PyTree, dict] | None:
    """The shipped base of the recipe with cache key ``key``, or None when none ships.

    Raises:
      ChecksumError: the shipped bytes do not match their recorded SHA-256 (a
        damaged install); reinstall the package, or regenerate the asset.
    """
    folder = pathlib.Path(folder) if folder is not None else SHIPPED
    params_path, info_path = folder / f"{key}.msgpack", folder / f"{key}.json"
    if not (params_path.exists() and info_path.exists()):
        return None
    raw = params_path.read_bytes()
    info = json.loads(info_path.read_text())
    digest = hashlib.sha256(raw).hexdigest()
    if digest != info.get("sha256"):
        raise ChecksumError(
            f"the shipped base {params_path} has SHA-256 {digest}, but its info records "
            f"{info.get('sha256')}: the install is damaged. Reinstall atm_jax, or regenerate "
            "it with `python -m atm_jax.pretrain --write-shipped`.")
    backbone = jax.tree.map(jnp.asarray, flax.serialization.msgpack_restore(raw))
    return backbone, {**info, "key": key, "path": str(params_path), "from_cache": True,
                      "shipped": True}


def write_shipped(model_cfg, pretrain_cfg, *, folder: str | os.PathLike | None = None,
                  log: Callable[[str], None] = print) -> pathlib.Path:
    """Pretrains ``model_cfg`` × ``pretrain_cfg`` now (no cache, no shipped base) and
    writes it with its info and SHA-256 as a shipped base; returns the params path."""
    resolved = resolve_configs(model_cfg, pretrain_cfg)
    key = cache_key(resolved)
    backbone, info = _train(vit_from_config(resolved["model"]), resolved["pretrain"], log)
    raw = flax.serialization.to_bytes(jax.device_get(backbone))
    info.update(config=resolved, jax_version=jax.__version__,
                sha256=hashlib.sha256(raw).hexdigest(), bytes=len(raw))
    folder = pathlib.Path(folder) if folder is not None else SHIPPED
    folder.mkdir(parents=True, exist_ok=True)
    files.write_bytes(folder / f"{key}.msgpack", raw, all_processes=True)
    files.write_text(folder / f"{key}.json", json.dumps(info, indent=2, sort_keys=True) + "\n",
                     all_processes=True)
    log(f"pretrain: wrote the shipped base {folder / f'{key}.msgpack'} ({len(raw)} bytes, "
        f"SHA-256 {info['sha256']})")
    return folder / f"{key}.msgpack"


def pretrained_base(model_cfg, pretrain_cfg, *, cache_dir: str | os.PathLike | None = None,
                    log: Callable[[str], None] = print) -> tuple[PyTree, dict]:
    """The glyph-pretrained ViT backbone for `model_cfg`: shipped with the package
    (`shipped_base`), from the cache, or trained now.

    Same configs give bitwise-identical params on the same machine (seeded glyphs,
    init and shuffles; XLA on CPU is deterministic).

    Args:
        model_cfg: ViT config (see `vit_from_config`).
        pretrain_cfg: pretraining fields (see `PRETRAIN_DEFAULTS`): `seed`,
            `num_images` (training pool, rendered once), `epochs` over that pool,
            `batch_size`, `learning_rate`, `weight_decay`, `grad_clip`, `optimizer`,
            `schedule` ("constant" or "warmup_cosine" over the whole run),
            `warmup_steps`, `held_out` (glyphs rendered with another seed, for the
            reported accuracy).
        cache_dir: cache root; the base lives under `<cache_dir>/bases/`. Defaults
            to `atm_jax.files.cache_dir()`.
        log: called with one line per epoch and a summary line.

    Returns:
        (backbone params as a plain nested dict of arrays, info) with info
        {"held_out_accuracy", "seconds" (of the original training), "steps",
        "images" (training images processed), "config" (the resolved configs),
        "key", "path", "from_cache", "shipped" (when it is the shipped base), ...}.
    """
    resolved = resolve_configs(model_cfg, pretrain_cfg)
    key = cache_key(resolved)
    shipped = shipped_base(key)
    if shipped is not None:
        log(f"pretrain: loaded the shipped base {shipped[1]['path']} (held-out glyph accuracy "
            f"{shipped[1]['held_out_accuracy']:.4f})")
        return shipped
    folder = pathlib.Path(cache_dir or files.cache_dir()) / "bases"
    params_path = folder / f"{key}.msgpack"
    info_path = folder / f"{key}.json"

    if params_path.exists() and info_path.exists():
        backbone = flax.serialization.msgpack_restore(params_path.read_bytes())
        backbone = jax.tree.map(jnp.asarray, backbone)
        info = json.loads(info_path.read_text())
        log(f"pretrain: loaded cached base {params_path} (held-out glyph accuracy "
            f"{info['held_out_accuracy']:.4f})")
        return backbone, {**info, "key": key, "path": str(params_path), "from_cache": True}

    model = vit_from_config(resolved["model"])
    backbone, info = _train(model, resolved["pretrain"], log)
    info["config"] = resolved
    info["jax_version"] = jax.__version__
    # Every host keeps its own cache, so every process writes its copy.
    files.write_bytes(params_path, flax.serialization.to_bytes(jax.device_get(backbone)),
                      all_processes=True)
    files.write_text(info_path, json.dumps(info, indent=2, sort_keys=True), all_processes=True)
    log(f"pretrain: cached base at {params_path}")
    return backbone, {**info, "key": key, "path": str(params_path), "from_cache": False}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m atm_jax.pretrain",
        description="Pretrain the glyph ViT base of the mini suite.")
    parser.add_argument("--write-shipped", action="store_true",
                        help="pretrain configs/mini.py's recipe and write it as the shipped base "
                             f"(into {SHIPPED})")
    parser.add_argument("--folder", help="write the shipped base here instead")
    args = parser.parse_args(argv)
    if not args.write_shipped:
        parser.print_help()
        sys.exit(2)
    from atm_jax import recipes

    config = recipes.mini()
    write_shipped(config.model, config.pretrain, folder=args.folder)


if __name__ == "__main__":
    main()
