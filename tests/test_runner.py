"""configs/mini.py, config validation, the runner's units and `python -m atm_jax.main` end to end."""

import importlib.util
import json
import pathlib
import shutil

import ml_collections
import pytest

from atm_jax import errors, runner, schema


ROOT = pathlib.Path(__file__).resolve().parents[1]


def _get_config(arg=None):
    spec = importlib.util.spec_from_file_location("mini_config", ROOT / "configs" / "mini.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


# configs/mini.py:tiny, shrunk further to fit the fake sources.
_FAKE_SIZES = {"data": {"train_size": 48, "validation_size": 8, "test_size": 16},
               "optimizer": {"batch_size": 8},
               "pretrain": {"num_images": 256, "batch_size": 32, "held_out": 64}}


def _shrink(config):
    with config.unlocked():
        for section, fields in _FAKE_SIZES.items():
            for name, value in fields.items():
                config[section][name] = value
    return config


def _tiny_config():
    return _shrink(_get_config("tiny"))


def test_paper_protocol_fields_of_mini():
    config = _get_config()
    runner.validate(config)
    assert config.budget == 10
    assert config.methods.atm.iterations == 10 and config.methods.atm.split == "train"
    assert config.methods.valft_atm.split == "validation"
    assert config.methods.ties.merge_kwargs.density == 0.15
    assert (config.methods.breadcrumbs.merge_kwargs.beta,
            config.methods.breadcrumbs.merge_kwargs.gamma) == (0.85, 0.993)
    assert config.methods.dare.merge_kwargs.p == 0.9
    assert all(config.methods[m].alpha == 1.0 for m in config.methods)
    assert {config.methods[m].merge for m in config.methods} == {"mean", "ties", "breadcrumbs", "dare"}
    assert schema.method_order(config) == ["mean", "ties", "breadcrumbs", "dare",
                                               "valft_atm", "atm"]


@pytest.mark.parametrize("edit,field", [
    (lambda c: setattr(c, "tasks", ("mnist", "cifar10")), "config.tasks has unknown task 'cifar10'"),
    (lambda c: setattr(c, "tasks", ()), "config.tasks is empty"),
    (lambda c: setattr(c, "budget", 0), "config.budget=0"),
    (lambda c: setattr(c.methods.atm, "iterations", 0), "config.methods.atm.iterations=0"),
    (lambda c: setattr(c.methods.atm, "iterations", 3), "iterations=3 does not divide config.budget=10"),
    (lambda c: setattr(c.methods.ties, "merge", "tie"), "config.methods.ties: Unknown merge 'tie'"),
    (lambda c: setattr(c.methods.atm, "split", "test"), "config.methods.atm.split='test'"),
    (lambda c: setattr(c.methods.atm, "alpha", -1.0), "config.methods.atm: alpha=-1.0"),
    (lambda c: setattr(c, "heads", "random"), "config.heads='random'"),
    (lambda c: setattr(c.optimizer, "learning_rate", -1.0), "config.optimizer: .*learning_rate"),
    (lambda c: setattr(c.data, "test_size", -5), "config.data.test_size=-5"),
    (lambda c: setattr(c.optimizer, "batch_size", 1000), "batch_size=1000 is larger than"),
    (lambda c: setattr(c.methods.dare.merge_kwargs, "p", 1.0), "config.methods.dare: p=1.0"),
    (lambda c: setattr(c.pretrain, "warmup_steps", 10**9), "config.pretrain: .*warmup_steps"),
    (lambda c: setattr(c.pretrain, "num_images", 0), "config.pretrain: .*num_images=0"),
    (lambda c: setattr(c, "tasks", ("mnist", "mnist")), r"config.tasks=\('mnist', 'mnist'\) names a task twice"),
    (lambda c: setattr(c, "progress", "yes"), "config.progress='yes' must be True or False"),
    (lambda c: setattr(c, "save_params", 1), "config.save_params=1 must be True or False"),
    (lambda c: setattr(c, "remat", "no"), "config.remat='no' must be True or False"),
    (lambda c: setattr(c, "precision", "float16"), "config.precision='float16' must be one of"),
    (lambda c: setattr(c, "methods", {"atm": c.methods.atm}),
     "config.references has 'individual' but no one_shot method"),
    (lambda c: setattr(c, "methods", {}), "config.methods is empty"),
    (lambda c: setattr(c, "resume", "maybe"), "config.resume='maybe' must be one of"),
    (lambda c: setattr(c.checkpoint, "keep", 1), "config.checkpoint.keep=1 must be at least 2"),
    (lambda c: setattr(c, "seed", -1), "config.seed=-1 must be an integer >= 0"),
    (lambda c: c.__setitem__("budgett", 3), r"config.budgett is not a known field"),
    (lambda c: c.optimizer.__setitem__("lr", 3), r"config.optimizer.lr is not a known field"),
    (lambda c: c.methods.atm.__setitem__("iters", 3), r"config.methods.atm.iters is not a known field"),
])
def test_bad_configs_fail_before_any_compute(edit, field, monkeypatch, tmp_path):
    # Not type-safe, as a config built in code may be (the command line refuses wrong types).
    config = ml_collections.ConfigDict(_get_config().to_dict(), type_safe=False)
    edit(config)

    def no_data(*args, **kwargs):
        raise AssertionError("data was loaded before the config was validated")

    monkeypatch.setattr("atm_jax.data.load_task", no_data)
    with pytest.raises(errors.ConfigError, match=field):
        runner.run_experiment(config, tmp_path / "work")
    assert not (tmp_path / "work").exists()


def test_main_rejects_misspelt_override_on_the_command_line(tmp_path):
    from absl import flags

    from atm_jax import main  # noqa: F401 - defines --config

    flags.FLAGS.unparse_flags()
    with pytest.raises(flags.UnrecognizedFlagError, match="budgett"):
        flags.FLAGS(["atm_jax.main", f"--config={ROOT / 'configs' / 'mini.py'}",
                     "--config.budgett=3", f"--workdir={tmp_path}"])
    flags.FLAGS.unparse_flags()


@pytest.mark.parametrize("edit,message", [
    (lambda c: setattr(c, "merge_exclude", ("^hed/",)), r"merge_exclude pattern '\^hed/' matches no"),
    (lambda c: setattr(c, "merge_include", ("[",)), "config.merge_include / config.merge_exclude: Invalid"),
    (lambda c: setattr(c, "merge_include", ("block_0",)) or setattr(c, "merge_exclude", ("block_0",)),
     "leave no backbone leaf"),
    (lambda c: setattr(c.model, "name", "clip"), "config.model.name='clip'"),
    (lambda c: c.methods.ties.merge_kwargs.__setattr__("method", "sort"), "method='sort'"),
    (lambda c: c.methods.dare.merge_kwargs.__setattr__("method", "host"), "no hyperparameter 'method'"),
])
def test_filters_model_and_merge_options_are_validated(edit, message):
    config = _get_config()
    with config.unlocked():
        edit(config)
    with pytest.raises(errors.ConfigError, match=message):
        runner.validate(config)


def test_main_end_to_end_on_tiny_data(fake_cache, tmp_path):
    from absl import flags

    from atm_jax import main

    config = _tiny_config()
    workdir = tmp_path / "work"
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["atm_jax.main", f"--config={ROOT / 'configs' / 'mini.py'}:tiny",
                 f"--workdir={workdir}"])
    _shrink(flags.FLAGS["config"].value)
    main.main(["atm_jax.main"])
    flags.FLAGS.unparse_flags()

    results = json.loads((workdir / "results.json").read_text())
    methods = [r["method"] for r in results["rows"]]
    assert methods == ["pretrained", "linear_probe", "individual", "mean", "ties",
                       "breadcrumbs", "dare", "valft_atm", "atm"]
    tasks = list(config.tasks)
    for row in results["rows"]:
        assert set(row["accuracy"]) == set(tasks)
        assert all(0.0 <= a <= 1.0 for a in row["accuracy"].values())
        assert row["epochs"] == (0 if row["method"] == "pretrained" else config.budget)
    # Normalized accuracy by hand: each task's accuracy over the individual model's.
    individual = next(r for r in results["rows"] if r["method"] == "individual")["accuracy"]
    for row in results["rows"]:
        by_hand = sum(row["accuracy"][t] / individual[t] for t in tasks) / len(tasks)
        assert row["normalized"] == pytest.approx(by_hand, rel=1e-12), row["method"]
    assert [c["iteration"] for c in results["curves"]["atm"]] == [0, 1, 2]

    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    keys = [(m["method"], m["iteration"], m["task"]) for m in lines]
    assert len(keys) == len(set(keys)), "duplicate metrics records"
    atm_keys = {(it, t) for (m, it, t) in keys if m == "atm"}
    assert atm_keys == {(it, t) for it in range(3) for t in tasks}
    table = (workdir / "results.md").read_text()
    assert "| atm | 2 |" in table and "pretrained by this project" in table
    for name in ("config.json", "accuracy_vs_iteration.png", "per_task_accuracy_vs_iteration.png",
                 "per_task_bars.png"):
        assert (workdir / name).stat().st_size > 0
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["data"]["train_size"] == 48


