"""Image-folder sources: local images for datasets tfds lacks or cannot fetch.

GTSRB has no tensorflow-datasets builder and RESISC45's needs a manual download,
so both (and the tiny local tasks of `atm_jax.data.local`) can be read from plain
folders of image files. One task is laid out as::

  <task root>/
    train/
      <class folder>/*.png|jpg|jpeg|ppm|bmp
      ...
    test/
      <class folder>/...

Labels follow the order of ``class_folders`` when given, else the sorted folder
names (``sorted()`` on strings, so zero-padded numbers such as GTSRB's ``00000`` ..
``00042`` sort numerically). Hidden files and other extensions are ignored. Every
class folder must hold at least one image and the test split must not have class
folders the train split lacks.

GTSRB's official archives can be read as they unpack, without reorganising::

  <task root>/GTSRB/Final_Training/Images/000NN/*.ppm     (or GTSRB/Training/000NN)
  <task root>/GTSRB/Final_Test/Images/*.ppm
  <task root>/GT-final_test.csv   (or inside GTSRB/ or GTSRB/Final_Test/Images/)

the last being the semicolon-separated ground truth (``Filename;...;ClassId``).
See `list_gtsrb_official`.

Decoding goes through Pillow: every image is converted to RGB (grayscale is
repeated over three channels, alpha dropped) and returned as uint8 [H, W, 3].
Images are kept at their native resolution when all share one size; otherwise
(or when a size is asked for) each is resized with `resize_shorter_center_crop`.
A uint8 224x224x3 image takes 150 KB, so 10,000 of them take 1.5 GB.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import pathlib
from collections.abc import Sequence

import numpy as np

from atm_jax.errors import ImageFolderError

PathLike = str | os.PathLike

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".ppm", ".bmp")
"""File extensions read as images (case-insensitive)."""

DEFAULT_IMAGE_SIZE = 224
"""Side length used when images of one dataset differ in size and none is given."""


@dataclasses.dataclass(frozen=True, eq=False)
class ImageFiles:
    """The image files of one split, before decoding.

    Attributes:
      paths: File paths [N], in label order then sorted file name.
      labels: int32 [N].
      class_folders: Folder name of each label 0..C-1.
    """

    paths: tuple[pathlib.Path, ...]
    labels: np.ndarray
    class_folders: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.paths)


def _is_image(path: pathlib.Path) -> bool:
    if path.name.startswith(".") or path.suffix.lower() not in IMAGE_EXTENSIONS:
        return False
    return path.is_file()


def _subfolders(folder: pathlib.Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def find_class_folders(root: PathLike, split: str = "train") -> tuple[str, ...]:
    """Returns the sorted class folder names of ``root/split``.

    Raises:
      ImageFolderError: If the folder is missing or has no class folders.
    """
    folder = _split_dir(root, split)
    names = _subfolders(folder)
    if not names:
        raise ImageFolderError(
            f"{folder} has no class folders; expected {folder}/<class name>/<image files>."
        )
    return tuple(names)


def _split_dir(root: PathLike, split: str) -> pathlib.Path:
    root = pathlib.Path(root).expanduser()
    if not root.is_dir():
        raise ImageFolderError(
            f"Image folder {root} does not exist; expected {root}/{split}/<class name>/<images> "
            "(see atm_jax/data/image_folder.py for the layout)."
        )
    folder = root / split
    if not folder.is_dir():
        present = ", ".join(_subfolders(root)) or "nothing"
        raise ImageFolderError(
            f"Image folder {root} has no '{split}' split (found: {present}); expected "
            f"{folder}/<class name>/<images>."
        )
    return folder


def list_image_folder(
    root: PathLike, split: str, *, class_folders: Sequence[str] | None = None
) -> ImageFiles:
    """Lists ``root/split/<class folder>/<image>`` files with their labels.

    Args:
      root: Task root holding one folder per split.
      split: Split folder name, e.g. "train" or "test".
      class_folders: Folder name of each label 0..C-1. None uses the sorted folder
        names of this split; pass the train split's names when listing the test
        split so labels agree (`load` does).

    Returns:
      The split's `ImageFiles`.

    Raises:
      ImageFolderError: If the root, the split, a class folder or any image is
        missing, or the split holds class folders not in ``class_folders``.
    """
    folder = _split_dir(root, split)
    found = _subfolders(folder)
    if class_folders is None:
        names = tuple(found)
        if not names:
            raise ImageFolderError(
                f"{folder} has no class folders; expected {folder}/<class name>/<image files>."
            )
    else:
        names = tuple(class_folders)
        extra = sorted(set(found) - set(names))
        if extra:
            raise ImageFolderError(
                f"{folder} has class folders that are not among the {len(names)} known classes: "
                f"{', '.join(extra[:10])}"
            )
    paths: list[pathlib.Path] = []
    labels: list[int] = []
    empty = []
    for label, name in enumerate(names):
        class_dir = folder / name
        files = sorted(p for p in class_dir.iterdir() if _is_image(p)) if class_dir.is_dir() else []
        if not files:
            empty.append(name)
        paths.extend(files)
        labels.extend([label] * len(files))
    if empty:
        raise ImageFolderError(
            f"{folder}: no {'/'.join(IMAGE_EXTENSIONS)} images for class folder(s) "
            f"{', '.join(empty[:10])}{' ...' if len(empty) > 10 else ''}."
        )
    return ImageFiles(tuple(paths), np.asarray(labels, np.int32), names)


def has_gtsrb_official(root: PathLike) -> bool:
    """Whether ``root`` holds GTSRB as its official archives unpack (see module doc)."""
    return (pathlib.Path(root).expanduser() / "GTSRB").is_dir()


def list_gtsrb_official(root: PathLike, split: str) -> ImageFiles:
    """Lists GTSRB's images in the layout its official archives unpack to.

    Args:
      root: Folder holding ``GTSRB/`` (and possibly ``GT-final_test.csv``).
      split: "train" (the 39,209 training images, labels from the 43 class
        folders) or "test" (the 12,630 test images, labels from the ground truth
        CSV).

    Returns:
      The split's `ImageFiles`; class folders are "00000" .. "00042".

    Raises:
      ImageFolderError: If a part of the layout is missing.
    """
    base = pathlib.Path(root).expanduser() / "GTSRB"
    if split == "train":
        for candidate in (base / "Final_Training" / "Images", base / "Training"):
            if candidate.is_dir():
                return list_image_folder(candidate.parent, candidate.name)
        raise ImageFolderError(
            f"No GTSRB training images: expected {base}/Final_Training/Images/000NN/*.ppm "
            f"or {base}/Training/000NN/*.ppm."
        )
    if split != "test":
        raise ValueError(f"GTSRB has splits 'train' and 'test', not {split!r}")
    images = base / "Final_Test" / "Images"
    candidates = tuple(folder / "GT-final_test.csv" for folder in (base.parent, base, images))
    table = next((c for c in candidates if c.is_file()), None)
    if not images.is_dir() or table is None:
        raise ImageFolderError(
            f"No GTSRB test set: expected images in {images} and the ground truth "
            f"GT-final_test.csv (from GTSRB_Final_Test_GT.zip) in one of "
            f"{', '.join(str(c.parent) for c in candidates)}."
        )
    with open(table, newline="") as f:
        rows = list(csv.DictReader(f, delimiter=";", skipinitialspace=True))
    paths = tuple(images / row["Filename"] for row in rows)
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise ImageFolderError(
            f"{len(missing)} test images listed in {table} are missing from {images}"
        )
    labels = np.asarray([int(row["ClassId"]) for row in rows], np.int32)
    return ImageFiles(paths, labels, tuple(f"{c:05d}" for c in range(43)))


def resize_shorter_center_crop(image, size: int):
    """Resizes a PIL image's shorter side to ``size`` (bicubic), then centre-crops.

    The same arithmetic as torchvision's ``Resize(size)`` + ``CenterCrop(size)``
    and as `atm_jax.data.preprocess.resize_center_crop`.

    Args:
      image: A ``PIL.Image.Image``.
      size: Output side length.

    Returns:
      A ``size`` x ``size`` PIL image.
    """
    from PIL import Image

    width, height = image.size
    if width <= height:
        new_w, new_h = size, int(size * height / width)
    else:
        new_w, new_h = int(size * width / height), size
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def decode_images(
    blobs: Sequence[PathLike | bytes], *, image_size: int | None = None
) -> np.ndarray:
    """Decodes image files or encoded bytes into one uint8 RGB array.

    Args:
      blobs: File paths or encoded image bytes (PNG, JPEG, PPM, BMP ...).
      image_size: Resize every image with `resize_shorter_center_crop` to this
        size. None keeps the native size when all images share one, and resizes
        to `DEFAULT_IMAGE_SIZE` otherwise.

    Returns:
      uint8 [N, H, W, 3].
    """
    import io

    from PIL import Image

    def open_image(blob):
        return Image.open(io.BytesIO(blob) if isinstance(blob, bytes) else blob)

    if image_size is None and blobs:
        # Only the headers are read here; decoding is lazy in Pillow.
        sizes = set()
        for blob in blobs:
            with open_image(blob) as image:
                sizes.add(image.size)
            if len(sizes) > 1:
                image_size = DEFAULT_IMAGE_SIZE
                break
    out = None
    for i, blob in enumerate(blobs):
        with open_image(blob) as image:
            rgb = image.convert("RGB")
        if image_size is not None:
            rgb = resize_shorter_center_crop(rgb, image_size)
        array = np.asarray(rgb, np.uint8)
        if out is None:
            out = np.empty((len(blobs), *array.shape), np.uint8)
        out[i] = array
    if out is None:
        side = image_size or 0
        return np.zeros((0, side, side, 3), np.uint8)
    return out


def load(
    root: PathLike,
    split: str,
    *,
    class_folders: Sequence[str] | None = None,
    image_size: int | None = None,
) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Reads a whole split of an image folder.

    Args:
      root: Task root (see the module docstring).
      split: Split folder name.
      class_folders: Folder name of each label; None uses the sorted names of the
        train split, so the test split's labels agree with it.
      image_size: See `decode_images`.

    Returns:
      (uint8 images [N, H, W, 3], int32 labels [N], class folder names).
    """
    if class_folders is None:
        class_folders = find_class_folders(root, "train")
    files = list_image_folder(root, split, class_folders=class_folders)
    return decode_images(files.paths, image_size=image_size), files.labels, files.class_folders
