"""A small Vision Transformer for 28×28×1 images, the shared backbone of the mini suite.

No vision transformer weights ship with any registry reachable offline, so the mini
suite pretrains this model itself on rendered font glyphs (`atm_jax.pretrain`) and
then runs ATM (arXiv 2411.03055) on its parameters.

With the defaults (patch 7 → 16 patch tokens + 1 class token, width 128, depth 4,
4 heads, MLP 512) the model has ≈0.80M parameters. It has no dropout and no
BatchNorm, so `init` returns a single `"params"` collection of plain nested dicts
and every task vector is an ordinary pytree.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


class EncoderBlock(nn.Module):
    """One pre-LayerNorm transformer block: x + MHA(LN(x)), then x + MLP(LN(x)).

    Attributes:
        num_heads: attention heads; must divide the token width.
        mlp_dim: hidden width of the GELU MLP.
    """

    num_heads: int
    mlp_dim: int

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        """Applies the block.

        Args:
            tokens: [B, N, D] token features.

        Returns:
            [B, N, D] updated token features.
        """
        width = tokens.shape[-1]
        y = nn.LayerNorm(name="attention_norm")(tokens)
        y = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, name="attention")(y)
        tokens = tokens + y
        y = nn.LayerNorm(name="mlp_norm")(tokens)
        y = nn.Dense(self.mlp_dim, name="mlp_in")(y)
        y = nn.gelu(y)
        y = nn.Dense(width, name="mlp_out")(y)
        return tokens + y


class ViT(nn.Module):
    """Vision Transformer returning the final class-token feature.

    Attributes:
        patch_size: side of the square patches; must divide the image height and width.
        width: token width D (also the output feature size).
        depth: number of transformer blocks.
        num_heads: attention heads per block; must divide `width`.
        mlp_dim: hidden width of each block's MLP.
    """

    patch_size: int = 7
    width: int = 128
    depth: int = 4
    num_heads: int = 4
    mlp_dim: int = 512

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        """Embeds images into one feature vector each.

        Args:
            images: [B, H, W, C] float32 images (28×28×1 in the mini suite).
            train: accepted so every backbone shares the `apply_fn(params, images, train)`
                signature; this model behaves identically in both modes (no dropout).

        Returns:
            [B, width] class-token features after the final LayerNorm.
        """
        del train
        _, height, width_px, _ = images.shape
        if height % self.patch_size or width_px % self.patch_size:
            raise ValueError(
                    f"patch_size={self.patch_size} must divide the image size {height}×{width_px}"
            )
        if self.width % self.num_heads:
            raise ValueError(f"num_heads={self.num_heads} must divide width={self.width}")

        patches = nn.Conv(
                self.width,
                kernel_size=(self.patch_size, self.patch_size),
                strides=(self.patch_size, self.patch_size),
                padding="VALID",
                name="patch_embedding",
        )(images)
        batch = patches.shape[0]
        tokens = patches.reshape(batch, -1, self.width)

        class_token = self.param("class_token", nn.initializers.zeros, (1, 1, self.width))
        tokens = jnp.concatenate(
                [jnp.broadcast_to(class_token, (batch, 1, self.width)), tokens], axis=1
        )
        # The position embedding covers the class token too, as in the original ViT.
        position = self.param(
                "position_embedding", nn.initializers.normal(stddev=0.02), (1,) + tokens.shape[1:]
        )
        tokens = tokens + position

        for i in range(self.depth):
            tokens = EncoderBlock(self.num_heads, self.mlp_dim, name=f"block_{i}")(tokens)
        tokens = nn.LayerNorm(name="final_norm")(tokens)
        return tokens[:, 0]


_FIELDS = ("patch_size", "width", "depth", "num_heads", "mlp_dim")


def vit_from_config(model_cfg: Mapping[str, Any] | Any) -> ViT:
    """Builds a `ViT` from a config.

    Args:
        model_cfg: an `ml_collections.ConfigDict` or a mapping with any of the fields
            `patch_size`, `width`, `depth`, `num_heads`, `mlp_dim` (missing ones keep
            their defaults). A `name` key, which selects the model elsewhere, is ignored.

    Returns:
        The configured (unbound) module.

    Raises:
        ValueError: on a field this model does not have.
    """
    fields = model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else dict(model_cfg)
    fields.pop("name", None)
    unknown = sorted(set(fields) - set(_FIELDS))
    if unknown:
        raise ValueError(f"unknown ViT config fields {unknown}; allowed: {list(_FIELDS)}")
    return ViT(**fields)
