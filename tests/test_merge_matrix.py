"""Tests of `atm_jax.merge.matrix`: which leaves read as the papers' ``W ∈ R^{out×in}``.

The expected matrices are written here from the layouts Flax and PyTorch store
(``nn.Dense`` kernel ``[in, out]``, ``DenseGeneral`` q/k/v ``[d, heads, hd]`` and
attention output ``[heads, hd, d]``, torch ``weight`` ``[out, in]``) and checked
functionally: the module's own forward pass (bias zero) equals ``W @ x`` in NumPy.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from atm_jax import tree as tree_lib
from atm_jax.merge import matrix
from atm_jax.models import bert, clip, vit_tiny

F32 = np.float32

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _rand(seed, *shape):
    return np.random.default_rng(seed).standard_normal(shape).astype(F32)


def _shape_of(v):
    return None if v is None else v.matrix_shape


def _views(tree, *, embeddings=False):
    """{path: MatrixView | None} for an (unstacked) params tree."""
    return {p: matrix.view(p, np.shape(x), embeddings=embeddings)
            for p, x in zip(tree_lib.leaf_paths(tree), jax.tree.leaves(tree))}


# ----------------------------------------------------------------------------
# The table of the module docstring, leaf by leaf
# ----------------------------------------------------------------------------

VIEW_CASES = [
    # path, one task's shape, embeddings, expected (out, in) or None
    ("dense/kernel", (12, 8), False, (8, 12)),
    ("fc1/kernel", (6, 10), False, (10, 6)),  # an NNX Linear path
    ("attn/query/kernel", (6, 2, 4), False, (8, 6)),  # q/k/v by name, d != heads*hd
    ("attn/key/kernel", (6, 2, 4), False, (8, 6)),
    ("attn/value/kernel", (6, 2, 4), False, (8, 6)),
    ("attn/out/kernel", (2, 4, 6), False, (6, 8)),  # output by name
    ("attn/out_proj/kernel", (2, 4, 6), False, (6, 8)),
    ("mha/proj_a/kernel", (6, 2, 3), False, (6, 6)),  # by shape: [d, h, k], d = h*k
    ("mha/proj_b/kernel", (2, 3, 6), False, (6, 6)),  # by shape: [h, k, d], d = h*k
    ("conv1d/kernel", (3, 4, 5), False, None),  # [width, in, out]: unreadable, the mean
    ("lin/weight", (5, 9), False, (5, 9)),  # torch layout, as stored
    ("lin/weight", (5, 9), True, (5, 9)),
    ("model/embed_tokens/weight", (20, 6), False, None),
    ("model/embed_tokens/weight", (20, 6), True, (20, 6)),
    ("tok/embedding", (20, 6), False, None),
    ("tok/embedding", (20, 6), True, (20, 6)),
    ("dense/bias", (8,), False, None),
    ("ln/scale", (8,), True, None),
    ("ln/weight", (8,), False, None),  # a 1-D torch weight (LayerNorm)
    ("conv/kernel", (3, 3, 2, 4), False, None),
    ("cls_token", (1, 1, 8), False, None),
    ("position_embedding", (1, 17, 8), True, None),  # a bare param, not nn.Embed
    ("empty/kernel", (0, 4), False, None),
    ("kernel", (4, 3), False, (3, 4)),  # a bare 2-D kernel at the root
]


@pytest.mark.parametrize("path,shape,embeddings,want", VIEW_CASES,
                         ids=[f"{c[0]}{list(c[1])}{'-emb' if c[2] else ''}" for c in VIEW_CASES])
def test_view_table(path, shape, embeddings, want):
    v = matrix.view(path, shape, embeddings=embeddings)
    assert _shape_of(v) == want, (path, shape, v)
    if want is not None:
        assert v.rank == min(want)
        assert (v.out_features, v.in_features) == want


def _expected_matrix(kind, x):
    """One task's leaf ``x`` as ``[out, in]`` in NumPy, from the stored layout."""
    if kind == "dense":  # [in, out]
        return x.T
    if kind == "qkv":  # [d, h, k]
        return x.reshape(x.shape[0], -1).T
    if kind == "out":  # [h, k, d]
        return x.reshape(-1, x.shape[-1]).T
    assert kind == "torch"
    return x


