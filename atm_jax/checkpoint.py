"""Checkpoints of a run, so a killed run resumes where it stopped.

A thin layer over orbax-checkpoint's ``CheckpointManager`` in ``<workdir>/checkpoints``.
Every checkpoint is one numbered step holding two items:

* ``state``: a pytree of arrays (the current base, heads, the finetuned models of
  the unfinished iteration, the PRNG key), written with ``StandardSave``;
* ``meta``: a JSON document (where the run stands, the records written so far,
  the config, and a CRC-32 of every array in ``state``).

Big pytrees that stay the same over several steps (a task's finetuned model inside
an ATM iteration) are written once as *items* (``<directory>/items/<name>``, see
:meth:`Checkpointer.save_item`) and a step only names them with their CRCs; an item
is deleted once no kept step names it. So the k-th checkpoint of an iteration
writes one model, not k.

Orbax writes a step (and an item) into a temporary folder and renames it when
complete, so a kill during a save leaves the previous step intact (on an object store
such as ``gs://``, where nothing renames, it writes in place and a step counts once
its ``commit_success.txt`` is written). On one process
the writes run on a background thread, in the order they were asked for (an item
before the step that names it), from host copies taken at the call: training goes
on while a checkpoint is written. A step waits for the previous step to be on disk
(so at most one step's models are held twice), :meth:`Checkpointer.wait` blocks
until everything asked for is on disk, and a failed write is raised there or at the
next save. (Orbax's own async saves commit each checkpointer independently, which
would let a step land before an item it names.) :meth:`Checkpointer.latest`
goes from the newest step to the oldest and skips (with a warning) any step that
cannot be read or whose arrays no longer match their recorded CRCs.
"""

from __future__ import annotations

import concurrent.futures
import sys
import time
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from atm_jax import extras

with extras.needed("atm_jax.checkpoint"):
    import orbax.checkpoint as ocp

from atm_jax import atm, files
from atm_jax import tree as tree_lib
from atm_jax.errors import CheckpointFormatError

__all__ = ["Checkpointer", "Restored", "digest", "savable", "plain", "like", "host_copy",
           "item_name", "state_to_checkpoint", "state_from_checkpoint"]

PyTree = Any
FORMAT_VERSION = 2  # 2: finetuned models as items


def digest(state: PyTree) -> dict[str, int]:
    """CRC-32 of every array's bytes, keyed by its leaf path."""
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        array = np.ascontiguousarray(np.asarray(leaf))
        out[jax.tree_util.keystr(path)] = zlib.crc32(array.view(np.uint8).reshape(-1)) \
            if array.size else 0
    return out


def savable(tree: PyTree) -> PyTree:
    """``tree`` as orbax can save it from every process of a multi-host run: arrays
    held whole by this process (replicated per process, or on one local device)
    become NumPy arrays, which orbax writes from the primary process; arrays
    spanning processes (global meshes) stay as they are. One process: unchanged."""
    if jax.process_count() == 1:
        return tree

    def host(x):
        if isinstance(x, jax.Array) and x.is_fully_addressable:
            return np.asarray(x)
        return x
    return jax.tree.map(host, tree)


def plain(tree: PyTree) -> PyTree:
    """``tree`` with every Flax NNX ``Variable`` replaced by its value.

    Orbax then writes the nested mapping it reads back, so the CRCs recorded at a
    save are keyed as the restored arrays are; :func:`like` rebuilds the NNX
    structure from a template on the way back.
    """
    nnx = sys.modules.get("flax.nnx")  # not imported: no Variables to replace
    if nnx is None:
        return tree

    def is_variable(x) -> bool:
        return isinstance(x, nnx.Variable)
    return jax.tree.map(lambda x: x.get_value() if is_variable(x) else x, tree,
                        is_leaf=is_variable)


