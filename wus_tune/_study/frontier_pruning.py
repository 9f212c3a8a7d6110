"""Early stopping against the baseline frontier, paired with the trial's own baseline seed (``pruner: frontier``).

A trial of a study with baseline runs is, with the same seed, the baseline until it first trains
differently; after that, its accuracy minus the baseline's recorded accuracy at the same epoch is the
effect of what it did, with the seed's noise paired out. This rule reads that *paired deficit* at every
epoch end after the trial deviated and projects where the trial can end (``docs/study.md``, "Early
stopping"):

* **accuracy**: the same-seed baseline's final accuracy minus the deficit now. With several seeds (one
  deficit per seed) the mean deficit and its 90% interval (:func:`wus_tune.intervals.mean_difference`);
  the optimistic end is the interval's low end (one seed: the deficit itself).
* **cost**, in the study's own time objective: the cost so far plus the remaining steps at the cheapest
  and at the dearest per-step price the trial has shown in any epoch so far. Prices are in units of the
  baseline run: an epoch's training FLOPs (and, for ``time``/``relative_time``, also its training
  seconds) over the baseline run's total, times the baseline's objective value. For a time objective the
  optimistic end is the cheaper of the FLOPs and the seconds reading (a trial's relative time is priced
  only when it ends, :mod:`wus_tune.pricing`).

It stops the trial when even the optimistic projection (highest accuracy, lowest cost) lies below the
baseline frontier (the completed plain runs' (cost, accuracy), linearly interpolated;
:func:`wus_tune._study.front.frontier_advantage`) by more than ``margin``, or when a completed trial is at
least ``margin`` more accurate at no more cost. Never judged: the baseline and frontier runs, enqueued
trials (unless ``prune_enqueued``), a trial whose config is the baseline's, a trial that has not yet
deviated from its baseline's curve (same accuracy, steps and FLOPs at every epoch so far, and not before
the check its method's replay names), the last epoch (nothing left to save), and every trial of a study
with more than two objectives (a third objective is not on the frontier's axes).

Like ``pruner: pareto`` it decides only from the values the storage holds (the baselines' curves, the
completed trials' values), so workers, forks, replays and Ray reach one decision. Pure functions on
numbers first, then :class:`FrontierPruner`, the thin part that reads and writes the storage.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from wus_tune._study.pruning import PROTECTED_ROLES, PRUNED_ATTR, SEARCH_ROLE, FrontierSettings

if TYPE_CHECKING:
    import optuna

    from wus_tune.trainer import EpochRecord

CURVE_ATTR = "pruner_curve"  # [[epoch, accuracy or None, steps, train FLOPs, train seconds], ...] per epoch
PROJECTION_ATTR = "pruner_projection"  # the last projection judged (Projection.to_dict())
TIME_OBJECTIVES = ("relative_time", "time", "cost")  # the first of these a study has is its cost axis


# ---- the rule on plain numbers -------------------------------------------------------------------------


def optimistic_deficit(deficits: Sequence[float]) -> tuple[float, float]:
    """(mean, optimistic end) of the paired deficits (baseline accuracy minus the trial's, one per seed):
    with one seed both are that deficit; with several, the low end of their 90% interval."""
    if not deficits:
        raise ValueError("optimistic_deficit of no deficits")
    if len(deficits) == 1:
        return float(deficits[0]), float(deficits[0])
    from wus_tune.intervals import mean_difference

    interval = mean_difference(deficits)
    return interval.mean, interval.low


def project_cost(spent: float, prices: Sequence[float], remaining_steps: int) -> tuple[float, float]:
    """(cheapest, dearest) final cost: ``spent`` plus ``remaining_steps`` at the lowest and at the highest
    per-step price in ``prices``."""
    if not prices:
        return spent, spent
    return spent + remaining_steps * min(prices), spent + remaining_steps * max(prices)


def frontier_accuracy(cost: float, frontier: Sequence[tuple[float, float]]) -> float | None:
    """The frontier's accuracy at ``cost`` (``frontier``: (cost, accuracy) of the plain runs): linear between
    its points, flat beyond the dearest, None cheaper than the cheapest (nothing measured there)."""
    from wus_tune._study.front import frontier_advantage

    gain = frontier_advantage(cost, 0.0, frontier).acc_gain
    return None if gain is None else -gain


@dataclass(frozen=True)
class Verdict:
    stop: bool
    frontier_accuracy: float | None  # the frontier's accuracy at the optimistic cost
    dominated_by: int | None  # the completed trial that beats the optimistic projection by the margin


def judge(accuracy: float, cost: float, *, frontier: Sequence[tuple[float, float]],
          completed: Mapping[int, tuple[float, float]], margin: float) -> Verdict:  # fmt: skip
    """Stop when the optimistic point ``(accuracy, cost)`` is more than ``margin`` below the frontier at
    its cost, or when a completed trial (number -> (accuracy, cost)) is ``margin`` more accurate at no more
    cost. Differences within 1e-12 of the margin count as within it."""
    f = frontier_accuracy(cost, frontier)
    below = f is not None and accuracy < f - margin - 1e-12
    beaten = [n for n, (a, c) in sorted(completed.items()) if c <= cost and a > accuracy + margin + 1e-12]
    return Verdict(stop=below or bool(beaten), frontier_accuracy=f, dominated_by=beaten[0] if beaten else None)


@dataclass(frozen=True)
class Projection:
    """Where a trial can still end, as judged at the end of ``epoch``, and the verdict."""

    epoch: int
    deficit: float  # mean paired deficit (baseline accuracy - trial accuracy) at this epoch
    deficit_optimistic: float  # its optimistic end (one seed: the deficit)
    seeds: int  # paired baselines
    accuracy: float  # optimistic final accuracy: baseline final accuracy - deficit_optimistic
    cost_low: float  # final cost at the cheapest per-step price shown
    cost_high: float  # ... at the dearest
    frontier_accuracy: float | None
    dominated_by: int | None
    margin: float
    stop: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def reason(self, objective: str) -> str:
        where = f"optimistic projection (accuracy {self.accuracy:.4f}, {objective} {self.cost_low:.4g})"
        if self.frontier_accuracy is not None and self.accuracy < self.frontier_accuracy - self.margin - 1e-12:
            why = (f"{(self.frontier_accuracy - self.accuracy) * 100:.2f} points below the baseline frontier "
                   f"({self.frontier_accuracy:.4f} at that {objective}; margin {self.margin * 100:g} points)")  # fmt: skip
        else:
            why = f"beaten by completed trial {self.dominated_by} by more than {self.margin * 100:g} points at no more {objective}"
        return f"pruned at epoch {self.epoch}: paired deficit {self.deficit * 100:.2f} points; {where} is {why}"


def project(*, epoch: int, deficits: Sequence[float], baseline_accuracy: float, spent: Sequence[float],
            prices: Sequence[Sequence[float]], remaining_steps: int, frontier: Sequence[tuple[float, float]],
            completed: Mapping[int, tuple[float, float]], margin: float) -> Projection:  # fmt: skip
    """The projection and verdict at one check. ``spent[m]`` and ``prices[m]`` are the cost so far and the
    per-step prices of each epoch in one reading ``m`` of the cost (FLOPs; seconds), both in the study's
    objective units; the cheapest reading gives the low end, the dearest the high end."""
    mean, optimistic = optimistic_deficit(deficits)
    ends = [project_cost(s, p, remaining_steps) for s, p in zip(spent, prices)]
    low, high = min(e[0] for e in ends), max(e[1] for e in ends)
    accuracy = baseline_accuracy - optimistic
    v = judge(accuracy, low, frontier=frontier, completed=completed, margin=margin)
    return Projection(epoch=epoch, deficit=mean, deficit_optimistic=optimistic, seeds=len(deficits), accuracy=accuracy,
                      cost_low=low, cost_high=high, frontier_accuracy=v.frontier_accuracy, dominated_by=v.dominated_by,
                      margin=margin, stop=v.stop)  # fmt: skip


def curve_row(record: EpochRecord) -> list[Any]:
    """One epoch as the curves store it: [epoch, validation accuracy or None, steps, training FLOPs, training seconds]."""
    acc = None if record.val_acc is None else float(record.val_acc)
    return [record.epoch, acc, int(record.steps), float(record.flops), float(record.train_time_s)]


def deviated(curve: Sequence[Sequence[Any]], baseline: Sequence[Sequence[Any]]) -> bool:
    """Whether a trial's curve rows (epoch, accuracy, steps, FLOPs, seconds) differ from the baseline's rows
    of the same epochs in accuracy, steps or FLOPs (seconds always differ). Unknown epochs: deviated."""
    rows = {int(r[0]): r for r in baseline}
    for r in curve:
        b = rows.get(int(r[0]))
        if b is None or (r[1], r[2], r[3]) != (b[1], b[2], b[3]):
            return True
    return False


def first_deviating_epoch(first_check: int | None, progress: float | None, epochs: int) -> int | None:
    """The first epoch whose end can differ from the baseline's, for a trial whose method's replay says it
    leaves plain training after probe ``first_check`` at training fraction ``progress`` (0: from its first
    step; None: never). None when the replay said nothing."""
    if first_check is None:
        return None
    if first_check == 0 or progress is None:
        return 1
    return math.floor(progress * epochs + 1e-9) + 1


# ---- the storage side ----------------------------------------------------------------------------------


@dataclass
class _Yardstick:
    """The study's paired baselines for one trial, and their totals (from their stored curves)."""

    curves: list[list[list[Any]]]
    final_accuracy: float  # mean over the paired baselines of their final accuracy objective
    units: list[float]  # per reading (FLOPs, seconds): objective units per unit of that reading
    configs: list[dict[str, Any]]


class FrontierPruner:
    """Called after every epoch of a trial (from ``fit``'s ``on_epoch``): keeps the trial's curve and, after
    the trial deviated from its baseline, raises :class:`optuna.TrialPruned` when the rule says so."""

    def __init__(self, settings: FrontierSettings, objectives: Sequence[str]) -> None:
        self.settings = settings
        self.objectives = tuple(objectives)
        self.cost_name = next((o for o in self.objectives if o in TIME_OBJECTIVES), None)
        # a third objective is not on the frontier's axes: such a study is never judged, only recorded
        self.active = len(self.objectives) == 2 and "accuracy" in self.objectives and self.cost_name is not None
        self.readings = ("flops",) if self.cost_name == "cost" else ("flops", "train_s")

    def protected(self, role: str) -> bool:
        return role in PROTECTED_ROLES or (role != SEARCH_ROLE and not self.settings.prune_enqueued)

    def for_trial(self, trial: optuna.Trial, *, role: str, epochs: int, config: Any = None, plan: Any = None) -> TrialFrontier:
        return TrialFrontier(self, trial, role=role, epochs=epochs, config=config, plan=plan)


class TrialFrontier:
    """One trial's side of the frontier rule: ``__call__(record)`` after each epoch."""

    def __init__(self, pruner: FrontierPruner, trial: optuna.Trial, *, role: str, epochs: int, config: Any, plan: Any) -> None:
        self.pruner, self.trial, self.role, self.epochs = pruner, trial, role, epochs
        self.config = config.to_dict() if config is not None and hasattr(config, "to_dict") else config
        self.curve: list[list[Any]] = []
        self.yardstick: _Yardstick | None = None
        self.last: dict[str, Any] | None = None
        self.not_before = _not_before(plan, epochs)
        self.judged = pruner.active and not pruner.protected(role) and self.not_before != -1

    def __call__(self, record: EpochRecord) -> None:
        self.curve.append(curve_row(record))
        if record.epoch >= self.epochs:  # the last epoch: nothing left to save; the curve is the yardstick's
            self.trial.set_user_attr(CURVE_ATTR, self.curve)
            if self.last is not None:
                self.trial.set_user_attr(PROJECTION_ATTR, self.last)
            return
        if not self.judged or (self.not_before is not None and record.epoch < self.not_before):
            return
        projection = self.project(record)
        if projection is None:
            return
        self.last = projection.to_dict()
        if projection.stop:
            import optuna

            reason = projection.reason(self.pruner.cost_name or "cost")
            self.trial.set_user_attr(CURVE_ATTR, self.curve)
            self.trial.set_user_attr(PROJECTION_ATTR, self.last)
            self.trial.set_user_attr(PRUNED_ATTR, {"epoch": record.epoch, "reason": reason})
            raise optuna.TrialPruned(reason)

    def project(self, record: EpochRecord) -> Projection | None:
        """The projection at this epoch, or None when the trial cannot be judged (yet): no paired baseline,
        not deviated, no validation accuracy this epoch."""
        import optuna

        trials = self.trial.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        if self.yardstick is None:
            self.yardstick = self._yardstick(trials)
            if self.yardstick is None:
                return None
            if any(_same_config(self.config, c) for c in self.yardstick.configs):
                self.judged = False  # the baseline's own config: it never deviates
                return None
        y = self.yardstick
        if not any(deviated(self.curve, b) for b in y.curves):
            return None
        acc = self.curve[-1][1]
        mine = [b[record.epoch - 1][1] for b in y.curves if len(b) >= record.epoch and b[record.epoch - 1][0] == record.epoch]
        if acc is None or not mine or None in mine:
            return None
        k_acc = self.pruner.objectives.index("accuracy")
        k_cost = 1 - k_acc
        frontier, completed = [], {}
        from wus_tune._study.candidates import candidate_from_trial
        from wus_tune._study.front import on_frontier

        for t in trials:
            if t.number == self.trial.number or not t.values:
                continue
            c = candidate_from_trial(t)
            point = (float(t.values[k_acc]), float(t.values[k_cost]))
            completed[t.number] = point
            if on_frontier(c):
                frontier.append((point[1], point[0]))
        spent, prices = [], []
        for col, unit in zip((3, 4), y.units):
            spent.append(sum(r[col] for r in self.curve) * unit)
            prices.append([r[col] / r[2] * unit for r in self.curve if r[2] > 0])
        return project(epoch=record.epoch, deficits=[b - acc for b in mine], baseline_accuracy=y.final_accuracy,
                       spent=spent, prices=prices, remaining_steps=(self.epochs - record.epoch) * int(record.steps),
                       frontier=frontier, completed=completed, margin=self.pruner.settings.margin)  # fmt: skip

    def _yardstick(self, trials: Sequence[optuna.trial.FrozenTrial]) -> _Yardstick | None:
        """The completed baseline runs of this trial's seed and epochs that stored their curve."""
        seed = (self.config or {}).get("seed")
        k_acc = self.pruner.objectives.index("accuracy")
        picked = []
        for t in trials:
            a = t.user_attrs
            cfg = a.get("config") or {}
            curve = a.get(CURVE_ATTR)
            if a.get("role") != "baseline" or not t.values or not curve or cfg.get("seed") != seed:
                continue
            if cfg.get("epochs") != self.epochs or len(curve) != self.epochs:
                continue
            picked.append((t, curve, cfg))
        if not picked:
            return None
        k_cost = 1 - k_acc
        units = []
        for col in (3, 4)[: len(self.pruner.readings)]:
            per = [float(t.values[k_cost]) / s for t, curve, _ in picked if (s := sum(r[col] for r in curve)) > 0]
            if not per:
                return None
            units.append(sum(per) / len(per))
        final = sum(float(t.values[k_acc]) for t, _, _ in picked) / len(picked)
        return _Yardstick(curves=[c for _, c, _ in picked], final_accuracy=final, units=units, configs=[c for _, _, c in picked])


def _not_before(plan: Any, epochs: int) -> int | None:
    """The first epoch the trial may be judged at from its reuse plan: -1 when its method's replay says it
    never deviates; None when the plan says nothing."""
    if plan is None or getattr(plan, "replay", None) is None:
        return None
    check = plan.replay.check
    if check is None:
        return -1
    probes = getattr(getattr(plan, "baseline", None), "probes", None) or []
    progress = probes[check - 1].get("progress") if 0 < check <= len(probes) else None
    return first_deviating_epoch(check, progress, epochs)


def _same_config(a: Mapping[str, Any] | None, b: Mapping[str, Any] | None) -> bool:
    if not a or not b:
        return False
    return {k: v for k, v in a.items() if k != "meta"} == {k: v for k, v in b.items() if k != "meta"}
