"""Frozen classification heads of the paper's two setups.

Vision (ATM, arXiv 2411.03055, Sec. 5, following task vectors, arXiv 2212.04089):
each task's head is CLIP's zero-shot classifier, built once from the text tower
and never trained or merged. For every class, each prompt template is filled with
the class name and embedded; the embeddings are L2-normalized, averaged over the
templates and normalized again; the C class embeddings become the columns of the
kernel, scaled by CLIP's temperature ``exp(logit_scale)``. Image features are
L2-normalized before the head, so logits are scaled cosine similarities.

NLP: each GLUE task gets a randomly initialized linear head on the pooled output,
frozen, drawn with the same seed in every run (`glue_head`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from atm_jax.models.heads import init_head

GLUE_HEAD_SEED = 0
"""Seed of the frozen GLUE heads, the same for every run and method."""

Template = str | Callable[[str], str]


def _fill(template: Template, class_name: str) -> str:
    if callable(template):
        return template(class_name)
    return template.format(c=class_name)


def _unit(x: jax.Array, axis: int = -1) -> jax.Array:
    return x / jnp.linalg.norm(x, axis=axis, keepdims=True)


def zero_shot_head(
    encode_text: Callable[[jax.Array, jax.Array], jax.Array],
    tokenize: Callable[[list[str]], tuple[jax.Array, jax.Array]],
    class_names: Sequence[str],
    templates: Sequence[Template],
    logit_scale: float | jax.Array,
) -> dict[str, jax.Array]:
    """Builds a CLIP zero-shot classification head, the task-vectors way.

    Classes are embedded one at a time (all templates of a class in one batch),
    which bounds memory for tasks with many classes and templates.

    Args:
      encode_text: ``(token_ids [T, L], attention_mask [T, L]) -> [T, D]`` text
        embeddings (CLIP's projected text features).
      tokenize: ``list[str] -> (token_ids [T, L], attention_mask [T, L])``.
      class_names: C class names.
      templates: Prompt templates, ``str.format`` strings with a ``{c}`` field
        (as in `atm_jax.data.paper.PAPER_TASKS`) or callables ``name -> prompt``.
      logit_scale: CLIP's learned log temperature (ln 100 = 4.6052 for OpenAI's
        ViT-B/16); the kernel is multiplied by ``exp(logit_scale)``.

    Returns:
      {"kernel": float32 [D, C], "bias": float32 zeros [C]}, for
      `atm_jax.models.heads.apply_head` on L2-normalized image features.
    """
    if not class_names or not templates:
        raise ValueError("zero_shot_head needs at least one class name and one template")
    columns = []
    for name in class_names:
        ids, mask = tokenize([_fill(t, name) for t in templates])
        embeddings = jnp.asarray(encode_text(ids, mask), jnp.float32)
        columns.append(_unit(jnp.mean(_unit(embeddings), axis=0)))
    kernel = jnp.stack(columns, axis=1) * jnp.exp(jnp.asarray(logit_scale, jnp.float32))
    return {"kernel": kernel, "bias": jnp.zeros((len(class_names),), jnp.float32)}


def glue_head(
    key: jax.Array | int | None, width: int, num_classes: int
) -> dict[str, jax.Array]:
    """A frozen random linear head for a GLUE task (never trained, never merged).

    Args:
      key: PRNG key, or an int seed; None uses `GLUE_HEAD_SEED`. The paper uses
        one fixed seed so every run and merging method sees the same heads.
      width: Width of the pooled features (768 for BERT/RoBERTa-base).
      num_classes: Number of classes C.

    Returns:
      {"kernel": float32 [width, C], "bias": float32 zeros [C]} as
      `atm_jax.models.heads.init_head` draws it.
    """
    if key is None:
        key = GLUE_HEAD_SEED
    if isinstance(key, (int, np.integer)):
        key = jax.random.key(int(key))
    return init_head(key, width, num_classes)