@pytest.mark.parametrize("path,shape,kind", [
    ("dense/kernel", (12, 8), "dense"),
    ("attn/query/kernel", (6, 2, 4), "qkv"),
    ("attn/out/kernel", (2, 4, 6), "out"),
    ("mha/proj_a/kernel", (6, 2, 3), "qkv"),
    ("mha/proj_b/kernel", (2, 3, 6), "out"),
    ("lin/weight", (5, 9), "torch"),
    ("tok/embedding", (7, 3), "torch"),
])
def test_to_matrix_values_and_round_trip(path, shape, kind):
    v = matrix.view(path, shape, embeddings=True)
    x = _rand(1, 3, *shape)  # with a task axis: leading axes are kept
    got = np.asarray(v.to_matrix(x))
    np.testing.assert_array_equal(got, np.stack([_expected_matrix(kind, xt) for xt in x]))
    back = np.asarray(v.from_matrix(got))
    assert back.shape == x.shape
    np.testing.assert_array_equal(back, x)


# ----------------------------------------------------------------------------
# The matrix is the map the module applies: module(x) - bias == W @ x
# ----------------------------------------------------------------------------


def _assert_map(y, w, x, what):
    want = np.asarray(w, np.float64) @ np.asarray(x, np.float64)
    err = np.max(np.abs(np.asarray(y, np.float64) - want)) / np.max(np.abs(want))
    assert err < 2e-7, f"{what}: module output differs from W @ x by {err:.1e} (relative max)"


def _random_params(module, *args):
    """Params of ``module`` as random float32 NumPy arrays: shapes from jax.eval_shape
    (a real ``init`` compiles for seconds on CPU; the layout is the same)."""
    shapes = jax.eval_shape(module.init, jax.random.key(0), *args)["params"]
    leaves, treedef = jax.tree.flatten(shapes)
    return jax.tree.unflatten(treedef, [_rand(100 + i, *x.shape) for i, x in enumerate(leaves)])


@jax.jit
def _forward(fc1, q, o, x, h):
    """The three Flax layers with zero bias: Dense(10), DenseGeneral q (2x3), out (8)."""
    dense = nn.Dense(10).apply({"params": {"kernel": fc1, "bias": jnp.zeros(10)}}, x)
    query = nn.DenseGeneral((2, 3), axis=-1).apply(
        {"params": {"kernel": q, "bias": jnp.zeros((2, 3))}}, x)
    out = nn.DenseGeneral(8, axis=(-2, -1)).apply(
        {"params": {"kernel": o, "bias": jnp.zeros(8)}}, h)
    return dense, query, out


