"""Tests of the paper setups' data side: registry, splits, sources, tokens, heads.

No network and no TensorFlow: the tfds tests write real (tiny) array_record
datasets with tfds' own writer, which needs no TensorFlow when images are handed
over already PNG-encoded, and read them back through the same code path as the
real datasets.
"""

from __future__ import annotations

import hashlib
import io
import json
import pathlib
import socket
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from atm_jax.data import image_folder, local, paper, prepare, preprocess, text, tfds_source
from atm_jax.models import zero_shot

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def no_network(monkeypatch):
    """Makes any attempt to open a connection or resolve a name fail loudly."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# --- tiny real tfds datasets ---------------------------------------------------------


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array).save(buffer, "PNG")
    return buffer.getvalue()


def _image_rows(n: int, num_classes: int, shape_of, offset: int = 0) -> list[dict]:
    """Rows whose pixels encode (label, index): R = 2 * label, G = index."""
    rows = []
    for i in range(n):
        label = (i * 7) % num_classes
        h, w, c = shape_of(i)
        image = np.zeros((h, w, c), np.uint8)
        image[..., 0] = 2 * label
        if c == 3:
            image[..., 1] = (i + offset) % 256
        rows.append({"image": _png(image), "label": label})
    return rows


def _write_tfds(data_dir, name, features, splits, config=None):
    """Writes an array_record dataset ``data_dir/name[/config]/1.0.0`` without TF."""
    import tensorflow_datasets as tfds

    def info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

    def split_generators(self, dl_manager):
        return {split: self._generate_examples(rows) for split, rows in splits.items()}

    def generate_examples(self, rows):
        yield from enumerate(rows)

    attrs = {
        "name": name,
        "VERSION": tfds.core.Version("1.0.0"),
        "_info": info,
        "_split_generators": split_generators,
        "_generate_examples": generate_examples,
    }
    if config:
        attrs["BUILDER_CONFIGS"] = [tfds.core.BuilderConfig(name=config)]
    cls = type(f"Fake_{name}", (tfds.core.GeneratorBasedBuilder,), attrs, skip_registration=True)
    builder = cls(data_dir=str(data_dir), config=config, file_format="array_record")
    builder.download_and_prepare(file_format="array_record")


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()
    root = tmp_path_factory.mktemp("tfds")
    image = tfds.features.Image
    label = tfds.features.ClassLabel
    square = lambda i: (8, 8, 3)  # noqa: E731
    _write_tfds(
        root,
        "cifar100",
        {"image": image(shape=(8, 8, 3)), "label": label(num_classes=100)},
        {"train": _image_rows(60, 100, square), "test": _image_rows(20, 100, square, 100)},
    )
    varied = lambda i: (10 + i % 5, 12 + (3 * i) % 7, 3)  # noqa: E731
    _write_tfds(
        root,
        "dtd",
        {"image": image(shape=(None, None, 3)), "label": label(num_classes=47)},
        {
            "train": _image_rows(10, 47, varied),
            "validation": _image_rows(10, 47, varied, 10),
            "test": _image_rows(6, 47, varied, 20),
        },
    )
    _write_tfds(
        root,
        "eurosat",
        {"image": image(shape=(8, 8, 3)), "label": label(num_classes=10)},
        {"train": _image_rows(100, 10, square)},
        config="rgb",
    )
    gray = lambda i: (6, 6, 1)  # noqa: E731
    _write_tfds(
        root,
        "mnist",
        {"image": image(shape=(6, 6, 1)), "label": label(num_classes=10)},
        {"train": _image_rows(30, 10, gray), "test": _image_rows(10, 10, gray)},
    )
    words = local._SENTIMENT

    def sentences(n, keys):
        return [
            {**{k: f"{words[i % 2][i % 6]} movie number {k}" for k in keys}, "label": i % 2}
            for i in range(n)
        ]

    for task, keys in (("cola", ("sentence",)), ("mrpc", ("sentence1", "sentence2"))):
        features = {k: tfds.features.Text() for k in keys}
        features["label"] = label(num_classes=2)
        _write_tfds(
            root,
            "glue",
            features,
            {"train": sentences(40, keys), "validation": sentences(12, keys)},
            config=task,
        )
    return root


@pytest.fixture(scope="module")
def text_root(tmp_path_factory):
    return local.make_text_tasks(tmp_path_factory.mktemp("text"), train_size=60, test_size=20)


# --- splits ---------------------------------------------------------------------------


def test_split_indices_cut_90_10_cap_and_seed():
    train, validation = paper.split_indices(1000)
    assert (len(train), len(validation)) == (900, 100)
    assert np.array_equal(np.sort(np.concatenate([train, validation])), np.arange(1000))
    again = paper.split_indices(1000)
    assert np.array_equal(train, again[0]) and np.array_equal(validation, again[1])
    assert not np.array_equal(np.sort(validation), np.sort(paper.split_indices(1000, seed=1)[1]))
    train, validation = paper.split_indices(73_257)  # SVHN's train split.
    assert (len(train), len(validation)) == (68_257, 5000)
    assert len(paper.split_indices(1009)[1]) == 100  # int(), like task vectors.
    assert len(paper.split_indices(1000, validation_cap=None, validation_fraction=0.5)[1]) == 500
    with pytest.raises(ValueError):
        paper.split_indices(10, validation_fraction=1.0)


def test_registry_lists_the_papers_tasks():
    assert paper.VISION_TASKS == (
        "cifar100", "dtd", "eurosat", "gtsrb", "mnist", "resisc45", "svhn",
    )  # fmt: skip
    assert paper.GLUE_TASKS == ("cola", "sst2", "mrpc", "qqp", "mnli", "qnli", "rte")
    sizes = {n: t.num_classes for n, t in paper.PAPER_TASKS.items()}
    assert sizes == {
        "cifar100": 100, "dtd": 47, "eurosat": 10, "gtsrb": 43, "mnist": 10, "resisc45": 45,
        "svhn": 10, "cola": 2, "sst2": 2, "mrpc": 2, "qqp": 2, "mnli": 3, "qnli": 2, "rte": 2,
    }  # fmt: skip
    templates = {n: len(paper.PAPER_TASKS[n].templates) for n in paper.VISION_TASKS}
    assert templates == {
        "cifar100": 18, "dtd": 8, "eurosat": 3, "gtsrb": 3, "mnist": 1, "resisc45": 18, "svhn": 1,
    }  # fmt: skip
    for name in paper.VISION_TASKS:
        task = paper.PAPER_TASKS[name]
        assert len(set(task.class_names)) == task.num_classes
        assert all("{c}" in t for t in task.templates)
    stop = paper.PAPER_TASKS["gtsrb"].prompts("stop")[0]
    assert stop == 'a zoomed in photo of a "stop" traffic sign.'
    assert paper.PAPER_TASKS["mnli"].test_split == "validation_matched"
    assert paper.PAPER_TASKS["qqp"].text_keys == ("question1", "question2")


# --- tfds source ----------------------------------------------------------------------


def test_tfds_task_splits_and_alignment(tfds_dir, no_network):
    task = paper.load_paper_task("cifar100", data_dir=tfds_dir)
    (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = task.train, task.validation, task.test
    assert x_tr.shape == (54, 8, 8, 3) and x_tr.dtype == np.uint8 and y_tr.dtype == np.int32
    assert (len(y_va), len(y_te)) == (6, 20)
    for images, labels in (task.train, task.validation, task.test):
        assert np.array_equal(images[:, 0, 0, 0], 2 * labels)  # Images travel with labels.
    ids = lambda x: set(x[:, 0, 0, 1].tolist())  # noqa: E731
    assert not ids(x_tr) & ids(x_va) and len(ids(x_tr) | ids(x_va)) == 60
    assert ids(x_te) == set(range(100, 120))

    same = paper.load_paper_task("cifar100", data_dir=tfds_dir)
    assert np.array_equal(same.validation[0], x_va)
    other = paper.load_paper_task("cifar100", data_dir=tfds_dir, seed=1)
    assert ids(other.validation[0]) != ids(x_va)
    assert np.array_equal(other.test[0], x_te)  # The whole test split, in stored order.

    small = paper.load_paper_task(
        "cifar100", data_dir=tfds_dir, validation_cap=4, train_size=10, test_size=5
    )
    assert [len(small.split(s)[1]) for s in ("train", "validation", "test")] == [10, 4, 5]
    assert ids(small.train[0]) <= set(range(60)) - ids(small.validation[0])


def test_tfds_carves_test_for_train_only_datasets(tfds_dir):
    a = paper.load_paper_task("eurosat", data_dir=tfds_dir)
    b = paper.load_paper_task("eurosat", data_dir=tfds_dir, seed=3)
    assert [len(a.split(s)[1]) for s in ("train", "validation", "test")] == [81, 9, 10]
    ids = lambda x: set(x[:, 0, 0, 1].tolist())  # noqa: E731
    assert ids(a.test[0]) == ids(b.test[0])  # The carve never depends on the seed.
    assert not ids(a.test[0]) & (ids(a.train[0]) | ids(a.validation[0]))
    assert ids(a.validation[0]) != ids(b.validation[0])


def test_tfds_variable_sizes_resize_and_grayscale(tfds_dir):
    dtd = paper.load_paper_task("dtd", data_dir=tfds_dir, test_size=2)
    assert dtd.train[0].shape[1:] == (224, 224, 3)  # train + validation splits: 20 images.
    assert len(dtd.train[1]) + len(dtd.validation[1]) == 20 and len(dtd.test[1]) == 2
    small = paper.load_paper_task("dtd", data_dir=tfds_dir, image_size=16)
    assert small.train[0].shape[1:] == (16, 16, 3)
    assert np.array_equal(small.train[0][:, 8, 8, 0], 2 * small.train[1])
    mnist = paper.load_paper_task("mnist", data_dir=tfds_dir)
    images = mnist.train[0]
    assert images.shape[1:] == (6, 6, 3)
    assert np.array_equal(images[..., 0], images[..., 2])
    assert np.array_equal(images[:, 0, 0, 0], 2 * mnist.train[1])


def test_glue_tasks_tokenize(tfds_dir, text_root):
    tokenizer = local.build_tokenizer()
    cola = paper.load_paper_task("cola", data_dir=tfds_dir, tokenizer=tokenizer, max_length=16)
    tokens, labels = cola.train
    assert tokens.shape == (36, 3, 16) and tokens.dtype == np.int32
    assert cola.test[0].shape == (12, 3, 16)  # GLUE's validation split is the test set.
    positive = {tokenizer.token_to_id(w) for w in local._SENTIMENT[1]}
    assert np.array_equal(np.isin(tokens[:, 0, 1], list(positive)), labels == 1)
    assert not tokens[:, 2].any()
    mrpc = paper.load_paper_task(
        "mrpc", data_dir=tfds_dir, tokenizer=local.tokenizer_path(text_root), max_length=16
    )
    assert mrpc.train[0].shape == (36, 3, 16) and mrpc.train[0][:, 2].max() == 1


def test_reading_tfds_never_imports_tensorflow(tfds_dir):
    # The subprocess pretends TensorFlow is installed (find_spec succeeds) and
    # records any attempt to actually import it, so the check means something
    # whether or not TF is installed here.
    script = textwrap.dedent(
        f"""
        import importlib.abc, importlib.machinery, sys

        class Refuse(importlib.abc.MetaPathFinder, importlib.abc.Loader):
            attempts = []

            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("tensorflow", "tf_keras"):
                    return importlib.machinery.ModuleSpec(name, self)
                return None

            def create_module(self, spec):
                Refuse.attempts.append(spec.name)
                raise ImportError("blocked: " + spec.name)

            def exec_module(self, module):
                raise ImportError("blocked")

        sys.meta_path.insert(0, Refuse())
        from atm_jax.data import paper
        task = paper.load_paper_task("cifar100", data_dir={str(tfds_dir)!r})
        task = paper.load_paper_task("dtd", data_dir={str(tfds_dir)!r}, image_size=8)
        assert len(task.train[1]) == 18, task
        assert "tensorflow" not in sys.modules
        assert not Refuse.attempts, Refuse.attempts
        print("ok")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


