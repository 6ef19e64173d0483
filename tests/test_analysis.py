"""atm_jax.analysis: Theorem 3.1, cosine / PCA, α selection, the recorded run.

References are independent of the code under test: the task-vector identity against
a hand-written NumPy gradient, cosines and PCA against NumPy (loops, SVD), the α
choice against a validation score built to peak at a known α, and the run's files
against values recomputed from its own rows.
"""

import json
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import test_runner

from atm_jax import atm, errors, event_files, runner
from atm_jax.analysis import __main__ as cli
from atm_jax.analysis import geometry, report, tensorboard, theory, tuning

# -- Theorem 3.1 ----------------------------------------------------------------------

def _tanh_model(seed=0, d=6, f=5, c=3):
    rng = np.random.default_rng(seed)
    base = {"w": jnp.asarray(rng.normal(0, 0.5, (d, f)), jnp.float32),
            "b": jnp.asarray(rng.normal(0, 0.1, f), jnp.float32)}
    head = {"kernel": jnp.asarray(rng.normal(0, 1.0, (f, c)), jnp.float32),
            "bias": jnp.asarray(rng.normal(0, 0.1, c), jnp.float32)}
    return base, head


def _apply(params, x, train):
    del train
    return jnp.tanh(x @ params["w"] + params["b"])


def _numpy_gradient(base, head, x, y):
    """∇ of the mean softmax cross-entropy of tanh(xW + b)K + c w.r.t. (W, b), by hand."""
    w, b = np.asarray(base["w"], np.float64), np.asarray(base["b"], np.float64)
    k, c = np.asarray(head["kernel"], np.float64), np.asarray(head["bias"], np.float64)
    x = np.asarray(x, np.float64)
    f = np.tanh(x @ w + b)
    logits = f @ k + c
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p[np.arange(len(y)), y] -= 1.0
    dz = (p / len(y)) @ k.T * (1 - f ** 2)
    return {"w": x.T @ dz, "b": dz.sum(0)}


def test_one_epoch_full_batch_task_vector_is_minus_eta_gradient():
    rng = np.random.default_rng(1)
    base, head = _tanh_model()
    data = {t: (rng.normal(size=(40, 6)).astype(np.float32), rng.integers(0, 3, 40))
            for t in ("a", "b")}
    heads = {"a": head, "b": _tanh_model(seed=2)[1]}
    eta = 0.05
    gap = theory.gradient_gap(_apply, base, heads, data, etas=(eta,), epochs=(1, 3))
    by = {(r["task"], r["epochs"]): r for r in gap["rows"]}
    # k = 1: the finetuner's task vector equals −η∇L̄ (float32 rounding of θ only).
    for task in ("a", "b", "sum"):
        assert by[task, 1]["relative_gap"] < 2e-5, by[task, 1]
        assert by[task, 1]["cosine"] > 1 - 1e-9
    # k = 3: only first order; the gap is real but small at this η.
    assert 1e-4 < by["sum", 3]["relative_gap"] < 0.5
    # The identity against the hand-written NumPy gradient (not the analysis' own jax.grad).
    from atm_jax.finetune import Finetuner, OptimizerConfig
    x, y = data["a"]
    opt = OptimizerConfig(name="sgd", learning_rate=eta, grad_clip=None, batch_size=40)
    tuned, _, _ = Finetuner(_apply, opt, train_head=False).finetune(
        base, head, x, y, epochs=1, key=jax.random.key(0))
    grad = _numpy_gradient(base, head, x, y)
    for leaf in ("w", "b"):
        tau = np.asarray(tuned[leaf], np.float64) - np.asarray(base[leaf], np.float64)
        np.testing.assert_allclose(tau, -eta * grad[leaf], atol=3e-8, rtol=1e-4)
    assert "| 0.05 |" in theory.gap_table(gap)


