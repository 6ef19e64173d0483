"""Workdirs on a bucket, through a real GCS-protocol server on 127.0.0.1
(tests/gcs_emulator.py: fake-gcs-server; the `gcs_bucket` fixture points gcsfs /
epath and tensorstore at it).

Here: each client layer reaches the server (objects listed through the server's own
API, not through the client that wrote them), checkpoints on a bucket (items deleted,
damaged steps set aside), and refused writes stopping a run with the error naming
the object. A run killed mid-finetune on a bucket and resumed, bitwise equal to the
uninterrupted local run, is in test_resume.py (one process) and test_multihost.py
(two processes), beside the local references they compare to.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from etils import epath

from atm_jax import checkpoint, writers

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent


def test_epath_and_tensorstore_write_to_the_emulator(gcs_bucket, gcs_emulator, tmp_path,
                                                     monkeypatch):
    import tensorstore as ts

    monkeypatch.chdir(tmp_path)  # a gs:// path mistaken for a local one would land here
    run = epath.Path(gcs_bucket) / "run"
    (run / "config.json").write_text('{"seed": 0}')
    assert json.loads((run / "config.json").read_text()) == {"seed": 0}
    array = ts.open({"driver": "zarr3", "kvstore": f"{gcs_bucket}/run/array/"}, create=True,
                    dtype=ts.float32, shape=[3, 4]).result()
    array[...] = np.arange(12, dtype=np.float32).reshape(3, 4)
    again = ts.open({"driver": "zarr3", "kvstore": f"{gcs_bucket}/run/array/"}).result()
    np.testing.assert_array_equal(again.read().result(), np.arange(12).reshape(3, 4))
    objects = gcs_emulator.objects(f"{gcs_bucket}/run/")
    assert objects["run/config.json"] == len('{"seed": 0}')
    assert "run/array/zarr.json" in objects and "run/array/c/0/0" in objects
    assert list(tmp_path.iterdir()) == []


def test_checkpoints_on_a_bucket_delete_unnamed_items_and_set_damaged_steps_aside(
        gcs_bucket, gcs_emulator, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    messages = []
    directory = f"{gcs_bucket}/run/checkpoints"
    ckpt = checkpoint.Checkpointer(directory, keep=2, log=messages.append)
    crcs = {"a": ckpt.save_item("a", {"w": np.full((500,), 1.0, np.float32)})}
    ckpt.save(1, {"x": np.zeros(2, np.float32)}, {"n": 1}, crcs)
    crcs["b"] = ckpt.save_item("b", {"w": np.full((500,), 2.0, np.float32)})
    ckpt.save(2, {"x": np.ones(2, np.float32)}, {"n": 2}, crcs)
    for step in (3, 4):  # steps 3 and 4 (the kept ones) name "b" only
        ckpt.save(step, {"x": np.full(2, step, np.float32)}, {"n": step}, {"b": crcs["b"]})
    ckpt.wait()
    names = gcs_emulator.objects(f"{directory}/")
    items = {n.split("/")[3] for n in names if n.startswith("run/checkpoints/items/")}
    assert items == {"b"}  # every object of "a" is gone from the bucket
    assert {n.split("/")[2] for n in names} == {"3", "4", "items"}
    assert any(n.startswith("run/checkpoints/4/state/ocdbt.process_0/d/") for n in names)
    # The newest step damaged on the bucket: skipped, moved aside, the older one restored.
    biggest = max((n for n in names if n.startswith("run/checkpoints/4/state/")),
                  key=lambda n: names[n])
    blob = bytearray((epath.Path(gcs_bucket) / biggest).read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (epath.Path(gcs_bucket) / biggest).write_bytes(bytes(blob))
    restored = ckpt.latest()
    assert restored.step == 3 and set(restored.items) == {"b"}
    np.testing.assert_array_equal(restored.state["x"], np.full(2, 3.0, np.float32))
    np.testing.assert_array_equal(restored.items["b"]["w"], np.full((500,), 2.0, np.float32))
    assert any("checkpoint step 4" in m and "damaged" in m for m in messages)
    names = gcs_emulator.objects(f"{gcs_bucket}/run/")
    assert not any(n.startswith("run/checkpoints/4/") for n in names)
    assert any(n.startswith("run/checkpoints.damaged/4-") for n in names)
    assert ckpt.steps() == [3]
    ckpt.close()
    assert list(tmp_path.iterdir()) == []


def test_a_refused_metrics_write_raises_naming_the_object(gcs_bucket, gcs_emulator):
    metrics = writers.MetricsWriter(f"{gcs_bucket}/run/metrics.jsonl")
    metrics.resume()
    record = {"method": "atm", "iteration": 1, "epochs_per_task": 1, "accuracy": {"a": 0.5}}
    metrics(record)
    gcs_emulator.refuse_writes("run/metrics.jsonl")
    with pytest.raises(OSError, match=r"Forbidden: .*metrics\.jsonl"):
        metrics(dict(record, iteration=2))
    assert (epath.Path(gcs_bucket) / "run" / "metrics.jsonl").read_text().count("\n") == 1


def _env(cache: pathlib.Path) -> dict:
    return dict(os.environ, ATM_JAX_CACHE=str(cache), ATM_JAX_OFFLINE="1", JAX_PLATFORMS="cpu")


def test_main_on_a_bucket_it_cannot_write_exits_2_before_any_work(gcs_bucket, gcs_emulator,
                                                                  tmp_path):
    gcs_emulator.refuse_writes(gcs_bucket.removeprefix("gs://") + "/")
    cmd = [sys.executable, "-m", "atm_jax.main", f"--config={ROOT / 'configs' / 'mini.py'}:tiny",
           f"--workdir={gcs_bucket}/run"]
    run = subprocess.run(cmd, env=_env(tmp_path / "cache"), capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert run.returncode == 2, run.stderr[-3000:]
    assert f"workdir '{gcs_bucket}/run' is not writable (Forbidden" in run.stderr
    assert "--workdir=<a folder you can write>" in run.stderr
    assert not (tmp_path / "cache").exists()  # no data fetched, nothing trained
    assert gcs_emulator.objects(f"{gcs_bucket}/") == {}


def test_a_refused_checkpoint_array_write_stops_the_run(gcs_bucket, gcs_emulator, tmp_path,
                                                        shared_bases):
    """Tensorstore's array writes (inside orbax's save, on the checkpoint thread) refused
    with 403: the run stops at the next save with tensorstore's error naming the
    object, and writes nothing after it (no results), as a failed write on a local
    disk does (test_resume.py)."""
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "bases").symlink_to(shared_bases, target_is_directory=True)
    gcs_emulator.refuse_writes("/state/ocdbt.process_0/")
    run = subprocess.run([sys.executable, str(HERE / "fault_driver.py"), f"{gcs_bucket}/run",
                          str(tmp_path / "calls")], env=_env(cache), capture_output=True,
                         text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 1, run.stderr[-3000:]
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("ValueError: PERMISSION_DENIED"), last[:500]
    assert f"{gcs_bucket}/run/checkpoints/1/state/ocdbt.process_0/" in last
    assert "http_response_code='403'" in last
    names = gcs_emulator.objects(f"{gcs_bucket}/run/")
    assert "run/config.json" in names and "run/results.json" not in names
    assert not any(n.startswith(("run/checkpoints/2/", "run/checkpoints/items/")) for n in names)
    assert not (tmp_path / "gs:").exists()  # nothing went to a local look-alike path
