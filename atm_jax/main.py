"""Command line: ``python -m atm_jax.main --config=configs/mini.py --workdir=DIR``.

Flags only; the work is ``atm_jax.runner.run_experiment(config, workdir)``.
Override any config field with ``--config.FIELD=VALUE`` (e.g.
``--config.methods.atm.iterations=5``); the config is locked, so a misspelt field
is an error, not a silent no-op.

A run found in ``--workdir`` resumes from its newest checkpoint (see
``atm_jax.runner.run_experiment``). Every user-facing error (``atm_jax.errors``)
ends the program with its message on stderr and no traceback: exit status 3 for a
diverged finetune (the checkpoints stay in place), 2 for bad input (config values,
a workdir holding another config's run, a missing dataset, tokenizer or weights
file: the message names the command that fetches it).

Multi-host (README "Multi-host and launch/"): start the same command on every host
with ``--coordinator_address=HOST:PORT --num_processes=N --process_id=I`` (all three,
``I`` differing per process), or with ``--distributed`` where JAX finds the cluster
itself (TPU pods, SLURM). Every process prints one start line (process id, local and
global devices); only process 0 writes files. A process that dies makes the others
exit after ``--heartbeat_timeout_seconds`` with JAX's "distributed service detected
fatal errors" message (rerun every process to resume from the last checkpoint).
"""

import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (get_config).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for results, metrics and plots.")
flags.mark_flags_as_required(["config", "workdir"])
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "HOST:PORT of process 0 for jax.distributed.initialize "
    "(with --num_processes and --process_id).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run (all hosts).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0..num_processes-1.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() with no arguments: the cluster "
    "comes from the environment (TPU pod metadata, SLURM).")
_HEARTBEAT = flags.DEFINE_integer(
    "heartbeat_timeout_seconds", 100, "Multi-host: seconds without a heartbeat after which a "
    "process counts as dead and the others exit (instead of hanging).")
_INIT_TIMEOUT = flags.DEFINE_integer(
    "initialization_timeout_seconds", 300, "Multi-host: seconds to wait for every process to "
    "connect.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    from absl import logging

    from atm_jax import distributed, errors  # after flag parsing: --help stays fast

    # orbax logs every checkpoint step at INFO; the run's own progress lines are enough.
    logging.set_verbosity(logging.WARNING)
    try:
        # Before anything touches a JAX backend (runner imports only define functions).
        distributed.initialize(
            coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
            process_id=_PROCESS_ID.value, auto=_DISTRIBUTED.value,
            heartbeat_timeout_seconds=_HEARTBEAT.value,
            initialization_timeout_seconds=_INIT_TIMEOUT.value)
        from atm_jax import runner

        runner.run_experiment(_CONFIG.value, _WORKDIR.value)
    except errors.DivergedError as e:
        print(f"error: training diverged: {e}\nThe last good checkpoint in {_WORKDIR.value}/"
              "checkpoints is kept: change the optimizer (e.g. --config.optimizer.learning_rate) and "
              "rerun with --config.resume=force to continue from it.", file=sys.stderr)
        sys.exit(3)
    except errors.AtmJaxError as e:
        # Bad input (config, data, weights, workdir): the message says what to do.
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