def test_gradient_structure_shares_and_cosines_against_numpy():
    rng = np.random.default_rng(3)
    base, head = _tanh_model()
    data = {"a": (rng.normal(size=(24, 6)).astype(np.float32), rng.integers(0, 3, 24))}
    from atm_jax.finetune import OptimizerConfig
    opt = OptimizerConfig(name="sgd", learning_rate=0.1, grad_clip=None, batch_size=24)
    out = theory.gradient_structure(_apply, base, {"a": head}, data, opt, epochs=3,
                                    key=jax.random.key(0))["tasks"]["a"]
    # Full batch + SGD: epoch e's gradient is the NumPy gradient at θ_e = θ_{e-1} − η g.
    params = {k: np.asarray(v, np.float64) for k, v in base.items()}
    grads = []
    for _ in range(3):
        g = _numpy_gradient(params, head, *data["a"])
        grads.append(np.concatenate([g["b"], g["w"].ravel()]))
        params = {k: params[k] - 0.1 * g[k] for k in params}
    norms = np.linalg.norm(grads, axis=1)
    np.testing.assert_allclose(out["norm_share"], norms / norms.sum(), rtol=1e-4)
    cos = np.array([[u @ v / np.linalg.norm(u) / np.linalg.norm(v) for v in grads] for u in grads])
    np.testing.assert_allclose(out["cosine"], cos, atol=2e-5)


# -- geometry ----------------------------------------------------------------------------

def test_cosines_and_mean_abs_cosine_against_numpy_loops():
    rng = np.random.default_rng(4)
    v = rng.normal(size=(4, 30))
    v[2] = -v[0] * 2.0
    ref = np.array([[sum(a * b for a, b in zip(x, y)) / np.sqrt(sum(a * a for a in x) * sum(b * b for b in y))
                     for y in v] for x in v])
    np.testing.assert_allclose(geometry.cosine_from_vectors(v), ref, atol=1e-12)
    off = [abs(ref[i, j]) for i in range(4) for j in range(4) if i != j]
    assert geometry.mean_abs_cosine(ref) == pytest.approx(sum(off) / 12, abs=1e-12)
    with pytest.raises(ValueError, match="square"):
        geometry.mean_abs_cosine(np.ones((2, 3)))
    # What a run records: merge_step's cosine of the task vectors, vs NumPy on the flat vectors.
    base = {"x": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32), "y": jnp.zeros(4)}
    tuned = [jax.tree.map(lambda a, i=i: a + jnp.asarray(rng.normal(size=a.shape), jnp.float32),
                          base) for i in range(3)]
    _, diag = atm.merge_step(base, tuned, atm.MergeSpec("mean"), key=jax.random.key(0))
    flat = np.stack([np.concatenate([np.ravel(t[k] - base[k]) for k in ("x", "y")]) for t in tuned])
    np.testing.assert_allclose(diag["cosine"], geometry.cosine_from_vectors(flat), atol=2e-6)


def test_pca_from_saved_models_matches_numpy_svd(tmp_path):
    rng = np.random.default_rng(5)
    x = rng.normal(size=(7, 200)).astype(np.float32) + 50.0  # far from 0: cancellation-prone
    paths = []
    for i, row in enumerate(x):
        paths.append(tmp_path / f"m{i}.npy")
        np.save(paths[-1], row)
    scores, ratio = geometry.pca_from_files(paths, components=2)
    centred = x.astype(np.float64) - x.astype(np.float64).mean(0)
    u, s, _ = np.linalg.svd(centred, full_matrices=False)
    ref = u[:, :2] * s[:2]
    for c in range(2):  # sign is a convention
        sign = np.sign(ref[np.argmax(np.abs(ref[:, c])), c])
        np.testing.assert_allclose(scores[:, c], sign * ref[:, c], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ratio, s[:2] ** 2 / (s ** 2).sum(), rtol=1e-9)
    np.save(tmp_path / "other.npy", np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="different shapes"):
        geometry.gram_from_files([paths[0], tmp_path / "other.npy"])


# -- α on validation ----------------------------------------------------------------------

