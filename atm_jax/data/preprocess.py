"""CLIP image preprocessing as jittable JAX functions.

The paper's vision recipe (ATM, arXiv 2411.03055, Sec. 5, following task vectors,
arXiv 2212.04089) feeds CLIP ViT-B/16 224x224 images:

* training: ``RandomResizedCrop(224, scale=(0.9, 1.0), bicubic)``, then CLIP's
  mean/std normalization;
* evaluation: ``Resize(224, bicubic)`` of the shorter side, ``CenterCrop(224)``,
  then the same normalization.

Both are written here with `jax.image.scale_and_translate` (Keys cubic kernel,
a = -0.5, the kernel PIL's BICUBIC uses, antialiased when shrinking like PIL), so
they run on device inside a jitted step on uint8 batches straight from
`atm_jax.data.paper`. Sampling the crop window directly is the same arithmetic as
resizing the whole image and cropping afterwards, without the intermediate image.

Differences from PIL, measured in ``tests/test_paper_data.py``: PIL rounds and
clips to uint8 after each of its two separable passes, these functions compute in
float32 and clip once at the end. On natural (smooth) images that is a rounding
difference of at most about one grey level; on white noise, where the cubic kernel
overshoots, PIL's clip between the passes can move single pixels by more.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
"""Per-channel mean of OpenAI CLIP's training images, on the 0..1 scale."""
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
"""Per-channel standard deviation of OpenAI CLIP's training images, on 0..1."""

# Candidate boxes drawn per image before falling back to a centre crop, as in
# torchvision's RandomResizedCrop.
_ATTEMPTS = 10


def grayscale_to_rgb(images: jax.Array | np.ndarray) -> jax.Array:
    """Repeats a single channel three times; RGB input is returned unchanged.

    Args:
      images: [..., H, W, 1] or [..., H, W, 3].

    Returns:
      [..., H, W, 3], same dtype.
    """
    images = jnp.asarray(images)
    if images.shape[-1] == 3:
        return images
    if images.shape[-1] != 1:
        raise ValueError(f"expected 1 or 3 channels, got shape {images.shape}")
    return jnp.repeat(images, 3, axis=-1)


def resize_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """Shape after resizing the shorter side to ``size``, keeping the aspect ratio.

    The longer side is truncated like torchvision's ``Resize(size)``.
    """
    if width <= height:
        return int(size * height / width), size
    return size, int(size * width / height)


@functools.partial(jax.jit, static_argnames="size")
def _sample(images: jax.Array, size: int, scale: jax.Array, translation: jax.Array) -> jax.Array:
    """Bicubic resampling of [B, H, W, C] to [B, size, size, C].

    Output pixel ``o`` (per axis) reads input coordinate ``(o + 0.5 - t) / s - 0.5``
    for the per-image ``scale`` s and ``translation`` t, both [B, 2] (y, x).
    """

    def one(image, s, t):
        return jax.image.scale_and_translate(
            image,
            (size, size, image.shape[-1]),
            (0, 1),
            s,
            t,
            method="cubic",
            antialias=True,
        )

    out = jax.vmap(one)(images.astype(jnp.float32), scale, translation)
    return jnp.clip(out, 0.0, 255.0)


def resize_center_crop(images: jax.Array | np.ndarray, size: int = 224) -> jax.Array:
    """CLIP's evaluation transform: bicubic resize of the shorter side, centre crop.

    Args:
      images: uint8 or float [B, H, W, C] with values in 0..255.
      size: Output side length.

    Returns:
      float32 [B, size, size, C] in 0..255 (not normalized; see `normalize`).
    """
    images = jnp.asarray(images)
    _, height, width, _ = images.shape
    new_h, new_w = resize_shape(height, width, size)
    # Offsets of the crop inside the resized image, rounded like torchvision.
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    batch = images.shape[0]
    scale = jnp.broadcast_to(jnp.array([new_h / height, new_w / width], jnp.float32), (batch, 2))
    translation = jnp.broadcast_to(jnp.array([-top, -left], jnp.float32), (batch, 2))
    return _sample(images, size, scale, translation)


