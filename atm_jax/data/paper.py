"""The paper's tasks: 7 CLIP vision tasks and 7 GLUE tasks, with their splits.

ATM (arXiv 2411.03055, Sec. 5) finetunes CLIP ViT-B/16 on CIFAR100, DTD, EuroSAT,
GTSRB, MNIST, RESISC45 and SVHN, and BERT-base / RoBERTa-base on GLUE CoLA, SST-2,
MRPC, QQP, MNLI, QNLI and RTE. `PAPER_TASKS` records for each task where its data
comes from, its splits, feature keys, class names and (vision) the zero-shot
prompt templates of task vectors (arXiv 2212.04089, ``src/datasets/templates.py``),
whose class names are used here too.

The registry itself lives in `atm_jax.data.paper_tasks`. `load_paper_task` returns an `atm_jax.data.tasks.TaskData` cut the paper's way:

* ``train``: 90% of the source's training split, ``validation``: the other 10%,
  capped at 5000 examples (the cap moves the surplus back to train), drawn with a
  permutation seeded by ``seed`` (0 in the paper), like task vectors'
  ``random_split(..., generator=manual_seed(0))`` with ``int(0.1 * N)`` held out;
* ``test``: the source's test split (GLUE: ``validation``, MNLI:
  ``validation_matched``). EuroSAT and RESISC45 have only a training split in
  tfds, so a fixed share of it (10% / 20%, the sizes of the task-vectors test
  sets: 2,700 / 6,300) is carved out as test with a seed that never changes, and
  the 90/10 cut applies to the rest.

Inputs are uint8 images [N, H, W, 3] for vision tasks (grayscale repeated over 3
channels; native resolution when all images of a dataset share one size, e.g.
CIFAR100 / SVHN 32x32, MNIST 28x28, EuroSAT 64x64, RESISC45 256x256; otherwise,
as for DTD and GTSRB, each image resized at load time to ``image_size``, default
224, with a bicubic resize of the shorter side and a centre crop). Memory: a
224x224x3 uint8 image is 150 KB, so DTD's 5,640 images take 0.85 GB and GTSRB's
51,839 take 7.8 GB at 224; pass a smaller ``image_size`` (or ``train_size``) to
save memory and let `atm_jax.data.preprocess` resize on device. Text tasks give
int32 [N, 3, max_length] token arrays (`atm_jax.data.text.tokenize`).

Sources (``source=``):

* ``"tfds"``: prepared tensorflow-datasets in array_record format, read without
  TensorFlow (`atm_jax.data.tfds_source`); a missing one raises at once with the
  command that prepares it.
* ``"folder"``: image folders ``folder/<task>/{train,test}/<class>/<images>``
  (`atm_jax.data.image_folder`); GTSRB may also sit in ``folder/gtsrb/`` as its
  official archives unpack. EuroSAT and RESISC45 may come without ``test/``
  (e.g. the extracted ``NWPU-RESISC45/<class>/`` folders moved to
  ``folder/resisc45/train/``): the same fixed test carve as for tfds applies.
* ``"tsv"``: text TSVs ``folder/<task>/{train,test}.tsv`` (`atm_jax.data.text`).

The local sources also accept task names outside `PAPER_TASKS` (e.g. the tiny
tasks written by `atm_jax.data.local`); their class names then come from the
folder names or ``labels.txt``.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from atm_jax.data import image_folder, text, tfds_source
from atm_jax.data.paper_tasks import (  # noqa: F401 - re-exported
    GLUE_TASKS,
    PAPER_TASKS,
    VISION_TASKS,
    PaperTask,
)
from atm_jax.data.splits import named_rng
from atm_jax.data.tasks import TaskData

PathLike = str | os.PathLike

SOURCES = ("tfds", "folder", "tsv")


def split_indices(
    num_examples: int,
    *,
    seed: int = 0,
    validation_fraction: float = 0.1,
    validation_cap: int | None = 5000,
) -> tuple[np.ndarray, np.ndarray]:
    """The paper's train / validation cut of a training split.

    ``int(validation_fraction * N)`` examples, at most ``validation_cap``, are
    held out; a permutation seeded by ``seed`` decides which.

    Args:
      num_examples: Size N of the training split.
      seed: Seed of the permutation.
      validation_fraction: Share held out, in [0, 1).
      validation_cap: Most examples held out; None for no cap.

    Returns:
      (train positions, validation positions), disjoint int64 arrays covering
      0..N-1, each in random order.
    """
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
    held = int(num_examples * validation_fraction)
    if validation_cap is not None:
        held = min(held, int(validation_cap))
    order = np.random.default_rng(seed).permutation(num_examples)
    return order[: num_examples - held], order[num_examples - held :]


def _carve_test(num_examples: int, fraction: float, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Fixed (seed-independent) split of a train-only source into (train, test)."""
    order = named_rng(0, f"test:{name}").permutation(num_examples)
    held = int(round(num_examples * fraction))
    return np.sort(order[held:]), np.sort(order[:held])


