"""``python -m atm_jax.main`` on the fake mini-suite data, with test hooks.

Used by tests/test_multihost.py, one subprocess per JAX process::

  python tests/multihost_driver.py --config=configs/mini.py:tiny --workdir=W [main's flags]

Every argument goes to ``atm_jax.main`` unchanged. Before it runs, the fake sources
(tests/fakes.py) are installed, as tests/fault_driver.py does, and two hooks read
the environment:

* ``MULTIHOST_LOADS=<folder>``: every task load (``atm_jax.data.load_task``) and
  every source read (``sources.load_source``) appends ``task <name>`` / ``source
  <name>`` to ``<folder>/loads.<process index>``: the PA-ATM data-isolation count.
* ``MULTIHOST_WRITES=<folder>``: a ``sys.addaudithook`` appends every write-mode
  ``open``, ``os.rename``/``os.replace``, ``os.mkdir``, ``os.remove`` and
  ``shutil.rmtree`` under ``--workdir`` to ``<folder>/writes.<process index>``
  (Python-level file operations; orbax's tensorstore writes happen in C++).
* ``MULTIHOST_SMALL=1``: the run keeps 3 tasks, the pretrained reference and ATM
  (2 iterations × 1 epoch; the config is pruned just before
  ``runner.run_experiment``), to fit the test budget.
* ``MULTIHOST_KILL=<process>:<n>``: that process SIGKILLs itself before its n-th
  finetune train step (a preempted host).
"""

from __future__ import annotations

import os
import pathlib
import signal
import sys

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import fakes  # noqa: E402
from atm_jax import data  # noqa: E402
from atm_jax.data import sources  # noqa: E402


def log_loads(folder: str) -> None:
    import jax

    def record(kind, name):
        with open(os.path.join(folder, f"loads.{jax.process_index()}"), "a") as f:
            f.write(f"{kind} {name}\n")

    load_task, load_source = data.load_task, sources.load_source

    def logged_task(name, *args, **kwargs):
        record("task", name)
        return load_task(name, *args, **kwargs)

    def logged_source(name, *args, **kwargs):
        record("source", name)
        return load_source(name, *args, **kwargs)

    data.load_task = logged_task
    sources.load_source = logged_source


def kill_at_step(process: int, n: int) -> None:
    import jax

    from atm_jax.finetune import Finetuner

    count = {"n": 0}
    original_init = Finetuner.__init__

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        step = self.train_step

        def train_step(state, batch):
            if jax.process_index() == process:
                count["n"] += 1
                if count["n"] == n:
                    print(f"multihost_driver: process {process} SIGKILLs itself at train "
                          f"step {n}", flush=True)
                    os.kill(os.getpid(), signal.SIGKILL)
            return step(state, batch)

        self.train_step = train_step

    Finetuner.__init__ = init


def install_fakes() -> None:
    """Registers the fake sources; writes their files only when missing, so processes
    started together do not rewrite files another one is reading."""
    install = fakes.install

    def install_once(name, blobs, *, write=True):
        folder = sources.raw_dir(name)
        install(name, blobs, write=write and not all((folder / f).exists() for f in blobs))

    fakes.install = install_once
    sources.SOURCES = dict(sources.SOURCES)
    fakes.install_fake_suite()


def audit_writes(folder: str) -> None:
    import jax

    workdir = next(os.path.abspath(a.split("=", 1)[1]) for a in sys.argv
                   if a.startswith("--workdir="))
    busy = [False]

    def hook(event, args):
        if busy[0] or event not in ("open", "os.rename", "os.replace", "os.mkdir", "os.remove",
                                    "os.unlink", "shutil.rmtree"):
            return
        if event == "open":
            path, mode, flags = args
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or \
                (mode is None and isinstance(flags, int)
                 and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
            if not writing:
                return
        else:
            path = args[0]
        if not isinstance(path, (str, bytes, os.PathLike)):
            return
        path = os.path.abspath(os.fsdecode(path))
        if not path.startswith(workdir + os.sep):
            return
        busy[0] = True
        try:
            with open(os.path.join(folder, f"writes.{jax.process_index()}"), "a") as f:
                f.write(f"{event} {os.path.relpath(path, workdir)}\n")
        finally:
            busy[0] = False

    sys.addaudithook(hook)


def prune_config() -> None:
    from atm_jax import runner

    run_experiment = runner.run_experiment

    def pruned(config, workdir, **kwargs):
        with config.unlocked():
            config.tasks = ("mnist", "fashion_mnist", "digits")
            config.references = ("pretrained",)
            config.methods = {"atm": config.methods.atm}
        return run_experiment(config, workdir, **kwargs)

    runner.run_experiment = pruned


def main() -> None:
    install_fakes()
    if os.environ.get("MULTIHOST_SMALL"):
        prune_config()
    if os.environ.get("MULTIHOST_WRITES"):
        audit_writes(os.environ["MULTIHOST_WRITES"])
    if os.environ.get("MULTIHOST_LOADS"):
        log_loads(os.environ["MULTIHOST_LOADS"])
    if os.environ.get("MULTIHOST_KILL"):
        process, n = os.environ["MULTIHOST_KILL"].split(":")
        kill_at_step(int(process), int(n))
    from absl import app

    from atm_jax import main as main_lib

    app.run(main_lib.main)


if __name__ == "__main__":
    main()
