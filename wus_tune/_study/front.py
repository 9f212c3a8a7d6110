"""The front maths of a study: dominance, the Pareto front, its hypervolume, the baseline frontier, the
knee and the selection rules, on plain tuples and :class:`Candidate` records.

Pure Python: no Optuna, MLflow or torch here, so it is tested on lists of numbers and read by anything;
only an objective a method declares (lp_sphere's sparsity) is looked up in the method catalog.
A study's trials become candidates in :mod:`wus_tune._study.candidates`; ``python -m wus_tune.pareto``
is the command line. Every public name here is also importable from :mod:`wus_tune.pareto`.

Definitions (``directions[k]`` is ``"maximize"`` or ``"minimize"``):

* Point ``a`` *dominates* ``b`` when ``a`` is no worse than ``b`` in every objective and strictly better
  in at least one. The *Pareto front* is the set of points no other point dominates (equal points are all
  on it, as in ``optuna.Study.best_trials``).
* The *hypervolume* of a set of points with respect to a reference point ``r`` is the Lebesgue measure of
  the region that at least one point dominates and that itself dominates ``r``:
  ``HV = vol( U_p [p, r] )`` after turning every objective into one to minimise. Points that do not
  strictly dominate ``r`` contribute nothing. Two objectives are computed exactly by a sweep; more by
  the WFG algorithm (While, Bradstreet and Barone, 2012), also exact.
* The *reference point* comes from the study's full-length baseline ``b`` (:func:`reference_point`):
  accuracy ``b_acc - accuracy_margin`` (default 0.05, i.e. 5 points below the baseline), time or cost
  ``b * cost_factor`` (default 1.25); a third objective likewise: sparsity ``b - accuracy_margin`` (the
  dense baseline's 0 minus 0.05, so dense trials still count), params ``b * cost_factor``. So the hypervolume measures the area of (accuracy, time) trade-offs
  at most 5 points worse and at most 25% slower than the baseline; a trial outside that box adds nothing.
* The *baseline frontier* is the Pareto front of the plain (no-WUS) trials, e.g. the baseline trained for
  50%, 70%, 85% and 100% of the epochs. Read as a piecewise-linear curve ``acc_f(t)`` through its points
  sorted by time, it says what simply training for less time achieves. For a point ``(t, a)``
  (:func:`frontier_advantage`):

  - ``acc_gain = a - acc_f(t)``: accuracy gained at equal time (linear interpolation between frontier
    points; beyond the slowest point ``acc_f`` stays at its accuracy; faster than the fastest: undefined);
  - ``time_saved = t_f(a) - t``: time saved at equal accuracy, where ``t_f(a)`` is the frontier's time to
    reach accuracy ``a`` (the inverse interpolation; undefined outside the frontier's accuracy range).

Selection rules (:func:`select`), over the feasible COMPLETE trials; accuracy is a fraction, ``D`` is in
points (0.5 = half a percentage point):

* ``knee``: on the Pareto front, with each objective scaled to [0, 1] over the front (1 = best), the point
  farthest from the straight line through the two extreme points (2 objectives, at least 3 points on the
  front); otherwise the point nearest the utopia point (1, ..., 1).
* ``fastest-within:D``: the fastest trial (least time/cost) with accuracy >= baseline - D points; ties go
  to the more accurate. A trial evaluated on several seeds (``seeds:``) qualifies when the lower end of its
  paired 90% accuracy-delta interval is >= -D points (:func:`paired_low`).
* ``most-accurate-under:S``: the most accurate trial with time (seconds) or cost (FLOPs) <= S; ``S`` may be
  written ``60%`` for 60% of the baseline's time or cost. Ties go to the faster.

Example::

    >>> pareto_front([(0.9, 10.0), (0.8, 5.0), (0.85, 12.0)], ["maximize", "minimize"])
    [0, 1]
    >>> hypervolume([(0.9, 10.0), (0.8, 5.0)], ["maximize", "minimize"], (0.7, 20.0))
    2.0
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from wus_tune.errors import UsageError

__all__ = [
    "OBJECTIVES",
    "RULES",
    "Advantage",
    "Analysis",
    "Candidate",
    "Rule",
    "analyse",
    "dominates",
    "frontier_advantage",
    "hypervolume",
    "hypervolume_history",
    "knee",
    "objective_direction",
    "objective_names",
    "objective_values",
    "on_frontier",
    "parse_rule",
    "pareto_front",
    "pooled_baseline",
    "reference_point",
    "select",
    "with_feasibility",
]

# Objective name -> (Optuna direction, TrainResult field). Accuracy is a fraction in [0, 1]. A method may
# add objectives read from its last-epoch metrics (its study declaration's OBJECTIVES: lp_sphere's sparsity
# and params), see objective_names().
OBJECTIVES: dict[str, tuple[str, str]] = {
    "accuracy": ("maximize", "val_acc"),
    "time": ("minimize", "time_s"),
    "relative_time": ("minimize", "relative_time"),  # full-length baseline runs on this device (wus_tune.timing)
    "cost": ("minimize", "cost_flops"),
}


def _method_objectives() -> dict[str, Any]:
    # Only for an objective a method declares: the maths on the built-in objectives needs no method code.
    from wus_tune._study.catalog import method_objectives

    return method_objectives()


def objective_names() -> list[str]:
    """Every objective a study may name: :data:`OBJECTIVES`, then those the methods declare."""
    return [*OBJECTIVES, *(n for n in _method_objectives() if n not in OBJECTIVES)]


def objective_direction(name: str) -> str:
    """``"maximize"`` or ``"minimize"``: the Optuna direction of objective ``name``."""
    return OBJECTIVES[name][0] if name in OBJECTIVES else _method_objectives()[name].direction


def objective_values(result: Any, names: Sequence[str]) -> dict[str, float]:
    """The objective values of a :class:`~wus_tune.trainer.TrainResult` (see :func:`objective_names`): a
    result field, or a method's last-epoch metric (its value for a run without the method when absent)."""
    last = result.epochs[-1].extra if result.epochs else {}
    out = {}
    for name in names:
        if name not in OBJECTIVES:
            o = _method_objectives()[name]
            absent = getattr(result, o.absent) if isinstance(o.absent, str) else o.absent
            out[name] = float(last.get(o.metric, absent))
            continue
        source = OBJECTIVES[name][1]
        if name == "relative_time" and getattr(result, source, None) is None:
            raise ValueError("objective relative_time: the run was not priced (fit(..., relative_to=baseline))")
        out[name] = float(getattr(result, source))
    return out


