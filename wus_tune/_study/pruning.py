"""Pareto-aware early stopping for multi-objective studies (``pruner: pareto``), and the settings of both rules.

``pruner: frontier``, the rule meant to be left on (a trial paired with its baseline seed against the
baseline frontier), is :mod:`wus_tune._study.frontier_pruning`; its settings are parsed here with these.
``pareto`` is kept so that specs naming it run as before.

Optuna 5 refuses ``Trial.report`` and ``should_prune`` in multi-objective studies, so this pruner keeps
its own rung values, as trial user attributes, and decides from what the storage holds: any number of
workers on any number of machines reach the same decision from the same stored values.

The rule (documented with its reasons in ``docs/study.md``, "Early stopping"):

* **Rungs** at ``round(epochs / eta**k)`` for k = 1, 2, ... while that is at least ``min_epochs`` (and
  below ``epochs``): with 40 epochs and eta 3, epochs 13 and 4.
* **At a rung** a trial is compared with every trial of the same epoch budget that reached the same
  rung (COMPLETE, PRUNED or RUNNING) on two numbers: its accuracy there (validation accuracy; training
  accuracy when the epoch was not evaluated) and its cost so far in the study's time objective (summed
  training FLOPs for ``cost``, summed training seconds for ``time``).
* **Ranking**: points within the tolerance of one another in both numbers (0 in accuracy; a relative
  ``cost_tolerance`` in cost: exactly equal FLOPs, 5% of the rung's median time) are one *tie group*;
  groups are sorted into non-dominated fronts; inside a front an epsilon-net orders them (start at the
  most accurate, then repeatedly the group farthest, in range-normalised units, from those chosen), so
  the kept ones spread along the front instead of crowding one end.
* **Decision**: with ``n`` trials at the rung (the candidate included), the candidate continues if fewer
  than ``ceil(n / eta)`` trials stand in groups ahead of its own, or if ``n < eta`` (too few to judge).
  Trials in one tie group share a fate: identical runs (a WUS trial that has not skipped yet is the
  baseline, step for step) are never split by their trial number.
* **Never pruned**: the baseline and the baseline frontier; enqueued default trials too unless
  ``prune_enqueued`` is true. They record their rung values all the same: they are the yardstick.

Pure functions on plain numbers first (points are minimised: ``(-accuracy, cost)``), then
:class:`ParetoPruner`, the thin part that reads and writes the storage through Optuna's public API.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from wus_tune.errors import UsageError

if TYPE_CHECKING:
    import optuna

    from wus_tune.trainer import EpochRecord

PRUNERS = ("none", "pareto", "frontier")
RUNGS_ATTR = "pruner_rungs"  # {"epochs": E, "values": {"<epoch>": [accuracy, cost so far]}}
DECISIONS_ATTR = "pruner_decisions"  # [{"epoch", "n", "ahead", "slots", "keep", "compared"}], one per rung
PRUNED_ATTR = "pruned"  # {"epoch": e, "reason": "..."} on a pruned trial
CURVE_ATTR = "epoch_values"  # [[epoch, accuracy, cost so far], ...]: a pruned trial's per-epoch values
PROTECTED_ROLES = ("baseline", "baseline-frontier")  # the yardstick: never pruned
SEARCH_ROLE = "search"  # sampled trials; every other role is an enqueued default trial

Point = tuple[float, float]  # (-accuracy, cost): both minimised


# ---- settings ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PrunerSettings:
    """``pruner_options`` of a spec (``pruner: pareto``)."""

    eta: int = 3  # reduction factor: rungs at epochs / eta**k; the top 1/eta of a rung continues
    min_epochs: int = 2  # no rung before this many epochs
    prune_enqueued: bool = False  # may enqueued default trials (wus-default, method defaults, enqueue:) be pruned
    cost_tolerance: float | None = None  # relative; costs closer than this are a tie. None: 0 for FLOPs, 0.05 for time

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class FrontierSettings:
    """``pruner_options`` of a spec with ``pruner: frontier`` (:mod:`wus_tune._study.frontier_pruning`)."""

    margin: float = 0.01  # accuracy (fraction): stopped only when this far below the frontier or a completed trial
    prune_enqueued: bool = False  # may enqueued default trials (wus-default, method defaults, enqueue:) be stopped

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_settings(name: Any, options: Any) -> PrunerSettings | FrontierSettings | None:
    """``pruner`` and ``pruner_options`` of a spec -> settings (None for ``none``); one-line UsageError."""
    if name not in PRUNERS:
        raise UsageError(f"pruner: unknown pruner {name!r}; choose one of {', '.join(PRUNERS)}")
    if not isinstance(options, Mapping):
        raise UsageError(f"pruner_options: expected a mapping, got {options!r}")
    if name == "frontier":
        return _frontier_settings(options)
    known = {f for f in PrunerSettings.__dataclass_fields__}
    for key in options:
        if key not in known:
            raise UsageError(f"pruner_options.{key}: unknown option; known: {', '.join(sorted(known))}")
    if name == "none":
        return None
    s = PrunerSettings(**options)
    for key, low in (("eta", 2), ("min_epochs", 1)):
        v = getattr(s, key)
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise UsageError(f"pruner_options.{key}: expected an integer >= {low}, got {v!r}")
    if not isinstance(s.prune_enqueued, bool):
        raise UsageError(f"pruner_options.prune_enqueued: expected true or false, got {s.prune_enqueued!r}")
    t = s.cost_tolerance
    if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t < 1):
        raise UsageError(f"pruner_options.cost_tolerance: expected a fraction in [0, 1), got {t!r}")
    return s


def _frontier_settings(options: Mapping[str, Any]) -> FrontierSettings:
    known = set(FrontierSettings.__dataclass_fields__)
    for key in options:
        if key not in known:
            raise UsageError(f"pruner_options.{key}: unknown option for pruner frontier; known: {', '.join(sorted(known))}")
    s = FrontierSettings(**options)
    m = s.margin
    if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0 <= m < 1:
        raise UsageError(f"pruner_options.margin: expected an accuracy fraction in [0, 1), got {m!r}")
    if not isinstance(s.prune_enqueued, bool):
        raise UsageError(f"pruner_options.prune_enqueued: expected true or false, got {s.prune_enqueued!r}")
    return s


# ---- the rule on plain numbers -------------------------------------------------------------------------


def rung_epochs(epochs: int, *, eta: int, min_epochs: int) -> tuple[int, ...]:
    """The epochs after which a trial of ``epochs`` epochs is judged, ascending."""
    out = set()
    k = 1
    while True:
        e = round(epochs / eta**k)
        if e < min_epochs:
            break
        if e < epochs:
            out.add(e)
        k += 1
    return tuple(sorted(out))


def dominates(a: Point, b: Point, tolerance: Point = (0.0, 0.0)) -> bool:
    """``a`` is no worse than ``b`` beyond the tolerance in both numbers and better beyond it in one."""
    return all(x <= y + t for x, y, t in zip(a, b, tolerance)) and any(x < y - t for x, y, t in zip(a, b, tolerance))


def tie_groups(points: Sequence[Point], tolerance: Point = (0.0, 0.0)) -> list[list[int]]:
    """Indices grouped by "within the tolerance in both numbers" (closed transitively), each group sorted,
    groups in order of their first index."""
    parent = list(range(len(points)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(len(points)):
        for j in range(i + 1, len(points)):
            if all(abs(x - y) <= t for x, y, t in zip(points[i], points[j], tolerance)):
                parent[root(j)] = root(i)
    groups: dict[int, list[int]] = {}
    for i in range(len(points)):
        groups.setdefault(root(i), []).append(i)
    return sorted(groups.values(), key=lambda g: g[0])


def nondominated_fronts(points: Sequence[Point], tolerance: Point = (0.0, 0.0)) -> list[int]:
    """The front of each point: 0 for the non-dominated ones, 1 for those dominated only by front 0, ..."""
    front = [-1] * len(points)
    remaining = set(range(len(points)))
    level = 0
    while remaining:
        current = {i for i in remaining if not any(dominates(points[j], points[i], tolerance) for j in remaining if j != i)}
        if not current:  # only possible with a tolerance that makes dominance cyclic: close the rest at once
            current = set(remaining)
        for i in current:
            front[i] = level
        remaining -= current
        level += 1
    return front


def epsilon_net_order(points: Sequence[Point], scale: Point = (1.0, 1.0)) -> list[int]:
    """Indices of ``points`` (one front) in farthest-first order: the most accurate first (then the
    cheaper, then the lower index), then repeatedly the point whose distance to the nearest chosen one,
    in units of ``scale``, is largest (ties: more accurate, then lower index). Deterministic."""
    if not points:
        return []
    norm = [tuple(v / s for v, s in zip(p, scale)) for p in points]
    start = min(range(len(points)), key=lambda i: (points[i][0], points[i][1], i))
    order = [start]
    left = [i for i in range(len(points)) if i != start]
    nearest = {i: math.dist(norm[i], norm[start]) for i in left}
    while left:
        pick = max(left, key=lambda i: (nearest[i], -points[i][0], -i))
        order.append(pick)
        left.remove(pick)
        for i in left:
            nearest[i] = min(nearest[i], math.dist(norm[i], norm[pick]))
    return order


def rung_ranking(points: Sequence[Point], tolerance: Point = (0.0, 0.0)) -> list[list[int]]:
    """The tie groups of ``points`` (lists of indices), best first: front by front, inside a front in
    epsilon-net order of the groups' mean points (scaled by each number's range over all points)."""
    if not points:
        return []
    groups = tie_groups(points, tolerance)
    reps = [tuple(sum(points[i][k] for i in g) / len(g) for k in range(2)) for g in groups]
    fronts = nondominated_fronts(reps, tolerance)  # type: ignore[arg-type]
    scale = tuple((max(p[k] for p in points) - min(p[k] for p in points)) or 1.0 for k in range(2))
    ranked: list[list[int]] = []
    for level in range(max(fronts) + 1):
        members = [g for g, f in enumerate(fronts) if f == level]
        for pos in epsilon_net_order([reps[g] for g in members], scale):  # type: ignore[misc]
            ranked.append(groups[members[pos]])
    return ranked


@dataclass(frozen=True)
class RungDecision:
    """Whether the candidate continues at a rung, and why."""

    keep: bool
    n: int  # trials at the rung, the candidate included
    ahead: int  # trials in tie groups ranked before the candidate's
    slots: int  # ceil(n / eta): how many continue

    def reason(self, epoch: int, objective: str) -> str:
        return (f"pruned at epoch {epoch}: {self.ahead} of the {self.n} trials at this rung rank ahead of it on "
                f"(accuracy, {objective} so far); only the top {self.slots} continue")  # fmt: skip


def decide(candidate: int, points: Sequence[Point], *, eta: int, tolerance: Point = (0.0, 0.0)) -> RungDecision:
    """The rung decision for ``points[candidate]`` among ``points`` (every trial at the rung)."""
    n = len(points)
    slots = math.ceil(n / eta)
    ahead = 0
    for group in rung_ranking(points, tolerance):
        if candidate in group:
            break
        ahead += len(group)
    return RungDecision(keep=n < eta or ahead < slots, n=n, ahead=ahead, slots=slots)


def rung_tolerance(costs: Sequence[float], relative: float) -> Point:
    """(accuracy tolerance, cost tolerance) at one rung: 0, and ``relative`` times the median cost."""
    ordered = sorted(costs)
    median = ordered[len(ordered) // 2] if ordered else 0.0
    return (0.0, relative * abs(median))


# ---- the storage side ----------------------------------------------------------------------------------


class ParetoPruner:
    """Called after every epoch of a trial (from ``fit``'s ``on_epoch``): records the per-epoch values,
    stores the rung values, and at a rung raises :class:`optuna.TrialPruned` if the rule says so."""

    def __init__(self, settings: PrunerSettings, objectives: Sequence[str]) -> None:
        self.settings = settings
        # "time" compares wall seconds so far; "cost" and "relative_time" compare FLOPs so far, because a
        # trial's relative time is priced only when it ends (wus_tune.timing), not at a rung.
        self.cost_name = objectives[1]
        default_tol = 0.05 if self.cost_name == "time" else 0.0
        self.relative_tolerance = default_tol if settings.cost_tolerance is None else settings.cost_tolerance

    def protected(self, role: str) -> bool:
        return role in PROTECTED_ROLES or (role != SEARCH_ROLE and not self.settings.prune_enqueued)

    def for_trial(self, trial: optuna.Trial, *, role: str, epochs: int, **_: Any) -> TrialPruning:
        """The trial's per-epoch hook (``config`` and ``plan``, which the frontier rule reads, are not needed)."""
        return TrialPruning(self, trial, role=role, epochs=epochs)

    def epoch_cost(self, record: EpochRecord) -> float:
        return float(record.train_time_s if self.cost_name == "time" else record.flops)


class TrialPruning:
    """One trial's side of the pruner: ``__call__(record)`` after each epoch."""

    def __init__(self, pruner: ParetoPruner, trial: optuna.Trial, *, role: str, epochs: int) -> None:
        s = pruner.settings
        self.pruner, self.trial, self.role, self.epochs = pruner, trial, role, epochs
        self.rungs = rung_epochs(epochs, eta=s.eta, min_epochs=s.min_epochs)
        self.curve: list[list[float]] = []
        self.values: dict[str, list[float]] = {}
        self.decisions: list[dict[str, Any]] = []
        self.cost = 0.0

    def __call__(self, record: EpochRecord) -> None:
        acc = record.val_acc if record.val_acc is not None else record.train_acc
        self.cost += self.pruner.epoch_cost(record)
        self.curve.append([record.epoch, float(acc), self.cost])
        if record.epoch not in self.rungs:
            return
        self.values[str(record.epoch)] = [float(acc), self.cost]
        self.trial.set_user_attr(RUNGS_ATTR, {"epochs": self.epochs, "values": dict(self.values)})
        if self.pruner.protected(self.role):
            return
        decision, compared = self.judge(record.epoch)
        self.decisions.append({"epoch": record.epoch, "n": decision.n, "ahead": decision.ahead,
                               "slots": decision.slots, "keep": decision.keep, "compared": compared})  # fmt: skip
        self.trial.set_user_attr(DECISIONS_ATTR, list(self.decisions))
        if not decision.keep:
            import optuna

            reason = decision.reason(record.epoch, self.pruner.cost_name)
            self.trial.set_user_attr(CURVE_ATTR, self.curve)
            self.trial.set_user_attr(PRUNED_ATTR, {"epoch": record.epoch, "reason": reason})
            raise optuna.TrialPruned(reason)

    def judge(self, epoch: int) -> tuple[RungDecision, list[int]]:
        """The decision from every stored trial at this rung; also the trial numbers compared."""
        import optuna

        states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.RUNNING)
        points: list[Point] = []
        numbers: list[int] = []
        me = self.trial.number
        for t in self.trial.study.get_trials(deepcopy=False, states=states):
            if t.number == me:
                continue
            value = rung_value(t.user_attrs, epoch, self.epochs)
            if value is not None:
                points.append((-value[0], value[1]))
                numbers.append(t.number)
        acc, cost = self.values[str(epoch)]
        points.append((-acc, cost))
        numbers.append(me)
        tol = rung_tolerance([p[1] for p in points], self.pruner.relative_tolerance)
        return decide(len(points) - 1, points, eta=self.pruner.settings.eta, tolerance=tol), sorted(numbers)


def rung_value(user_attrs: Mapping[str, Any], epoch: int, epochs: int) -> tuple[float, float] | None:
    """(accuracy, cost so far) a trial stored at ``epoch``, if it has the same epoch budget."""
    stored = user_attrs.get(RUNGS_ATTR)
    if not isinstance(stored, Mapping) or stored.get("epochs") != epochs:
        return None
    value = (stored.get("values") or {}).get(str(epoch))
    if not value or len(value) != 2:
        return None
    return float(value[0]), float(value[1])
