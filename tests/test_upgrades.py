"""Workdirs of earlier releases under today's names (atm_jax.upgrades): which renames
apply, what they touch, and that a workdir another config wrote is refused untouched.
The whole path from a real earlier release is tests/test_resume.py's upgrade test."""

import json

import pytest

from atm_jax import errors, recipes, runner, upgrades, workdir

OLD = {"seed": 0, "task_placement": "all",
       "methods": {"task_arithmetic": {"kind": "one_shot", "merge": "mean"},
                   "task_arithmetic_tuned": {"kind": "one_shot", "merge": "mean",
                                             "tune_alpha": True},
                   "ties": {"kind": "one_shot", "merge": "ties"},
                   "valft_atm_authors": {"kind": "atm", "start": "task_arithmetic"}}}
NEW = {"seed": 0, "task_ownership": "all",
       "methods": {"mean": {"kind": "one_shot", "merge": "mean"},
                   "mean_tuned": {"kind": "one_shot", "merge": "mean", "tune_alpha": True},
                   "ties": {"kind": "one_shot", "merge": "ties"},
                   "valft_atm_authors": {"kind": "atm", "start": "mean"}}}


def test_an_old_config_under_the_new_names_is_the_new_config():
    renames = upgrades.renames_between(OLD, NEW)
    assert renames.fields == {"task_placement": "task_ownership"}
    assert renames.rows == {"task_arithmetic": "mean", "task_arithmetic_tuned": "mean_tuned"}
    assert upgrades.config(OLD, renames) == NEW
    assert workdir.config_differences(upgrades.config(OLD, renames), NEW) == []
    assert workdir.config_differences(OLD, NEW)  # without the renames: "another config"


def test_nothing_is_renamed_between_configs_of_one_release_or_when_both_names_exist():
    assert not upgrades.renames_between(NEW, NEW)
    assert not upgrades.renames_between(OLD, OLD)
    assert not upgrades.renames_between(None, NEW)
    both = dict(NEW, methods={**NEW["methods"], "task_arithmetic": {"kind": "one_shot"}})
    assert upgrades.renames_between(OLD, both).rows == {
        "task_arithmetic_tuned": "mean_tuned"}  # a current task_arithmetic row stays itself


def test_a_checkpoint_meta_and_metrics_lines_under_the_new_names():
    renames = upgrades.renames_between(OLD, NEW)
    lines = [json.dumps({"method": "task_arithmetic", "iteration": 1, "task": "a",
                         "accuracy": 0.1 + 0.2}),
             json.dumps({"method": "ties", "iteration": 1, "task": "a", "accuracy": 0.5}),
             '{"method": "task_arith']  # a torn last line: kept as it is
    meta = {"config": OLD, "done": ["pretrained", "one_shot"],
            "rows": [{"method": "pretrained"}, {"method": "task_arithmetic", "average": 0.3},
                     {"method": "task_arithmetic_tuned", "alpha": 0.5}],
            "curves": {"valft_atm_authors": [1]}, "timings": {"one_shot": 2.0},
            "position": {"unit": "valft_atm_authors"}, "metrics": lines}
    out = upgrades.meta(meta, renames)
    assert out["config"] == NEW
    assert [r["method"] for r in out["rows"]] == ["pretrained", "mean", "mean_tuned"]
    assert out["rows"][2]["alpha"] == 0.5 and out["done"] == meta["done"]
    assert out["metrics"][0] == ('{"method": "mean", "iteration": 1, "task": "a", '
                                 '"accuracy": 0.30000000000000004}')
    assert out["metrics"][1:] == lines[1:]
    assert meta["rows"][1]["method"] == "task_arithmetic"  # the input is left as it was


def test_workdir_files_are_renamed_once(tmp_path):
    renames = upgrades.renames_between(OLD, NEW)
    (tmp_path / "params").mkdir()
    (tmp_path / "params" / "task_arithmetic.msgpack").write_bytes(b"weights")
    (tmp_path / "params" / "ties.msgpack").write_bytes(b"ties")
    (tmp_path / "metrics.jsonl").write_text(
        '{"method": "task_arithmetic", "task": "a"}\n{"method": "ties", "task": "a"}\n')
    bases = tmp_path / "analysis" / "bases"
    bases.mkdir(parents=True)
    (bases / "task_arithmetic.npy").write_bytes(b"npy")
    (tmp_path / "analysis" / "one_shot").mkdir()
    (tmp_path / "analysis" / "one_shot" / "task_arithmetic.json").write_text(
        json.dumps({"method": "task_arithmetic", "alpha": 1.0}))
    (tmp_path / "analysis" / "atm" / "valft_atm_authors").mkdir(parents=True)
    (tmp_path / "analysis" / "atm" / "valft_atm_authors" / "iteration0.json").write_text(
        json.dumps({"iteration": 0, "start": "task_arithmetic"}))
    changed = upgrades.workdir_files(tmp_path, renames)
    assert "params/task_arithmetic.msgpack -> mean.msgpack" in changed
    assert (tmp_path / "params" / "mean.msgpack").read_bytes() == b"weights"
    assert (tmp_path / "params" / "ties.msgpack").read_bytes() == b"ties"
    assert (tmp_path / "metrics.jsonl").read_text() == (
        '{"method": "mean", "task": "a"}\n{"method": "ties", "task": "a"}\n')
    assert (bases / "mean.npy").read_bytes() == b"npy" and not (bases / "task_arithmetic.npy").exists()
    assert json.loads((tmp_path / "analysis" / "one_shot" / "mean.json").read_text())[
        "method"] == "mean"
    assert json.loads((tmp_path / "analysis" / "atm" / "valft_atm_authors" /
                       "iteration0.json").read_text())["start"] == "mean"
    assert upgrades.workdir_files(tmp_path, renames) == []  # idempotent: nothing left to do


def test_an_old_workdir_of_another_config_is_refused_and_left_untouched(tmp_path):
    # The renamed config still differs (another seed): refused, and no file renamed.
    config = recipes.tiny(recipes.mini())
    saved = json.loads(config.to_json())
    saved["seed"] = 1
    saved["task_placement"] = saved.pop("task_ownership")
    saved["methods"] = {("task_arithmetic" if k == "mean" else k): v
                        for k, v in saved["methods"].items()}
    (tmp_path / "config.json").write_text(json.dumps(saved))
    (tmp_path / "params").mkdir()
    (tmp_path / "params" / "task_arithmetic.msgpack").write_bytes(b"weights")
    with pytest.raises(errors.ConfigError, match=r"seed: 1 -> 0") as info:
        runner.run_experiment(config, tmp_path, log=lambda *_: None)
    assert "task_ownership" not in str(info.value) and "mean" not in str(info.value)
    assert (tmp_path / "params" / "task_arithmetic.msgpack").exists()


def test_a_config_section_added_since_counts_field_by_field():
    """A workdir written before ``merge_data`` existed resumes while the section holds its
    defaults; a changed sub-field is named."""
    from atm_jax import recipes, schema

    current = json.loads(recipes.mini().to_json())
    older = dict(current)
    del older["merge_data"]
    defaults = schema.field_defaults("mini")
    assert workdir.config_differences(older, current, defaults=defaults) == []
    current["merge_data"] = dict(current["merge_data"], examples=128)
    assert workdir.config_differences(older, current, defaults=defaults) == [
        "merge_data.examples: '<absent>' -> 128"]