# ---- the maths on plain points -------------------------------------------------------------------


def _signs(directions: Sequence[str]) -> list[float]:
    """+1 for objectives to minimise, -1 for those to maximise: ``sign * value`` is always minimised."""
    out = []
    for d in directions:
        d = str(getattr(d, "name", d)).lower()
        if d not in ("maximize", "minimize"):
            raise ValueError(f"direction must be 'maximize' or 'minimize', got {d!r}")
        out.append(-1.0 if d == "maximize" else 1.0)
    return out


def dominates(a: Sequence[float], b: Sequence[float], directions: Sequence[str]) -> bool:
    """True if ``a`` is no worse than ``b`` in every objective and strictly better in one."""
    s = _signs(directions)
    la = [x * v for x, v in zip(s, a)]
    lb = [x * v for x, v in zip(s, b)]
    return all(x <= y for x, y in zip(la, lb)) and any(x < y for x, y in zip(la, lb))


def pareto_front(points: Sequence[Sequence[float]], directions: Sequence[str]) -> list[int]:
    """Indices (ascending) of the points that no other point dominates.

    O(n log n) for two objectives (sort by the first, sweep the second), O(n^2) otherwise.
    """
    s = _signs(directions)
    losses = [tuple(x * v for x, v in zip(s, p)) for p in points]
    for p in losses:
        if len(p) != len(s):
            raise ValueError(f"point {p} has {len(p)} values for {len(s)} directions")
    if len(s) == 2:
        # Sort by (f0, f1): a point is dominated iff an earlier point with a strictly smaller f0 (or equal
        # f0 and smaller f1) has f1 <= its f1. Equal points are kept, as nothing strictly dominates them.
        order = sorted(range(len(losses)), key=lambda i: losses[i])
        front: list[int] = []
        best_f1 = math.inf  # min f1 among points with strictly smaller f0
        group_f0, group_best = None, math.inf  # the run of points sharing f0
        for i in order:
            f0, f1 = losses[i]
            if f0 != group_f0:
                best_f1 = min(best_f1, group_best)
                group_f0, group_best = f0, f1  # sorted: the first of a group has its least f1
            if f1 < best_f1 and f1 == group_best:
                front.append(i)
        return sorted(front)
    return [
        i
        for i, p in enumerate(losses)
        if not any(all(x <= y for x, y in zip(q, p)) and q != p for q in losses)
    ]


