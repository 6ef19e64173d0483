"""The device mesh (atm_jax.sharding): config checks, param rules on real CLIP/BERT leaf
names, batch padding / process slices, prefetching, and data parallel on 1, 2, 4, 8 fake
devices (tests/conftest.py) giving the single-device numbers."""

import json
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from atm_jax import batching, errors, evaluate, finetune, recipes, runner, schema, sharding, tree
from atm_jax.models import bert, clip
from atm_jax.models.heads import init_head

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_the_session_has_eight_fake_devices():
    assert jax.device_count() == 8 and jax.default_backend() == "cpu"


# -- config.mesh -----------------------------------------------------------------------

def _mini(**mesh):
    config = recipes.tiny(recipes.mini())
    config.mesh = ml_collections.ConfigDict({**config.mesh.to_dict(), **mesh})
    return config


@pytest.mark.parametrize("mesh, message", [
    ({"task": 3}, "config.mesh.task=3 does not divide the 8 device(s) seen"),
    ({"task": 0}, "config.mesh.task=0 must be an integer >= 1"),
    ({"data": 0}, "config.mesh.data=0 must be an integer >= 1 or -1"),
    ({"data": -2}, "config.mesh.data=-2 must be"),
    ({"data": 3}, "task × data = 1 × 3 = 3 does not divide the 8 device(s) seen"),
    ({"task": 4, "data": 4}, "4 × 4 = 16 does not divide the 8 device(s) seen"),
    ({"data": 2.0}, "config.mesh.data=2.0 must be"),
    ({"params": "zero3"}, "config.mesh.params='zero3' must be one of ('replicated', 'fsdp')"),
])
def test_bad_mesh_values_fail_validation_naming_the_devices_and_fix(mesh, message):
    with pytest.raises(errors.ConfigError, match="config.mesh") as info:
        schema.validate_common(_mini(**mesh))
    assert message in str(info.value)


def test_unknown_mesh_field_and_good_meshes():
    config = _mini(model=2)
    with pytest.raises(errors.ConfigError, match=r"config.mesh.model is not a known field"):
        schema.validate_common(config)
    for task, data, shape in ((1, -1, (1, 8)), (2, -1, (2, 4)), (4, 2, (4, 2)), (1, 2, (1, 2)),
                              (8, 1, (8, 1))):
        schema.validate_common(_mini(task=task, data=data))
        assert sharding.mesh_shape({"task": task, "data": data}, 8) == shape
        assert sharding.make_mesh({"task": task, "data": data}).devices.shape == shape
    assert sharding.DEFAULT == {"task": 1, "data": -1, "params": "replicated"}
    # (the tests build configs with data=1: tests/conftest.py one_device_default_mesh)
    assert dict(recipes.mini().mesh) == dict(recipes.paper_config("bert").mesh)
    one = sharding.Placement.of({"task": 1, "data": 1})  # one device: a 1 × 1 mesh
    assert one.mesh.devices.shape == (1, 1) and one.mesh == sharding.Placement.single().mesh


def test_task_meshes_are_disjoint_rows():
    mesh = sharding.make_mesh({"task": 4, "data": 2})
    subs = sharding.task_meshes(mesh)
    ids = [sorted(d.id for d in m.devices.flat) for m in subs]
    assert ids == [[0, 1], [2, 3], [4, 5], [6, 7]]


# -- the param rule table on real leaf paths -------------------------------------------

