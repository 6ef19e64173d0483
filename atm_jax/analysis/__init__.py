"""The paper's evidence on a run: orthogonality, task vectors as gradients, gradient
structure, trajectory, loss bookkeeping, α-tuned baselines.

* `recorder`: what the runner writes to ``<workdir>/analysis/`` when ``config.analysis``;
* `report`: ``analysis.json`` + figures + TensorBoard from those files;
* `theory`: Theorem 3.1's gap and the per-epoch gradient structure (rebuilds the
  suite from ``config.json``);
* `geometry`: mean |cos|, Gram-matrix PCA; `tuning`: α chosen on validation;
  `losses`: mean cross-entropy and its gradient.

``python -m atm_jax.analysis <workdir>`` runs `theory` and `report` on a finished run.
"""
