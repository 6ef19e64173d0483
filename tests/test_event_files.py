"""Live TensorBoard events: the scalars of each record, read back while the run goes, a
resumed run writing no step twice, a failing write warning once, a bucket workdir.

The tests read the events through `event_files.read_scalars`, which takes any epath:
`events_folder` (the writer alone) and `events_workdir` (whole runs, `EVENT_WORKDIRS`)
are a local folder or a bucket on the GCS emulator (conftest's ``gcs_bucket``), and the
writer alone also etils' epath mock of a bucket.
"""

import json
import os

import numpy as np
import pytest
from etils import epath

from atm_jax import atm, event_files, runner

import fakes
from fault_driver import tiny_config
from tests import test_runner

BUCKET = "gs://atm-events-bucket"

RECORD = {"method": "atm", "iteration": 1, "epochs_per_task": 1,
          "accuracy": {"a": 0.5, "b": 0.25},
          "finetune": {"a": {"loss": [0.9, 0.7]}, "b": {"loss": [0.3]}},
          "merge": {"cosine": [[1.0, -0.2, 0.4], [-0.2, 1.0, 0.0], [0.4, 0.0, 1.0]],
                    "merge_seconds": 0.125}}


def test_a_record_gives_accuracy_loss_mean_abs_cos_and_merge_time():
    scalars = dict(event_files.record_scalars(RECORD))
    # mean |cos| over the three pairs: (0.2 + 0.4 + 0.0) / 3; train loss: the last epoch's.
    assert scalars == {"accuracy/a": 0.5, "accuracy/b": 0.25, "average_accuracy": 0.375,
                       "train_loss/a": 0.7, "train_loss/b": 0.3,
                       "mean_abs_cos": pytest.approx(0.2), "merge_seconds": 0.125}
    # An iteration eval_every skipped has no accuracy; one task has no pair to average.
    skipped = {k: v for k, v in RECORD.items() if k != "accuracy"}
    skipped["merge"] = {"cosine": [[1.0]], "merge_seconds": 0.5}
    assert dict(event_files.record_scalars(skipped)) == {
        "train_loss/a": 0.7, "train_loss/b": 0.3, "merge_seconds": 0.5}
    assert event_files.record_scalars({"method": "pretrained", "iteration": 0,
                                       "accuracy": {"a": float("nan")}}) == []


def _mock_bucket(root):
    """``gs://atm-events-bucket/...`` served from the folder ``root`` (etils' epath mock)."""
    return fakes.mock_bucket(BUCKET, root)


@pytest.fixture(params=["local", "mock_bucket", "gcs"])
def events_folder(request, tmp_path):
    """``(folder to write events to, how many event files its run "atm" holds)``:
    local, etils' epath mock of a bucket, or a bucket on the GCS emulator."""
    local = tmp_path / "tensorboard"
    if request.param == "local":
        yield local, lambda: len(list((local / "atm").iterdir()))
    elif request.param == "mock_bucket":
        with _mock_bucket(tmp_path):
            yield epath.Path(f"{BUCKET}/tensorboard"), lambda: len(list((local / "atm").iterdir()))
    else:
        emulator = request.getfixturevalue("gcs_emulator")
        folder = epath.Path(request.getfixturevalue("gcs_bucket")) / "tensorboard"
        yield folder, lambda: len(emulator.objects(os.fspath(folder / "atm")))


def _steps(scalars, tag):
    return [step for step, _ in scalars.get(tag, [])]


def _no_step_twice(scalars):
    for run, tags in scalars.items():
        for tag, points in tags.items():
            steps = [s for s, _ in points]
            assert len(steps) == len(set(steps)), (run, tag, steps)