# By hand from the module docstrings: Flax Dense kernels are [in, out].
_EXPECTED_FSDP = {
    "text/embeddings/token_embedding/embedding": P("data", None),
    "text/embeddings/position_embedding/embedding": P(),
    "text/encoder/layers_0/mlp/fc1/kernel": P(None, "data"),
    "text/encoder/layers_0/mlp/fc2/kernel": P("data", None),
    "text/encoder/layers_0/mlp/fc1/bias": P(),
    "text/encoder/layers_1/self_attn/q_proj/kernel": P(None, "data"),
    "text/encoder/layers_1/self_attn/out_proj/kernel": P("data", None),
    "text/final_layer_norm/scale": P(),
    "text/text_projection/kernel": P(),
    "vision/embeddings/patch_embedding/kernel": P(None, None, None, "data"),
    "vision/embeddings/class_embedding": P(),
    "vision/encoder/layers_1/self_attn/v_proj/kernel": P(None, "data"),
    "logit_scale": P(),
    "embeddings/word_embeddings/embedding": P("data", None),
    "embeddings/token_type_embeddings/embedding": P(),
    "encoder/layer_0/attention/self/key/kernel": P(None, "data"),
    "encoder/layer_0/attention/output/dense/kernel": P("data", None),
    "encoder/layer_0/attention/output/LayerNorm/scale": P(),
    "encoder/layer_1/intermediate/dense/kernel": P(None, "data"),
    "encoder/layer_1/output/dense/kernel": P("data", None),
    "encoder/layer_1/output/dense/bias": P(),
    "pooler/dense/kernel": P(),
}


def _leaves():
    out = {}
    for shapes in (clip.param_shapes(clip.tiny_config()), bert.param_shapes(bert.tiny_config())):
        out.update(zip(tree.leaf_paths(shapes), (x.shape for x in jax.tree.leaves(shapes))))
    return out


