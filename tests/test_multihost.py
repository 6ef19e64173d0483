"""Multi-host runs on this machine: two local JAX processes joined by ``jax.distributed``
on 127.0.0.1 (gloo CPU collectives), each with 2 fake CPU devices, through
``atm_jax.main`` (tests/multihost_driver.py adds the fake data and the test hooks).

The reference is one process with the same global device count (4). Checked:
the two-process run equals it bitwise and only process 0 writes files; PA-ATM
(``task_ownership="per_process"``) equals it too and no process loads another's
task; a SIGKILLed process makes the other exit with JAX's message within the
heartbeat timeout, and a restart of both resumes to the uninterrupted result.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
DRIVER = HERE / "multihost_driver.py"
OUTPUTS = ("metrics.jsonl", "params/atm.msgpack")
TIMEOUT = 240  # seconds for one run of both processes (a hang fails, not blocks)
HEARTBEAT = 10
# The run whose process 1 is SIGKILLed: process 0 waits this long for the missing
# heartbeats before JAX ends it (most of that run's wall time with 10 s). Heartbeats come
# from a C++ thread, not held up by the GIL or a compile.
KILL_HEARTBEAT = 4
# configs/mini.py:tiny shrunk to the fake sources (as tests/test_runner.py does).
SHRINK = ["--config.data.train_size=48", "--config.data.validation_size=8",
          "--config.data.test_size=16", "--config.optimizer.batch_size=8",
          "--config.pretrain.num_images=256", "--config.pretrain.batch_size=32",
          "--config.pretrain.held_out=64"]


def _env(cache: pathlib.Path, devices: int, **extra) -> dict:
    return dict(os.environ, ATM_JAX_CACHE=str(cache), ATM_JAX_OFFLINE="1", JAX_PLATFORMS="cpu",
                XLA_FLAGS=(os.environ.get("XLA_FLAGS", "")  # conftest's TEST_XLA_FLAGS
                           + f" --xla_force_host_platform_device_count={devices}").strip(),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", MULTIHOST_SMALL="1",
                PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **extra)


def _command(workdir: pathlib.Path, *flags: str) -> list[str]:
    return [sys.executable, str(DRIVER), f"--config={ROOT / 'configs' / 'mini.py'}:tiny",
            f"--workdir={workdir}", *SHRINK, *flags]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(cache, workdir, *flags, processes: int = 2, heartbeat: int = HEARTBEAT,
                  logs: pathlib.Path | None = None, **extra):
    """Starts ``processes`` JAX processes of one run; returns [(returncode, log)] in
    process order. Each runs in its own process group, killed whatever happens. The
    logs go beside a local ``workdir``, else into the folder ``logs``."""
    port = _free_port()
    folder, name = (logs, "run") if logs is not None else (workdir.parent, workdir.name)
    logs = [folder / f"{name}.p{i}.log" for i in range(processes)]
    running = []
    try:
        for i in range(processes):
            with open(logs[i], "w") as out:
                running.append(subprocess.Popen(
                    _command(workdir, f"--coordinator_address=127.0.0.1:{port}",
                             f"--num_processes={processes}", f"--process_id={i}",
                             f"--heartbeat_timeout_seconds={heartbeat}",
                             "--initialization_timeout_seconds=60", *flags),
                    env=_env(cache, 2, **extra), cwd=ROOT, stdout=out,
                    stderr=subprocess.STDOUT, start_new_session=True))
        deadline = time.monotonic() + TIMEOUT
        for p in running:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
        return [(p.returncode, log.read_text()) for p, log in zip(running, logs)]
    finally:
        for p in running:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def _results(workdir):
    out = json.loads((workdir / "results.json").read_text())
    for noisy in ("timings_seconds", "total_seconds", "notes"):  # wall times
        out.pop(noisy)
    out["base"].pop("from_cache")  # the reference run pretrained it
    return out


def _same_outputs(a: pathlib.Path, b: pathlib.Path) -> None:
    for name in OUTPUTS:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert _results(a) == _results(b)


def _close_outputs(a: pathlib.Path, b: pathlib.Path) -> None:
    """Equal up to float reduction order (a cross-process all-reduce sums the data
    shards in another order): measured max |Δparam| 4.1e-4 after ATM's 2 iterations,
    task-vector norms within 5e-5 relative, every accuracy equal (2026-11-30, this
    machine)."""
    import flax.serialization
    import numpy as np

    for name in OUTPUTS[1:]:
        pa, pb = (flax.serialization.msgpack_restore((w / name).read_bytes()) for w in (a, b))
        assert list(pa) == list(pb)
        for x, y in zip(_leaves(pa), _leaves(pb)):
            np.testing.assert_allclose(x, y, rtol=0, atol=2e-3, err_msg=name)
    la, lb = ([json.loads(line) for line in (w / "metrics.jsonl").read_text().splitlines()]
              for w in (a, b))
    assert [(r["method"], r["iteration"], r["task"]) for r in la] == \
        [(r["method"], r["iteration"], r["task"]) for r in lb]
    for ra, rb in zip(la, lb):
        assert ra["accuracy"] == rb["accuracy"], ra  # 16 test examples: no flip measured
        if "task_vector_norm" in ra:
            assert ra["task_vector_norm"] == pytest.approx(rb["task_vector_norm"], rel=5e-4)


def _leaves(tree):
    if isinstance(tree, dict):
        return [x for k in sorted(tree) for x in _leaves(tree[k])]
    return [tree]


@pytest.fixture(scope="module")
def cache(tmp_path_factory, shared_bases):
    cache = tmp_path_factory.mktemp("cache")
    (cache / "bases").symlink_to(shared_bases, target_is_directory=True)
    return cache


def _one_process(cache, workdir, devices):
    done = subprocess.run(_command(workdir), env=_env(cache, devices), cwd=ROOT,
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert f"process 0/1: {devices} local of {devices} global cpu device(s)" in done.stdout
    return workdir


@pytest.fixture(scope="module")
def reference(cache, tmp_path_factory):
    """One process with 4 fake devices (the two processes' global count); also fills
    the cache (fake sources, the pretrained base)."""
    return _one_process(cache, tmp_path_factory.mktemp("reference") / "work", 4)


@pytest.fixture(scope="module")
def two_processes(cache, reference, tmp_path_factory):
    """An uninterrupted two-process run, every write of each process audited."""
    root = tmp_path_factory.mktemp("two")
    (root / "audit").mkdir()
    logs = run_processes(cache, root / "work", MULTIHOST_WRITES=str(root / "audit"))
    return root, logs


def test_two_processes_equal_one_and_only_process_0_writes(reference, two_processes):
    root, ((rc0, log0), (rc1, log1)) = two_processes
    assert (rc0, rc1) == (0, 0), log0[-3000:] + log1[-3000:]
    # One start line per process: id, local and global devices, the mesh.
    assert "process 0/2: 2 local of 4 global cpu device(s); mesh task=1 x data=4" in log0
    assert "process 1/2: 2 local of 4 global cpu device(s); mesh task=1 x data=4" in log1
    _close_outputs(root / "work", reference)
    audit = root / "audit"
    written0 = (audit / "writes.0").read_text().splitlines()
    for name in ("results.json", "results.md", "metrics.jsonl", "config.json", "atm.msgpack",
                 "accuracy_vs_iteration.png"):
        assert any(name in line for line in written0), name
    # Process 1 wrote nothing of ours: only its probe of writability and orbax's own
    # per-process array metadata inside a checkpoint's temporary folder.
    written1 = (audit / "writes.1").read_text().splitlines() \
        if (audit / "writes.1").exists() else []
    orbax = re.compile(r"^(open|os\.remove) checkpoints/.*\.orbax-checkpoint-tmp/"
                       r".*array_metadatas/process_1$")
    assert [w for w in written1 if ".write_test_" not in w and not orbax.match(w)] == []


def test_pa_atm_equals_one_process_and_keeps_each_task_on_its_process(cache, reference, tmp_path):
    """PA-ATM: each process finetunes its tasks alone on its 2 local devices, so the
    run equals, bitwise, one process with 2 devices."""
    loads = tmp_path / "loads"
    loads.mkdir()
    workdir = tmp_path / "work"
    (rc0, log0), (rc1, log1) = run_processes(cache, workdir, "--config.task_ownership=per_process",
                                             MULTIHOST_LOADS=str(loads))
    assert (rc0, rc1) == (0, 0), log0[-3000:] + log1[-3000:]
    assert "mesh task=1 x data=2 over this process's devices (PA-ATM)" in log1
    _same_outputs(workdir, _one_process(cache, tmp_path / "local", 2))
    # Round robin over (mnist, fashion_mnist, digits): process 0 owns tasks 0 and 2.
    opened = {p: sorted(set((loads / f"loads.{p}").read_text().splitlines())) for p in (0, 1)}
    assert opened[0] == ["source digits", "source mnist", "task digits", "task mnist"]
    assert opened[1] == ["source fashion_mnist", "task fashion_mnist"]


def test_sigkill_one_process_the_other_exits_then_both_resume_bitwise(cache, two_processes,
                                                                      tmp_path):
    workdir = tmp_path / "work"
    start = time.monotonic()
    # ATM: 6 train steps per task and iteration; step 22 = iteration 2, first task.
    (rc0, log0), (rc1, log1) = run_processes(cache, workdir, heartbeat=KILL_HEARTBEAT,
                                             MULTIHOST_KILL="1:22")
    assert rc1 == -signal.SIGKILL, log1[-3000:]
    assert "SIGKILLs itself at train step 22" in log1
    assert rc0 != 0, log0[-3000:]  # not a hang: run_processes would have timed out
    assert "Terminating process because the JAX distributed service detected fatal errors" in log0
    assert "Task 1 heartbeat timeout" in log0 or "stopped sending heartbeats" in log0
    assert time.monotonic() - start < TIMEOUT
    assert not (workdir / "results.json").exists()
    (rc0, log0), (rc1, log1) = run_processes(cache, workdir)
    assert (rc0, rc1) == (0, 0), log0[-3000:] + log1[-3000:]
    assert "resuming from checkpoint step" in log0 and "resuming from checkpoint step" in log1
    _same_outputs(workdir, two_processes[0] / "work")


def test_two_processes_on_a_bucket_sigkill_one_then_both_resume_bitwise(
        cache, two_processes, gcs_bucket, gcs_emulator, tmp_path):
    """Both processes on one ``gs://`` workdir (the GCS-protocol server of
    tests/gcs_emulator.py): process 1 SIGKILLed mid-finetune, both restarted, the
    outputs are bitwise those of the uninterrupted local two-process run."""
    from etils import epath

    workdir = f"{gcs_bucket}/run"
    (rc0, log0), (rc1, log1) = run_processes(cache, workdir, heartbeat=KILL_HEARTBEAT,
                                             logs=tmp_path, MULTIHOST_KILL="1:22")
    assert rc1 == -signal.SIGKILL and rc0 != 0, log0[-3000:] + log1[-3000:]
    assert "SIGKILLs itself at train step 22" in log1
    written = gcs_emulator.objects(f"{workdir}/")
    assert any("/state/ocdbt.process_0/d/" in n for n in written)  # tensorstore's arrays
    assert "run/results.json" not in written
    (rc0, log0), (rc1, log1) = run_processes(cache, workdir, logs=tmp_path)
    assert (rc0, rc1) == (0, 0), log0[-3000:] + log1[-3000:]
    for log in (log0, log1):
        assert "resuming from checkpoint step" in log and f"in {workdir}/checkpoints" in log
    _same_outputs(epath.Path(workdir), two_processes[0] / "work")
    assert not (ROOT / "gs:").exists()  # the processes' working folder: nothing went there


# -- fast checks, no subprocess ----------------------------------------------------------

@pytest.mark.parametrize("kwargs,message", [
    ({"coordinator_address": "127.0.0.1:1234"}, "--coordinator_address given without "
     "--num_processes, --process_id: pass all three"),
    ({"num_processes": 2, "process_id": 0}, "--num_processes, --process_id given without "
     "--coordinator_address"),
    ({"coordinator_address": "h:1", "num_processes": 2, "process_id": 0, "auto": True},
     "do not also pass"),
    ({"coordinator_address": "h:1", "num_processes": 2, "process_id": 2},
     r"--process_id=2 must be in 0..1"),
    ({"coordinator_address": "h:1", "num_processes": 0, "process_id": 0},
     "--num_processes=0 must be a positive integer"),
    ({"coordinator_address": "localhost", "num_processes": 2, "process_id": 0},
     "must be HOST:PORT"),
    ({"auto": True, "heartbeat_timeout_seconds": 0}, "--heartbeat_timeout_seconds=0"),
])
def test_initialize_refuses_bad_flags_before_connecting(kwargs, message):
    from atm_jax import distributed, errors

    with pytest.raises(errors.ConfigError, match=message):
        distributed.initialize(**kwargs)


def test_no_flags_means_one_process_and_no_call():
    from atm_jax import distributed

    assert distributed.initialize() is False


def test_round_robin_placement():
    from atm_jax import distributed, errors

    tasks = ["a", "b", "c", "d", "e"]
    by_hand = {0: ["a", "c", "e"], 1: ["b", "d"]}
    for p in (0, 1):
        assert distributed.owned_tasks(tasks, "per_process", process=p, num_processes=2) \
            == by_hand[p]
    assert distributed.owned_tasks(tasks, "per_process", process=2, num_processes=3) == ["c"]
    assert distributed.owned_tasks(tasks, "all", process=1, num_processes=2) == tasks
    with pytest.raises(errors.ConfigError, match="task_ownership='some'"):
        distributed.owned_tasks(tasks, "some")


def test_pa_finetune_tasks_on_one_process_is_the_sequential_finetune():
    import jax
    import numpy as np

    from atm_jax import distributed

    calls = []

    def finetune(base, head, task, epochs, key):
        calls.append(task)
        shift = float(jax.random.uniform(key))
        return ({"w": base["w"] + shift}, {"k": head["k"] * 2}, {"loss": [shift] * epochs})

    base = {"w": np.arange(3.0, dtype=np.float32)}
    heads = {t: {"k": np.ones(2, np.float32) * i} for i, t in enumerate(["x", "y"])}
    keys = {t: jax.random.key(i) for i, t in enumerate(heads)}
    out = distributed.make_finetune_tasks(finetune, ["x", "y"])(base, heads, 2, keys)
    assert calls == ["x", "y"]
    for t in heads:
        expected = finetune(base, heads[t], t, 2, keys[t])
        np.testing.assert_array_equal(out[t][0]["w"], expected[0]["w"])
        np.testing.assert_array_equal(out[t][1]["k"], expected[1]["k"])
    with pytest.raises(ValueError, match=r"tasks \['z'\] outside"):
        distributed.make_finetune_tasks(finetune, ["x"])(base, {"z": heads["x"]}, 1, keys)


def test_metrics_and_accuracies_travel_as_exact_float64():
    import numpy as np

    from atm_jax import distributed

    row = np.array([0.1, 1 / 3, -0.0, np.pi])
    gathered = distributed.allgather_float64(row)
    assert gathered.shape == (1, 4)
    assert gathered.tobytes() == row.tobytes()  # bitwise, -0.0 included
    assert distributed.gather_accuracies(["a", "b"], {"a": 0.1, "b": 1 / 3}, {"a": 0, "b": 0}) \
        == {"a": 0.1, "b": 1 / 3}