def test_each_record_is_readable_at_once_and_a_resumed_writer_skips_written_steps(events_folder):
    folder, event_file_count = events_folder
    events = event_files.LiveEvents(folder, writer=True)
    events(dict(RECORD, iteration=0))
    assert _steps(event_files.read_scalars(folder)["atm"], "accuracy/a") == [0]  # no close
    events(RECORD)
    # Killed here; the resumed run redoes iteration 1 (after its checkpoint) and goes on.
    again = event_files.LiveEvents(folder, writer=True)
    again(dict(RECORD, accuracy={"a": 0.5, "b": 0.25}))
    again(dict(RECORD, iteration=2, accuracy={"a": 0.75, "b": 0.25}))
    again({"method": "ties", "iteration": 1, "accuracy": {"a": 0.125}})
    scalars = event_files.read_scalars(folder)
    assert scalars["atm"]["accuracy/a"] == [(0, 0.5), (1, 0.5), (2, 0.75)]
    _no_step_twice(scalars)
    assert scalars["ties"] == {"accuracy/a": [(1, 0.125)], "average_accuracy": [(1, 0.125)]}
    assert event_file_count() == 2  # one event file per writer
    events.close()
    again.close()
    assert event_files.read_scalars(folder) == scalars


def test_a_torn_last_record_is_dropped_and_the_next_writer_writes_its_step(tmp_path):
    folder = tmp_path / "tensorboard"
    events = event_files.LiveEvents(folder, writer=True)
    events({"method": "atm", "iteration": 0, "accuracy": RECORD["accuracy"]})
    events(RECORD)
    (path,) = (folder / "atm").iterdir()
    path.write_bytes(path.read_bytes()[:-7])  # a kill in the middle of the last event
    torn = event_files.read_scalars(folder)["atm"]
    assert _steps(torn, "accuracy/a") == [0, 1] and _steps(torn, "merge_seconds") == []
    event_files.LiveEvents(folder, writer=True)(RECORD)
    assert _steps(event_files.read_scalars(folder)["atm"], "merge_seconds") == [1]


def test_a_failing_write_warns_once_and_the_writer_goes_quiet(tmp_path):
    (tmp_path / "workdir").write_text("a file where the folder should be")
    events = event_files.LiveEvents(tmp_path / "workdir" / "tensorboard", writer=True)
    with pytest.warns(event_files.EventsNotWrittenWarning, match="could not be written") as seen:
        events(RECORD)
        events(dict(RECORD, iteration=2))
        events.close()
    assert len(seen) == 1 and "the run goes on" in str(seen[0].message)
    assert not events.active


def test_a_write_the_bucket_refuses_warns_once(gcs_bucket, gcs_emulator):
    folder = epath.Path(gcs_bucket) / "tensorboard"
    events = event_files.LiveEvents(folder, writer=True)
    events(dict(RECORD, iteration=0))
    gcs_emulator.refuse_writes("tensorboard")
    with pytest.warns(event_files.EventsNotWrittenWarning, match="Forbidden") as seen:
        events(RECORD)
        events(dict(RECORD, iteration=2))
        events.close()
    assert len(seen) == 1
    gcs_emulator.refuse_writes(None)
    assert _steps(event_files.read_scalars(folder)["atm"], "accuracy/a") == [0]


def test_other_processes_write_nothing(tmp_path, monkeypatch):
    import jax
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    events = event_files.LiveEvents(tmp_path / "tensorboard")
    events(RECORD)
    events.close()
    assert not (tmp_path / "tensorboard").exists()


# -- the runner writes them as it goes --------------------------------------------------

# Where the run tests put their workdir (module docstring).
EVENT_WORKDIRS = ("local", "gcs")


@pytest.fixture(params=EVENT_WORKDIRS)
def events_workdir(request, fake_cache, tmp_path):
    """A workdir for a run whose events the test reads (an epath)."""
    if request.param == "gcs":
        return epath.Path(request.getfixturevalue("gcs_bucket")) / "work"
    return epath.Path(tmp_path / "work")


def _atm_config(**fields):
    # the tiny runs of test_resume.py: their programs are cached
    return test_runner._atm_only(tiny_config(), **fields)


