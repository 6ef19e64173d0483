"""The merges that look at data (RegMean, RegMean++, Fisher, AdaMerging) and their
capture helpers, against NumPy float64 references written from the papers' equations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

from atm_jax import capture, merge, tree
from atm_jax.merge import adaptive as ada_lib

F32 = np.float32


class TwoLinear(nn.Module):
    """Two linear layers without biases or activation (RegMean++'s reference case)."""
    hidden: int = 5
    out: int = 3

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(self.hidden, use_bias=False, name="layer_0")(x)
        return nn.Dense(self.out, use_bias=False, name="layer_1")(h)


def regression_tasks(rng, tasks=3, d=6, k=2):
    xs = [rng.normal(size=(n, d)) * rng.uniform(0.5, 2, size=d) for n in (40, 55, 70)[:tasks]]
    ys = [x @ rng.normal(size=(d, k)) + 0.1 * rng.normal(size=(len(x), k)) for x in xs]
    return xs, ys


# ----------------------------------------------------------------------------
# capture
# ----------------------------------------------------------------------------


def test_input_grams_mask_padding_and_tokens():
    """Sums over real rows only: a padded last batch and padded tokens add nothing."""
    rng = np.random.default_rng(0)
    model = nn.Dense(3, name="proj")
    x = rng.normal(size=(7, 4, 5)).astype(F32)  # [N, S, in]
    mask = (rng.uniform(size=(7, 4)) < 0.6).astype(F32)
    mask[:, 0] = 1
    params = model.init(jax.random.key(0), x)["params"]
    inputs = np.concatenate([x, mask[..., None]], axis=-1)  # the mask rides along

    def apply_fn(p, z):
        return nn.Dense(3, name="proj").apply({"params": p}, z[..., :5])

    got = capture.input_grams(apply_fn, params, inputs, batch_size=3,
                              token_mask=lambda z: z[..., 5])
    rows = x.reshape(-1, 5)[mask.reshape(-1) > 0].astype(np.float64)
    np.testing.assert_allclose(np.asarray(got.sums["kernel"]), rows.T @ rows, rtol=2e-6, atol=2e-5)
    assert got.rows == {"kernel": int(mask.sum())}


def test_input_grams_linen_attention_and_nnx_lists():
    """DenseGeneral's output projection contracts [heads, head_dim]; NNX per-layer lists
    are seen under their leaf paths."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(6, 3, 8)).astype(F32)
    attn = nn.MultiHeadDotProductAttention(num_heads=2)
    params = attn.init(jax.random.key(0), x)["params"]
    got = capture.input_grams(lambda p, z: attn.apply({"params": p}, z), params, x, batch_size=4)
    flat = x.reshape(-1, 8).astype(np.float64)
    for name in ("query", "key", "value"):
        np.testing.assert_allclose(np.asarray(got.sums[f"{name}/kernel"]), flat.T @ flat, rtol=2e-6,
                                   atol=2e-5)
    assert got.sums["out/kernel"].shape == (8, 8) and got.rows["out/kernel"] == 18
    assert got.order[:3] == ("query/kernel", "key/kernel", "value/kernel")

    class Net(nnx.Module):
        def __init__(self):
            r = nnx.Rngs(0)
            self.layers = nnx.List([nnx.Linear(8, 4, rngs=r), nnx.Linear(4, 2, rngs=r)])

        def __call__(self, z):
            return self.layers[1](jnp.tanh(self.layers[0](z)))

    graphdef, state = nnx.split(Net(), nnx.Param)
    z = rng.normal(size=(5, 8)).astype(F32)
    got = capture.input_grams(capture.nnx_apply(graphdef), state, z, batch_size=2)
    assert set(got.sums) == {"layers/0/kernel", "layers/1/kernel"}
    assert set(got.sums) <= set(tree.leaf_paths(state))
    w, b = (np.asarray(state["layers"][0][k][...], np.float64) for k in ("kernel", "bias"))
    h = np.tanh(z @ w + b)
    np.testing.assert_allclose(np.asarray(got.sums["layers/1/kernel"]), h.T @ h, rtol=1e-5,
                               atol=1e-5)


def test_input_grams_sees_nothing_explains():
    with pytest.raises(ValueError, match="saw no linear layer.*nnx_apply"):
        capture.input_grams(lambda p, z: z * p, 1.0, np.ones((2, 3), F32))


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_empirical_fisher_of_softmax_regression_in_closed_form():
    """log p(y|x) = log softmax(x W + b)_y: ∂/∂W = x ⊗ (e_y − p), ∂/∂b = e_y − p."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(13, 4)).astype(F32)
    y = rng.integers(0, 3, size=13)
    params = {"w": rng.normal(size=(4, 3)).astype(F32), "b": rng.normal(size=3).astype(F32)}
    got = capture.diagonal_fisher(lambda p, z: z @ p["w"] + p["b"], params, x, y, chunk=5)
    p = _softmax(x.astype(np.float64) @ params["w"] + params["b"])
    r = np.eye(3)[y] - p
    np.testing.assert_allclose(np.asarray(got["w"]), np.mean((x[:, :, None] * r[:, None]) ** 2, 0),
                               rtol=3e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(got["b"]), np.mean(r ** 2, 0), rtol=3e-5, atol=1e-7)


def test_true_fisher_samples_labels_from_the_model():
    """E_y (e_y − p)_j² = p_j (1 − p_j): the sampled Fisher of one repeated input
    converges to it (5 standard errors of the 4,000-draw mean)."""
    rng = np.random.default_rng(3)
    x = np.repeat(rng.normal(size=(1, 3)).astype(F32), 4000, axis=0)
    params = {"w": rng.normal(size=(3, 4)).astype(F32)}
    got = np.asarray(capture.diagonal_fisher(lambda p, z: z @ p["w"], params, x,
                                             key=jax.random.key(0), chunk=500)["b" if 0 else "w"])
    p = _softmax(x[0].astype(np.float64) @ params["w"])
    expected = x[0][:, None] ** 2 * p * (1 - p)
    # one draw's (e_y − p)_j² is (1 − p_j)² w.p. p_j, else p_j²
    var = x[0][:, None] ** 4 * (p * (1 - p) ** 4 + (1 - p) * p ** 4 - (p * (1 - p)) ** 2)
    assert np.all(np.abs(got - expected) < 5 * np.sqrt(var / 4000) + 1e-7)
    with pytest.raises(ValueError, match="exactly one of them"):
        capture.diagonal_fisher(lambda p, z: z @ p["w"], params, x[:2])


# ----------------------------------------------------------------------------
# RegMean
# ----------------------------------------------------------------------------


def _stack_regression(rng, xs, ys):
    """Per-task least-squares kernels as task vectors from a random base, Flax and
    PyTorch layouts side by side."""
    finetuned = [np.linalg.lstsq(x, y, rcond=None)[0] for x, y in zip(xs, ys)]  # [d, k]
    base = rng.normal(size=finetuned[0].shape)
    stacked = {"dense": {"kernel": np.stack([w - base for w in finetuned]).astype(F32),
                         "bias": rng.normal(size=(len(xs), 2)).astype(F32)},
               "torch": {"weight": np.stack([(w - base).T for w in finetuned]).astype(F32)}}
    grams = [{"dense/kernel": (x.T @ x).astype(F32), "torch/weight": (x.T @ x).astype(F32)}
             for x in xs]
    return base, finetuned, stacked, grams


def test_regmean_at_scale_one_is_the_joint_least_squares_solution():
    rng = np.random.default_rng(4)
    xs, ys = regression_tasks(rng)
    base, _, stacked, grams = _stack_regression(rng, xs, ys)
    delta = merge.regmean(stacked, grams=grams, off_diagonal_scale=1.0)
    joint = np.linalg.lstsq(np.concatenate(xs), np.concatenate(ys), rcond=None)[0]
    np.testing.assert_allclose(base + np.asarray(delta["dense"]["kernel"], np.float64), joint,
                               rtol=0, atol=2e-6 * np.abs(joint).max())
    np.testing.assert_allclose(base.T + np.asarray(delta["torch"]["weight"], np.float64), joint.T,
                               rtol=0, atol=2e-6 * np.abs(joint).max())
    np.testing.assert_allclose(delta["dense"]["bias"], stacked["dense"]["bias"].mean(0), rtol=1e-6)


@pytest.mark.parametrize("a", (0.0, 0.5, 0.95))
def test_regmean_below_one_matches_the_scaled_closed_form(a):
    rng = np.random.default_rng(5)
    xs, ys = regression_tasks(rng)
    base, finetuned, stacked, grams = _stack_regression(rng, xs, ys)
    scaled = [a * (x.T @ x) + (1 - a) * np.diag(np.diag(x.T @ x)) for x in xs]
    expected = np.linalg.solve(sum(scaled), sum(g @ w for g, w in zip(scaled, finetuned)))
    delta = merge.regmean(stacked, grams=grams, off_diagonal_scale=a)
    np.testing.assert_allclose(base + np.asarray(delta["dense"]["kernel"], np.float64), expected,
                               rtol=0, atol=2e-6 * np.abs(expected).max())
    stacked_form = {p: np.stack([g[p] for g in grams]) for p in grams[0]}
    again = merge.regmean(stacked, grams=stacked_form, off_diagonal_scale=a)
    np.testing.assert_array_equal(again["dense"]["kernel"], delta["dense"]["kernel"])


def test_regmean_dead_input_feature_takes_the_mean_and_errors_name_the_leaf():
    rng = np.random.default_rng(6)
    xs, ys = regression_tasks(rng)
    for x in xs:
        x[:, 2] = 0.0  # feature 2 never fires
    base, _, stacked, grams = _stack_regression(rng, xs, ys)
    delta = merge.regmean(stacked, grams=grams, off_diagonal_scale=0.9)
    np.testing.assert_allclose(delta["dense"]["kernel"][2], stacked["dense"]["kernel"][:, 2].mean(0),
                               rtol=1e-6)
    assert np.all(np.isfinite(np.asarray(delta["dense"]["kernel"])))
    with pytest.raises(ValueError, match="regmean needs each task's input Gram"):
        merge.regmean(stacked)
    bad = [dict(g, **{"dense/kernel": g["dense/kernel"][:3, :3]}) for g in grams]
    with pytest.raises(ValueError, match=r"leaf 'dense/kernel': its Gram stack has shape \(3, 3, 3\)"):
        merge.regmean(stacked, grams=bad)
    with pytest.raises(ValueError, match=r"off_diagonal_scale=1\.5 is outside \[0, 1\]"):
        merge.regmean(stacked, grams=grams, off_diagonal_scale=1.5)


def test_regmean_pp_propagates_through_the_merged_first_layer():
    """Layer 1's Grams come from X_t W0* (the merged first layer), per-row means."""
    rng = np.random.default_rng(7)
    xs = [rng.normal(size=(n, 4)).astype(F32) for n in (20, 30)]
    model = TwoLinear()
    base = model.init(jax.random.key(0), xs[0])["params"]
    finetuned = [jax.tree.map(lambda w: w + 0.3 * rng.normal(size=w.shape).astype(F32), base)
                 for _ in xs]
    stacked = tree.stacked_task_vectors(finetuned, base)
    delta = merge.regmean_pp(stacked, base=base, apply_fn=lambda p, z: model.apply({"params": p}, z),
                             inputs=xs, off_diagonal_scale=0.8)

    def solve(grams, kernels, a=0.8):
        scaled = [a * g + (1 - a) * np.diag(np.diag(g)) for g in grams]
        return np.linalg.solve(sum(scaled), sum(g @ k for g, k in zip(scaled, kernels)))

    f64 = [{k: np.asarray(v["kernel"], np.float64) for k, v in f.items()} for f in finetuned]
    x64 = [x.astype(np.float64) for x in xs]
    w0 = solve([x.T @ x / len(x) for x in x64], [f["layer_0"] for f in f64])
    hs = [x @ w0 for x in x64]
    w1 = solve([h.T @ h / len(h) for h in hs], [f["layer_1"] for f in f64])
    b = {k: np.asarray(v["kernel"], np.float64) for k, v in base.items()}
    np.testing.assert_allclose(b["layer_0"] + np.asarray(delta["layer_0"]["kernel"]), w0, atol=2e-6)
    np.testing.assert_allclose(b["layer_1"] + np.asarray(delta["layer_1"]["kernel"]), w1, atol=2e-6)
    # plain RegMean would use each task's own first layer: a different second layer
    plain = merge.regmean(stacked, grams=[capture.input_grams(
        lambda p, z: model.apply({"params": p}, z), f, x) for f, x in zip(finetuned, xs)],
        off_diagonal_scale=0.8)
    assert np.abs(np.asarray(plain["layer_1"]["kernel"]) - delta["layer_1"]["kernel"]).max() > 1e-3


# ----------------------------------------------------------------------------
# Fisher merging
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("normalize", (False, True))
def test_fisher_merge_is_the_fisher_weighted_mean(normalize):
    rng = np.random.default_rng(8)
    stacked = {"a": rng.normal(size=(3, 4, 2)).astype(F32), "b": rng.normal(size=(3, 5)).astype(F32)}
    fishers = [{k: (rng.uniform(size=v.shape[1:]) ** 3).astype(F32) for k, v in stacked.items()}
               for _ in range(3)]
    fishers[1]["b"][:] = 0.0  # a task with no Fisher on a leaf still counts through the floor
    got = merge.fisher(stacked, fishers=fishers, floor=1e-6, normalize=normalize)
    c = np.ones(3)
    if normalize:
        norms = np.array([np.sqrt(sum(np.sum(np.square(f[k], dtype=np.float64)) for k in f))
                          for f in fishers])
        c = (1 / (norms + 1e-6)) / np.sum(1 / (norms + 1e-6))
    for k in stacked:
        w = np.stack([c[t] * (fishers[t][k].astype(np.float64) + 1e-6) for t in range(3)])
        expected = (w * stacked[k]).sum(0) / w.sum(0)
        np.testing.assert_allclose(got[k], expected, rtol=2e-6, atol=1e-7)
    with pytest.raises(ValueError, match="no Fisher for leaf 'b'"):
        merge.fisher(stacked, fishers=[{"a": f["a"]} for f in fishers])


# ----------------------------------------------------------------------------
# AdaMerging
# ----------------------------------------------------------------------------


def _ada_setup(rng, tasks=2):
    width, classes = 6, 3
    base = {"dense": {"kernel": rng.normal(size=(4, width)).astype(F32),
                      "bias": np.zeros(width, F32)}}
    stacked = jax.tree.map(lambda w: rng.normal(size=(tasks, *w.shape)).astype(F32), base)
    heads = [{"kernel": rng.normal(size=(width, classes)).astype(F32),
              "bias": np.zeros(classes, F32)} for _ in range(tasks)]
    inputs = [rng.normal(size=(40, 4)).astype(F32) for _ in range(tasks)]

    def apply_fn(p, x):
        return jnp.tanh(x @ p["dense"]["kernel"] + p["dense"]["bias"])
    return base, stacked, heads, inputs, apply_fn


def _numpy_entropy(lam, base, stacked, heads, inputs):
    """Mean over tasks of the mean prediction entropy, float64, layer-wise λ [T, 2]."""
    k = base["dense"]["kernel"] + np.tensordot(lam[:, 1], stacked["dense"]["kernel"], axes=1)
    b = base["dense"]["bias"] + np.tensordot(lam[:, 0], stacked["dense"]["bias"], axes=1)
    out = []
    for h, x in zip(heads, inputs):
        p = _softmax(np.tanh(x.astype(np.float64) @ k + b) @ h["kernel"] + h["bias"])
        out.append(np.mean(-np.sum(p * np.log(p), axis=-1)))
    return float(np.mean(out))


def test_adamerging_entropy_falls_and_delta_is_the_weighted_sum():
    rng = np.random.default_rng(9)
    base, stacked, heads, inputs, apply_fn = _ada_setup(rng)
    out = merge.adamerging(stacked, base=base, apply_fn=apply_fn, inputs=inputs, heads=heads,
                           steps=60, learning_rate=0.05, batch_size=40, key=jax.random.key(1))
    lam = out.coefficients.astype(np.float64)
    assert out.coefficients.shape == (2, 2) and out.paths == ("dense/bias", "dense/kernel")
    start = _numpy_entropy(np.full((2, 2), 0.3), base, stacked, heads, inputs)
    end = _numpy_entropy(lam, base, stacked, heads, inputs)
    assert len(out.entropy) == 61 and end < 0.5 * start
    np.testing.assert_allclose([out.entropy[0], out.entropy[-1]], [start, end], rtol=1e-5)
    for i, p in enumerate(out.paths):
        a, b = p.split("/")
        np.testing.assert_allclose(out.delta[a][b],
                                   np.tensordot(lam[:, i], stacked[a][b], axes=1), rtol=1e-5,
                                   atol=1e-6)
    task = merge.adamerging(stacked, base=base, apply_fn=apply_fn, inputs=inputs, heads=heads,
                            steps=3, granularity="task", clamp=(0.0, 0.31))
    assert task.coefficients.shape == (2,) and np.all(task.coefficients <= 0.31)
    with pytest.raises(ValueError, match="adamerging runs the model"):
        merge.adamerging(stacked)


def test_adamerging_gradient_matches_finite_differences():
    rng = np.random.default_rng(10)
    base, stacked, heads, inputs, apply_fn = _ada_setup(rng)
    with jax.enable_x64(True):
        f64 = lambda t: jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), t)  # noqa: E731
        leaves = [jnp.asarray(x, jnp.float64) for x in jax.tree.leaves(stacked)]
        base_leaves = [jnp.asarray(x, jnp.float64) for x in jax.tree.leaves(base)]
        treedef = jax.tree.structure(base)
        batches = [jnp.asarray(x[:8], jnp.float64) for x in inputs]

        def objective(lam):
            return ada_lib.entropy_objective(lam, leaves, base_leaves, treedef, apply_fn,
                                             [f64(h) for h in heads], batches)

        lam = jnp.asarray(rng.uniform(0.1, 0.6, size=(2, 2)))
        grad = np.asarray(jax.grad(objective)(lam))
        eps, fd = 1e-6, np.zeros((2, 2))
        for idx in np.ndindex(2, 2):
            e = np.zeros((2, 2))
            e[idx] = eps
            fd[idx] = (objective(lam + e) - objective(lam - e)) / (2 * eps)
    np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-9)


def test_data_merges_are_marked_in_the_registry():
    assert merge.info("regmean").uses == "statistics" and merge.info("regmean").data == ("grams",)
    assert merge.info("fisher").data == ("fishers",)
    assert merge.info("regmean_pp").uses == "model" and merge.info("adamerging").uses == "model"
    assert "base" in merge.info("adamerging").data and merge.info("tsv").uses == "nothing"
    assert merge.info("regmean").defaults == {"off_diagonal_scale": 0.95}
    assert merge.info("adamerging").defaults == {
        "granularity": "layer", "init": 0.3, "steps": 1000, "learning_rate": 1e-3,
        "batch_size": 16, "clamp": None}
