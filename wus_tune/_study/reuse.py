"""Studies that learn from their own baseline: replay, fork, and a search space calibrated on its signal.

With the same seed, a trial of a *predictable* method is the baseline until a point the method can find
on the baseline's probes: same data order, same updates, same accuracies (bit for bit on the CPU). A
method opts in through the baseline-reuse hooks of its study declaration
(:class:`~wus_tune.methods.study.MethodStudy`: ``baseline_recording``, ``deviation_checks``,
``replay_baseline``, ``calibrate_space``); WUS is one (its first skip window, found by replaying its controller on the
recorded accuracy), and every method without them trains from scratch. The baseline records what the
study's predictable methods ask for at every probe (:class:`~wus_tune.run_state.RecordingPlan`). So, before
such a trial trains:

* **Replay.** The method finds, on the baseline's probes, the probe after which the trial first trains
  differently (:class:`~wus_tune.methods.Deviation`). A trial that never deviates is not trained: it
  completes with the baseline's values, marked ``reused: baseline`` (Optuna user attribute, MLflow tag),
  and is never a new point of the front.
* **Fork.** A trial that first deviates after probe ``k`` resumes from the baseline's snapshot at the
  latest saved probe ``j <= k`` (:class:`~wus_tune.run_state.RunState`, files in the study's folder),
  with the method's state as the trial would have it at ``j``. Its time objective charges the prefix at
  the baseline's measured cost (training time, plus the validation passes of the prefix's probes when
  the method's own run pays for them, e.g. WUS watching ``val_acc``), so forked and unforked trials
  compare fairly.
* **Calibration.** Once the baseline's signal is known, each method may fit the ranges of its own knobs
  to it (WUS: the threshold, window and warm-up that decide when skipping starts); a range the spec
  gives explicitly is kept, with a one-line warning when it cannot fire on that signal.

A trial can be replayed or forked only when exactly one of its methods is predictable, its config equals
the baseline's outside that method's entry (the epochs, the schedule, every other section and every other
method: :func:`fork_blocker` says why not), and the baseline recorded what the method asks for
(``baseline_recording``: WUS's signal at its check cadence; :func:`unlike_recording` says why not). The baseline snapshots only probes
after which some trial of the space could first deviate, at most ``max_checkpoints`` of them (evenly
spread; a trial forks from the latest one before its deviation).
"""

from __future__ import annotations

import contextlib
import math
import pickle
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wus_tune._study.space import SearchSpace
from wus_tune.errors import UsageError
from wus_tune.run_state import signal_of

if TYPE_CHECKING:
    import optuna

    from wus_tune.config import TrainConfig
    from wus_tune.methods.study import BaselineRecording, Deviation, MethodStudy
    from wus_tune.run_state import RecordingPlan, RunState

# Trial user attributes (Optuna) written here
SIGNAL_ATTR = "reuse_signal"  # on the baseline: its ProbeRecord dicts
CHECKPOINTS_ATTR = "reuse_checkpoints"  # on the baseline: {"dir", "points", "bytes"}
REUSED_ATTR = "reused"  # "baseline" on a trial completed with the baseline's values
FORKED_ATTR = "forked"  # {"trial", "seed", "point", "step", "epoch", "first_skip", "prefix_time_s", "prefix_flops"}
NOT_FORKED_ATTR = "reuse_skipped"  # why a trial of a predictable method trained from scratch
CALIBRATED_ATTR = "search_space_calibrated"  # on the study: the calibrated space (JSON)


@dataclass
class ReuseSpec:
    """The spec's ``reuse:`` section (every key optional)."""

    replay: bool = True  # a trial that never deviates from the baseline's run is not trained
    fork: bool = True  # a trial resumes from the baseline's snapshot before its first deviation
    calibrate: bool = True  # the methods' knob ranges fitted to the baseline's signal (WUS: when skipping starts)
    checkpoint_dir: str | None = None  # default: studies/<study>/baseline_checkpoints
    max_checkpoints: int = 8  # snapshots the baseline keeps at most
    keep_checkpoints: bool = True  # false: the snapshots are deleted when the study's run ends
    baseline_wait_s: float = 3600.0  # a forkable trial waits at most this long for a running baseline

    def validate(self) -> ReuseSpec:
        if isinstance(self.max_checkpoints, bool) or not isinstance(self.max_checkpoints, int) or self.max_checkpoints < 0:
            raise UsageError(f"reuse.max_checkpoints: expected an integer >= 0, got {self.max_checkpoints!r}")
        if not (isinstance(self.baseline_wait_s, (int, float)) and math.isfinite(self.baseline_wait_s)
                and self.baseline_wait_s >= 0):  # fmt: skip
            raise UsageError(f"reuse.baseline_wait_s: expected seconds >= 0, got {self.baseline_wait_s!r}")
        return self

    @property
    def any(self) -> bool:
        return self.replay or self.fork or self.calibrate


