"""Learning-rate schedule of a debiasing run, a pure function of the step (so a resumed run needs no state).

constant (the paper: AdamW at a constant lr), or a linear warm-up over ``warmup_steps`` followed by a cosine
or linear decay from ``lr`` to ``min_lr_ratio * lr`` at the last step. Steps count from 0.
"""

from __future__ import annotations

import math

from fairdiff_ray.config import TrainConfig


def lr_at(step: int, train: TrainConfig) -> float:
    """The learning rate of training step ``step`` (0-based) under ``train``'s schedule."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    base, warm = train.lr, train.warmup_steps
    if step < warm:
        return base * (step + 1) / warm
    if train.lr_schedule == "constant":
        return base
    span = max(train.steps - 1 - warm, 1)
    frac = min((step - warm) / span, 1.0)  # 0 right after warm-up, 1 at the last step
    shape = 0.5 * (1.0 + math.cos(math.pi * frac)) if train.lr_schedule == "cosine" else 1.0 - frac
    lo = base * train.min_lr_ratio
    return lo + (base - lo) * shape
