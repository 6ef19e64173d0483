"""config.model_pool: configs/vit.py and configs/bert.py evaluate and merge given
finetuned Hugging Face checkpoints, one per task, instead of finetuning. The checkpoints
are generated from the :runlocal stand-ins (the tiny random-init base plus seeded noise)
in the published layouts: CLIPModel and FusionBench's CLIPVisionModel folders,
BertModel and BertForSequenceClassification. The merged rows are checked against NumPy
on the noise we drew, the individual rows against our own forward pass of those arrays.
Nothing may be finetuned, and every error names the task, the tensor and the fix."""

from __future__ import annotations

import importlib.util
import pathlib
import types

import flax.serialization
import jax
import numpy as np
import pytest

from atm_jax import errors, evaluate, model_pool, runner, writers
from atm_jax.data import sources
from atm_jax.finetune import Finetuner
from atm_jax.models import bert, clip, hf, zero_shot
from atm_jax.suites import paper as paper_suite

import rehearsal_data

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load(name: str, arg: str):
    spec = importlib.util.spec_from_file_location(f"{name}_config", ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(sources.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(sources.OFFLINE_ENV, "1")
    return tmp_path


def _pool_config(name: str):
    """The :runlocal,pool config with the ``mean`` row alone and no HF export."""
    config = load(name, "runlocal,pool")
    for method in [n for n in config.methods if n != "mean"]:
        del config.methods[method]
    config.export_hf = False
    return config


def _perturbed(tree, seed: int, scale: float = 0.05):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: (np.asarray(a, np.float32) + scale * rng.standard_normal(
        np.shape(a))).astype(np.float32), tree)


def _run(config, workdir, monkeypatch):
    """``run_experiment`` with every finetune refused; (results.json, the run's Setup)."""
    def refuse(*args, **kwargs):
        raise AssertionError("a task was finetuned in a model_pool run")

    monkeypatch.setattr(Finetuner, "finetune", refuse)
    monkeypatch.setattr(Finetuner, "finetune_steps", refuse)
    monkeypatch.setattr(writers, "plot_results", lambda *a, **k: [])  # seconds, tested elsewhere
    built, build = {}, paper_suite.build
    monkeypatch.setattr(paper_suite, "build", lambda c, log: built.setdefault("setup", build(c, log)))
    results = runner.run_experiment(config, workdir, log=lambda *_: None)
    return {r["method"]: r for r in results["rows"]}, built["setup"]


def _numpy_mean_merge(base, finetuned):
    """base + the mean of the task vectors, leaf by leaf in float32."""
    return jax.tree.map(lambda b, *f: (b + np.mean([x - b for x in f], axis=0)).astype(np.float32),
                        base, *finetuned)


def _accuracy(config, setup, backbone, head, task: str) -> float:
    """The test accuracy of ``backbone`` (our arrays, not the loaded ones) with ``head``."""
    return evaluate.accuracy(setup.apply_fn, backbone, head, *setup.tasks[task].test,
                             batch_size=config.eval_batch_size)


def _assert_close(saved, expected):
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(saved), jax.tree.leaves(expected),
                            strict=True):
        np.testing.assert_allclose(np.asarray(a), b, rtol=0, atol=2e-7, err_msg=str(path))


def test_vit_pool_rows_are_the_checkpoints_merged_and_evaluated_without_finetuning(
        cache, monkeypatch):
    config = _pool_config("vit")
    cfg = paper_suite.hf_config(config.model)
    params = clip.init_params(cfg, jax.random.key(config.model.init_seed))  # the runlocal base
    tasks = list(config.tasks)
    finetuned = {t: _perturbed(params["vision"], i) for i, t in enumerate(tasks)}
    root = cache / "pool"
    # A CLIPModel folder whose text tower moved too (the heads must stay the base's), and
    # CLIPVisionModel folders without projection, in transformers 4 (FusionBench) and 5 names.
    hf.export(root / tasks[0], "clip", cfg, {**_perturbed(params, 9), "vision": finetuned[tasks[0]]})
    rehearsal_data.write_clip_vision_model(root / tasks[1], cfg, {**params, "vision": finetuned[tasks[1]]})
    rehearsal_data.write_clip_vision_model(root / tasks[2], cfg, {**params, "vision": finetuned[tasks[2]]},
                                           prefixed=False)
    for t in tasks[1:]:
        finetuned[t]["visual_projection"] = params["vision"]["visual_projection"]
    config.model_pool = str(root / "{task}")
    rows, setup = _run(config, cache / "work", monkeypatch)
    assert list(rows) == ["pretrained", "individual", "mean"]
    assert rows["individual"]["epochs"] == rows["mean"]["epochs"] == 0
    saved = flax.serialization.msgpack_restore((cache / "work" / "params" / "mean.msgpack").read_bytes())
    _assert_close(saved, _numpy_mean_merge(params["vision"], list(finetuned.values())))
    for t in tasks:
        assert rows["individual"]["accuracy"][t] == _accuracy(config, setup, finetuned[t],
                                                              setup.heads[t], t)


