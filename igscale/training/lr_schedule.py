"""Learning-rate schedule: constant with optional linear warmup (both official IG recipes use constant LR)."""
from __future__ import annotations

__all__ = ["lr_at"]


def lr_at(step: int, base_lr: float, warmup_steps: int = 0) -> float:
    """LR for optimizer step `step` (0-based): ramps (step+1)/warmup * base_lr, then base_lr."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    return base_lr