def test_fsdp_rules_on_clip_and_bert_leaf_names():
    leaves = _leaves()
    assert set(_EXPECTED_FSDP) <= set(leaves)  # the names are the models' real ones
    for path, expected in _EXPECTED_FSDP.items():
        assert sharding.spec_for(path, leaves[path], sharding.RULES["fsdp"], {"data": 4,
                                                                              "task": 1}) \
            == expected, path
        assert sharding.spec_for(path, leaves[path], sharding.RULES["replicated"],
                                 {"data": 4, "task": 1}) == P()
    # A dimension the axis does not divide stays replicated (1000 rows over 3).
    assert sharding.spec_for("embeddings/word_embeddings/embedding", (1000, 32),
                             sharding.RULES["fsdp"], {"data": 3, "task": 1}) == P()
    # Every fsdp kernel of the tiny models is really split when placed on 8 devices.
    placement = sharding.Placement(sharding.make_mesh({"data": 8}), "fsdp")
    params = bert.init_params(bert.tiny_config(), jax.random.key(0))
    placed = placement.params(params)
    shards = dict(zip(tree.leaf_paths(placed), jax.tree.leaves(placed)))
    kernel = shards["encoder/layer_0/intermediate/dense/kernel"]
    assert kernel.sharding.spec == P(None, "data")
    assert kernel.addressable_shards[0].data.shape == (32, 64 // 8)
    np.testing.assert_array_equal(kernel, dict(zip(tree.leaf_paths(params),
                                                   jax.tree.leaves(params)))[
        "encoder/layer_0/intermediate/dense/kernel"])


# -- batching: padding to the device multiple, process slices, prefetch --------------------

def test_batches_padded_to_the_device_multiple_keep_the_real_rows():
    order = np.random.default_rng(0).permutation(23)
    rows, mask = batching.batch_rows(23, 10, order, multiple=4)
    assert rows.shape == mask.shape == (3, 12)
    # By hand: the real rows of step s are order[10 s: 10 s + 10], then mask-0 padding.
    for s in range(3):
        real = order[10 * s:10 * s + 10]
        np.testing.assert_array_equal(rows[s, :len(real)], real)
        np.testing.assert_array_equal(mask[s], [1.0] * len(real) + [0.0] * (12 - len(real)))
    x = np.arange(23) * 10
    parts = list(batching.padded_batches([x], 10, order, multiple=4, rows=slice(4, 8)))
    np.testing.assert_array_equal(parts[0][0][0], x[order[4:8]])
    np.testing.assert_array_equal(parts[2][1], [0, 0, 0, 0])  # step 2 has 3 real rows: 0..2
    first = list(batching.padded_batches([x], 10, order, multiple=4, rows=slice(0, 4)))
    np.testing.assert_array_equal(first[2][1], [1, 1, 1, 0])
    np.testing.assert_array_equal(first[2][0][0], np.r_[x[order[20:23]], x[0]])
    placement = sharding.Placement(sharding.make_mesh({"data": 8}))
    assert placement.local_rows(16) == slice(0, 16)  # one process holds every row
    with pytest.raises(ValueError, match="multiple=0 is invalid"):
        batching.padded_size(4, 0)


def test_prefetch_keeps_order_raises_where_it_failed_and_stops_when_closed():
    assert list(batching.prefetch(iter(range(50)), depth=3)) == list(range(50))

    def failing():
        yield 1
        raise RuntimeError("boom at item 2")

    stream = batching.prefetch(failing())
    assert next(stream) == 1
    with pytest.raises(RuntimeError, match="boom at item 2"):
        next(stream)
    produced = []

    def endless():
        i = 0
        while True:
            produced.append(i)
            yield i
            i += 1

    stream = batching.prefetch(endless(), depth=2)
    assert [next(stream) for _ in range(3)] == [0, 1, 2]
    stream.close()
    count = len(produced)
    assert count <= 3 + 2 + 1  # consumed + queue + the one in hand
    with pytest.raises(ValueError, match="depth=0"):
        list(batching.prefetch(iter([]), depth=0))


# -- data parallel: 1, 2, 4, 8 devices give the single-device numbers ---------------------

def _mlp(params, x, train):
    return jnp.tanh(x @ params["w"] + params["b"])


def _problem(n=70, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(classes, 6)) * 2
    labels = rng.integers(0, classes, n)
    x = (centers[labels] + rng.normal(size=(n, 6))).astype(np.float32)
    backbone = {"w": jnp.asarray(rng.normal(size=(6, 16)) * 0.5, jnp.float32),
                "b": jnp.zeros(16, jnp.float32)}
    return backbone, init_head(jax.random.key(seed), 16, classes), x, labels


def test_data_parallel_on_1_2_4_8_devices_matches_one_device():
    backbone, head, x, y = _problem(n=46)
    opt = finetune.OptimizerConfig(learning_rate=5e-2, batch_size=12)  # 12: padded on 8 devices
    results = {}
    for data in (1, 2, 4, 8):
        placement = sharding.Placement.of({"task": 1, "data": data})
        ft = finetune.Finetuner(_mlp, opt, train_head=True, placement=placement)
        params, new_head, metrics = ft.finetune(backbone, head, x, y, epochs=2,
                                                key=jax.random.key(1))
        # A second task of the same shapes (another order) reuses the compilation.
        ft.finetune(backbone, head, x[:30], y[:30], epochs=1, key=jax.random.key(2))
        assert ft.train_step._cache_size() == 1
        acc = evaluate.accuracy(_mlp, params, new_head, x, y, batch_size=9, placement=placement)
        results[data] = (np.array(metrics["loss"]), metrics["accuracy"], acc,
                         np.asarray(params["w"]), np.asarray(new_head["kernel"]))
        assert params["w"].sharding.mesh.size == data
    loss1, train_acc1, acc1, w1, k1 = results[1]
    assert acc1 > 0.5  # it learned something, so equal accuracies mean something
    for data in (2, 4, 8):
        loss, train_acc, acc, w, k = results[data]
        # Measured: ≤ 2.4e-7 on the losses and weights (float reduction order only).
        np.testing.assert_allclose(loss, loss1, rtol=2e-6)
        np.testing.assert_allclose(w, w1, atol=2e-6)
        np.testing.assert_allclose(k, k1, atol=2e-6)
        assert train_acc == train_acc1 and acc == acc1


def test_the_one_device_placement_is_bitwise_the_plain_program():
    # The plain single-device program, written here without a mesh: NumPy batches of the
    # epoch's rows fed straight to the jitted step, and an argmax count over all inputs.
    backbone, head, x, y = _problem(n=46)
    opt = finetune.OptimizerConfig(learning_rate=5e-2, batch_size=12)
    ft = finetune.Finetuner(_mlp, opt, train_head=True)
    assert ft.placement.mesh.size == 1
    key = jax.random.key(4)
    params, new_head, metrics = ft.finetune(backbone, head, x, y, epochs=2, key=key)
    state = ft.init_state(jax.tree.map(jnp.array, backbone), jax.tree.map(jnp.array, head))
    losses = []
    for epoch in range(2):
        order = finetune.epoch_order(key, epoch, len(x))
        index, mask = batching.batch_rows(len(x), 12, order, 1)
        for r, m in zip(index, mask):
            batch = {"inputs": x[r], "labels": y[r].astype(np.int32), "mask": m}
            state, m = ft.train_step(state, batch)
            losses.append(float(m["loss"]))
    np.testing.assert_array_equal(np.asarray(params["w"]), np.asarray(state["backbone"]["w"]))
    np.testing.assert_array_equal(np.asarray(new_head["kernel"]),
                                  np.asarray(state["head"]["kernel"]))
    assert params["w"].sharding.mesh.size == 1
    logits = _mlp(state["backbone"], x, False) @ state["head"]["kernel"] + state["head"]["bias"]
    expected = float(np.mean(np.asarray(logits).argmax(-1) == y))
    assert evaluate.accuracy(_mlp, params, new_head, x, y, batch_size=9) == expected
    assert metrics["steps"] == len(losses)


def test_fsdp_params_train_like_replicated():
    backbone, head, x, y = _problem(n=24)
    opt = finetune.OptimizerConfig(learning_rate=3e-2, batch_size=8)
    out = {}
    for mode in ("replicated", "fsdp"):
        placement = sharding.Placement(sharding.make_mesh({"data": 8}), mode)
        placement.rules = ((r"^w$", P(None, "data")), (r".", P())) if mode == "fsdp" else \
            placement.rules
        ft = finetune.Finetuner(_mlp, opt, train_head=False, placement=placement)
        params, _, metrics = ft.finetune(backbone, head, x, y, epochs=1, key=jax.random.key(3))
        out[mode] = (np.asarray(params["w"]), metrics["loss"])
        if mode == "fsdp":
            assert params["w"].sharding.spec == P(None, "data")
    np.testing.assert_allclose(out["fsdp"][0], out["replicated"][0], atol=2e-6)
    np.testing.assert_allclose(out["fsdp"][1], out["replicated"][1], rtol=2e-6)


# -- configs/mini.py:tiny through main on an 8-way data mesh -----------------------------

def test_main_on_tiny_with_task_parallel_on_an_8_device_mesh(fake_cache, tmp_path):
    """configs/mini.py:tiny through main on all 8 fake devices: 2 task groups × 4-way
    data parallel (the numbers vs one device: the unit tests above)."""
    from absl import flags

    from atm_jax import main

    sizes = {"data": {"train_size": 48, "validation_size": 8, "test_size": 16},
             "optimizer": {"batch_size": 8},
             "pretrain": {"num_images": 256, "batch_size": 32, "held_out": 64}}
    workdir = tmp_path / "work"
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["atm_jax.main", f"--config={ROOT / 'configs' / 'mini.py'}:tiny",
                 f"--workdir={workdir}"])
    config = flags.FLAGS["config"].value
    with config.unlocked():
        for section, fields in sizes.items():
            for name, value in fields.items():
                config[section][name] = value
        config.mesh.task, config.mesh.data = 2, 4
        config.tasks = config.tasks[:3]  # 3 tasks on 2 groups: one group idles in round 2
        config.methods = {"atm": config.methods.atm}
        config.methods.atm.iterations = 1  # one round of finetunes, one merge: keep it short
        config.budget = 1
        config.references = ("pretrained",)
    main.main(["atm_jax.main"])
    flags.FLAGS.unparse_flags()
    results = json.loads((workdir / "results.json").read_text())
    assert [r["method"] for r in results["rows"]] == ["pretrained", "atm"]
    assert json.loads((workdir / "config.json").read_text())["mesh"] == {
        "task": 2, "data": 4, "params": "replicated"}
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    tasks = list(config.tasks)
    assert {(m["iteration"], m["task"]) for m in lines if m["method"] == "atm"} == {
        (k, t) for k in range(2) for t in tasks}
    assert [c["iteration"] for c in results["curves"]["atm"]] == [0, 1]
