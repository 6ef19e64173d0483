"""The file layer: atomic writes, process-0 guard, checksums, and a (mocked) bucket workdir."""

import json
import pathlib

import jax
import pytest
from etils import epath

from atm_jax import errors, files, workdir, writers

import fakes

BUCKET = "gs://atm-test-bucket"


def test_atomic_write_replaces_whole_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "sub" / "out.json"
    files.write_json(path, {"a": 1, "b": [1.5, 2]})
    assert json.loads(path.read_text()) == {"a": 1, "b": [1.5, 2]}
    files.write_text(path, "second")
    assert path.read_text() == "second"
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.json"]


def test_a_failed_write_keeps_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "out.bin"
    files.write_bytes(path, b"old")

    def broken(f):
        f.write(b"half of the new")
        raise RuntimeError("disk went away")

    with pytest.raises(RuntimeError, match="disk went away"):
        files.atomic_write(path, broken)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_only_process_zero_writes_unless_all_processes(tmp_path, monkeypatch):
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    files.write_text(tmp_path / "shared.txt", "x")
    assert not (tmp_path / "shared.txt").exists()
    files.write_text(tmp_path / "cache.txt", "x", all_processes=True)
    assert (tmp_path / "cache.txt").read_text() == "x"


def test_cache_root_and_offline_flag_come_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(files.CACHE_ENV, str(tmp_path / "c"))
    assert files.cache_dir() == tmp_path / "c"
    monkeypatch.delenv(files.CACHE_ENV)
    assert files.cache_dir() == pathlib.Path.home() / ".cache" / "atm_jax"
    for value, expected in (("1", True), ("yes", True), ("TRUE", True), ("0", False), ("", False)):
        monkeypatch.setenv(files.OFFLINE_ENV, value)
        assert files.offline() is expected


def test_sha256_check_names_file_digests_and_fix(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"abc")
    digest = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"  # sha256("abc")
    assert files.sha256_file(path) == digest
    files.verify_sha256(path, digest, fix="unused")
    with pytest.raises(errors.ChecksumError, match=rf"{path}: expected 0+, got {digest}\..*refetch"):
        files.verify_sha256(path, "0" * 64, fix="refetch it")


@pytest.fixture
def bucket(tmp_path):
    """``gs://atm-test-bucket/...`` served from a local folder through etils' epath mock."""
    root = tmp_path / "bucket"
    root.mkdir()
    with fakes.mock_bucket(BUCKET, root):
        yield root


def test_a_bucket_workdir_gets_the_run_files(bucket):
    target = workdir.writable(f"{BUCKET}/runs/a")
    assert not files.is_local(target) and files.is_local(bucket)
    assert list((bucket / "runs" / "a").iterdir()) == []  # the write probe was removed
    files.write_json(target / "config.json", {"seed": 0})
    assert json.loads((bucket / "runs" / "a" / "config.json").read_text()) == {"seed": 0}
    assert workdir.saved_config(target) == {"seed": 0}
    files.atomic_write_file(target / "params" / "m.bin", lambda name: pathlib.Path(name).write_bytes(b"p"))
    assert (bucket / "runs" / "a" / "params" / "m.bin").read_bytes() == b"p"


def test_metrics_on_a_bucket_are_rewritten_whole(bucket):
    metrics = writers.MetricsWriter(epath.Path(f"{BUCKET}/w/metrics.jsonl"))
    metrics.resume()
    record = {"method": "atm", "iteration": 1, "epochs_per_task": 1, "accuracy": {"a": 0.5}}
    metrics(record)
    metrics(dict(record, iteration=2))
    lines = (bucket / "w" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in lines] == [1, 2]
    # Resumed from a checkpoint that counted one record: the rest is rewritten away.
    again = writers.MetricsWriter(epath.Path(f"{BUCKET}/w/metrics.jsonl"))
    again.resume(1)
    again(dict(record, iteration=3))
    lines = (bucket / "w" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in lines] == [1, 3]


RECORD = {"method": "atm", "iteration": 1, "epochs_per_task": 1, "accuracy": {"a": 0.5, "b": 0.25},
          "finetune": {"a": {"loss": [0.9, 0.7]}, "b": {"loss": [0.3]}},
          "merge": {"task_vector_norm": [1.5, 2.5]}}


def test_metrics_are_appended_and_a_resume_keeps_exactly_the_counted_records(tmp_path):
    path = tmp_path / "metrics.jsonl"
    metrics = writers.MetricsWriter(path)
    metrics.resume()
    metrics(RECORD)
    assert metrics.count == 2
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"method": "atm", "iteration": 1, "epochs_per_task": 1, "task": "a", "accuracy": 0.5,
         "train_loss": 0.7, "task_vector_norm": 1.5},
        {"method": "atm", "iteration": 1, "epochs_per_task": 1, "task": "b", "accuracy": 0.25,
         "train_loss": 0.3, "task_vector_norm": 2.5}]
    first = path.read_text()
    metrics(dict(RECORD, iteration=2))  # written after the checkpoint that counted 2 ...
    with open(path, "a") as f:
        f.write('{"method": "atm", "itera')  # ... and a line torn by a kill
    resumed = writers.MetricsWriter(path)
    resumed.resume(2)
    assert path.read_text() == first and resumed.count == 2
    resumed(dict(RECORD, iteration=2))
    assert [json.loads(line)["iteration"] for line in path.read_text().splitlines()] == [1, 1, 2, 2]
    # An iteration that was not evaluated still writes its train losses and norms.
    skipped = {k: v for k, v in RECORD.items() if k != "accuracy"}
    resumed(dict(skipped, iteration=3))
    last = [json.loads(line) for line in path.read_text().splitlines()][-2:]
    assert [(r["task"], r["train_loss"], r["task_vector_norm"]) for r in last] == [
        ("a", 0.7, 1.5), ("b", 0.3, 2.5)]
    assert all("accuracy" not in r for r in last)
    # Fewer records than the checkpoint counts: the file was changed, say so.
    with pytest.raises(ValueError, match="holds 6 whole records but the checkpoint counts 9"):
        writers.MetricsWriter(path).resume(9)
    # An earlier release's checkpoint held the lines themselves: exactly those are kept.
    old = writers.MetricsWriter(path)
    old.resume(lines=first.splitlines()[:1])
    assert path.read_text() == first.splitlines()[0] + "\n" and old.count == 1


def test_curves_plot_only_the_evaluated_iterations(tmp_path, monkeypatch):
    # eval_every > 1: records of skipped iterations carry no accuracy.
    import matplotlib.axes

    plotted = []
    original = matplotlib.axes.Axes.plot

    def recording(self, x, y, *args, **kwargs):
        plotted.append((list(x), list(y)))
        return original(self, x, y, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", recording)
    history = [{"iteration": k, "accuracy": {"a": k / 10}, "average_accuracy": k / 10}
               if k in (0, 2, 3) else {"iteration": k} for k in range(4)]
    rows = [{"method": "atm", "accuracy": {"a": 0.3}, "average": 0.3}]
    written = writers.plot_results(tmp_path, rows, {"atm": history}, ["a"])
    assert len(written) == 3 and all(pathlib.Path(p).stat().st_size > 0 for p in written)
    # average and per-task curves: iterations 0, 2, 3 at 0 %, 20 %, 30 %
    assert plotted == [([0, 2, 3], [0.0, 20.0, 30.0])] * 2
