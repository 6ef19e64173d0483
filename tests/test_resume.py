"""Checkpoint / resume: SIGKILL fault injection, no redone work, damaged checkpoints,
config mismatch, divergence, unwritable or full workdirs, bad config values."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from atm_jax import checkpoint, errors, event_files, runner

from fault_driver import tiny_config

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
OUTPUTS = ("metrics.jsonl", "params/ties.msgpack", "params/dare.msgpack", "params/mean.msgpack",
           "params/atm.msgpack")


@pytest.fixture(scope="module")
def cache(tmp_path_factory, shared_bases):
    """A fake-data cache shared by every subprocess, with the session's tiny bases."""
    cache = tmp_path_factory.mktemp("cache")
    (cache / "bases").symlink_to(shared_bases, target_is_directory=True)
    return cache


def drive(cache, workdir, calls, fault=None) -> subprocess.CompletedProcess:
    # The subprocesses inherit the session's persistent compilation cache (conftest.py):
    # each compiles the same tiny programs, so only the first pays for XLA.
    env = dict(os.environ, ATM_JAX_CACHE=str(cache), ATM_JAX_OFFLINE="1", JAX_PLATFORMS="cpu",
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    command = [sys.executable, str(HERE / "fault_driver.py"), str(workdir), str(calls)]
    return subprocess.run(command + ([fault] if fault else []), env=env, capture_output=True,
                          text=True, timeout=300, cwd=ROOT)


@pytest.fixture(scope="module")
def reference(cache, tmp_path_factory):
    """An uninterrupted run: the outputs every resumed run must equal bitwise."""
    root = tmp_path_factory.mktemp("reference")
    done = drive(cache, root / "work", root / "calls")
    assert done.returncode == 0, done.stderr[-3000:]
    return root


def _events(path: pathlib.Path) -> list[tuple[str, str]]:
    return [tuple(line.split()) for line in path.read_text().splitlines()]


# Each run of the chain is killed at one point and the next run resumes from what the
# previous one left; one point per kind of boundary or partial write, in run order (the
# counts are per run, from where it resumed; the comments say where each kill lands,
# checked by printing the resume lines of each run). Checkpoint writes run on a
# background thread, so a kill mid-finetune can also lose the save queued just before.
CHAIN = (
    "eval:3",      # fresh run, mid-evaluation inside the linear probe: only the pretrained
                   # step is on disk
    "item:1",      # resumes after pretrained; mid-write of the first one-shot task's
                   # finetuned model (a checkpoint item)
    "save:1",      # resumes after the linear probe; mid-save of that task's step: orbax's
                   # temporary folder exists, no commit yet
    "metrics:3",   # resumes there again; both one-shot tasks saved, killed between the
                   # one-shot merges, after the TIES row's record reached metrics.jsonl
                   # (the individual and mean rows' before it), before the unit's checkpoint
    "CORRUPT",     # (not a kill) the newest checkpoint's files damaged on disk
    "step:14",     # falls back to the older step (one-shot, one task done), finishes
                   # one-shot; mid-finetune inside ATM (iteration 1, second task)
    "merge:1",     # resumes in ATM; mid-merge of ATM's iteration 1
    "params:1",    # resumes in ATM (iteration 1's finetunes done); while writing the ATM
                   # method's final params
    "results:1",   # while writing results.md / plots, after the last checkpoint
)


def _corrupt_newest(ckpt_dir: pathlib.Path) -> int:
    steps = sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit())
    newest = ckpt_dir / str(steps[-1])
    files = sorted((f for f in newest.rglob("*") if f.is_file()), key=lambda f: -f.stat().st_size)
    for f in files[:3]:  # the biggest files hold the arrays
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0xFF
        f.write_bytes(bytes(data))
    return steps[-1]