def hypervolume(
    points: Sequence[Sequence[float]], directions: Sequence[str], reference: Sequence[float]
) -> float:
    """Hypervolume dominated by ``points`` and bounded by ``reference`` (see the module docstring)."""
    s = _signs(directions)
    ref = [x * v for x, v in zip(s, reference)]
    losses = [
        [x * v for x, v in zip(s, p)]
        for p in points
        if all(x * v < r for x, v, r in zip(s, p, ref))  # only points strictly inside the box count
    ]
    if not losses:
        return 0.0
    return _volume(losses, ref)


def _volume(losses: Sequence[Sequence[float]], ref: Sequence[float]) -> float:
    """Exact hypervolume of ``losses`` (minimised, each strictly inside the box below ``ref``).

    Two objectives: a sweep in the first. More: slices along the last objective (HSO, "hypervolume by
    slicing objectives"): between consecutive values of it, the slab's volume is its thickness times the
    hypervolume, one objective fewer, of the points at or below the slab. O(n^(d-1) log n) for n points."""
    if len(ref) == 2:
        # Sweep in increasing f0; each point adds the slab between its f1 and the lowest f1 seen so far.
        area, best_f1 = 0.0, ref[1]
        for f0, f1 in sorted(losses):
            if f1 < best_f1:
                area += (ref[0] - f0) * (best_f1 - f1)
                best_f1 = f1
        return area
    by_last = sorted(losses, key=lambda p: p[-1])
    total = 0.0
    for i, p in enumerate(by_last):
        top = by_last[i + 1][-1] if i + 1 < len(by_last) else ref[-1]
        if top > p[-1]:
            below = [q[:-1] for q in by_last[: i + 1]]
            below = [below[k] for k in pareto_front(below, ["minimize"] * len(below[0]))]  # only its front matters
            total += (top - p[-1]) * _volume(below, ref[:-1])
    return total


def hypervolume_history(
    points: Sequence[Sequence[float]], directions: Sequence[str], reference: Sequence[float]
) -> list[float]:
    """``[hypervolume(points[:k + 1]) for k in range(len(points))]``, in the given (trial) order."""
    out, kept = [], []
    for p in points:  # the front so far is all a later hypervolume needs
        kept.append(p)
        kept = [kept[i] for i in pareto_front(kept, directions)]
        out.append(hypervolume(kept, directions, reference))
    return out


def reference_point(
    baseline: Sequence[float],
    objectives: Sequence[str],
    *,
    accuracy_margin: float = 0.05,
    cost_factor: float = 1.25,
) -> tuple[float, ...]:
    """The hypervolume reference: the baseline made ``accuracy_margin`` less accurate and ``cost_factor``
    times slower/costlier (see the module docstring)."""
    ref = []
    for name, v in zip(objectives, baseline):
        if objective_direction(name) == "maximize":
            ref.append(v - accuracy_margin)
        else:
            ref.append(v * cost_factor)
    return tuple(ref)


@dataclass(frozen=True)
class Advantage:
    """A point's advantage over the baseline frontier (``None`` where the frontier does not reach)."""

    acc_gain: float | None  # accuracy (fraction) minus the frontier's accuracy at equal time
    time_saved: float | None  # frontier's time to reach the same accuracy minus the point's time
    time_saved_fraction: float | None  # time_saved / frontier time


