"""The `:study` rows: new one-shot merges beside today's, ATM with another inner merge at
the α its tuned row chose, and α tuning that merges once."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from atm_jax import atm, errors, merge_spec, recipes, runner
from tests import test_runner


def test_study_variant_adds_every_data_free_merge_and_the_inner_merge_rows():
    config = test_runner._get_config("study")
    runner.validate(config)
    methods = config.methods
    for name, (merge, kwargs, fixed) in recipes.STUDY_MERGES.items():
        assert methods[f"{name}_tuned"].tune_alpha and methods[f"{name}_tuned"].merge == merge
        assert (name in methods) == fixed
    for name in ("mean", "ties", "breadcrumbs", "dare"):
        assert methods[f"{name}_tuned"].tune_alpha and name in methods
    for name, (merge, source) in recipes.STUDY_ATM.items():
        spec = methods[name]
        assert (spec.kind, spec.merge, spec.alpha_from, spec.iterations) == ("atm", merge, source, 10)
        assert spec.merge_kwargs.to_dict() == methods[source].merge_kwargs.to_dict()
    # The default run keeps today's rows.
    assert set(test_runner._get_config().methods) == {"mean", "ties", "breadcrumbs", "dare",
                                                        "valft_atm", "atm"}
    # With :analysis too, no row is tuned twice.
    both = test_runner._get_config("analysis,study")
    assert not [n for n in both.methods if n.endswith("_tuned_tuned")]


def test_alpha_from_must_name_a_tuned_one_shot_row():
    config = test_runner._get_config("tiny")
    with config.unlocked():
        config.methods.atm_ties = recipes.method("atm", "ties", iterations=2, alpha_from="ties")
    with pytest.raises(errors.ConfigError, match=r"atm_ties.alpha_from='ties'.*tune_alpha=True"):
        runner.validate(config)


def test_inner_merge_runs_at_the_alpha_its_tuned_row_chose(fake_cache, tmp_path):
    config = test_runner._tiny_config()
    with config.unlocked():
        config.tasks = tuple(config.tasks)[:2]
        config.references = ()
        config.methods = {
            "ties_tuned": recipes.method("one_shot", "ties", {"density": 0.15}, tune_alpha=True),
            "atm_ties": recipes.method("atm", "ties", {"density": 0.15}, iterations=2,
                                       alpha_from="ties_tuned"),
            "atm_ties_fixed": recipes.method("atm", "ties", {"density": 0.15}, iterations=2,
                                             alpha=2.0)}
        config.alpha_grid = (2.0,)  # the tuned row can only choose 2
    out = runner.run_experiment(config, tmp_path / "work", log=lambda *_: None)
    rows = {r["method"]: r for r in out["rows"]}
    assert rows["ties_tuned"]["alpha"] == 2.0
    assert (rows["atm_ties"]["alpha"], rows["atm_ties"]["alpha_from"]) == (2.0, "ties_tuned")
    # At α = 2 (not the spec's α = 1) every iteration: the curve of a fixed α = 2 run.
    assert out["curves"]["atm_ties"] == out["curves"]["atm_ties_fixed"]
    assert "atm_ties (inner α = 2 from ties_tuned)" in (tmp_path / "work" / "results.md").read_text()


def test_alpha_tuning_merges_once_and_scales_the_delta(monkeypatch):
    base = {"w": jnp.zeros(6), "b": jnp.ones(2)}
    rng = np.random.default_rng(0)
    finetuned = [jax.tree.map(lambda x: x + rng.standard_normal(x.shape).astype(np.float32), base)
                 for _ in range(3)]
    spec = atm.MergeSpec("ties", density=0.5)
    calls = []
    original = merge_spec.merge_delta

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(merge_spec, "merge_delta", counting)
    seen = {}

    def validate(params):
        seen[len(seen)] = params
        return {"t": float(len(seen) == 3)}  # the third α wins

    grid = (0.5, 1.0, 2.0, 3.0)
    out = merge_spec.tuned_merge(base, finetuned, spec, grid, key=jax.random.key(0),
                                 validate=validate)
    assert len(calls) == 1 and out["alpha"] == 2.0
    for i, alpha in enumerate(grid):  # each α's params: what a merge at that α gives
        expected, _ = merge_spec.merge_step(base, finetuned, atm.MergeSpec("ties", density=0.5,
                                                                          alpha=alpha),
                                            key=jax.random.key(0))
        for leaf, want in zip(jax.tree.leaves(seen[i]), jax.tree.leaves(expected)):
            np.testing.assert_array_equal(np.asarray(leaf), np.asarray(want))


def test_data_merges_see_the_first_examples_of_each_task_every_iteration(fake_cache, tmp_path,
                                                                          monkeypatch):
    """RegMean's Grams come from each task's own finetuned model on the first
    merge_data.examples training examples, once per merge (every ATM iteration)."""
    from atm_jax import capture

    config = test_runner._tiny_config()
    with config.unlocked():
        config.tasks = tuple(config.tasks)[:2]
        config.references = ()
        config.merge_data.examples = 16
        config.methods = {
            "regmean": recipes.method("one_shot", "regmean", {"off_diagonal_scale": 0.95}),
            "atm_regmean": recipes.method("atm", "regmean", {"off_diagonal_scale": 0.95},
                                          iterations=2)}
    seen = []
    real = capture.input_grams

    def spy(apply_fn, params, inputs, **kwargs):
        seen.append(np.asarray(inputs))
        return real(apply_fn, params, inputs, **kwargs)
    monkeypatch.setattr(capture, "input_grams", spy)
    out = runner.run_experiment(config, tmp_path / "work", log=lambda *_: None)
    rows = {r["method"]: r for r in out["rows"]}
    from atm_jax.suites import mini
    setup = mini.build(config, lambda *_: None)
    firsts = [setup.tasks[t].train[0][:16] for t in config.tasks]
    assert len(seen) == 2 * 3  # one-shot merge + two ATM merges, two tasks each
    for i, got in enumerate(seen):
        np.testing.assert_array_equal(got, firsts[i % 2])
    for name in ("regmean", "atm_regmean"):
        assert rows[name]["merge_data"]["examples_per_task"] == dict.fromkeys(config.tasks, 16)
