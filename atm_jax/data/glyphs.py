"""Glyph images rendered from fonts: the pretraining data of the mini suite.

No pretrained vision transformer can be downloaded for the CPU mini suite, so a
small ViT base is pretrained here on a notMNIST-like task: classify which of the 62
characters 0-9, A-Z, a-z a 28x28 image shows. Each character is drawn with Pillow
from one of the TrueType fonts that matplotlib bundles (DejaVu Sans / Sans Mono /
Serif, STIX General and Computer Modern, in their regular, bold and italic cuts),
then a random affine transform (scale, aspect, shear, rotation within +-15 degrees,
shift), stroke thickening, contrast and Gaussian noise are applied. The images are
bright glyphs on a dark background, like MNIST, and never come from any task's data.

Drawing text with Pillow costs about a millisecond per image, so each
(font, character, stroke) is drawn once into a 2x-resolution "master" and the
random transforms are applied to whole batches with vectorized NumPy bilinear
sampling; that runs at tens of thousands of images per second on one core.
"""

from __future__ import annotations

import functools
import pathlib
import string
from collections.abc import Sequence

import numpy as np

GLYPH_CLASSES: tuple[str, ...] = tuple(
    string.digits + string.ascii_uppercase + string.ascii_lowercase
)
"""The 62 glyph classes, label ``i`` is ``GLYPH_CLASSES[i]``."""

# Fonts bundled with matplotlib that draw Latin letters and lining digits. The
# other bundled files are left out on purpose: the *Display cuts and STIXNonUni /
# STIXSiz* hold no ASCII glyphs, cmex10 / cmsy10 map ASCII to math symbols,
# cmmi10 has old-style digits, and LastResortHE draws placeholder boxes.
GLYPH_FONTS: tuple[str, ...] = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSans-Oblique.ttf",
    "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSansMono-Bold.ttf",
    "DejaVuSansMono-Oblique.ttf",
    "DejaVuSansMono-BoldOblique.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSerif-Italic.ttf",
    "DejaVuSerif-BoldItalic.ttf",
    "STIXGeneral.ttf",
    "STIXGeneralBol.ttf",
    "STIXGeneralItalic.ttf",
    "STIXGeneralBolIta.ttf",
    "cmr10.ttf",
    "cmb10.ttf",
    "cmss10.ttf",
    "cmtt10.ttf",
    "cmti10.ttf",
)

IMAGE_SIZE = 28
# Masters are drawn at twice the output resolution and low-pass filtered, so the
# ~2x minification in `render_glyphs` does not alias.
_MASTER_SIZE = 2 * IMAGE_SIZE
# A font's tallest/widest glyph fills this box in the master, a 22x22 box in the
# 28x28 output; digits, which lack descenders, then span about MNIST's 20 pixels.
_MASTER_BOX = 44
_POINT_SIZE = 64
# Stroke variants per master: as drawn, and dilated by a 3x3 max filter (about one
# output pixel thicker), which makes thin serif fonts look like pen strokes too.
_DILATIONS = (0, 3)

# Ranges of the random augmentation, drawn uniformly per image.
_SCALE = (0.8, 1.15)
_ASPECT = (0.85, 1.15)
_SHEAR = (-0.15, 0.15)
_ROTATION_DEG = (-15.0, 15.0)
_SHIFT_PX = (-2.5, 2.5)
_CONTRAST = (0.7, 1.0)
_NOISE_STD = (0.0, 0.08)
_CHUNK = 4096


def fonts_dir() -> pathlib.Path:
    """Returns the folder of the TrueType fonts bundled with matplotlib."""
    import matplotlib  # Imported lazily: only glyph rendering needs it.

    return pathlib.Path(matplotlib.get_data_path()) / "fonts" / "ttf"


