"""Runs a tiny experiment on fake data and SIGKILLs itself at a chosen point.

Used by tests/test_resume.py in a subprocess::

  python tests/fault_driver.py WORKDIR CALLS_LOG [FAULT]      # WORKDIR: a folder or gs://…

FAULT is ``<point>:<n>``: die at the n-th (1-based) occurrence of ``point``:

  step         inside a finetune, before its n-th train step runs (mid-finetune)
  merge        inside merge_step, after merging, before the new base is used (mid-merge)
  save         inside a checkpoint save, after orbax opened its temporary folder (mid-save)
  saved        right after the n-th checkpoint step is on disk (the run waits for it)
  metrics      right after the n-th metrics record reached metrics.jsonl, before its checkpoint
  eval         inside the n-th accuracy evaluation
  params       while the n-th final-params file is being written
  results      while results.md / plots are being written, after the last checkpoint

The kill is a real SIGKILL of this process: no cleanup handler runs. The fake data
lives in ``$ATM_JAX_CACHE``; finetune calls are appended to CALLS_LOG as
``start <id>`` / ``end <id>`` lines (id = the task's PRNG key and data size).
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import signal
import sys

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import fakes  # noqa: E402
from atm_jax import atm, checkpoint, evaluate, pretrain, runner, writers  # noqa: E402
from atm_jax.data import sources  # noqa: E402
from atm_jax.finetune import Finetuner  # noqa: E402


def tiny_config():
    import importlib.util

    spec = importlib.util.spec_from_file_location("mini_config", HERE.parent / "configs" / "mini.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("tiny")
    with config.unlocked():
        config.tasks = ("mnist", "fashion_mnist")
        config.data.train_size, config.data.validation_size, config.data.test_size = 32, 8, 16
        config.optimizer.batch_size = 8
        config.pretrain.num_images, config.pretrain.batch_size, config.pretrain.held_out = 128, 32, 32
        # Rows run in table order (schema.DISPLAY_ORDER): mean (named task_arithmetic
        # by earlier releases), ties, dare, then ATM.
        config.methods = {"mean": config.methods.mean, "ties": config.methods.ties,
                          "dare": config.methods.dare, "atm": config.methods.atm}
        config.checkpoint.keep = 2
    return config


def die():
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def install_fault(point: str, n: int) -> None:
    count = {"n": 0}

    def hit():
        count["n"] += 1
        if count["n"] == n:
            die()

    def wrap(owner, name, before=False):
        original = getattr(owner, name)

        def wrapped(*args, **kwargs):
            if before:
                hit()
            out = original(*args, **kwargs)
            if not before:
                hit()
            return out

        setattr(owner, name, wrapped)

    if point == "step":
        original_init = Finetuner.__init__

        def init(self, *args, **kwargs):
            original_init(self, *args, **kwargs)
            step = self.train_step

            def train_step(state, batch):
                hit()
                return step(state, batch)

            self.train_step = train_step

        Finetuner.__init__ = init
    elif point == "merge":
        wrap(atm, "merge_step")
    elif point == "save":
        from orbax.checkpoint import handlers

        wrap(handlers.JsonCheckpointHandler, "async_save", before=True)
    elif point == "item":  # inside an item's write: orbax's temporary folder exists
        from orbax.checkpoint import handlers

        original = handlers.StandardCheckpointHandler.async_save

        def async_save(self, directory, *args, **kwargs):
            if "items" in str(directory):
                hit()
            return original(self, directory, *args, **kwargs)

        handlers.StandardCheckpointHandler.async_save = async_save
    elif point == "saved":  # the n-th step on disk; the run does not go on before it
        save = checkpoint.Checkpointer.save

        def saved(self, *args, **kwargs):
            save(self, *args, **kwargs)
            self.wait()
            hit()

        checkpoint.Checkpointer.save = saved
    elif point == "metrics":
        wrap(writers.MetricsWriter, "__call__")
    elif point == "eval":
        wrap(evaluate, "accuracy", before=True)
    elif point == "params":
        wrap(writers, "write_bytes", before=True)
    elif point == "results":
        wrap(writers, "plot_results", before=True)
    else:
        raise SystemExit(f"unknown fault point {point!r}")


def log_finetune_calls(path: pathlib.Path) -> None:
    original = Finetuner.finetune

    def finetune(self, backbone, head, inputs, labels, *, epochs, key, **kwargs):
        inputs = np.asarray(inputs)
        if inputs.ndim == 2:  # the linear probe's precomputed features: not a finetune
            return original(self, backbone, head, inputs, labels, epochs=epochs, key=key, **kwargs)
        ident = hashlib.sha1(np.asarray(jax.random.key_data(key)).tobytes()
                             + inputs.tobytes()).hexdigest()[:12] + f"-{len(inputs)}x{epochs}"
        with open(path, "a") as f:
            f.write(f"start {ident}\n")
        out = original(self, backbone, head, inputs, labels, epochs=epochs, key=key, **kwargs)
        with open(path, "a") as f:
            f.write(f"end {ident}\n")
        return out

    Finetuner.finetune = finetune


def main(argv):
    workdir, calls = argv[1], pathlib.Path(argv[2])  # the workdir may be gs://…
    sources.SOURCES = dict(sources.SOURCES)
    fakes.install_fake_suite()
    config = tiny_config()
    # The base is pretrained (or read from the cache) before calls are counted and
    # faults armed: pretraining is the cache's business, not the run's.
    pretrain.pretrained_base(config.model, config.pretrain, log=lambda *_: None)
    log_finetune_calls(calls)
    if len(argv) > 3:
        point, n = argv[3].split(":")
        install_fault(point, int(n))
    runner.run_experiment(config, workdir)


if __name__ == "__main__":
    main(sys.argv)
