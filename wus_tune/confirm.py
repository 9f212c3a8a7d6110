"""Confirmation runs: does a study's pick deliver what the study claims, when trained again?

``python -m wus_tune.pareto --study S --confirm K`` (or a spec's ``confirm: K``) trains, in this one
process, K rounds of three configs with fresh seeds: the full-length baseline, the pick (the study's
rule, ``--select``, or any completed trial given with ``--trial N``) and the baseline-frontier point
whose time is nearest the pick's (a plain run at fewer epochs: what simply training less achieves). Each
round runs the three interleaved, in an order rotated from round to round, so a load on the machine hits
the three alike. From the rounds:

* measured speed-up: per round, baseline wall time / pick wall time (paired); median, min, max. The same
  ratio in relative time (each run priced against the baseline, :mod:`wus_tune.timing`) is shown too;
* accuracy difference, pick - baseline and pick - frontier point, in points: mean, std, min, max;
* held-out test accuracy of the three (when the dataset has a test split; never used for selection).

The claim is the study's own: speed-up = baseline time / pick time in the study's time objective,
accuracy delta = pick - baseline (its pooled median). It is *confirmed* when the median measured
speed-up is at least ``1 - SPEED_TOLERANCE`` of the claimed one and the mean accuracy difference holds: for
``fastest-within:D`` at least ``-D`` points (the rule's promise), otherwise (other rules, a trial named
with ``--trial``) at least the claimed delta minus ``ACCURACY_TOLERANCE_PTS``. The result is stored on
the Optuna study (user attribute ``confirmation``), logged to MLflow under the study's parent run
(metrics ``confirm/*``, one child run per training, ``confirmation.json`` / ``confirmation.txt``) and
printed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from wus_tune.errors import UsageError
from wus_tune.timing import spread

if TYPE_CHECKING:
    import optuna

    from wus_tune._study.front import Analysis, Candidate, Rule
    from wus_tune.trainer import TrainResult

__all__ = ["ACCURACY_TOLERANCE_PTS", "SPEED_TOLERANCE", "Confirmation", "ConfirmRun", "confirm", "confirm_study"]

SPEED_TOLERANCE = 0.10  # measured speed-up may fall this fraction short of the claim
ACCURACY_TOLERANCE_PTS = 1.0  # rules other than fastest-within: mean accuracy this many points below the claim
SEED_OFFSET = 1000  # confirmation seeds: the base config's seed + SEED_OFFSET + round (never a trial's seed)
ROLES = ("baseline", "pick", "frontier")


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


@dataclass
class Confirmation:
    """The outcome of :func:`confirm`; ``to_dict`` is what is stored and logged."""

    study: str
    rule: str
    objective: str  # the study's time objective (relative_time, time or cost)
    repeats: int
    pick: int
    baseline: int
    frontier: int | None
    claimed_speedup: float
    claimed_acc_delta_pts: float
    runs: list[ConfirmRun] = field(default_factory=list)
    speedup: dict[str, float] = field(default_factory=dict)  # paired wall-time ratios baseline / pick
    relative_speedup: dict[str, float] = field(default_factory=dict)  # the same in relative time
    acc_delta_pts: dict[str, float] = field(default_factory=dict)  # pick - baseline, validation
    frontier_acc_delta_pts: dict[str, float] = field(default_factory=dict)  # pick - frontier point
    frontier_speedup: dict[str, float] = field(default_factory=dict)  # frontier time / pick time
    test_acc: dict[str, dict[str, float]] = field(default_factory=dict)  # role -> spread (test split only)
    val_acc: dict[str, dict[str, float]] = field(default_factory=dict)  # role -> spread
    speed_ok: bool = False
    accuracy_ok: bool = False
    accuracy_floor_pts: float = 0.0  # the mean accuracy difference that had to be reached

    @property
    def confirmed(self) -> bool:
        return self.speed_ok and self.accuracy_ok

    @property
    def verdict(self) -> str:
        return "confirmed" if self.confirmed else "not confirmed"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["confirmed"] = self.confirmed
        d["verdict"] = self.verdict
        return d

    def summary(self) -> str:
        """A few lines for people: the claim, the measurement, the verdict."""
        s, a = self.speedup, self.acc_delta_pts
        lines = [
            f"confirmation of trial {self.pick} ({self.rule}), {self.repeats} interleaved rounds of baseline "
            f"(trial {self.baseline}), pick" + (f" and frontier point (trial {self.frontier})" if self.frontier is not None else "")
            + ", fresh seeds:",
            f"  claimed:  {self.claimed_speedup:.2f}x ({self.objective}), {self.claimed_acc_delta_pts:+.2f} pts vs baseline",
            f"  measured: {s['median']:.2f}x wall (min {s['min']:.2f}, max {s['max']:.2f})"
            + (f", {self.relative_speedup['median']:.2f}x relative time" if self.relative_speedup else "")
            + f"; {a['mean']:+.2f} pts (std {a['std']:.2f}, min {a['min']:+.2f}, max {a['max']:+.2f})",
        ]  # fmt: skip
        if self.frontier_acc_delta_pts:
            f = self.frontier_acc_delta_pts
            lines.append(f"  vs the frontier point: {f['mean']:+.2f} pts (std {f['std']:.2f}) at "
                         f"{self.frontier_speedup['median']:.2f}x its wall time ratio (frontier / pick)")  # fmt: skip
        for role in ROLES:
            if role in self.val_acc:
                v = self.val_acc[role]
                t = self.test_acc.get(role)
                lines.append(f"  {role:<9} validation {v['mean'] * 100:.2f}% (std {v['std'] * 100:.2f})"
                             + (f", test {t['mean'] * 100:.2f}% (std {t['std'] * 100:.2f})" if t else ""))  # fmt: skip
        if self.test_acc:
            lines.append("  (test accuracy: held out, shown only; never used to select)")
        lines.append(
            f"  {self.verdict}: speed-up {'holds' if self.speed_ok else 'does not hold'} (needs >= "
            f"{(1 - SPEED_TOLERANCE) * self.claimed_speedup:.2f}x), accuracy {'holds' if self.accuracy_ok else 'does not hold'} "
            f"(needs mean >= {self.accuracy_floor_pts:+.2f} pts)"
        )  # fmt: skip
        return "\n".join(lines)


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
    repeats: int = 3,
    fit: Callable[..., TrainResult] | None = None,
    say: Callable[[str], None] | None = print,
    trial: int | None = None,
) -> Confirmation:
    """Re-run the pick, the baseline and the frontier point ``repeats`` times each (see the module docstring).
    ``trial``: confirm that completed trial instead of the one ``rule`` picks."""
    from wus_tune.config import TrainConfig

    if fit is None:
        from wus_tune.trainer import fit
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise UsageError(f"--confirm: expected a number of repeats >= 1, got {repeats!r}")
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
    claimed_speedup = base.values[1] / pick.values[1] if pick.values[1] > 0 else math.inf
    claimed_delta = (pick.values[0] - base.values[0]) * 100
    conf = Confirmation(
        study=study_name, rule=str(rule) if trial is None else f"trial {trial}", objective=analysis.objectives[1],
        repeats=repeats, pick=pick.number, baseline=base.number, frontier=front.number if front else None, claimed_speedup=claimed_speedup,
        claimed_acc_delta_pts=claimed_delta,
    )  # fmt: skip
    roles = list(configs)
    for r in range(repeats):
        seed = reference.seed + SEED_OFFSET + r
        for role in roles[r % len(roles):] + roles[: r % len(roles)]:
            config = configs[role].replace({"seed": seed})
            result = fit(config, relative_to=reference)
            run = ConfirmRun(role=role, trial=trials[role], round=r, seed=seed, val_acc=float(result.val_acc),
                             test_acc=None if result.test_acc is None else float(result.test_acc),
                             time_s=float(result.time_s), relative_time=getattr(result, "relative_time", None))  # fmt: skip
            conf.runs.append(run)
            if say:
                say(f"confirm round {r + 1}/{repeats} {role:<9} trial {run.trial:>3} seed {seed}: "
                    f"val {run.val_acc:.2%}" + ("" if run.test_acc is None else f" test {run.test_acc:.2%}")
                    + f"  {run.time_s:.2f}s" + ("" if run.relative_time is None else f"  {run.relative_time:.3f} baseline runs"))  # fmt: skip
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


def _summarise(conf: Confirmation, rule: Rule | None) -> None:
    """``rule``: the rule that picked the trial (its promise sets the accuracy floor); None for a named trial."""
    by = {(run.role, run.round): run for run in conf.runs}
    rounds = range(conf.repeats)
    b = [by[("baseline", r)] for r in rounds]
    p = [by[("pick", r)] for r in rounds]
    conf.speedup = spread([x.time_s / y.time_s for x, y in zip(b, p)])
    if all(x.relative_time and y.relative_time for x, y in zip(b, p)):
        conf.relative_speedup = spread([x.relative_time / y.relative_time for x, y in zip(b, p)])
    conf.acc_delta_pts = spread([(y.val_acc - x.val_acc) * 100 for x, y in zip(b, p)])
    if conf.frontier is not None:
        f = [by[("frontier", r)] for r in rounds]
        conf.frontier_acc_delta_pts = spread([(y.val_acc - x.val_acc) * 100 for x, y in zip(f, p)])
        conf.frontier_speedup = spread([x.time_s / y.time_s for x, y in zip(f, p)])
    for role in ROLES:
        runs = [run for run in conf.runs if run.role == role]
        if runs:
            conf.val_acc[role] = spread([run.val_acc for run in runs])
            if all(run.test_acc is not None for run in runs):
                conf.test_acc[role] = spread([run.test_acc for run in runs])
    conf.speed_ok = conf.speedup["median"] >= (1 - SPEED_TOLERANCE) * conf.claimed_speedup
    if rule is not None and rule.kind == "fastest-within":
        conf.accuracy_floor_pts = -rule.value
    else:
        conf.accuracy_floor_pts = conf.claimed_acc_delta_pts - ACCURACY_TOLERANCE_PTS
    conf.accuracy_ok = conf.acc_delta_pts["mean"] >= conf.accuracy_floor_pts - 1e-9


def confirm_study(
    study: optuna.Study,
    analysis: Analysis,
    *,
    rule: Rule,
    repeats: int,
    fit: Callable[..., TrainResult] | None = None,
    say: Callable[[str], None] | None = print,
    tracking_uri: str | None = None,
    report_dir: Any = None,
    trial: int | None = None,
) -> Confirmation:
    """:func:`confirm`, then store the result on the study, log it to MLflow under the study's parent run
    (when it has one and ``tracking_uri`` reaches it) and write it into ``report_dir`` (when given)."""
    from pathlib import Path

    conf = confirm(analysis, study_name=study.study_name, rule=rule, repeats=repeats, fit=fit, say=say, trial=trial)
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
        values = {"val_acc": run.val_acc, "test_acc": run.test_acc, "time_s": run.time_s, "relative_time": run.relative_time}
        client.log_batch(child.info.run_id, metrics=[Metric(k, float(v), now, 0) for k, v in values.items() if v is not None])
        client.set_terminated(child.info.run_id, "FINISHED")
    metrics = {"confirm/claimed_speedup": conf.claimed_speedup, "confirm/claimed_acc_delta_pts": conf.claimed_acc_delta_pts,
               "confirm/confirmed": float(conf.confirmed)}  # fmt: skip
    for name, stats in (("speedup", conf.speedup), ("relative_speedup", conf.relative_speedup),
                        ("acc_delta_pts", conf.acc_delta_pts), ("frontier_acc_delta_pts", conf.frontier_acc_delta_pts)):  # fmt: skip
        metrics.update({f"confirm/{name}_{k}": v for k, v in stats.items() if k != "n"})
    for role, stats in conf.test_acc.items():
        metrics[f"confirm/test_acc_{role}_mean"] = stats["mean"]
    client.log_batch(parent_run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items() if math.isfinite(v)])
    client.set_tag(parent_run_id, "confirmation", f"{conf.verdict}: {conf.speedup['median']:.2f}x measured vs "
                   f"{conf.claimed_speedup:.2f}x claimed, {conf.acc_delta_pts['mean']:+.2f} pts")  # fmt: skip
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
    runs = [ConfirmRun(**r) for r in data.get("runs", [])]
    keep = {k: v for k, v in data.items() if k not in ("confirmed", "verdict", "runs")}
    conf = Confirmation(**keep, runs=runs)
    return conf.summary()