def _cap(indices: np.ndarray, size: int | None, what: str) -> np.ndarray:
    if size is None:
        return indices
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 0:
        raise ValueError(f"{what} must be a non-negative int or None, got {size!r}")
    return indices[: int(size)]


@dataclasses.dataclass(frozen=True)
class _Pool:
    """A split before decoding: its size, and how to read examples by position."""

    size: int
    # read(positions, image_size) -> (inputs, int32 labels)
    read: Callable[[np.ndarray, Any], tuple[np.ndarray, np.ndarray]]
    # Image sizes (width, height) found at the given positions (image folders only).
    sizes: Callable[[np.ndarray], set[tuple[int, int]]] = lambda positions: set()


def _subset(pool: _Pool, positions: np.ndarray) -> _Pool:
    return _Pool(
        len(positions),
        lambda idx, size: pool.read(positions[idx], size),
        lambda idx: pool.sizes(positions[idx]),
    )


_CHUNK = 2048  # Examples decoded at a time, so encoded bytes never pile up.


def _decode(fetch: Callable[[np.ndarray], tuple[list, list]], idx: np.ndarray, size) -> tuple:
    """Decodes images chunk by chunk; ``fetch(part)`` gives (encoded blobs, labels)."""
    images, labels = [], []
    for start in range(0, len(idx), _CHUNK):
        blobs, part_labels = fetch(idx[start : start + _CHUNK])
        images.append(image_folder.decode_images(blobs, image_size=size))
        labels.extend(part_labels)
    if not images:
        side = size or 0
        return np.zeros((0, side, side, 3), np.uint8), np.zeros(0, np.int32)
    return np.concatenate(images), np.asarray(labels, np.int32)


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _tfds_pools(task: PaperTask, data_dir, tokenizer, max_length) -> tuple[dict[str, _Pool], bool]:
    """The train/test pools of a tfds task, and whether all its images share one size."""
    if task.tfds_name is None:
        raise tfds_source.DatasetNotPreparedError(tfds_source.NO_BUILDER[task.name])
    builder = tfds_source.open_builder(task.tfds_name, data_dir, task=task.name)
    uniform = task.modality == "image" and None not in builder.info.features[task.image_key].shape
    raw = (task.image_key,) if task.modality == "image" else ()
    pools = {}
    for split in ("train", "test"):
        expression = task.test_split if split == "test" and task.test_split else task.train_split
        source = tfds_source.open_split(
            task.tfds_name, expression, data_dir, task=task.name, raw_images=raw
        )
        pools[split] = _Pool(len(source), _tfds_reader(task, source, tokenizer, max_length))
    if task.test_split is None:
        keep, held = _carve_test(pools["train"].size, task.test_fraction, task.name)
        pools = {"train": _subset(pools["train"], keep), "test": _subset(pools["test"], held)}
    return pools, uniform


def _tfds_reader(task: PaperTask, source, tokenizer, max_length):
    def fetch(part):
        records = tfds_source.read_records(source, part)
        return [r[task.image_key] for r in records], [r[task.label_key] for r in records]

    def read(idx: np.ndarray, size):
        if task.modality == "image":
            return _decode(fetch, idx, size)
        records = tfds_source.read_records(source, idx)
        columns = [[_text(r[key]) for r in records] for key in task.text_keys]
        pairs = columns[1] if len(columns) > 1 else None
        tokens = text.tokenize(tokenizer, columns[0], pairs, max_length)
        return tokens, np.asarray([r[task.label_key] for r in records], np.int32)

    return read


def _normal(name: str) -> str:
    return name.lower().replace("_", " ").replace("-", " ")