def test_alpha_grid_picks_the_best_validation_alpha():
    assert tuning.select_alpha({0.5: 0.7, 1.0: 0.6, 2.0: 0.71}) == 2.0
    assert tuning.select_alpha({0.5: 0.7, 1.5: 0.7, 3.0: 0.7}) == 0.5  # tie: closest to 1, smaller
    with pytest.raises(ValueError, match="α=2.0 is nan"):
        tuning.select_alpha({1.0: 0.5, 2.0: float("nan")})
    base = {"w": jnp.zeros(4)}
    tuned = [{"w": jnp.asarray([1.0, 0, 0, 0])}, {"w": jnp.asarray([0, 1.0, 0, 0])}]
    target = np.array([0.75, 0.75, 0, 0])  # = base + 1.5 × mean(task vectors)
    seen = []

    def validate(params):
        seen.append(float(params["w"][0]))
        return {"t": -float(np.abs(np.asarray(params["w"]) - target).sum())}

    out = tuning.tuned_merge(base, tuned, atm.MergeSpec("mean"), (0.5, 1.0, 1.5, 2.0),
                             key=jax.random.key(0), validate=validate)
    assert out["alpha"] == 1.5 and seen == [0.25, 0.5, 0.75, 1.0]
    np.testing.assert_allclose(out["params"]["w"], target)


# -- the recorded run ---------------------------------------------------------------------

def _analysis_config(config):
    from atm_jax import recipes
    with config.unlocked():
        m = config.methods
        config.methods = {"mean": m.mean, "ties": m.ties, "atm": m.atm}
        config.references = ("individual",)
        config.tasks = tuple(config.tasks)[:2]
        recipes.analysis_methods(config)
        config.methods = {k: v for k, v in config.methods.items()
                          if k in ("mean", "ties", "ties_tuned", "ties_sum", "atm",
                                   "ph_atm", "valft_atm_authors")}
        config.alpha_grid = (0.5, 1.0, 2.0)
    return config


def _event_tags(folder):
    from tensorboardX.proto import event_pb2
    tags = set()
    for path in folder.iterdir():
        blob = path.read_bytes()
        at = 0
        while at < len(blob):
            (length,) = struct.unpack("<Q", blob[at:at + 8])
            event = event_pb2.Event.FromString(blob[at + 12:at + 12 + length])
            tags |= {v.tag for v in event.summary.value}
            at += 12 + length + 4
    return tags


