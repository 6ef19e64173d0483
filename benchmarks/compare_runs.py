"""Two workdirs of the same config, before and after a change: are their outputs the same?

Compares results.json rows and curves, every params/<row>.msgpack byte for byte, and
metrics.jsonl line for line, with the earlier release's row names read as today's
(`atm_jax.upgrades.ROW_RENAMES`, plus their ``_tuned`` rows). Prints what differs.

Run::

  PYTHONPATH=<worktree of the old commit> python -m atm_jax.main --config=configs/mini.py --workdir=/tmp/before
  python -m atm_jax.main --config=configs/mini.py --workdir=/tmp/after
  python benchmarks/compare_runs.py /tmp/before /tmp/after
"""

from __future__ import annotations

import json
import pathlib
import sys

from atm_jax import upgrades

RENAMES = {**upgrades.ROW_RENAMES,
           **{f"{old}_tuned": f"{new}_tuned" for old, new in upgrades.ROW_RENAMES.items()}}


def _renamed_line(line: str) -> str:
    record = json.loads(line)
    if record.get("method") not in RENAMES:
        return line
    record["method"] = RENAMES[record["method"]]
    return json.dumps(record)


def compare(before: pathlib.Path, after: pathlib.Path) -> bool:
    rb = json.loads((before / "results.json").read_text())
    ra = json.loads((after / "results.json").read_text())
    rows_b = {RENAMES.get(r["method"], r["method"]): r["accuracy"] for r in rb["rows"]}
    rows_a = {r["method"]: r["accuracy"] for r in ra["rows"]}
    same = rows_a == rows_b and rb.get("curves") == ra.get("curves")
    print(f"rows: {list(rows_a)}")
    print(f"accuracies identical: {rows_a == rows_b}; curves identical: "
          f"{rb.get('curves') == ra.get('curves')}")
    for name in rows_a:
        if rows_a[name] != rows_b.get(name):
            print(f"  differs: {name}: {rows_b.get(name)} -> {rows_a[name]}")
    pb = {RENAMES.get(p.stem, p.stem): p for p in (before / "params").glob("*.msgpack")}
    pa = {p.stem: p for p in (after / "params").glob("*.msgpack")}
    same &= sorted(pa) == sorted(pb)
    for name in sorted(pa):
        equal = name in pb and pa[name].read_bytes() == pb[name].read_bytes()
        same &= equal
        print(f"  params/{name}.msgpack: {'byte-identical' if equal else 'DIFFERENT'} "
              f"({pa[name].stat().st_size} bytes)")
    lb = (before / "metrics.jsonl").read_text().splitlines()
    la = (after / "metrics.jsonl").read_text().splitlines()
    renamed = [_renamed_line(line) for line in lb]
    print(f"metrics.jsonl: {len(lb)} / {len(la)} records; identical with the old row names read "
          f"as today's: {renamed == la} ({sum(x != y for x, y in zip(lb, renamed))} lines renamed)")
    if renamed != la:
        known = set(renamed)
        new = [line for line in la if line not in known]
        print(f"  records only after: {len(new)}; first: {new[:2]}")
    return same and renamed == la


if __name__ == "__main__":
    sys.exit(0 if compare(pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])) else 1)