def test_sigkill_at_every_point_then_resume_gives_bitwise_the_uninterrupted_run(
        cache, reference, tmp_path):
    workdir, calls = tmp_path / "work", tmp_path / "calls"
    resumed_from, saw_tmp_folder, saw_tmp_item, warned = [], False, False, False
    for fault in CHAIN:
        if fault == "CORRUPT":
            damaged = _corrupt_newest(workdir / "checkpoints")
            continue
        run = drive(cache, workdir, calls, fault)
        assert run.returncode == -9, (fault, run.returncode, run.stderr[-3000:])
        log = run.stdout + run.stderr
        resumed_from += [line for line in log.splitlines() if line.startswith("resuming from")]
        if "damaged or incomplete" in log:
            warned = True
            assert f"checkpoint step {damaged}" in log
        if fault.startswith("save"):
            saw_tmp_folder = any("tmp" in p.name for p in (workdir / "checkpoints").iterdir())
        if fault.startswith("item"):
            saw_tmp_item = any("tmp" in p.name
                               for p in (workdir / "checkpoints" / "items").iterdir())
    final = drive(cache, workdir, calls)
    assert final.returncode == 0, final.stderr[-3000:]
    assert "resuming from" in final.stdout
    assert saw_tmp_folder, "the mid-save kill left no partial checkpoint to skip"
    assert saw_tmp_item, "the mid-item kill left no partial item to clean up"
    # Half-written items are gone; every item left is named by a kept step.
    kept = set()
    for step in checkpoint.Checkpointer(workdir / "checkpoints", keep=2).steps():
        meta = json.loads((workdir / "checkpoints" / str(step) / "meta" / "metadata").read_text())
        kept |= set(meta["items"])
    assert {p.name for p in (workdir / "checkpoints" / "items").iterdir()} <= kept
    assert warned, "the damaged checkpoint was not reported"
    # Every kill after the first resumed, and from ever later points, inside the
    # one-shot unit and inside ATM too (the chain walks through every unit).
    assert len(resumed_from) == len(CHAIN) - 2
    assert any("(in one_shot," in line for line in resumed_from), resumed_from
    assert any("(in atm," in line for line in resumed_from), resumed_from
    for name in OUTPUTS:
        assert (workdir / name).read_bytes() == (reference / "work" / name).read_bytes(), name
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    keys = [(r["method"], r["iteration"], r["task"]) for r in map(json.loads, lines)]
    assert len(keys) == len(set(keys))
    ours = json.loads((workdir / "results.json").read_text())
    theirs = json.loads((reference / "work" / "results.json").read_text())
    assert ours["rows"] == theirs["rows"] and ours["curves"] == theirs["curves"]
    # TensorBoard: every (run, tag, step) of the uninterrupted run once, the same accuracies.
    events = event_files.read_scalars(workdir / "tensorboard")
    expected = event_files.read_scalars(reference / "work" / "tensorboard")
    for scalars in (events, expected):  # file order is kill order: compare sorted
        for tags in scalars.values():
            for tag in tags:
                tags[tag] = sorted(tags[tag])
    assert {(r, t): [s for s, _ in p] for r, tags in events.items() for t, p in tags.items()} == \
        {(r, t): [s for s, _ in p] for r, tags in expected.items() for t, p in tags.items()}
    assert {r: {t: p for t, p in tags.items() if "accuracy" in t} for r, tags in events.items()} == \
        {r: {t: p for t, p in tags.items() if "accuracy" in t} for r, tags in expected.items()}
    # Every finetune of the reference finished exactly once, whatever was redone.
    ends = [i for e, i in _events(calls) if e == "end"]
    reference_ends = [i for e, i in _events(reference / "calls") if e == "end"]
    assert set(ends) == set(reference_ends)


# The last commit whose checkpoints stored metrics.jsonl's text in their meta and
# whose configs had no field added since: a workdir it wrote must resume under this code.
OLD_RELEASE = "a1a3748"


