"""Confirmation runs: does a study's pick deliver what the study claims, when trained again?

``python -m wus_tune.pareto --study S --confirm auto`` (or ``--confirm K``, or a spec's ``confirm:``) trains,
in this one process, rounds of three configs with fresh seeds: the full-length baseline, the pick (the
study's rule, ``--select``, or any completed trial given with ``--trial N``) and the baseline-frontier point
whose time is nearest the pick's (a plain run at fewer epochs: what simply training less achieves). Each
round runs the three interleaved, in an order rotated from round to round, so a load on the machine hits
the three alike. Every comparison is paired within a round (same seed, same moment):

* speed-up: per round, baseline / pick in the study's own time objective (relative time for a
  relative-time study, wall seconds for ``time``, FLOPs for ``cost``); wall seconds are shown beside it.
  Its 90% interval is that of the geometric mean of the per-round ratios (:mod:`wus_tune.intervals`);
* accuracy difference, pick - baseline and pick - frontier point, in points, with its 90% interval;
* held-out test accuracy of the three (when the dataset has a test split; never used for selection).

The claim is the study's own: speed-up = baseline / pick in the time objective, accuracy delta = pick -
baseline (pooled over the baseline's runs). Its thresholds: the speed-up must reach
``(1 - SPEED_TOLERANCE)`` of the claim; the accuracy difference must reach, for ``fastest-within:D``, ``-D``
points (the rule's promise), otherwise (other rules, a trial named with ``--trial``) the claimed delta
minus ``ACCURACY_TOLERANCE_PTS``. Rounds are added, up to ``max_rounds``, until both intervals lie on one
side of their thresholds. The verdict: **holds** (both intervals at or above), **fails** (either entirely
below), or **undecided** (the cap was reached first), with the intervals. One round gives no interval:
``--confirm 1`` is refused. When the frontier point is as accurate as the pick and about as fast (both
within the intervals), the summary says so and names it the simpler choice. When the study claimed an
interval for the pick (several paired seeds per trial), the summary says whether the fresh measurement's
mean lies inside it.

The result is stored on the Optuna study (user attribute ``confirmation``), logged to MLflow under the
study's parent run (metrics ``confirm/*``, one child run per training, ``confirmation.json`` /
``confirmation.txt``) and printed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from wus_tune.errors import UsageError
from wus_tune.intervals import Interval, decide, mean_difference, ratio_interval
from wus_tune.timing import spread

if TYPE_CHECKING:
    import optuna

    from wus_tune._study.front import Analysis, Candidate, Rule
    from wus_tune.trainer import TrainResult

__all__ = ["ACCURACY_TOLERANCE_PTS", "MAX_ROUNDS", "SPEED_TOLERANCE", "Confirmation", "ConfirmRun", "confirm",
           "confirm_study", "parse_rounds"]  # fmt: skip

SPEED_TOLERANCE = 0.10  # measured speed-up may fall this fraction short of the claim
ACCURACY_TOLERANCE_PTS = 1.0  # rules other than fastest-within: mean accuracy this many points below the claim
SEED_OFFSET = 1000  # confirmation seeds: the base config's seed + SEED_OFFSET + round (never a trial's seed)
ROLES = ("baseline", "pick", "frontier")
AUTO_START_ROUNDS = 3  # --confirm auto: rounds before the first decision
MAX_ROUNDS = 8  # rounds at most unless --confirm K asks for more
VERDICTS = {("above", "above"): "holds"}  # anything with a "below" fails; the rest is undecided


def parse_rounds(value: Any) -> int | str:
    """``"auto"`` or a number of rounds >= 2 (from the CLI or a spec); anything else is a UsageError."""
    if value == "auto":
        return "auto"
    try:
        rounds = int(value) if not isinstance(value, bool) and str(value).strip().lstrip("-").isdigit() else None
    except (TypeError, ValueError):
        rounds = None
    if rounds is None or rounds < 1:
        raise UsageError(f"--confirm: expected auto or a number of rounds >= 2, got {value!r}")
    if rounds == 1:
        raise UsageError(f"--confirm {rounds}: one paired round gives no interval to decide with; "
                         "use --confirm auto or --confirm 2 or more")  # fmt: skip
    return rounds


@dataclass
class ConfirmRun:
    role: str  # baseline | pick | frontier
    trial: int  # the study trial whose config it re-ran
    round: int
    seed: int
    val_acc: float
    test_acc: float | None
    time_s: float  # wall seconds, as the trainer charges them
    relative_time: float | None  # priced against the baseline config
    cost_flops: float | None = None


@dataclass
class Confirmation:
    """The outcome of :func:`confirm`; ``to_dict`` is what is stored and logged."""

    study: str
    rule: str
    objective: str  # the study's time objective (relative_time, time or cost)
    repeats: int  # rounds run
    pick: int
    baseline: int
    frontier: int | None
    claimed_speedup: float
    claimed_acc_delta_pts: float
    runs: list[ConfirmRun] = field(default_factory=list)
    speedup: dict[str, float] = field(default_factory=dict)  # paired ratios baseline / pick in the objective: interval
    wall_speedup: dict[str, float] = field(default_factory=dict)  # the same in wall seconds: interval
    acc_delta_pts: dict[str, float] = field(default_factory=dict)  # pick - baseline, validation: interval
    frontier_acc_delta_pts: dict[str, float] = field(default_factory=dict)  # pick - frontier point: interval
    frontier_speedup: dict[str, float] = field(default_factory=dict)  # frontier / pick in the objective: interval
    test_acc: dict[str, dict[str, float]] = field(default_factory=dict)  # role -> spread (test split only)
    val_acc: dict[str, dict[str, float]] = field(default_factory=dict)  # role -> spread
    speed_threshold: float = 0.0  # the speed-up the interval had to clear
    accuracy_floor_pts: float = 0.0  # the accuracy difference the interval had to clear
    speed: str = "undecided"  # holds | fails | undecided
    accuracy: str = "undecided"
    verdict: str = "undecided"  # holds | fails | undecided
    max_rounds: int = MAX_ROUNDS
    claimed_interval: dict[str, Any] = field(default_factory=dict)  # the study's own paired interval, when it had one
    claim_held: dict[str, bool] = field(default_factory=dict)  # fresh mean inside the claimed interval, per figure
    simpler_choice: bool = False  # the frontier point is as accurate and about as fast

    @property
    def confirmed(self) -> bool:
        return self.verdict == "holds"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["confirmed"] = self.confirmed
        return d

    def summary(self) -> str:
        """A few lines for people: the claim, the measurement with its intervals, the verdict."""
        s, a = self.speedup, self.acc_delta_pts
        unit = {"relative_time": "relative time", "time": "wall time", "cost": "FLOPs"}.get(self.objective, self.objective)
        lines = [
            f"confirmation of trial {self.pick} ({self.rule}), {self.repeats} interleaved rounds of baseline "
            f"(trial {self.baseline}), pick" + (f" and frontier point (trial {self.frontier})" if self.frontier is not None else "")
            + ", fresh seeds:",
            f"  claimed:  {self.claimed_speedup:.2f}x ({unit}), {self.claimed_acc_delta_pts:+.2f} pts vs baseline",
            f"  measured: {_ratio(s)} ({unit}, 90% interval)"
            + (f", {_ratio(self.wall_speedup)} wall" if self.wall_speedup and self.objective != "time" else "")
            + f"; {_points(a)}",
        ]  # fmt: skip
        if self.frontier_acc_delta_pts:
            lines.append(f"  vs the frontier point: {_points(self.frontier_acc_delta_pts)} at "
                         f"{_ratio(self.frontier_speedup)} its {unit} (frontier / pick)")  # fmt: skip
        for key, held in self.claim_held.items():
            c = self.claimed_interval[key]
            fresh = self.acc_delta_pts["mean"] if key == "acc_delta_pts" else self.speedup["mean"]
            lines.append(f"  the study's claimed interval for {key.replace('_', ' ')} [{c['low']:.2f}, {c['high']:.2f}] "
                         f"({c['n']} paired seeds): the fresh mean {fresh:.2f} lies {'inside' if held else 'outside'}")  # fmt: skip
        for role in ROLES:
            if role in self.val_acc:
                v = self.val_acc[role]
                t = self.test_acc.get(role)
                lines.append(f"  {role:<9} validation {v['mean'] * 100:.2f}% (std {v['std'] * 100:.2f})"
                             + (f", test {t['mean'] * 100:.2f}% (std {t['std'] * 100:.2f})" if t else ""))  # fmt: skip
        if self.test_acc:
            lines.append("  (test accuracy: held out, shown only; never used to select)")
        lines.append(
            f"  {self.verdict}: speed-up {self.speed} (needs >= {self.speed_threshold:.2f}x), accuracy {self.accuracy} "
            f"(needs >= {self.accuracy_floor_pts:+.2f} pts)"
            + (f"; undecided after {self.repeats} rounds (the cap): the difference is within the noise" if self.verdict == "undecided" else "")
        )  # fmt: skip
        if self.simpler_choice:
            lines.append(f"  the frontier point (trial {self.frontier}, plain training, fewer epochs) is as accurate and "
                         "about as fast within the intervals: it is the simpler choice")  # fmt: skip
        return "\n".join(lines)


def _ratio(stats: dict[str, float]) -> str:
    if stats.get("n", 0) < 2 or stats.get("low") is None:
        return f"{stats['mean']:.2f}x"
    return f"{stats['mean']:.2f}x [{stats['low']:.2f}, {stats['high']:.2f}]"


def _points(stats: dict[str, float]) -> str:
    if stats.get("n", 0) < 2 or stats.get("low") is None:
        return f"{stats['mean']:+.2f} pts"
    return f"{stats['mean']:+.2f} pts [{stats['low']:+.2f}, {stats['high']:+.2f}]"


def frontier_point(analysis: Analysis, pick: Candidate) -> Candidate | None:
    """The plain frontier trial (not a full-length baseline) whose time is nearest the pick's (in log ratio);
    None when the pick is a plain frontier trial itself (it is its own yardstick: no runs twice over)."""
    points = [c for c in analysis.frontier if c.role != "baseline" and c.values[1] > 0]
    if any(c.number == pick.number for c in analysis.frontier) or not points or not pick.values[1] > 0:
        return None
    return min(points, key=lambda c: (abs(math.log(c.values[1] / pick.values[1])), c.number))


def confirm(
    analysis: Analysis,
    *,
    study_name: str,
    rule: Rule,
    repeats: int | str = "auto",
    max_rounds: int = MAX_ROUNDS,
    fit: Callable[..., TrainResult] | None = None,
    say: Callable[[str], None] | None = print,
    trial: int | None = None,
) -> Confirmation:
    """Re-run the pick, the baseline and the frontier point in interleaved rounds until the intervals decide
    (see the module docstring). ``repeats``: ``"auto"`` (start with 3 rounds) or the rounds to start with
    (>= 2); rounds are added one at a time up to ``max(max_rounds, repeats)``. ``trial``: confirm that completed
    trial instead of the one ``rule`` picks."""
    from wus_tune.config import TrainConfig

    if fit is None:
        from wus_tune.trainer import fit
    start = AUTO_START_ROUNDS if parse_rounds(repeats) == "auto" else int(repeats)
    if isinstance(max_rounds, bool) or not isinstance(max_rounds, int) or max_rounds < 2:
        raise UsageError(f"--max-rounds: expected an integer >= 2, got {max_rounds!r}")
    cap = max(max_rounds, start)
    if analysis.baseline is None:
        raise UsageError(f"study {study_name!r} has no completed baseline trial to confirm against")
    pick = analysis.select(rule) if trial is None else _completed(analysis, trial, study_name)
    base = analysis.baseline
    front = frontier_point(analysis, pick)
    for c in (pick, base) + ((front,) if front else ()):
        if c.config is None:
            raise UsageError(f"trial {c.number} has no stored config")
    configs = {"baseline": TrainConfig.from_dict(base.config), "pick": TrainConfig.from_dict(pick.config)}
    trials = {"baseline": base.number, "pick": pick.number}
    if front is not None:
        configs["frontier"], trials["frontier"] = TrainConfig.from_dict(front.config), front.number
    reference = configs["baseline"]
    conf = Confirmation(
        study=study_name, rule=str(rule) if trial is None else f"trial {trial}", objective=analysis.objectives[1],
        repeats=0, pick=pick.number, baseline=base.number, frontier=front.number if front else None,
        claimed_speedup=base.values[1] / pick.values[1] if pick.values[1] > 0 else math.inf,
        claimed_acc_delta_pts=(pick.values[0] - base.values[0]) * 100, max_rounds=cap,
        claimed_interval=dict((pick.attrs or {}).get("paired") or {}),
    )  # fmt: skip
    roles = list(configs)
    while conf.repeats < cap and (conf.repeats < start or conf.verdict == "undecided"):
        r = conf.repeats
        seed = reference.seed + SEED_OFFSET + r
        for role in roles[r % len(roles):] + roles[: r % len(roles)]:
            result = fit(configs[role].replace({"seed": seed}), relative_to=reference)
            run = ConfirmRun(role=role, trial=trials[role], round=r, seed=seed, val_acc=float(result.val_acc),
                             test_acc=None if result.test_acc is None else float(result.test_acc),
                             time_s=float(result.time_s), relative_time=getattr(result, "relative_time", None),
                             cost_flops=getattr(result, "cost_flops", None))  # fmt: skip
            conf.runs.append(run)
            if say:
                say(f"confirm round {r + 1} {role:<9} trial {run.trial:>3} seed {seed}: "
                    f"val {run.val_acc:.2%}" + ("" if run.test_acc is None else f" test {run.test_acc:.2%}")
                    + f"  {run.time_s:.2f}s" + ("" if run.relative_time is None else f"  {run.relative_time:.3f} baseline runs"))  # fmt: skip
        conf.repeats += 1
        _summarise(conf, rule if trial is None else None)
    return conf


def _completed(analysis: Analysis, number: int, study_name: str) -> Candidate:
    try:
        c = analysis.by_number(number)
    except KeyError:
        raise UsageError(f"--trial {number}: study {study_name!r} has no such trial") from None
    if c.state != "COMPLETE" or c.values is None:
        raise UsageError(f"--trial {number}: trial {number} is {c.state}, not COMPLETE: nothing to confirm")
    return c


def _cost(run: ConfirmRun, objective: str) -> float:
    """A run's value in the study's time objective."""
    if objective == "relative_time" and run.relative_time:
        return run.relative_time
    if objective == "cost" and run.cost_flops:
        return run.cost_flops
    return run.time_s


def _summarise(conf: Confirmation, rule: Rule | None) -> None:
    """Intervals and verdict from the rounds so far. ``rule``: the rule that picked the trial (its promise
    sets the accuracy floor); None for a named trial."""
    by = {(run.role, run.round): run for run in conf.runs}
    rounds = range(conf.repeats)
    b = [by[("baseline", r)] for r in rounds]
    p = [by[("pick", r)] for r in rounds]
    conf.speedup = ratio_interval([_cost(x, conf.objective) / _cost(y, conf.objective) for x, y in zip(b, p)]).to_dict()
    conf.wall_speedup = ratio_interval([x.time_s / y.time_s for x, y in zip(b, p)]).to_dict()
    acc = mean_difference([(y.val_acc - x.val_acc) * 100 for x, y in zip(b, p)])
    conf.acc_delta_pts = acc.to_dict()
    for role in ROLES:
        runs = [run for run in conf.runs if run.role == role]
        if runs:
            conf.val_acc[role] = spread([run.val_acc for run in runs])
            if all(run.test_acc is not None for run in runs):
                conf.test_acc[role] = spread([run.test_acc for run in runs])
    conf.speed_threshold = (1 - SPEED_TOLERANCE) * conf.claimed_speedup
    if rule is not None and rule.kind == "fastest-within":
        conf.accuracy_floor_pts = -rule.value
    else:
        conf.accuracy_floor_pts = conf.claimed_acc_delta_pts - ACCURACY_TOLERANCE_PTS
    speed = decide(ratio_interval([_cost(x, conf.objective) / _cost(y, conf.objective) for x, y in zip(b, p)]),
                   conf.speed_threshold)  # fmt: skip
    accuracy = decide(acc, conf.accuracy_floor_pts - 1e-9)
    words = {"above": "holds", "below": "fails", "undecided": "undecided"}
    conf.speed, conf.accuracy = words[speed], words[accuracy]
    conf.verdict = "fails" if "below" in (speed, accuracy) else VERDICTS.get((speed, accuracy), "undecided")
    if conf.frontier is not None:
        f = [by[("frontier", r)] for r in rounds]
        front_acc = mean_difference([(y.val_acc - x.val_acc) * 100 for x, y in zip(f, p)])
        front_speed = ratio_interval([_cost(x, conf.objective) / _cost(y, conf.objective) for x, y in zip(f, p)])
        conf.frontier_acc_delta_pts, conf.frontier_speedup = front_acc.to_dict(), front_speed.to_dict()
        # as accurate: the pick is not better beyond the interval; about as fast: the ratio's interval spans 1
        conf.simpler_choice = front_acc.n >= 2 and front_acc.low <= 0 and front_speed.low <= 1 <= front_speed.high
    conf.claim_held = {}
    for key, fresh in (("acc_delta_pts", acc.mean), ("speedup", conf.speedup["mean"])):
        claimed = conf.claimed_interval.get(key)
        if claimed and claimed.get("low") is not None and claimed.get("high") is not None:
            conf.claim_held[key] = Interval(claimed["mean"], claimed["low"], claimed["high"], claimed["n"]).contains(fresh)


def confirm_study(
    study: optuna.Study,
    analysis: Analysis,
    *,
    rule: Rule,
    repeats: int | str,
    max_rounds: int = MAX_ROUNDS,
    fit: Callable[..., TrainResult] | None = None,
    say: Callable[[str], None] | None = print,
    tracking_uri: str | None = None,
    report_dir: Any = None,
    trial: int | None = None,
) -> Confirmation:
    """:func:`confirm`, then store the result on the study, log it to MLflow under the study's parent run
    (when it has one and ``tracking_uri`` reaches it) and write it into ``report_dir`` (when given)."""
    from pathlib import Path

    conf = confirm(analysis, study_name=study.study_name, rule=rule, repeats=repeats, max_rounds=max_rounds, fit=fit,
                   say=say, trial=trial)  # fmt: skip
    study.set_user_attr("confirmation", _jsonable(conf.to_dict()))
    text = conf.summary()
    if report_dir is not None:
        import json

        out = Path(report_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "confirmation.json").write_text(json.dumps(_jsonable(conf.to_dict()), indent=2) + "\n")
        (out / "confirmation.txt").write_text(text + "\n")
    parent = study.user_attrs.get("mlflow_parent_run_id")
    uri = tracking_uri or study.user_attrs.get("mlflow_tracking_uri")
    if parent and uri:
        try:
            log_to_mlflow(conf, uri, parent, text)
        except Exception as e:  # the confirmation itself is kept on the study and printed
            from wus_tune.errors import one_line

            if say:
                say(f"note: confirmation not logged to MLflow ({one_line(e)})")
    if say:
        say(text)
    return conf


def log_to_mlflow(conf: Confirmation, tracking_uri: str, parent_run_id: str, text: str) -> None:
    """Metrics ``confirm/*`` and the two files on the parent run; one child run per confirmation training."""
    import time

    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    now = int(time.time() * 1000)
    for run in conf.runs:
        child = client.create_run(experiment_id, run_name=f"confirm-{run.role}-{run.round}", tags={
            "mlflow.parentRunId": parent_run_id, "optuna.study_name": conf.study, "wus_tune.role": f"confirm-{run.role}",
            "wus_tune.confirms_trial": str(run.trial), "seed": str(run.seed)})  # fmt: skip
        values = {"val_acc": run.val_acc, "test_acc": run.test_acc, "time_s": run.time_s, "relative_time": run.relative_time,
                  "cost_flops": run.cost_flops}  # fmt: skip
        client.log_batch(child.info.run_id, metrics=[Metric(k, float(v), now, 0) for k, v in values.items() if v is not None])
        client.set_terminated(child.info.run_id, "FINISHED")
    metrics = {"confirm/claimed_speedup": conf.claimed_speedup, "confirm/claimed_acc_delta_pts": conf.claimed_acc_delta_pts,
               "confirm/confirmed": float(conf.confirmed)}  # fmt: skip
    for name, stats in (("speedup", conf.speedup), ("wall_speedup", conf.wall_speedup),
                        ("acc_delta_pts", conf.acc_delta_pts), ("frontier_acc_delta_pts", conf.frontier_acc_delta_pts)):  # fmt: skip
        metrics.update({f"confirm/{name}_{k}": v for k in ("mean", "low", "high") if isinstance(v := stats.get(k), (int, float))})
    for role, stats in conf.test_acc.items():
        metrics[f"confirm/test_acc_{role}_mean"] = stats["mean"]
    client.log_batch(parent_run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items() if math.isfinite(v)])
    client.set_tag(parent_run_id, "confirmation", f"{conf.verdict}: {_ratio(conf.speedup)} measured vs "
                   f"{conf.claimed_speedup:.2f}x claimed, {_points(conf.acc_delta_pts)}")  # fmt: skip
    client.log_dict(parent_run_id, _jsonable(conf.to_dict()), "confirmation.json")
    client.log_text(parent_run_id, text + "\n", "confirmation.txt")


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def stored_summary(study: optuna.Study) -> str | None:
    """The last confirmation stored on the study, as its summary lines (None if never confirmed)."""
    data = study.user_attrs.get("confirmation")
    if not data:
        return None
    if "speed_ok" in data:  # stored by a release before the intervals: its verdict and median as they were
        return (f"confirmation of trial {data['pick']} (an earlier release, no intervals): {data.get('verdict')}, "
                f"{data['speedup']['median']:.2f}x wall measured vs {data['claimed_speedup']:.2f}x claimed")  # fmt: skip
    runs = [ConfirmRun(**r) for r in data.get("runs", [])]
    keep = {k: v for k, v in data.items() if k not in ("confirmed", "runs")}
    return Confirmation(**keep, runs=runs).summary()