@functools.lru_cache(maxsize=4)
def glyph_masters(classes: tuple[str, ...] = GLYPH_CLASSES) -> np.ndarray:
    """Draws every (font, stroke, character) master once per process.

    Within one font all characters share one scale and one baseline, so case is
    kept: "o" stays smaller and lower than "O", "p" descends below the line. Only
    the horizontal position is centred per glyph.

    Args:
      classes: Single characters to draw.

    Returns:
      float32 array [F, S, C, 56, 56] in [0, 1] (fonts, stroke variants, classes).

    Raises:
      ValueError: If ``classes`` is empty or holds something other than single
        characters.
      RuntimeError: If none of `GLYPH_FONTS` can be found.
    """
    from PIL import Image, ImageDraw, ImageFilter, ImageFont

    if not classes or any(not isinstance(c, str) or len(c) != 1 for c in classes):
        raise ValueError(f"classes must be single characters, got {classes!r}")
    folder = fonts_dir()
    paths = [folder / name for name in GLYPH_FONTS if (folder / name).exists()]
    if not paths:
        raise RuntimeError(f"None of the glyph fonts {GLYPH_FONTS} exist in {folder}")

    m = _MASTER_SIZE
    masters = np.zeros((len(paths), len(_DILATIONS), len(classes), m, m), np.float32)
    for f, path in enumerate(paths):
        font = ImageFont.truetype(str(path), _POINT_SIZE)
        boxes = [font.getbbox(c) for c in classes]
        top = min(b[1] for b in boxes)
        bottom = max(b[3] for b in boxes)
        widest = max(b[2] - b[0] for b in boxes)
        scale = _MASTER_BOX / max(bottom - top, widest, 1)
        height = max(1, round((bottom - top) * scale))
        y0 = (m - height) // 2
        for c, (char, box) in enumerate(zip(classes, boxes, strict=True)):
            width = box[2] - box[0]
            if width <= 0:
                continue  # A blank glyph stays an all-zero master.
            canvas = Image.new("L", (width, bottom - top), 0)
            ImageDraw.Draw(canvas).text((-box[0], -top), char, fill=255, font=font)
            scaled_width = max(1, round(width * scale))
            glyph = canvas.resize((scaled_width, height), Image.Resampling.LANCZOS)
            placed = Image.new("L", (m, m), 0)
            placed.paste(glyph, ((m - scaled_width) // 2, y0))
            for s, size in enumerate(_DILATIONS):
                image = placed.filter(ImageFilter.MaxFilter(size)) if size else placed
                image = image.filter(ImageFilter.GaussianBlur(0.8))
                masters[f, s, c] = np.asarray(image, np.float32) / 255.0
    return masters


def render_glyphs(
    n: int, *, seed: int = 0, classes: Sequence[str] = GLYPH_CLASSES
) -> tuple[np.ndarray, np.ndarray]:
    """Renders ``n`` randomly transformed glyph images.

    Labels cycle through the classes and are then shuffled, so every class appears
    ``n // len(classes)`` or one more times. The same ``n``, ``seed`` and
    ``classes`` always give identical arrays.

    Args:
      n: Number of images.
      seed: Seed of the NumPy generator that draws labels, fonts and transforms.
      classes: Characters to draw; label ``i`` means ``classes[i]``.

    Returns:
      ``(images, labels)``: float32 [n, 28, 28, 1] in [0, 1], bright glyph on a
      dark background, and int32 [n].

    Raises:
      ValueError: If ``n`` is negative or ``classes`` is not a sequence of single
        characters.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    classes = tuple(classes)
    masters = glyph_masters(classes)
    num_fonts, num_strokes, num_classes, m, _ = masters.shape
    rng = np.random.default_rng(seed)

    labels = rng.permutation(np.arange(n) % num_classes).astype(np.int32)
    font = rng.integers(num_fonts, size=n)
    stroke = rng.integers(num_strokes, size=n)
    scale = rng.uniform(*_SCALE, size=n)
    aspect = rng.uniform(*_ASPECT, size=n)
    shear = rng.uniform(*_SHEAR, size=n)
    angle = np.deg2rad(rng.uniform(*_ROTATION_DEG, size=n))
    shift = rng.uniform(*_SHIFT_PX, size=(n, 2))
    contrast = rng.uniform(*_CONTRAST, size=n)
    noise_std = rng.uniform(*_NOISE_STD, size=n)

    # Forward map, master -> output (in output pixels, about the centres):
    # out = R(angle) @ Shear @ diag(scale*aspect, scale/aspect) @ src / ratio.
    # Sampling needs its inverse, applied to every output pixel.
    ratio = m / IMAGE_SIZE
    sx, sy = scale * aspect, scale / aspect
    cos, sin = np.cos(angle), np.sin(angle)
    forward = np.empty((n, 2, 2))
    forward[:, 0, 0] = cos * sx
    forward[:, 0, 1] = (cos * shear - sin) * sy
    forward[:, 1, 0] = sin * sx
    forward[:, 1, 1] = (sin * shear + cos) * sy
    inverse = np.linalg.inv(forward) * ratio if n else forward

    flat = masters.reshape(-1, m * m)
    master_index = (font * num_strokes + stroke) * num_classes + labels
    centre = (IMAGE_SIZE - 1) / 2
    grid = np.arange(IMAGE_SIZE, dtype=np.float64) - centre
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE), np.float32)
    for start in range(0, n, _CHUNK):
        part = slice(start, min(n, start + _CHUNK))
        dx = grid[None, None, :] - shift[part, 0, None, None]
        dy = grid[None, :, None] - shift[part, 1, None, None]
        inv = inverse[part]
        src_x = inv[:, 0, 0, None, None] * dx + inv[:, 0, 1, None, None] * dy
        src_y = inv[:, 1, 0, None, None] * dx + inv[:, 1, 1, None, None] * dy
        images[part] = _bilinear(
            flat, master_index[part], src_x + (m - 1) / 2, src_y + (m - 1) / 2, m
        )

    # Noise is drawn after all transforms so its stream does not depend on _CHUNK.
    images *= contrast[:, None, None].astype(np.float32)
    images += rng.standard_normal(images.shape, dtype=np.float32) * noise_std[:, None, None].astype(
        np.float32
    )
    np.clip(images, 0.0, 1.0, out=images)
    return images[..., None], labels


def _bilinear(
    flat: np.ndarray, index: np.ndarray, x: np.ndarray, y: np.ndarray, m: int
) -> np.ndarray:
    """Samples masters ``flat[index]`` ([K, m*m]) at float pixel coordinates.

    Coordinates are clipped to the master, whose border is blank, so points that
    fall outside read zero.
    """
    x = np.clip(x, 0.0, m - 1.001)
    y = np.clip(y, 0.0, m - 1.001)
    x0 = x.astype(np.int64)
    y0 = y.astype(np.int64)
    fx = (x - x0).astype(np.float32)
    fy = (y - y0).astype(np.float32)
    base = index[:, None, None] * (m * m) + y0 * m + x0
    data = flat.reshape(-1)
    top = data[base] * (1 - fx) + data[base + 1] * fx
    low = data[base + m] * (1 - fx) + data[base + m + 1] * fx
    return top * (1 - fy) + low * fy