def checkpoint_dir(spec: ReuseSpec, study_name: str) -> Path:
    """The folder of the study's baseline snapshots; each baseline run writes its own subfolder
    (:func:`baseline_dir`)."""
    from wus_tune._study.storage import safe_name

    return Path(spec.checkpoint_dir) if spec.checkpoint_dir else Path("studies") / safe_name(study_name) / "baseline_checkpoints"


def baseline_dir(spec: ReuseSpec, study_name: str, trial_number: int) -> Path:
    """Where baseline trial ``trial_number`` keeps its snapshots: one folder per baseline run, so two
    baselines (other seeds, a re-run) never overwrite each other's states."""
    return checkpoint_dir(spec, study_name) / f"trial_{trial_number:05d}"


def remove_checkpoints(spec: ReuseSpec, study_name: str) -> int:
    """Delete the study's baseline snapshots; returns the bytes freed."""
    directory = checkpoint_dir(spec, study_name)
    if not directory.is_dir():
        return 0
    freed = sum(p.stat().st_size for p in directory.rglob("*.pt"))
    shutil.rmtree(directory, ignore_errors=True)
    return freed


# ---- which trials can learn from the baseline ------------------------------------------------------


def predictable_methods(config: TrainConfig) -> list[type[MethodStudy]]:
    """The declarations of the methods on in ``config`` whose deviation from plain training a baseline
    run can predict (their ``baseline_recording`` is not None)."""
    from wus_tune._study.catalog import declarations

    return [d for name, d in declarations().items() if name in config.methods and d.baseline_recording(config) is not None]


def deviating_method(config: TrainConfig) -> tuple[type[MethodStudy] | None, str]:
    """The one predictable method of ``config`` (:func:`predictable_methods`), or None and why not. Its
    other methods need not be predictable: they then differ from the baseline's config (fork_blocker)."""
    predictable = predictable_methods(config)
    if len(predictable) > 1:
        return None, f"{' and '.join(sorted(d.method.name for d in predictable))} both deviate from the baseline (reuse predicts one method)"
    if not predictable:
        return None, "no method of this trial can be predicted from a baseline run"
    return predictable[0], ""


def fork_blocker(trial: Mapping[str, Any], baseline: Mapping[str, Any]) -> str | None:
    """Why a trial's config cannot be replayed on / forked from the baseline's run; None if it can.

    Both are ``TrainConfig.to_dict()``; the trial must equal the baseline outside its predictable
    method's entry (``methods.<name>``)."""
    from wus_tune.config import TrainConfig

    method, why = deviating_method(TrainConfig.from_dict(dict(trial)))
    if method is None:
        return why
    section = f"methods.{method.method.name}"
    trial_rest, _ = _without(trial, section)
    baseline_rest, _ = _without(baseline, section)
    differs = sorted(k for k in set(trial_rest) | set(baseline_rest)
                     if k != "meta" and trial_rest.get(k) != baseline_rest.get(k))  # fmt: skip
    if differs:
        detail = []
        for k in differs:
            a, b = trial_rest.get(k), baseline_rest.get(k)
            if isinstance(a, Mapping) and isinstance(b, Mapping):
                detail += [f"{k}.{s}" for s in sorted(set(a) | set(b)) if a.get(s) != b.get(s)]
            else:
                detail.append(k)
        return f"{', '.join(detail)} differ from the baseline's (needs a baseline run of its own)"
    return None