def test_linen_mlp_and_attention_views_are_the_modules_linear_maps():
    """A plain linen MLP + MultiHeadDotProductAttention (2 heads, qkv_features 6 on
    width 8): Dense -> (out, in), q/k/v [8, 2, 3] -> (6, 8), out [2, 3, 8] -> (8, 6).
    The module outputs match W @ x (float32 matmul): measured max error 4-6e-8 relative
    to max |W x|; tolerance 2e-7."""

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Dense(10, name="fc1")(x)
            x = nn.LayerNorm(name="norm")(x)
            x = nn.Dense(3, name="fc2")(x)
            y = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=6, out_features=8,
                                                name="attn")(jnp.ones((1, 2, 8)))
            return x, y

    params = _random_params(MLP(), jnp.ones((1, 8)))
    shapes = {p: _shape_of(v) for p, v in _views(params).items()}
    assert shapes == {
        "attn/key/bias": None, "attn/key/kernel": (6, 8),
        "attn/out/bias": None, "attn/out/kernel": (8, 6),
        "attn/query/bias": None, "attn/query/kernel": (6, 8),
        "attn/value/bias": None, "attn/value/kernel": (6, 8),
        "fc1/bias": None, "fc1/kernel": (10, 8),
        "fc2/bias": None, "fc2/kernel": (3, 10),
        "norm/bias": None, "norm/scale": None,
    }
    views = _views(params)
    x, h = _rand(3, 8), _rand(4, 2, 3)
    fc1 = params["fc1"]["kernel"]
    q, o = params["attn"]["query"]["kernel"], params["attn"]["out"]["kernel"]
    dense, query, out = _forward(fc1, q, o, x, h)
    _assert_map(dense, views["fc1/kernel"].to_matrix(fc1), x, "fc1")
    _assert_map(np.asarray(query).reshape(6), views["attn/query/kernel"].to_matrix(q), x, "query")
    _assert_map(out, views["attn/out/kernel"].to_matrix(o), h.reshape(6), "out")


def test_nnx_mlp_paths_and_views():
    """flax.nnx: nnx.state(model, nnx.Param) has the linen-style paths ``fc1/kernel``;
    nnx.Linear's kernel [in, out] reads as (out, in) and model.fc1(x) - bias == W @ x
    (measured 5e-8; tolerance 2e-7)."""

    class MLP(nnx.Module):
        def __init__(self, rngs):
            zeros = nnx.initializers.zeros_init()  # the random init costs ~2 s of eager ops
            self.fc1 = nnx.Linear(6, 10, kernel_init=zeros, rngs=rngs)
            self.norm = nnx.LayerNorm(10, rngs=rngs)
            self.fc2 = nnx.Linear(10, 3, kernel_init=zeros, rngs=rngs)

    model = MLP(nnx.Rngs(0))
    model.fc1.kernel.value = jnp.asarray(_rand(6, 6, 10))
    state = nnx.state(model, nnx.Param)
    shapes = {p: _shape_of(v) for p, v in _views(state).items()}
    assert shapes == {"fc1/bias": None, "fc1/kernel": (10, 6), "fc2/bias": None,
                      "fc2/kernel": (3, 10), "norm/bias": None, "norm/scale": None}
    x = _rand(5, 6)
    w = _views(state)["fc1/kernel"].to_matrix(jnp.asarray(model.fc1.kernel[...]))
    _assert_map(model.fc1(jnp.asarray(x)) - model.fc1.bias[...], w, x, "nnx fc1")


def test_vit_tiny_views():
    """atm_jax's ViT (width 8, 2 heads, depth 1, MLP 16; its params tree from
    jax.eval_shape, as a jitted init takes ~2.6 s here): the attention q/k/v and out
    kernels, mlp_in and mlp_out have matrices; the patch conv, class token, position
    table, biases and norms do not."""
    model = vit_tiny.ViT(patch_size=7, width=8, depth=1, num_heads=2, mlp_dim=16)
    params = _random_params(model, jnp.zeros((1, 28, 28, 1)))
    views = _views(params)
    matrices = {p: v.matrix_shape for p, v in views.items() if v is not None}
    block = "block_0/attention"
    assert matrices == {f"{block}/query/kernel": (8, 8), f"{block}/key/kernel": (8, 8),
                        f"{block}/value/kernel": (8, 8), f"{block}/out/kernel": (8, 8),
                        "block_0/mlp_in/kernel": (16, 8), "block_0/mlp_out/kernel": (8, 16)}
    for p in ("patch_embedding/kernel", "class_token", "position_embedding", "final_norm/scale",
              "block_0/attention/query/bias", "block_0/mlp_in/bias"):
        assert views[p] is None, p
    # Square here, so the layout decides: q/k/v are reshape(d, h*hd).T, out reshape(h*hd, d).T.
    q = np.asarray(params["block_0"]["attention"]["query"]["kernel"])
    o = np.asarray(params["block_0"]["attention"]["out"]["kernel"])
    assert q.shape == (8, 2, 4) and o.shape == (2, 4, 8)
    np.testing.assert_array_equal(np.asarray(views[f"{block}/query/kernel"].to_matrix(q)),
                                  q.reshape(8, 8).T)
    np.testing.assert_array_equal(np.asarray(views[f"{block}/out/kernel"].to_matrix(o)),
                                  o.reshape(8, 8).T)


