"""Several seeds per trial: the spec's ``seeds:``, the paired comparison with the baseline, and racing.

``seeds: K`` evaluates every trial on seeds ``seed, seed+1, ..., seed+K-1``; ``seeds: {min: m, max: M}``
starts each trial with ``m`` seeds and adds seeds, one at a time up to ``M``, while its place against the
baseline frontier is undecided (:func:`race`). The full-length baseline runs once per seed, each seed its
own baseline trial with its own snapshot folder (``baseline_checkpoints/trial_NNNNN/``), so a search trial
on seed ``s`` forks from seed ``s``'s baseline (:func:`wus_tune._study.reuse.find_baseline` matches the seed).

Every comparison is paired: seed ``s`` of a trial against seed ``s`` of the baseline, which shares its data
order and, with forks, its prefix. Per seed ``s``:

    acc_delta_s = (acc_trial_s - acc_baseline_s) * 100          (points)
    speedup_s   = time_baseline_s / time_trial_s                (the study's time objective)

and the claim is their mean with its 90% interval (:mod:`wus_tune.intervals`: Student t for the points,
the geometric mean for the speed-ups). Pure Python: no Optuna or torch here.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from wus_tune.errors import UsageError
from wus_tune.intervals import LEVEL, Interval, _t_quantile, decide, mean_difference, paired_differences, ratio_interval

__all__ = ["PAIRED_ATTR", "SEEDS_ATTR", "Seeds", "claim", "frontier_lines", "interval_of", "paired_summary", "parse_seeds",
           "race", "race_threshold", "seed_noise_pts", "unpaired_acc_interval", "versus_frontier", "with_paired"]  # fmt: skip

SEEDS_ATTR = "seeds"  # on a trial: [{"seed", "values", ...}, ...] one entry per seed it was evaluated on
PAIRED_ATTR = "paired"  # on a trial: {"seeds", "acc_delta_pts", "speedup", "baseline_trials"} (read by confirm)


@dataclass(frozen=True)
class Seeds:
    """How many seeds each trial is evaluated on: ``min`` to start with, at most ``max`` (equal: no racing)."""

    min: int = 1
    max: int = 1

    @property
    def racing(self) -> bool:
        return self.max > self.min

    def of(self, seed: int, n: int | None = None) -> list[int]:
        """The first ``n`` (default ``max``) evaluation seeds of a trial whose config carries ``seed``."""
        return [seed + k for k in range(self.max if n is None else n)]

    def __str__(self) -> str:
        return str(self.max) if not self.racing else f"{{min: {self.min}, max: {self.max}}}"


def parse_seeds(value: Any, key: str = "seeds") -> Seeds:
    """``K`` (an int >= 1) or ``{min: m, max: M}`` (1 <= m <= M) -> :class:`Seeds`; a :class:`UsageError`
    naming ``key`` otherwise. A string of digits is read as ``K`` (the CLI's ``--seeds 3``)."""
    if isinstance(value, Seeds):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise UsageError(f"{key}: expected an integer >= 1 or {{min: m, max: M}}, got {value!r}")
        return Seeds(value, value)
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - {"min", "max"})
        if unknown or "max" not in value:
            raise UsageError(f"{key}: expected {{min: m, max: M}}, got {dict(value)!r}")
        low, high = value.get("min", 1), value["max"]
        for name, v in (("min", low), ("max", high)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise UsageError(f"{key}.{name}: expected an integer >= 1, got {v!r}")
        if low > high:
            raise UsageError(f"{key}: min {low} is more than max {high}")
        return Seeds(low, high)
    raise UsageError(f"{key}: expected an integer >= 1 or {{min: m, max: M}}, got {value!r}")


# ---- the paired comparison ---------------------------------------------------------------------------


def paired_summary(trial: Mapping[int, Sequence[float]], baseline: Mapping[int, Sequence[float]], *,
                   baseline_trials: Mapping[int, int] | None = None, level: float = LEVEL) -> dict[str, Any] | None:  # fmt: skip
    """The ``paired`` attribute of a trial: ``trial`` and ``baseline`` map a seed to its objective values
    ``(accuracy, time, ...)``. Only seeds both have are paired; None when none are.

    ``{"seeds": n, "acc_delta_pts": Interval.to_dict(), "speedup": Interval.to_dict(), "seed_list": [...],
    "baseline_trials": {seed: trial number}}``: the form :mod:`wus_tune.confirm` reads."""
    seeds = sorted(s for s in trial if s in baseline)
    if not seeds:
        return None
    acc = paired_differences([trial[s][0] for s in seeds], [baseline[s][0] for s in seeds], scale=100.0, level=level)
    ratios = [baseline[s][1] / trial[s][1] for s in seeds if trial[s][1] > 0 and baseline[s][1] > 0]
    out: dict[str, Any] = {"seeds": len(seeds), "seed_list": seeds, "acc_delta_pts": acc.to_dict()}
    if len(ratios) == len(seeds):
        out["speedup"] = ratio_interval(ratios, level).to_dict()
    if baseline_trials:
        out["baseline_trials"] = {str(s): baseline_trials[s] for s in seeds if s in baseline_trials}
    return out


def unpaired_acc_interval(trial: Sequence[float], baseline: Sequence[float], level: float = LEVEL) -> Interval:
    """The accuracy delta (points) of two independent samples, the pairing ignored (Welch): what the same runs
    would claim without sharing seeds. For comparing interval widths; never used to decide."""
    a, b = [v * 100 for v in trial], [v * 100 for v in baseline]
    mean = statistics.fmean(a) - statistics.fmean(b)
    if len(a) < 2 or len(b) < 2:
        return Interval(mean, -math.inf, math.inf, min(len(a), len(b)), level)
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return Interval(mean, mean, mean, min(len(a), len(b)), level)
    dof = (va + vb) ** 2 / ((va**2 / (len(a) - 1) if va else 0) + (vb**2 / (len(b) - 1) if vb else 0))
    half = _t_quantile(level, max(1, int(dof))) * se
    return Interval(mean, mean - half, mean + half, min(len(a), len(b)), level)


def interval_of(stats: Mapping[str, Any] | None) -> Interval | None:
    """An :meth:`Interval.to_dict` back as an :class:`Interval` (None stays None; unbounded ends read back)."""
    if not stats:
        return None
    low, high = stats.get("low"), stats.get("high")
    return Interval(float(stats["mean"]), -math.inf if low is None else float(low),
                    math.inf if high is None else float(high), int(stats.get("n", 1)), float(stats.get("level", LEVEL)))  # fmt: skip


# ---- racing ------------------------------------------------------------------------------------------


def seed_noise_pts(baseline_accs: Sequence[float], level: float = LEVEL) -> float:
    """The half-width given to a trial's single paired difference (points): the spread of the baseline's
    own accuracy over its seeds, ``t * sd``. A paired difference varies less than an accuracy (the pair
    shares its data order and prefix), so this errs wide. ``inf`` with fewer than two baseline seeds."""
    accs = [a * 100 for a in baseline_accs]
    if len(accs) < 2:
        return math.inf
    return _t_quantile(level, len(accs) - 1) * statistics.stdev(accs)


def race(deltas_pts: Sequence[float], threshold_pts: float | None, *, max_seeds: int, noise_pts: float,
         level: float = LEVEL) -> str:  # fmt: skip
    """Whether a trial evaluated on ``len(deltas_pts)`` seeds needs another one.

    ``deltas_pts``: its paired accuracy differences with the baseline so far (points); ``threshold_pts``:
    the baseline frontier's accuracy at the trial's time, minus the baseline's (points; None where the
    frontier does not reach: the trial is faster than every plain run, nothing plain dominates it). The
    interval is the paired 90% interval, or ``delta +- noise_pts`` for a single seed
    (:func:`seed_noise_pts`). Returns

    * ``"front"``: the interval lies at or above the threshold (clearly beats simply training less);
    * ``"dominated"``: it lies entirely below (clearly worse than a plain run as fast);
    * ``"more"``: undecided, and fewer than ``max_seeds`` seeds so far: add one;
    * ``"undecided"``: undecided at ``max_seeds``.
    """
    if threshold_pts is None:
        return "front"
    if len(deltas_pts) < 2:
        d = float(deltas_pts[0])
        interval = Interval(d, d - noise_pts, d + noise_pts, 2, level)  # the prior's width stands in for the spread
    else:
        interval = mean_difference(deltas_pts, level)
    verdict = decide(interval, threshold_pts)
    if verdict == "above":
        return "front"
    if verdict == "below":
        return "dominated"
    return "more" if len(deltas_pts) < max_seeds else "undecided"


def race_threshold(time: float, plain: Sequence[tuple[float, float]], baseline_acc: float) -> float | None:
    """The frontier's accuracy at ``time`` minus ``baseline_acc``, in points (``plain``: the baseline
    frontier's ``(time, accuracy)`` points, seed means); None where the frontier does not reach."""
    from wus_tune._study.front import frontier_advantage

    adv = frontier_advantage(time, 0.0, plain)
    if adv.acc_gain is None:
        return None
    return (-adv.acc_gain - baseline_acc) * 100  # acc_gain = 0 - acc_f(time)


def versus_frontier(candidate: Any, analysis: Any) -> str | None:
    """A front point against the baseline frontier at its time, read at the paired interval: ``above``,
    ``below`` or ``undecided`` (statistically indistinguishable); None without a paired interval of two
    seeds or more, or where the frontier does not reach."""
    paired = (candidate.attrs or {}).get(PAIRED_ATTR) or {}
    acc = interval_of(paired.get("acc_delta_pts"))
    if acc is None or acc.n < 2 or analysis.baseline is None or candidate.values is None:
        return None
    plain = [(c.values[1], c.values[0]) for c in analysis.frontier]
    threshold = race_threshold(candidate.values[1], plain, analysis.baseline.values[0])
    if threshold is None:
        return None
    return decide(acc, threshold)


def frontier_lines(analysis: Any) -> list[str]:
    """The report's lines on the front against the baseline frontier, read at the paired interval: which
    front points beat it, which are statistically indistinguishable from it, which fall below."""
    by: dict[str, list[int]] = {}
    for n in analysis.front:
        c = analysis.by_number(n)
        if c.uses_method and (verdict := versus_frontier(c, analysis)) is not None:
            by.setdefault(verdict, []).append(n)
    if not by:
        return []
    words = {"above": "above the baseline frontier at their time", "undecided":
             "statistically indistinguishable from the baseline frontier (training less does as well)",
             "below": "below the baseline frontier"}  # fmt: skip
    return [f"front (paired 90% intervals): trials {', '.join(map(str, ns))} {words[v]}"
            for v, ns in sorted(by.items(), key=lambda kv: ("above", "undecided", "below").index(kv[0]))]  # fmt: skip


def claim(paired: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The pick's claim for ``best_config.yaml``'s meta: its paired accuracy delta and speed-up with their
    90% intervals over its seeds (None for a trial without a paired comparison)."""
    if not paired:
        return None
    return {"seeds": paired.get("seeds"), "level": LEVEL,
            **{k: dict(paired[k]) for k in ("acc_delta_pts", "speedup") if paired.get(k)}}  # fmt: skip


def with_paired(candidates: Sequence[Any]) -> list[Any]:
    """``candidates`` with each trial's ``paired`` comparison recomputed where it pairs fewer seeds than it
    ran and the baselines of the rest have completed since (a trial that finished, on another worker,
    before a seed's baseline did). The stored attribute is left as it was; only the analysis reads the
    completed pairing."""
    from dataclasses import replace

    baselines: dict[int, Any] = {}
    for c in candidates:
        if c.role == "baseline" and c.state == "COMPLETE" and c.values and "seed" in (c.config or {}):
            baselines.setdefault(int(c.config["seed"]), c)
    out = []
    for c in candidates:
        per_seed = (c.attrs or {}).get(SEEDS_ATTR) or []
        paired = (c.attrs or {}).get(PAIRED_ATTR) or {}
        pairable = [e["seed"] for e in per_seed if e["seed"] in baselines]
        if c.role != "baseline" and c.state == "COMPLETE" and len(pairable) > paired.get("seeds", 0):
            redone = paired_summary({e["seed"]: e["values"] for e in per_seed},
                                    {s: b.values for s, b in baselines.items()},
                                    baseline_trials={s: b.number for s, b in baselines.items()})  # fmt: skip
            c = replace(c, attrs={**c.attrs, PAIRED_ATTR: redone})
        out.append(c)
    return out