def _old_release(tmp_path) -> pathlib.Path:
    """The package and test drivers of OLD_RELEASE, unpacked from git (skips where the
    clone has no history)."""
    known = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{OLD_RELEASE}^{{commit}}"],
                           cwd=ROOT, capture_output=True, text=True)
    if known.returncode != 0:
        pytest.skip(f"commit {OLD_RELEASE} is not in this clone (shallow or exported): the "
                    "upgrade test needs the repository's history (git fetch --unshallow)")
    tree = tmp_path / "old"
    tree.mkdir()
    archive = subprocess.run(["git", "archive", OLD_RELEASE, "atm_jax", "configs", "tests"],
                             cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


# The previous release's driver, with its row for the mean of the task vectors under that
# release's name (task_arithmetic), where tests/fault_driver.py has its mean row.
OLD_DRIVER = """
import sys
sys.path.insert(0, sys.argv.pop(1))
import ml_collections
import fault_driver
from atm_jax import recipes

_tiny = fault_driver.tiny_config


def tiny_config():
    config = _tiny()
    methods = dict(config.methods)
    with config.unlocked():
        config.methods = ml_collections.ConfigDict(
            {"ties": methods["ties"], "dare": methods["dare"],
             "task_arithmetic": recipes.method("one_shot", "mean"), "atm": methods["atm"]})
    return config


fault_driver.tiny_config = tiny_config
fault_driver.main(sys.argv)
"""


def test_a_workdir_killed_under_the_previous_release_resumes_and_finishes(
        cache, reference, tmp_path):
    old = _old_release(tmp_path)
    workdir, calls = tmp_path / "work", tmp_path / "calls"
    env = dict(os.environ, ATM_JAX_CACHE=str(cache), ATM_JAX_OFFLINE="1", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(old))
    driver = tmp_path / "old_driver.py"
    driver.write_text(OLD_DRIVER)
    # Killed mid-merge in ATM's first iteration (after the three one-shot merges: the
    # one-shot unit is done, its rows and params files written under the old name).
    killed = subprocess.run([sys.executable, str(driver), str(old / "tests"), str(workdir),
                             str(calls), "merge:4"], env=env, capture_output=True, text=True,
                            timeout=300, cwd=old)
    assert killed.returncode == -9, killed.stderr[-3000:]
    meta = json.loads(max((workdir / "checkpoints").glob("[0-9]*/meta/metadata"),
                          key=lambda p: int(p.parent.parent.name)).read_text())
    assert "metrics" in meta and "records" not in meta  # the old layout
    assert meta["position"]["unit"] == "atm" and "one_shot" in meta["done"]
    assert "task_arithmetic" in meta["config"]["methods"]  # the old row name
    assert "task_placement" in meta["config"]  # the old field name
    assert [r["method"] for r in meta["rows"]][-4:] == ["individual", "task_arithmetic", "ties",
                                                        "dare"]
    for name in ("eval_every", "precision", "remat"):  # fields that release had too
        assert name in meta["config"]
    assert (workdir / "params" / "task_arithmetic.msgpack").exists()
    done = drive(cache, workdir, calls)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from checkpoint" in done.stdout
    assert "renamed task_placement -> task_ownership, task_arithmetic -> mean" in done.stdout
    assert not (workdir / "params" / "task_arithmetic.msgpack").exists()
    for name in OUTPUTS:
        assert (workdir / name).read_bytes() == (reference / "work" / name).read_bytes(), name
    ours = json.loads((workdir / "results.json").read_text())
    theirs = json.loads((reference / "work" / "results.json").read_text())
    assert ours["rows"] == theirs["rows"] and ours["curves"] == theirs["curves"]


def test_resumed_run_does_not_redo_finished_tasks(cache, reference, tmp_path):
    workdir, calls = tmp_path / "work", tmp_path / "calls"
    # Saves: pretrained, linear probe, 2 one-shot tasks, one-shot done, ATM iteration 0,
    # ATM iteration 1 task 1 (the 7th): kill right after it is on disk.
    killed = drive(cache, workdir, calls, "saved:7")
    assert killed.returncode == -9
    first = [i for e, i in _events(calls) if e == "start"]
    resumed = drive(cache, workdir, calls)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "1 task finetune(s) done since the last merge" in resumed.stdout
    starts = [i for e, i in _events(calls) if e == "start"]
    reference_starts = [i for e, i in _events(reference / "calls") if e == "start"]
    assert len(first) == 3  # two one-shot tasks and the first ATM task
    assert starts == reference_starts  # nothing finished was started again
    for name in OUTPUTS:
        assert (workdir / name).read_bytes() == (reference / "work" / name).read_bytes(), name


def test_sigkills_on_a_bucket_then_resume_give_bitwise_the_local_run(
        cache, reference, gcs_bucket, gcs_emulator, tmp_path):
    """``--workdir=gs://…`` on the GCS-protocol server of tests/gcs_emulator.py, killed
    mid-save (an object store has no rename: orbax writes the step in place, and it
    counts once its commit_success.txt is there), then mid-finetune (ATM's iteration 1,
    second task), restarted: every output is the uninterrupted local run's, and the
    checkpoints are tensorstore's objects in the bucket."""
    from etils import epath

    workdir = f"{gcs_bucket}/run"
    killed = drive(cache, workdir, tmp_path / "calls", "save:3")  # the first one-shot step
    assert killed.returncode == -9, killed.stderr[-3000:]
    written = gcs_emulator.objects(f"{workdir}/")
    assert "run/checkpoints/3/_CHECKPOINT_METADATA" in written  # begun, never committed
    assert "run/checkpoints/3/commit_success.txt" not in written
    assert "run/checkpoints/2/commit_success.txt" in written
    assert any("/state/ocdbt.process_0/d/" in n for n in written)  # tensorstore's arrays
    killed = drive(cache, workdir, tmp_path / "calls", "step:22")  # counted from the resume
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert f"resuming from checkpoint step 2 in {workdir}/checkpoints" in killed.stdout
    resumed = drive(cache, workdir, tmp_path / "calls")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"in {workdir}/checkpoints (in atm," in resumed.stdout
    for name in OUTPUTS:
        assert (epath.Path(workdir) / name).read_bytes() == \
            (reference / "work" / name).read_bytes(), name
    ours = json.loads((epath.Path(workdir) / "results.json").read_text())
    theirs = json.loads((reference / "work" / "results.json").read_text())
    assert ours["rows"] == theirs["rows"] and ours["curves"] == theirs["curves"]
    written = gcs_emulator.objects(f"{workdir}/")
    steps = {n.split("/")[2] for n in written if n.startswith("run/checkpoints/")} - {"items"}
    assert len(steps) == 2  # config.checkpoint.keep
    assert all(f"run/checkpoints/{s}/state/ocdbt.process_0/manifest.ocdbt" in written
               for s in steps)
    assert not (ROOT / "gs:").exists()  # the drivers' working folder: nothing went there


# -- in-process tests ------------------------------------------------------------------

def _quick_config():
    config = tiny_config()
    with config.unlocked():
        config.methods = {"atm": config.methods.atm}
        config.references = ()
    return config


def quiet(*_):
    pass


_QUICK = {}  # the finished `_quick_config` run, made once for this module


@pytest.fixture(scope="module")
def quick_root(tmp_path_factory):
    return tmp_path_factory.mktemp("quick")


@pytest.fixture
def finished_quick_run(fake_cache, quick_root, tmp_path):
    """A copy (in tmp_path / "work") of the finished `_quick_config` run, which this
    module runs once: the tests that start by running it to the end and then resume it
    edit or resume their own copy."""
    if not _QUICK:
        runner.run_experiment(_quick_config(), quick_root / "work", log=quiet)
        _QUICK["workdir"] = quick_root / "work"
    shutil.copytree(_QUICK["workdir"], tmp_path / "work")
    return tmp_path / "work"


def test_checkpointer_skips_damaged_steps_with_a_warning(tmp_path):
    messages = []
    ckpt = checkpoint.Checkpointer(tmp_path / "c", keep=3, log=messages.append)
    for step in (1, 2, 3):
        ckpt.save(step, {"x": np.full((1000,), step, np.float32)}, {"position": step})
    assert ckpt.latest().step == 3
    _corrupt_newest(tmp_path / "c")
    restored = ckpt.latest()
    assert restored.step == 2 and restored.meta["position"] == 2
    np.testing.assert_array_equal(restored.state["x"], np.full((1000,), 2, np.float32))
    assert any("checkpoint step 3" in m and "damaged" in m for m in messages)
    assert [p.name.split("-")[0] for p in (tmp_path / "c.damaged").iterdir()] == ["3"]
    assert ckpt.steps() == [1, 2]
    for step_dir in ("2", "1"):  # a step with files missing is skipped too
        for f in (tmp_path / "c" / step_dir / "state").rglob("*"):
            if f.is_file():
                f.unlink()
    assert ckpt.latest() is None
    ckpt.close()
    with pytest.raises(ValueError, match="keep=1"):
        checkpoint.Checkpointer(tmp_path / "d", keep=1)


def test_items_are_written_once_verified_and_deleted_when_no_kept_step_names_them(tmp_path):
    messages = []
    ckpt = checkpoint.Checkpointer(tmp_path / "c", keep=2, log=messages.append)
    model = lambda v: {"w": np.full((500,), v, np.float32)}  # noqa: E731
    crcs = {"a": ckpt.save_item("a", model(1.0))}
    ckpt.save(1, {"x": np.zeros(2)}, {"n": 1}, crcs)
    crcs["b"] = ckpt.save_item("b", model(2.0))
    ckpt.save(2, {"x": np.zeros(2)}, {"n": 2}, crcs)
    restored = ckpt.latest()
    assert restored.step == 2 and set(restored.items) == {"a", "b"}
    np.testing.assert_array_equal(restored.items["b"]["w"], model(2.0)["w"])
    # A damaged item makes its step unusable: the older step (naming only "a") is used.
    data_files = sorted((f for f in (tmp_path / "c" / "items" / "b").rglob("*") if f.is_file()),
                        key=lambda f: -f.stat().st_size)
    blob = bytearray(data_files[0].read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    data_files[0].write_bytes(bytes(blob))
    restored = ckpt.latest()
    assert restored.step == 1 and set(restored.items) == {"a"}
    assert any("checkpoint step 2" in m for m in messages)
    # Steps 3 and 4 name no item: once step 1 is dropped too, "a" and "b" are deleted.
    ckpt.save(3, {"x": np.zeros(2)}, {"n": 3})
    ckpt.wait()
    assert sorted(p.name for p in (tmp_path / "c" / "items").iterdir()) == ["a"]
    ckpt.save(4, {"x": np.zeros(2)}, {"n": 4})
    ckpt.wait()
    assert list((tmp_path / "c" / "items").iterdir()) == []
    ckpt.close()


def test_a_step_whose_item_folder_is_gone_is_skipped_for_the_older_one(tmp_path):
    messages = []
    ckpt = checkpoint.Checkpointer(tmp_path / "c", keep=3, log=messages.append)
    ckpt.save(1, {"x": np.zeros(2)}, {"n": 1})
    crcs = {"a": ckpt.save_item("a", {"w": np.ones(4, np.float32)})}
    ckpt.save(2, {"x": np.ones(2)}, {"n": 2}, crcs)
    ckpt.wait()
    shutil.rmtree(tmp_path / "c" / "items" / "a")
    restored = ckpt.latest()
    assert restored.step == 1 and restored.items == {}
    assert any("checkpoint step 2" in m and "damaged or incomplete" in m for m in messages)
    ckpt.close()


def _gate(monkeypatch, owner, name):
    """Makes ``owner.name`` block until the returned event is set (a slow disk)."""
    import threading

    gate, original = threading.Event(), getattr(owner, name)

    def gated(*args, **kwargs):
        assert gate.wait(timeout=60), "the test never opened the gate"
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, gated)
    return gate


def test_background_writes_return_at_once_keep_their_order_and_the_values_of_the_call(
        tmp_path, monkeypatch):
    ckpt = checkpoint.Checkpointer(tmp_path / "c", keep=2, log=quiet)
    gate = _gate(monkeypatch, ckpt._items, "save")  # the item write waits on the gate
    model = {"w": np.arange(1000, dtype=np.float32)}
    x = np.zeros(4, np.float32)
    crcs = {"a": ckpt.save_item("a", model)}
    ckpt.save(1, {"x": x}, {"n": 1}, crcs)  # returns with both writes still to do
    model["w"][:] = -1  # the caller goes on updating its arrays in place
    x[:] = 7
    assert not (tmp_path / "c" / "1").exists()  # the step waits behind its item
    gate.set()
    ckpt.wait()
    restored = ckpt.latest()
    assert restored.step == 1 and set(restored.items) == {"a"}
    np.testing.assert_array_equal(restored.items["a"]["w"], np.arange(1000, dtype=np.float32))
    np.testing.assert_array_equal(restored.state["x"], np.zeros(4, np.float32))
    ckpt.close()


def test_a_failed_background_write_is_raised_and_no_later_write_lands(tmp_path, monkeypatch):
    ckpt = checkpoint.Checkpointer(tmp_path / "c", keep=2, log=quiet)
    ckpt.save(1, {"x": np.zeros(2)}, {"n": 1})
    ckpt.wait()

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt._items, "save", full_disk)
    crcs = {"a": ckpt.save_item("a", {"w": np.ones(4, np.float32)})}
    ckpt.save(2, {"x": np.ones(2)}, {"n": 2}, crcs)  # names the item that failed
    with pytest.raises(OSError, match="No space left"):
        ckpt.wait()
    assert ckpt.steps() == [1]  # step 2 was never written without its item
    with pytest.raises(RuntimeError, match="skipped: an earlier one failed .*No space left"):
        ckpt.save(3, {"x": np.ones(2)}, {"n": 3})  # every later save says so
    assert ckpt.latest().step == 1
    ckpt.close()  # the failure was raised once: closing does not raise it again


