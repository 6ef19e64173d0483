"""The suites: what a run trains (tasks, backbone, forward pass, heads).

One module per suite, each with the same three functions:

* ``validate(config)``: the suite's own config fields (after
  `atm_jax.schema.validate_common`); raises ConfigError, loads nothing.
* ``backbone_shapes(config)``: the backbone's params as ShapeDtypeStructs, or
  None when only the weights can tell (a hub id).
* ``build(config, log) -> Setup``: loads data and weights; trains nothing.

Suites are imported on first use, so a run pulls in only its own dependencies.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from atm_jax.suites.base import Setup

__all__ = ["Setup", "SUITES", "get"]

SUITES = {
    "mini": "atm_jax.suites.mini",    # configs/mini.py: real 28×28 tasks, glyph-pretrained ViT
    "paper": "atm_jax.suites.paper",  # configs/vit.py, roberta.py, bert.py: the paper's setups
    "mini_text": "atm_jax.suites.mini_text",  # configs/mini_text.py: MiniLM on real text
}


def get(name: str) -> ModuleType:
    """The suite module of ``config.suite``."""
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}; known: {sorted(SUITES)}")
    return importlib.import_module(SUITES[name])
