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
"""

import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (get_config).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for results, metrics and plots.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    from absl import logging

    from atm_jax import errors, runner  # after flag parsing: --help stays fast

    # orbax logs every checkpoint step at INFO; the run's own progress lines are enough.
    logging.set_verbosity(logging.WARNING)
    try:
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