def test_a_checkpoint_of_another_format_is_refused_not_discarded(finished_quick_run, tmp_path,
                                                                 monkeypatch):
    config = _quick_config()
    monkeypatch.setattr(checkpoint, "FORMAT_VERSION", checkpoint.FORMAT_VERSION + 1)
    with pytest.raises(errors.CheckpointFormatError, match="has format 2 but this atm_jax reads format 3"):
        runner.run_experiment(config, tmp_path / "work", log=quiet)
    assert not (tmp_path / "work" / "checkpoints.damaged").exists()


def test_config_mismatch_refuses_unless_forced(finished_quick_run):
    workdir = finished_quick_run
    changed = _quick_config()
    with changed.unlocked():
        changed.optimizer.learning_rate = 0.002
        changed.budget = 4
        changed.methods.atm.iterations = 4
    with pytest.raises(errors.ConfigError) as info:
        runner.run_experiment(changed, workdir, log=quiet)
    message = str(info.value)
    assert "optimizer.learning_rate: 0.001 -> 0.002" in message
    assert "budget: 2 -> 4" in message and "methods.atm.iterations: 2 -> 4" in message
    assert "--config.resume=force" in message
    # Fields that cannot change the numbers do not count.
    same = _quick_config()
    with same.unlocked():
        same.progress = True
    runner.run_experiment(same, workdir, log=quiet)
    with changed.unlocked():
        changed.resume = "force"
    lines = []
    runner.run_experiment(changed, workdir, log=lines.append)
    assert any(line.startswith("resuming from checkpoint") for line in lines)


