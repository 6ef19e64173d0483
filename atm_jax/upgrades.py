"""Workdirs of earlier releases, resumed under today's names.

A run names its config fields and its rows in four places: ``config.json``, each
checkpoint's meta, ``metrics.jsonl`` and ``params/<row>.msgpack``. When a release
renames one (a config field, or a row whose operator and arguments stay the
same), a workdir written before is brought to the new names as it is resumed, so
it finishes exactly as a run started under them: the same rows, records and
params files. Renaming is idempotent, so a run killed again before its next
checkpoint upgrades the same way next time.

* `FIELD_RENAMES`: top-level config fields, ``old -> new``.
* `ROW_RENAMES`: method rows, ``old -> new``; the α-tuned row ``<old>_tuned``
  follows, and so does an ATM method's ``start`` naming the row.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from atm_jax import files

__all__ = ["FIELD_RENAMES", "ROW_RENAMES", "Renames", "renames_between", "config", "meta",
           "metrics_lines", "workdir_files"]

# PA-ATM's choice of which process finetunes which task, named apart from the
# device mesh (`atm_jax.sharding.Placement`).
FIELD_RENAMES = {"task_placement": "task_ownership"}
# The paper's "task arithmetic" row is the mean of the task vectors; the row is
# named after its operator, and `atm_jax.merge.task_arithmetic` is the sum.
ROW_RENAMES = {"task_arithmetic": "mean"}
_ROW_SUFFIXES = ("", "_tuned")


class Renames:
    """The renames that bring one saved config to the current one."""

    def __init__(self, fields: Mapping[str, str], rows: Mapping[str, str]):
        self.fields, self.rows = dict(fields), dict(rows)

    def __bool__(self) -> bool:
        return bool(self.fields or self.rows)

    def describe(self) -> str:
        pairs = {**self.fields, **self.rows}
        return ", ".join(f"{old} -> {new}" for old, new in pairs.items())

    def row(self, name: Any) -> Any:
        return self.rows.get(name, name) if isinstance(name, str) else name


def renames_between(saved: Mapping | None, current: Mapping) -> Renames:
    """The renames that apply to a workdir whose config is ``saved``.

    A field or row is renamed when the saved config has the old name and not the
    new one, and the current config has the new name and not the old one; whether
    the renamed entries then agree is left to `atm_jax.workdir.check_resumable`.
    """
    if not saved:
        return Renames({}, {})
    fields = {old: new for old, new in FIELD_RENAMES.items()
              if old in saved and new not in saved and new in current and old not in current}
    saved_rows, rows_now = saved.get("methods", {}) or {}, current.get("methods", {}) or {}
    rows = {}
    for old, new in ROW_RENAMES.items():
        for suffix in _ROW_SUFFIXES:
            o, n = old + suffix, new + suffix
            if o in saved_rows and n not in saved_rows and n in rows_now and o not in rows_now:
                rows[o] = n
    return Renames(fields, rows)


def config(saved: Mapping, renames: Renames) -> dict:
    """``saved`` (a config as JSON) under the new names, in its own order."""
    out = {renames.fields.get(k, k): v for k, v in saved.items()}
    if "methods" in out and renames.rows:
        methods = {}
        for name, spec in out["methods"].items():
            spec = dict(spec)
            if "start" in spec:
                spec["start"] = renames.row(spec["start"])
            methods[renames.row(name)] = spec
        out["methods"] = methods
    return out


def meta(saved: Mapping, renames: Renames) -> dict:
    """A checkpoint's meta (`atm_jax.runner.Runner.save`) under the new names: its
    config, finished units, result rows, curves, timings and (an earlier release's
    layout) its metrics lines."""
    out = dict(saved)
    if "config" in out:
        out["config"] = config(out["config"], renames)
    if not renames.rows:
        return out
    out["done"] = [renames.row(u) for u in out.get("done", [])]
    out["rows"] = [dict(r, method=renames.row(r.get("method"))) for r in out.get("rows", [])]
    for key in ("curves", "timings"):
        if key in out:
            out[key] = {renames.row(k): v for k, v in out[key].items()}
    if isinstance(out.get("position"), dict) and "unit" in out["position"]:
        out["position"] = dict(out["position"], unit=renames.row(out["position"]["unit"]))
    if "metrics" in out:
        out["metrics"] = metrics_lines(out["metrics"], renames)
    return out


def metrics_lines(lines: Sequence[str], renames: Renames) -> list[str]:
    """metrics.jsonl lines with renamed rows' ``method`` renamed; every other line
    (and a torn last one) is kept byte for byte."""
    out = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            out.append(line)
            continue
        if isinstance(record, dict) and record.get("method") in renames.rows:
            record["method"] = renames.rows[record["method"]]
            line = json.dumps(record, default=files.jsonable)
        out.append(line)
    return out


def workdir_files(workdir, renames: Renames) -> list[str]:
    """Renames the rows in ``workdir``'s metrics.jsonl and params files; returns what
    changed, for the log. Only the writing process touches files."""
    if not renames.rows or not files.is_writer():
        return []
    workdir = files.as_path(workdir)
    changed = []
    path = workdir / "metrics.jsonl"
    if path.exists():
        text = path.read_text()
        lines = text.split("\n")
        renamed = metrics_lines(lines, renames)
        if renamed != lines:
            files.write_text(path, "\n".join(renamed))
            changed.append("metrics.jsonl")
    for old, new in renames.rows.items():
        for src, dst in ((workdir / "params" / f"{old}.msgpack",
                          workdir / "params" / f"{new}.msgpack"),
                         (workdir / "hf" / old, workdir / "hf" / new)):  # export_hf folders
            if src.exists() and not dst.exists():
                src.rename(dst)
                changed.append(f"{src.parent.name}/{src.name} -> {dst.name}")
    changed += _analysis_files(workdir / "analysis", renames)
    return changed


def _analysis_files(folder, renames: Renames) -> list[str]:
    """The analysis recorder's files (`atm_jax.analysis.recorder`) under the new names."""
    if not folder.exists():
        return []
    changed = []
    for old, new in renames.rows.items():
        src, dst = folder / "bases" / f"{old}.npy", folder / "bases" / f"{new}.npy"
        if src.exists() and not dst.exists():
            src.rename(dst)
            changed.append(f"analysis/bases/{src.name} -> {dst.name}")
        src, dst = folder / "one_shot" / f"{old}.json", folder / "one_shot" / f"{new}.json"
        if src.exists():
            content = json.loads(src.read_text())
            content["method"] = new
            files.write_json(dst, content)
            src.unlink()
            changed.append(f"analysis/one_shot/{src.name} -> {dst.name}")
    for path in sorted((folder / "atm").glob("*/iteration*.json")) if (folder / "atm").exists() \
            else []:
        content = json.loads(path.read_text())
        if content.get("start") in renames.rows:
            content["start"] = renames.rows[content["start"]]
            files.write_json(path, content)
            changed.append(f"analysis/atm/{path.parent.name}/{path.name} (start)")
    return changed
