"""Fetches the mini suite's sources into the cache and prints what it holds.

Usage::

  python -m atm_jax.data.prepare mini                    # into ~/.cache/atm_jax
  python -m atm_jax.data.prepare mini --cache_dir DIR    # elsewhere
  python -m atm_jax.data.prepare mini --force            # fetch raw files again

This is the one command that downloads (pip / apt-get), so it ignores
``$ATM_JAX_OFFLINE``. Running it again is cheap: present files are only
checksummed and decoded arrays are reused.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time
from collections.abc import Sequence

import numpy as np

from atm_jax.data import mini, sources

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
    root = pathlib.Path(cache_dir).expanduser() if cache_dir else sources.cache_dir()
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("suite", choices=sorted(SUITES), help="which suite to fetch")
    parser.add_argument(
        "--cache_dir", default=None, help="cache root (default: $ATM_JAX_CACHE or ~/.cache/atm_jax)"
    )
    parser.add_argument("--force", action="store_true", help="download raw files again")
    args = parser.parse_args(argv)
    try:
        print(prepare(args.suite, cache_dir=args.cache_dir, force=args.force))
    except (sources.SourceUnavailableError, sources.ChecksumError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