def test_fields_added_since_a_workdir_was_written_count_only_when_not_at_their_default():
    from atm_jax import schema, workdir as workdir_lib

    current = json.loads(_quick_config().to_json())
    older = json.loads(_quick_config().to_json())
    for name in ("eval_every", "precision", "remat"):  # as a workdir of an older release
        del older[name]
    del older["mesh"]["params"]
    defaults = schema.field_defaults("mini")
    assert workdir_lib.config_differences(older, current, defaults=defaults) == []
    current["eval_every"] = 2
    current["mesh"]["params"] = "fsdp"
    assert workdir_lib.config_differences(older, current, defaults=defaults) == [
        "eval_every: '<absent>' -> 2", "mesh.params: '<absent>' -> 'fsdp'"]
    # Without the defaults every absent field is a difference, as before.
    assert len(workdir_lib.config_differences(older, json.loads(_quick_config().to_json()))) == 4


def test_a_workdir_from_before_a_field_existed_resumes(finished_quick_run):
    workdir = finished_quick_run
    config = _quick_config()
    first = (workdir / "metrics.jsonl").read_text()
    older = json.loads((workdir / "config.json").read_text())
    del older["eval_every"]
    (workdir / "config.json").write_text(json.dumps(older))
    lines = []
    runner.run_experiment(config, workdir, log=lines.append)  # finished: resumes, redoes nothing
    assert any(line.startswith("resuming from checkpoint") for line in lines)
    assert (workdir / "metrics.jsonl").read_text() == first
    with config.unlocked():
        config.eval_every = 2
    (workdir / "config.json").write_text(json.dumps(older))
    with pytest.raises(errors.ConfigError, match="eval_every: 1 -> 2"):  # the checkpoint's copy
        runner.run_experiment(config, workdir, log=quiet)


