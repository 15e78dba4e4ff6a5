"""The learning-rate schedule: a pure function of the step, applied by workers and verifiers alike."""

from __future__ import annotations

import math


def lr_at(step: int, total_steps: int, lr: float, min_lr: float, warmup_steps: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based) of ``total_steps``.

    Linear warmup from lr/warmup_steps to ``lr`` over ``warmup_steps``, then cosine decay to
    ``min_lr`` at the last step (nanoGPT's ``get_lr``).

    Raises:
        ValueError: for a step outside [0, total_steps).
    """
    if not 0 <= step < total_steps:
        raise ValueError(f"step {step} outside [0, {total_steps})")
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    span = max(1, total_steps - 1 - warmup_steps)
    ratio = min(1.0, (step - warmup_steps) / span)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)
