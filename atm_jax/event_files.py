"""TensorBoard event files: the run's curves written as it goes, and read back.

`LiveEvents` turns each record the runner writes to ``metrics.jsonl`` into TensorBoard
scalars at once, so ``tensorboard --logdir <workdir>/tensorboard`` shows a run while it
runs. The layout (docs/tensorboard.md):

* one TensorBoard *run* per row of the results table, ``<workdir>/tensorboard/<row>/``
  (``pretrained``, ``linear_probe``, ``individual``, each one-shot and ATM method), so
  TensorBoard draws every method on the same chart of a tag;
* tags ``accuracy/<task>``, ``average_accuracy``, ``train_loss/<task>`` (the last
  epoch's mean loss of that iteration's finetune), ``mean_abs_cos`` (mean |cos| over the
  pairs of merged task vectors) and ``merge_seconds``;
* step = the record's iteration (0 = the start of an ATM method, one-shot rows at 1);
* ``<workdir>/tensorboard/analysis/`` is the run `atm_jax.analysis` writes at the end.

The events are written by tensorboardX's own event writer (its record framing, CRCs,
file names and protos), its file opened through `atm_jax.files`: a local file is
appended to and fsynced after every record; an object store (``gs://…``) cannot append,
so there the file is uploaded whole after every record (one ATM iteration's scalars are
a few hundred bytes). Only process 0 writes.

Resumed runs: every process start writes new event files (TensorBoard reads all the
files of a run in name order). Steps already in the files are not written again: a
resumed run redoes the records after its checkpoint bitwise, and their events were
written before the kill, so each (run, tag, step) appears once.

A failing write (an unwritable folder, a bucket gone away) warns once with
`EventsNotWrittenWarning` and the run goes on without events; ``metrics.jsonl`` keeps
every record.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import struct
import sys
import time
import warnings
from collections.abc import Mapping
from types import ModuleType
from typing import Any

import numpy as np

from atm_jax import extras, files
from atm_jax.analysis import geometry

__all__ = ["EventsNotWrittenWarning", "LiveEvents", "record_scalars", "read_scalars",
           "tensorboardx", "logdir"]

# tensorboardX opens event files through a writer factory registered per path prefix;
# ours sends them through atm_jax.files. The prefix is ours alone, so tensorboardX's
# own gs:// and s3:// writers stay as they are for everyone else in the process.
PREFIX = "atm_jax_files"
_FILE_NUMBERS = itertools.count()


class EventsNotWrittenWarning(UserWarning):
    """TensorBoard events could not be written; the run went on without them."""


def tensorboardx() -> ModuleType:
    """The ``tensorboardX`` package, with our file factory registered.

    tensorboardX's writer module imports torch when it is installed, only to name
    torch.Tensor in type hints; a run that has not loaded torch imports tensorboardX
    without it (benchmarks/results/tensorboardx_import_20261203.md: the import's time
    and memory with and without torch).
    """
    hide = "tensorboardX" not in sys.modules and "torch" not in sys.modules
    with extras.needed("TensorBoard events"):
        if hide:
            sys.modules["torch"] = None  # meanwhile `import torch` raises ImportError
        try:
            import tensorboardX
            from tensorboardX import event_file_writer, record_writer, summary  # noqa: F401
            from tensorboardX.proto import event_pb2  # noqa: F401
        finally:
            if hide and "torch" in sys.modules and sys.modules["torch"] is None:
                del sys.modules["torch"]
    if PREFIX not in record_writer.REGISTERED_FACTORIES:
        record_writer.register_writer_factory(PREFIX, _FileFactory())
    return tensorboardX


def logdir(folder: files.PathLike) -> str:
    """``folder`` as a tensorboardX logdir whose files go through `atm_jax.files`
    (for ``SummaryWriter(logdir=...)``; local or remote)."""
    tensorboardx()
    return f"{PREFIX}:{os.fspath(files.as_path(folder))}"


class _EventFile:
    """The file object tensorboardX's RecordWriter writes an event file to."""

    def __init__(self, name: str):
        self.path = files.as_path(name[len(PREFIX) + 1:])
        self.local = None
        self.data = bytearray()  # a remote file's bytes, uploaded whole on each flush
        if files.is_local(self.path):
            os.makedirs(os.path.dirname(os.fspath(self.path)) or ".", exist_ok=True)
            self.local = open(os.fspath(self.path), "xb")  # a new file: never another's

    def write(self, data: bytes) -> None:
        if self.local is not None:
            self.local.write(data)
        else:
            self.data += data

    def flush(self) -> None:
        if self.local is not None:
            self.local.flush()
            os.fsync(self.local.fileno())
        else:
            files.write_bytes(self.path, bytes(self.data), all_processes=True)

    def close(self) -> None:
        self.flush()
        if self.local is not None:
            self.local.close()


class _FileFactory:
    """tensorboardX's writer-factory interface (``open``, ``directory_check``)."""

    def open(self, name: str) -> _EventFile:
        return _EventFile(name)

    def directory_check(self, name: str) -> None:
        path = files.as_path(name[len(PREFIX) + 1:])
        if files.is_local(path):
            path.mkdir(parents=True, exist_ok=True)