@functools.partial(jax.jit, static_argnames=("batch", "height", "width", "scale", "ratio"))
def random_crop_boxes(
    key: jax.Array,
    batch: int,
    height: int,
    width: int,
    scale: tuple[float, float] = (0.9, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> jax.Array:
    """Draws torchvision ``RandomResizedCrop`` boxes, one per image.

    Per image: up to 10 candidates with area ``U(scale) * H * W`` and aspect ratio
    (width / height) log-uniform in ``ratio``; the first that fits inside the image
    is placed uniformly at random. If none fits, the whole image is cropped to the
    nearest allowed aspect ratio, centred.

    Args:
      key: PRNG key.
      batch: Number of boxes B.
      height: Image height H.
      width: Image width W.
      scale: Bounds of the box area as a fraction of the image area.
      ratio: Bounds of the box aspect ratio, width / height.

    Returns:
      int32 [B, 4]: (top, left, box height, box width).
    """
    area = float(height * width)
    k_area, k_ratio, k_top, k_left = jax.random.split(key, 4)
    shape = (batch, _ATTEMPTS)
    target = area * jax.random.uniform(k_area, shape, minval=scale[0], maxval=scale[1])
    log_ratio = jax.random.uniform(
        k_ratio, shape, minval=math.log(ratio[0]), maxval=math.log(ratio[1])
    )
    aspect = jnp.exp(log_ratio)
    w = jnp.round(jnp.sqrt(target * aspect)).astype(jnp.int32)
    h = jnp.round(jnp.sqrt(target / aspect)).astype(jnp.int32)
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = jnp.argmax(fits, axis=1)
    rows = jnp.arange(batch)
    h, w, found = h[rows, first], w[rows, first], fits.any(axis=1)

    # Fallback: the largest centred box whose aspect ratio lies within bounds.
    in_ratio = width / height
    if in_ratio < min(ratio):
        fb_w, fb_h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fb_h, fb_w = height, int(round(height * max(ratio)))
    else:
        fb_w, fb_h = width, height
    h = jnp.where(found, h, fb_h)
    w = jnp.where(found, w, fb_w)
    # Uniform integer offsets in [0, H - h] and [0, W - w].
    top = jnp.floor(jax.random.uniform(k_top, (batch,)) * (height - h + 1)).astype(jnp.int32)
    left = jnp.floor(jax.random.uniform(k_left, (batch,)) * (width - w + 1)).astype(jnp.int32)
    top = jnp.where(found, jnp.minimum(top, height - h), (height - fb_h) // 2)
    left = jnp.where(found, jnp.minimum(left, width - w), (width - fb_w) // 2)
    return jnp.stack([top, left, h, w], axis=1).astype(jnp.int32)


def crop_and_resize(images: jax.Array | np.ndarray, boxes: jax.Array, size: int) -> jax.Array:
    """Crops each image to its box and resizes it to ``size`` x ``size``, bicubic.

    Args:
      images: uint8 or float [B, H, W, C] in 0..255.
      boxes: int [B, 4] (top, left, height, width), e.g. from `random_crop_boxes`.
      size: Output side length.

    Returns:
      float32 [B, size, size, C] in 0..255.
    """
    images = jnp.asarray(images)
    boxes = jnp.asarray(boxes).astype(jnp.float32)
    top, left, h, w = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    scale = jnp.stack([size / h, size / w], axis=1)
    translation = jnp.stack([-top * size / h, -left * size / w], axis=1)
    return _sample(images, size, scale, translation)


def random_resized_crop(
    images: jax.Array | np.ndarray,
    key: jax.Array,
    size: int = 224,
    scale: tuple[float, float] = (0.9, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> jax.Array:
    """CLIP finetuning's augmentation: a random box per image, resized bicubic.

    Same key, same crops. See `random_crop_boxes` for how boxes are drawn.

    Args:
      images: uint8 or float [B, H, W, C] in 0..255.
      key: PRNG key.
      size: Output side length.
      scale: Bounds of the box area as a fraction of the image area.
      ratio: Bounds of the box aspect ratio, width / height.

    Returns:
      float32 [B, size, size, C] in 0..255.
    """
    images = jnp.asarray(images)
    batch, height, width, _ = images.shape
    boxes = random_crop_boxes(key, batch, height, width, scale, ratio)
    return crop_and_resize(images, boxes, size)


def normalize(
    images: jax.Array | np.ndarray,
    mean: tuple[float, ...] = CLIP_MEAN,
    std: tuple[float, ...] = CLIP_STD,
) -> jax.Array:
    """Maps 0..255 pixels to ``(x / 255 - mean) / std`` per channel.

    Args:
      images: [..., C] with values in 0..255.
      mean: Per-channel mean on the 0..1 scale.
      std: Per-channel standard deviation on the 0..1 scale.

    Returns:
      float32 [..., C].
    """
    images = jnp.asarray(images, jnp.float32)
    mean = jnp.asarray(mean, jnp.float32)
    std = jnp.asarray(std, jnp.float32)
    return (images / 255.0 - mean) / std
