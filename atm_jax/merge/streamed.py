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
  signs as it goes; in the rare case that the count says "-", the caller runs the
  merge pass again with ``zero_positive=False`` (as the in-memory merge reruns its
  program).

DARE's random draws come from ``key_for(name)``, so they do not depend on the order
the tensors are read in (the in-memory merge derives them from the leaf index).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from atm_jax import select
from atm_jax.merge import sparsify

__all__ = ["StreamedMerge"]


class StreamedMerge:
    """One sparsify x consensus merge over tensors read on demand.

    Args:
      program: the merge, from ``sparsify.program(name, **hparams)``.
      shapes: ``name -> shape`` of the tensors that merge (one task's), in the order
        they are written.
      task_vectors: ``name -> [T, ...] float32`` task vectors of one tensor.
      key_for: ``name -> PRNG key`` (DARE's draws); unused by deterministic merges.
      sources: a name per task, for error messages.
    """

    def __init__(self, program: sparsify.Program, shapes: Mapping[str, Sequence[int]],
                 task_vectors: Callable[[str], np.ndarray], *,
                 key_for: Callable[[str], jax.Array] | None = None, sources: Sequence[str] = ()):
        self.program, self.names = program, list(shapes)
        # Entries per task over all tensors: the n of a whole-model threshold.
        self.entries = sum(int(np.prod(shape, dtype=np.int64)) for shape in shapes.values())
        self.task_vectors, self.key_for, self.sources = task_vectors, key_for, list(sources)
        self.model_thresholds = None  # [T, m] float32 when program.whole_model
        self.ambiguous = self.balance = 0

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

    def deltas(self, *, zero_positive: bool = True) -> Iterator[tuple[str, np.ndarray]]:
        """``(name, merged delta)`` per tensor, float32, in ``names`` order."""
        program = self.program
        self.ambiguous = self.balance = 0
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
            keys = [self.key_for(name)] if program.p is not None else None
            outs, codes = sparsify.merge_leaves([jnp.asarray(taus)], program, lo, hi, keys,
                                                zero_positive)
            merged = np.asarray(outs[0])
            if not np.isfinite(merged).all():
                self._raise_nonfinite(name, taus)
            if codes is not None:
                ambiguous, balance = sparsify.sign_counts(codes[0])
                self.ambiguous += ambiguous
                self.balance += balance
            yield name, merged

    @property
    def rerun_negative(self) -> bool:
        """After a full merge pass with ``zero_positive=True``: whether the model-wide
        zero-mass rule asks for the negative side, so the pass must run again."""
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
