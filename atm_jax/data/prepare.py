"""Fetches or writes datasets into place and prints what it holds.

Usage::

  python -m atm_jax.data.prepare mini                    # into ~/.cache/atm_jax
  python -m atm_jax.data.prepare mini --cache_dir DIR    # elsewhere
  python -m atm_jax.data.prepare mini --force            # fetch raw files again
  python -m atm_jax.data.prepare mini_text               # the text suite + MiniLM

  # The paper's tasks as tfds array_record datasets (needs TensorFlow and network:
  # pip install -e ".[prepare]"); names are paper task names or tfds names.
  python -m atm_jax.data.prepare tfds cifar100 dtd eurosat mnist svhn --data_dir DIR
  python -m atm_jax.data.prepare tfds resisc45 --data_dir DIR --manual_dir MANUAL
  python -m atm_jax.data.prepare tfds glue --data_dir DIR   # the 7 GLUE tasks
  python -m atm_jax.data.prepare tfds vision --data_dir DIR # the 6 tfds vision tasks

  # The tiny local image-folder and TSV tasks of atm_jax.data.local (offline).
  python -m atm_jax.data.prepare local --root DIR

These are the commands that download (pip / apt-get / tfds), so they ignore
``$ATM_JAX_OFFLINE``. Running one again is cheap: present files are only
checksummed and decoded arrays or prepared datasets are reused.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time
from collections.abc import Sequence

import numpy as np

from atm_jax.data import fetch, local, mini, mini_text, paper, sources, tfds_source

SUITES = {"mini": mini.MINI_TASKS}


def _size(path: pathlib.Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def prepare(suite: str = "mini", *, cache_dir: str | None = None, force: bool = False) -> str:
    """Fetches and decodes every source of ``suite``; returns a summary.

    Args:
      suite: Suite name, a key of `SUITES`.
      cache_dir: Cache root; defaults to `atm_jax.data.cache_dir()`.
      force: Download raw files again even if present.

    Returns:
      Multi-line text: per source its raw files with SHA-256s and cache paths,
      per task its split sizes and class counts, and the cache size.
    """
    root = fetch.cache_root(cache_dir or None)  # An empty flag means the default.
    start = time.perf_counter()
    lines = [f"cache: {root}"]
    for task in SUITES[suite]:
        source_name = mini.TASK_SPECS[task].source
        sources.fetch_raw(source_name, cache=root, force=force)
        arrays = sources.load_source(source_name, cache=root, fetch=True)
        info = sources.describe(source_name, root)
        lines.append(f"{task}: {info['origin']}")
        for path, digest in info["raw"]:
            lines.append(f"  {path}  {_size(pathlib.Path(path)) / 1e6:.1f} MB  sha256 {digest}")
        lines.append(f"  {info['decoded']}  {_size(pathlib.Path(info['decoded'])) / 1e6:.1f} MB")
        pools = mini.task_pools(task, arrays)
        for split in mini.SPLITS:
            labels = pools[split][1]
            counts = np.bincount(labels, minlength=len(mini.TASK_SPECS[task].class_names))
            lines.append(
                f"  {split:<10} {len(labels):>6} images, per class {counts.min()}..{counts.max()}"
            )
    lines.append(
        f"total cache size {_size(root) / 1e6:.1f} MB; took {time.perf_counter() - start:.1f} s"
    )
    return "\n".join(lines)


def prepare_text(*, cache_dir: str | None = None, force: bool = False) -> str:
    """Fetches the mini_text suite's sources and MiniLM; returns a summary.

    The summary gives per source its raw files with SHA-256s and the fetch time,
    per task its deduplicated split sizes and class counts.
    """
    from atm_jax.models import pretrained  # Only this command needs the weights.

    root = fetch.cache_root(cache_dir or None)  # An empty flag means the default.
    start = time.perf_counter()
    lines = [f"cache: {root}"]
    for name, source in mini_text.SOURCES.items():
        seconds = mini_text.fetch_source(name, cache=root, force=force)
        lines.append(f"{name}: {source.origin} (fetched in {seconds:.1f} s)")
        for f in source.files:
            path = fetch.raw_dir(name, root) / f.name
            lines.append(f"  {path}  {_size(path) / 1e6:.2f} MB  sha256 {f.sha256}")
    for task in mini_text.MINI_TEXT_TASKS:
        data = mini_text.load_text_task(task, cache_dir=root, fetch_missing=False)
        lines.append(f"{task}: classes {', '.join(data.class_names)}")
        for split in mini.SPLITS:
            counts = np.bincount(data.split(split)[1], minlength=data.num_classes)
            lines.append(f"  {split:<10} {counts.sum():>6} sentences, per class "
                         f"{' / '.join(str(c) for c in counts)}")
    lines.append(f"tokenizer + weights: {pretrained.minilm_folder(root)}")
    lines.append(f"took {time.perf_counter() - start:.1f} s")
    return "\n".join(lines)


def tfds_names(names: Sequence[str]) -> list[str]:
    """Maps paper task names (and the groups "vision", "glue") to tfds names.

    Other names pass through unchanged, so any tfds name can be prepared.
    """
    groups = {"vision": paper.VISION_TASKS, "glue": paper.GLUE_TASKS}
    out: list[str] = []
    for name in names:
        for task in groups.get(name, (name,)):
            spec = paper.PAPER_TASKS.get(task)
            if spec is not None and spec.tfds_name is None:
                if name in groups:
                    continue  # GTSRB has no tfds builder; the group skips it.
                raise tfds_source.DatasetNotPreparedError(tfds_source.NO_BUILDER[task])
            tfds_name = spec.tfds_name if spec is not None else task
            if tfds_name not in out:
                out.append(tfds_name)
    return out


def prepare_tfds(
    names: Sequence[str], *, data_dir: str | None = None, manual_dir: str | None = None
) -> str:
    """Prepares tfds datasets as array_record; returns a summary.

    Args:
      names: Paper task names, "vision", "glue", or tfds names.
      data_dir: tfds data dir; defaults to `tfds_source.default_data_dir`.
      manual_dir: Folder of manual downloads (RESISC45); defaults to
        ``data_dir/downloads/manual``.

    Raises:
      tfds_source.DatasetNotPreparedError: If TensorFlow is missing, a dataset has
        no tfds builder, or a manual download is missing.
    """
    start = time.perf_counter()
    folders = tfds_source.prepare(tfds_names(names), data_dir, manual=manual_dir)
    lines = [f"data_dir: {tfds_source.resolve_data_dir(data_dir)}"]
    lines += [f"  {folder}  {_size(folder) / 1e6:.1f} MB" for folder in folders]
    lines.append(f"took {time.perf_counter() - start:.1f} s")
    return "\n".join(lines)


def prepare_local(root: str) -> str:
    """Writes the tiny local tasks of `atm_jax.data.local` under ``root``."""
    start = time.perf_counter()
    local.make_image_folder(pathlib.Path(root) / "images")
    local.make_text_tasks(pathlib.Path(root) / "text")
    lines = [f"{root}/images: {', '.join(local.IMAGE_TASKS)}"]
    lines.append(f"{root}/text: {', '.join(local.TEXT_TASKS)} + tokenizer")
    lines.append(f"took {time.perf_counter() - start:.1f} s")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    mini_parser = commands.add_parser("mini", help="fetch the mini suite's sources")
    mini_parser.add_argument(
        "--cache_dir", default=None, help="cache root (default: $ATM_JAX_CACHE or ~/.cache/atm_jax)"
    )
    mini_parser.add_argument("--force", action="store_true", help="download raw files again")
    text_parser = commands.add_parser(
        "mini_text", help="fetch the mini_text suite's sources and the MiniLM weights"
    )
    text_parser.add_argument(
        "--cache_dir", default=None, help="cache root (default: $ATM_JAX_CACHE or ~/.cache/atm_jax)"
    )
    text_parser.add_argument("--force", action="store_true", help="download raw files again")
    tfds_parser = commands.add_parser(
        "tfds", help="prepare tfds datasets as array_record (needs TensorFlow)"
    )
    tfds_parser.add_argument(
        "names", nargs="+", help="paper task names, 'vision', 'glue', or tfds names"
    )
    tfds_parser.add_argument(
        "--data_dir", default=None, help="tfds data dir (default: $TFDS_DATA_DIR or CACHE/tfds)"
    )
    tfds_parser.add_argument(
        "--manual_dir", default=None, help="manual downloads (default: DATA_DIR/downloads/manual)"
    )
    local_parser = commands.add_parser("local", help="write the tiny local tasks")
    local_parser.add_argument("--root", required=True, help="folder to write them under")
    args = parser.parse_args(argv)
    try:
        if args.command == "mini":
            print(prepare("mini", cache_dir=args.cache_dir, force=args.force))
        elif args.command == "mini_text":
            print(prepare_text(cache_dir=args.cache_dir, force=args.force))
        elif args.command == "tfds":
            print(prepare_tfds(args.names, data_dir=args.data_dir, manual_dir=args.manual_dir))
        else:
            print(prepare_local(args.root))
    except (sources.SourceUnavailableError, sources.ChecksumError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
