"""The optimizer of a finetuning call: its validated settings and the optax chain.

`atm_jax.finetune` re-exports these names (``from atm_jax.finetune import
OptimizerConfig`` keeps working); they live here so finetune.py holds the loop.
"""

from __future__ import annotations

import dataclasses
import math

import optax

_OPTIMIZERS = ("adam", "adamw", "sgd")
_SCHEDULES = ("constant", "warmup_cosine")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Optimizer settings for one finetuning call.

    Attributes:
        learning_rate: peak learning rate (> 0).
        weight_decay: decoupled decay for "adamw"; L2 added to the gradient for
            "adam" and "sgd" (>= 0, 0 disables it).
        grad_clip: clip the global gradient norm to this value; None disables it.
        batch_size: examples per step (>= 1).
        name: "adam", "adamw" or "sgd" (plain, no momentum).
        schedule: "constant", or "warmup_cosine": linear warmup from 0 over
            `warmup_steps`, then cosine decay to 0 at `decay_steps` (counted from
            the start of each `finetune` call, since every call gets a fresh
            optimizer).
        warmup_steps: warmup length for "warmup_cosine" (>= 0).
        decay_steps: total schedule length for "warmup_cosine" (> warmup_steps);
            must be None for "constant".
    """

    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    grad_clip: float | None = 10.0
    batch_size: int = 32
    name: str = "adam"
    schedule: str = "constant"
    warmup_steps: int = 0
    decay_steps: int | None = None

    def __post_init__(self):
        def bad(field, allowed):
            value = getattr(self, field)
            raise ValueError(f"OptimizerConfig.{field}={value!r} is invalid: must be {allowed}")

        if not (isinstance(self.learning_rate, (int, float)) and math.isfinite(self.learning_rate)
                and self.learning_rate > 0):
            bad("learning_rate", "a finite number > 0")
        if not (isinstance(self.weight_decay, (int, float)) and math.isfinite(self.weight_decay)
                and self.weight_decay >= 0):
            bad("weight_decay", "a finite number >= 0")
        if self.grad_clip is not None and not (
                isinstance(self.grad_clip, (int, float)) and self.grad_clip > 0):
            bad("grad_clip", "None or a number > 0")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) \
                or self.batch_size < 1:
            bad("batch_size", "an integer >= 1")
        if self.name not in _OPTIMIZERS:
            bad("name", f"one of {list(_OPTIMIZERS)}")
        if self.schedule not in _SCHEDULES:
            bad("schedule", f"one of {list(_SCHEDULES)}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) \
                or self.warmup_steps < 0:
            bad("warmup_steps", "an integer >= 0")
        if self.schedule == "constant" and self.decay_steps is not None:
            bad("decay_steps", 'None when schedule="constant"')
        if self.schedule == "warmup_cosine" and not (
                isinstance(self.decay_steps, int) and self.decay_steps > self.warmup_steps):
            bad("decay_steps", f'an integer > warmup_steps={self.warmup_steps} when '
                               f'schedule="warmup_cosine"')


def learning_rate_schedule(cfg: OptimizerConfig) -> optax.Schedule | float:
    """The learning rate of `cfg` as a constant or an optax schedule of the step."""
    if cfg.schedule == "constant":
        return cfg.learning_rate
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.learning_rate,
        warmup_steps=cfg.warmup_steps, decay_steps=cfg.decay_steps, end_value=0.0)


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
    """Global-norm gradient clipping followed by Adam, AdamW or SGD.

    Args:
        cfg: optimizer settings.

    Returns:
        The optax transformation; its state starts fresh at every `init`.
    """
    parts = []
    if cfg.grad_clip is not None:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip))
    lr = learning_rate_schedule(cfg)
    if cfg.name == "adamw":
        parts.append(optax.adamw(lr, weight_decay=cfg.weight_decay))
    else:
        if cfg.weight_decay > 0:
            parts.append(optax.add_decayed_weights(cfg.weight_decay))
        parts.append(optax.adam(lr) if cfg.name == "adam" else optax.sgd(lr))
    return optax.chain(*parts)