def _frontier(plain: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (time, accuracy) Pareto front of the plain points, sorted by time (accuracy then increases)."""
    idx = pareto_front([(a, t) for t, a in plain], ["maximize", "minimize"])
    return sorted({plain[i] for i in idx})


def frontier_advantage(time: float, acc: float, plain: Sequence[tuple[float, float]]) -> Advantage:
    """Advantage of the point ``(time, acc)`` over the frontier of ``plain`` ``(time, acc)`` points."""
    front = _frontier(plain)
    if not front:
        return Advantage(None, None, None)
    # acc_f(t): linear between frontier points; flat after the slowest (nothing measured beyond it).
    acc_f: float | None
    if time < front[0][0]:
        acc_f = None
    elif time >= front[-1][0]:
        acc_f = front[-1][1]
    else:
        acc_f = _interp(time, [p[0] for p in front], [p[1] for p in front])
    # t_f(a): the inverse; accuracy increases strictly along the front, so it is a function.
    t_f: float | None
    accs = [p[1] for p in front]
    if acc < accs[0] or acc > accs[-1]:
        t_f = None
    else:
        t_f = _interp(acc, accs, [p[0] for p in front])
    gain = None if acc_f is None else acc - acc_f
    saved = None if t_f is None else t_f - time
    frac = None if t_f is None or t_f <= 0 else saved / t_f
    return Advantage(gain, saved, frac)


def _interp(x: float, xs: list[float], ys: list[float]) -> float:
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return ys[-1] if x >= xs[-1] else ys[0]


def knee(points: Sequence[Sequence[float]], directions: Sequence[str]) -> int:
    """Index of the knee of the Pareto front of ``points`` (definition in the module docstring)."""
    front = pareto_front(points, directions)
    if not front:
        raise ValueError("knee of an empty set of points")
    s = _signs(directions)
    # Normalise over the front to [0, 1] with 1 = best, so units (fractions vs seconds) do not matter.
    cols = list(zip(*[[-x * v for x, v in zip(s, points[i])] for i in front]))
    lo, hi = [min(c) for c in cols], [max(c) for c in cols]
    norm = {
        i: [(-x * v - l) / (h - l) if h > l else 1.0 for x, v, l, h in zip(s, points[i], lo, hi)] for i in front
    }
    if len(s) == 2 and len(front) >= 3:
        a = max(front, key=lambda i: (norm[i][0], norm[i][1]))  # the extreme best in objective 0
        b = max(front, key=lambda i: (norm[i][1], norm[i][0]))  # the extreme best in objective 1
        (x0, y0), (x1, y1) = norm[a], norm[b]

        def side(x: float, y: float) -> float:  # cross product: proportional to the distance to the chord
            return (x1 - x0) * (y - y0) - (y1 - y0) * (x - x0)

        sign = 1.0 if side(1.0, 1.0) >= 0 else -1.0  # count distance on the utopia side as positive
        return max(front, key=lambda i: (sign * side(*norm[i]), -i))
    return min(front, key=lambda i: (sum((1 - v) ** 2 for v in norm[i]), i))


@dataclass(frozen=True)
class Rule:
    """A parsed selection rule: ``kind`` in knee / fastest-within / most-accurate-under."""

    kind: str
    value: float = 0.0
    relative: bool = False  # most-accurate-under: value is a fraction of the baseline's time or cost

    def __str__(self) -> str:
        if self.kind == "knee":
            return "knee"
        v = f"{self.value * 100:g}%" if self.relative else f"{self.value:g}"
        return f"{self.kind}:{v}"


RULES = ("knee", "fastest-within:D", "most-accurate-under:S")


def parse_rule(text: str) -> Rule:
    """``"knee"``, ``"fastest-within:0.5"``, ``"most-accurate-under:120"`` or ``"...-under:60%"``."""
    kind, _, arg = str(text).strip().partition(":")
    if kind == "knee" and not arg:
        return Rule("knee")
    if kind in ("fastest-within", "most-accurate-under") and arg:
        relative = kind == "most-accurate-under" and arg.endswith("%")
        try:
            value = float(arg[:-1]) / 100 if relative else float(arg)
        except ValueError:
            value = math.nan
        if math.isfinite(value) and (kind == "fastest-within" or value > 0):
            return Rule(kind, value, relative)
    raise UsageError(f"selection rule {text!r}: expected one of {', '.join(RULES)} (e.g. fastest-within:0.5)")


def select(
    points: Sequence[Sequence[float]],
    objectives: Sequence[str],
    rule: Rule | str,
    baseline: Sequence[float] | None = None,
    lower_bounds: Sequence[float | None] | None = None,
) -> int:
    """Index of the point chosen by ``rule``; ``points[i] = (accuracy, time_or_cost, ...)``.

    ``fastest-within`` and relative ``most-accurate-under`` need the baseline's values. ``lower_bounds[i]``
    (points, or None): the lower end of point ``i``'s paired 90% accuracy-delta interval (several seeds per
    trial); ``fastest-within:D`` then asks it to be >= -D, and a point without one is read at its value.
    ``most-accurate-under`` and ``knee`` read the values (seed means). Raises :class:`UsageError` when no
    point satisfies the rule.
    """
    rule = parse_rule(rule) if isinstance(rule, str) else rule
    if not points:
        raise UsageError("no completed trials to select from")
    directions = [objective_direction(o) for o in objectives]
    if rule.kind == "knee":
        return knee(points, directions)
    if baseline is None and (rule.kind == "fastest-within" or rule.relative):
        raise UsageError(f"selection rule {rule}: the study has no completed baseline trial")
    if rule.kind == "fastest-within":
        floor = baseline[0] - rule.value / 100
        lows = list(lower_bounds) if lower_bounds is not None else [None] * len(points)
        ok = [i for i, p in enumerate(points)
              if (p[0] >= floor - 1e-12 if lows[i] is None else lows[i] >= -rule.value - 1e-9)]  # fmt: skip
        if not ok:
            raise UsageError(f"selection rule {rule}: no trial reaches accuracy {floor:.2%}")
        return min(ok, key=lambda i: (points[i][1], -points[i][0], i))
    limit = rule.value * baseline[1] if rule.relative else rule.value
    ok = [i for i, p in enumerate(points) if p[1] <= limit]
    if not ok:
        raise UsageError(f"selection rule {rule}: no trial has {objectives[1]} <= {limit:g}")
    return min(ok, key=lambda i: (-points[i][0], points[i][1], i))


# ---- a study's trials ----------------------------------------------------------------------------


@dataclass
class Candidate:
    """One trial as the analysis sees it. ``values`` follow the study's objectives."""

    number: int
    state: str  # COMPLETE, FAIL, RUNNING, ...
    values: tuple[float, ...] | None
    role: str = "search"  # baseline | baseline-frontier | <method>-default | method-default | guideline | search | enqueued
    uses_method: bool = True  # a speed-up method is on; False: a plain recipe, part of the frontier
    feasible: bool = True  # all constraints <= 0 (recomputed by :func:`analyse` given ``constraint_delta``)
    params: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] | None = None
    attrs: dict[str, Any] = field(default_factory=dict)  # the trial's user attributes

    @property
    def ok(self) -> bool:
        return self.state == "COMPLETE" and self.values is not None and self.feasible