def test_results_of_another_config_without_checkpoints_are_not_overwritten(fake_cache, tmp_path):
    workdir = tmp_path / "work"
    workdir.mkdir()
    other = json.loads(_quick_config().to_json())
    other["budget"] = 6
    (workdir / "config.json").write_text(json.dumps(other))
    (workdir / "results.md").write_text("another run's table")
    with pytest.raises(errors.ConfigError, match="budget: 6 -> 2"):
        runner.run_experiment(_quick_config(), workdir, log=quiet)
    assert (workdir / "results.md").read_text() == "another run's table"


def test_divergence_names_task_iteration_and_step_and_keeps_the_last_checkpoint(fake_cache, tmp_path):
    config = _quick_config()
    with config.unlocked():
        config.optimizer.learning_rate = 1e38  # overflows to inf within a step or two
        config.optimizer.grad_clip = None
    workdir = tmp_path / "work"
    with pytest.raises(FloatingPointError) as info:
        runner.run_experiment(config, workdir, log=quiet)
    message = str(info.value)
    assert "atm: task 'mnist', iteration 1" in message
    assert "non-finite loss" in message and "step" in message
    latest = checkpoint.Checkpointer(workdir / "checkpoints", log=quiet).latest()
    assert latest is not None and latest.meta["position"]["unit"] == "atm"
    assert latest.meta["position"]["iteration"] == 0  # the evaluated start, before the failure


