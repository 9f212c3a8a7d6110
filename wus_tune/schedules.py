"""Learning-rate schedules as pure functions of training progress."""

from __future__ import annotations

import math

from wus_tune.config import ScheduleConfig

__all__ = ["lr_multiplier"]

# One-cycle starts its rise at this fraction of the peak, as torch's OneCycleLR (div_factor=25) does.
_ONECYCLE_START = 1 / 25


def lr_multiplier(schedule: ScheduleConfig, step: float, total_steps: int) -> float:
    """The factor on the peak learning rate at optimizer step ``step`` of ``total_steps`` (from 0; a fraction
    of a step where an epoch drew fewer batches than planned)."""
    t = step / max(1, total_steps)
    final = schedule.final_lr_fraction
    if schedule.name == "onecycle":
        rise = schedule.pct_start
        if t < rise:
            return _ONECYCLE_START + (1 - _ONECYCLE_START) * t / rise
        return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * (t - rise) / (1 - rise)))
    if schedule.warmup > 0 and t < schedule.warmup:
        return t / schedule.warmup
    if schedule.name == "constant":
        return 1.0
    if schedule.name == "step":
        return schedule.gamma ** sum(t >= m for m in schedule.milestones)
    # cosine from the end of warm-up to the end of training
    u = (t - schedule.warmup) / max(1e-12, 1 - schedule.warmup)
    return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * min(1.0, u)))
