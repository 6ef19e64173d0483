"""Every error a user of atm_jax is meant to read, in one place.

Each class derives from :class:`AtmJaxError` and from the built-in exception it
used to be (so ``except ValueError`` keeps working). Messages name the bad value
and the fix. ``python -m atm_jax.main`` catches :class:`AtmJaxError` and prints the
message without a traceback: exit status 3 for :class:`DivergedError`, 2 for the
rest (bad input: config, data, weights, workdir).

Renamed names stay usable for one release with a DeprecationWarning: the old error
class names (module ``__getattr__``, the same class object, so ``except OldName``
still catches) and renamed keyword arguments (`renamed_keyword`).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

__all__ = ["AtmJaxError", "ConfigError", "SourceUnavailableError", "ChecksumError",
           "TokenizerUnavailableError", "DatasetNotPreparedError", "ImageFolderError",
           "WeightsMismatchError", "UnsafeCheckpointError", "HubUnavailableError",
           "CheckpointFormatError", "DivergedError", "MissingExtraError", "MergeConfigError",
           "renamed_keyword"]


class AtmJaxError(Exception):
    """Base of the errors whose message tells the user what to do."""


class MergeConfigError(AtmJaxError, ValueError):
    """A checkpoint merge (`atm_jax.merge_models`) that cannot run as written; the message
    names the YAML key, the model or the tensor."""


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


class WeightsMismatchError(AtmJaxError, ValueError):
    """Model weights do not fit the model their config describes: a tensor is
    missing, unexpected or of another shape."""


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


# Old name -> new name, for one release. ``CheckpointError`` read as a run checkpoint
# problem (that is CheckpointFormatError); what it reports is weights that do not fit.
_RENAMED = {"CheckpointError": "WeightsMismatchError"}


def __getattr__(name: str):
    if name in _RENAMED:
        new = _RENAMED[name]
        warnings.warn(f"atm_jax.errors.{name} is deprecated and goes in the next release: use "
                      f"atm_jax.errors.{new} (the same class).", DeprecationWarning, stacklevel=2)
        return globals()[new]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def renamed_keyword(old: str, new: str) -> Callable[[Callable], Callable]:
    """Decorator: a call passing the keyword ``old`` runs as if it passed ``new``,
    with a DeprecationWarning, for one release after the argument was renamed.

    Raises:
      TypeError: (from the call) if both ``old`` and ``new`` are given.
    """

    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def call(*args, **kwargs):
            if old in kwargs:
                if new in kwargs:
                    raise TypeError(f"{fn.__qualname__}() got both {new}= and its deprecated "
                                    f"old name {old}=; pass {new}= only.")
                warnings.warn(f"{fn.__qualname__}({old}=...) is deprecated and goes in the next "
                              f"release: the argument is now {new}=.", DeprecationWarning,
                              stacklevel=2)
                kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)

        return call

    return wrap