def test_tensorboard_shows_the_curves_while_the_run_goes(events_workdir, monkeypatch):
    config = _atm_config()
    tasks, iterations = list(config.tasks), config.methods.atm.iterations
    seen = []
    merge_step = atm.merge_step

    def read_then_merge(*args, **kwargs):  # each merge: what TensorBoard shows then
        seen.append(event_files.read_scalars(events_workdir / "tensorboard"))
        return merge_step(*args, **kwargs)

    monkeypatch.setattr(atm, "merge_step", read_then_merge)
    out = runner.run_experiment(config, events_workdir, log=lambda *_: None)
    assert len(seen) == iterations == 2
    # At the second merge: the start (0) and iteration 1 are there, iteration 2 is not.
    mid = seen[1]["atm"]
    for task in tasks:
        assert _steps(mid, f"accuracy/{task}") == [0, 1]
        assert _steps(mid, f"train_loss/{task}") == [1]
    assert _steps(mid, "mean_abs_cos") == _steps(mid, "merge_seconds") == [1]
    final = event_files.read_scalars(events_workdir / "tensorboard")
    assert set(final) == {"atm"}
    _no_step_twice(final)
    curve = out["curves"]["atm"]
    for task in tasks:
        assert final["atm"][f"accuracy/{task}"] == [
            (h["iteration"], pytest.approx(h["accuracy"][task])) for h in curve]
    assert _steps(final["atm"], "average_accuracy") == [0, 1, 2]
    lines = [json.loads(x) for x in (events_workdir / "metrics.jsonl").read_text().splitlines()]
    losses = [(line["iteration"], line["train_loss"]) for line in lines
              if line["task"] == tasks[0] and line.get("train_loss") is not None]
    assert final["atm"][f"train_loss/{tasks[0]}"] == [(k, pytest.approx(v)) for k, v in losses]


class Stopped(BaseException):
    """Stands for a kill: not an Exception, so nothing on the way catches it."""


def test_a_run_stopped_between_a_record_and_its_checkpoint_writes_no_step_twice(
        events_workdir, monkeypatch):
    config = _atm_config()
    write = event_files.LiveEvents.__call__

    def stop_after_iteration_one(self, record):  # metrics.jsonl and events written, no checkpoint
        write(self, record)
        if record["iteration"] == 1:
            raise Stopped

    monkeypatch.setattr(event_files.LiveEvents, "__call__", stop_after_iteration_one)
    with pytest.raises(Stopped):
        runner.run_experiment(config, events_workdir, log=lambda *_: None)
    monkeypatch.setattr(event_files.LiveEvents, "__call__", write)
    stopped = event_files.read_scalars(events_workdir / "tensorboard")["atm"]
    assert _steps(stopped, "merge_seconds") == [1]
    lines = []
    out = runner.run_experiment(config, events_workdir, log=lines.append)
    assert any("resuming from" in line for line in lines)
    final = event_files.read_scalars(events_workdir / "tensorboard")
    _no_step_twice(final)
    # The resumed run redid iteration 1's record (metrics.jsonl cut back to the checkpoint)
    # and wrote only iteration 2's events, into a file of its own.
    assert _steps(final["atm"], "merge_seconds") == [1, 2]
    assert final["atm"]["merge_seconds"][0] == stopped["merge_seconds"][0]
    assert len(list((events_workdir / "tensorboard" / "atm").iterdir())) == 2
    records = [json.loads(x) for x in (events_workdir / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == len({(r["iteration"], r["task"]) for r in records}) == 3 * len(config.tasks)
    assert _steps(final["atm"], "average_accuracy") == [h["iteration"] for h in out["curves"]["atm"]]


def test_a_failing_event_write_warns_once_and_the_run_finishes(fake_cache, tmp_path):
    # (On a bucket: test_a_write_the_bucket_refuses_warns_once.)
    config = _atm_config(budget=1)
    with config.unlocked():
        config.methods.atm.iterations = 1
    workdir = tmp_path / "work"
    (workdir / "tensorboard").mkdir(parents=True)
    (workdir / "tensorboard" / "atm").write_text("not a folder")  # its run's folder
    with pytest.warns(event_files.EventsNotWrittenWarning) as seen:
        out = runner.run_experiment(config, workdir, log=lambda *_: None)
    ours = [w for w in seen if w.category is event_files.EventsNotWrittenWarning]
    assert len(ours) == 1 and str(workdir / "tensorboard") in str(ours[0].message)
    assert [h["iteration"] for h in out["curves"]["atm"]] == [0, 1]
    assert (workdir / "results.json").exists()
    assert np.isfinite(out["rows"][-1]["average"])