def like(template: PyTree, restored: PyTree) -> PyTree:
    """``restored``'s arrays in ``template``'s structure, matched by leaf path (an
    ``nnx.State`` base comes back from orbax as nested dicts); unchanged when the
    structures already agree.

    Raises:
      ValueError: a leaf of ``template`` is missing from ``restored`` (names it).
    """
    if jax.tree.structure(restored) == jax.tree.structure(template):
        return restored
    by_path = dict(zip(tree_lib.leaf_paths(restored), jax.tree.leaves(restored)))
    paths = tree_lib.leaf_paths(template)
    missing = [p for p in paths if p not in by_path]
    if missing or len(by_path) != len(paths):
        raise ValueError(f"the checkpointed tree does not match the model: leaf "
                         f"{(missing or sorted(set(by_path) - set(paths)))[0]!r} is on one "
                         "side only")
    return jax.tree.unflatten(jax.tree.structure(template), [by_path[p] for p in paths])


def host_copy(tree: PyTree) -> PyTree:
    """``tree`` with every array copied to a new NumPy array: what a background write
    reads, unaffected by later updates or donation of the originals."""
    return jax.tree.map(lambda x: np.array(x, copy=True) if isinstance(x, (jax.Array, np.ndarray))
                        else x, tree)


class Restored:
    """A checkpoint read back: ``step``, ``state`` (NumPy/JAX arrays), ``meta`` and
    the ``items`` it names (``{name: pytree}``)."""

    def __init__(self, step: int, state: dict, meta: dict, items: dict):
        self.step, self.state, self.meta, self.items = step, state, meta, items


