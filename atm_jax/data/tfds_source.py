"""Reading prepared tensorflow-datasets (array_record) without TensorFlow.

The paper's datasets (ATM, arXiv 2411.03055, Sec. 5) come from
tensorflow-datasets. *Reading* a dataset prepared in the ``array_record`` file
format needs only the ``tensorflow-datasets`` package: `open_split` goes through
``tfds.builder_from_directory(...).as_data_source(split)``, which reads the
dataset's own ``dataset_info.json`` / ``features.json`` and never imports the
builder code, TensorFlow, or the network. *Preparing* one (downloading the raw
files and writing array_record shards) needs TensorFlow and the network, on any
machine, once::

  pip install -e ".[prepare]"
  python -m atm_jax.data.prepare tfds cifar100 dtd eurosat mnist svhn --data_dir DIR

A prepared dataset lives in ``DIR/<name>/<config>/<version>/`` (e.g.
``DIR/eurosat/rgb/2.0.0/``, ``DIR/glue/cola/2.0.0/``, ``DIR/cifar100/3.0.2/``).
``DIR`` defaults to `default_data_dir`. A missing dataset fails at once with
`DatasetNotPreparedError`, naming the dataset and the command above.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Sequence
from typing import Any

from atm_jax import files
from atm_jax.errors import DatasetNotPreparedError

PathLike = str | os.PathLike

DATA_DIR_ENV = "TFDS_DATA_DIR"
PREPARE_TFDS_COMMAND = "python -m atm_jax.data.prepare tfds"
PREPARE_INSTALL = 'pip install -e ".[prepare]"'

MANUAL_DOWNLOADS: dict[str, str] = {
    "resisc45": (
        "resisc45 needs a manual download: get NWPU-RESISC45.rar (the OneDrive link "
        "https://1drv.ms/u/s!AmgKYzARBl5ca3HNaHIlzp_IXjs given by tfds' resisc45 builder) and "
        "extract it so that {manual_dir}/NWPU-RESISC45/<class>/<image>.jpg exist (tfds' "
        "manual_dir; change it with --manual_dir), then run the command below. Or skip "
        "tfds: move the extracted class folders to ROOT/resisc45/train/<class>/ and load "
        "with source='folder', folder=ROOT (20% is carved out as the test set, as for tfds)."
    ),
}
"""tfds datasets whose raw files must be put in place by hand, with instructions."""

# What a manual download leaves in the manual dir once extracted.
_MANUAL_MARKERS = {"resisc45": "NWPU-RESISC45"}

NO_BUILDER: dict[str, str] = {
    "gtsrb": (
        "GTSRB has no tensorflow-datasets builder; read it with the image-folder source: "
        "load_paper_task('gtsrb', source='folder', folder=ROOT) with ROOT/gtsrb/{train,test}/"
        "<class 00000..00042>/*.ppm, or ROOT/gtsrb/GTSRB/... as the official archives "
        "GTSRB_Final_Training_Images.zip, GTSRB_Final_Test_Images.zip and "
        "GTSRB_Final_Test_GT.zip unpack (see atm_jax/data/image_folder.py)."
    ),
}
"""Datasets that tfds lacks, with where to read them from instead."""


def default_data_dir() -> pathlib.Path:
    """Returns ``$TFDS_DATA_DIR`` if set, else ``atm_jax.data.cache_dir() / "tfds"``."""
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return pathlib.Path(env).expanduser()
    return files.cache_dir() / "tfds"


def resolve_data_dir(data_dir: PathLike | None = None) -> pathlib.Path:
    """Returns ``data_dir`` as a path, or `default_data_dir` when it is None or empty."""
    return pathlib.Path(data_dir).expanduser() if data_dir else default_data_dir()


def manual_dir(data_dir: PathLike | None = None) -> pathlib.Path:
    """tfds' default folder for manually downloaded files: ``DIR/downloads/manual``."""
    return resolve_data_dir(data_dir) / "downloads" / "manual"


def prepare_command(names: Sequence[str], data_dir: PathLike | None = None) -> str:
    """The shell command that prepares ``names`` into ``data_dir``."""
    return f"{PREPARE_TFDS_COMMAND} {' '.join(names)} --data_dir {resolve_data_dir(data_dir)}"


def not_prepared_message(
    tfds_name: str, data_dir: PathLike | None = None, *, task: str | None = None, reason: str = ""
) -> str:
    """Explains how to get ``tfds_name`` into ``data_dir``; used by the errors here."""
    root = resolve_data_dir(data_dir)
    label = task or tfds_name
    base = tfds_name.split("/")[0].split(":")[0]
    if base in NO_BUILDER:
        return NO_BUILDER[base]
    lines = [f"Dataset '{label}' (tfds '{tfds_name}') is not prepared in {root}{reason}."]
    if base in MANUAL_DOWNLOADS:
        lines.append(MANUAL_DOWNLOADS[base].format(manual_dir=manual_dir(root)))
    lines.append(
        f"Prepare it once (needs TensorFlow and network, any machine; then copy {root}): "
        f"`{PREPARE_INSTALL}` then `{prepare_command([label], root)}`."
    )
    return "\n".join(lines)