def _folder_labels(found: Sequence[str], class_names: Sequence[str], root) -> tuple[str, ...]:
    """Class folder of each label of a registered task.

    Folders named like the classes (case, ``_`` and ``-`` ignored) map by name;
    folders named by integers (GTSRB's ``00000`` .. ``00042``) map by value.
    """
    by_name = {_normal(c): i for i, c in enumerate(class_names)}
    if all(_normal(f) in by_name for f in found):
        folders = [""] * len(class_names)
        for f in found:
            folders[by_name[_normal(f)]] = f
        missing = [class_names[i] for i, f in enumerate(folders) if not f]
        if missing:
            raise image_folder.ImageFolderError(
                f"{root}: no class folder for {', '.join(missing[:10])}"
            )
        return tuple(folders)
    if all(f.isdigit() for f in found):
        values = {int(f): f for f in found}
        if sorted(values) != list(range(len(class_names))):
            raise image_folder.ImageFolderError(
                f"{root}: numbered class folders must be 0..{len(class_names) - 1}, got "
                f"{', '.join(found[:10])}"
            )
        return tuple(values[i] for i in range(len(class_names)))
    raise image_folder.ImageFolderError(
        f"{root}: class folders ({', '.join(found[:5])} ...) match neither the "
        f"{len(class_names)} class names of the task ({', '.join(class_names[:3])} ...) "
        "nor numbers 0..C-1."
    )


def _folder_pools(name: str, task: PaperTask | None, folder) -> tuple[dict[str, _Pool], tuple]:
    root = _task_root(name, folder, "folder", "<split>/<class>/<images>")
    if name == "gtsrb" and image_folder.has_gtsrb_official(root):
        files = {s: image_folder.list_gtsrb_official(root, s) for s in ("train", "test")}
        class_names = task.class_names
    else:
        found = image_folder.find_class_folders(root, "train")
        folders = _folder_labels(found, task.class_names, root) if task else found
        splits = ("train", "test")
        if task is not None and task.test_split is None and not (root / "test").exists():
            splits = ("train",)  # Train-only, like tfds' copy: carve the test set below.
        files = {s: image_folder.list_image_folder(root, s, class_folders=folders) for s in splits}
        class_names = task.class_names if task else folders

    def pool(listing: image_folder.ImageFiles) -> _Pool:
        def fetch(part):
            return [listing.paths[i] for i in part], listing.labels[part].tolist()

        def sizes(idx):
            from PIL import Image

            found = set()
            for i in idx:
                with Image.open(listing.paths[i]) as image:
                    found.add(image.size)
            return found

        return _Pool(len(listing), lambda idx, size: _decode(fetch, idx, size), sizes)

    pools = {s: pool(f) for s, f in files.items()}
    if "test" not in pools:
        keep, held = _carve_test(pools["train"].size, task.test_fraction, task.name)
        pools = {"train": _subset(pools["train"], keep), "test": _subset(pools["train"], held)}
    return pools, tuple(class_names)


def _tsv_pools(name, task, folder, tokenizer, max_length) -> tuple[dict[str, _Pool], tuple]:
    root = _task_root(name, folder, "tsv", "{train,test}.tsv")
    pools, top = {}, -1
    for split in text.TSV_SPLITS:
        texts, pairs, labels = text.read_tsv(root / f"{split}.tsv")
        top = max(top, int(labels.max(initial=-1)))

        def read(idx, size, texts=texts, pairs=pairs, labels=labels):
            chosen_pairs = None if pairs is None else [pairs[i] for i in idx]
            tokens = text.tokenize(tokenizer, [texts[i] for i in idx], chosen_pairs, max_length)
            return tokens, labels[idx]

        pools[split] = _Pool(len(labels), read)
    class_names = text.tsv_class_names(root) or (task.class_names if task else None)
    if class_names is None:
        class_names = tuple(str(i) for i in range(top + 1))
    return pools, tuple(class_names)


def _task_root(name: str, folder, source: str, layout: str) -> pathlib.Path:
    if folder is None:
        raise ValueError(f"source={source!r} needs folder=ROOT holding ROOT/{name}/{layout}")
    return pathlib.Path(folder).expanduser() / name