def test_bert_pool_takes_each_checkpoints_classifier_else_the_recipe_head(cache):
    """The BERT side of the pool (prefix, layouts, heads) as configs/bert.py builds it;
    the runner's use of a pool is the same for every model (the ViT test above)."""
    config = _pool_config("bert")
    cfg = paper_suite.hf_config(config.model)
    params = bert.init_params(cfg, jax.random.key(config.model.init_seed))
    tasks = list(config.tasks)  # keyword_sentiment, keyword_topic (3 classes), keyword_pair
    finetuned = {t: _perturbed(params, 20 + i) for i, t in enumerate(tasks)}
    rng = np.random.default_rng(5)
    heads = {t: {"kernel": rng.standard_normal((cfg["hidden_size"], c)).astype(np.float32),
                 "bias": rng.standard_normal(c).astype(np.float32)}
             for t, c in ((tasks[1], 3), (tasks[2], 2))}
    root = cache / "pool"
    hf.export(root / tasks[0], "bert", cfg, finetuned[tasks[0]])  # a BertModel: no classifier
    for t in tasks[1:]:
        rehearsal_data.write_bert_classifier(root / f"{t}_classifier", cfg, finetuned[t], heads[t])
    config.model_pool = {tasks[0]: str(root / tasks[0]),
                         **{t: str(root / f"{t}_classifier") for t in tasks[1:]}}
    runner.validate(config)
    setup = paper_suite.build(config, lambda *_: None)
    # No classifier in the checkpoint: the recipe's frozen random head (seed, task index).
    heads[tasks[0]] = zero_shot.glue_head(jax.random.fold_in(jax.random.key(config.head_seed), 0),
                                          cfg["hidden_size"], 2)
    assert list(setup.model_pool) == tasks
    for t in tasks:
        for a, b in zip(jax.tree.leaves(setup.model_pool[t]), jax.tree.leaves(finetuned[t]),
                        strict=True):
            np.testing.assert_array_equal(np.asarray(a), b)
        for leaf in ("kernel", "bias"):
            np.testing.assert_array_equal(np.asarray(setup.heads[t][leaf]), np.asarray(heads[t][leaf]))


@pytest.mark.parametrize("pool,message", [
    ("/ckpts/all", r"names no task: give a template with \{task\}"),
    ("/ckpts/{task}_{seed}", r"\{task\} is the only placeholder"),
    ({"glyph_digits": "/a", "glyph_upper": "/b"}, r"no checkpoint for task\(s\) \['glyph_lower'\]"),
    ({"glyph_digits": "/a", "glyph_upper": "/b", "glyph_lower": "/c", "glyph_greek": "/d"},
     r"names task\(s\) \['glyph_greek'\] that config.tasks"),
    ("/no/such/{task}", r"task 'glyph_digits': /no/such/glyph_digits is not a folder"),
    (3, r"must be a template with \{task\} or a mapping"),
])
def test_pool_forms_are_checked_before_anything_loads(pool, message):
    config = load("vit", "runlocal,pool")
    config.model_pool = pool
    with pytest.raises(errors.ConfigError, match=message):
        runner.validate(config)


def test_rows_that_would_train_are_refused_with_a_pool():
    config = load("vit", "runlocal")
    config.model_pool = "/ckpts/{task}"
    with pytest.raises(errors.ConfigError, match=r"atm, valft_atm would train.*':pool' argument"):
        runner.validate(config)


