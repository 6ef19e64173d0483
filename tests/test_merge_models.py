"""atm_jax.merge_models: mergekit-style YAML in, one merged HF checkpoint out.

Checkpoints are a tiny random-init BERT (transformers) and finetuned copies made by
adding noise; every merged tensor is compared with NumPy written from the methods'
equations (task arithmetic, linear, TIES per tensor, SLERP), and the folder is loaded
back by transformers.
"""

from __future__ import annotations

import json
import shutil

import ml_dtypes
import numpy as np
import pytest
import yaml

from atm_jax import merge_models

safetensors_numpy = pytest.importorskip("safetensors.numpy")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

MODELS = 3


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """A base BERT and three finetuned copies; returns (root, base tensors, model tensors)."""
    root = tmp_path_factory.mktemp("pool")
    config = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=24,
                                     max_position_embeddings=12)
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(root / "base")
    base = safetensors_numpy.load_file(root / "base" / "model.safetensors")
    rng = np.random.default_rng(0)
    models = []
    for i in range(MODELS):
        tensors = {k: (v + 0.05 * rng.standard_normal(v.shape).astype(v.dtype)
                       if v.dtype.kind == "f" else v) for k, v in base.items()}
        folder = root / f"ft{i}"
        folder.mkdir()
        safetensors_numpy.save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        shutil.copyfile(root / "base" / "config.json", folder / "config.json")
        models.append(tensors)
    (root / "base" / "vocab.txt").write_text("\n".join(f"tok{i}" for i in range(40)) + "\n")
    return root, base, models


def _yaml(root, method, parameters=None, weights=None, **extra):
    config = {"merge_method": method, "base_model": str(root / "base"),
              "models": [{"model": str(root / f"ft{i}"),
                          **({"parameters": {"weight": weights[i]}} if weights else {})}
                         for i in range(MODELS)], **extra}
    if parameters:
        config["parameters"] = parameters
    path = root / f"{method}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _read(folder):
    index = folder / merge_models.INDEX
    if index.exists():
        shards = set(json.loads(index.read_text())["weight_map"].values())
    else:
        shards = {"model.safetensors"}
    out = {}
    for shard in shards:
        out.update(safetensors_numpy.load_file(folder / shard))
    return out


def _ties_tensor(taus, density):
    """TIES on one tensor from the paper: keep each task's top-density magnitudes, elect
    the sign of the kept sum, average the kept entries that agree with it."""
    flat = taus.reshape(len(taus), -1)
    keep = max(1, int(np.ceil(density * flat.shape[1])))
    trimmed = np.zeros_like(flat)
    for t, row in enumerate(flat):
        top = np.argsort(-np.abs(row), kind="stable")[:keep]
        trimmed[t, top] = row[top]
    sign = np.sign(trimmed.sum(0))
    agree = (np.sign(trimmed) == sign) & (trimmed != 0)
    count = agree.sum(0)
    merged = np.where(count > 0, (trimmed * agree).sum(0) / np.maximum(count, 1), 0.0)
    return merged.reshape(taus.shape[1:])


def test_task_arithmetic_and_linear_match_numpy_and_load_in_transformers(pool, tmp_path):
    root, base, models = pool
    weights = [0.5, 1.0, 2.0]
    out = merge_models.merge_checkpoints(
        _yaml(root, "task_arithmetic", {"lambda": 0.3}, weights), tmp_path / "ta", progress=False)
    got = _read(out)
    assert set(got) == set(base)
    for name, b in base.items():
        if b.dtype.kind != "f":
            np.testing.assert_array_equal(got[name], b)
            continue
        want = b.astype(np.float64) + 0.3 * sum(
            w * (m[name].astype(np.float64) - b) for w, m in zip(weights, models))
        np.testing.assert_allclose(got[name], want, rtol=0, atol=3e-7 * np.abs(want).max() + 1e-7)
    loaded = transformers.AutoModel.from_pretrained(out)
    state = loaded.state_dict()
    name = "encoder.layer.1.attention.self.query.weight"
    np.testing.assert_array_equal(state[name].numpy(), got[name])
    assert (out / "vocab.txt").read_text() == (root / "base" / "vocab.txt").read_text()
    assert "merge_method: task_arithmetic" in (out / "README.md").read_text()

    out = merge_models.merge_checkpoints(_yaml(root, "linear", weights=weights),
                                         tmp_path / "linear", progress=False)
    got = _read(out)
    name = "encoder.layer.0.intermediate.dense.weight"
    want = sum(w * m[name].astype(np.float64) for w, m in zip(weights, models)) / sum(weights)
    np.testing.assert_allclose(got[name], want, rtol=0, atol=3e-7 * np.abs(want).max())