def test_main_reports_divergence_and_exits_3(fake_cache, tmp_path, capsys):
    from absl import flags

    from atm_jax import main

    flags.FLAGS.unparse_flags()
    try:
        flags.FLAGS(["atm_jax.main", f"--config={ROOT / 'configs' / 'mini.py'}:tiny",
                     f"--workdir={tmp_path / 'work'}"])
        config = flags.FLAGS["config"].value
        with config.unlocked():
            for key, value in _quick_config().items():
                config[key] = value
            config.optimizer.learning_rate = 1e38
            config.optimizer.grad_clip = None
        with pytest.raises(SystemExit) as info:
            main.main(["atm_jax.main"])
    finally:
        flags.FLAGS.unparse_flags()
    assert info.value.code == 3
    err = capsys.readouterr().err
    assert "training diverged: atm: task 'mnist', iteration 1" in err
    assert "--config.resume=force" in err and "checkpoints is kept" in err


def test_main_reports_an_unwritable_workdir_and_exits_2(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "atm_jax.main", f"--config={ROOT / 'configs' / 'mini.py'}:tiny",
           f"--workdir={tmp_path / 'file' / 'work'}"]
    (tmp_path / "file").write_text("a file, not a folder")
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode == 2
    assert "is not writable" in run.stderr and "--workdir" in run.stderr


