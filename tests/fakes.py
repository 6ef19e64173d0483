"""Fake raw sources for the mini suite, in each source's exact file format.

Shared by the tests: ``install_fake_suite()`` writes tiny MNIST / Fashion-MNIST /
animals / digits files into the current cache (``ATM_JAX_CACHE``) and patches their
SHA-256s into ``atm_jax.data.sources.SOURCES`` (callers monkeypatch that dict).
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import os
import pickle

import numpy as np

from atm_jax.data import sources


def sha(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def install(name: str, blobs: dict[str, bytes], *, write: bool = True) -> None:
    """Registers fake raw files for source ``name`` and (optionally) caches them."""
    source = sources.SOURCES[name]
    files = tuple(dataclasses.replace(f, sha256=sha(blobs[f.name])) for f in source.files)
    sources.SOURCES[name] = dataclasses.replace(source, files=files)
    if write:
        folder = sources.raw_dir(name)
        folder.mkdir(parents=True, exist_ok=True)
        for file_name, blob in blobs.items():
            (folder / file_name).write_bytes(blob)


def unique_images(rng, n: int) -> np.ndarray:
    """uint8 [n, 28, 28] random images, distinct with overwhelming probability."""
    return rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)


def balanced_labels(rng, n: int, classes: int = 10) -> np.ndarray:
    return rng.permutation(np.arange(n) % classes)


def gzip_pickle(obj, protocol: int = 4) -> bytes:
    return gzip.compress(pickle.dumps(obj, protocol=protocol), mtime=0, compresslevel=1)


def idx(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    return gzip.compress(header + array.astype(np.uint8).tobytes(), mtime=0, compresslevel=1)


def fake_mnist(rng, sizes=(200, 50, 50)) -> dict[str, bytes]:
    splits = []
    for n in sizes:
        levels = unique_images(rng, n).reshape(n, 784)
        # The real file stores k/256 as float32.
        splits.append((levels.astype(np.float32) / 256, balanced_labels(rng, n)))
    return {"mnist.pkl.gz": gzip_pickle(tuple(splits), protocol=2)}


def fake_fashion(rng, train: int = 120, test: int = 40) -> dict[str, bytes]:
    blobs = {}
    for prefix, n in (("train", train), ("t10k", test)):
        blobs[f"{prefix}-images-idx3-ubyte.gz"] = idx(unique_images(rng, n))
        blobs[f"{prefix}-labels-idx1-ubyte.gz"] = idx(balanced_labels(rng, n))
    return blobs


def fake_animals(rng, n: int = 100) -> tuple[dict[str, bytes], np.ndarray]:
    images = unique_images(rng, n) // 4  # Dark background, like the real data.
    labels = balanced_labels(rng, n).astype(np.int64)
    images[5] = images[3]  # An exact duplicate with the same label...
    labels[5] = labels[3]
    images[7] = 255 - images[7]  # ... and one dark-on-light image.
    return {
        "animal_data_version_3.gz": gzip_pickle(images),
        "animal_label_version_3.gz": gzip_pickle(labels),
    }, images


def fake_digits(rng, n: int = 100) -> dict[str, bytes]:
    pixels = rng.integers(0, 17, size=(n, 64))
    labels = balanced_labels(rng, n)
    rows = [",".join(str(v) for v in (*p, y)) for p, y in zip(pixels, labels, strict=True)]
    return {
        "digits.csv.gz": gzip.compress(("\n".join(rows) + "\n").encode(), mtime=0, compresslevel=1)
    }


def install_fake_suite(sizes=(200, 50, 50)) -> None:
    """Installs fake raw files for all four sources into the current cache."""
    rng = np.random.default_rng(1234)
    install("mnist", fake_mnist(rng, sizes))
    install("fashion_mnist", fake_fashion(rng))
    animals, _ = fake_animals(rng)
    install("animals", animals)
    install("digits", fake_digits(rng))


def mock_bucket(bucket: str, root):
    """A context manager serving ``bucket`` (``gs://name``) paths from the local folder
    ``root`` through etils' epath mock."""
    from etils.epath import testing as epath_testing

    def local(path):
        text = os.fspath(path)
        return text.replace(bucket, str(root)) if text.startswith(bucket) else text

    def one(fn, path, *args, **kwargs):
        return fn(local(path), *args, **kwargs)

    def two(fn, src, dst, *args, **kwargs):
        return fn(local(src), local(dst), *args, **kwargs)

    singles = ("open", "exists", "isdir", "listdir", "makedirs", "mkdir", "remove", "rmtree",
               "stat", "walk", "glob")
    return epath_testing.mock_epath(**{n: one for n in singles},
                                    **{n: two for n in ("copy", "rename", "replace")})
