"""Checkpoints of a run, so a killed run resumes where it stopped.

A thin layer over orbax-checkpoint's ``CheckpointManager`` in ``<workdir>/checkpoints``.
Every checkpoint is one numbered step holding two items:

* ``state``: a pytree of arrays (the current base, heads, the finetuned models of
  the unfinished iteration, the PRNG key), written with ``StandardSave``;
* ``meta``: a JSON document (where the run stands, the records written so far,
  the config, and a CRC-32 of every array in ``state``).

Orbax writes a step into a temporary folder and renames it when complete, so a
kill during a save leaves the previous step intact. :meth:`Checkpointer.latest`
goes from the newest step to the oldest and skips (with a warning) any step that
cannot be read or whose arrays no longer match their recorded CRCs.
"""

from __future__ import annotations

import pathlib
import shutil
import time
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

__all__ = ["Checkpointer", "Restored", "digest"]

PyTree = Any
FORMAT_VERSION = 1


def digest(state: PyTree) -> dict[str, int]:
    """CRC-32 of every array's bytes, keyed by its leaf path."""
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        array = np.ascontiguousarray(np.asarray(leaf))
        out[jax.tree_util.keystr(path)] = zlib.crc32(array.view(np.uint8).reshape(-1)) \
            if array.size else 0
    return out


class Restored:
    """A checkpoint read back: ``step``, ``state`` (NumPy/JAX arrays) and ``meta``."""

    def __init__(self, step: int, state: dict, meta: dict):
        self.step, self.state, self.meta = step, state, meta


class Checkpointer:
    """Saves and finds the checkpoints of one workdir.

    Args:
      directory: where the numbered steps live (created if missing).
      keep: how many of the newest steps to keep (at least 2, so a damaged newest
        step still leaves one to fall back to).
      log: a line printer for warnings.
    """

    def __init__(self, directory: str | pathlib.Path, *, keep: int = 3,
                 log: Callable[[str], None] = print):
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 2:
            raise ValueError(f"keep={keep!r} must be an integer >= 2: with one checkpoint "
                             "a damaged save would leave nothing to resume from.")
        self.directory = pathlib.Path(directory)
        self.log = log
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=False)
        self._manager = ocp.CheckpointManager(self.directory.absolute(), options=options)

    def steps(self) -> list[int]:
        """The complete steps on disk, oldest first."""
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Mapping[str, PyTree], meta: Mapping[str, Any]) -> None:
        """Writes step ``step`` (blocking; atomic); drops steps beyond ``keep``."""
        meta = dict(meta, step=step, format=FORMAT_VERSION, digest=digest(state))
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(dict(state)), meta=ocp.args.JsonSave(meta)), force=True)
        self._manager.wait_until_finished()

    def latest(self) -> Restored | None:
        """The newest readable, intact step; None when there is none.

        Damaged steps are skipped with a warning naming the step and the reason.
        """
        damaged = []
        for step in reversed(self.steps()):
            try:
                restored = self._manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
                state, meta = dict(restored["state"]), dict(restored["meta"])
                if meta.get("format") != FORMAT_VERSION:
                    raise ValueError(f"format {meta.get('format')!r}, expected {FORMAT_VERSION}")
                if digest(state) != meta.get("digest"):
                    raise ValueError("array contents differ from the CRC-32s recorded at save time")
            except Exception as e:  # noqa: BLE001 - any failure means "unusable step"
                self.log(f"WARNING: checkpoint step {step} in {self.directory} is damaged or "
                         f"incomplete ({type(e).__name__}: {str(e)[:200]}); trying an older one.")
                damaged.append(step)
                continue
            self._set_aside(damaged)
            return Restored(step, state, meta)
        return None

    def _set_aside(self, steps: list[int]) -> None:
        """Moves damaged steps out of the way (to ``<directory>.damaged/``), so the
        resumed run can write those step numbers again; nothing is deleted."""
        if not steps:
            return
        aside = self.directory.with_name(self.directory.name + ".damaged")
        aside.mkdir(exist_ok=True)
        for step in steps:
            target = aside / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
            shutil.move(str(self.directory / str(step)), str(target))
            self.log(f"moved damaged checkpoint step {step} to {target}")
        self._manager.reload()

    def close(self) -> None:
        self._manager.close()