class Checkpointer:
    """Saves and finds the checkpoints of one workdir.

    Args:
      directory: where the numbered steps live (created if missing): a local folder
        or a bucket path (``gs://…``: orbax's arrays through tensorstore, the rest
        through epath).
      keep: how many of the newest steps to keep (at least 2, so a damaged newest
        step still leaves one to fall back to).
      log: a line printer for warnings.
      background: write on a background thread (see the module docstring); None =
        when this is the only process (a multi-host save is collective, so it stays
        in step with the other processes on the calling thread).
    """

    def __init__(self, directory: files.PathLike, *, keep: int = 3,
                 log: Callable[[str], None] = print, background: bool | None = None):
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 2:
            raise ValueError(f"keep={keep!r} must be an integer >= 2: with one checkpoint "
                             "a damaged save would leave nothing to resume from.")
        self.directory = files.as_path(directory)  # a local folder or gs://…
        self.log = log
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=False)
        self._manager = ocp.CheckpointManager(_absolute(self.directory), options=options)
        self._items = ocp.Checkpointer(ocp.StandardCheckpointHandler())
        self._item_refs: dict[int, dict[str, dict]] = {}  # step -> the items it names
        if background is None:
            background = jax.process_count() == 1
        self._writer = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="atm_jax-checkpoint") if background else None
        self._queued: list[concurrent.futures.Future] = []  # FIFO: done in this order
        self._last_step: concurrent.futures.Future | None = None
        self._failed: BaseException | None = None  # no write runs after a failed one
        self._reported = False  # whether that failure reached the caller

    @property
    def items_directory(self):
        return self.directory / "items"

    def _run(self, write: Callable[[], None]) -> concurrent.futures.Future | None:
        if self._writer is None:
            write()
            return None

        def in_order():
            if self._failed is not None:  # a step must not land without its items
                return
            try:
                write()
            except BaseException as e:  # noqa: BLE001 - handed to the caller by _check
                self._failed = e
        self._queued = [f for f in self._queued if not f.done()]  # release host copies
        self._queued.append(self._writer.submit(in_order))
        return self._queued[-1]

    def _check(self, *, again: bool) -> None:
        """Raises a failed background write once; ``again``: later calls too."""
        if self._failed is None:
            return
        if not self._reported:
            self._reported = True
            raise self._failed
        if again:
            raise RuntimeError(f"checkpoint write skipped: an earlier one failed "
                               f"({type(self._failed).__name__}: {self._failed})")

    def wait(self) -> None:
        """Blocks until every write asked for so far is on disk (or skipped after a
        failed one); raises that failure if it was not raised yet."""
        queued, self._queued, self._last_step = self._queued, [], None
        for future in queued:
            future.result()
        self._check(again=False)

    def save_item(self, name: str, tree: PyTree) -> dict[str, int]:
        """Writes ``tree`` as item ``name`` (atomic; replaces an older one of that
        name) and returns its CRCs, to pass to :meth:`save` in ``items``."""
        self._check(again=True)
        tree = host_copy(plain(tree)) if self._writer else savable(plain(tree))
        self._run(lambda: self._write_item(name, tree))
        return digest(tree)

    def _write_item(self, name: str, tree: PyTree) -> None:
        self._items.save(_absolute(self.items_directory / name),
                         args=ocp.args.StandardSave(tree), force=True)

    def steps(self) -> list[int]:
        """The complete steps on disk, oldest first (after the pending writes)."""
        self.wait()
        return self._steps()

    def _steps(self) -> list[int]:
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Mapping[str, PyTree], meta: Mapping[str, Any],
             items: Mapping[str, dict[str, int]] | None = None) -> None:
        """Writes step ``step`` (atomic) naming ``items`` ({name: CRCs from
        :meth:`save_item`}); drops steps beyond ``keep`` and items no kept step names.
        In the background: returns once the previous step is on disk."""
        if self._last_step is not None:
            self._last_step.result()
        self._check(again=True)  # a failed earlier write stops the run here
        items = dict(items or {})
        state = plain(dict(state))
        state = host_copy(state) if self._writer else savable(state)
        meta = dict(meta, step=step, format=FORMAT_VERSION, digest=digest(state), items=items)
        self._last_step = self._run(lambda: self._write_step(step, state, meta, items))

    def _write_step(self, step: int, state: dict, meta: dict, items: dict) -> None:
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
        self._manager.wait_until_finished()
        self._item_refs[step] = items
        self._collect_items()

    def _refs(self, step: int) -> dict[str, dict]:
        if step not in self._item_refs:
            try:
                meta = self._manager.restore(step, args=ocp.args.Composite(
                    meta=ocp.args.JsonRestore()))["meta"]
                self._item_refs[step] = dict(meta.get("items", {}))
            except Exception:  # noqa: BLE001 - an unreadable step keeps nothing alive
                self._item_refs[step] = {}
        return self._item_refs[step]

    def _collect_items(self) -> None:
        """Deletes items (and half-written item folders) that no kept step names
        (process 0 deletes; every process reads the steps, since orbax's reads of a
        multi-host checkpoint are collective)."""
        if not self.items_directory.is_dir():
            return
        kept = set()
        for step in self._steps():
            kept |= set(self._refs(step))
        if jax.process_index() != 0:
            return
        for path in self.items_directory.iterdir():
            if path.name not in kept:
                try:  # epath: a local rmtree, or every object under the prefix
                    path.rmtree()
                except OSError:  # best effort: a leftover item is retried next time
                    pass

    def latest(self) -> Restored | None:
        """The newest readable, intact step; None when there is none.

        Damaged steps are skipped with a warning naming the step and the reason.
        """
        damaged = []
        for step in reversed(self.steps()):  # after the pending writes
            try:
                restored = self._manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
                state, meta = dict(restored["state"]), dict(restored["meta"])
                if meta.get("format") != FORMAT_VERSION:
                    raise CheckpointFormatError(
                        f"checkpoint step {step} in {self.directory} has format "
                        f"{meta.get('format')!r} but this atm_jax reads format {FORMAT_VERSION}: "
                        "finish that run with the atm_jax version that started it, or start "
                        "this one in a new --workdir.")
                if digest(state) != meta.get("digest"):
                    raise ValueError("array contents differ from the CRC-32s recorded at save time")
                items = {}
                for name, crcs in meta.get("items", {}).items():
                    items[name] = self._items.restore(_absolute(self.items_directory / name),
                                                      args=ocp.args.StandardRestore())
                    if digest(items[name]) != crcs:
                        raise ValueError(f"item {name!r} differs from the CRC-32s recorded at "
                                         "save time")
            except CheckpointFormatError:
                raise
            except Exception as e:  # noqa: BLE001 - any failure means "unusable step"
                self.log(f"WARNING: checkpoint step {step} in {self.directory} is damaged or "
                         f"incomplete ({type(e).__name__}: {str(e)[:200]}); trying an older one.")
                damaged.append(step)
                continue
            self._set_aside(damaged)
            return Restored(step, state, meta, items)
        self._set_aside([])  # nothing to move; multi-host: the barrier every process passes
        return None

    def _set_aside(self, steps: list[int]) -> None:
        """Moves damaged steps out of the way (to ``<directory>.damaged/``), so the
        resumed run can write those step numbers again; nothing is deleted."""
        if jax.process_count() > 1:  # every process reads the same steps: one moves them
            from jax.experimental import multihost_utils

            if jax.process_index() == 0:
                self._move_aside(steps)
            multihost_utils.sync_global_devices("atm_jax: damaged checkpoints set aside")
            self._manager.reload()
            return
        self._move_aside(steps)

    def _move_aside(self, steps: list[int]) -> None:
        if not steps:
            return
        aside = self.directory.with_name(self.directory.name + ".damaged")
        aside.mkdir(exist_ok=True)
        if not files.is_local(aside):  # a folder on an object store is its objects: one
            files.write_text(aside / "README.txt", "Checkpoint steps found damaged or "
                             "incomplete, set aside by atm_jax; nothing reads them.\n")
        for step in steps:
            target = aside / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
            (self.directory / str(step)).rename(target)  # an object store: copy + delete
            self.log(f"moved damaged checkpoint step {step} to {target}")
        self._manager.reload()

    def close(self) -> None:
        """Waits for the pending writes (raising a failed one), then releases orbax."""
        try:
            self.wait()
        finally:
            if self._writer is not None:
                self._writer.shutdown(wait=True)
            self._manager.close()