def _atm_only(config, **fields):
    with config.unlocked():
        config.methods = {"atm": config.methods.atm}
        config.references = ()
        for name, value in fields.items():
            config[name] = value
    return config


_ATM_ONLY = {}  # the tiny ATM-only run, made once for this module


@pytest.fixture(scope="module")
def atm_only_root(tmp_path_factory):
    return tmp_path_factory.mktemp("atm_only")


@pytest.fixture
def atm_only_run(fake_cache, atm_only_root):
    """``(results, workdir)`` of the tiny ATM-only run (frozen heads), run once for the
    tests here that only read it; a test that writes into it copies the workdir."""
    if not _ATM_ONLY:
        workdir = atm_only_root / "work"
        _ATM_ONLY["run"] = (runner.run_experiment(_atm_only(_tiny_config()), workdir,
                                                  log=lambda *_: None), workdir)
    return _ATM_ONLY["run"]


def test_same_config_same_numbers(atm_only_run, tmp_path):
    first, _ = atm_only_run
    second = runner.run_experiment(_atm_only(_tiny_config()), tmp_path / "b", log=lambda *_: None)
    assert first["rows"] == second["rows"]
    assert first["curves"] == second["curves"]


def test_eval_every_skips_evaluations_and_later_iterations_compile_nothing(fake_cache, tmp_path):
    import logging

    import jax

    config = _atm_only(_tiny_config(), budget=3, eval_every=2)
    with config.unlocked():
        config.methods.atm.iterations = 3
    events = []

    class Compiles(logging.Handler):
        def emit(self, record):
            if record.getMessage().startswith("Compiling "):
                events.append(("compile", record.getMessage()))

    handler = Compiles(logging.WARNING)
    logging.getLogger("jax").addHandler(handler)
    try:
        with jax.log_compiles(True):
            out = runner.run_experiment(config, tmp_path / "work",
                                        log=lambda msg: events.append(("log", msg)))
    finally:
        logging.getLogger("jax").removeHandler(handler)
    # Iteration 1 compiled the finetune step, the merge and its diagnostics (evaluation
    # compiled for iteration 0): iterations 2 and 3 (with an evaluation) compile nothing.
    second = events.index(("log", "[atm] iteration 2/3"))
    assert any(kind == "compile" for kind, _ in events[:second])
    assert [m for kind, m in events[second:] if kind == "compile"] == []
    assert [h["iteration"] for h in out["curves"]["atm"]] == [0, 2, 3]
    assert out["rows"][-1]["accuracy"] == out["curves"]["atm"][-1]["accuracy"]
    lines = [json.loads(line) for line in (tmp_path / "work" / "metrics.jsonl").read_text().splitlines()]
    evaluated = sorted({line["iteration"] for line in lines if "accuracy" in line})
    assert evaluated == [0, 2, 3]
    # Every iteration writes its train losses, evaluated or not (iteration 1 is not).
    tasks = sorted({line["task"] for line in lines})
    losses = {(line["iteration"], line["task"]) for line in lines
              if line.get("train_loss") is not None}
    assert losses == {(k, t) for k in (1, 2, 3) for t in tasks}
    skipped = [line for line in lines if line["iteration"] == 1]
    assert skipped and all("accuracy" not in line and line["task_vector_norm"] > 0
                           for line in skipped)
    assert any("evaluated every 2 iterations" in note for note in out["notes"])
    assert (tmp_path / "work" / "accuracy_vs_iteration.png").stat().st_size > 0


