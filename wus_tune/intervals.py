"""Intervals for paired comparisons: what a claim "with error bars" is made of.

Every comparison in wus_tune pairs a run with the baseline run that shares its seed (and, with baseline
reuse, its prefix), so the quantity of interest is a list of per-seed *differences* (accuracy points) or
*ratios* (speed-ups), and its uncertainty is that of their mean:

    mean_difference(d_1..d_n)   = mean(d) +- t_{(1+level)/2, n-1} * sd(d) / sqrt(n)     (Student's t)
    ratio_interval(r_1..r_n)    = exp(mean(log r) +- t * sd(log r) / sqrt(n))           (geometric mean)

A ratio is averaged on the log scale, so 2x faster and 2x slower cancel. With one value there is no
spread to go on: the interval is unbounded (``low = -inf``, ``high = inf``) and every decision that reads it
is "undecided". Pure Python; the t quantile comes from SciPy (installed with scikit-learn).

:func:`decide` reads an interval against a threshold: ``above`` when the whole interval lies at or above
it, ``below`` when it lies entirely below, else ``undecided``.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass

__all__ = ["LEVEL", "Interval", "decide", "mean_difference", "paired_differences", "ratio_interval"]

LEVEL = 0.90  # two-sided: the claims, the confirmation and the racing of seeds all use 90% intervals


@dataclass(frozen=True)
class Interval:
    """A mean with its two-sided ``level`` interval over ``n`` values (unbounded for ``n < 2``)."""

    mean: float
    low: float
    high: float
    n: int
    level: float = LEVEL

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high

    def to_dict(self) -> dict[str, float]:
        return {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in asdict(self).items()}

    def __str__(self) -> str:
        if self.n < 2:
            return f"{self.mean:.4g} (one value, no interval)"
        return f"{self.mean:.4g} [{self.low:.4g}, {self.high:.4g}]"


def _t_quantile(level: float, dof: int) -> float:
    from scipy.stats import t

    return float(t.ppf((1 + level) / 2, dof))


def mean_difference(values: Sequence[float], level: float = LEVEL) -> Interval:
    """The mean of paired differences (or of any sample) with its Student-t interval."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("an interval needs at least one value")
    mean = statistics.fmean(vals)
    if len(vals) < 2:
        return Interval(mean, -math.inf, math.inf, len(vals), level)
    half = _t_quantile(level, len(vals) - 1) * statistics.stdev(vals) / math.sqrt(len(vals))
    return Interval(mean, mean - half, mean + half, len(vals), level)


def paired_differences(values: Sequence[float], baseline: Sequence[float], scale: float = 1.0,
                       level: float = LEVEL) -> Interval:  # fmt: skip
    """``mean_difference`` of ``(values[s] - baseline[s]) * scale`` over seeds ``s`` (e.g. scale 100: points)."""
    if len(values) != len(baseline):
        raise ValueError(f"paired values need one baseline value each: {len(values)} values, {len(baseline)} baselines")
    return mean_difference([(v - b) * scale for v, b in zip(values, baseline)], level)


def ratio_interval(ratios: Sequence[float], level: float = LEVEL) -> Interval:
    """The geometric mean of positive ratios (e.g. per-seed speed-ups) with its interval, on the log scale."""
    logs = []
    for r in ratios:
        if not (isinstance(r, (int, float)) and r > 0 and math.isfinite(r)):
            raise ValueError(f"a ratio interval needs positive finite ratios, got {r!r}")
        logs.append(math.log(r))
    on_logs = mean_difference(logs, level)
    return Interval(math.exp(on_logs.mean), math.exp(on_logs.low) if on_logs.n > 1 else 0.0,
                    math.exp(on_logs.high) if on_logs.n > 1 else math.inf, on_logs.n, level)  # fmt: skip


def decide(interval: Interval, threshold: float) -> str:
    """``above`` (the interval lies at or above ``threshold``), ``below`` (entirely below) or ``undecided``."""
    if interval.n >= 2 and interval.low >= threshold:
        return "above"
    if interval.n >= 2 and interval.high < threshold:
        return "below"
    return "undecided"