def test_missing_dataset_fails_fast_with_prepare_command(tmp_path, no_network, monkeypatch):
    # "Fast" = decided from the disk alone: no network (no_network), and no tfds
    # builder is opened or built (either would read, or try to download, data).
    import tensorflow_datasets as tfds

    def refuse(*args, **kwargs):
        raise AssertionError("a tfds builder was opened for a dataset that is not there")

    for name in ("builder", "builder_from_directory", "load"):
        monkeypatch.setattr(tfds, name, refuse)
    with pytest.raises(tfds_source.DatasetNotPreparedError) as error:
        paper.load_paper_task("svhn", data_dir=tmp_path)
    message = str(error.value)
    assert f"python -m atm_jax.data.prepare tfds svhn --data_dir {tmp_path}" in message
    assert 'pip install -e ".[prepare]"' in message and "svhn_cropped" in message

    with pytest.raises(tfds_source.DatasetNotPreparedError) as error:
        paper.load_paper_task("resisc45", data_dir=tmp_path)
    assert str(tmp_path / "downloads" / "manual" / "NWPU-RESISC45") in str(error.value)
    assert "prepare tfds resisc45" in str(error.value)

    with pytest.raises(tfds_source.DatasetNotPreparedError, match="source='folder'"):
        paper.load_paper_task("gtsrb", data_dir=tmp_path)

    # Prepared in the tfrecord format only: unreadable without TF, said so.
    version = tmp_path / "mnist" / "3.0.1"
    version.mkdir(parents=True)
    (version / "dataset_info.json").write_text("{}")
    (version / "mnist-train.tfrecord-00000-of-00001").write_bytes(b"")
    with pytest.raises(tfds_source.DatasetNotPreparedError, match="array_record"):
        paper.load_paper_task("mnist", data_dir=tmp_path)


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("tensorflow") is not None, reason="TF installed"
)
def test_prepare_tfds_without_tensorflow_says_how(tmp_path, capsys, no_network):
    assert prepare.main(["tfds", "eurosat", "cola", "--data_dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert 'pip install -e ".[prepare]"' in err
    assert f"prepare tfds eurosat/rgb glue/cola --data_dir {tmp_path}" in err
    assert prepare.main(["tfds", "gtsrb", "--data_dir", str(tmp_path)]) == 1
    assert "image-folder" in capsys.readouterr().err
    assert prepare.tfds_names(["vision"]) == [
        "cifar100", "dtd", "eurosat/rgb", "mnist", "resisc45", "svhn_cropped",
    ]  # fmt: skip


# --- image folders --------------------------------------------------------------------


def _save(path: pathlib.Path, size=(5, 4), value=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(path)


def test_image_folder_layout_labels_and_errors(tmp_path):
    root = tmp_path / "task"
    for split in ("train", "test"):
        for value, name in enumerate(("zebra", "ant", "moth")):
            for i in range(3):
                _save(root / split / name / f"{i}.png", value=value * 10)
    (root / "train" / "ant" / "notes.txt").write_text("not an image")
    images, labels, names = image_folder.load(root, "train")
    assert names == ("ant", "moth", "zebra") and images.shape == (9, 4, 5, 3)
    assert np.array_equal(images[:, 0, 0, 0], np.repeat([10, 20, 0], 3))
    assert np.array_equal(labels, np.repeat([0, 1, 2], 3))
    _, _, given = image_folder.load(root, "test", class_folders=("zebra", "ant", "moth"))
    assert given == ("zebra", "ant", "moth")

    with pytest.raises(image_folder.ImageFolderError, match="does not exist"):
        image_folder.load(tmp_path / "nope", "train")
    with pytest.raises(image_folder.ImageFolderError, match="no 'validation' split"):
        image_folder.load(root, "validation")
    (root / "train" / "empty").mkdir()
    with pytest.raises(image_folder.ImageFolderError, match="empty"):
        image_folder.load(root, "train")
    with pytest.raises(image_folder.ImageFolderError, match="not among"):
        image_folder.list_image_folder(root, "train", class_folders=("ant", "moth"))


def test_folder_source_sizes_names_and_carve(tmp_path):
    for split, count in (("train", 20), ("test", 4)):
        for c, name in enumerate(("b", "a")):
            for i in range(count // 2):
                _save(tmp_path / "mine" / split / name / f"{i}.bmp", size=(6 + i % 2, 6), value=c)
    task = paper.load_paper_task("mine", source="folder", folder=tmp_path, image_size=None)
    assert task.class_names == ("a", "b") and task.train[0].shape[1:] == (224, 224, 3)
    assert [len(task.split(s)[1]) for s in ("train", "validation", "test")] == [18, 2, 4]

    # RESISC45 from its extracted folders (underscored names), train only: carved.
    for name in paper.PAPER_TASKS["resisc45"].class_names:
        for i in range(2):
            _save(tmp_path / "resisc45" / "train" / name.replace(" ", "_") / f"{i}.jpg", (8, 8))
    resisc = paper.load_paper_task("resisc45", source="folder", folder=tmp_path)
    assert [len(resisc.split(s)[1]) for s in ("train", "validation", "test")] == [65, 7, 18]
    assert resisc.train[0].shape[1:] == (8, 8, 3)
    with pytest.raises(ValueError, match="folder=ROOT"):
        paper.load_paper_task("resisc45", source="folder")


def test_gtsrb_official_layout(tmp_path):
    base = tmp_path / "gtsrb" / "GTSRB"
    for c in range(43):
        _save(base / "Final_Training" / "Images" / f"{c:05d}" / f"00000_0000{c % 2}.ppm", value=c)
    rows = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
    for i, c in enumerate((5, 0, 42)):
        _save(base / "Final_Test" / "Images" / f"{i:05d}.ppm", size=(9, 7), value=c)
        rows.append(f"{i:05d}.ppm;9;7;1;1;8;6;{c}")
    (tmp_path / "gtsrb" / "GT-final_test.csv").write_text("\n".join(rows) + "\n")
    task = paper.load_paper_task("gtsrb", source="folder", folder=tmp_path, image_size=12)
    assert np.array_equal(task.test[1], [5, 0, 42])
    assert np.array_equal(task.test[0][:, 6, 6, 0], [5, 0, 42])
    x, y = task.train
    assert x.shape == (39, 12, 12, 3) and np.array_equal(x[:, 6, 6, 0], y)
    assert task.class_names[14] == "stop"
    # GTSRB as plain numbered class folders, and registered names with "_" for " ".
    numbered = [f"{c:05d}" for c in (2, 0, 1)]
    assert paper._folder_labels(numbered, "xyz", tmp_path) == ("00000", "00001", "00002")
    named = paper._folder_labels(["sea_ice", "Ship"], ("ship", "sea ice"), tmp_path)
    assert named == ("Ship", "sea_ice")
    with pytest.raises(image_folder.ImageFolderError, match="match neither"):
        paper._folder_labels(["cat", "dog"], ("ship", "sea ice"), tmp_path)
    with pytest.raises(ValueError, match="text task; source='folder' reads image"):
        paper.load_paper_task("cola", source="folder", folder=tmp_path)


# --- text -----------------------------------------------------------------------------


def test_tokenize_shapes_padding_truncation_pairs(text_root):
    fast = local.build_tokenizer()
    hf = text.load_tokenizer(local.tokenizer_path(text_root))
    from_json = text.load_tokenizer(local.tokenizer_path(text_root) / "tokenizer.json")
    texts = ["the movie was great", "rain " * 20]
    pairs = ["the book was awful", "snow"]
    for tokenizer in (fast, hf, from_json):
        single = text.tokenize(tokenizer, texts, max_length=8)
        assert single.shape == (2, 3, 8) and single.dtype == np.int32
        assert single[0, 1].tolist() == [1] * 6 + [0] * 2 and single[0, 0, 6:].tolist() == [0, 0]
        assert single[1, 1].all() and single[1, 0, -1] == fast.token_to_id("[SEP]")
        pair = text.tokenize(tokenizer, texts, pairs, max_length=12)
        assert pair[0, 2].tolist() == [0] * 6 + [1] * 5 + [0]
        assert pair[1, 1].all() and pair[1, 2].sum() == 2  # Longest-first truncation.
        np.testing.assert_array_equal(pair, text.tokenize(fast, texts, pairs, max_length=12))
    assert fast.padding is None and fast.truncation is None  # The caller's object untouched.
    assert text.tokenize(fast, [], max_length=4).shape == (0, 3, 4)


def test_tokenize_fills_missing_token_types():
    class NoTypes:  # Like RoBERTa's tokenizer: no token_type_ids.
        def __call__(self, texts, pairs=None, **kwargs):
            n, length = len(texts), kwargs["max_length"]
            return {"input_ids": np.ones((n, length)), "attention_mask": np.ones((n, length))}

    out = text.tokenize(NoTypes(), ["a", "b"], max_length=5)
    assert out.shape == (2, 3, 5) and not out[:, 2].any() and out[:, 0].all()


def test_load_tokenizer_offline_error(monkeypatch, no_network, tmp_path):
    monkeypatch.setenv("ATM_JAX_OFFLINE", "1")
    with pytest.raises(text.TokenizerUnavailableError, match="save_pretrained"):
        text.load_tokenizer("someone/not-a-real-tokenizer-xyz")
    with pytest.raises(text.TokenizerUnavailableError):
        text.load_tokenizer(tmp_path)  # An empty folder.


def test_tsv_source_and_errors(text_root, tmp_path):
    task = paper.load_paper_task(
        "keyword_topic", source="tsv", folder=text_root, tokenizer=local.build_tokenizer(),
        max_length=16,
    )  # fmt: skip
    assert task.class_names == ("sports", "food", "weather")
    assert [len(task.split(s)[1]) for s in ("train", "validation", "test")] == [54, 6, 20]
    with pytest.raises(ValueError, match="tokenizer="):
        paper.load_paper_task("keyword_topic", source="tsv", folder=text_root)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "train.tsv").write_text("sentence\tlabel\nhello\t0\n")
    with pytest.raises(ValueError, match="header"):
        paper.load_paper_task(
            "bad", source="tsv", folder=tmp_path, tokenizer=local.build_tokenizer()
        )
    text.write_tsv(tmp_path / "x.tsv", ["a b", "c"], [1, 0], pairs=["d", "e f"])
    assert text.read_tsv(tmp_path / "x.tsv")[1] == ["d", "e f"]


# --- preprocessing --------------------------------------------------------------------


def _pil_resize_center_crop(image: np.ndarray, size: int) -> np.ndarray:
    cropped = image_folder.resize_shorter_center_crop(Image.fromarray(image), size)
    return np.asarray(cropped, np.float32)


@pytest.mark.parametrize("shape,size", [((32, 32), 64), ((30, 41), 24), ((50, 37), 32)])
def test_resize_center_crop_matches_pil(shape, size):
    # Tolerance: PIL rounds and clips to uint8 after each separable pass, JAX stays
    # in float32. On smooth images that is <= ~1 grey level; on white noise the
    # clip between PIL's passes moves overshooting pixels further, so only the mean
    # is bounded there.
    rng = np.random.default_rng(0)
    h, w = shape
    coarse = rng.integers(0, 256, (h // 4 + 1, w // 4 + 1, 3)).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BILINEAR))
    noise = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
    ours = np.asarray(preprocess.resize_center_crop(np.stack([smooth, noise]), size))
    assert ours.shape == (2, size, size, 3) and ours.dtype == np.float32
    diff_smooth = np.abs(ours[0] - _pil_resize_center_crop(smooth, size))
    assert diff_smooth.max() <= 1.5 and diff_smooth.mean() <= 0.5
    assert np.abs(ours[1] - _pil_resize_center_crop(noise, size)).mean() <= 0.6


def test_random_resized_crop_boxes_bounds_and_determinism():
    key = jax.random.key(0)
    boxes = np.asarray(preprocess.random_crop_boxes(key, 512, 48, 64))
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= 48).all() and (left + w <= 64).all()
    area = h * w / (48 * 64)
    assert area.min() >= 0.9 - 0.05 and area.max() <= 1.0  # Rounding to whole pixels.
    ratio = w / h
    assert ratio.min() >= 0.75 - 0.05 and ratio.max() <= 4 / 3 + 0.05
    assert len({tuple(b) for b in boxes}) > 50
    again = preprocess.random_crop_boxes(key, 512, 48, 64)
    assert np.array_equal(boxes, again)
    assert not np.array_equal(boxes, preprocess.random_crop_boxes(jax.random.key(1), 512, 48, 64))
    # No candidate fits a 10x200 strip: torchvision's fallback, a centred 4:3 box.
    fallback = np.asarray(preprocess.random_crop_boxes(key, 3, 10, 200))
    assert fallback.tolist() == [[0, 93, 10, 13]] * 3

    images = np.random.default_rng(1).integers(0, 256, (4, 48, 64, 3)).astype(np.uint8)
    crop = jax.jit(preprocess.random_resized_crop, static_argnums=2)
    out = crop(images, key, 32)
    assert out.shape == (4, 32, 32, 3) and np.array_equal(out, crop(images, key, 32))
    assert not np.array_equal(out, crop(images, jax.random.key(5), 32))
    whole = jnp.tile(jnp.array([[0, 0, 48, 64]]), (4, 1))
    full = preprocess.crop_and_resize(images, whole, 32)
    assert float(jnp.abs(full[0] - jax.image.resize(
        images[0].astype(jnp.float32), (32, 32, 3), "cubic"
    ).clip(0, 255)).max()) < 1e-3  # fmt: skip


def test_normalize_and_grayscale():
    out = preprocess.normalize(jnp.full((1, 2, 2, 3), 255.0))
    expected = (1 - np.array(preprocess.CLIP_MEAN)) / np.array(preprocess.CLIP_STD)
    np.testing.assert_allclose(out[0, 0, 0], expected, rtol=1e-6)
    gray = jnp.arange(4, dtype=jnp.uint8).reshape(1, 2, 2, 1)
    rgb = preprocess.grayscale_to_rgb(gray)
    assert rgb.shape == (1, 2, 2, 3) and (rgb == gray).all()
    assert preprocess.grayscale_to_rgb(rgb) is rgb


# --- heads ----------------------------------------------------------------------------


_VOCAB, _WIDTH, _LENGTH = 97, 16, 12
_TABLE = np.random.default_rng(0).standard_normal((_VOCAB, _WIDTH)).astype(np.float32)


def _word_ids(sentence: str) -> list[int]:
    digests = (int(hashlib.md5(w.encode()).hexdigest(), 16) for w in sentence.split())
    return [1 + d % (_VOCAB - 1) for d in digests]


def _fake_tokenize(texts):
    ids = np.zeros((len(texts), _LENGTH), np.int32)
    for i, t in enumerate(texts):
        words = _word_ids(t)[:_LENGTH]
        ids[i, : len(words)] = words
    return jnp.asarray(ids), jnp.asarray(ids > 0)


def _fake_encode(ids, mask):  # A hashed bag of words.
    return jnp.einsum("tl,tld->td", mask.astype(jnp.float32), jnp.asarray(_TABLE)[ids])


def test_zero_shot_head_matches_numpy_recipe():
    task = paper.PAPER_TASKS["eurosat"]
    scale = np.log(100.0)
    head = zero_shot.zero_shot_head(
        _fake_encode, _fake_tokenize, task.class_names, task.templates, scale
    )
    columns = []
    for name in task.class_names:
        rows = np.stack([_TABLE[_word_ids(p)].sum(0) for p in task.prompts(name)])
        rows /= np.linalg.norm(rows, axis=1, keepdims=True)
        mean = rows.mean(0)
        columns.append(mean / np.linalg.norm(mean))
    expected = np.stack(columns, axis=1) * 100.0
    assert head["kernel"].shape == (_WIDTH, 10) and head["bias"].shape == (10,)
    np.testing.assert_allclose(head["kernel"], expected, rtol=1e-5, atol=1e-5)
    assert not np.asarray(head["bias"]).any()
    callables = [lambda c, t=t: t.format(c=c) for t in task.templates]
    again = zero_shot.zero_shot_head(
        _fake_encode, _fake_tokenize, task.class_names, callables, scale
    )
    np.testing.assert_array_equal(again["kernel"], head["kernel"])


def test_glue_head_is_fixed_and_frozen_shape():
    head = zero_shot.glue_head(None, 24, 3)
    # The documented init, by hand: LeCun normal (standard normal / sqrt(fan_in)) drawn
    # with jax.random from the fixed seed GLUE_HEAD_SEED = 0; zero bias.
    expected = jax.random.normal(jax.random.key(0), (24, 3), jnp.float32) / np.sqrt(24)
    np.testing.assert_allclose(head["kernel"], expected, rtol=1e-6, atol=0)
    assert head["kernel"].dtype == jnp.float32 and zero_shot.GLUE_HEAD_SEED == 0
    np.testing.assert_array_equal(zero_shot.glue_head(jax.random.key(0), 24, 3)["kernel"],
                                  head["kernel"])
    assert not np.array_equal(zero_shot.glue_head(1, 24, 3)["kernel"], head["kernel"])
    np.testing.assert_array_equal(zero_shot.glue_head(0, 24, 3)["kernel"], head["kernel"])
    assert head["kernel"].shape == (24, 3) and not np.asarray(head["bias"]).any()


# --- local tasks ----------------------------------------------------------------------


def _digest(root: pathlib.Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_local_tasks_deterministic_idempotent_and_loadable(tmp_path):
    tasks = ("glyph_digits", "glyph_upper")
    a = local.make_image_folder(tmp_path / "a", tasks, per_class=4, test_per_class=2)
    b = local.make_image_folder(tmp_path / "b", tasks, per_class=4, test_per_class=2)
    assert _digest(a) == _digest(b) and len(_digest(a)) == 2 * (10 * 6 + 1)
    marker = a / "glyph_digits" / ".complete"
    stamp = marker.stat().st_mtime_ns
    local.make_image_folder(a, tasks, per_class=4, test_per_class=2)
    assert marker.stat().st_mtime_ns == stamp  # Reused, not rewritten.
    local.make_image_folder(a, ("glyph_digits",), per_class=3, test_per_class=2)
    assert json.loads(marker.read_text())["per_class"] == 3
    assert len(list((a / "glyph_digits" / "train").rglob("*.png"))) == 30
    task = paper.load_paper_task("glyph_upper", source="folder", folder=a)
    assert task.train[0].shape == (36, 32, 32, 3) and task.class_names[0] == "A"

    t1 = local.make_text_tasks(tmp_path / "t1", train_size=20, test_size=10)
    t2 = local.make_text_tasks(tmp_path / "t2", train_size=20, test_size=10)
    assert _digest(t1) == _digest(t2)
    texts, pairs, labels = text.read_tsv(t1 / "keyword_pair" / "train.tsv")
    assert len(pairs) == 20 and np.bincount(labels).tolist() == [10, 10]
    texts, pairs, labels = text.read_tsv(t1 / "keyword_sentiment" / "train.tsv")
    positive = set(local._SENTIMENT[1])
    assert [int(bool(positive & set(t.split()))) for t in texts] == labels.tolist()
    tokens = text.tokenize(local.build_tokenizer(), texts, max_length=16)
    assert (tokens[:, 0] != local.build_tokenizer().token_to_id("[UNK]")).all()
