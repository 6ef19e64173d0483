"""configs/vit.py, roberta.py, bert.py: the paper's recipe field by field (REFERENCE §4),
their :runlocal shrinks end to end through `python -m atm_jax.main`, and their errors."""

from __future__ import annotations

import importlib.util
import json
import pathlib

import flax.serialization
import jax
import numpy as np
import pytest

from atm_jax import errors, merge, runner, schema
from atm_jax.data import sources, tfds_source

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"


def load(name: str, arg=None):
    spec = importlib.util.spec_from_file_location(f"{name}_config", ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


# REFERENCE §4, written out here independently of atm_jax/recipes.py.
VISION = ("cifar100", "dtd", "eurosat", "gtsrb", "mnist", "resisc45", "svhn")
GLUE = ("cola", "sst2", "mrpc", "qqp", "mnli", "qnli", "rte")


def _common_recipe(config):
    assert config.seed == 0
    opt = config.optimizer
    assert (opt.name, opt.learning_rate, opt.weight_decay, opt.batch_size, opt.grad_clip,
            opt.schedule) == ("adam", 1e-5, 0.0, 32, 10.0, "constant")
    assert config.budget == 10  # baselines: each task finetuned 10 epochs
    atm = config.methods.atm
    assert (atm.kind, atm.merge, atm.alpha, atm.iterations, atm.split) == ("atm", "mean", 1.0, 10, "train")
    assert config.budget // atm.iterations == 1  # K = 10 × 1 epoch
    one_shot = {n: config.methods[n] for n in config.methods if config.methods[n].kind == "one_shot"}
    assert one_shot["mean"].merge == "mean"
    assert one_shot["ties"].merge == "ties" and one_shot["ties"].merge_kwargs.density == 0.15
    crumbs = one_shot["breadcrumbs"].merge_kwargs
    assert one_shot["breadcrumbs"].merge == "breadcrumbs" and (crumbs.beta, crumbs.gamma) == (0.85, 0.993)
    for spec in one_shot.values():  # mean aggregation (the default, not overridden), scale 1
        assert spec.alpha == 1.0
        assert "aggregate" not in spec.merge_kwargs
        assert merge.info(spec.merge).defaults.get("aggregate", "mean") == "mean"
    data = config.data
    assert (data.validation_fraction, data.validation_cap) == (0.1, 5000)  # 90/10, cap 5000
    assert (data.source, data.train_size, data.test_size) == ("tfds", 0, 0)  # all data
    assert config.merge_include == () and config.merge_exclude == ()
    assert "individual" in config.references  # the normalized-accuracy denominator
    runner.validate(config)  # no network: hub weights are checked when loaded


def test_vit_is_the_papers_vision_recipe():
    config = load("vit")
    _common_recipe(config)
    assert config.tasks == VISION
    assert (config.model.name, config.model.weights) == ("clip", "openai/clip-vit-base-patch16")
    assert config.heads == "zero_shot" and "pretrained" in config.references  # zero-shot row
    assert config.data.augment is True  # RandomResizedCrop 0.9–1.0, bicubic
    assert {n for n in config.methods} == {"mean", "ties", "breadcrumbs", "valft_atm", "atm"}
    assert config.methods.valft_atm.split == "validation" and config.methods.valft_atm.iterations == 10


@pytest.mark.parametrize("name,weights", [("roberta", "FacebookAI/roberta-base"),
                                          ("bert", "google-bert/bert-base-uncased")])
def test_nlp_configs_are_the_papers_glue_recipe(name, weights):
    config = load(name)
    _common_recipe(config)
    assert config.tasks == GLUE
    assert (config.model.name, config.model.weights) == (name, weights)
    assert config.heads == "frozen_random" and config.head_seed == 0
    assert config.data.max_length == 128 and config.data.augment is False
    assert config.methods.dare.merge == "dare" and config.methods.dare.merge_kwargs.p == 0.9
    assert {n for n in config.methods} == {"mean", "ties", "breadcrumbs", "dare", "atm"}


@pytest.mark.parametrize("name,arg", [("mini", None), ("mini", "analysis"), ("mini_text", None),
                                      ("vit", "analysis"), ("bert", None), ("roberta", "analysis")])
def test_the_task_arithmetic_rows_are_named_mean_like_their_merge(name, arg):
    # merge.task_arithmetic is the sum; the configs' task arithmetic row is the mean.
    config = load(name, arg)
    rows = list(config.methods)
    assert "mean" in rows and not any("task_arithmetic" in r for r in rows)
    assert (config.methods.mean.kind, config.methods.mean.merge) == ("one_shot", "mean")
    assert schema.method_order(config)[0] == "mean"
    if arg == "analysis":
        assert config.methods.mean_tuned.merge == "mean" and config.methods.mean_tuned.tune_alpha
        assert config.methods.valft_atm_authors.start == "mean"
        assert schema.method_order(config).index("mean_tuned") < schema.method_order(
            config).index("ties_tuned")


def test_config_argument_is_checked():
    with pytest.raises(ValueError, match="takes no argument or 'runlocal'"):
        load("vit", "tiny")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(sources.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(sources.OFFLINE_ENV, "1")
    return tmp_path


@pytest.fixture(scope="module")
def runlocal_root(tmp_path_factory):
    return tmp_path_factory.mktemp("runlocal")


@pytest.fixture
def runlocal(runlocal_root, monkeypatch):
    """``main`` on ``configs/<name>.py:runlocal``, once per name for this module (the
    export test reads the BERT run's folder instead of finetuning BERT again); returns
    the workdir, with the run's offline cache set for the test."""
    monkeypatch.setenv(sources.CACHE_ENV, str(runlocal_root / "cache"))
    monkeypatch.setenv(sources.OFFLINE_ENV, "1")

    def run(name: str) -> pathlib.Path:
        workdir = runlocal_root / name
        if not (workdir / "results.json").exists():
            _main(f"{ROOT / 'configs' / name}.py:runlocal", workdir)
        return workdir

    return run


def _main(config_arg: str, workdir: pathlib.Path) -> None:
    from absl import flags

    from atm_jax import main

    flags.FLAGS.unparse_flags()
    try:
        flags.FLAGS(["atm_jax.main", f"--config={config_arg}", f"--workdir={workdir}"])
        main.main(["atm_jax.main"])
    finally:
        flags.FLAGS.unparse_flags()


# RoBERTa's runlocal takes BERT's code path through main (the text suite, the encoder
# family, the export); its model and export are checked in test_hf_models.
@pytest.mark.parametrize("name", ["vit", "bert"])
def test_runlocal_runs_main_end_to_end(name, runlocal):
    from atm_jax.models import hf

    workdir = runlocal(name)
    config = load(name, "runlocal")
    results = json.loads((workdir / "results.json").read_text())
    methods = [r["method"] for r in results["rows"]]
    assert methods == ["pretrained", "individual", *schema.method_order(config)]
    for row in results["rows"]:
        assert set(row["accuracy"]) == set(config.tasks)
        assert all(0.0 <= a <= 1.0 for a in row["accuracy"].values())
    assert [c["iteration"] for c in results["curves"]["atm"]] == [0, 1, 2]
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    keys = [(r["method"], r["iteration"], r["task"]) for r in map(json.loads, lines)]
    assert len(keys) == len(set(keys))
    # The merged backbone went out as a Hugging Face folder that reads back exactly.
    saved = flax.serialization.msgpack_restore((workdir / "params" / "atm.msgpack").read_bytes())
    exported = hf.load(workdir / "hf" / "atm")
    backbone = exported.params["vision"] if name == "vit" else exported.params
    for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(backbone), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    if name == "vit":
        # Only the image encoder merges: the exported text tower is the initial one.
        pretrained = hf.load(workdir / "hf" / "mean").params["text"]
        for a, b in zip(jax.tree.leaves(pretrained), jax.tree.leaves(exported.params["text"])):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        # A finished run started again resumes at its end and rewrites the same table.
        before = (workdir / "results.md").read_text().split("- Seed")[0]
        _main(f"{ROOT / 'configs' / name}.py:runlocal", workdir)
        assert (workdir / "results.md").read_text().split("- Seed")[0] == before


def test_exported_runlocal_bert_loads_in_transformers(runlocal):
    torch = pytest.importorskip("torch")
    import transformers

    from atm_jax.suites import paper as paper_suite

    config = load("bert", "runlocal")
    workdir = runlocal("bert")
    model = transformers.AutoModel.from_pretrained(workdir / "hf" / "atm").eval()
    s = paper_suite.build(config, lambda *_: None)
    tokens = s.tasks["keyword_pair"].test[0][:4]
    merged = flax.serialization.msgpack_restore((workdir / "params" / "atm.msgpack").read_bytes())
    ours = np.asarray(s.apply_fn(merged, tokens, False))
    with torch.no_grad():
        theirs = model(input_ids=torch.tensor(tokens[:, 0], dtype=torch.long),
                       attention_mask=torch.tensor(tokens[:, 1], dtype=torch.long),
                       token_type_ids=torch.tensor(tokens[:, 2], dtype=torch.long)).pooler_output
    np.testing.assert_allclose(ours, theirs.numpy(), atol=5e-7)  # 10x the 5.4e-8 measured


def test_missing_tfds_dataset_fails_fast_with_the_prepare_command(cache, monkeypatch):
    from atm_jax.suites import paper as paper_suite

    config = load("vit")
    with config.unlocked():
        config.tasks = ("mnist", "svhn")
        config.data.data_dir = str(cache / "empty_tfds")
        config.model.weights = str(FIXTURES / "clip")

    def no_weights(*args, **kwargs):
        raise AssertionError("weights were loaded before the data was found missing")

    monkeypatch.setattr(paper_suite, "_weights", no_weights)
    with pytest.raises(tfds_source.DatasetNotPreparedError) as info:
        runner.run_experiment(config, cache / "work", log=lambda *_: None)
    assert "python -m atm_jax.data.prepare tfds" in str(info.value)


@pytest.mark.parametrize("edit,message", [
    (lambda c: setattr(c, "heads", "frozen_random"), r"config.heads='frozen_random': model 'clip' uses 'zero_shot'"),
    (lambda c: setattr(c, "tasks", ("cifar100", "cola")), r"unknown task 'cola' for model 'clip'"),
    (lambda c: setattr(c.model, "name", "gpt2"), r"config.model.name='gpt2' must be one of"),
    (lambda c: setattr(c.data, "source", "s3"), r"config.data.source='s3' must be one of"),
    (lambda c: setattr(c.model, "weights", ""), r"random init is for smoke runs on local data only"),
    (lambda c: setattr(c.model, "weights", str(ROOT / "tests")), r"is a folder without config.json"),
    (lambda c: setattr(c.data, "validation_fraction", 1.5), r"validation_fraction=1.5 must be in"),
    (lambda c: setattr(c.data, "max_length", 0), r"config.data.max_length=0"),
    (lambda c: setattr(c.data, "train_size", 8), r"batch_size=32 is larger than config.data.train_size=8"),
    (lambda c: c.data.__setitem__("resolution", 224), r"config.data.resolution is not a known field"),
    (lambda c: c.__setitem__("pretrain", {}), r"config.pretrain is not a known field"),
    (lambda c: setattr(c, "suite", "glue"), r"config.suite='glue' must be one of"),
])
def test_paper_config_errors_name_field_and_fix(edit, message):
    config = load("vit")
    with config.unlocked():
        edit(config)
    with pytest.raises(errors.ConfigError, match=message):
        runner.validate(config)


def test_gtsrb_without_its_image_folder_fails_fast_naming_the_folder(cache, monkeypatch):
    from atm_jax.suites import paper as paper_suite
    from atm_jax.data.image_folder import ImageFolderError

    config = load("vit")
    with config.unlocked():
        config.tasks = ("gtsrb",)
        config.data.folder = str(cache / "folders")
    monkeypatch.setattr(paper_suite, "_weights", lambda *a, **k: pytest.fail("weights loaded first"))
    with pytest.raises(ImageFolderError, match=str(cache / "folders" / "gtsrb")):
        runner.run_experiment(config, cache / "work", log=lambda *_: None)


def test_weights_of_another_family_are_refused(cache):
    config = load("bert", "runlocal")
    with config.unlocked():
        config.model.weights = str(FIXTURES / "roberta")
    with pytest.raises(errors.ConfigError, match="holds a roberta model but config.model.name='bert'"):
        runner.run_experiment(config, cache / "work", log=lambda *_: None)
