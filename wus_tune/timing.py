"""Interleaved, paired measurement of short bursts of work: how :mod:`wus_tune.pricing` prices each kind.

A :class:`Workload` does one unit of a kind of work (a training step with its batch, an evaluated batch);
:func:`measure_interleaved` gives each kind a price, in seconds per unit. After one untimed warm-up unit
and one unit to size the bursts (each lasts at least ``min_burst_s``), it runs ``rounds`` rounds of one
burst per kind, the order rotated from round to round. The price of a kind is the median over rounds; with
``paired_with`` (the baseline's step), every other kind's price is the reference's median price times the
median, over rounds, of the two kinds' ratio *within* a round: a load that lasts longer than a round slows
both sides of the ratio alike and cancels; a shorter spike hits one burst and the median drops it. The clock
is injectable: the pricing passes the work clock (CPU time on a CPU, so a descheduled process is not charged
for the wait; synchronised wall time on CUDA; ``wus_tune.clock``). Plain Python.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

__all__ = [
    "BASELINE_EVAL",
    "BASELINE_STEP",
    "Measurement",
    "TimingOptions",
    "Workload",
    "measure_interleaved",
]

BASELINE_STEP = "baseline:step"
BASELINE_EVAL = "baseline:eval"


@dataclass(frozen=True)
class TimingOptions:
    """How the prices are measured (defaults: about 5 x 10 ms per kind)."""

    rounds: int = 5  # interleaved rounds; the price is the median over them
    min_burst_s: float = 0.01  # a burst repeats a unit until it lasts at least this long
    max_burst: int = 64  # ... but no more than this many units

    def __post_init__(self) -> None:
        if self.rounds < 1 or self.max_burst < 1 or not self.min_burst_s >= 0:
            raise ValueError(f"TimingOptions: rounds and max_burst must be >= 1, min_burst_s >= 0; got {self}")


@dataclass
class Workload:
    """One kind of work to price: ``run()`` does one unit of it and returns how many units it did (1 for a
    step, the batch's samples for an evaluation batch); ``prepare()`` (untimed) runs before each burst."""

    run: Callable[[], float]
    prepare: Callable[[], None] | None = None
    sync: Callable[[], None] | None = None  # e.g. torch.cuda.synchronize: queued device work belongs to the burst
    # a burst repeats at least this many units: a streamed loader's workers keep a few batches ready, which a
    # burst gets for free, so its bursts must be long against that buffer to see the steady rate
    min_units: int = 1
    # and lasts at least this long (None: TimingOptions.min_burst_s); the CPU time of worker processes is read
    # from /proc in 10 ms ticks, so bursts that include it must be long against a tick
    min_burst_s: float | None = None


@dataclass(frozen=True)
class Measurement:
    """The price of one kind: seconds per unit (the median), with the spread over rounds."""

    seconds: float
    low: float
    high: float
    samples: tuple[float, ...] = field(default=(), repr=False)
    units_per_burst: float = 0.0

    def to_dict(self) -> dict[str, float]:
        return {"seconds": self.seconds, "low": self.low, "high": self.high, "rounds": len(self.samples)}


def measure_interleaved(
    workloads: Mapping[str, Workload],
    options: TimingOptions = TimingOptions(),
    *,
    paired_with: str | None = None,
    clock: Callable[[], float] = time.perf_counter,
    wall: Callable[[], float] | None = None,
) -> dict[str, Measurement]:
    """Price every workload: one untimed warm-up unit, a timed unit to size the bursts, then ``rounds``
    rounds of one burst per kind (order rotated each round). Returns kind -> :class:`Measurement`.

    ``paired_with`` (a kind): every other kind's price is that kind's median price times the median over
    rounds of the two kinds' price ratio *within* a round, so a load that drifts across rounds cancels
    in the ratio a relative time uses.

    ``wall`` (a wall clock, beside a CPU-time ``clock``): a burst's seconds are capped at its wall seconds, so
    work that ran on several cores at once costs the time it took (``wus_tune.clock``)."""
    kinds = list(workloads)
    if not kinds:
        return {}

    def burst(work: Workload, n: int) -> tuple[float, float]:
        if work.prepare is not None:
            work.prepare()
        if work.sync is not None:
            work.sync()
        start, start_wall = clock(), wall() if wall is not None else 0.0
        units = 0.0
        for _ in range(n):
            units += work.run()
        if work.sync is not None:
            work.sync()
        seconds = clock() - start
        return (min(seconds, wall() - start_wall) if wall is not None else seconds), units

    sizes: dict[str, int] = {}
    for kind in kinds:
        burst(workloads[kind], 1)  # warm-up: allocator, autotuning, first-call caches
        seconds, _ = burst(workloads[kind], 1)
        work = workloads[kind]
        min_burst_s = options.min_burst_s if work.min_burst_s is None else max(work.min_burst_s, options.min_burst_s)
        max_burst = max(options.max_burst, work.min_units)
        if seconds <= 0:
            sizes[kind] = max_burst
        else:
            sizes[kind] = max(1, min(max_burst * (1 if work.min_burst_s is None else 8), math.ceil(min_burst_s / seconds)))
        sizes[kind] = max(sizes[kind], work.min_units)
    samples: dict[str, list[float]] = {k: [] for k in kinds}
    units_seen: dict[str, float] = {}
    for r in range(options.rounds):
        shift = r % len(kinds)
        for kind in kinds[shift:] + kinds[:shift]:
            seconds, units = burst(workloads[kind], sizes[kind])
            if units <= 0:
                raise ValueError(f"workload {kind!r} did no work (returned {units!r} units)")
            samples[kind].append(seconds / units)
            units_seen[kind] = units
    out = {k: Measurement(statistics.median(v), min(v), max(v), tuple(v), units_seen[k]) for k, v in samples.items()}
    if paired_with is not None:
        ref = samples[paired_with]
        ref_price = statistics.median(ref)
        for k, v in samples.items():
            if k != paired_with:
                ratios = [a / b for a, b in zip(v, ref) if b > 0]
                if ratios:
                    out[k] = Measurement(ref_price * statistics.median(ratios), min(v), max(v), tuple(v), units_seen[k])
    return out


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, min, max, mean and standard deviation (0 for one value) of a list of numbers."""
    vals = [float(v) for v in values]
    return {
        "median": statistics.median(vals),
        "min": min(vals),
        "max": max(vals),
        "mean": statistics.fmean(vals),
        "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
        "n": len(vals),
    }
