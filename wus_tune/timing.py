"""Relative time: what a run cost in units of "one full-length baseline run on this device, now".

Wall time measures the machine as much as the method: a trial that ran while another job shared the
cores looks slow, and a study whose workers sit on different GPU models compares seconds of different
sizes. So a run counts what it *did*, per kind of work, and prices each kind by a short measurement made
at its end, in its own process, interleaved with the same measurement of the baseline's step::

    run_s(counts, costs)  = sum_k counts[k] * costs[k]          # seconds, at the prices measured now
    relative_time         = run_s(trial counts, costs) / run_s(baseline counts, costs)

A *kind* is one sort of unit of work whose price does not change along a run: ``step:full`` (a full
training step), ``step:skip:last:1`` (a WUS skip step with that bias scope), a method's own kind of step,
``eval`` (one evaluated sample of a charged evaluation). The baseline's kinds are its full step
(``baseline:step``, at its own batch size) and its evaluation (``baseline:eval``); its counts are its
steps (epochs x steps per epoch) and its final evaluation's samples.

The price of a kind is the median, over ``rounds`` interleaved rounds, of the time per unit of a short
burst (at least ``min_burst_s`` long); each round visits every kind, in an order rotated from round to
round. A load that lasts longer than a round slows the numerator and the denominator alike and cancels;
a shorter spike hits one burst and the median drops it. On a CPU the trainer times the bursts in process
CPU time (``time.process_time``), so the time the process spends descheduled while other jobs run is not
charged to either side (on 2 shared cores at load 25 this keeps a WUS trial's relative time within +-2%
across repeats, where wall-clock bursts scattered it over 0.5x-3.4x); on CUDA in wall time with device
synchronisation. What this model ignores: everything that is not
in a counted kind (set-up, warm-up, data shuffling between epochs, Python work in hooks outside a step),
and any change of a kind's price along a run (caches warming, thermal throttling) -- docs/study.md.

The arithmetic (:func:`run_seconds`, :func:`relative_time`) and the measurement
(:func:`measure_interleaved`, with an injectable clock) are plain Python; the trainer builds the workloads.
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
    "EVAL",
    "Measurement",
    "TimingOptions",
    "Workload",
    "measure_interleaved",
    "relative_time",
    "run_seconds",
]

EVAL = "eval"  # unit: one evaluated sample
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


def run_seconds(counts: Mapping[str, float], costs: Mapping[str, float]) -> float:
    """``sum_k counts[k] * costs[k]``: the seconds a run with these counts costs at these prices."""
    total = 0.0
    for kind, n in counts.items():
        if not n:
            continue
        if kind not in costs:
            raise ValueError(f"no measured price for work of kind {kind!r} (counted {n:g})")
        total += n * costs[kind]
    return total


def relative_time(
    counts: Mapping[str, float], costs: Mapping[str, float], baseline_counts: Mapping[str, float]
) -> float:
    """The run's seconds over the baseline run's, both at the same (just measured) prices."""
    reference = run_seconds(baseline_counts, costs)
    if not reference > 0:
        raise ValueError(f"the baseline run costs {reference!r} s at these prices; it must be positive")
    return run_seconds(counts, costs) / reference


def measure_interleaved(
    workloads: Mapping[str, Workload],
    options: TimingOptions = TimingOptions(),
    *,
    paired_with: str | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, Measurement]:
    """Price every workload: one untimed warm-up unit, a timed unit to size the bursts, then ``rounds``
    rounds of one burst per kind (order rotated each round). Returns kind -> :class:`Measurement`.

    ``paired_with`` (a kind): every other kind's price is that kind's median price times the median over
    rounds of the two kinds' price ratio *within* a round, so a load that drifts across rounds cancels
    in the ratio a relative time uses."""
    kinds = list(workloads)
    if not kinds:
        return {}

    def burst(work: Workload, n: int) -> tuple[float, float]:
        if work.prepare is not None:
            work.prepare()
        if work.sync is not None:
            work.sync()
        start = clock()
        units = 0.0
        for _ in range(n):
            units += work.run()
        if work.sync is not None:
            work.sync()
        return clock() - start, units

    sizes: dict[str, int] = {}
    for kind in kinds:
        burst(workloads[kind], 1)  # warm-up: allocator, autotuning, first-call caches
        seconds, _ = burst(workloads[kind], 1)
        if seconds <= 0:
            sizes[kind] = options.max_burst
        else:
            sizes[kind] = max(1, min(options.max_burst, math.ceil(options.min_burst_s / seconds)))
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


def costs_of(measurements: Mapping[str, Measurement]) -> dict[str, float]:
    return {k: m.seconds for k, m in measurements.items()}


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
