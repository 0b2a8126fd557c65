"""Learning-rate schedule of the MOS / BiT recipe: linear warm-up, then step decay.

The reference code warms up as base * step / warmup, so its first step runs at lr 0. Here the
warm-up counts the step being taken (base * (step + 1) / warmup), so no step is wasted and the full
rate is reached at step warmup - 1; afterwards lr = base * decay ** (number of milestones <= step).
The schedule is a pure function of the step, so resuming needs only the step counter.
"""

from __future__ import annotations

from bisect import bisect_right

__all__ = ["lr_at", "StepSchedule"]


def lr_at(step: int, base_lr: float, warmup_steps: int, milestones, decay: float = 0.1) -> float:
    if step < 0:
        raise ValueError(f"lr_at: step must be >= 0, got {step}")
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    return base_lr * decay ** bisect_right(list(milestones), step)


class StepSchedule:
    """Sets every param group's lr for the step about to be taken."""

    def __init__(self, optimizer, base_lr: float, warmup_steps: int, milestones, decay: float = 0.1):
        self.optimizer = optimizer
        self.base_lr, self.warmup_steps = float(base_lr), int(warmup_steps)
        self.milestones, self.decay = tuple(int(m) for m in milestones), float(decay)

    def lr(self, step: int) -> float:
        return lr_at(step, self.base_lr, self.warmup_steps, self.milestones, self.decay)

    def apply(self, step: int) -> float:
        lr = self.lr(step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        return lr
