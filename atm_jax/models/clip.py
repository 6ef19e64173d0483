"""CLIP (Radford et al. 2021, arXiv 2103.00020) in Flax linen, laid out like Hugging Face.

The two towers are separate modules so the image encoder can be finetuned and merged
alone (ATM, arXiv 2411.03055, merges CLIP ViT image encoders). Full CLIP params are a
plain nested dict::

  {"vision": {"embeddings": ..., "pre_layrnorm": ..., "encoder": ...,
              "post_layernorm": ..., "visual_projection": ...},
   "text": {"embeddings": ..., "encoder": ..., "final_layer_norm": ...,
            "text_projection": ...},
   "logit_scale": float32 []}

Module names follow HF's ``CLIPModel`` (``pre_layrnorm`` keeps HF's spelling) with list
items named ``layers_<i>``, so ``vision/encoder/layers_0/self_attn/q_proj/kernel`` is
HF's ``vision_model.encoder.layers.0.self_attn.q_proj.weight`` transposed; the full map
lives in `atm_jax.models.hf`. Configs are HF ``CLIPConfig`` dicts (``text_config`` and
``vision_config`` subdicts); keys that HF's ``save_pretrained`` leaves out because they
equal its defaults are read with those defaults. There is no dropout (HF's CLIP
attention dropout is 0 and it is inference-only here): every forward is deterministic.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# HF CLIPTextConfig / CLIPVisionConfig / CLIPConfig defaults (transformers 5.23), used
# for keys that a saved config.json omits.
TEXT_DEFAULTS = {
    "vocab_size": 49408,
    "hidden_size": 512,
    "intermediate_size": 2048,
    "num_hidden_layers": 12,
    "num_attention_heads": 8,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "initializer_range": 0.02,
    "pad_token_id": 1,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
}
VISION_DEFAULTS = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_channels": 3,
    "image_size": 224,
    "patch_size": 32,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "initializer_range": 0.02,
}
CLIP_DEFAULTS = {"projection_dim": 512, "logit_scale_init_value": 2.6592}

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


def _activation(name: str) -> Callable[[jax.Array], jax.Array]:
    if name not in ACTIVATIONS:
        raise ValueError(f"hidden_act {name!r} is not supported; use one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def _section(config: Mapping[str, Any], name: str, defaults: Mapping[str, Any]) -> dict:
    """Returns ``config[name]`` over HF's defaults (None values count as absent)."""
    section = config.get(name) or {}
    return {**defaults, **{k: v for k, v in section.items() if v is not None}}


def text_settings(config: Mapping[str, Any]) -> dict:
    """The text tower's settings: HF defaults overlaid with ``config["text_config"]``."""
    return _section(config, "text_config", TEXT_DEFAULTS)


def vision_settings(config: Mapping[str, Any]) -> dict:
    """The vision tower's settings: HF defaults overlaid with ``config["vision_config"]``."""
    return _section(config, "vision_config", VISION_DEFAULTS)


def projection_dim(config: Mapping[str, Any]) -> int:
    """The shared embedding width (``CLIPConfig.projection_dim``)."""
    return int(config.get("projection_dim") or CLIP_DEFAULTS["projection_dim"])


class Attention(nn.Module):
    """Multi-head self-attention with HF CLIP's separate q/k/v/out projections.

    Attributes:
        num_heads: attention heads; must divide the token width.
    """

    num_heads: int

    @nn.compact
    def __call__(self, tokens: jax.Array, mask: jax.Array | None) -> jax.Array:
        """Applies attention.

        Args:
            tokens: [B, L, D] token features.
            mask: boolean, broadcastable to [B, heads, L, L]; True where a query may
                attend to a key. None attends everywhere.

        Returns:
            [B, L, D] attention output.
        """
        width = tokens.shape[-1]
        head_dim = width // self.num_heads

        def heads(name: str) -> jax.Array:
            y = nn.Dense(width, name=name)(tokens)
            return y.reshape(*tokens.shape[:-1], self.num_heads, head_dim)

        y = jax.nn.dot_product_attention(
            heads("q_proj"), heads("k_proj"), heads("v_proj"), mask=mask
        )
        return nn.Dense(width, name="out_proj")(y.reshape(tokens.shape))


class MLP(nn.Module):
    """fc1 → activation → fc2.

    Attributes:
        hidden: width of fc1's output.
        act: activation name (``quick_gelu`` for OpenAI CLIP).
    """

    hidden: int
    act: str

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = nn.Dense(self.hidden, name="fc1")(x)
        return nn.Dense(x.shape[-1], name="fc2")(_activation(self.act)(y))


