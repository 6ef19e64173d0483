"""Fixtures shared by the test modules, and 8 fake CPU devices for the whole session.

XLA reads ``--xla_force_host_platform_device_count`` once, when JAX starts its CPU
backend, so it is set here and the backend started before any test module runs;
the user's own ``XLA_FLAGS`` are kept (a count they set wins) and restored right
after, so subprocesses the tests start see what the user set (one CPU device by
default; a test that wants fake devices there adds the count to XLA_FLAGS itself),
plus the tests' own `TEST_XLA_FLAGS`.

Code not given a mesh runs on device 0 alone. Configs built in the tests default to
``config.mesh.data = 1`` (`one_device_default_mesh`): the real default (−1, every
device) would put every runner test on an 8-way mesh of 2 shared cores, several
times slower (measured: see benchmarks/results/comments_moved_20261202.md). Tests of
the mesh set ``config.mesh`` themselves.
"""

import atexit
import os
import pathlib
import shutil
import tempfile

FAKE_DEVICES = 8

# One persistent XLA cache for the whole session: both xdist workers and every
# subprocess a test starts (the controller sets it before the workers fork, so they
# inherit it) compile the same tiny programs, and only the first pays for XLA
# (measured: see benchmarks/results/comments_moved_20261202.md). A cache the user set wins.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _XLA_CACHE = tempfile.mkdtemp(prefix="atm_jax_tests_xla_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _XLA_CACHE
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    atexit.register(shutil.rmtree, _XLA_CACHE, True)
# Likewise one folder of pretrained tiny bases for the session (`shared_bases`).
if "ATM_JAX_TEST_BASES" not in os.environ:
    _BASES = tempfile.mkdtemp(prefix="atm_jax_tests_bases_")
    os.environ["ATM_JAX_TEST_BASES"] = _BASES
    atexit.register(shutil.rmtree, _BASES, True)
# The tests' programs are tiny, so the suite's time is XLA compilation, most of it in
# LLVM's code generation: the tests (and the subprocesses they start) compile with
# LLVM's optimizations off. The HLO passes, and so the numerics, are those of a user's
# run; only the machine code is less tuned, and every test passed both ways (measured:
# see benchmarks/results/comments_moved_20261202.md). An optimization level the user
# set wins.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + TEST_XLA_FLAGS).strip()
_USER_XLA_FLAGS = os.environ["XLA_FLAGS"]
if "xla_force_host_platform_device_count" not in _USER_XLA_FLAGS:
    os.environ["XLA_FLAGS"] = (_USER_XLA_FLAGS + " --xla_force_host_platform_"
                               f"device_count={FAKE_DEVICES}").strip()
    import jax

    jax.devices()  # starts the CPU backend with the flag
    os.environ["XLA_FLAGS"] = _USER_XLA_FLAGS

import pytest  # noqa: E402

from atm_jax.data import sources  # noqa: E402

import fakes  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def one_device_default_mesh():
    """Configs from `atm_jax.recipes` get ``mesh.data = 1`` in the tests (see above)."""
    from atm_jax import recipes

    original = recipes.mesh

    def mesh():
        config = original()
        config.data = 1
        return config

    recipes.mesh = mesh
    yield
    recipes.mesh = original


@pytest.fixture(scope="session")
def shared_bases():
    """One folder of pretrained tiny bases for the whole session, shared by both xdist
    workers and the subprocess tests (test_resume, test_multihost link it into their
    caches): a base is keyed by the SHA-256 of its config and written atomically, so
    every test asking for the same tiny base trains it once, or twice when two
    workers race (test_pretrain checks training and caching on their own caches)."""
    return pathlib.Path(os.environ["ATM_JAX_TEST_BASES"])


@pytest.fixture
def fake_cache(tmp_path, monkeypatch, shared_bases):
    """An offline cache in tmp_path holding the fake mini-suite sources."""
    monkeypatch.setenv(sources.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(sources.OFFLINE_ENV, "1")
    monkeypatch.setattr(sources, "SOURCES", dict(sources.SOURCES))
    sources._MEMO.clear()
    fakes.install_fake_suite()
    (tmp_path / "cache").mkdir(exist_ok=True)
    (tmp_path / "cache" / "bases").symlink_to(shared_bases, target_is_directory=True)
    yield tmp_path
    sources._MEMO.clear()


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory):
    """A GCS-protocol server on 127.0.0.1 for the session (tests/gcs_emulator.py:
    fake-gcs-server on a free port, behind a gate that can refuse writes), stopped
    at the end; started only when a test asks for it."""
    import gcs_emulator as gcs_emulator_lib

    server = gcs_emulator_lib.Emulator(tmp_path_factory.mktemp("gcs") / "server.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def gcs_bucket(gcs_emulator, monkeypatch):
    """A new empty bucket on the emulator, as ``"gs://<name>"``; for this test the
    environment (and so every subprocess it starts) points gcsfs / epath and
    tensorstore at the emulator (`gcs_emulator.Emulator.env`)."""
    import uuid

    for name, value in gcs_emulator.env().items():
        monkeypatch.setenv(name, value)
    yield gcs_emulator.create_bucket(f"atm-test-{uuid.uuid4().hex[:12]}")
    gcs_emulator.refuse_writes(None)


# The heaviest files first (by worker time in a clean-clone run; measured: see
# benchmarks/results/suite_time_20261203.md). xdist's loadfile scheduler hands out whole
# files in the order of the work queue, so starting the long ones first lets both workers
# finish together instead of one idling while the other runs a late long file. By
# default pytest-xdist (3.8 here) sorts that queue by the number of tests in each file,
# which put the 14 long tests of test_multihost.py last: `pytest_configure` turns that
# sort off, so the queue keeps this order.
SLOW_FIRST = ("test_resume.py", "test_multihost.py", "test_runner.py", "test_configs.py",
              "test_analysis.py", "test_merge.py", "test_finetune.py", "test_hf_models.py",
              "test_sharding.py", "test_merge_data_free.py", "test_docs.py", "test_atm.py")


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist's --loadscope-reorder
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable within a file