def _without(config: Mapping[str, Any], section: str) -> tuple[dict[str, Any], Mapping[str, Any]]:
    """(``config`` without the dotted ``section``, that section's mapping or {})."""
    head, _, rest = section.partition(".")
    out = dict(config)
    if not rest:
        return out, out.pop(head, None) or {}
    out[head], value = _without(out.get(head) or {}, rest)
    return out, value


def unlike_recording(probes: Sequence[Mapping[str, Any]], wanted: BaselineRecording, epochs: int) -> str | None:
    """Why the baseline's probes are not the ones ``wanted`` asks for (another cadence, no validation
    accuracy); None when they are."""
    if wanted.val_acc and (not probes or signal_of(probes, "val_acc") is None):
        return "the baseline recorded no val_acc signal"
    if not probes:
        return "the baseline recorded no probes"
    if wanted.every_steps:
        same = all(p["step"] == (i + 1) * wanted.every_steps for i, p in enumerate(probes))
    else:
        same = len(probes) == epochs and all(p["progress"] == (i + 1) / epochs for i, p in enumerate(probes))
    if not same:
        return f"the baseline's probes are not at the trial's checks ({_cadence(wanted.every_steps)})"
    return None


def _cadence(every_steps: int) -> str:
    return f"every {every_steps} steps" if every_steps else "at each epoch's end"


# ---- the baseline's snapshots -------------------------------------------------------------------


def study_methods(study_def: Any) -> list[type[MethodStudy]]:
    """The declarations of the methods a study's trials may run (the parts of its ``methods:`` choices)."""
    from wus_tune._study.catalog import compared

    return compared(getattr(study_def, "methods", ()))


def candidate_points(space: SearchSpace, base: TrainConfig, progress: Sequence[float],
                     methods: Sequence[type[MethodStudy]]) -> list[int]:  # fmt: skip
    """Probes (1-based; ``progress[k - 1]`` is the training fraction at probe ``k``) after which some
    trial of ``space`` running one of ``methods`` could first deviate (each method's ``deviation_checks``)."""
    return sorted({k for cls in methods for k in cls.deviation_checks(space, base, progress)})


def spread(points: Sequence[int], at_most: int) -> list[int]:
    """At most ``at_most`` of ``points``, evenly spread, the first one always kept."""
    if len(points) <= at_most:
        return list(points)
    if at_most <= 0:
        return []
    if at_most == 1:
        return [points[0]]
    step = (len(points) - 1) / (at_most - 1)
    return sorted({points[round(i * step)] for i in range(at_most)})


def baseline_plan(study_def: Any, trial_number: int) -> RecordingPlan:
    """What baseline trial ``trial_number`` records: the probes its study's predictable methods ask for
    (the first one's cadence; a method asking for another one trains from scratch), and the snapshots
    forks may start from (in the trial's own folder, :func:`baseline_dir`). The methods read their knobs in
    the study's base config (its ``methods`` entries: what WUS watches, and how often), which a baseline's
    own config, running no method, leaves out."""
    from wus_tune.methods.study import BaselineRecording
    from wus_tune.run_state import RecordingPlan

    reuse: ReuseSpec = study_def.reuse
    base: TrainConfig = study_def.base
    asked = [(cls, r) for cls in study_methods(study_def) if (r := cls.baseline_recording(base)) is not None]
    every = asked[0][1].every_steps if asked else 0
    served = [(cls, r) for cls, r in asked if r.every_steps == every]
    wanted = BaselineRecording(every_steps=every, val_acc=any(r.val_acc for _, r in served))
    if not (reuse.fork and served):
        return RecordingPlan(every=wanted.every_steps, val=wanted.val_acc)
    methods = [cls for cls, _ in served]

    def choose_saves(progress: Sequence[float]) -> list[int]:  # once the run knows its steps per epoch
        return spread(candidate_points(study_def.space, base, progress, methods), reuse.max_checkpoints)

    return RecordingPlan(every=wanted.every_steps, val=wanted.val_acc, choose_saves=choose_saves,
                         save_dir=str(baseline_dir(reuse, study_def.name, trial_number)))  # fmt: skip


# ---- the decision for one trial --------------------------------------------------------------------


