"""The device mesh: data-parallel batches, replicated (or rule-sharded) params.

JAX is the distributed engine: one program (SPMD) over a `jax.sharding.Mesh` with
axes ``("task", "data")``; ``jax.jit`` on sharded inputs compiles the collectives
(this replaces ``pmap``). ``config.mesh = {"task": 1, "data": -1, "params":
"replicated"}``:

* ``data``: devices a batch is split over (−1 = all devices left after ``task``).
  The global batch size stays ``config.optimizer.batch_size`` whatever the device
  count; a batch is padded with mask-0 rows to a multiple of the devices that
  share it, so results change only by float reduction order.
* ``task``: disjoint device groups finetuning different tasks at the same time
  (`atm_jax.parallel`); each group is a ``1 × data`` sub-mesh.
* ``params``: ``"replicated"`` (every device holds the params and optimizer
  state) or ``"fsdp"``: the big kernels / embeddings of CLIP and BERT are split
  over the data axis by the leaf-path regex table `RULES` (jit gathers them per
  use), for models that do not fit one device.

Multi-process ready: every process builds only the rows of the global batch its
own devices hold (`local_rows`), and the global array comes from
``jax.make_array_from_process_local_data``.

A run always has a placement: with one device it is a 1 × 1 mesh
(`Placement.single`), so `finetune` and `evaluate` have one code path, and its
numbers are bitwise those of the plain single-device program (tested).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from atm_jax import tree as tree_lib

__all__ = ["AXES", "DEFAULT", "PARAM_MODES", "RULES", "check_mesh", "mesh_shape", "make_mesh",
           "task_meshes", "spec_for", "Placement"]

PyTree = Any
AXES = ("task", "data")
DEFAULT = {"task": 1, "data": -1, "params": "replicated"}

# Leaf-path regex -> PartitionSpec, first match wins; a leaf whose sharded dimension
# does not divide by the axis size stays replicated. Paths are slash-joined as in
# `atm_jax.tree.leaf_paths` (e.g. "encoder/layer_0/intermediate/dense/kernel",
# "vision/encoder/layers_0/mlp/fc1/kernel"). Kernels are [in, out] (Flax Dense).
_FSDP = (
    (r"(word_embeddings|token_embedding)/embedding$", P("data", None)),  # vocab rows
    (r"patch_embedding/kernel$", P(None, None, None, "data")),          # [p, p, c, width]
    (r"(fc1|intermediate/dense)/kernel$", P(None, "data")),             # [d, 4d]: the 4d side
    (r"(fc2|layer_\d+/output/dense)/kernel$", P("data", None)),         # [4d, d]: the 4d side
    (r"(q_proj|k_proj|v_proj|query|key|value)/kernel$", P(None, "data")),
    (r"(out_proj|attention/output/dense)/kernel$", P("data", None)),
    (r".", P()),  # biases, LayerNorms, position / class embeddings, pooler: replicated
)
RULES: dict[str, tuple[tuple[str, P], ...]] = {"replicated": ((r".", P()),), "fsdp": _FSDP}
PARAM_MODES = tuple(RULES)


def check_mesh(mesh: Mapping, device_count: int) -> None:
    """Raises ValueError naming the bad ``config.mesh`` value, the devices seen and
    the fix; see `mesh_shape`."""
    mesh_shape(mesh, device_count)


def mesh_shape(mesh: Mapping, device_count: int) -> tuple[int, int]:
    """``(task, data)`` sizes of ``config.mesh`` on ``device_count`` devices.

    ``data = -1`` takes the devices left: ``device_count // task``. The mesh uses
    the first ``task * data`` devices; that product must divide the device count.
    """
    unknown = sorted(set(mesh) - set(DEFAULT))
    if unknown:
        raise ValueError(f"config.mesh.{unknown[0]} is not a known field; config.mesh has "
                         f"{sorted(DEFAULT)}.")
    seen = f"{device_count} device(s) seen ({jax.default_backend()})"
    sizes = {}
    for axis in AXES:
        value = mesh.get(axis, DEFAULT[axis])
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or \
                value == 0 or value < -1 or (axis == "task" and value < 1):
            allowed = "an integer >= 1" + (" or -1 (all devices left)" if axis == "data" else "")
            raise ValueError(f"config.mesh.{axis}={value!r} must be {allowed}.")
        sizes[axis] = int(value)
    task, data = sizes["task"], sizes["data"]
    if device_count % task:
        raise ValueError(f"config.mesh.task={task} does not divide the {seen}; use a divisor "
                         f"of {device_count} (e.g. --config.mesh.task=1).")
    if data == -1:
        data = device_count // task
    if device_count % (task * data):
        raise ValueError(f"config.mesh task × data = {task} × {data} = {task * data} does not "
                         f"divide the {seen}; use sizes whose product divides {device_count} "
                         f"(e.g. --config.mesh.data=-1 for all devices left).")
    params = mesh.get("params", DEFAULT["params"])
    if params not in RULES:
        raise ValueError(f"config.mesh.params={params!r} must be one of {PARAM_MODES}.")
    return task, data


def make_mesh(mesh: Mapping, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The ``("task", "data")`` Mesh of ``config.mesh`` over ``devices`` (default
    ``jax.devices()``, ordered by process, so each process's devices are a block)."""
    devices = list(jax.devices() if devices is None else devices)
    task, data = mesh_shape(mesh, len(devices))
    return Mesh(np.array(devices[:task * data]).reshape(task, data), AXES)