def test_valft_trains_on_the_validation_split_and_save_params_off_writes_none(
        fake_cache, tmp_path, monkeypatch):
    from atm_jax.finetune import Finetuner

    config = _tiny_config()
    with config.unlocked():
        config.methods = {"ties": config.methods.ties, "valft_atm": config.methods.valft_atm}
        config.references = ()
        config.save_params = False
    sizes = []
    original = Finetuner.finetune

    def spy(self, backbone, head, inputs, labels, **kwargs):
        sizes.append(len(labels))
        return original(self, backbone, head, inputs, labels, **kwargs)

    monkeypatch.setattr(Finetuner, "finetune", spy)
    runner.run_experiment(config, tmp_path / "work", log=lambda *_: None)
    train, validation = config.data.train_size, config.data.validation_size
    tasks = len(config.tasks)
    # one-shot: every task on its training split; valFT ATM: 2 iterations on validation.
    assert sizes == [train] * tasks + [validation] * (2 * tasks)
    assert not (tmp_path / "work" / "params").exists()


def test_trainable_heads_are_checkpointed_and_resumed_exactly(atm_only_run, tmp_path, monkeypatch):
    from atm_jax import atm

    config = _atm_only(_tiny_config(), heads="trainable")
    quiet = lambda *_: None  # noqa: E731
    whole = runner.run_experiment(config, tmp_path / "whole", log=quiet)
    # Stop the same run at the merge of iteration 2, after every task's finetune of that
    # iteration was checkpointed (an exception, as a kill would), then start it again.
    calls = {"n": 0}
    original = atm.merge_step

    def stop_at_second_merge(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("stopped")
        return original(*args, **kwargs)

    monkeypatch.setattr(atm, "merge_step", stop_at_second_merge)
    with pytest.raises(KeyboardInterrupt):
        runner.run_experiment(config, tmp_path / "split", log=quiet)
    monkeypatch.setattr(atm, "merge_step", original)
    lines = []
    resumed = runner.run_experiment(config, tmp_path / "split", log=lines.append)
    done = f"in atm, after the start; 1 merge(s) done; {len(config.tasks)} task finetune(s) done"
    assert any(done in line for line in lines), lines[:3]
    assert resumed["rows"] == whole["rows"] and resumed["curves"] == whole["curves"]
    assert (tmp_path / "split" / "params" / "atm.msgpack").read_bytes() == \
        (tmp_path / "whole" / "params" / "atm.msgpack").read_bytes()
    # The heads really trained and were carried: the carried run differs from frozen heads.
    frozen, _ = atm_only_run
    assert frozen["curves"]["atm"][-1]["accuracy"] != whole["curves"]["atm"][-1]["accuracy"]


def test_precision_and_remat_reach_the_finetuner(fake_cache, tmp_path, monkeypatch):
    from atm_jax import finetune

    seen = []
    original = finetune.Finetuner.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if "precision" in kwargs:  # the experiment's (pretraining builds its own)
            seen.append((kwargs["precision"], kwargs["remat"]))
            raise KeyboardInterrupt("built")

    monkeypatch.setattr(finetune.Finetuner, "__init__", spy)
    for precision, remat in (("bfloat16", True), ("float32", False)):
        config = _atm_only(_tiny_config(), precision=precision, remat=remat)
        with pytest.raises(KeyboardInterrupt):
            runner.run_experiment(config, tmp_path / precision, log=lambda *_: None)
    assert seen == [("bfloat16", True), ("float32", False)]


def test_resume_refuses_a_seed_change_even_when_forced(atm_only_run, tmp_path):
    config = _atm_only(_tiny_config())
    shutil.copytree(atm_only_run[1], tmp_path / "work")
    with config.unlocked():
        config.seed = 1
        config.resume = "force"
    with pytest.raises(errors.ConfigError, match="another config.seed .* use a new --workdir"):
        runner.run_experiment(config, tmp_path / "work", log=lambda *_: None)