def test_unwritable_workdir_fails_before_any_data(fake_cache, tmp_path, monkeypatch):
    monkeypatch.setattr("atm_jax.data.load_task", _forbidden)
    (tmp_path / "file").write_text("")
    with pytest.raises(errors.ConfigError, match="is not writable"):
        runner.run_experiment(_quick_config(), tmp_path / "file" / "work", log=quiet)


def _forbidden(*args, **kwargs):
    raise AssertionError("work started although the run could not be saved")


def test_full_disk_fails_before_training(fake_cache, tmp_path, monkeypatch):
    from atm_jax.finetune import Finetuner

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage._replace(free=1000))
    monkeypatch.setattr(Finetuner, "finetune", _forbidden)
    with pytest.raises(errors.ConfigError, match=r"GiB free but the checkpoints need"):
        runner.run_experiment(_quick_config(), tmp_path / "work", log=quiet)


@pytest.mark.parametrize("edit,message", [
    (lambda c: c.__setitem__("budgett", 3), r"config.budgett is not a known field"),
    (lambda c: c.optimizer.__setitem__("lr", 1e-3), r"config.optimizer.lr is not a known field"),
    (lambda c: c.methods.atm.__setitem__("iters", 3), r"config.methods.atm.iters is not a known"),
    (lambda c: setattr(c, "resume", "maybe"), r"config.resume='maybe' must be one of"),
    (lambda c: setattr(c.checkpoint, "keep", 1), r"config.checkpoint.keep=1 must be at least 2"),
    (lambda c: setattr(c, "seed", -1), r"config.seed=-1 must be an integer >= 0"),
    (lambda c: setattr(c.optimizer, "batch_size", 64), r"batch_size=64 is larger than config.data.train_size=32"),
    (lambda c: setattr(c.optimizer, "batch_size", 0), r"batch_size=0"),
    (lambda c: setattr(c, "budget", -2), r"config.budget=-2 must be a positive integer"),
    (lambda c: setattr(c, "eval_batch_size", 0), r"config.eval_batch_size=0"),
    (lambda c: setattr(c, "eval_every", 0), r"config.eval_every=0 must be a positive integer"),
    (lambda c: setattr(c.methods.atm, "alpha", 0.0), r"alpha=0.0 must be a positive number"),
    (lambda c: setattr(c.methods.atm, "iterations", -1), r"config.methods.atm.iterations=-1"),
    (lambda c: setattr(c.methods.atm, "merge", "average"), r"Unknown merge 'average'"),
    (lambda c: setattr(c.methods.atm, "kind", "atm2"), r"config.methods.atm.kind='atm2'"),
    (lambda c: setattr(c, "tasks", ("mnist", "svhn")), r"unknown task 'svhn'"),
])
def test_every_bad_value_is_named_before_any_work(edit, message, tmp_path, monkeypatch):
    config = _quick_config()
    with config.unlocked():
        edit(config)
    monkeypatch.setattr("atm_jax.data.load_task", _forbidden)
    with pytest.raises(errors.ConfigError, match=message):
        runner.run_experiment(config, tmp_path / "work", log=quiet)
    assert not (tmp_path / "work").exists()


@pytest.mark.parametrize("override,message", [
    ("--config.seed=1.5", "invalid literal for int"),
    ("--config.budget=ten", "invalid literal for int"),
    ("--config.progress=yes", "Non-boolean argument"),
    ("--config.optimizer.learning_rate=fast", "could not convert string to float"),
])
def test_wrong_types_on_the_command_line_are_refused_by_the_locked_config(override, message, tmp_path):
    cmd = [sys.executable, "-m", "atm_jax.main", f"--config={ROOT / 'configs' / 'mini.py'}",
           f"--workdir={tmp_path / 'work'}", override]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode != 0
    assert f"flag {override}: " in run.stderr and message in run.stderr
    assert not (tmp_path / "work").exists()