def _by_path(shapes):
    return dict(zip(tree_lib.leaf_paths(shapes), (tuple(x.shape) for x in jax.tree.leaves(shapes))))


def test_clip_tiny_views_from_eval_shape():
    """CLIP's tiny config (width 32, MLP 64, 2 layers per tower, projection 16), shapes
    from jax.eval_shape: every 2-D kernel is (out, in); embeddings only when asked."""
    leaves = _by_path(clip.param_shapes(clip.tiny_config()))
    plain = {p: _shape_of(matrix.view(p, s)) for p, s in leaves.items()}
    with_emb = {p: _shape_of(matrix.view(p, s, embeddings=True)) for p, s in leaves.items()}
    kernels = {p: s for p, s in leaves.items() if p.endswith("/kernel") and len(s) == 2}
    assert len(kernels) == 2 * 2 * 6 + 2  # q/k/v/out/fc1/fc2 per layer, two projections
    for p, s in leaves.items():
        if p in kernels:
            assert plain[p] == (s[1], s[0]) == with_emb[p], p
        elif p.endswith("/embedding"):
            assert plain[p] is None and with_emb[p] == s, p
        else:  # biases, LayerNorm scales, the 4-D patch conv, class_embedding, logit_scale
            assert plain[p] is None and with_emb[p] is None, p
    assert plain["vision/encoder/layers_0/mlp/fc1/kernel"] == (64, 32)
    assert plain["vision/encoder/layers_1/mlp/fc2/kernel"] == (32, 64)
    assert plain["text/text_projection/kernel"] == (16, 32)
    assert leaves["vision/embeddings/patch_embedding/kernel"] == (8, 8, 3, 32)
    assert with_emb["text/embeddings/token_embedding/embedding"] == (1000, 32)
    assert sorted(p for p, s in with_emb.items() if s and p not in kernels) == [
        "text/embeddings/position_embedding/embedding", "text/embeddings/token_embedding/embedding",
        "vision/embeddings/position_embedding/embedding"]


def test_bert_tiny_views_from_eval_shape():
    """BERT's tiny config (hidden 32, intermediate 64, 2 layers): 13 Dense kernels read
    as (out, in); the three embedding tables only with embeddings=True."""
    leaves = _by_path(bert.param_shapes(bert.tiny_config()))
    plain = {p: _shape_of(matrix.view(p, s)) for p, s in leaves.items()}
    with_emb = {p: _shape_of(matrix.view(p, s, embeddings=True)) for p, s in leaves.items()}
    assert {p: m for p, m in plain.items() if m} == {
        **{f"encoder/layer_{i}/{name}/kernel": (32, 32) for i in (0, 1)
           for name in ("attention/self/query", "attention/self/key", "attention/self/value",
                        "attention/output/dense")},
        **{f"encoder/layer_{i}/intermediate/dense/kernel": (64, 32) for i in (0, 1)},
        **{f"encoder/layer_{i}/output/dense/kernel": (32, 64) for i in (0, 1)},
        "pooler/dense/kernel": (32, 32)}
    assert {p: m for p, m in with_emb.items() if m and not plain[p]} == {
        "embeddings/word_embeddings/embedding": (1000, 32),
        "embeddings/position_embeddings/embedding": (64, 32),
        "embeddings/token_type_embeddings/embedding": (2, 32)}
    assert with_emb["embeddings/LayerNorm/scale"] is None
