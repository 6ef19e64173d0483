"""Tests of the tiny ViT and the linear heads."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from atm_jax.models.heads import apply_head, init_head
from atm_jax.models.vit_tiny import ViT, vit_from_config


def _assert_plain_dicts(tree):
    assert type(tree) is dict
    for value in tree.values():
        if isinstance(value, dict):
            _assert_plain_dicts(value)
        else:
            assert isinstance(value, jax.Array), type(value)


def test_vit_shapes_and_param_count():
    # eval_shape traces without compiling: the default model's shapes cost no time.
    model = ViT()
    variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    assert list(variables) == ["params"]  # no dropout / BatchNorm collections
    count = sum(x.size for x in jax.tree.leaves(variables))
    print(f"ViT parameters: {count:,}")
    assert 750_000 < count < 850_000
    features = jax.eval_shape(model.apply, variables, jnp.zeros((3, 28, 28, 1)))
    assert features.shape == (3, 128) and features.dtype == jnp.float32


def test_vit_params_are_plain_dicts_and_train_mode_changes_nothing():
    model = ViT(width=32, depth=1, num_heads=2, mlp_dim=64)
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    _assert_plain_dicts(variables)
    images = jax.random.uniform(jax.random.key(1), (3, 28, 28, 1))
    # One compile for both modes.
    features, train_features = jax.jit(
        lambda v, x: (model.apply(v, x), model.apply(v, x, train=True)))(variables, images)
    assert features.shape == (3, 32)
    # No dropout: train mode is the same function.
    np.testing.assert_array_equal(features, train_features)


def test_vit_from_config_accepts_dict_and_configdict_and_ignores_name():
    fields = dict(name="vit_tiny", patch_size=4, width=32, depth=2, num_heads=2, mlp_dim=64)
    for cfg in (fields, ml_collections.ConfigDict(fields)):
        model = vit_from_config(cfg)
        assert (model.patch_size, model.width, model.depth, model.num_heads,
                model.mlp_dim) == (4, 32, 2, 2, 64)
    params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 28, 28, 1)))["params"]
    assert sorted(k for k in params if k.startswith("block_")) == ["block_0", "block_1"]
    assert params["position_embedding"].shape == (1, 7 * 7 + 1, 32)
    assert vit_from_config({}) == ViT()


def test_vit_config_errors():
    with pytest.raises(ValueError, match="unknown ViT config fields.*'dropout'"):
        vit_from_config({"dropout": 0.1})
    with pytest.raises(ValueError, match="patch_size=5"):
        jax.eval_shape(ViT(patch_size=5).init, jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    with pytest.raises(ValueError, match="num_heads=3"):
        jax.eval_shape(ViT(num_heads=3).init, jax.random.key(0), jnp.zeros((1, 28, 28, 1)))


def test_vit_is_a_linen_module_with_contract_defaults():
    assert issubclass(ViT, nn.Module)
    model = ViT()
    assert (model.patch_size, model.width, model.depth, model.num_heads,
            model.mlp_dim) == (7, 128, 4, 4, 512)


def test_head_init_and_apply_match_numpy():
    head = init_head(jax.random.key(0), 16, 5)
    assert set(head) == {"kernel", "bias"}
    assert head["kernel"].shape == (16, 5) and head["bias"].shape == (5,)
    np.testing.assert_array_equal(head["bias"], 0.0)
    # LeCun normal, by hand: a standard normal draw from the key over sqrt(fan_in).
    expected = jax.random.normal(jax.random.key(0), (16, 5), jnp.float32) / 4.0
    np.testing.assert_allclose(head["kernel"], expected, rtol=1e-6, atol=0)
    features = np.random.default_rng(0).normal(size=(4, 16)).astype(np.float32)
    head = {"kernel": head["kernel"], "bias": jnp.arange(5, dtype=jnp.float32)}
    expected = features @ np.asarray(head["kernel"]) + np.arange(5)
    np.testing.assert_allclose(apply_head(head, features), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="num_classes=0"):
        init_head(jax.random.key(0), 16, 0)