def load_paper_task(
    name: str,
    *,
    source: str = "tfds",
    data_dir: PathLike | None = None,
    folder: PathLike | None = None,
    seed: int = 0,
    validation_fraction: float = 0.1,
    validation_cap: int | None = 5000,
    tokenizer: Any = None,
    max_length: int = 128,
    train_size: int | None = None,
    test_size: int | None = None,
    image_size: int | None = None,
) -> TaskData:
    """Loads one of the paper's tasks with the paper's train/validation/test cut.

    Same arguments, same arrays. Only the examples kept are decoded, so
    ``train_size`` / ``test_size`` also make loading fast.

    Args:
      name: A key of `PAPER_TASKS`, or any task name for the local sources.
      source: "tfds", "folder" or "tsv" (see the module docstring).
      data_dir: tfds data dir; defaults to `tfds_source.default_data_dir`.
      folder: Root of the local sources, holding ``folder/<name>/``.
      seed: Seed of the train/validation permutation and of the subsamples.
      validation_fraction: Share of the training split held out as validation.
      validation_cap: Most validation examples; None for no cap.
      tokenizer: Text tasks: a tokenizer object, or a path / hub id for
        `text.load_tokenizer`.
      max_length: Text tasks: token sequence length L.
      train_size: Keep at most this many training examples (a seeded random
        subset); None keeps all. Validation is unaffected.
      test_size: Keep at most this many test examples (seeded); None keeps all,
        in the source's order.
      image_size: Vision tasks: resize every image (shorter side, bicubic, then
        centre crop) to this side. None keeps the native size when all images
        share one and uses 224 otherwise.

    Returns:
      `TaskData` with inputs uint8 [N, H, W, 3] (vision) or int32 [N, 3, L]
      (text) and int32 labels [N].

    Raises:
      ValueError: For an unknown task or source, or bad arguments.
      tfds_source.DatasetNotPreparedError: If a tfds dataset is not prepared
        (the message has the command that prepares it).
      image_folder.ImageFolderError: If an image folder is missing or malformed.
      FileNotFoundError: If a TSV file is missing.
    """
    if source not in SOURCES:
        raise ValueError(f"Unknown source {source!r}; expected one of {', '.join(SOURCES)}")
    task = PAPER_TASKS.get(name)
    if task is None and source == "tfds":
        raise ValueError(f"Unknown task {name!r}; paper tasks: {', '.join(PAPER_TASKS)}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    is_text = source == "tsv" or (task is not None and task.modality == "text")
    if task is not None and source != "tfds" and (task.modality == "text") != (source == "tsv"):
        raise ValueError(
            f"{name!r} is a {task.modality} task; source={source!r} reads "
            f"{'text' if source == 'tsv' else 'image'} tasks"
        )
    if is_text:
        if tokenizer is None:
            raise ValueError(f"Text task {name!r} needs tokenizer= (an object, path or hub id)")
        if isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = text.load_tokenizer(tokenizer)

    uniform = False
    if source == "tfds":
        pools, uniform = _tfds_pools(task, data_dir, tokenizer, max_length)
        class_names = task.class_names
    elif source == "folder":
        pools, class_names = _folder_pools(name, task, folder)
    else:
        pools, class_names = _tsv_pools(name, task, folder, tokenizer, max_length)

    train_idx, validation_idx = split_indices(
        pools["train"].size,
        seed=int(seed),
        validation_fraction=validation_fraction,
        validation_cap=validation_cap,
    )
    train_idx = _cap(train_idx, train_size, "train_size")
    test_idx = np.arange(pools["test"].size)
    if test_size is not None:
        test_order = named_rng(int(seed), f"test:{name}").permutation(test_idx)
        test_idx = _cap(test_order, test_size, "test_size")

    size = image_size
    if not is_text and size is None and not uniform:
        if source == "tfds":
            size = image_folder.DEFAULT_IMAGE_SIZE  # The dataset declares no fixed shape.
        else:
            kept = np.concatenate([train_idx, validation_idx])
            if len(pools["train"].sizes(kept) | pools["test"].sizes(test_idx)) > 1:
                size = image_folder.DEFAULT_IMAGE_SIZE
    splits = {
        "train": pools["train"].read(train_idx, size),
        "validation": pools["train"].read(validation_idx, size),
        "test": pools["test"].read(test_idx, size),
    }
    # An empty split takes the example shape of the others, so splits concatenate.
    shape = next((x.shape[1:] for x, _ in splits.values() if len(x)), None)
    if shape is not None:
        splits = {s: (x if len(x) else x.reshape((0, *shape)), y) for s, (x, y) in splits.items()}
    for split, (_, labels) in splits.items():
        if labels.size and (labels.min() < 0 or labels.max() >= len(class_names)):
            raise ValueError(
                f"Task {name!r} {split}: labels must lie in 0..{len(class_names) - 1}, got "
                f"{labels.min()}..{labels.max()}"
            )
    return TaskData(name=name, class_names=tuple(class_names), **splits)