class EncoderLayer(nn.Module):
    """Pre-LayerNorm block: x + attn(LN1(x)), then x + MLP(LN2(x)).

    Attributes:
        num_heads: attention heads.
        mlp_dim: MLP hidden width.
        act: MLP activation name.
        eps: LayerNorm epsilon.
    """

    num_heads: int
    mlp_dim: int
    act: str
    eps: float

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        y = _layer_norm(self.eps, "layer_norm1")(x)
        x = x + Attention(self.num_heads, name="self_attn")(y, mask)
        y = _layer_norm(self.eps, "layer_norm2")(x)
        return x + MLP(self.mlp_dim, self.act, name="mlp")(y)


class Encoder(nn.Module):
    """A stack of `EncoderLayer` named ``layers_<i>``.

    Attributes:
        depth: number of layers.
        num_heads: attention heads.
        mlp_dim: MLP hidden width.
        act: MLP activation name.
        eps: LayerNorm epsilon.
    """

    depth: int
    num_heads: int
    mlp_dim: int
    act: str
    eps: float

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        for i in range(self.depth):
            layer = EncoderLayer(
                self.num_heads, self.mlp_dim, self.act, self.eps, name=f"layers_{i}"
            )
            x = layer(x, mask)
        return x


def _layer_norm(eps: float, name: str) -> nn.LayerNorm:
    # Two-pass variance, as torch computes it; the fast E[x²]−E[x]² form drifts.
    return nn.LayerNorm(epsilon=eps, use_fast_variance=False, name=name)


class VisionEmbeddings(nn.Module):
    """Patch embedding (conv, no bias) + class token + learned positions.

    Attributes:
        width: token width D.
        patch_size: side of the square patches.
        num_positions: patches + 1.
        init_std: standard deviation of the random init.
    """

    width: int
    patch_size: int
    num_positions: int
    init_std: float

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        p = self.patch_size
        patches = nn.Conv(
            self.width, (p, p), strides=(p, p), padding="VALID", use_bias=False,
            kernel_init=nn.initializers.normal(self.init_std), name="patch_embedding",
        )(pixel_values)  # fmt: skip
        batch = patches.shape[0]
        # Row-major over (h, w), as HF's flatten(2) of the NCHW conv output.
        patches = patches.reshape(batch, -1, self.width)
        class_embedding = self.param(
            "class_embedding", nn.initializers.normal(self.width**-0.5), (self.width,)
        )
        cls = jnp.broadcast_to(class_embedding.astype(patches.dtype), (batch, 1, self.width))
        tokens = jnp.concatenate([cls, patches], axis=1)
        if tokens.shape[1] != self.num_positions:
            raise ValueError(
                f"{tokens.shape[1]} tokens but {self.num_positions} position embeddings: "
                f"pixel_values {pixel_values.shape} do not match the configured image_size"
            )
        positions = nn.Embed(
            self.num_positions, self.width,
            embedding_init=nn.initializers.normal(self.init_std), name="position_embedding",
        )  # fmt: skip
        return tokens + positions.embedding[None]