@pytest.fixture(scope="module")
def tiny_clip():
    cfg = paper_suite.hf_config(load("vit", "runlocal").model)
    return cfg, clip.init_params(cfg, jax.random.key(0))


def _load(config, pool, base, tasks=None):
    config.model_pool = pool
    return model_pool.load(config, base, {}, tasks or {}, lambda *_: None)


def test_checkpoints_unlike_the_base_name_the_task_the_tensor_and_the_fix(tmp_path, tiny_clip):
    cfg, params = tiny_clip
    config = load("vit", "runlocal,pool")
    good = hf.export(tmp_path / "good", "clip", cfg, params)
    other = clip.tiny_config(vision_config={"patch_size": 16})
    rehearsal_data.write_clip_vision_model(tmp_path / "b16", other, clip.init_params(other, jax.random.key(1)))
    rehearsal_data.write_clip_vision_model(tmp_path / "damaged", cfg, params,
                                           drop=("vision_model.post_layernorm.weight",))
    hf.export(tmp_path / "bert", "bert", bert.tiny_config("bert"),
              bert.init_params(bert.tiny_config("bert"), jax.random.key(0)))
    for folder, error, message in [
            ("b16", errors.WeightsMismatchError,
             r"task 'glyph_upper' .*b16\): 2 tensor\(s\) do not have the base's shapes:\n"
             r"  vision_model.embeddings.patch_embedding.weight: the checkpoint has \(32, 3, 16, 16\), "
             r"the base \(32, 3, 8, 8\)(.|\n)*finetunes of config.model.weights"),
            ("damaged", errors.WeightsMismatchError,
             r"task 'glyph_upper' .*: 1 tensor\(s\) of the base are missing:\n"
             r"  vision_model.post_layernorm.weight"),
            ("bert", errors.WeightsMismatchError, r"task 'glyph_upper' .* holds a 'bert' model")]:
        pool = {"glyph_digits": str(good), "glyph_upper": str(tmp_path / folder),
                "glyph_lower": str(good)}
        with pytest.raises(error, match=message):
            _load(config, pool, params["vision"])


def test_hub_ids_offline_name_the_task_and_the_download_command(cache, tiny_clip):
    config = load("vit", "runlocal,pool")
    with pytest.raises(errors.HubUnavailableError,
                       match=r"task 'glyph_digits': could not fetch 'atm-jax-tests/absent_glyph_digits'"
                             r"(.|\n)*huggingface-cli download atm-jax-tests/absent_glyph_digits"):
        _load(config, "atm-jax-tests/absent_{task}", tiny_clip[1]["vision"])


def test_text_heads_of_another_label_set_or_layout_are_refused(tmp_path):
    cfg = bert.tiny_config("bert")
    params = bert.init_params(cfg, jax.random.key(0))
    config = load("bert", "runlocal,pool")
    width = cfg["hidden_size"]
    five = {"kernel": np.zeros((width, 5), np.float32), "bias": np.zeros(5, np.float32)}
    rehearsal_data.write_bert_classifier(tmp_path / "five", cfg, params, five)
    roberta_style = rehearsal_data.write_bert_classifier(tmp_path / "two", cfg, params, {
        "kernel": np.zeros((width, 2), np.float32), "bias": np.zeros(2, np.float32)})
    from safetensors.numpy import load_file, save_file

    tensors = load_file(roberta_style / "model.safetensors")
    tensors["classifier.out_proj.weight"] = tensors.pop("classifier.weight")
    save_file(tensors, roberta_style / "model.safetensors")
    tasks = {t: types.SimpleNamespace(num_classes=2) for t in config.tasks}
    head = {"kernel": np.zeros((width, 2), np.float32)}
    for folder, message in [
            ("five", r"task 'keyword_sentiment' .*classifier.weight is \(5, 32\).*2 classes"),
            ("two", r"task 'keyword_sentiment' .*classifier.out_proj.weight\) is not one linear")]:
        config.model_pool = {t: str(tmp_path / folder) for t in config.tasks}
        with pytest.raises(errors.WeightsMismatchError, match=message):
            model_pool.load(config, params, {t: head for t in config.tasks}, tasks, lambda *_: None)
