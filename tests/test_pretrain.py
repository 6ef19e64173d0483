"""Tests of glyph pretraining and its cache, on a tiny model and a tiny glyph pool."""

import hashlib
import json

import flax.serialization
import jax
import numpy as np
import pytest

from atm_jax import data, errors, pretrain, recipes

TINY_MODEL = {"name": "vit_tiny", "patch_size": 7, "width": 32, "depth": 1, "num_heads": 2,
              "mlp_dim": 64}
TINY_PRETRAIN = {"seed": 0, "num_images": 256, "epochs": 1, "batch_size": 64,
                 "learning_rate": 1e-3, "warmup_steps": 1, "held_out": 124}


def test_pretrain_runs_caches_and_reloads_identically(tmp_path, monkeypatch):
    lines = []
    backbone, info = pretrain.pretrained_base(TINY_MODEL, TINY_PRETRAIN, cache_dir=tmp_path,
                                              log=lines.append)
    assert not info["from_cache"]
    assert info["steps"] == 4 and info["images"] == 256
    assert 0.0 <= info["held_out_accuracy"] <= 1.0
    assert info["config"]["pretrain"]["num_images"] == 256
    assert any(line.startswith("pretrain epoch 1/1") for line in lines)
    assert type(backbone) is dict and backbone["patch_embedding"]["kernel"].shape == (7, 7, 1, 32)

    files = sorted(p.name for p in (tmp_path / "bases").iterdir())
    assert files == [f"{info['key']}.json", f"{info['key']}.msgpack"]  # no temp files left
    stored = json.loads((tmp_path / "bases" / f"{info['key']}.json").read_text())
    assert {"held_out_accuracy", "seconds", "steps", "images", "config"} <= set(stored)

    # A cache hit renders nothing and trains nothing (the two costs of a miss).
    def refuse(*args, **kwargs):
        raise AssertionError("the cached base was rebuilt")

    monkeypatch.setattr(pretrain, "Finetuner", refuse)
    monkeypatch.setattr(data, "render_glyphs", refuse)
    cached, cached_info = pretrain.pretrained_base(TINY_MODEL, TINY_PRETRAIN,
                                                   cache_dir=tmp_path, log=lines.append)
    assert cached_info["from_cache"]
    assert cached_info["held_out_accuracy"] == info["held_out_accuracy"]
    assert jax.tree.structure(cached) == jax.tree.structure(backbone)
    for a, b in zip(jax.tree.leaves(cached), jax.tree.leaves(backbone)):
        assert isinstance(a, jax.Array) and a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)


def test_cache_key_resolves_defaults_and_separates_configs():
    explicit = {**pretrain.PRETRAIN_DEFAULTS}
    key = pretrain.cache_key(pretrain.resolve_configs({}, {}))
    assert key == pretrain.cache_key(pretrain.resolve_configs({"name": "vit_tiny"}, explicit))
    assert key != pretrain.cache_key(pretrain.resolve_configs({}, {"seed": 1}))
    assert key != pretrain.cache_key(pretrain.resolve_configs({"depth": 2}, {}))


def test_pretrain_config_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown pretraining config fields \['steps'\]"):
        pretrain.pretrained_base(TINY_MODEL, {"steps": 10}, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="num_images=0"):
        pretrain.pretrained_base(TINY_MODEL, {"num_images": 0}, cache_dir=tmp_path)
    # Optimizer fields are checked before any rendering or compiling.
    with pytest.raises(ValueError, match="OptimizerConfig.name='lion'"):
        pretrain.pretrained_base(TINY_MODEL, {"optimizer": "lion"}, cache_dir=tmp_path)
    assert not (tmp_path / "bases").exists()


def test_the_regenerated_shipped_base_is_the_pretrained_one_and_is_loaded_first(
        tmp_path, monkeypatch):
    # write_shipped pretrains the recipe as pretrained_base does: the same bytes.
    path = pretrain.write_shipped(TINY_MODEL, TINY_PRETRAIN, folder=tmp_path / "shipped",
                                  log=lambda *_: None)
    _, info = pretrain.pretrained_base(TINY_MODEL, TINY_PRETRAIN, cache_dir=tmp_path / "cache",
                                       log=lambda *_: None)
    cached = tmp_path / "cache" / "bases" / f"{info['key']}.msgpack"
    assert path.name == cached.name and path.read_bytes() == cached.read_bytes()
    recorded = json.loads(path.with_suffix(".json").read_text())
    assert recorded["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert recorded["bytes"] == path.stat().st_size and recorded["config"] == info["config"]

    # A recipe with a shipped base loads it, before any cache, without training.
    def refuse(*args, **kwargs):
        raise AssertionError("the shipped base was not used")

    monkeypatch.setattr(pretrain, "SHIPPED", tmp_path / "shipped")
    monkeypatch.setattr(pretrain, "Finetuner", refuse)
    lines = []
    backbone, loaded = pretrain.pretrained_base(TINY_MODEL, TINY_PRETRAIN,
                                                cache_dir=tmp_path / "empty", log=lines.append)
    assert loaded["shipped"] and loaded["path"] == str(path)
    assert lines == [f"pretrain: loaded the shipped base {path} (held-out glyph accuracy "
                     f"{recorded['held_out_accuracy']:.4f})"]
    assert not (tmp_path / "empty").exists()
    assert flax.serialization.to_bytes(jax.device_get(backbone)) == path.read_bytes()

    # Damaged shipped bytes are refused, naming the fix.
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(errors.ChecksumError, match=r"python -m atm_jax.pretrain --write-shipped"):
        pretrain.pretrained_base(TINY_MODEL, TINY_PRETRAIN, cache_dir=tmp_path / "empty")


def test_the_package_ships_the_base_of_the_mini_recipe():
    config = recipes.mini()
    resolved = pretrain.resolve_configs(config.model, config.pretrain)
    key = pretrain.cache_key(resolved)
    path = pretrain.SHIPPED / f"{key}.msgpack"
    assert path.exists(), f"no shipped base for configs/mini.py's recipe: {path}"
    raw = path.read_bytes()
    info = json.loads(path.with_suffix(".json").read_text())
    assert info["sha256"] == hashlib.sha256(raw).hexdigest() and info["config"] == resolved
    assert info["held_out_accuracy"] > 0.9  # a usable base, not a placeholder
    backbone, loaded = pretrain.shipped_base(key)
    assert loaded["shipped"] and backbone["patch_embedding"]["kernel"].shape == (7, 7, 1, 128)
    # Only bases of a recipe a config uses ship.
    assert sorted(p.stem for p in pretrain.SHIPPED.glob("*.msgpack")) == [key]