class VisionTower(nn.Module):
    """CLIP image encoder with its projection.

    Attributes:
        image_size: input side in pixels.
        patch_size: patch side.
        width: token width D.
        depth: transformer layers.
        num_heads: attention heads.
        mlp_dim: MLP hidden width.
        act: MLP activation name.
        eps: LayerNorm epsilon.
        projection_dim: output embedding width.
        init_std: standard deviation of the random init of embeddings.
    """

    image_size: int
    patch_size: int
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    act: str
    eps: float
    projection_dim: int
    init_std: float = 0.02

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        """Embeds images.

        Args:
            pixel_values: [B, H, W, C] float32, NHWC, already normalized.

        Returns:
            [B, projection_dim] image embeddings (projected, not L2-normalized).
        """
        num_positions = (self.image_size // self.patch_size) ** 2 + 1
        x = VisionEmbeddings(
            self.width, self.patch_size, num_positions, self.init_std, name="embeddings"
        )(pixel_values)
        x = _layer_norm(self.eps, "pre_layrnorm")(x)
        x = Encoder(
            self.depth, self.num_heads, self.mlp_dim, self.act, self.eps, name="encoder"
        )(x)
        pooled = _layer_norm(self.eps, "post_layernorm")(x[:, 0])
        return nn.Dense(self.projection_dim, use_bias=False, name="visual_projection")(pooled)


class TextEmbeddings(nn.Module):
    """Token + learned absolute position embeddings.

    Attributes:
        vocab_size: token vocabulary.
        max_positions: longest input.
        width: token width D.
        init_std: standard deviation of the random init.
    """

    vocab_size: int
    max_positions: int
    width: int
    init_std: float

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        init = nn.initializers.normal(self.init_std)
        tokens = nn.Embed(self.vocab_size, self.width, embedding_init=init, name="token_embedding")
        positions = nn.Embed(
            self.max_positions, self.width, embedding_init=init, name="position_embedding"
        )
        length = input_ids.shape[-1]
        if length > self.max_positions:
            raise ValueError(
                f"input length {length} exceeds max_position_embeddings {self.max_positions}"
            )
        return tokens(input_ids) + positions.embedding[None, :length]


class TextTower(nn.Module):
    """CLIP text encoder with its projection.

    Attributes:
        vocab_size: token vocabulary.
        max_positions: longest input.
        width: token width D.
        depth: transformer layers.
        num_heads: attention heads.
        mlp_dim: MLP hidden width.
        act: MLP activation name.
        eps: LayerNorm epsilon.
        eos_token_id: end-of-text id, where the sequence is pooled (HF's rule: id 2
            marks old configs, which pool at the largest id instead).
        projection_dim: output embedding width.
        init_std: standard deviation of the random init of embeddings.
    """

    vocab_size: int
    max_positions: int
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    act: str
    eps: float
    eos_token_id: int
    projection_dim: int
    init_std: float = 0.02

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """Embeds token sequences.

        Args:
            input_ids: [B, L] int32 token ids, each holding the EOS token.
            attention_mask: [B, L], 1 for real tokens and 0 for padding; None means
                no padding.

        Returns:
            [B, projection_dim] text embeddings (projected, not L2-normalized).
        """
        x = TextEmbeddings(
            self.vocab_size, self.max_positions, self.width, self.init_std, name="embeddings"
        )(input_ids)
        length = input_ids.shape[-1]
        mask = jnp.tril(jnp.ones((length, length), bool))[None, None]
        if attention_mask is not None:
            mask = mask & (attention_mask[:, None, None, :] != 0)
        x = Encoder(
            self.depth, self.num_heads, self.mlp_dim, self.act, self.eps, name="encoder"
        )(x, mask)
        x = _layer_norm(self.eps, "final_layer_norm")(x)
        if self.eos_token_id == 2:
            eos = jnp.argmax(input_ids, axis=-1)
        else:
            eos = jnp.argmax((input_ids == self.eos_token_id).astype(jnp.int32), axis=-1)
        pooled = jnp.take_along_axis(x, eos[:, None, None], axis=1)[:, 0]
        return nn.Dense(self.projection_dim, use_bias=False, name="text_projection")(pooled)


def vision_model(config: Mapping[str, Any]) -> VisionTower:
    """Builds the image encoder of an HF ``CLIPConfig`` dict.

    ``module.apply({"params": params["vision"]}, pixel_values)`` maps [B, H, W, 3]
    normalized images to [B, projection_dim] embeddings.
    """
    v = vision_settings(config)
    return VisionTower(
        image_size=int(v["image_size"]),
        patch_size=int(v["patch_size"]),
        width=int(v["hidden_size"]),
        depth=int(v["num_hidden_layers"]),
        num_heads=int(v["num_attention_heads"]),
        mlp_dim=int(v["intermediate_size"]),
        act=str(v["hidden_act"]),
        eps=float(v["layer_norm_eps"]),
        projection_dim=projection_dim(config),
        init_std=float(v["initializer_range"]),
    )


def text_model(config: Mapping[str, Any]) -> TextTower:
    """Builds the text encoder of an HF ``CLIPConfig`` dict.

    ``module.apply({"params": params["text"]}, input_ids, attention_mask)`` maps
    [B, L] ids to [B, projection_dim] embeddings.
    """
    t = text_settings(config)
    return TextTower(
        vocab_size=int(t["vocab_size"]),
        max_positions=int(t["max_position_embeddings"]),
        width=int(t["hidden_size"]),
        depth=int(t["num_hidden_layers"]),
        num_heads=int(t["num_attention_heads"]),
        mlp_dim=int(t["intermediate_size"]),
        act=str(t["hidden_act"]),
        eps=float(t["layer_norm_eps"]),
        eos_token_id=int(t["eos_token_id"]),
        projection_dim=projection_dim(config),
        init_std=float(t["initializer_range"]),
    )


def param_shapes(config: Mapping[str, Any]) -> dict:
    """The params tree of `init_params` as ``jax.ShapeDtypeStruct`` leaves (no compute)."""
    v, t = vision_settings(config), text_settings(config)
    side = int(v["image_size"])
    images = jax.ShapeDtypeStruct((1, side, side, int(v["num_channels"])), jnp.float32)
    ids = jax.ShapeDtypeStruct((1, int(t["max_position_embeddings"])), jnp.int32)
    key = jax.random.PRNGKey(0)
    return {
        "vision": jax.eval_shape(vision_model(config).init, key, images)["params"],
        "text": jax.eval_shape(text_model(config).init, key, ids)["params"],
        "logit_scale": jax.ShapeDtypeStruct((), jnp.float32),
    }


def init_params(config: Mapping[str, Any], key: jax.Array) -> dict:
    """Randomly initialises full CLIP params ``{"vision", "text", "logit_scale"}``.

    Follows HF's scheme (normal(initializer_range) weights, normal(D^-0.5) class
    token, zero biases, unit LayerNorm scales) drawn on the host with NumPy seeded
    from ``key``: a jitted Flax ``init`` compiles for seconds per tower on CPU, which
    tiny smoke models should not pay. ``module.init`` works too (same distributions).

    Args:
        config: HF ``CLIPConfig`` dict.
        key: PRNG key.

    Returns:
        Plain nested dict of float32 NumPy arrays; ``logit_scale`` is the config's
        ``logit_scale_init_value`` (log of the inverse temperature), as HF sets it.
    """
    v, t = vision_settings(config), text_settings(config)
    abstract = param_shapes(config)
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())
    std = {"vision": float(v["initializer_range"]), "text": float(t["initializer_range"])}

    def draw(path, spec) -> np.ndarray:
        tower, leaf = path[0].key, path[-1].key
        if leaf == "bias":
            return np.zeros(spec.shape, np.float32)
        if leaf == "scale":
            return np.ones(spec.shape, np.float32)
        scale = spec.shape[-1] ** -0.5 if leaf == "class_embedding" else std[tower]
        return (rng.standard_normal(spec.shape) * scale).astype(np.float32)

    del abstract["logit_scale"]
    params = jax.tree_util.tree_map_with_path(draw, abstract)
    scale = config.get("logit_scale_init_value", CLIP_DEFAULTS["logit_scale_init_value"])
    params["logit_scale"] = np.asarray(scale, np.float32)
    return params


