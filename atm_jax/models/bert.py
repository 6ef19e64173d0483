"""BERT (Devlin et al. 2019, arXiv 1810.04805) and RoBERTa (Liu et al. 2019, arXiv
1907.11692) encoders in Flax linen, laid out like Hugging Face.

Params are a plain nested dict whose module names follow HF's ``BertModel`` /
``RobertaModel`` with list items named ``layer_<i>``::

  embeddings/{word_embeddings,position_embeddings,token_type_embeddings}/embedding
  embeddings/LayerNorm/{scale,bias}
  encoder/layer_<i>/attention/self/{query,key,value}/{kernel,bias}
  encoder/layer_<i>/attention/output/{dense,LayerNorm}/...
  encoder/layer_<i>/intermediate/dense/...  encoder/layer_<i>/output/{dense,LayerNorm}/...
  pooler/dense/{kernel,bias}

`atm_jax.models.hf` maps them to HF tensor names. The two families differ only in
position ids: BERT counts 0, 1, 2, ...; RoBERTa starts at ``pad_token_id + 1`` and gives
padding tokens the padding position, as HF computes them.

There is no dropout: the modules are deterministic (inference and finetuning without
dropout alike), so ``apply`` needs no RNG. Configs are HF ``BertConfig`` /
``RobertaConfig`` dicts; keys that HF's ``save_pretrained`` leaves out because they
equal its defaults are read with those defaults.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

FAMILIES = ("bert", "roberta")
# HF BertConfig / RobertaConfig defaults (transformers 5.23) for keys a saved
# config.json omits. RobertaConfig only changes the special token ids.
DEFAULTS = {
    "vocab_size": 30522,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "hidden_act": "gelu",
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-12,
    "pad_token_id": 0,
    "position_embedding_type": "absolute",
}
ROBERTA_DEFAULTS = {**DEFAULTS, "pad_token_id": 1}

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


def settings(config: Mapping[str, Any]) -> dict:
    """HF's defaults for the config's family overlaid with the config (None = absent)."""
    family = config.get("model_type")
    if family not in FAMILIES:
        raise ValueError(f"model_type {family!r} is not one of {FAMILIES}")
    defaults = ROBERTA_DEFAULTS if family == "roberta" else DEFAULTS
    return {**defaults, **{k: v for k, v in config.items() if v is not None}}


def _layer_norm(eps: float, name: str) -> nn.LayerNorm:
    # Two-pass variance, as torch computes it; the fast E[x²]−E[x]² form drifts.
    return nn.LayerNorm(epsilon=eps, use_fast_variance=False, name=name)


class Embeddings(nn.Module):
    """word + position + token-type embeddings, then LayerNorm.

    Attributes:
        vocab_size: token vocabulary.
        max_positions: position table size.
        type_vocab_size: token-type table size.
        width: hidden size H.
        eps: LayerNorm epsilon.
        init_std: standard deviation of the random init.
    """

    vocab_size: int
    max_positions: int
    type_vocab_size: int
    width: int
    eps: float
    init_std: float

    @nn.compact
    def __call__(self, input_ids, position_ids, token_type_ids) -> jax.Array:
        init = nn.initializers.normal(self.init_std)

        def table(size: int, name: str) -> nn.Embed:
            return nn.Embed(size, self.width, embedding_init=init, name=name)

        x = table(self.vocab_size, "word_embeddings")(input_ids)
        x = x + table(self.max_positions, "position_embeddings")(position_ids)
        x = x + table(self.type_vocab_size, "token_type_embeddings")(token_type_ids)
        return _layer_norm(self.eps, "LayerNorm")(x)


class SelfAttention(nn.Module):
    """query/key/value projections and scaled dot-product attention.

    Attributes:
        num_heads: attention heads; must divide the hidden size.
        init_std: standard deviation of the random init.
    """

    num_heads: int
    init_std: float

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        width = x.shape[-1]
        head_dim = width // self.num_heads

        def heads(name: str) -> jax.Array:
            y = _dense(width, self.init_std, name)(x)
            return y.reshape(*x.shape[:-1], self.num_heads, head_dim)

        y = jax.nn.dot_product_attention(heads("query"), heads("key"), heads("value"), mask=mask)
        return y.reshape(x.shape)


def _dense(features: int, init_std: float, name: str) -> nn.Dense:
    return nn.Dense(features, kernel_init=nn.initializers.normal(init_std), name=name)


class DenseLayerNorm(nn.Module):
    """LN(residual + dense(x)): HF's ``BertSelfOutput`` and ``BertOutput``.

    Attributes:
        width: output width.
        eps: LayerNorm epsilon.
        init_std: standard deviation of the random init.
    """

    width: int
    eps: float
    init_std: float

    @nn.compact
    def __call__(self, x: jax.Array, residual: jax.Array) -> jax.Array:
        y = _dense(self.width, self.init_std, "dense")(x)
        return _layer_norm(self.eps, "LayerNorm")(residual + y)


class Attention(nn.Module):
    """HF's ``BertAttention``: ``self`` (attention) then ``output`` (dense + LN).

    Attributes:
        num_heads: attention heads.
        eps: LayerNorm epsilon.
        init_std: standard deviation of the random init.
    """

    num_heads: int
    eps: float
    init_std: float

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        y = SelfAttention(self.num_heads, self.init_std, name="self")(x, mask)
        return DenseLayerNorm(x.shape[-1], self.eps, self.init_std, name="output")(y, x)


class Intermediate(nn.Module):
    """HF's ``BertIntermediate``: dense then activation.

    Attributes:
        features: FFN hidden width.
        act: activation name.
        init_std: standard deviation of the random init.
    """

    features: int
    act: str
    init_std: float

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return ACTIVATIONS[self.act](_dense(self.features, self.init_std, "dense")(x))


class Layer(nn.Module):
    """One post-LayerNorm block: y = LN(x + attn(x)), then LN(y + FFN(y)).

    Attributes:
        num_heads: attention heads.
        intermediate_size: FFN hidden width.
        act: FFN activation name.
        eps: LayerNorm epsilon.
        init_std: standard deviation of the random init.
    """

    num_heads: int
    intermediate_size: int
    act: str
    eps: float
    init_std: float

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        x = Attention(self.num_heads, self.eps, self.init_std, name="attention")(x, mask)
        y = Intermediate(self.intermediate_size, self.act, self.init_std, name="intermediate")(x)
        return DenseLayerNorm(x.shape[-1], self.eps, self.init_std, name="output")(y, x)


class LayerStack(nn.Module):
    """HF's ``BertEncoder``: layers named ``layer_<i>``.

    Attributes:
        depth: number of layers.
        num_heads: attention heads.
        intermediate_size: FFN hidden width.
        act: FFN activation name.
        eps: LayerNorm epsilon.
        init_std: standard deviation of the random init.
    """

    depth: int
    num_heads: int
    intermediate_size: int
    act: str
    eps: float
    init_std: float

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        for i in range(self.depth):
            x = Layer(
                self.num_heads, self.intermediate_size, self.act, self.eps, self.init_std,
                name=f"layer_{i}",
            )(x, mask)  # fmt: skip
        return x


class Pooler(nn.Module):
    """HF's ``BertPooler``: tanh(dense(first token)).

    Attributes:
        init_std: standard deviation of the random init.
    """

    init_std: float

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.tanh(_dense(x.shape[-1], self.init_std, "dense")(x[:, 0]))


class Encoder(nn.Module):
    """BERT / RoBERTa encoder with pooler.

    Attributes:
        family: ``"bert"`` or ``"roberta"`` (position-id rule).
        vocab_size: token vocabulary.
        max_positions: position table size.
        type_vocab_size: token-type table size.
        width: hidden size H.
        depth: transformer layers.
        num_heads: attention heads.
        intermediate_size: FFN hidden width.
        act: FFN activation name.
        eps: LayerNorm epsilon.
        pad_token_id: padding id (RoBERTa's positions skip it).
        init_std: standard deviation of the random init.
    """

    family: str
    vocab_size: int
    max_positions: int
    type_vocab_size: int
    width: int
    depth: int
    num_heads: int
    intermediate_size: int
    act: str
    eps: float
    pad_token_id: int
    init_std: float = 0.02

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """Encodes token sequences.

        Args:
            input_ids: [B, L] int32 token ids.
            attention_mask: [B, L], 1 for real tokens, 0 for padding (keys at padding
                are masked; outputs at padded positions are computed but meaningless).
                None means no padding.
            token_type_ids: [B, L] segment ids; None means all zeros.

        Returns:
            (last_hidden_state [B, L, H], pooled_output [B, H]): the pooled output is
            dense + tanh of the first token's final state.
        """
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        length = input_ids.shape[-1]
        if self.family == "roberta":
            real = (input_ids != self.pad_token_id).astype(jnp.int32)
            position_ids = jnp.cumsum(real, axis=-1) * real + self.pad_token_id
        else:
            position_ids = jnp.broadcast_to(jnp.arange(length), input_ids.shape)
        x = Embeddings(
            self.vocab_size, self.max_positions, self.type_vocab_size, self.width, self.eps,
            self.init_std, name="embeddings",
        )(input_ids, position_ids, token_type_ids)  # fmt: skip
        mask = (attention_mask != 0)[:, None, None, :]
        x = LayerStack(
            self.depth, self.num_heads, self.intermediate_size, self.act, self.eps,
            self.init_std, name="encoder",
        )(x, mask)  # fmt: skip
        pooled = Pooler(self.init_std, name="pooler")(x)
        return x, pooled


def encoder(config: Mapping[str, Any]) -> Encoder:
    """Builds the encoder of an HF ``BertConfig`` / ``RobertaConfig`` dict.

    ``module.apply({"params": p}, input_ids, attention_mask, token_type_ids)`` returns
    ``(last_hidden_state [B, L, H], pooled_output [B, H])``.
    """
    s = settings(config)
    if s["position_embedding_type"] != "absolute":
        raise ValueError(
            f"position_embedding_type {s['position_embedding_type']!r} is not supported "
            "(only 'absolute')"
        )
    if s["hidden_act"] not in ACTIVATIONS:
        raise ValueError(f"hidden_act {s['hidden_act']!r} is not one of {sorted(ACTIVATIONS)}")
    return Encoder(
        family=str(s["model_type"]),
        vocab_size=int(s["vocab_size"]),
        max_positions=int(s["max_position_embeddings"]),
        type_vocab_size=int(s["type_vocab_size"]),
        width=int(s["hidden_size"]),
        depth=int(s["num_hidden_layers"]),
        num_heads=int(s["num_attention_heads"]),
        intermediate_size=int(s["intermediate_size"]),
        act=str(s["hidden_act"]),
        eps=float(s["layer_norm_eps"]),
        pad_token_id=int(s["pad_token_id"]),
        init_std=float(s["initializer_range"]),
    )


def param_shapes(config: Mapping[str, Any]) -> dict:
    """The params tree of `init_params` as ``jax.ShapeDtypeStruct`` leaves (no compute)."""
    ids = jax.ShapeDtypeStruct((1, 4), jnp.int32)
    return jax.eval_shape(encoder(config).init, jax.random.PRNGKey(0), ids)["params"]


def init_params(config: Mapping[str, Any], key: jax.Array) -> dict:
    """Randomly initialises encoder params as HF does.

    normal(initializer_range) weights and embeddings, zero biases, unit LayerNorm
    scales, drawn on the host with NumPy seeded from ``key``: a jitted Flax ``init``
    compiles for seconds on CPU, which tiny smoke models should not pay.
    ``module.init`` works too (same distributions).

    Args:
        config: HF ``BertConfig`` / ``RobertaConfig`` dict.
        key: PRNG key.

    Returns:
        Plain nested dict of float32 NumPy arrays.
    """
    abstract = param_shapes(config)
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())
    std = float(settings(config)["initializer_range"])

    def draw(path, spec) -> np.ndarray:
        leaf = path[-1].key
        if leaf == "bias":
            return np.zeros(spec.shape, np.float32)
        if leaf == "scale":
            return np.ones(spec.shape, np.float32)
        return (rng.standard_normal(spec.shape) * std).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, abstract)


def tiny_config(model_type: str = "bert", **overrides: Any) -> dict:
    """An HF-style ``BertConfig`` / ``RobertaConfig`` dict for a tiny encoder.

    Hidden 32, 2 layers, 2 heads, intermediate 64, a 1000-token vocabulary; BERT has 64
    positions and 2 token types, RoBERTa 64 + 2 positions (its ids start after the
    padding id 1), 1 token type and LayerNorm eps 1e-5, as roberta-base.

    Args:
        model_type: ``"bert"`` or ``"roberta"``.
        **overrides: keys to replace.

    Returns:
        A JSON-serialisable config dict.
    """
    if model_type not in FAMILIES:
        raise ValueError(f"model_type {model_type!r} is not one of {FAMILIES}")
    config = {
        "model_type": model_type,
        "architectures": ["BertModel" if model_type == "bert" else "RobertaModel"],
        "vocab_size": 1000,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "hidden_act": "gelu",
        "max_position_embeddings": 64,
        "type_vocab_size": 2,
        "initializer_range": 0.02,
        "layer_norm_eps": 1e-12,
        "pad_token_id": 0,
        "position_embedding_type": "absolute",
    }
    if model_type == "roberta":
        config.update(max_position_embeddings=66, type_vocab_size=1, layer_norm_eps=1e-5,
                      pad_token_id=1, bos_token_id=0, eos_token_id=2)  # fmt: skip
    config = copy.deepcopy(config)
    config.update(overrides)
    return config
