"""Studies that learn from their own baseline: replay, fork, and a search space calibrated on its signal.

With the same seed, a WUS trial *is* the baseline until its first skip window starts: same data order,
same updates, same accuracies (bit for bit on the CPU). The controller's decisions up to then depend
only on the signal it watches, which the baseline records at every check (:class:`~wus_tune.run_state.Probes`).
So, before a WUS trial trains:

* **Replay.** The baseline's signal goes through the real controller with the trial's knobs
  (:func:`wus_tune.wus.replay`). A trial that would never skip is not trained: it completes with the
  baseline's values, marked ``reused: baseline`` (Optuna user attribute, MLflow tag), and is never a
  new point of the front.
* **Fork.** A trial whose first skip window starts after check ``k`` resumes from the baseline's
  snapshot at the latest saved check ``j <= k`` (:class:`~wus_tune.run_state.RunState`, files in the
  study's folder), with the controller's state replayed up to ``j``. Its time objective charges the
  prefix at the baseline's measured cost (training time, plus the validation passes of the prefix's
  checks when the trial watches ``val_acc``), so forked and unforked trials compare fairly.
* **Calibration.** Once the baseline's signal is known, the ranges of the knobs that decide when
  skipping starts (threshold, window, warm-up) are derived from it (:func:`calibrate_space`); a range
  the spec gives explicitly is kept, with a one-line warning when it cannot fire on that signal.

A trial can be replayed or forked only when its config equals the baseline's apart from the WUS knobs
that do not change what is recorded (``wus.signal`` and ``wus.check_every`` must match, and so must the
epochs, the schedule, every other section and the plug-in methods); :func:`fork_blocker` says why not.
The baseline snapshots only checks where some trial of the space could start skipping, at most
``max_checkpoints`` of them (evenly spread; a trial forks from the latest one before its deviation).
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wus_tune._study.space import SearchSpace
from wus_tune.errors import UsageError

if TYPE_CHECKING:
    import optuna

    from wus_tune.config import TrainConfig
    from wus_tune.run_state import Probes, RunState

# Trial user attributes (Optuna) written here
SIGNAL_ATTR = "reuse_signal"  # on the baseline: its ProbeRecord dicts
CHECKPOINTS_ATTR = "reuse_checkpoints"  # on the baseline: {"dir", "points", "bytes"}
REUSED_ATTR = "reused"  # "baseline" on a trial completed with the baseline's values
FORKED_ATTR = "forked"  # {"trial", "point", "step", "epoch", "first_skip", "prefix_time_s"}
NOT_FORKED_ATTR = "reuse_skipped"  # why a WUS trial trained from scratch
CALIBRATED_ATTR = "search_space_calibrated"  # on the study: the calibrated space (JSON)
CALIBRATED_KEYS = ("wus.threshold", "wus.window", "wus.warmup")  # and the schedule-window end


@dataclass
class ReuseSpec:
    """The spec's ``reuse:`` section (every key optional)."""

    replay: bool = True  # a WUS trial that would never skip on the baseline's signal is not trained
    fork: bool = True  # a WUS trial resumes from the baseline's snapshot at its first skip window
    calibrate: bool = True  # threshold / window / warm-up ranges from the baseline's signal
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
    from wus_tune._study.storage import safe_name

    return Path(spec.checkpoint_dir) if spec.checkpoint_dir else Path("studies") / safe_name(study_name) / "baseline_checkpoints"


def remove_checkpoints(spec: ReuseSpec, study_name: str) -> int:
    """Delete the study's baseline snapshots; returns the bytes freed."""
    directory = checkpoint_dir(spec, study_name)
    if not directory.is_dir():
        return 0
    freed = sum(p.stat().st_size for p in directory.glob("*.pt"))
    shutil.rmtree(directory, ignore_errors=True)
    return freed


# ---- which trials can learn from the baseline ------------------------------------------------------


