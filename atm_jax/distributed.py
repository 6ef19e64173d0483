"""Multi-host runs: ``jax.distributed`` from flags, the start line, task ownership,
privacy-aware ATM (PA-ATM, paper §6) and the few collectives the runner needs.

JAX is the distributed engine: one Python process per host (or per GPU node), all
running the same program; ``jax.distributed.initialize`` connects them, after which
``jax.devices()`` lists every process's devices and ``jit`` with shardings spans them
(what "pmapped" steps mean in today's JAX).

Two task ownerships (``config.task_ownership``; the device mesh is
``config.mesh``, `atm_jax.sharding.Placement`):

* ``"all"`` (default): every process sees every task; finetunes and merges run on
  the whole mesh (or, without a data mesh, replicated on each process).
* ``"per_process"`` (PA-ATM): task ``i`` belongs to process ``i % P`` (round robin).
  A process loads and finetunes only its own tasks' data; only finetuned models
  (= base + task vector: the base is common, so the same information as the task
  vector) and accuracies cross processes, through JAX collectives
  (``jax.experimental.multihost_utils.process_allgather``). Never an example.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from atm_jax import closures
from atm_jax.errors import ConfigError

__all__ = ["TASK_OWNERSHIP", "initialize", "start_line", "local_placement", "owner", "owned_tasks", "allgather_tree",
           "broadcast_from_first", "allgather_float64",
           "gather_accuracies", "make_finetune_tasks"]

PyTree = Any
TASK_OWNERSHIP = ("all", "per_process")


def initialize(*, coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, auto: bool = False,
               heartbeat_timeout_seconds: int = 100, initialization_timeout_seconds: int = 300
               ) -> bool:
    """Connects this process to the others; returns whether a multi-process run started.

    Either all three of ``coordinator_address`` / ``num_processes`` / ``process_id``
    (explicit: local processes, a hand-made cluster) or ``auto`` (a bare
    ``jax.distributed.initialize()``, which reads the cluster from the TPU pod
    metadata or SLURM's environment), or nothing (one process, no call).

    A peer that dies stops sending heartbeats; after ``heartbeat_timeout_seconds``
    the coordination service declares it dead and every other process exits with
    JAX's "distributed service detected fatal errors" message instead of hanging.
    CPU collectives across processes use gloo.

    Raises:
      ConfigError: only some of the three explicit values given, both explicit and
        ``auto``, a bad number, or the connection failed (message names the address).
    """
    explicit = {"--coordinator_address": coordinator_address, "--num_processes": num_processes,
                "--process_id": process_id}
    given = [k for k, v in explicit.items() if v is not None]
    if given and len(given) < 3:
        missing = [k for k in explicit if k not in given]
        raise ConfigError(f"{', '.join(given)} given without {', '.join(missing)}: pass all three "
                          "(e.g. --coordinator_address=10.0.0.1:1234 --num_processes=2 "
                          "--process_id=0) or none of them (--distributed reads the cluster "
                          "from the TPU pod or SLURM).")
    if given and auto:
        raise ConfigError("--distributed reads the cluster from the environment; do not also "
                          "pass --coordinator_address/--num_processes/--process_id.")
    if not given and not auto:
        return False
    for name, value in (("heartbeat_timeout_seconds", heartbeat_timeout_seconds),
                        ("initialization_timeout_seconds", initialization_timeout_seconds)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"--{name}={value!r} must be a positive number of seconds.")
    if given:
        if isinstance(num_processes, bool) or not isinstance(num_processes, int) \
                or num_processes < 1:
            raise ConfigError(f"--num_processes={num_processes!r} must be a positive integer.")
        if isinstance(process_id, bool) or not isinstance(process_id, int) \
                or not 0 <= process_id < num_processes:
            raise ConfigError(f"--process_id={process_id!r} must be in 0..{num_processes - 1} "
                              f"(--num_processes={num_processes}).")
        if ":" not in coordinator_address:
            raise ConfigError(f"--coordinator_address={coordinator_address!r} must be "
                              "HOST:PORT, e.g. 10.0.0.1:1234 (process 0's host).")
    # Cross-process collectives on CPU devices (tests, CPU clusters); GPUs and TPUs use
    # their own (NCCL, ICI) whatever this says.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(
            coordinator_address=coordinator_address, num_processes=num_processes,
            process_id=process_id, initialization_timeout=initialization_timeout_seconds,
            heartbeat_timeout_seconds=heartbeat_timeout_seconds)
    except (RuntimeError, ValueError) as e:
        where = coordinator_address or "the address found in the environment (--distributed)"
        raise ConfigError(f"jax.distributed.initialize could not connect to {where} within "
                          f"{initialization_timeout_seconds}s: {str(e)[:300]}. Start every "
                          "process (the same command with its own --process_id) and check "
                          "that process 0's host and port are reachable.") from None
    return True


def start_line(config_mesh: Mapping | None = None, per_process: bool = False) -> str:
    """The one line every process logs at start: who it is, its devices, the mesh
    (``config.mesh`` resolved on the global devices, or on the local ones for PA-ATM)."""
    local, devices = jax.local_devices(), jax.devices()
    kinds = sorted({d.platform for d in devices})
    text = (f"process {jax.process_index()}/{jax.process_count()}: {len(local)} local of "
            f"{len(devices)} global {'/'.join(kinds)} device(s)")
    if config_mesh is not None:
        from atm_jax import sharding

        task, data = sharding.mesh_shape(config_mesh, len(local if per_process else devices))
        where = "this process's devices (PA-ATM)" if per_process else "all devices"
        text += f"; mesh task={task} x data={data} over {where}"
    return text


def local_placement(config_mesh: Mapping):
    """PA-ATM's device mesh: ``config.mesh`` over this process's devices only (each
    process finetunes its own tasks alone); a 1 × 1 mesh with one local device."""
    from atm_jax import sharding

    return sharding.Placement.of(config_mesh, jax.local_devices())


# -- task ownership ---------------------------------------------------------------------

def owner(task_index: int, num_processes: int | None = None) -> int:
    """The process that owns task ``task_index`` under ``per_process`` (round robin)."""
    return task_index % (jax.process_count() if num_processes is None else num_processes)


def owned_tasks(tasks: Sequence[str], ownership: str, *, process: int | None = None,
                num_processes: int | None = None) -> list[str]:
    """The tasks whose data this process loads: all of them under ``"all"``, its
    round-robin share under ``"per_process"``."""
    if ownership not in TASK_OWNERSHIP:
        raise ConfigError(f"config.task_ownership={ownership!r} must be one of {TASK_OWNERSHIP}.")
    if ownership == "all":
        return list(tasks)
    process = jax.process_index() if process is None else process
    return [t for i, t in enumerate(tasks) if owner(i, num_processes) == process]


# -- collectives ------------------------------------------------------------------------

def allgather_tree(tree: PyTree) -> PyTree:
    """Every process's ``tree`` (same structure and shapes), stacked on a new leading
    process axis, on every process, as NumPy arrays. One process: ``tree[None]``."""
    if jax.process_count() == 1:
        return jax.tree.map(lambda x: np.asarray(x)[None], tree)
    from jax.experimental import multihost_utils

    host = jax.tree.map(np.asarray, tree)
    return jax.tree.map(np.asarray, multihost_utils.process_allgather(host, tiled=False))


def gather_accuracies(tasks: Sequence[str], local: Mapping[str, float],
                      owners: Mapping[str, int]) -> dict[str, float]:
    """``{task: accuracy}`` for ``tasks`` on every process, each computed by its
    owner (``local`` holds this process's own)."""
    row = np.array([local.get(t, np.nan) for t in tasks], np.float64)
    rows = allgather_float64(row)
    return {t: float(rows[owners[t], i]) for i, t in enumerate(tasks)}


def allgather_float64(row: np.ndarray) -> np.ndarray:
    """``allgather_tree`` of a float64 vector, bitwise: sent as its uint32 halves
    (without ``jax_enable_x64`` a float64 would travel as float32)."""
    row = np.ascontiguousarray(row, np.float64)
    gathered = allgather_tree(row.view(np.uint32))
    return np.ascontiguousarray(gathered).view(np.float64).reshape(len(gathered), -1)


def make_finetune_tasks(finetune: Callable, task_order: Sequence[str],
                        num_processes: int | None = None, process: int | None = None
                        ) -> Callable:
    """A PA-ATM ``finetune_tasks(base, heads, epochs, keys) -> {task: (params, head,
    metrics)}`` for ``atm.run`` / ``atm.one_shot``.

    ``finetune(base, head, task, epochs, key) -> (params, head, metrics)`` is the
    ordinary per-task finetune (it only sees this process's data). Each process
    finetunes the tasks of the group it owns; then every finetuned model and head
    is gathered from its owner (one ``process_allgather`` per slot of the group), so
    every process holds the same results as a one-process run, bitwise. Each
    finetune's result is checked against ``base`` as soon as it returns
    (`atm_jax.closures.finetune_result`).
    """
    index = {t: i for i, t in enumerate(task_order)}

    def finetune_tasks(base, heads: Mapping[str, PyTree], epochs: int,
                       keys: Mapping[str, jax.Array]) -> dict[str, tuple]:
        P = jax.process_count() if num_processes is None else num_processes
        me = jax.process_index() if process is None else process
        unknown = [t for t in heads if t not in index]
        if unknown:
            raise ValueError(f"finetune_tasks got tasks {unknown} outside the run's "
                             f"{list(task_order)}.")
        mine = {}
        for t in heads:
            if owner(index[t], P) == me:
                # Checked before this process's next finetune and before the gathers,
                # which need every process's trees to have the base's shapes.
                mine[t] = closures.finetune_result(finetune(base, heads[t], t, epochs, keys[t]),
                                                   base, task=t)
        out: dict[str, tuple] = {}
        for t in heads:  # one gather per task: tasks differ in head shape
            p = owner(index[t], P)
            if p == me:
                params, head, metrics = mine[t]
            else:  # a placeholder of the same shapes; only the owner's row is read
                params, head, metrics = base, heads[t], {}
            if P == 1:
                out[t] = mine[t]
                continue
            gathered = allgather_tree({"params": jax.tree.leaves(params),
                                       "head": jax.tree.leaves(head)})
            numbers = allgather_float64(_metrics_row(metrics, epochs))[p]
            if p == me:
                out[t] = mine[t]
            else:
                out[t] = (_with_leaves(base, (x[p] for x in gathered["params"])),
                          _with_leaves(heads[t], (x[p] for x in gathered["head"])),
                          dict(_metrics_from_row(numbers, epochs), process=p))
        return out
    return finetune_tasks


_COUNTS = ("steps", "examples", "epochs")


def _metrics_row(metrics: Mapping, epochs: int) -> np.ndarray:
    """A finetune's metrics as float64s: per-epoch loss and accuracy, then the counts
    (NaN where absent: a placeholder, or a finetune reporting less)."""
    row = np.full(2 * epochs + len(_COUNTS), np.nan)
    for j, name in enumerate(("loss", "accuracy")):
        values = metrics.get(name)
        if isinstance(values, Sequence) and len(values) == epochs:
            row[j * epochs:(j + 1) * epochs] = values
        elif values is not None and np.ndim(values) == 0:
            row[(j + 1) * epochs - 1] = values
    for j, name in enumerate(_COUNTS):
        if name in metrics:
            row[2 * epochs + j] = metrics[name]
    return row


def _metrics_from_row(row: np.ndarray, epochs: int) -> dict:
    out = {"loss": [float(x) for x in row[:epochs]],
           "accuracy": [float(x) for x in row[epochs:2 * epochs]]}
    for j, name in enumerate(_COUNTS):
        if not np.isnan(row[2 * epochs + j]):
            out[name] = int(row[2 * epochs + j])
    return out


def broadcast_from_first(tree: PyTree) -> PyTree:
    """Process 0's ``tree`` on every process, bitwise (an all-gather, row 0 kept:
    a psum broadcast would turn -0.0 into +0.0). Same structure and shapes needed."""
    if jax.process_count() == 1:
        return tree
    leaves = [x[0] for x in allgather_tree(jax.tree.leaves(tree))]
    return _with_leaves(tree, iter(leaves))


def _with_leaves(tree: PyTree, leaves) -> PyTree:
    """``tree`` with its leaves (in ``jax.tree.leaves`` order) replaced, keeping every
    dict's key order (``jax.tree.unflatten`` would sort them, and the task order and
    the bytes of saved params follow the key order)."""
    if isinstance(tree, Mapping):
        keys = sorted(tree)  # the order jax flattens a dict in
        done = {k: _with_leaves(tree[k], leaves) for k in keys}
        return type(tree)((k, done[k]) for k in tree) if not hasattr(tree, "unfreeze") \
            else type(tree)({k: done[k] for k in tree})
    if isinstance(tree, (list, tuple)) and not hasattr(tree, "_fields"):
        return type(tree)(_with_leaves(x, leaves) for x in tree)
    if tree is None:
        return None
    return next(leaves)