@dataclass
class Baseline:
    """The study's completed baseline, as its trial recorded it."""

    number: int
    values: tuple[float, ...]
    config: dict[str, Any]
    probes: list[dict[str, Any]]
    checkpoints: dict[str, Any]  # {"dir", "points", "bytes"}
    attrs: dict[str, Any] = field(default_factory=dict)
    constraints: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_trial(cls, t: optuna.trial.FrozenTrial) -> Baseline | None:
        a = t.user_attrs
        if t.values is None or SIGNAL_ATTR not in a or "config" not in a:
            return None
        return cls(number=t.number, values=tuple(t.values), config=a["config"], probes=list(a[SIGNAL_ATTR]),
                   checkpoints=dict(a.get(CHECKPOINTS_ATTR) or {}), attrs=dict(a), constraints=dict(t.constraints))  # fmt: skip

    def snapshot_before(self, check: int) -> int | None:
        """The latest saved point at or before ``check`` whose file exists here."""
        from wus_tune.run_state import snapshot_path

        points = [p for p in self.checkpoints.get("points", ()) if p <= check]
        for p in sorted(points, reverse=True):
            if snapshot_path(self.checkpoints["dir"], p).is_file():
                return p
        return None


@dataclass
class Decision:
    kind: str  # "reuse" (not trained), "fork" (resume from a snapshot), "train" (from scratch)
    reason: str = ""  # why "train" (for the report)
    first_skip: int | None = None  # the probe after which the trial first deviates (tag: first_skip_check)
    point: int | None = None  # the snapshot a fork resumes from
    replay: Deviation | None = None  # the deviating method's answer on the baseline's probes
    baseline: Baseline | None = None
    method: type[MethodStudy] | None = None  # the deviating method's declaration


def decide(config: TrainConfig, baseline: Baseline | None, spec: ReuseSpec, *, why_no_baseline: str = "") -> Decision:
    """Ask the trial's deviating method where it leaves the baseline's run; reuse, fork or train."""
    if not (spec.replay or spec.fork):
        return Decision("train", "reuse is off")
    if baseline is None:
        return Decision("train", why_no_baseline or "no completed baseline")
    blocker = fork_blocker(config.to_dict(), baseline.config)
    if blocker is not None:
        return Decision("train", blocker)
    method, _ = deviating_method(config)
    assert method is not None  # fork_blocker found it
    wanted = method.baseline_recording(config)
    assert wanted is not None
    unlike = unlike_recording(baseline.probes, wanted, int(baseline.config["epochs"]))
    if unlike is not None:
        return Decision("train", unlike, method=method)
    result = method.replay_baseline(config, baseline.probes)
    first = result.check
    if first is None:
        if spec.replay:
            return Decision("reuse", replay=result, baseline=baseline, method=method)
        return Decision("train", "replay is off", method=method)
    if first == 0:
        return Decision("train", f"{method.method.name} trains differently from its first step", replay=result, method=method)
    if not spec.fork:
        return Decision("train", "fork is off", first_skip=first, replay=result, method=method)
    point = baseline.snapshot_before(first)
    if point is None:
        where = baseline.checkpoints.get("dir")
        return Decision("train", f"no baseline snapshot at or before check {first}" + (f" in {where}" if where else ""),
                        first_skip=first, replay=result, method=method)  # fmt: skip
    return Decision("fork", first_skip=first, point=point, replay=result, baseline=baseline, method=method)


def plan_tags(plan: Decision) -> dict[str, str]:
    """MLflow tags of a trial's child run: reused, where it forked, or why it trained from scratch."""
    if plan.kind == "reuse":
        return {"wus_tune.reused": "baseline", "wus_tune.reused_from_trial": str(plan.baseline.number),
                "wus_tune.baseline_seed": str(plan.baseline.config.get("seed"))}  # fmt: skip
    if plan.kind == "fork":
        return {"wus_tune.forked_from_trial": str(plan.baseline.number), "wus_tune.fork_check": str(plan.point),
                "wus_tune.first_skip_check": str(plan.first_skip),
                "wus_tune.baseline_seed": str(plan.baseline.config.get("seed"))}  # fmt: skip
    return {"wus_tune.not_forked": plan.reason[:500]} if plan.reason else {}