def task_meshes(mesh: Mesh) -> list[Mesh]:
    """One ``1 × data`` sub-mesh per row of the task axis: disjoint device groups."""
    return [Mesh(mesh.devices[i:i + 1], AXES) for i in range(mesh.devices.shape[0])]


def spec_for(path: str, shape: Sequence[int], rules: Sequence[tuple[str, P]],
             axis_sizes: Mapping[str, int]) -> P:
    """The PartitionSpec of the leaf at ``path``: the first rule whose regex
    ``re.search``-es the path; replicated when a sharded dimension does not divide
    by its axis size (or the spec has more entries than the leaf has dims)."""
    for pattern, spec in rules:
        if re.search(pattern, path):
            if len(spec) > len(shape):
                return P()
            for dim, axis in zip(shape, spec):
                if axis is not None and dim % axis_sizes[axis]:
                    return P()
            return spec
    return P()


class Placement:
    """Where a run's arrays live on one mesh: batches split over all its devices
    (``task × data``; a task group's sub-mesh has task = 1), params by the rules.

    Attributes:
      mesh: the Mesh.
      rules: the param rule table (`RULES` entry).
      batch: NamedSharding of a batch's leading axis.
      multiple: a batch's rows are padded to a multiple of this (the mesh size).
    """

    def __init__(self, mesh: Mesh, params: str = "replicated"):
        self.mesh = mesh
        self.rules = RULES[params]
        self.batch = NamedSharding(mesh, P(AXES))
        self.replicated = NamedSharding(mesh, P())
        self.multiple = int(mesh.size)

    @classmethod
    def of(cls, config_mesh: Mapping, devices: Sequence[jax.Device] | None = None) -> Placement:
        """The placement of ``config.mesh`` on ``devices`` (default: every device);
        a 1 × 1 mesh when there is one."""
        return cls(make_mesh(config_mesh, devices), config_mesh.get("params", DEFAULT["params"]))

    @classmethod
    def single(cls, device: jax.Device | None = None) -> Placement:
        """A 1 × 1 mesh on ``device`` (default: this process's first device): the
        placement of a run without a mesh."""
        return _single(jax.local_devices()[0] if device is None else device)

    def param_shardings(self, tree: PyTree) -> PyTree:
        """A NamedSharding per leaf of ``tree`` (arrays or ShapeDtypeStructs)."""
        sizes = dict(self.mesh.shape)
        leaves, treedef = jax.tree.flatten(tree)
        specs = [spec_for(p, np.shape(x), self.rules, sizes) for p, x in zip(tree_lib.leaf_paths(tree), leaves)]
        return jax.tree.unflatten(treedef, [NamedSharding(self.mesh, s) for s in specs])

    def params(self, tree: PyTree) -> PyTree:
        """``tree`` placed on the mesh by the rules (a copy when it lives elsewhere)."""
        return jax.device_put(tree, self.param_shardings(tree))

    def local_rows(self, global_rows: int) -> slice:
        """The rows of a ``global_rows``-row batch this process's devices hold."""
        index = self.batch.addressable_devices_indices_map((global_rows,))
        starts = [s[0].start or 0 for s in index.values()]
        stops = [global_rows if s[0].stop is None else s[0].stop for s in index.values()]
        return slice(min(starts), max(stops))

    def put(self, local: np.ndarray, global_rows: int) -> jax.Array:
        """One batch array from this process's rows ``local`` (see `local_rows`)."""
        return jax.make_array_from_process_local_data(
            self.batch, local, (global_rows, *np.shape(local)[1:]))

    def __repr__(self) -> str:
        return f"Placement(mesh={dict(self.mesh.shape)}, devices={self.mesh.size})"


@functools.lru_cache(maxsize=None)
def _single(device: jax.Device) -> Placement:
    return Placement(Mesh(np.array([device]).reshape(1, 1), AXES))