def test_analysis_of_a_tiny_run(fake_cache, tmp_path):
    config = _analysis_config(test_runner._tiny_config())
    workdir = tmp_path / "work"
    out = runner.run_experiment(config, workdir, log=lambda *_: None)
    rows = {r["method"]: r for r in out["rows"]}
    assert list(rows) == ["individual", "mean", "ties", "ties_tuned", "ties_sum",
                          "valft_atm_authors", "ph_atm", "atm"]
    # α-tuned row: the chosen α is the grid's best on validation, and the rows beside it stay.
    recorded = json.loads((workdir / "analysis" / "one_shot" / "ties_tuned.json").read_text())
    val = dict(map(tuple, recorded["alpha_validation"]))
    best = [a for a in val if val[a] == max(val.values())]  # ties go to the α closest to 1
    assert set(val) == {0.5, 1.0, 2.0}
    assert rows["ties_tuned"]["alpha"] == min(best, key=lambda a: (abs(a - 1), a))
    assert "alpha" not in rows["ties"]
    assert "ties_tuned (α = " in (workdir / "results.md").read_text()
    # Post-hoc ATM starts from the one-shot merge; the authors' valFT from the mean (task
    # arithmetic).
    curves = out["curves"]
    assert curves["ph_atm"][0]["accuracy"] == rows["ties"]["accuracy"]
    assert curves["valft_atm_authors"][0]["accuracy"] == rows["mean"]["accuracy"]

    # The CLI: theory on a few examples, then the report (figures, JSON, TensorBoard).
    assert cli.main([str(workdir), "--examples", "8", "--etas", "0.01", "--epochs", "1,2",
                     "--structure-epochs", "2", "--tasks", config.tasks[0]]) == 0
    summary = json.loads((workdir / "analysis" / "analysis.json").read_text())
    figures = sorted(p.name for p in (workdir / "analysis" / "figures").iterdir())
    assert figures == ["alpha_tuning.png", "cosine_heatmaps.png", "gradient_structure.png",
                       "loss_bookkeeping.png", "mean_abs_cosine.png", "trajectory_pca.png"]
    for method in ("atm", "ph_atm", "valft_atm_authors"):
        ortho = summary["orthogonality"]["atm"][method]
        assert [r["iteration"] for r in ortho] == [1, 2]
        for r in ortho:
            c = np.abs(np.asarray(r["cosine"]))
            t = len(c)
            assert r["mean_abs_cos"] == pytest.approx((c.sum() - np.trace(c)) / (t * (t - 1)))
        book = summary["loss_bookkeeping"][method]
        assert [r["iteration"] for r in book] == [1, 2]
        sizes = json.loads((workdir / "analysis" / "atm" / method / "iteration1.json").read_text())["sizes"]
        for r in book:
            n = np.array([sizes[t] for t in r["loss_after"]], float)
            joint = np.dot(n, list(r["loss_after"].values())) / n.sum()
            assert r["joint_after"] == pytest.approx(joint, rel=1e-12)
            assert r["joint_decreased"] == (r["joint_after"] < r["joint_before"])
    assert curves["atm"][2]["accuracy"] == json.loads(
        (workdir / "analysis" / "atm" / "atm" / "iteration2.json").read_text())["accuracy"]
    # PCA over pretrained + 4 one-shot merges + 3 ATM methods × iterations 0..2.
    assert len(summary["trajectory"]["points"]) == 1 + 4 + 3 * 3
    gap = {(r["task"], r["epochs"]): r for r in summary["theory"]["theorem_3_1"]["rows"]}
    assert gap["sum", 1]["relative_gap"] < 1e-3
    # Post-hoc ATM from a merged checkpoint given by path (another workdir, no one-shot rows).
    from atm_jax import recipes
    posthoc = test_runner._tiny_config()
    with posthoc.unlocked():
        posthoc.tasks = config.tasks
        posthoc.references = ()
        posthoc.methods = {"ph": recipes.method("atm", iterations=2, split="validation",
                                                start=str(workdir / "params" / "ties.msgpack"))}
    again = runner.run_experiment(posthoc, tmp_path / "posthoc", log=lambda *_: None)
    assert again["curves"]["ph"][0]["accuracy"] == rows["ties"]["accuracy"]
    tags = _event_tags(workdir / "tensorboard" / "analysis")
    assert {"average_accuracy/atm", "mean_abs_cos/atm", "cosine/atm",
            f"accuracy/atm/{config.tasks[0]}", "joint_loss/ph_atm"} <= tags
    # The report's run replaced only its own files: the runs written live stay, and a
    # metrics line without an accuracy (an iteration eval_every skipped) is passed over.
    live = event_files.read_scalars(workdir / "tensorboard")
    assert set(rows) | {"analysis"} <= set(live)
    assert [k for k, _ in live["atm"]["average_accuracy"]] == [h["iteration"] for h in curves["atm"]]
    tensorboard.write(workdir / "tensorboard", summary,
                      [{"method": "atm", "iteration": 3, "task": config.tasks[0], "train_loss": 0.5}])
    assert len(list((workdir / "tensorboard" / "analysis").iterdir())) == 1
    assert event_files.read_scalars(workdir / "tensorboard")["atm"] == live["atm"]


@pytest.mark.parametrize("edit,message", [
    (lambda c: setattr(c.methods.atm, "start", "nothing"), "start='nothing' must name a one_shot"),
    (lambda c: setattr(c.methods.atm, "start", "/no/such.msgpack"), "no such params file"),
    (lambda c: setattr(c.methods.ties, "start", "ties"), "only an ATM method has a start"),
    (lambda c: setattr(c.methods.atm, "tune_alpha", True), "only a one_shot method can tune"),
    (lambda c: setattr(c, "alpha_grid", (1.0, -2.0)), "alpha_grid has -2.0"),
    (lambda c: setattr(c, "analysis", "yes"), "config.analysis='yes' must be True or False"),
])
def test_bad_analysis_fields_are_refused(edit, message):
    import ml_collections
    config = ml_collections.ConfigDict(test_runner._get_config().to_dict(), type_safe=False)
    edit(config)
    with pytest.raises(errors.ConfigError, match=message):
        runner.validate(config)


def test_report_without_recorded_files_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.analysis=True"):
        report.build(tmp_path)