@dataclass
class Analysis:
    """Everything a report needs: the candidates plus the front, baseline, frontier and hypervolume."""

    objectives: tuple[str, ...]
    candidates: list[Candidate]
    front: list[int]  # trial numbers on the Pareto front (feasible COMPLETE trials only)
    baseline: Candidate | None
    reference: tuple[float, ...] | None
    hv_history: list[tuple[int, float]]  # (trial number, hypervolume of the trials up to it)
    advantages: dict[int, Advantage]  # trial number -> advantage over the baseline frontier

    @property
    def directions(self) -> list[str]:
        return [objective_direction(o) for o in self.objectives]

    @property
    def complete(self) -> list[Candidate]:
        return [c for c in self.candidates if c.ok]

    @property
    def frontier(self) -> list[Candidate]:
        """The plain trials on the baseline frontier, by increasing time/cost."""
        plain = [c for c in self.complete if on_frontier(c)]
        pts = [(c.values[1], c.values[0]) for c in plain]
        keep = set(_frontier(pts))
        return sorted((c for c in plain if (c.values[1], c.values[0]) in keep), key=lambda c: c.values[1])

    def by_number(self, number: int) -> Candidate:
        for c in self.candidates:
            if c.number == number:
                return c
        raise KeyError(number)

    def select(self, rule: Rule | str) -> Candidate:
        done = self.complete
        base = self.baseline.values if self.baseline is not None else None
        return done[select([c.values for c in done], self.objectives, rule, base, [paired_low(c) for c in done])]


