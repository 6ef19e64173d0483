"""The sparsify x consensus merges over a model read one tensor at a time.

`atm_jax.merge_models` merges checkpoints too large to hold: it reads each tensor's
task vectors, merges them and writes the result before reading the next. The merges
of `atm_jax.merge.sparsify` (mean, sum, TIES, Breadcrumbs, DARE, DARE-TIES and the
compatibility modes) have two model-wide parts, and :class:`StreamedMerge` computes
both out of core, so a streamed merge equals the in-memory merge of all tensors at
once (the registry function on the whole tree) bit for bit:

* ``scope="model"`` thresholds: one k-th largest magnitude per task over every
  tensor, from :class:`atm_jax.select.StreamedThresholds` (two counting passes over
  the tensors before the merge pass; memory independent of the model's size).
* TIES' zero-mass rule: entries whose trimmed values cancel exactly take the sign
  of the model-wide sum of elected signs. The merge pass assumes "+" and counts the
  signs as it goes. For the few tensors holding such entries it also merges them on
  the "-" side and keeps the entries that differ (``alternatives``); when the count
  says "-" (:attr:`StreamedMerge.negative_side`), the caller writes those entries
  instead, which gives what the in-memory merge's second run of its program gives.

DARE's masks are drawn here, in NumPy (PCG64 seeded with ``seed_for(name)`` and the
chunk index, see ``CHUNK``): a keep draw is ``uniform < 1 − p`` and kept entries are
divided by ``1 − p``, as in `atm_jax.merge.sparsify`, but faster than JAX's threefry
on CPU, where DARE is bound by its random numbers
(benchmarks/results/merge_models_micro_20261203.md). The draws do not depend
on the order the tensors are read in; they are not those of the in-memory
``merge.dare`` (JAX keys folded by leaf index).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import jax.numpy as jnp
import numpy as np

from atm_jax import select
from atm_jax.merge import sparsify

__all__ = ["StreamedMerge", "CHUNK"]

# Entries per jitted merge call: a tensor is merged in chunks of this many entries (the
# last one padded to a power of two), so a model compiles a handful of programs
# whatever its shapes. The merge is elementwise, so chunking changes no value; DARE's
# draws are seeded with the tensor's seed and the chunk index.
CHUNK = 1 << 18


class StreamedMerge:
    """One sparsify x consensus merge over tensors read on demand.

    Args:
      program: the merge, from ``sparsify.program(name, **hparams)``.
      shapes: ``name -> shape`` of the tensors that merge (one task's), in the order
        they are written.
      task_vectors: ``name -> [T, ...] float32`` task vectors of one tensor.
      seed_for: ``name -> non-negative int`` seeding DARE's draws of that tensor; unused by
        deterministic merges.
      sources: a name per task, for error messages.
    """

    def __init__(self, program: sparsify.Program, shapes: Mapping[str, Sequence[int]],
                 task_vectors: Callable[[str], np.ndarray], *,
                 seed_for: Callable[[str], int] | None = None, sources: Sequence[str] = ()):
        self.program, self.names = program, list(shapes)
        # Entries per task over all tensors: the n of a whole-model threshold.
        self.entries = sum(int(np.prod(shape, dtype=np.int64)) for shape in shapes.values())
        self.task_vectors, self.seed_for, self.sources = task_vectors, seed_for, list(sources)
        # DARE's drop happens in _merge_piece; the program then elects and aggregates.
        self._consensus = dataclasses.replace(program, p=None)
        self._pool = None  # DARE's two draw threads, while deltas() runs
        self.model_thresholds = None  # [T, m] float32 when program.whole_model
        self.ambiguous = self.balance = 0
        # name -> (flat indices, values): the entries that differ on the "-" side.
        self.alternatives: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    # -- the two counting passes -------------------------------------------

    def passes(self) -> int:
        """Reads of every tensor before the merge pass: 2 for whole-model thresholds."""
        return 2 if self.program.whole_model else 0

    def count(self, progress: Callable[[str], None] = lambda name: None) -> None:
        """The whole-model thresholds (a no-op for per-tensor scopes); ``progress(name)``
        is called after each tensor of each pass."""
        if not self.program.whole_model:
            return
        program = self.program
        selection = None
        for pass_index in range(2):
            for name in self.names:
                taus = self.task_vectors(name)
                num_tasks = taus.shape[0]
                if selection is None:
                    total = self.entries * (num_tasks if program.joint else 1)
                    ranks = np.asarray(program.ranks(total), np.int64)
                    groups = 1 if program.joint else num_tasks
                    selection = select.StreamedThresholds(np.broadcast_to(ranks, (groups, ranks.size)))
                before = selection.nonfinite.copy()
                for t in range(num_tasks):
                    selection.add(0 if program.joint else t, taus[t])
                if pass_index == 0 and (selection.nonfinite > before).any():
                    self._raise_nonfinite(name, taus)
                progress(name)
            if pass_index == 0:
                selection.bracket()
        values = selection.values()
        self.model_thresholds = np.broadcast_to(values, (num_tasks, values.shape[1]))

    # -- the merge pass ----------------------------------------------------

    def deltas(self) -> Iterator[tuple[str, np.ndarray]]:
        """``(name, merged delta)`` per tensor, float32, in ``names`` order, with zero-mass
        entries on the "+" side (see ``alternatives`` and ``negative_side``)."""
        with ThreadPoolExecutor(2) as self._pool:
            yield from self._deltas()

    def _deltas(self) -> Iterator[tuple[str, np.ndarray]]:
        program = self.program
        self.ambiguous = self.balance = 0
        self.alternatives = {}
        for name in self.names:
            taus = self.task_vectors(name)
            lo = hi = None
            if program.ranks is not None:
                if program.whole_model:
                    thr = jnp.asarray(self.model_thresholds)
                else:
                    size = taus[0].size
                    thr, largest = select.thresholds([taus], program.ranks(size), method=program.method,
                                                     return_largest=True)
                    if not np.isfinite(np.asarray(largest)).all():
                        self._raise_nonfinite(name, taus)
                    thr = jnp.broadcast_to(thr, (taus.shape[0], thr.shape[1]))
                if program.band_ranks is not None:
                    hi, lo = [thr[:, 0]], [thr[:, 1]]
                else:
                    lo = [thr[:, 0]]
            seed = self.seed_for(name) if program.p is not None else None
            merged = np.empty(taus.shape[1:], np.float32)
            flat = taus.reshape(taus.shape[0], -1)
            for start in range(0, flat.shape[1], CHUNK):
                piece = flat[:, start:start + CHUNK]
                if seed is not None:
                    piece = self._drop(piece, [seed, start // CHUNK])
                merged.reshape(-1)[start:start + CHUNK] = self._merge_piece(name, piece, lo, hi,
                                                                            start)
            if not np.isfinite(merged).all():
                self._raise_nonfinite(name, taus)
            yield name, merged

    def _drop(self, x: np.ndarray, seed: list[int]) -> np.ndarray:
        """DARE on a chunk ``[T, n]``: each entry kept with probability ``1 − p`` and divided
        by it. Task ``t`` draws from PCG64 seeded with ``seed + [t]``; the tasks run on two
        threads (NumPy releases the GIL), which changes no draw."""
        keep_prob = np.float32(1) - np.float32(self.program.p)
        out = np.empty(x.shape, np.float32)

        def one(t: int) -> None:
            uniform = np.random.default_rng([*seed, t]).random(x.shape[1], dtype=np.float32)
            np.divide(x[t], keep_prob, out=out[t])
            out[t] *= uniform < keep_prob

        list(self._pool.map(one, range(x.shape[0])))
        return out

    def _merge_piece(self, name, x, lo, hi, offset) -> np.ndarray:
        """One chunk ``[T, n]`` of a tensor merged, padded with zeros to a power of two so
        that few programs compile (zero task vectors merge to 0 and elect no sign); counts
        its signs and keeps its entries that differ on the "-" side."""
        n = x.shape[1]
        width = max(1 << 12, 1 << (n - 1).bit_length())
        if width != n:
            x = np.concatenate([x, np.zeros((x.shape[0], width - n), x.dtype)], axis=1)
        x = jnp.asarray(x)
        outs, codes = sparsify.merge_leaves([x], self._consensus, lo, hi, None, True)
        merged = np.asarray(outs[0])[:n]
        if codes is not None:
            ambiguous, balance = sparsify.sign_counts(codes[0])
            self.ambiguous += ambiguous
            self.balance += balance
            if ambiguous:
                other = np.asarray(sparsify.merge_leaves([x], self._consensus, lo, hi, None,
                                                         False)[0][0])[:n]
                index = np.flatnonzero(other != merged)
                old_index, old_values = self.alternatives.get(name, (np.zeros(0, np.int64),
                                                                     np.zeros(0, np.float32)))
                self.alternatives[name] = (np.concatenate([old_index, index + offset]),
                                           np.concatenate([old_values, other[index]]))
        return merged

    @property
    def negative_side(self) -> bool:
        """After the merge pass: whether the model-wide zero-mass rule takes the "-" side,
        so the ``alternatives`` replace those entries."""
        return self.program.elect and sparsify.needs_negative(self.ambiguous, self.balance)

    def _raise_nonfinite(self, name: str, taus: np.ndarray) -> None:
        for t in range(taus.shape[0]):
            if not np.isfinite(taus[t]).all():
                source = self.sources[t] if t < len(self.sources) else f"task {t}"
                raise ValueError(f"tensor {name!r} of {source!r} holds NaN or Inf values; a "
                                 "finetune probably diverged (merge without that model).")
        raise ValueError(f"tensor {name!r}: the merged values overflow float32 (aggregate='sum' "
                         "over large task vectors, or DARE's 1/(1-p) rescale); use "
                         "aggregate='mean' or scale the merge down.")