def find_prepared(
    tfds_name: str, data_dir: PathLike | None = None, *, task: str | None = None
) -> pathlib.Path:
    """Returns the folder of a prepared dataset version, checking only the disk.

    Args:
      tfds_name: ``name[/config][:version]``, e.g. ``"eurosat/rgb"`` or
        ``"cifar100:3.0.2"``. Without a version the newest one prepared in the
        array_record format is used.
      data_dir: tfds data dir; defaults to `default_data_dir`.
      task: Name to show in the error message (the paper task name).

    Returns:
      ``data_dir/name[/config]/version``.

    Raises:
      DatasetNotPreparedError: If no version is prepared, or only in the tfrecord
        format (which cannot be read without TensorFlow).
    """
    from tensorflow_datasets.core.utils import file_utils

    root = resolve_data_dir(data_dir)
    name, _, version = tfds_name.partition(":")
    folder = root / name
    if version:
        prepared = [folder / version] if (folder / version / "dataset_info.json").is_file() else []
    else:  # tfds' own listing (version folders holding a dataset_info.json), newest first.
        prepared = [folder / str(v) for v in reversed(file_utils.list_dataset_versions(folder))]
    for path in prepared:
        if any(".array_record-" in f.name for f in path.iterdir()):
            return path
    if prepared:
        raise DatasetNotPreparedError(
            not_prepared_message(
                tfds_name,
                root,
                task=task,
                reason=(
                    f" in the array_record format (found other shards in {prepared[0]}; they "
                    "need TensorFlow to read)"
                ),
            )
        )
    raise DatasetNotPreparedError(not_prepared_message(tfds_name, root, task=task))


def open_builder(tfds_name: str, data_dir: PathLike | None = None, *, task: str | None = None):
    """Returns the read-only tfds builder of a prepared dataset (no TF, no network)."""
    import tensorflow_datasets as tfds

    return tfds.builder_from_directory(str(find_prepared(tfds_name, data_dir, task=task)))


def open_split(
    tfds_name: str,
    split: str,
    data_dir: PathLike | None = None,
    *,
    task: str | None = None,
    raw_images: Sequence[str] = (),
) -> Any:
    """Opens one split of a prepared dataset as a random-access data source.

    Args:
      tfds_name: See `find_prepared`.
      split: A tfds split expression, e.g. ``"train"``, ``"train+validation"``.
      data_dir: tfds data dir; defaults to `default_data_dir`.
      task: Name to show in error messages.
      raw_images: Image features to return as their encoded bytes instead of
        decoded arrays, so the caller decodes (and resizes) them itself.

    Returns:
      A sequence of example dicts (``len``, ``[i]``, ``__getitems__``).

    Raises:
      DatasetNotPreparedError: If the dataset is not prepared.
      ValueError: If the split does not exist or the expression does not parse
        (tfds' own check, naming the splits there are).
    """
    import tensorflow_datasets as tfds

    builder = open_builder(tfds_name, data_dir, task=task)
    decoders = {key: tfds.decode.SkipDecoding() for key in raw_images} or None
    return builder.as_data_source(split=split, decoders=decoders)


def read_records(source: Any, indices: Sequence[int], chunk: int = 1024) -> list[dict]:
    """Reads the examples at ``indices`` (in that order) from a data source."""
    out: list[dict] = []
    indices = [int(i) for i in indices]
    for start in range(0, len(indices), chunk):
        part = indices[start : start + chunk]
        if hasattr(source, "__getitems__"):
            out.extend(source.__getitems__(part))
        else:
            out.extend(source[i] for i in part)
    return out


def prepare(
    tfds_names: Sequence[str],
    data_dir: PathLike | None = None,
    *,
    manual: PathLike | None = None,
) -> list[pathlib.Path]:
    """Downloads and writes datasets in the array_record format (needs TensorFlow).

    Args:
      tfds_names: tfds names, e.g. ``["cifar100", "eurosat/rgb", "glue/cola"]``.
      data_dir: Where to write; defaults to `default_data_dir`.
      manual: tfds manual_dir for manually downloaded files; defaults to
        `manual_dir`.

    Returns:
      The prepared version folders.

    Raises:
      DatasetNotPreparedError: If TensorFlow is missing, a dataset has no tfds
        builder, or a manual download is missing.
    """
    import importlib.util

    root = resolve_data_dir(data_dir)
    manual = pathlib.Path(manual).expanduser() if manual else manual_dir(root)
    for name in tfds_names:
        base = name.split("/")[0].split(":")[0]
        if base in NO_BUILDER:
            raise DatasetNotPreparedError(NO_BUILDER[base])
        if base in _MANUAL_MARKERS and not (manual / _MANUAL_MARKERS[base]).exists():
            raise DatasetNotPreparedError(
                MANUAL_DOWNLOADS[base].format(manual_dir=manual)
                + f"\nThen: `{prepare_command(list(tfds_names), root)} --manual_dir {manual}`."
            )
    if importlib.util.find_spec("tensorflow") is None:
        raise DatasetNotPreparedError(
            "Preparing tfds datasets needs TensorFlow, which is not installed: run "
            f"`{PREPARE_INSTALL}` (tensorflow-cpu), then "
            f"`{prepare_command(list(tfds_names), root)}`. Reading them later needs no "
            "TensorFlow."
        )
    import tensorflow_datasets as tfds

    done = []
    for name in tfds_names:
        builder = tfds.builder(name, data_dir=str(root), file_format="array_record")
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=str(manual))
        )
        done.append(find_prepared(name, root))
    return done
