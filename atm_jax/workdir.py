"""The workdir of a run: writable, with room for its checkpoints, and holding no other run.

All checks run before any data is loaded or any step compiled. A workdir is any
`etils.epath` path: a local folder or a bucket (``gs://…``); the disk-space check
applies to local folders only.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping

import jax

from atm_jax import files
from atm_jax.errors import ConfigError

__all__ = ["writable", "check_disk_space", "config_differences", "check_resumable", "saved_config",
           "describe_position", "UNCHECKED_FIELDS", "ABSENT"]

# Fields a resumed run may change freely: how to resume, and how to show progress.
UNCHECKED_FIELDS = ("resume", "progress")


def writable(workdir: files.PathLike):
    """Creates ``workdir`` and proves it writable; returns it as an epath.Path."""
    workdir = files.as_path(workdir)
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / f".write_test_{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"workdir {str(workdir)!r} is not writable ({e.strerror or e}); pass "
                          "--workdir=<a folder you can write>.") from None
    return workdir


def check_disk_space(workdir, base_shapes, num_tasks: int, keep: int) -> None:
    """Fails before training when the checkpoints cannot fit on the workdir's disk.

    Each of the ``keep`` steps (+ one being written) holds a base; the finetunes of
    an unfinished iteration are stored once each (up to one per task, plus one
    being replaced).
    """
    if not files.is_local(workdir):
        return  # an object store: no free-space figure to check against
    model_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(base_shapes))
    needed = model_bytes * (keep + 1 + num_tasks + 1)
    free = shutil.disk_usage(os.fspath(workdir)).free
    if free < needed:
        raise ConfigError(
            f"workdir {str(workdir)!r} has {free / 2**30:.2f} GiB free but the checkpoints need "
            f"about {needed / 2**30:.2f} GiB ({keep} kept + 1 in flight, {num_tasks} finetunes, "
            f"{model_bytes / 2**20:.1f} MiB each); free space, lower config.checkpoint.keep "
            "(at least 2) or use another --workdir.")


def config_differences(old: Mapping, new: Mapping, prefix: str = "",
                       defaults: Mapping[str, list] | None = None) -> list[str]:
    """Dotted fields whose values differ between two config dicts, as "field: old -> new".

    A field absent from ``old`` (a workdir written before the field existed) is no
    difference when its ``new`` value is one of its ``defaults`` (`schema.field_defaults`;
    a method's fields are looked up as ``methods.*.<field>``).
    """
    defaults = defaults or {}
    out = []
    for name in sorted(set(old) | set(new)):
        path = f"{prefix}{name}"
        if not prefix and name in UNCHECKED_FIELDS:
            continue
        a, b = old.get(name, ABSENT), new.get(name, ABSENT)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, path + ".", defaults)
        elif a is ABSENT and isinstance(b, dict):  # a section added since: field by field
            out += config_differences({}, b, path + ".", defaults)
        elif a is ABSENT and b in _defaults_of(path, defaults):
            continue
        elif a != b:
            out.append(f"{path}: {a!r} -> {b!r}")
    return out


ABSENT = "<absent>"


def _defaults_of(path: str, defaults: Mapping[str, list]) -> list:
    parts = path.split(".")
    if len(parts) == 3 and parts[0] == "methods":
        path = f"methods.*.{parts[2]}"
    return defaults.get(path, [])


def check_resumable(saved: Mapping, current: Mapping, resume: str, workdir, *,
                    defaults: Mapping[str, list] | None = None) -> None:
    """Refuses (unless ``resume == "force"``) a workdir holding another config's run.

    Fields the saved config lacks but that hold their default now are no difference
    (``defaults``, see :func:`config_differences`): an upgrade adds fields.
    """
    diffs = config_differences(saved, current, defaults=defaults)
    if not diffs or resume == "force":
        return
    listing = "\n  ".join(diffs)
    raise ConfigError(
        f"workdir {str(workdir)!r} holds a run with a different config:\n  {listing}\n"
        "Use another --workdir for a new run, or pass --config.resume=force to continue "
        "this one with the new values (its results then mix both configs).")


def saved_config(workdir) -> dict | None:
    """The config.json of an earlier run in ``workdir``, if any."""
    path = files.as_path(workdir) / "config.json"
    return json.loads(path.read_text()) if path.exists() else None


def describe_position(meta: Mapping) -> str:
    """Where a checkpoint stands, in words, for the resume log line."""
    position, done = meta["position"], meta["done"]
    unit = position.get("unit")
    if unit is None:
        return "after " + (", ".join(done) if done else "nothing") + " finished"
    text = f"in {unit}, after " + (", ".join(done) + " finished" if done else "the start")
    if position.get("iteration"):
        text += f"; {position['iteration']} merge(s) done"
    if position.get("tasks_done"):
        text += f"; {position['tasks_done']} task finetune(s) done since the last merge"
    return text