def _absolute(path):
    """``path`` for orbax: a local one made absolute; a remote one as it is (an
    absolute() of ``gs://b/x`` would put it under the current folder)."""
    return path.absolute() if files.is_local(path) else path


# -- an atm.State as checkpoint content ---------------------------------------------------

def item_name(unit: str, iteration: int, task_index: int) -> str:
    """The item holding task ``task_index``'s finetune of ``iteration`` in ``unit``."""
    return f"{unit}.iteration{iteration}.task{task_index}"


def state_to_checkpoint(unit: str, state: atm.State, *, with_base: bool
                        ) -> tuple[dict, dict, dict[str, PyTree]]:
    """Splits an `atm.State` into what a step stores.

    Returns:
      ``(position, arrays, finetuned)``: the JSON position (unit, iteration,
      tasks done, history, finetune metrics), the arrays of the step (heads,
      finetuned heads and, ``with_base``, the base: one-shot units rebuild the base
      from the setup) and the finetuned models by item name, to be written once
      each with :meth:`Checkpointer.save_item`.
    """
    position = {"unit": unit, "iteration": state.iteration, "tasks_done": len(state.finetuned),
                "history": list(state.history),
                "finetune_metrics": dict(state.finetune_metrics)}
    arrays = {"finetuned_heads": dict(state.finetuned_heads), "heads": dict(state.heads)}
    if with_base:
        arrays["base"] = state.base
    finetuned = {item_name(unit, state.iteration, i): params
                 for i, params in enumerate(state.finetuned)}
    return position, arrays, finetuned


def state_from_checkpoint(position: Mapping, arrays: Mapping, items: Mapping[str, PyTree], *,
                          tasks: list[str], base: PyTree) -> atm.State:
    """The `atm.State` that :func:`state_to_checkpoint` stored (``base`` when the
    step holds none); heads come back in ``tasks`` order."""
    unit, iteration = position["unit"], position["iteration"]
    order = lambda d: {t: d[t] for t in tasks if t in d}  # noqa: E731
    finetuned = tuple(like(base, items[item_name(unit, iteration, i)])
                      for i in range(position["tasks_done"]))
    return atm.State(iteration=iteration, base=like(base, arrays.get("base", base)),
                     heads=order(arrays["heads"]), history=tuple(position["history"]),
                     finetuned=finetuned, finetuned_heads=order(arrays.get("finetuned_heads", {})),
                     finetune_metrics=dict(position["finetune_metrics"]))
