"""The one file layer: paths that may be remote, atomic writes, the cache, checksums.

Every module that writes a file goes through here, so the rules hold everywhere:

* Paths are ``etils.epath.Path``: a local folder or a bucket (``gs://…``) alike.
* Writes are atomic: a local file is written to a temporary sibling, fsynced and
  renamed over the target, so a reader (or a resumed run) never sees half a file;
  an object store writes whole objects, so a remote file is uploaded in one piece.
* Only the writing process writes (process 0 of a multi-host run): the other
  processes' writes are no-ops unless a caller says ``all_processes=True`` (a
  process-local cache on its own disk).
* The cache root (``$ATM_JAX_CACHE`` or ``~/.cache/atm_jax``) and the offline flag
  (``$ATM_JAX_OFFLINE``) are read here and nowhere else. The cache is a local
  ``pathlib.Path`` (every host keeps its own: registry clients and memory-mapped
  reads need a real filesystem); workdirs may be remote.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import tempfile
from collections.abc import Callable
from typing import Any, BinaryIO

import numpy as np
from etils import epath

from atm_jax.errors import ChecksumError

__all__ = ["CACHE_ENV", "OFFLINE_ENV", "PathLike", "as_path", "is_local", "is_writer",
           "cache_dir", "offline", "atomic_write", "atomic_write_file", "write_bytes",
           "write_text", "write_json", "jsonable", "sha256_file", "verify_sha256"]

CACHE_ENV = "ATM_JAX_CACHE"
OFFLINE_ENV = "ATM_JAX_OFFLINE"
PathLike = str | os.PathLike


def as_path(path: PathLike) -> epath.Path:
    """``path`` as an ``epath.Path`` (``~`` expanded for local paths)."""
    if isinstance(path, str) and path.startswith("~"):
        path = os.path.expanduser(path)
    return epath.Path(path)


def is_local(path: PathLike) -> bool:
    """True for a path on this machine's filesystem, False for ``scheme://…``."""
    return "://" not in os.fspath(path)


def is_writer() -> bool:
    """True on the process that writes shared files (process 0)."""
    import jax  # here, so the file layer imports without initialising JAX

    return jax.process_index() == 0


def cache_dir() -> pathlib.Path:
    """The local cache root: ``$ATM_JAX_CACHE`` if set, else ``~/.cache/atm_jax``."""
    env = os.environ.get(CACHE_ENV)
    return pathlib.Path(env).expanduser() if env else pathlib.Path.home() / ".cache" / "atm_jax"


def offline() -> bool:
    """Whether ``$ATM_JAX_OFFLINE`` forbids fetching (``1``, ``true`` or ``yes``)."""
    return os.environ.get(OFFLINE_ENV, "").strip().lower() in ("1", "true", "yes")


def atomic_write_file(path: PathLike, write: Callable[[str], None], *,
                      all_processes: bool = False) -> None:
    """Calls ``write(local_filename)`` and moves the result to ``path`` atomically.

    For writers that need a real filename (safetensors, np.savez): the file is
    made in a temporary local spot (beside ``path`` when local, so the rename is
    atomic) and then renamed, or uploaded in one piece to a remote ``path``.
    """
    if not (all_processes or is_writer()):
        return
    target = as_path(path)
    if is_local(target):
        folder = pathlib.Path(os.fspath(target)).parent
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{target.name}.", suffix=".tmp")
        os.close(fd)
        try:
            write(tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, os.fspath(target))
        except BaseException:
            pathlib.Path(tmp).unlink(missing_ok=True)
            raise
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="atm_jax-upload-") as folder:
        tmp = os.path.join(folder, target.name)
        write(tmp)
        epath.Path(tmp).copy(target, overwrite=True)


def atomic_write(path: PathLike, write: Callable[[BinaryIO], None], *,
                 all_processes: bool = False) -> None:
    """Calls ``write(binary_file)`` and puts the result at ``path`` atomically."""
    def to_file(filename: str) -> None:
        with open(filename, "wb") as f:
            write(f)
    atomic_write_file(path, to_file, all_processes=all_processes)


def write_bytes(path: PathLike, data: bytes, *, all_processes: bool = False) -> None:
    """Atomically writes ``data`` to ``path`` (process 0 only unless ``all_processes``)."""
    atomic_write(path, lambda f: f.write(data), all_processes=all_processes)


def write_text(path: PathLike, text: str, *, all_processes: bool = False) -> None:
    """Atomically writes ``text`` (UTF-8) to ``path``."""
    write_bytes(path, text.encode(), all_processes=all_processes)


def jsonable(x: Any) -> Any:
    """``json.dumps`` default for NumPy scalars/arrays and tuples."""
    if isinstance(x, (np.floating, np.integer, np.bool_)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, tuple):
        return list(x)
    raise TypeError(f"Cannot write {type(x).__name__} to JSON.")


def write_json(path: PathLike, obj: Any, *, all_processes: bool = False) -> None:
    """Atomically writes ``obj`` as indented JSON."""
    write_text(path, json.dumps(obj, indent=2, default=jsonable) + "\n",
               all_processes=all_processes)


def sha256_file(path: PathLike) -> str:
    """The hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with as_path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_sha256(path: PathLike, expected: str, *, fix: str) -> None:
    """Raises ChecksumError (naming the file, both digests and ``fix``) unless the
    file's SHA-256 is ``expected``."""
    actual = sha256_file(path)
    if actual != expected:
        raise ChecksumError(f"SHA-256 mismatch for {path}: expected {expected}, got {actual}. "
                            f"The file is corrupt or not the expected version. {fix}")