def test_ties_is_per_tensor_and_matches_numpy_in_small_shards(pool, tmp_path):
    root, base, models = pool
    out = merge_models.merge_checkpoints(_yaml(root, "ties", {"density": 0.3}), tmp_path / "ties",
                                         max_shard_bytes=4000, progress=False)
    index = json.loads((out / merge_models.INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and shards[0].endswith(f"-of-{len(shards):05d}.safetensors")
    got = _read(out)
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in got.values())
    for name, b in base.items():
        if b.dtype.kind != "f":
            continue
        taus = np.stack([m[name] - b for m in models])
        want = b + _ties_tensor(taus, 0.3)
        np.testing.assert_allclose(got[name], want, rtol=0, atol=2e-7 * np.abs(want).max(),
                                   err_msg=name)
    # The sharded folder loads in transformers.
    state = transformers.AutoModel.from_pretrained(out).state_dict()
    np.testing.assert_array_equal(state["pooler.dense.weight"].numpy(), got["pooler.dense.weight"])


def test_slerp_puts_the_base_first_and_bfloat16_rounds_once(pool, tmp_path):
    root, base, models = pool
    config = {"merge_method": "slerp", "base_model": str(root / "ft1"), "dtype": "bfloat16",
              "models": [{"model": str(root / "ft0")}, {"model": str(root / "ft1")}],
              "parameters": {"t": 0.25}}
    out = merge_models.merge_checkpoints(config, tmp_path / "slerp", progress=False)
    got = merge_models.Checkpoint(str(out))
    name = "encoder.layer.0.output.dense.weight"
    v0, v1 = models[1][name].astype(np.float64).ravel(), models[0][name].astype(np.float64).ravel()
    omega = np.arccos(v0 @ v1 / np.linalg.norm(v0) / np.linalg.norm(v1))
    want = (np.sin(0.75 * omega) * v0 + np.sin(0.25 * omega) * v1) / np.sin(omega)
    merged = got.get(name)
    assert merged.dtype == ml_dtypes.bfloat16
    rounded = want.astype(np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)
    # One rounding from (nearly) the exact float32 value: at most one bf16 step apart.
    step = np.abs(rounded) * 2.0**-7
    assert np.all(np.abs(merged.astype(np.float32).ravel() - rounded) <= step + 1e-12)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_an_interrupted_merge_leaves_nothing_behind(pool, tmp_path, monkeypatch):
    root, _, _ = pool
    calls = []
    add = merge_models.ShardWriter.add

    def failing(self, name, array):
        calls.append(name)
        if len(calls) == 5:
            raise RuntimeError("interrupted")
        add(self, name, array)

    monkeypatch.setattr(merge_models.ShardWriter, "add", failing)
    with pytest.raises(RuntimeError, match="interrupted"):
        merge_models.merge_checkpoints(_yaml(root, "ties"), tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("edit,message", [
    (lambda c: c.update(slices=[]), r"unsupported key 'slices'"),
    (lambda c: c["models"][0].update(layer_range=[0, 2]), r"models\[0\]: unsupported key 'layer_range'"),
    (lambda c: c.update(merge_method="frankenmerge"), r"merge_method='frankenmerge'.*choose one of"),
    (lambda c: c.pop("base_model"), r"needs base_model"),
    (lambda c: c.update(parameters={"scope": "tensor"}), r"scope='tensor': choose leaf"),
    (lambda c: c["models"][1].update(parameters={"weight": 2.0}), r"takes no per-model weights"),
    (lambda c: c.update(parameters={"density": 1.5}), r"density"),
    (lambda c: c.update(dtype="int8"), r"dtype='int8'"),
    (lambda c: c.update(parameters={"normalize": False, "aggregate": "mean"}),
     r"normalize=False means aggregate='sum'"),
    (lambda c: c.update(merge_method="tsv", parameters={"normalize": True}), r"tsv has no normalize"),
])
def test_bad_configs_are_refused_naming_the_key(pool, edit, message):
    root, _, _ = pool
    config = yaml.safe_load(_yaml(root, "ties").read_text())
    edit(config)
    with pytest.raises(merge_models.MergeConfigError, match=message):
        merge_models.read_config(config)


def test_missing_models_and_mismatched_tensors_name_the_culprit(pool, tmp_path, capsys):
    root, base, _ = pool
    config = yaml.safe_load(_yaml(root, "ties").read_text())
    config["models"][2]["model"] = str(tmp_path / "nowhere")
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    assert merge_models.main([str(path), str(tmp_path / "out"), "--no-progress"]) == 2
    assert "nowhere is not a folder" in capsys.readouterr().err

    resized = tmp_path / "resized"
    resized.mkdir()
    tensors = dict(base)
    name = "embeddings.word_embeddings.weight"
    tensors[name] = np.zeros((41, tensors[name].shape[1]), np.float32)
    safetensors_numpy.save_file(tensors, resized / "model.safetensors")
    config["models"][2]["model"] = str(resized)
    with pytest.raises(merge_models.MergeConfigError, match=rf"tensor '{name}': shape \(41, 16\)"):
        merge_models.merge_checkpoints(config, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------
# Whole-model merges out of core: equal to the in-memory merge of all tensors.


def _in_memory(base, models, method, scale=1.0, **hparams):
    """The registry merge of every floating tensor at once, in memory, as base + λ·δ."""
    import jax

    from atm_jax import merge

    names = [n for n, b in base.items() if b.dtype.kind == "f"]
    tree = {n: np.stack([m[n].astype(np.float32) - base[n].astype(np.float32) for m in models])
            for n in names}
    delta = merge.get(method)(tree, **hparams)
    return {n: base[n].astype(np.float32) + scale * np.asarray(jax.device_get(delta[n])) for n in names}


@pytest.mark.parametrize("method,parameters,chunk", [
    ("ties", {"density": 0.3, "scope": "model", "lambda": 0.7}, None),
    ("ties", {"density": 0.3, "scope": "leaf"}, 100),  # tensors merged in padded chunks
    ("breadcrumbs", {"beta": 0.3, "gamma": 0.9, "scope": "model"}, 100),
    ("ties_atm_code", {"density": 0.2}, None),
])
def test_whole_model_thresholds_out_of_core_equal_the_in_memory_merge(pool, tmp_path, monkeypatch,
                                                                      method, parameters, chunk):
    from atm_jax.merge import streamed

    if chunk is not None:
        monkeypatch.setattr(streamed, "CHUNK", chunk)
    root, base, models = pool
    out = merge_models.merge_checkpoints(_yaml(root, method, parameters), tmp_path / "out",
                                         max_shard_bytes=4000, progress=False)
    got = _read(out)
    hparams = {k: v for k, v in parameters.items() if k != "lambda"}
    want = _in_memory(base, models, method, parameters.get("lambda", 1.0), **hparams)
    for name, w in want.items():
        np.testing.assert_array_equal(got[name], w, err_msg=name)
    if method == "ties" and parameters["scope"] == "model":  # and not per tensor: some differ
        leaf = _in_memory(base, models, method, 0.7, density=0.3, scope="leaf")
        assert any(not np.array_equal(leaf[n], want[n]) for n in want)


def _write(folder, tensors, order=None):
    """A checkpoint folder; ``order`` splits it into one shard per tensor, in that order."""
    folder.mkdir()
    if order is None:
        safetensors_numpy.save_file(tensors, folder / "model.safetensors")
        return folder
    weight_map = {}
    for i, name in enumerate(order):
        shard = f"model-{i:05d}.safetensors"
        safetensors_numpy.save_file({name: tensors[name]}, folder / shard)
        weight_map[name] = shard
    (folder / merge_models.INDEX).write_text(json.dumps({"weight_map": weight_map}))
    return folder


@pytest.mark.parametrize("shard_bytes", [1 << 20, 8], ids=["pending", "flushed"])
def test_the_zero_mass_sign_is_decided_over_the_whole_model(tmp_path, shard_bytes):
    # Tensor a: entry 0 cancels exactly (1 and -1), entry 1 elects +: a's own majority is +.
    # Tensor b: two entries elect -: over the model the majority is -, so a[0] = -1 (the
    # official rule), where a per-tensor rule would give +1.
    base = {"a": np.zeros(2, np.float32), "b": np.zeros(2, np.float32)}
    models = [{"a": np.array([1.0, 5.0], np.float32), "b": np.array([-2.0, -3.0], np.float32)},
              {"a": np.array([-1.0, 5.0], np.float32), "b": np.array([-2.0, -3.0], np.float32)}]
    config = {"merge_method": "ties", "base_model": str(_write(tmp_path / "base", base)),
              "models": [{"model": str(_write(tmp_path / f"m{i}", m))} for i, m in enumerate(models)],
              "parameters": {"density": 1.0}}
    got = _read(merge_models.merge_checkpoints(config, tmp_path / "out", progress=False,
                                               max_shard_bytes=shard_bytes))
    np.testing.assert_array_equal(got["a"], [-1.0, 5.0])
    np.testing.assert_array_equal(got["b"], [-2.0, -3.0])
    want = _in_memory(base, models, "ties", density=1.0, scope="leaf")
    np.testing.assert_array_equal(want["a"], got["a"])


@pytest.mark.parametrize("method", ["dare_ties", "ties"])
def test_streamed_merges_do_not_depend_on_the_tensor_order(pool, tmp_path, method):
    root, base, models = pool
    parameters = {"density": 0.5, "seed": 3} if method == "dare_ties" else {"density": 0.3,
                                                                            "scope": "model"}
    config = yaml.safe_load(_yaml(root, method, parameters).read_text())
    first = _read(merge_models.merge_checkpoints(config, tmp_path / "a", progress=False))
    order = sorted(base, reverse=True)
    config["base_model"] = str(_write(tmp_path / "base_reversed", base, order))
    for i, m in enumerate(models):
        config["models"][i]["model"] = str(_write(tmp_path / f"ft{i}_reversed", m, order[::2] +
                                                  order[1::2]))
    second = _read(merge_models.merge_checkpoints(config, tmp_path / "b", progress=False))
    assert set(first) == set(second)
    for name in first:
        np.testing.assert_array_equal(first[name], second[name], err_msg=name)


def test_a_merged_checkpoint_gives_the_in_memory_merges_forward_pass(pool, tmp_path):
    root, base, models = pool
    out = merge_models.merge_checkpoints(_yaml(root, "ties", {"density": 0.3, "scope": "model"}),
                                         tmp_path / "out", progress=False)
    want = _in_memory(base, models, "ties", density=0.3, scope="model")
    reference = transformers.BertModel(transformers.BertConfig.from_pretrained(root / "base"))
    state = {n: torch.from_numpy(w) for n, w in want.items()}
    missing, unexpected = reference.load_state_dict(state, strict=False)
    assert not unexpected and all("position_ids" in n for n in missing)
    loaded = transformers.AutoModel.from_pretrained(out)
    ids = torch.tensor([[1, 5, 9, 3, 0], [2, 7, 7, 4, 8]])
    with torch.no_grad():
        a = loaded.eval()(input_ids=ids).last_hidden_state.numpy()
        b = reference.eval()(input_ids=ids).last_hidden_state.numpy()
    np.testing.assert_array_equal(a, b)


def test_integer_buffers_come_from_the_base_even_when_a_model_lacks_them(tmp_path):
    ids = np.arange(6, dtype=np.int64).reshape(1, 6)
    base = {"w": np.zeros(4, np.float32), "position_ids": ids}
    models = [{"w": np.full(4, 1.0, np.float32)}, {"w": np.full(4, 3.0, np.float32),
                                                   "position_ids": ids + 1}]
    config = {"merge_method": "mean", "base_model": str(_write(tmp_path / "base", base)),
              "models": [{"model": str(_write(tmp_path / f"m{i}", m))} for i, m in enumerate(models)]}
    got = _read(merge_models.merge_checkpoints(config, tmp_path / "out", progress=False))
    np.testing.assert_array_equal(got["position_ids"], ids)
    np.testing.assert_array_equal(got["w"], np.full(4, 2.0, np.float32))
    with pytest.raises(merge_models.MergeConfigError, match=r"has no tensor 'w'"):
        merge_models.merge_checkpoints({**config, "models": [
            {"model": str(_write(tmp_path / "m_empty", {"x": np.zeros(1, np.float32)}))}]},
            tmp_path / "out2", progress=False)


def _adapter(folder, modules, rank, alpha, seed):
    """A PEFT LoRA adapter folder over the pool's BERT; returns {base tensor: dense ΔW}."""
    rng = np.random.default_rng(seed)
    folder.mkdir()
    tensors, dense = {}, {}
    for module, (out_dim, in_dim) in modules.items():
        a = rng.standard_normal((rank, in_dim)).astype(np.float32)
        b = 0.1 * rng.standard_normal((out_dim, rank)).astype(np.float32)
        tensors[f"base_model.model.{module}.lora_A.weight"] = a
        tensors[f"base_model.model.{module}.lora_B.weight"] = b
        dense[f"{module}.weight"] = (alpha / rank) * (b.astype(np.float64) @ a.astype(np.float64))
    safetensors_numpy.save_file(tensors, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": ["query", "value"],
         "base_model_name_or_path": "tiny-bert"}))
    return dense


def test_lora_adapters_merge_as_their_dense_task_vectors(pool, tmp_path):
    root, base, models = pool
    modules = {"encoder.layer.0.attention.self.query": (16, 16),
               "encoder.layer.1.attention.self.value": (16, 16)}
    dense = [_adapter(tmp_path / f"lora{i}", modules, rank=2, alpha=8, seed=i) for i in range(2)]
    config = {"merge_method": "task_arithmetic", "base_model": str(root / "base"),
              "models": [{"model": str(tmp_path / "lora0")}, {"model": str(tmp_path / "lora1")},
                         {"model": str(root / "ft0")}], "parameters": {"lambda": 0.5}}
    got = _read(merge_models.merge_checkpoints(config, tmp_path / "out", progress=False))
    for name, b in base.items():
        if b.dtype.kind != "f":
            continue
        tau = sum(d.get(name, 0.0) for d in dense) + (models[0][name].astype(np.float64) - b)
        want = b.astype(np.float64) + 0.5 * tau
        np.testing.assert_allclose(got[name], want, rtol=0, atol=4e-7 * np.abs(want).max(),
                                   err_msg=name)
    # Whole-model TIES over adapters: equal to the in-memory merge of the dense vectors.
    config = {**config, "merge_method": "ties", "parameters": {"density": 0.3, "scope": "model"}}
    got = _read(merge_models.merge_checkpoints(config, tmp_path / "ties", progress=False))
    dense_models = [{n: (b + d[n]).astype(np.float32) if n in d else b for n, b in base.items()}
                    for d in dense]
    want = _in_memory(base, [*dense_models, models[0]], "ties", density=0.3, scope="model")
    for name in modules:
        name = f"{name}.weight"
        # The reference's task vectors are (θ + ΔW) − θ in float32: one rounding each.
        np.testing.assert_allclose(got[name], want[name], rtol=0,
                                   atol=2.4e-7 * np.abs(want[name]).max(), err_msg=name)
    with pytest.raises(merge_models.MergeConfigError, match=r"models\[0\]: .*lora0 is a LoRA "
                       r"adapter; give base_model.*\(tiny-bert, says"):
        merge_models.merge_checkpoints({**config, "merge_method": "linear", "base_model": None,
                                        "parameters": {}}, tmp_path / "bad", progress=False)


def test_weighted_averages_never_import_jax(pool, tmp_path):
    # linear / task_arithmetic are NumPy only: JAX's import alone costs ≈1 s a merge.
    import subprocess
    import sys

    root, _, _ = pool
    script = ("import sys\nfrom atm_jax import merge_models\n"
              f"merge_models.main([{str(_yaml(root, 'task_arithmetic'))!r}, "
              f"{str(tmp_path / 'out')!r}, '--no-progress'])\n"
              "assert 'jax' not in sys.modules, sorted(m for m in sys.modules if 'jax' in m)[:5]\n")
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_bfloat16_widens_exactly_for_every_bit_pattern():
    from atm_jax import hf_folders

    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    x = bits.view(ml_dtypes.bfloat16)
    got = hf_folders.as_float32(x)
    want = x.astype(np.float32)  # ml_dtypes' cast
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan) and nan.sum() == 254
    np.testing.assert_array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))
    out = np.empty(x.shape, np.float32)
    assert hf_folders.as_float32(x, out) is out