def analyse(
    candidates: Sequence[Candidate],
    objectives: Sequence[str],
    *,
    accuracy_margin: float = 0.05,
    cost_factor: float = 1.25,
    constraint_delta: float | None = None,
) -> Analysis:
    """Front, baseline, hypervolume history and frontier advantages of a study's candidates.

    ``constraint_delta`` (accuracy points): a COMPLETE trial is feasible when its accuracy is at least
    the baseline's minus ``constraint_delta / 100``, decided here from the stored values, so a trial that
    finished before the baseline (whose constraint was written while there was none) is judged too.
    Without a completed baseline every trial is feasible; without ``constraint_delta`` the stored
    constraints decide."""
    objectives = tuple(objectives)
    directions = [objective_direction(o) for o in objectives]
    cands = sorted(candidates, key=lambda c: c.number)
    if constraint_delta is not None:
        cands = with_feasibility(cands, objectives, constraint_delta)
    done = [c for c in cands if c.ok]
    # A trial completed with the baseline's values (``reused``) is the baseline's point, not a new one.
    fresh = [c for c in done if not c.attrs.get("reused")]
    front = [fresh[i].number for i in pareto_front([c.values for c in fresh], directions)]
    baseline = pooled_baseline([c for c in done if c.role == "baseline"])
    if baseline is not None:
        reference = reference_point(
            baseline.values, objectives, accuracy_margin=accuracy_margin, cost_factor=cost_factor
        )
    elif done:  # no baseline (yet): Optuna's convention, the nadir widened by 10%
        s = _signs(directions)
        worst = [max(x * c.values[k] for c in done) for k, x in enumerate(s)]
        reference = tuple(x * (w + 0.1 * abs(w)) for x, w in zip(s, worst))
    else:
        reference = None
    hv = hypervolume_history([c.values for c in done], directions, reference) if reference else []
    plain = [(c.values[1], c.values[0]) for c in done if on_frontier(c)]
    advantages = {c.number: frontier_advantage(c.values[1], c.values[0], plain) for c in done}
    return Analysis(
        objectives=objectives,
        candidates=cands,
        front=front,
        baseline=baseline,
        reference=reference,
        hv_history=[(c.number, h) for c, h in zip(done, hv)],
        advantages=advantages,
    )


def paired_low(c: Candidate) -> float | None:
    """The lower end (points) of a trial's paired 90% accuracy-delta interval (``paired`` attribute, written
    by a study with several seeds per trial); None with fewer than two seeds."""
    stats = ((c.attrs or {}).get("paired") or {}).get("acc_delta_pts") or {}
    return float(stats["low"]) if stats.get("n", 0) >= 2 and stats.get("low") is not None else None


def on_frontier(c: Candidate) -> bool:
    """A plain recipe at the base config's optimizer settings: not a method trial, not a tuned-plain one
    (those search the optimizer's knobs: the yardstick of methods that do, wus_tune._study.tuned_plain)."""
    return not c.uses_method and c.role != "tuned-plain"


def pooled_baseline(baselines: Sequence[Candidate]) -> Candidate | None:
    """The study's baseline as the comparisons see it: the first baseline trial, with each objective the
    median over every completed baseline trial (``baseline_repeats``); ``attrs["baseline_trials"]`` lists them."""
    if not baselines:
        return None
    first = baselines[0]
    if len(baselines) == 1:
        return first
    import statistics

    values = tuple(statistics.median(c.values[k] for c in baselines) for k in range(len(first.values)))
    return replace(first, values=values, attrs={**first.attrs, "baseline_trials": [c.number for c in baselines]})


def with_feasibility(cands: Sequence[Candidate], objectives: Sequence[str], constraint_delta: float) -> list[Candidate]:
    """``cands`` with ``feasible`` = accuracy >= baseline accuracy - ``constraint_delta`` points (the
    median over the COMPLETE baselines, as every comparison uses; all feasible while there is none)."""
    k = list(objectives).index("accuracy")
    baseline = pooled_baseline([c for c in cands if c.role == "baseline" and c.state == "COMPLETE" and c.values])
    if baseline is None:
        return [replace(c, feasible=True) for c in cands]
    floor = baseline.values[k] - constraint_delta / 100
    return [replace(c, feasible=c.values is None or c.values[k] >= floor) for c in cands]