def fork_blocker(trial: Mapping[str, Any], baseline: Mapping[str, Any]) -> str | None:
    """Why a WUS trial's config cannot be replayed on / forked from the baseline's run; None if it can.

    Both are ``TrainConfig.to_dict()``; the trial must equal the baseline apart from the WUS knobs that
    do not change the recorded signal."""
    if not trial.get("wus", {}).get("enabled"):
        return "no WUS"
    tw, bw = trial["wus"], baseline["wus"]
    for key in ("signal", "check_every"):
        if tw.get(key) != bw.get(key):
            return f"wus.{key} {tw.get(key)!r} differs from the baseline's {bw.get(key)!r} (its recorded signal)"
    differs = sorted(k for k in set(trial) | set(baseline) if k not in ("wus", "meta") and trial.get(k) != baseline.get(k))
    if differs:
        detail = []
        for k in differs:
            a, b = trial.get(k), baseline.get(k)
            if isinstance(a, Mapping) and isinstance(b, Mapping):
                detail += [f"{k}.{s}" for s in sorted(set(a) | set(b)) if a.get(s) != b.get(s)]
            else:
                detail.append(k)
        return f"{', '.join(detail)} differ from the baseline's (needs a baseline run of its own)"
    return None


def signal_of(probes: Sequence[Mapping[str, Any]], signal: str) -> list[float] | None:
    values = [p.get("val_acc") if signal == "val_acc" else p.get("train_acc") for p in probes]
    return None if any(v is None for v in values) else [float(v) for v in values]


# ---- the baseline's snapshots -------------------------------------------------------------------


def candidate_points(space: SearchSpace, base: TrainConfig, progress: Sequence[float]) -> list[int]:
    """Checks (1-based; ``progress[k - 1]`` is the training fraction at check ``k``) after which some
    trial of ``space`` could start its first skip window: after the smallest warm-up and the smallest
    window, inside the widest schedule window."""

    def bound(key: str, default: float, high: bool) -> float:
        if key in space and space[key].type != "categorical":
            return space[key].high if high else space[key].low
        return default

    w = base.wus
    first = int(max(bound("wus.warmup", w.warmup, False) + 1, bound("wus.window", w.window, False) + 1))
    start = bound("wus.schedule_window[0]", w.schedule_window[0], False)
    end = bound("wus.schedule_window[1]", w.schedule_window[1], True)
    return [k for k in range(first, len(progress) + 1) if start <= progress[k - 1] < end]


