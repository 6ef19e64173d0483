"""Optional dependencies: a missing extra becomes an ImportError that says what to install.

``pip install atm_jax`` brings only the core (jax, flax, optax, numpy): enough for
``atm_jax.tree``, ``merge``, ``select``, ``atm`` and ``finetune`` on your own model.
The experiment runner, the data layer and the Hugging Face models need the
``experiments`` extra. Modules that import such a package wrap the import::

  from atm_jax import extras

  with extras.needed("atm_jax.checkpoint"):
      import orbax.checkpoint as ocp

or convert an error they caught with :func:`missing_extra`. Errors for packages that
are not part of an extra (a typo, a broken install) pass through unchanged.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from types import ModuleType

from atm_jax.errors import MissingExtraError

__all__ = ["EXPERIMENTS", "INSTALL", "MissingExtraError", "missing_extra", "needed", "require"]

INSTALL = 'pip install "atm_jax[experiments]"'

# Top-level import names of the `experiments` extra (pyproject.toml) and the packages
# they bring along, mapped to the distribution name users would recognise.
EXPERIMENTS = {
    "orbax": "orbax-checkpoint",
    "tensorflow_datasets": "tensorflow-datasets",
    "importlib_resources": "importlib_resources",
    "etils": "etils",
    "transformers": "transformers",
    "safetensors": "safetensors",
    "tokenizers": "tokenizers",
    "huggingface_hub": "huggingface_hub",
    "ml_collections": "ml_collections",
    "absl": "absl-py",
    "matplotlib": "matplotlib",
    "PIL": "pillow",
    "tqdm": "tqdm",
    "tensorboardX": "tensorboardX",
}


def missing_extra(error: ModuleNotFoundError, *, feature: str) -> ImportError:
    """The ImportError to raise for ``error``: names the extra when the missing module is
    part of it, otherwise ``error`` itself (so unrelated import bugs are not disguised).

    Args:
      error: the ModuleNotFoundError that was caught.
      feature: what needed it, e.g. ``"atm_jax.checkpoint"``; named in the message.
    """
    top = (error.name or "").split(".")[0]
    if top not in EXPERIMENTS:
        return error
    out = MissingExtraError(
        f"{feature} needs {EXPERIMENTS[top]!r} (module {error.name!r}), which is part of the "
        f"'experiments' extra and is not installed. Install it with: {INSTALL} "
        '(from a checkout: pip install -e ".[experiments]"). The core (atm_jax.tree, merge, '
        "select, atm, finetune) works without it.")
    out.name = error.name
    return out


@contextlib.contextmanager
def needed(feature: str) -> Iterator[None]:
    """Context manager: a ModuleNotFoundError for an extra's package inside it becomes
    a :class:`MissingExtraError` naming ``pip install "atm_jax[experiments]"``."""
    try:
        yield
    except ModuleNotFoundError as e:
        converted = missing_extra(e, feature=feature)
        if converted is e:
            raise
        raise converted from e


def require(module: str, *, feature: str) -> ModuleType:
    """``importlib.import_module(module)``, with the extra named if it is missing."""
    with needed(feature):
        return importlib.import_module(module)