def logits_per_image(
    image_embeds: jax.Array, text_embeds: jax.Array, logit_scale: jax.Array
) -> jax.Array:
    """CLIP's scaled cosine similarities, as HF's ``logits_per_image``.

    Args:
        image_embeds: [B_img, P] projected image embeddings.
        text_embeds: [B_txt, P] projected text embeddings.
        logit_scale: [] log inverse temperature.

    Returns:
        [B_img, B_txt] logits.
    """
    image = image_embeds / jnp.linalg.norm(image_embeds, axis=-1, keepdims=True)
    text = text_embeds / jnp.linalg.norm(text_embeds, axis=-1, keepdims=True)
    return jnp.exp(logit_scale) * image @ text.T


def tiny_config(**overrides: Any) -> dict:
    """An HF-style ``CLIPConfig`` dict for a tiny model (smoke tests, fixtures).

    32×32 images in 8×8 patches, width 32, 2 layers and 2 heads per tower, a
    1000-token vocabulary with 16 positions (BOS 998, EOS 999), projection 16.

    Args:
        **overrides: top-level keys to replace; ``text_config`` / ``vision_config``
            dicts are merged into the tiny towers key by key.

    Returns:
        A JSON-serialisable config dict.
    """
    tower = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 2, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
             "initializer_range": 0.02}  # fmt: skip
    config = {
        "model_type": "clip",
        "architectures": ["CLIPModel"],
        "projection_dim": 16,
        "logit_scale_init_value": 2.6592,
        "text_config": {**tower, "model_type": "clip_text_model", "vocab_size": 1000,
                        "max_position_embeddings": 16, "pad_token_id": 1,
                        "bos_token_id": 998, "eos_token_id": 999, "projection_dim": 16},
        "vision_config": {**tower, "model_type": "clip_vision_model", "image_size": 32,
                          "patch_size": 8, "num_channels": 3, "projection_dim": 16},
    }  # fmt: skip
    config = copy.deepcopy(config)
    for key, value in overrides.items():
        if key in ("text_config", "vision_config") and isinstance(value, Mapping):
            config[key].update(value)
        else:
            config[key] = value
    return config