def check_progress(config: TrainConfig, steps_per_epoch: int) -> list[float]:
    """The training fraction at each check, as the trainer passes it to the controller."""
    every, total = config.wus.check_every, steps_per_epoch * config.epochs
    if every == 0:
        return [(e + 1) / config.epochs for e in range(config.epochs)]
    return [k * every / total for k in range(1, total // every + 1)]


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


def steps_per_epoch(config: TrainConfig) -> int:
    """Optimizer steps per epoch (the training loader drops the last partial batch)."""
    from wus_tune.data import load_dataset

    n = len(load_dataset(config.data).train_y)
    batch = min(config.optim.batch_size, n)
    return max(1, n // batch)


def baseline_probes(study_def: Any, base: TrainConfig) -> Probes:
    """What the baseline records: the signal at every check of the base config's cadence, and the
    snapshots forks may start from."""
    from wus_tune.run_state import Probes

    reuse: ReuseSpec = study_def.reuse
    save: list[int] = []
    if reuse.fork:
        try:  # epoch-end checks need no data; per-step ones need the steps per epoch
            progress = check_progress(base, steps_per_epoch(base) if base.wus.check_every else 1)
        except Exception:  # a user's own data the registry cannot load here: record the signal, keep no snapshot
            progress = []
        save = spread(candidate_points(study_def.space, base, progress), reuse.max_checkpoints)
    return Probes(every=base.wus.check_every, val=base.wus.signal == "val_acc", save_at=tuple(save),
                  save_dir=str(checkpoint_dir(reuse, study_def.name)) if save else None)  # fmt: skip


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
    first_skip: int | None = None
    point: int | None = None  # the snapshot a fork resumes from
    replay: Any = None  # the wus.Replay
    baseline: Baseline | None = None


def decide(config: TrainConfig, baseline: Baseline | None, spec: ReuseSpec, *, why_no_baseline: str = "") -> Decision:
    """Replay the baseline's signal with the trial's knobs; reuse, fork or train."""
    from wus_tune.wus import replay

    if not (spec.replay or spec.fork):
        return Decision("train", "reuse is off")
    if baseline is None:
        return Decision("train", why_no_baseline or "no completed baseline")
    blocker = fork_blocker(config.to_dict(), baseline.config)
    if blocker is not None:
        return Decision("train", blocker)
    signal = signal_of(baseline.probes, config.wus.signal)
    if signal is None or not signal:
        return Decision("train", f"the baseline recorded no {config.wus.signal} signal")
    result = replay(signal, config.wus, progress=[p["progress"] for p in baseline.probes], total_checks=len(signal))
    if result.first_skip is None:
        if spec.replay:
            return Decision("reuse", replay=result, baseline=baseline)
        return Decision("train", "replay is off")
    if not spec.fork:
        return Decision("train", "fork is off", first_skip=result.first_skip, replay=result)
    point = baseline.snapshot_before(result.first_skip)
    if point is None:
        where = baseline.checkpoints.get("dir")
        return Decision("train", f"no baseline snapshot at or before check {result.first_skip}"
                        + (f" in {where}" if where else ""), first_skip=result.first_skip, replay=result)  # fmt: skip
    return Decision("fork", first_skip=result.first_skip, point=point, replay=result, baseline=baseline)


def plan_tags(plan: Decision) -> dict[str, str]:
    """MLflow tags of a trial's child run: reused, where it forked, or why it trained from scratch."""
    if plan.kind == "reuse":
        return {"wus_tune.reused": "baseline", "wus_tune.reused_from_trial": str(plan.baseline.number)}
    if plan.kind == "fork":
        return {"wus_tune.forked_from_trial": str(plan.baseline.number), "wus_tune.fork_check": str(plan.point),
                "wus_tune.first_skip_check": str(plan.first_skip)}  # fmt: skip
    return {"wus_tune.not_forked": plan.reason[:500]} if plan.reason else {}


def record_run(trial: optuna.Trial, plan: Decision, result: Any, fit_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Store what reuse needs from a finished run; returns the figures for the trial's ``result``.

    ``compute_flops`` is what this run actually executed (a fork's prefix was the baseline's)."""
    out: dict[str, Any] = {"compute_flops": float(getattr(result, "cost_flops", 0.0))}
    probes = fit_kwargs.get("probes")
    if probes is not None:
        from dataclasses import asdict

        trial.set_user_attr(SIGNAL_ATTR, [asdict(p) for p in getattr(result, "probes", [])])
        points = [p for p in probes.save_at] if probes.save_dir else []
        size = snapshot_bytes(probes.save_dir, points) if points else 0
        trial.set_user_attr(CHECKPOINTS_ATTR, {"dir": probes.save_dir, "points": points, "bytes": size})
        out["checkpoint_bytes"] = size
    state = fit_kwargs.get("resume_from")
    if state is not None:
        prefix_flops = float(state.probes[-1]["train_flops"]) + float(state.counters["required_eval_flops"])
        prefix_time = float(state.counters["train_time_s"]) + float(state.counters["required_eval_time_s"])
        trial.set_user_attr(FORKED_ATTR, {"trial": plan.baseline.number, "point": plan.point, "step": state.step,
                                          "epoch": state.epoch, "first_skip": plan.first_skip,
                                          "prefix_time_s": prefix_time, "prefix_flops": prefix_flops})  # fmt: skip
        out["compute_flops"] -= prefix_flops
        out["forked_at_check"] = plan.point
    return out


def fork_state(decision: Decision, baseline: Baseline, config: TrainConfig) -> RunState:
    """The baseline's snapshot made into the trial's: the controller's replayed state at the point, its
    metrics on the prefix's epoch records, and the prefix's checks charged when the trial watches
    ``val_acc`` (a WUS run evaluates at each check; the baseline's passes were measured, not charged)."""
    from wus_tune.run_state import RunState, snapshot_path

    point = decision.point
    assert point is not None
    state = RunState.load(snapshot_path(baseline.checkpoints["dir"], point))
    state.method_states["wus"] = decision.replay.states[point - 1]
    probes = state.probes[:point]
    # each finished epoch shows the controller's metrics after its last check, as a live run logs them
    for record in state.records:
        at_end = [i for i, p in enumerate(probes) if p["step"] <= record["epoch"] * record["steps"]]
        if at_end:
            record["extra"] = {**record.get("extra", {}), **decision.replay.metrics[at_end[-1]]}
    if config.wus.signal == "val_acc":
        state.counters["required_eval_time_s"] += sum(p["eval_time_s"] for p in probes)
        state.counters["required_eval_flops"] += sum(p["eval_flops"] for p in probes)
    return state


def reused_summary(baseline: Baseline) -> dict[str, Any]:
    """The ``result`` attribute of a trial completed with the baseline's values: the baseline's figures."""
    res = dict(baseline.attrs.get("result") or {})
    drop = ("fit_s", "overhead_s", "mlflow_s", "sample_s", "checkpoint_bytes")
    return {k: v for k, v in res.items() if k not in drop} | {"compute_flops": 0.0}


# ---- finding the baseline, waiting for it ------------------------------------------------------------


def find_baseline(study: optuna.Study) -> tuple[Baseline | None, str, bool]:
    """(the completed baseline, why there is none, whether one is running)."""
    from optuna.trial import TrialState

    reasons, running = [], False
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get("role") != "baseline":
            continue
        if t.state == TrialState.COMPLETE:
            b = Baseline.from_trial(t)
            if b is not None:
                return b, "", False
            reasons.append(f"baseline trial {t.number} recorded no signal")
        elif t.state == TrialState.RUNNING:
            running = True
        elif t.state == TrialState.FAIL:
            reasons.append(f"baseline trial {t.number} failed ({t.user_attrs.get('fail_reason', 'no reason')})")
    return None, "; ".join(reasons) or "no baseline trial", running


def wait_for_baseline(study: optuna.Study, *, timeout_s: float, poll_s: float = 1.0,
                      while_waiting: Callable[[optuna.Study], Any] | None = None) -> tuple[Baseline | None, str]:  # fmt: skip
    """The completed baseline, waiting while one is RUNNING (another worker trains it) for at most
    ``timeout_s``. A baseline that fails or goes stale ends the wait: the caller trains from scratch.
    ``while_waiting`` (the stale-trial sweep) runs at each poll, so a dead baseline worker is noticed."""
    deadline = time.monotonic() + timeout_s
    while True:
        baseline, why, running = find_baseline(study)
        if baseline is not None or not running:
            return baseline, why
        if time.monotonic() >= deadline:
            return None, f"the baseline was still running after {timeout_s:g} s"
        if while_waiting is not None:
            while_waiting(study)
        time.sleep(poll_s)


# ---- the calibrated space ----------------------------------------------------------------------------


def variations(signal: Sequence[float], progress: Sequence[float], *, windows: Sequence[int], warmup: int,
               schedule_window: tuple[float, float]) -> list[float]:  # fmt: skip
    """Every variation the plateau test could see before a first skip window: for each window ``W``, the
    range of the ``W + 1`` accuracies ending at each check that lies after ``warmup`` and inside
    ``schedule_window``."""
    out = []
    for w in windows:
        for i in range(w, len(signal)):  # check i + 1 (1-based) sees accuracies i - w .. i
            if i + 1 <= warmup or not schedule_window[0] <= progress[i] < schedule_window[1]:
                continue
            window = signal[i - w : i + 1]
            out.append(max(window) - min(window))
    return out


def _quantile(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _int_range(space: SearchSpace, key: str, default: tuple[int, int]) -> tuple[int, int]:
    if key in space and space[key].type == "int":
        return int(space[key].low), int(space[key].high)
    return default


def calibrate_space(
    space: SearchSpace,
    base: TrainConfig,
    probes: Sequence[Mapping[str, Any]],
    *,
    explicit: Sequence[str] = (),
    low_q: float = 0.1,
    high_q: float = 0.9,
) -> tuple[SearchSpace, list[str]]:
    """``space`` with the ranges of the knobs that decide when skipping starts derived from the baseline's
    signal, and the one-line notes to print.

    * schedule-window end: its range is kept unless fewer than 3 checks lie before its low end; then
      the low end moves to just after the 3rd check (skipping must be able to start somewhere);
    * with ``m`` checks before that low end: window ``W`` 1 .. min(its high, m - 1) and warm-up
      0 .. min(its high, m - 2), so every sampled window and warm-up leaves a check where a plateau can
      start a skip window whatever end is sampled;
    * threshold ``tau`` (log): from the ``low_q`` to the ``high_q`` quantile of the variations the
      plateau test could see (every window of the range, every check inside the widest schedule window),
      nudged up by 1e-4 because the test is strict (``variation < tau``): small thresholds start skipping
      late or never, large ones early.

    A key in ``explicit`` (the spec's own ``search_space`` entries) keeps its range; when the ranges
    together cannot fire on this signal, one warning line says so.
    """
    signal = signal_of(probes, base.wus.signal)
    if not signal or "wus.threshold" not in space:
        return space, []
    progress = [float(p["progress"]) for p in probes]
    n = len(signal)
    params = {p.key: p for p in space.params}
    mine = {k for k in params if k not in explicit}
    w = base.wus
    end_key = "wus.schedule_window[1]"
    start = params["wus.schedule_window[0]"].low if "wus.schedule_window[0]" in params else w.schedule_window[0]
    if end_key in params and params[end_key].type == "float":
        e = params[end_key]
        if end_key in mine and n >= 4 and sum(p < e.low for p in progress) < 3:
            low = min(progress[2] + 0.5 / n, float(e.high) - 0.01)
            params[end_key] = e = replace(e, low=float(f"{max(low, start + 0.01):.4g}"), high=max(float(e.high), low))
        end_low, end_high = float(e.low), float(e.high)
    else:
        end_low = end_high = w.schedule_window[1]
    m = sum(1 for p in progress if p < end_low)  # a skip window can start at check i only if i >= W + 1 and i > warm-up
    for key, cap, floor in (("wus.window", m - 1, 1), ("wus.warmup", m - 2, 0)):
        if key in mine and params[key].type == "int" and m >= 2:
            p = params[key]
            params[key] = replace(p, low=floor, high=max(floor, min(int(p.high), cap)))
    calibrated = SearchSpace(tuple(params.values()))
    w_lo, w_hi = _int_range(calibrated, "wus.window", (w.window, w.window))
    warm_lo, _ = _int_range(calibrated, "wus.warmup", (w.warmup, w.warmup))
    seen = variations(signal, progress, windows=range(w_lo, w_hi + 1), warmup=warm_lo, schedule_window=(start, end_high))
    tau = params["wus.threshold"]
    if not seen:
        return calibrated, [f"warning: the baseline's {n} checks leave no room for a plateau test (window {w_lo}..{w_hi}, "
                            f"warm-up from {warm_lo}); no WUS trial of this space can skip"]  # fmt: skip
    eps = 1e-4
    if "wus.threshold" not in mine or tau.type != "float":
        if float(tau.high) <= min(seen):
            return calibrated, [
                f"warning: search_space.wus.threshold {tau.low:g}..{tau.high:g} cannot fire on the baseline's signal "
                f"(its smallest variation over windows {w_lo}..{w_hi} is {min(seen):.4g}); those trials equal the "
                "baseline and are reused, not trained"]  # fmt: skip
        return calibrated, []
    low = max(_quantile(seen, low_q), eps) + eps
    high = max(_quantile(seen, high_q) + eps, low * 2)
    params["wus.threshold"] = replace(tau, low=float(f"{low:.4g}"), high=float(f"{high:.4g}"))
    out = SearchSpace(tuple(params.values()))
    shown = ", ".join(f"{k} {out[k].low:g}..{out[k].high:g}" for k in (*CALIBRATED_KEYS, end_key) if k in mine and k in out)
    return out, [f"reuse: search space calibrated on the baseline's {w.signal} ({n} checks): {shown}"]


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
