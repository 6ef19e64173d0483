"""atm_jax.lora: PEFT LoRA adapter folders as task vectors.

Every folder is written here with safetensors + json in PEFT's key format, and every
expected ΔW is NumPy written from LoRA's equation (scaling · B @ A, scaling = α / r or
α / √r) or by hand; no torch or peft. (A one-off check against peft's own
merge_and_unload() on real BERT / Llama / GPT-2 / conv adapters agreed bitwise.)
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from atm_jax import lora

P = "base_model.model."


def _adapter(tmp_path, tensors, name="adapter", **config):
    folder = tmp_path / name
    folder.mkdir()
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4,
              "base_model_name_or_path": "tiny/base", **config}
    (folder / lora.CONFIG).write_text(json.dumps(config))
    save_file({k: np.asarray(v, np.float32) for k, v in tensors.items()}, folder / lora.WEIGHTS,
              metadata={"format": "pt"})
    return lora.Adapter(folder)


def _factors(module, r, out, inp, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((r, inp)).astype(np.float32)
    b = rng.standard_normal((out, r)).astype(np.float32)
    return {f"{P}{module}.lora_A.weight": a, f"{P}{module}.lora_B.weight": b}, a, b


def test_hand_computed_delta(tmp_path):
    # r = 1, α = 3: scaling 3; ΔW = 3 · [1, −2]ᵀ [1, 0, 2]. The adapter name ".default"
    # between factor and ".weight" is read too.
    adapter = _adapter(tmp_path, {f"{P}encoder.q.lora_A.default.weight": [[1, 0, 2]],
                                  f"{P}encoder.q.lora_B.default.weight": [[1], [-2]]},
                       r=1, lora_alpha=3)
    assert lora.is_adapter(adapter.folder) and adapter.base_model == "tiny/base"
    base = ["encoder.q.weight", "encoder.q.bias", "encoder.k.weight"]
    assert adapter.resolve(base) == {"encoder.q.weight": "encoder.q"}
    np.testing.assert_array_equal(adapter.delta("encoder.q.weight", (2, 3)),
                                  [[3, 0, 6], [-6, 0, -12]])
    np.testing.assert_array_equal(adapter.task_vector("encoder.k.weight", np.ones((3, 3))),
                                  np.zeros((3, 3)))
    assert dict(adapter.replaced) == {}


@pytest.mark.parametrize("rslora", [False, True])
def test_scaling_with_rank_and_alpha_patterns(tmp_path, rslora):
    q0, a0, b0 = _factors("model.layers.0.self_attn.q_proj", 4, 6, 5, seed=1)
    q1, a1, b1 = _factors("model.layers.1.self_attn.q_proj", 4, 6, 5, seed=2)
    v0, a2, b2 = _factors("model.layers.0.self_attn.v_proj", 2, 3, 5, seed=3)
    adapter = _adapter(tmp_path, {**q0, **q1, **v0}, r=4, lora_alpha=8, use_rslora=rslora,
                       rank_pattern={"^model.layers.0.self_attn.v_proj": 2},
                       alpha_pattern={"proj": 100, "layers.1.self_attn.q_proj": 2})
    names = [f"model.layers.{i}.self_attn.{m}.weight"
             for i in (0, 1) for m in ("q_proj", "v_proj")]
    adapter.resolve(names)
    # PEFT matches a pattern as a whole dotted suffix ("proj" is not one of "q_proj"):
    # α / r: 8 / 4, 2 / 4, 8 / 2; rsLoRA α / √r: 8 / 2, 2 / 2, 8 / √2.
    scalings = [4.0, 1.0, 8 / np.sqrt(2)] if rslora else [2.0, 0.5, 4.0]
    for name, a, b, s in [(names[0], a0, b0, scalings[0]), (names[2], a1, b1, scalings[1]),
                          (names[1], a2, b2, scalings[2])]:
        np.testing.assert_allclose(adapter.delta(name, b.shape[:1] + a.shape[1:]), s * (b @ a),
                                   rtol=1e-6, atol=1e-6)
    assert not adapter.task_vector(names[3], np.zeros((3, 5))).any()


def test_a_rank_the_patterns_do_not_explain_is_refused(tmp_path):
    tensors, _, _ = _factors("layer.v", 4, 3, 3)
    adapter = _adapter(tmp_path, tensors, r=4, rank_pattern={"v": 2})
    adapter.resolve(["layer.v.weight"])
    with pytest.raises(lora.AdapterError, match=r"r=2 .* rank 4"):
        adapter.delta("layer.v.weight", (3, 3))


def test_fan_in_fan_out_gives_the_transpose(tmp_path):
    # GPT-2's Conv1D stores c_attn as [in, out] = [4, 6].
    tensors, a, b = _factors("transformer.h.0.attn.c_attn", 2, 6, 4)
    name = "transformer.h.0.attn.c_attn.weight"
    adapter = _adapter(tmp_path, tensors, fan_in_fan_out=True)
    adapter.resolve([name])
    np.testing.assert_allclose(adapter.delta(name, (4, 6)), 2.0 * (b @ a).T,
                               rtol=1e-6, atol=1e-6)
    plain = _adapter(tmp_path, tensors, name="plain")
    plain.resolve([name])
    with pytest.raises(lora.AdapterError,
                       match=r"c_attn.weight.*\(6, 4\).*\(4, 6\).*fan_in_fan_out"):
        plain.delta(name, (4, 6))


def test_embedding_lora_and_a_saved_embedding_layer(tmp_path):
    # lora_embedding_A [r, vocab], _B [dim, r]: ΔW = scaling · (B @ A)ᵀ of shape [vocab, dim].
    rng = np.random.default_rng(4)
    a, b = rng.standard_normal((2, 7)), rng.standard_normal((3, 2))
    base = rng.standard_normal((7, 3)).astype(np.float32)
    adapter = _adapter(tmp_path, {f"{P}model.embed_tokens.lora_embedding_A": a,
                                  f"{P}model.embed_tokens.lora_embedding_B": b,
                                  f"{P}model.embed_tokens.base_layer.weight": base + 1})
    name = "model.embed_tokens.weight"
    assert adapter.resolve([name, "lm_head.weight"]) == {name: "model.embed_tokens"}
    expected = 2.0 * (b @ a).T.astype(np.float32)
    np.testing.assert_allclose(adapter.delta(name, (7, 3)), expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(adapter.replaced[name], base + 1)
    np.testing.assert_allclose(adapter.task_vector(name, base), 1 + expected, rtol=1e-6, atol=1e-6)


def test_lora_bias_and_convolutions(tmp_path):
    rng = np.random.default_rng(5)
    a = rng.standard_normal((2, 3, 3, 3)).astype(np.float32)   # [r, in, kh, kw]
    b = rng.standard_normal((4, 2, 1, 1)).astype(np.float32)   # [out, r, 1, 1]
    bias = rng.standard_normal(4).astype(np.float32)
    adapter = _adapter(tmp_path, {f"{P}conv.lora_A.weight": a, f"{P}conv.lora_B.weight": b,
                                  f"{P}conv.lora_B.bias": bias}, lora_alpha=3)
    assert adapter.resolve(["conv.weight", "conv.bias"]) == {
        "conv.weight": "conv", "conv.bias": f"{P}conv.lora_B.bias"}
    np.testing.assert_allclose(adapter.delta("conv.weight", (4, 3, 3, 3)),
                               1.5 * np.einsum("or,rikl->oikl", b[:, :, 0, 0], a),
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(adapter.delta("conv.bias", (4,)), 1.5 * bias, rtol=1e-6)


@pytest.mark.parametrize("module, base", [
    ("bert.encoder.layer.0.attention.self.query", "encoder.layer.0.attention.self.query.weight"),
    ("encoder.layer.0.attention.self.query", "bert.encoder.layer.0.attention.self.query.weight"),
    ("model.layers.0.mlp.down_proj", "model.layers.0.mlp.down_proj.weight"),
])
def test_a_model_prefix_on_one_side_only(tmp_path, module, base):
    tensors, a, b = _factors(module, 2, 3, 3)
    adapter = _adapter(tmp_path, tensors)
    others = [base.replace("0", "1"), base.replace(".weight", ".bias"), "pooler.dense.weight"]
    assert adapter.resolve([base, *others]) == {base: module}
    np.testing.assert_allclose(adapter.delta(base, (3, 3)), 2.0 * (b @ a), rtol=1e-6, atol=1e-6)


def test_a_module_matching_several_tensors_or_none_is_refused(tmp_path):
    layers = [f"encoder.layer.{i}.attention.self.query.weight" for i in (0, 1)]
    adapter = _adapter(tmp_path, _factors("attention.self.query", 2, 3, 3)[0])
    with pytest.raises(lora.AdapterError, match=r"attention\.self\.query\.lora_A\.weight.*2 \("):
        adapter.resolve(layers)
    lost = _adapter(tmp_path, _factors("decoder.layer.0.q", 2, 3, 3)[0], name="lost")
    with pytest.raises(lora.AdapterError, match=r"decoder\.layer\.0\.q\.lora_A\.weight.*none"):
        lost.resolve(layers)
    # A name equal to the module's wins over a longer one ending with it.
    exact = _adapter(tmp_path, _factors("encoder.layer.0.attention.self.query", 2, 3, 3)[0],
                     name="exact")
    assert exact.resolve([layers[0], "bert." + layers[0]]) == {layers[0]: layers[0][:-7]}


def test_dora_is_refused_by_name(tmp_path):
    tensors = {**_factors("q", 2, 3, 3)[0], f"{P}q.lora_magnitude_vector": np.ones(3)}
    with pytest.raises(lora.AdapterError, match=r"q\.lora_magnitude_vector.*DoRA"):
        _adapter(tmp_path, tensors)
    with pytest.raises(lora.AdapterError, match=r"use_dora=True: DoRA"):
        _adapter(tmp_path, _factors("q", 2, 3, 3)[0], name="flagged", use_dora=True)


def test_a_shape_mismatch_names_the_tensor_and_both_shapes(tmp_path):
    adapter = _adapter(tmp_path, _factors("encoder.q", 2, 5, 3)[0])
    adapter.resolve(["encoder.q.weight"])
    with pytest.raises(lora.AdapterError, match=r"'encoder\.q\.weight'.*\(5, 3\).*\(5, 4\)"):
        adapter.delta("encoder.q.weight", (5, 4))


def test_modules_to_save_enter_as_saved_minus_base(tmp_path):
    head = np.arange(6, dtype=np.float32).reshape(2, 3)
    tensors = {**_factors("bert.encoder.q", 2, 3, 3)[0], f"{P}classifier.weight": head}
    adapter = _adapter(tmp_path, tensors)
    assert adapter.resolve(["bert.encoder.q.weight", "classifier.weight"])["classifier.weight"] \
        == f"{P}classifier.weight"
    np.testing.assert_array_equal(adapter.task_vector("classifier.weight", np.ones((2, 3))),
                                  head - 1)
    with pytest.raises(lora.AdapterError, match="full tensor: see replaced"):
        adapter.delta("classifier.weight", (2, 3))
    with pytest.warns(UserWarning, match="no tensor for base_model.model.classifier.weight"):
        adapter.resolve(["encoder.q.weight"])  # a headless base
    assert adapter.unmatched == [f"{P}classifier.weight"] and dict(adapter.replaced) == {}


@pytest.mark.parametrize("config, extra, message", [
    ({"peft_type": "IA3"}, {}, "peft_type='IA3'"),
    ({"init_lora_weights": "pissa_niter_4"}, {}, "pissa_niter_4.*path_initial_model"),
    ({"target_parameters": ["experts.down_proj"]}, {}, "target_parameters"),
    ({}, {f"{P}q.lora_E": np.ones(2)}, r"q\.lora_E.*not a LoRA factor"),
    ({}, {f"{P}k.lora_A.other.weight": np.ones((2, 3)),
          f"{P}k.lora_B.other.weight": np.ones((3, 2))},
     r"several adapters \(\['None', 'other'\]\)"),
    ({}, {f"{P}k.lora_A.weight": np.ones((2, 3))}, r"k\.lora_A\.weight.*no lora_A / lora_B"),
])
def test_refusals_name_what_is_refused(tmp_path, config, extra, message):
    with pytest.raises(lora.AdapterError, match=message):
        _adapter(tmp_path, {**_factors("q", 2, 3, 3)[0], **extra}, **config)


def test_resolve_comes_first_and_a_folder_must_be_an_adapter(tmp_path):
    adapter = _adapter(tmp_path, _factors("q", 2, 3, 3)[0])
    with pytest.raises(lora.AdapterError, match="resolve"):
        adapter.delta("q.weight", (3, 3))
    (tmp_path / "model").mkdir()
    assert not lora.is_adapter(tmp_path / "model")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        lora.Adapter(tmp_path / "model")
