"""Every error a user of atm_jax is meant to read, in one place.

Each class derives from :class:`AtmJaxError` and from the built-in exception it
used to be (so ``except ValueError`` keeps working). Messages name the bad value
and the fix. ``python -m atm_jax.main`` catches :class:`AtmJaxError` and prints the
message without a traceback: exit status 3 for :class:`DivergedError`, 2 for the
rest (bad input: config, data, weights, workdir).
"""

from __future__ import annotations

__all__ = ["AtmJaxError", "ConfigError", "SourceUnavailableError", "ChecksumError",
           "TokenizerUnavailableError", "DatasetNotPreparedError", "ImageFolderError",
           "CheckpointError", "UnsafeCheckpointError", "HubUnavailableError",
           "CheckpointFormatError", "DivergedError", "MissingExtraError"]


class AtmJaxError(Exception):
    """Base of the errors whose message tells the user what to do."""


class ConfigError(AtmJaxError, ValueError):
    """A config field has a bad value, or the workdir cannot take this run; the
    message names the field (or folder) and the fix."""


class SourceUnavailableError(AtmJaxError, RuntimeError):
    """A dataset or file is neither cached nor fetchable (offline, or the fetch failed)."""


class ChecksumError(AtmJaxError, RuntimeError):
    """A fetched or cached file's SHA-256 differs from the recorded one."""


class TokenizerUnavailableError(SourceUnavailableError):
    """A tokenizer is neither a local file or folder nor reachable on the hub."""


class DatasetNotPreparedError(SourceUnavailableError):
    """A tfds dataset is not prepared (in array_record format) under the data dir."""


class ImageFolderError(AtmJaxError, FileNotFoundError):
    """An image folder is missing, empty or inconsistent."""


class CheckpointError(AtmJaxError, ValueError):
    """Model weights do not match the model their config describes."""


class UnsafeCheckpointError(AtmJaxError, ValueError):
    """Only pickled weights exist and ``allow_pickle`` was not given."""


class HubUnavailableError(AtmJaxError, OSError):
    """A hub id was given and the hub (or its local cache) could not supply it."""


class CheckpointFormatError(AtmJaxError, RuntimeError):
    """A run checkpoint written in another format version: not damaged, just not ours."""


class DivergedError(AtmJaxError, FloatingPointError):
    """A finetune's loss became NaN or Inf; the message names where."""


class MissingExtraError(AtmJaxError, ImportError):
    """A module needs an optional dependency group that is not installed."""
