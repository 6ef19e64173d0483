"""Per-task linear classification heads.

ATM (arXiv 2411.03055) merges only the shared backbone; every task keeps its own
head, so a head is a tiny plain dict that never enters a task vector.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def init_head(key: jax.Array, in_features: int, num_classes: int) -> dict[str, jax.Array]:
    """Initializes a linear head.

    The kernel is LeCun-normal (std 1/sqrt(in_features)) rather than zero: a frozen
    zero head would give the backbone no gradient at all, and a random projection of
    normalized features gives logits of order one.

    Args:
        key: PRNG key.
        in_features: feature size F of the backbone.
        num_classes: number of classes C.

    Returns:
        {"kernel": [F, C] float32, "bias": [C] float32 zeros}.
    """
    if in_features < 1 or num_classes < 1:
        raise ValueError(
                f"in_features={in_features} and num_classes={num_classes} must both be >= 1"
        )
    kernel = jax.random.normal(key, (in_features, num_classes), jnp.float32)
    return {
            "kernel": kernel / jnp.sqrt(jnp.float32(in_features)),
            "bias": jnp.zeros((num_classes,), jnp.float32),
    }


def apply_head(head: dict[str, jax.Array], features: jax.Array) -> jax.Array:
    """Maps features to logits.

    Args:
        head: {"kernel": [F, C], "bias": [C]}.
        features: [B, F].

    Returns:
        [B, C] logits.
    """
    return features @ head["kernel"] + head["bias"]