def record_scalars(record: Mapping[str, Any]) -> list[tuple[str, float]]:
    """The ``(tag, value)`` scalars of one record (`atm_jax.atm.record` format, or a
    reference / one-shot row's record); non-finite values left out."""
    out = []
    accuracy = record.get("accuracy") or {}
    for task, value in accuracy.items():
        out.append((f"accuracy/{task}", value))
    if accuracy:
        out.append(("average_accuracy",
                    record.get("average_accuracy", np.mean(list(accuracy.values())))))
    for task, metrics in (record.get("finetune") or {}).items():
        loss = metrics.get("loss")
        if isinstance(loss, (list, tuple)):
            loss = loss[-1] if loss else None
        if loss is not None:
            out.append((f"train_loss/{task}", loss))
    merge = record.get("merge") or {}
    if merge.get("cosine") is not None and len(merge["cosine"]) > 1:
        out.append(("mean_abs_cos", geometry.mean_abs_cosine(merge["cosine"])))
    if merge.get("merge_seconds") is not None:
        out.append(("merge_seconds", merge["merge_seconds"]))
    return [(tag, float(v)) for tag, v in out if np.isfinite(float(v))]


class LiveEvents:
    """Writes each record's scalars to ``<folder>/<row>/`` as the record is written.

    Args:
      folder: the runs' folder, ``<workdir>/tensorboard`` (local or ``gs://…``).
      writer: whether this process writes (default: process 0 only); the others'
        calls do nothing.

    Raises:
      MissingExtraError: tensorboardX is not installed (the `experiments` extra).
    """

    def __init__(self, folder: files.PathLike, *, writer: bool | None = None):
        self.folder = files.as_path(folder)
        self.active = files.is_writer() if writer is None else writer
        self.written: set[tuple[str, str, int]] = set()  # (run, tag, step) in the files
        self.writers: dict[str, Any] = {}
        self.failure: str | None = None
        if self.active:
            self.tbx = tensorboardx()
            with self.guarded():
                self.written = {(run, tag, step) for run, tags in read_scalars(self.folder).items()
                                for tag, points in tags.items() for step, _ in points}

    @contextlib.contextmanager
    def guarded(self):
        """Runs the block; a failure turns the writer off with one warning."""
        try:
            yield
        except Exception as e:  # noqa: BLE001 - any failure of an event write
            self.active = False
            self.failure = f"{type(e).__name__}: {e}"
            warnings.warn(f"TensorBoard events in {self.folder} could not be written "
                          f"({self.failure}); the run goes on without them (metrics.jsonl keeps "
                          "every record).", EventsNotWrittenWarning, stacklevel=3)
            writers, self.writers = self.writers, {}
            for w in writers.values():
                with contextlib.suppress(Exception):
                    w.close()

    def __call__(self, record: Mapping[str, Any]) -> None:
        """Writes the scalars of ``record`` not in the files yet, then flushes."""
        if not self.active:
            return
        run, step = str(record["method"]), int(record["iteration"])
        with self.guarded():
            new = [(tag, v) for tag, v in record_scalars(record)
                   if (run, tag, step) not in self.written]
            if not new:
                return
            writer = self.writers.get(run)
            if writer is None:
                writer = self.writers[run] = self.tbx.event_file_writer.EventsWriter(
                    f"{PREFIX}:{os.fspath(self.folder / run / 'events')}",
                    f".{os.getpid()}.{next(_FILE_NUMBERS)}")
            event_pb2, summary = self.tbx.proto.event_pb2, self.tbx.summary
            now = time.time()
            for tag, value in new:
                writer.write_event(event_pb2.Event(wall_time=now, step=step,
                                                   summary=summary.scalar(tag, value)))
            writer.flush()
            self.written |= {(run, tag, step) for tag, _ in new}

    def close(self) -> None:
        """Flushes and closes every event file (a failure warns, as a write's)."""
        with self.guarded():
            writers, self.writers = self.writers, {}
            for w in writers.values():
                w.close()


def _records(blob: bytes):
    """The payloads of a TFRecord file, up to a torn or damaged record (a killed
    writer's last one)."""
    masked_crc32c = tensorboardx().record_writer.masked_crc32c
    at = 0
    while at + 12 <= len(blob):
        header = blob[at:at + 8]
        (length,) = struct.unpack("<Q", header)
        end = at + 12 + length + 4
        if (struct.unpack("<I", blob[at + 8:at + 12])[0] != masked_crc32c(header)
                or end > len(blob)):
            return
        data = blob[at + 12:at + 12 + length]
        if struct.unpack("<I", blob[end - 4:end])[0] != masked_crc32c(data):
            return
        yield data
        at = end


def read_scalars(folder: files.PathLike) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """The scalars of every event file under ``folder`` (local or remote):
    ``{run: {tag: [(step, value), ...]}}`` in file order; a run is a subfolder's name
    (``"."`` for files in ``folder`` itself). Images and other summaries are left out."""
    folder = files.as_path(folder)
    event_pb2 = tensorboardx().proto.event_pb2
    out: dict[str, dict[str, list[tuple[int, float]]]] = {}
    if not folder.exists():
        return out
    paths = []
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        if entry.is_dir():
            paths += [(entry.name, p) for p in sorted(entry.iterdir(), key=lambda p: p.name)
                      if "tfevents" in p.name]
        elif "tfevents" in entry.name:
            paths.append((".", entry))
    for run, path in paths:
        for data in _records(path.read_bytes()):
            event = event_pb2.Event.FromString(data)
            for value in event.summary.value:
                if value.WhichOneof("value") == "simple_value":
                    out.setdefault(run, {}).setdefault(value.tag, []).append(
                        (int(event.step), float(value.simple_value)))
    return out
