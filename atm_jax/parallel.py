"""Task parallel: the finetunes of one ATM iteration at the same time on disjoint devices.

The T finetunes of an iteration (and of the one-shot baselines) are independent.
With ``config.mesh.task = G > 1`` the ``G × data`` mesh is cut into G sub-meshes
(`atm_jax.sharding.task_meshes`); `atm.iteration` hands groups of G tasks to the
``finetune_tasks`` built here, which starts one `Finetuner.finetune_steps`
generator per task, each on its own sub-mesh, and advances them round robin: one
step of each task per round. JAX dispatch is asynchronous, so the groups' steps
overlap on their devices.

Tasks differ in size: a task whose generator has finished takes no further step,
so its params, head and optimizer state are never touched again (no Adam moment
decay, no step count), and every task's result equals its own sequential
`Finetuner.finetune` on the same sub-mesh, bitwise. The results are moved onto the
full mesh (``gather``) so the merge sees one placement.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

from atm_jax import sharding
from atm_jax.errors import DivergedError
from atm_jax.finetune import Finetuner

__all__ = ["task_parallel", "for_mesh"]

PyTree = Any
DataFn = Callable[[str], tuple[Any, Any]]


def task_parallel(finetuner: Finetuner, placements: Sequence[sharding.Placement | None],
                  data: DataFn, *, gather: sharding.Placement | None = None
                  ) -> Callable[[PyTree, Mapping[str, PyTree], int, Mapping[str, jax.Array]],
                                dict[str, tuple[PyTree, PyTree, dict]]]:
    """An `atm.FinetuneTasksFn` running task ``j`` of a call on ``placements[j]``.

    Args:
      finetuner: the run's Finetuner (one jitted step; one compilation per sub-mesh).
      placements: one per device group; a call takes at most this many tasks.
      data: ``data(task) -> (inputs, labels)`` of the split to train on.
      gather: where the results go (the full mesh); None leaves them in place.

    Returns:
      ``finetune_tasks(base, {task: head}, epochs, {task: key}) -> {task: (params,
      head, metrics)}``, equal task by task to ``finetuner.finetune`` on the same
      placement.
    """
    placements = list(placements)

    def finetune_tasks(base, heads, epochs, keys):
        tasks = list(heads)
        if len(tasks) > len(placements):
            raise ValueError(f"{len(tasks)} tasks in one call but only {len(placements)} device "
                             f"groups (config.mesh.task); call with tasks_per_call <= "
                             f"{len(placements)}.")
        running = {}
        for t, placement in zip(tasks, placements):
            inputs, labels = data(t)
            running[t] = finetuner.finetune_steps(base, heads[t], inputs, labels, epochs=epochs,
                                                  key=keys[t], placement=placement)
        out = {}
        while running:
            for t in list(running):  # one step of every unfinished task per round
                try:
                    next(running[t])
                except StopIteration as done:
                    out[t] = done.value
                    del running[t]
                except DivergedError as e:
                    for other in running.values():
                        other.close()
                    raise DivergedError(f"task {t!r}: {e}") from None
        if gather is not None:
            out = {t: (gather.params(p), gather.params(h), m) for t, (p, h, m) in out.items()}
        return {t: out[t] for t in tasks}

    return finetune_tasks


def for_mesh(config_mesh: Mapping, finetuner: Finetuner, data: DataFn):
    """``(finetune_tasks, tasks_per_call)`` for ``config.mesh``: task parallel over
    its task groups when ``task > 1``, else ``(None, None)`` (sequential)."""
    mesh = sharding.make_mesh(config_mesh)
    groups = mesh.devices.shape[0]
    if groups == 1:
        return None, None
    params = config_mesh.get("params", sharding.DEFAULT["params"])
    placements = [sharding.Placement(m, params) for m in sharding.task_meshes(mesh)]
    return (task_parallel(finetuner, placements, data, gather=sharding.Placement(mesh, params)),
            groups)