def record_run(trial: optuna.Trial, plan: Decision, result: Any, fit_kwargs: Mapping[str, Any], *,
               attrs: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """Store what reuse needs from a finished run; returns the figures for the trial's ``result``.

    ``compute_flops`` is what this run actually executed (a fork's prefix was the baseline's). ``attrs``:
    where the fork's record goes instead of the trial (one seed of several: the caller stores them)."""
    out: dict[str, Any] = {"compute_flops": float(getattr(result, "cost_flops", 0.0))}
    set_attr = trial.set_user_attr if attrs is None else attrs.__setitem__
    recording = fit_kwargs.get("recording")
    if recording is not None:
        from dataclasses import asdict

        trial.set_user_attr(SIGNAL_ATTR, [asdict(p) for p in getattr(result, "probes", [])])
        points = saved_points(recording.save_dir) if recording.save_dir else []
        size = snapshot_bytes(recording.save_dir, points) if points else 0
        trial.set_user_attr(CHECKPOINTS_ATTR, {"dir": recording.save_dir, "points": points, "bytes": size})
        out["checkpoint_bytes"] = size
        epochs = len(result.epochs)
        wanted = recording.resolved(result.total_steps // epochs, epochs).save_at if recording.save_dir and epochs else ()
        if wanted and not points:  # the trainer saves nothing where it cannot restore the data order
            out["no_snapshots"] = ("its training data is streamed (a DataLoader), whose data order a fork "
                                   "cannot restore")  # fmt: skip
    state = fit_kwargs.get("resume_from")
    if state is not None:
        prefix_flops = float(state.probes[-1]["train_flops"]) + float(state.counters["required_eval_flops"])
        prefix_time = float(state.counters["train_time_s"]) + float(state.counters["required_eval_time_s"])
        set_attr(FORKED_ATTR, {"trial": plan.baseline.number, "seed": state.origin.get("seed"),
                                          "point": plan.point, "step": state.step,
                                          "epoch": state.epoch, "first_skip": plan.first_skip,
                                          "prefix_time_s": prefix_time, "prefix_flops": prefix_flops})  # fmt: skip
        out["compute_flops"] -= prefix_flops
        out["forked_at_check"] = plan.point
    return out


class SnapshotRefused(Exception):
    """A baseline snapshot a fork must not resume: unreadable, or another run's. One line, for the report."""


# what torch.load raises on a truncated or foreign file, and RunState(**...) on a file of another layout
_UNREADABLE = (OSError, RuntimeError, EOFError, ValueError, TypeError, KeyError, AttributeError, pickle.UnpicklingError)


def load_snapshot(baseline: Baseline, point: int) -> RunState:
    """Baseline ``baseline``'s snapshot at probe ``point``, checked to be that run's own (its recorded
    trial, seed and config). An unreadable file (truncated by a full disk, an interrupted copy) is set
    aside as ``*.unreadable`` so no later trial tries it; either way :class:`SnapshotRefused` says why in
    one line and the trial trains from scratch."""
    from wus_tune.errors import one_line
    from wus_tune.run_state import RunState, origin_of, snapshot_path

    path = snapshot_path(baseline.checkpoints["dir"], point)
    try:
        state = RunState.load(path)
    except _UNREADABLE as e:
        aside = path.with_name(path.name + ".unreadable")
        with contextlib.suppress(OSError):  # another worker may have set it aside already
            path.replace(aside)
        raise SnapshotRefused(f"baseline snapshot {path} is unreadable ({one_line(e, with_type=True)}); "
                              f"set aside as {aside.name}") from None  # fmt: skip
    recorded = state.origin or origin_of(state.config)  # snapshots of earlier releases record only the config
    expected = origin_of(baseline.config)
    mismatch = [k for k in ("trial", "seed") if recorded.get(k) != expected.get(k)]
    if not mismatch and {k: v for k, v in state.config.items() if k != "meta"} != {
            k: v for k, v in baseline.config.items() if k != "meta"}:  # fmt: skip
        mismatch = ["config"]
    if mismatch:
        raise SnapshotRefused(
            f"baseline snapshot {path} belongs to trial {recorded.get('trial')} (seed {recorded.get('seed')}), not to "
            f"baseline trial {baseline.number} (seed {expected.get('seed')}) the replay used (mismatch: {', '.join(mismatch)})")
    return state


def fork_state(decision: Decision, baseline: Baseline, config: TrainConfig) -> RunState:
    """The baseline's snapshot made into the trial's: the deviating method's state at the point, its
    metrics on the prefix's epoch records, and the prefix's probes charged when the method's own run
    pays for their validation passes (the baseline's passes were measured, not charged). Raises
    :class:`SnapshotRefused` when the snapshot is not the baseline's own (:func:`load_snapshot`)."""
    point, result, method = decision.point, decision.replay, decision.method
    assert point is not None and result is not None and method is not None
    state = load_snapshot(baseline, point)
    if result.states and result.states[point - 1] is not None:
        state.method_states[method.method.name] = result.states[point - 1]
    probes = state.probes[:point]
    # each finished epoch shows the method's metrics after its last probe, as a live run logs them
    for record in state.records if result.metrics else ():
        at_end = [i for i, p in enumerate(probes) if p["step"] <= record["epoch"] * record["steps"]]
        if at_end:
            record["extra"] = {**record.get("extra", {}), **result.metrics[at_end[-1]]}
    if result.charges_probes:  # the twin evaluated at each of these checks: the same time, FLOPs, samples and work
        counters = state.counters
        counters["required_eval_time_s"] += sum(p["eval_time_s"] for p in probes)
        counters["required_eval_flops"] += sum(p["eval_flops"] for p in probes)
        counters["charged_eval_samples"] = counters.get("charged_eval_samples", 0) + sum(p.get("eval_samples", 0) for p in probes)
        counters["eval_work_s"] = counters.get("eval_work_s", 0.0) + sum(p.get("eval_work_s", 0.0) for p in probes)
    return state


def reused_summary(baseline: Baseline, replay: Deviation | None = None) -> dict[str, Any]:
    """The ``result`` attribute of a trial completed without training: its twin's figures. Its twin trains
    the baseline's steps; when its method's own run pays a validation pass at each check (``charges_probes``:
    WUS watching ``val_acc``) the twin pays those too, so its time, FLOPs, evaluated samples and relative
    time are the baseline's plus the passes of every probe but the last (which is the final evaluation both
    pay), at the baseline's measured cost and prices."""
    res = dict(baseline.attrs.get("result") or {})
    drop = ("fit_s", "overhead_s", "mlflow_s", "sample_s", "checkpoint_bytes")
    res = {k: v for k, v in res.items() if k not in drop} | {"compute_flops": 0.0}
    if replay is None or not replay.charges_probes or len(baseline.probes) < 2:
        return res
    passes = baseline.probes[:-1]
    seconds, samples = sum(p["eval_time_s"] for p in passes), sum(p.get("eval_samples", 0) for p in passes)
    for key in ("time_s", "required_eval_time_s", "eval_time_s"):
        if key in res:
            res[key] += seconds
    res["cost_flops"] = res.get("cost_flops", 0.0) + sum(p["eval_flops"] for p in passes)
    counts = dict(res.get("work_counts") or {})
    counts["eval"] = counts.get("eval", 0.0) + samples
    res["work_counts"] = counts
    prices = res.get("unit_costs") or {}
    price = prices.get("eval", prices.get("baseline:eval"))
    if price is not None and res.get("modelled_time_s") is not None and res.get("reference_time_s"):
        res["modelled_time_s"] += samples * price
        res["relative_time"] = res["modelled_time_s"] / res["reference_time_s"]
    return res


# ---- finding the baseline, waiting for it ------------------------------------------------------------


def find_baseline(study: optuna.Study, config: TrainConfig | None = None) -> tuple[Baseline | None, str, bool]:
    """(the completed baseline run a trial of ``config`` can be replayed on or forked from, why there is
    none, whether such a baseline is running). With several baseline runs (``baseline_repeats``: other
    seeds) it is the one whose config the trial's equals outside its method's section, seed included
    (:func:`fork_blocker`): the replay's signal and the fork's snapshot then come from the same run.
    Without ``config``: the first completed baseline."""
    from optuna.trial import TrialState

    wanted = None if config is None else config.to_dict()
    reasons, running = [], False
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get("role") != "baseline":
            continue
        if wanted is not None and "config" in t.user_attrs and fork_blocker(wanted, t.user_attrs["config"]) is not None:
            continue  # another seed's (or recipe's) baseline: not this trial's
        if t.state == TrialState.COMPLETE:
            b = Baseline.from_trial(t)
            if b is not None:
                return b, "", False
            reasons.append(f"baseline trial {t.number} recorded no signal")
        elif t.state == TrialState.RUNNING:
            running = True
        elif t.state == TrialState.FAIL:
            reasons.append(f"baseline trial {t.number} failed ({t.user_attrs.get('fail_reason', 'no reason')})")
    seed = "" if config is None else f" with this trial's seed {config.seed}"
    return None, "; ".join(reasons) or f"no baseline trial{seed}", running


def wait_for_baseline(study: optuna.Study, config: TrainConfig | None = None, *, timeout_s: float, poll_s: float = 1.0,
                      while_waiting: Callable[[optuna.Study], Any] | None = None) -> tuple[Baseline | None, str]:  # fmt: skip
    """The completed baseline run for ``config`` (:func:`find_baseline`), waiting while it is RUNNING
    (another worker trains it) for at most ``timeout_s``. A baseline that fails or goes stale ends the
    wait: the caller trains from scratch. ``while_waiting`` (the stale-trial sweep) runs at each poll, so
    a dead baseline worker is noticed."""
    deadline = time.monotonic() + timeout_s
    while True:
        baseline, why, running = find_baseline(study, config)
        if baseline is not None or not running:
            return baseline, why
        if time.monotonic() >= deadline:
            return None, f"the baseline was still running after {timeout_s:g} s"
        if while_waiting is not None:
            while_waiting(study)
        time.sleep(poll_s)


# ---- the calibrated space ----------------------------------------------------------------------------


def calibrate_space(space: SearchSpace, base: TrainConfig, probes: Sequence[Mapping[str, Any]], *,
                    explicit: Sequence[str] = (), methods: Sequence[type[MethodStudy]] | None = None,
                    ) -> tuple[SearchSpace, list[str]]:  # fmt: skip
    """``space`` with each method's knob ranges fitted to the baseline's probes (``calibrate_space`` of
    ``methods``' declarations, default every registered one), and the one-line notes to print. A key in
    ``explicit`` (the spec's own ``search_space`` entries) keeps its range."""
    from wus_tune._study.catalog import declarations

    notes: list[str] = []
    for cls in declarations().values() if methods is None else methods:
        space, more = cls.calibrate_space(space, base, probes, explicit=explicit)
        notes += more
    return space, notes


def saved_points(directory: str | Path) -> list[int]:
    """The probe points whose snapshot a run wrote to ``directory`` (its own folder)."""
    return sorted(int(p.stem.removeprefix("point_")) for p in Path(directory).glob("point_*.pt"))


def snapshot_bytes(directory: str | Path, points: Sequence[int]) -> int:
    from wus_tune.run_state import snapshot_path

    return sum(snapshot_path(directory, p).stat().st_size for p in points if snapshot_path(directory, p).is_file())


def summary_lines(candidates: Sequence[Any]) -> list[str]:
    """The report's lines on reuse: trials reused and forked, and why the others trained from scratch."""
    done = [c for c in candidates if c.state == "COMPLETE"]
    reused = [c.number for c in done if c.attrs.get(REUSED_ATTR)]
    forked = [c.number for c in done if c.attrs.get(FORKED_ATTR)]
    why: dict[str, list[int]] = {}
    for c in candidates:
        reason = c.attrs.get(NOT_FORKED_ATTR)
        if reason and c.state in ("COMPLETE", "FAIL"):
            why.setdefault(reason, []).append(c.number)
    if not (reused or forked or why):
        return []
    saved = sum(float((c.attrs.get(FORKED_ATTR) or {}).get("prefix_time_s", 0.0)) for c in done)
    lines = [f"reuse: {len(reused)} trials equal to the baseline, not trained ({_numbers(reused)}); {len(forked)} forked "
             f"from its snapshots ({_numbers(forked)}; {saved:.1f}s of prefix not trained again)"]  # fmt: skip
    lines += [f"reuse: trained from scratch ({_numbers(ns)}): {reason}" for reason, ns in why.items()]
    return lines


def _numbers(ns: Sequence[int]) -> str:
    return "trials " + ", ".join(map(str, ns)) if ns else "none"
