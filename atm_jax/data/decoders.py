"""Decoders of the mini suite's raw files into uint8 images [N, 28, 28] and int32 labels.

Each decoder takes ``{file name: path}`` of a source's raw files (`atm_jax.data.sources`)
and returns ``train_images`` / ``train_labels`` (and ``test_*`` where the source has
a test split), bright strokes on a dark background.
"""

from __future__ import annotations

import gzip
import pathlib
import pickle
from collections.abc import Mapping

import numpy as np

IMAGE_SIZE = 28



class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only NumPy arrays and plain containers.

    The raw pickles are checksummed, but refusing arbitrary globals means even a
    tampered cache file cannot run code.
    """

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        # Python 3 writes bytes into protocol-2 pickles through _codecs.encode.
        ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")
        return super().find_class(module, name)


def _load_gzip_pickle(path: pathlib.Path):
    with gzip.open(path, "rb") as f:
        # latin1 reads Python 2 pickles of NumPy arrays (MNIST's is one).
        return _ArrayUnpickler(f, encoding="latin1").load()


def _as_images(x: np.ndarray, what: str) -> np.ndarray:
    """Returns uint8 [N, 28, 28] from [N, 784] or [N, 28, 28] uint8 or [0, 1] floats."""
    x = np.asarray(x)
    if x.ndim == 2 and x.shape[1] == IMAGE_SIZE * IMAGE_SIZE:
        x = x.reshape(-1, IMAGE_SIZE, IMAGE_SIZE)
    if x.ndim != 3 or x.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"{what}: expected [N, 28, 28] or [N, 784] images, got {x.shape}")
    if x.dtype == np.uint8:
        return x
    x = x.astype(np.float64)
    if x.size and (x.min() < 0 or x.max() > 1):
        raise ValueError(f"{what}: float images must lie in [0, 1], got {x.min()}..{x.max()}")
    # MNIST's pickle stores k/256 for k in 0..255; keeping k exactly (rather than
    # rounding x*255) loses no grey level. Other floats are rounded to 255 levels.
    levels = x * 256
    if x.size and levels.max() <= 255 and np.array_equal(levels, np.round(levels)):
        return levels.astype(np.uint8)
    return np.round(x * 255).astype(np.uint8)


def _as_labels(y: np.ndarray, n: int, what: str) -> np.ndarray:
    y = np.asarray(y).reshape(-1)
    if y.shape[0] != n:
        raise ValueError(f"{what}: {y.shape[0]} labels for {n} images")
    if y.size and (y.min() < 0 or not np.array_equal(y, np.round(y))):
        raise ValueError(f"{what}: labels must be non-negative integers")
    return y.astype(np.int32)


def decode_mnist_pickle(paths: Mapping[str, pathlib.Path]) -> dict[str, np.ndarray]:
    """Decodes ``mnist.pkl.gz``: ((train), (validation), (test)) of (x [N,784], y)."""
    path = paths["mnist.pkl.gz"]
    splits = _load_gzip_pickle(path)
    if len(splits) != 3:
        raise ValueError(f"{path}: expected (train, validation, test), got {len(splits)} parts")
    out = {}
    for split, (x, y) in zip(("train", "validation", "test"), splits, strict=True):
        out[f"{split}_images"] = _as_images(x, f"{path} {split}")
        out[f"{split}_labels"] = _as_labels(y, len(out[f"{split}_images"]), f"{path} {split}")
    return out


def read_idx(path: pathlib.Path) -> np.ndarray:
    """Reads a gzipped IDX file (the MNIST format) of unsigned bytes."""
    blob = gzip.decompress(path.read_bytes())
    if len(blob) < 4 or blob[:2] != b"\0\0" or blob[2] != 0x08:
        raise ValueError(f"{path}: not a uint8 IDX file (magic {blob[:4].hex()})")
    ndim = blob[3]
    shape = tuple(int.from_bytes(blob[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(blob, np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape}, file holds {data.size} values")
    return data.reshape(shape)


def decode_fashion_idx(paths: Mapping[str, pathlib.Path]) -> dict[str, np.ndarray]:
    """Decodes the four Fashion-MNIST IDX files (60k train / 10k test)."""
    out = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = _as_images(read_idx(paths[f"{prefix}-images-idx3-ubyte.gz"]), prefix)
        out[f"{split}_images"] = images
        out[f"{split}_labels"] = _as_labels(
            read_idx(paths[f"{prefix}-labels-idx1-ubyte.gz"]), len(images), prefix
        )
    return out


def _bright_on_dark(images: np.ndarray) -> np.ndarray:
    """Inverts images whose outer ring is bright, so all show light on dark like MNIST."""
    ring = np.concatenate(
        [images[:, 0, :], images[:, -1, :], images[:, :, 0], images[:, :, -1]], axis=1
    )
    flip = ring.mean(axis=1) > 127
    if flip.any():
        images = images.copy()
        images[flip] = 255 - images[flip]
    return images


def decode_animals(paths: Mapping[str, pathlib.Path]) -> dict[str, np.ndarray]:
    """Decodes Animal-MNIST's gzip pickles and removes exact duplicate images.

    The release holds each of 284 images twice (mostly birds); a duplicate would
    let the same picture land in both train and test, so only the first copy of
    each image is kept (copies with conflicting labels would all be dropped).
    """
    data_path = paths["animal_data_version_3.gz"]
    images = _bright_on_dark(_as_images(_load_gzip_pickle(data_path), str(data_path)))
    labels = _as_labels(
        _load_gzip_pickle(paths["animal_label_version_3.gz"]), len(images), "animals"
    )
    first: dict[bytes, int] = {}
    conflicted: set[bytes] = set()
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        key = image.tobytes()
        if key not in first:
            first[key] = i
        elif labels[first[key]] != label:
            conflicted.add(key)
    keep = np.array(sorted(i for key, i in first.items() if key not in conflicted), dtype=np.int64)
    return {"train_images": images[keep], "train_labels": labels[keep]}


def _resize_matrix(size_in: int, size_out: int) -> np.ndarray:
    """Bilinear interpolation weights [size_out, size_in] (half-pixel centres, edges clamped)."""
    centres = (np.arange(size_out) + 0.5) * size_in / size_out - 0.5
    centres = np.clip(centres, 0, size_in - 1)
    low = np.floor(centres).astype(int)
    high = np.minimum(low + 1, size_in - 1)
    frac = centres - low
    weights = np.zeros((size_out, size_in))
    weights[np.arange(size_out), low] += 1 - frac
    weights[np.arange(size_out), high] += frac
    return weights


def upsample_digits(pixels: np.ndarray) -> np.ndarray:
    """Turns 8x8 digits with values 0..16 into 28x28 uint8 images.

    Each digit is resized bilinearly to 20x20 and centred with a 4-pixel border,
    like MNIST's digits, which fill a 20x20 box inside 28x28.

    Args:
      pixels: [N, 64] or [N, 8, 8] values in 0..16.

    Returns:
      uint8 [N, 28, 28].
    """
    pixels = np.asarray(pixels, np.float64).reshape(-1, 8, 8) / 16.0
    resize = _resize_matrix(8, 20)
    small = np.einsum("oi,nij,pj->nop", resize, pixels, resize)
    images = np.zeros((len(pixels), IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    images[:, 4:24, 4:24] = np.round(np.clip(small, 0, 1) * 255)
    return images


def decode_digits_csv(paths: Mapping[str, pathlib.Path]) -> dict[str, np.ndarray]:
    """Decodes scikit-learn's ``digits.csv.gz``: 64 pixel values then the label per row."""
    path = paths["digits.csv.gz"]
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", ndmin=2)
    if table.shape[1] != 65:
        raise ValueError(f"{path}: expected 65 columns, got {table.shape[1]}")
    if table.size and (table[:, :64].min() < 0 or table[:, :64].max() > 16):
        raise ValueError(f"{path}: pixel values must lie in 0..16")
    images = upsample_digits(table[:, :64])
    return {
        "train_images": images,
        "train_labels": _as_labels(table[:, 64], len(images), str(path)),
    }
