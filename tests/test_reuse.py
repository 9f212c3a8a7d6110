"""Studies that learn from their own baseline (wus_tune._study.reuse): replay, fork, calibration, workers.

Tiny digits runs (an MLP of width 0.25, 12 steps an epoch); about 40 s on 2 cores."""

from __future__ import annotations

import threading
import time

import optuna
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wus_tune._study import reuse
from wus_tune._study.space import SearchSpace
from wus_tune._study.spec import StudySpec
from wus_tune import TrainConfig, WUSConfig
from wus_tune.methods.wus.study import knobs as wus_knobs, variations
from wus_tune.run_state import RecordingPlan, RunState, snapshot_path
from wus_tune.study import run_study
from wus_tune.trainer import fit
from wus_tune.methods.wus.rule import WUSController, replay

TINY = {"model": {"name": "mlp", "width": 0.25}, "data": {"name": "digits"}, "device": "cpu", "epochs": 5,
        "schedule": {"name": "step"}}  # fmt: skip


def config(**wus) -> TrainConfig:
    """The plain recipe; given WUS's knobs, the recipe with WUS on with them."""
    cfg = TrainConfig.from_dict(TINY)
    return cfg.replace({"methods.wus": wus}) if wus else cfg


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


# ---- replay: the real controller on a recorded signal ------------------------------------------------

knobs = st.fixed_dictionaries({
    "threshold": st.sampled_from([0.0, 0.002, 0.01, 0.03, 0.08, 0.3]),
    "window": st.integers(1, 3),
    "warmup": st.integers(0, 3),
    "skip_length": st.integers(1, 3),
    "schedule_window": st.sampled_from([[0.0, 0.75], [0.0, 0.5], [0.2, 0.95], [0.0, 1.0]]),
    "max_skip_fraction": st.sampled_from([1.0, 0.3]),
    "lr_decay": st.sampled_from([1.0, 0.5]),
    "bias_lr_factor": st.sampled_from([1.0, 3.0]),
})  # fmt: skip


def _rule(signal, progress, cfg: WUSConfig, total: int) -> int | None:
    """The rule as the wus module's docstring states it, for a first skip window."""
    history = []
    for i, a in enumerate(signal):
        history.append(a)
        check = i + 1
        if check <= cfg.warmup or len(history) < cfg.window + 1:
            continue
        if not cfg.schedule_window[0] <= progress[i] < cfg.schedule_window[1] or 1 > cfg.max_skip_fraction * total:
            continue
        recent = history[-(cfg.window + 1) :]
        if max(recent) - min(recent) < cfg.threshold:
            return check
    return None


@settings(max_examples=300, deadline=None)
@given(knobs, st.lists(st.floats(0.0, 1.0, allow_nan=False), min_size=1, max_size=12))
def test_replay_finds_the_first_skip_window_the_rule_defines(k, signal):
    cfg = WUSConfig(**k)
    progress = [(i + 1) / len(signal) for i in range(len(signal))]
    r = replay(signal, cfg, progress=progress, total_checks=len(signal))
    assert r.first_skip == _rule(signal, progress, cfg, len(signal))
    assert len(r.states) == (r.first_skip or len(signal))
    assert r.states[-1]["skipping"] == (r.first_skip is not None)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """One baseline per signal cadence, with its probes (no snapshots)."""
    torch.set_num_threads(1)
    out = {}
    for signal, every in (("val_acc", 0), ("train_acc", 0), ("val_acc", 5), ("train_acc", 7)):
        b = fit(config(), recording=RecordingPlan(every=every, val=signal == "val_acc"))
        out[(signal, every)] = b.probes
    return out


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(knobs, st.sampled_from([("val_acc", 0), ("train_acc", 0), ("val_acc", 5), ("train_acc", 7)]))
def test_replay_matches_the_live_controller_in_the_trainer(recorded, monkeypatch, k, cadence):
    """The decision replayed on the baseline's recorded signal is the one the trainer's own controller
    takes on the live WUS run, for every knob combination drawn; and the live run watched the very
    signal the baseline recorded, check by check, up to its first skip window."""
    probes = recorded[cadence]
    seen: list[tuple[float, bool]] = []
    observe = WUSController.observe

    def spy(self, accuracy, progress=None):
        skipping = observe(self, accuracy, progress)
        seen.append((accuracy, skipping))
        return skipping

    monkeypatch.setattr(WUSController, "observe", spy)
    live = config(signal=cadence[0], check_every=cadence[1], **k)
    signal = reuse.signal_of([p.__dict__ for p in probes], cadence[0])
    r = replay(signal, wus_knobs(live), progress=[p.progress for p in probes], total_checks=len(signal))
    fit(live)
    live_first = next((i + 1 for i, (_, s) in enumerate(seen) if s), None)
    assert live_first == r.first_skip
    upto = r.first_skip or len(signal)
    assert [a for a, _ in seen[:upto]] == signal[:upto]


# ---- fork: resumed from the baseline's snapshot == trained from scratch ---------------------------


@pytest.mark.parametrize("signal,every", [("val_acc", 0), ("train_acc", 0), ("val_acc", 5), ("train_acc", 7)])
def test_a_forked_trial_is_bit_identical_to_its_from_scratch_twin(tmp_path, signal, every):
    base = config()
    baseline = fit(base, recording=RecordingPlan(every=every, val=signal == "val_acc", save_at=range(1, 100), save_dir=str(tmp_path)))
    wus = config(signal=signal, check_every=every, threshold=0.15, window=1, warmup=2, schedule_window=[0.0, 0.95],
                 skip_length=2, lr_decay=0.5, bias_lr_factor=2.0)  # fmt: skip
    probes = [p.__dict__ for p in baseline.probes]
    b = reuse.Baseline(number=0, values=(baseline.val_acc, baseline.time_s), config=base.replace({}).to_dict(),
                       probes=probes, checkpoints={"dir": str(tmp_path), "points": list(range(1, len(probes) + 1))})  # fmt: skip
    plan = reuse.decide(wus, b, reuse.ReuseSpec())
    assert plan.kind == "fork" and plan.point == plan.first_skip
    assert plan.first_skip < len(probes)  # a skip window that changes training
    scratch = fit(wus)
    forked = fit(wus, resume_from=reuse.fork_state(plan, b, wus))
    assert forked.resumed_from["point"] == plan.point and scratch.changed_steps > 0
    a, z = scratch.model.state_dict(), forked.model.state_dict()
    assert a.keys() == z.keys() and all(torch.equal(a[n], z[n]) for n in a)
    for name in ("val_acc", "val_loss", "test_acc", "changed_steps", "step_kinds", "train_flops", "cost_flops", "total_steps"):
        assert getattr(scratch, name) == getattr(forked, name), name
    for e1, e2 in zip(scratch.epochs, forked.epochs, strict=True):
        for name in ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "steps_by_kind", "flops"):
            assert getattr(e1, name) == getattr(e2, name), (e1.epoch, name)
        assert e1.extra == e2.extra, e1.epoch  # the controller's metrics, replayed on the prefix
    # forking earlier (the check itself not kept) trains the checks in between as WUS: the same result
    earlier = reuse.Baseline(**{**b.__dict__, "checkpoints": {"dir": str(tmp_path), "points": [plan.first_skip - 1]}})
    plan_earlier = reuse.decide(wus, earlier, reuse.ReuseSpec())
    assert plan_earlier.kind == "fork" and plan_earlier.point == plan.first_skip - 1
    again = fit(wus, resume_from=reuse.fork_state(plan_earlier, earlier, wus)).model.state_dict()
    assert all(torch.equal(a[n], again[n]) for n in a)
    # the prefix is charged at the baseline's measured cost: its training time and, on val_acc, its checks
    state = RunState.load(snapshot_path(tmp_path, plan.point))
    charged = state.counters["train_time_s"]
    assert forked.train_time_s >= charged > 0
    if signal == "val_acc":
        assert forked.required_eval_time_s >= sum(p["eval_time_s"] for p in probes[: plan.point]) > 0


def test_replay_and_fork_are_refused_for_a_different_recipe():
    base = config().to_dict()
    assert reuse.fork_blocker(config(threshold=0.02).to_dict(), base) is None
    other_epochs = TrainConfig.from_dict(TINY | {"epochs": 4}).replace({"methods.wus": {}}).to_dict()
    assert "epochs" in reuse.fork_blocker(other_epochs, base)
    cosine = config(threshold=0.02).replace({"schedule.name": "cosine"}).to_dict()
    assert "schedule.name" in reuse.fork_blocker(cosine, base)
    # WUS's own entry may differ from the (plain) baseline's, but it must watch what the baseline recorded
    cadence = config(check_every=3)
    assert reuse.fork_blocker(cadence.to_dict(), base) is None
    epoch_ends = [{"step": 13 * (i + 1), "progress": (i + 1) / 5, "val_acc": 0.5, "train_acc": 0.5} for i in range(5)]
    b = reuse.Baseline(number=0, values=(0.5, 1.0), config=base, probes=epoch_ends, checkpoints={})
    plan = reuse.decide(cadence, b, reuse.ReuseSpec())
    assert plan.kind == "train" and "not at the trial's checks (every 3 steps)" in plan.reason


# ---- the study: reused, forked, bounded snapshots, a failed baseline -----------------------------


def _spec(name, **extra):
    return StudySpec.from_dict({
        "name": name, "train": TINY, "baseline_fractions": [], "tracking_uri": "sqlite:///mlruns/mlflow.db",
        "enqueue": [
            {"methods.wus.variant": "wus", "methods.wus.threshold": 0.0},  # never fires: no variation is below 0
            {"methods.wus.variant": "wus", "methods.wus.threshold": 0.2, "methods.wus.window": 1, "methods.wus.warmup": 2,
             "methods.wus.schedule_window[1]": 0.95},  # fires after check 3
        ],
        "sampler_options": {"n_startup_trials": 2},
    } | extra)  # fmt: skip


class CountingFit:
    def __init__(self, fail_baseline: bool = False):
        self.calls: list[dict] = []
        self.fail_baseline = fail_baseline

    def __call__(self, config, **kw):
        self.calls.append({"trial": config.meta.get("trial"), "resumed": kw.get("resume_from") is not None})
        if self.fail_baseline and "wus" not in config.methods:
            raise RuntimeError("the baseline's machine caught fire")
        return fit(config, **kw)


def test_a_study_reuses_and_forks_from_its_baseline(study_dir):
    from mlflow import MlflowClient

    counting = CountingFit()
    user_space = {"methods.wus.threshold": {"low": 1e-5, "high": 1e-4}, "methods.wus.window": {"low": 2, "high": 2}}
    outcome = run_study(_spec("reuse", n_trials=5, search_space=user_space), fit=counting, echo=(lines := []).append)
    by = {c.number: c for c in outcome.analysis.candidates}
    assert [by[n].role for n in range(4)] == ["baseline", "wus-default", "enqueued", "enqueued"]
    base = by[0]
    reused = [c for c in by.values() if c.attrs.get("reused")]
    forked = [c for c in by.values() if c.attrs.get("forked")]
    assert reused and forked
    trained = {call["trial"] for call in counting.calls}
    for c in reused:  # not trained, COMPLETE with its twin's values, never a new point of the front
        assert c.number not in trained and c.state == "COMPLETE" and c.values[0] == base.values[0]
        # its twin pays a validation pass at each of WUS's val_acc checks, which the baseline did not
        result, passes = c.attrs["result"], len(base.attrs["reuse_signal"]) - 1
        assert result["work_counts"]["eval"] == base.attrs["result"]["work_counts"]["eval"] * (1 + passes)
        assert c.values[1] == pytest.approx(result["relative_time"]) and result["relative_time"] > base.values[1]
        assert c.attrs["reused"] == "baseline" and c.number not in outcome.analysis.front
        assert result["compute_flops"] == 0.0
    assert by[2].attrs.get("reused") == "baseline"
    fork = by[3]
    assert fork.attrs["forked"]["point"] == 3 and fork.attrs["forked"]["trial"] == 0
    assert {"trial": fork.number, "resumed": True} in counting.calls
    # the user's threshold range never fires on this signal: one warning line, the range kept
    assert sum("search_space.methods.wus.threshold 1e-05..0.0001 cannot fire" in line for line in lines) == 1
    assert by[4].attrs["reused"] == "baseline"  # a search trial drawn from that range
    assert any(line.startswith("reuse: ") and "not trained" in line for line in lines)
    assert any("=baseline" in line for line in lines) and any("forked@3" in line for line in lines)
    # MLflow shows it too
    client = MlflowClient("sqlite:///mlruns/mlflow.db")
    run = client.get_run(fork.attrs["mlflow_run_id"])
    assert run.data.tags["wus_tune.forked_from_trial"] == "0" and run.data.tags["wus_tune.fork_check"] == "3"
    assert len(client.get_metric_history(run.info.run_id, "val_acc")) == 5  # the prefix's curve included
    assert client.get_run(reused[0].attrs["mlflow_run_id"]).data.tags["wus_tune.reused"] == "baseline"
    # snapshots: only the checks a trial could start deviating at, at most max_checkpoints, sizes recorded
    ck = base.attrs["reuse_checkpoints"]
    assert ck["points"] == [3, 4] and ck["bytes"] > 0  # after warm-up 0 and window 2; progress below 0.95
    assert sorted(p.name for p in (study_dir / "studies" / "reuse" / "baseline_checkpoints" / "trial_00000").iterdir()) == [
        "point_00003.pt", "point_00004.pt"]  # fmt: skip


def test_snapshots_are_bounded_and_removed_when_not_kept(study_dir):
    spec = _spec("bounded", n_trials=3, tracking_uri="none", reuse={"max_checkpoints": 1, "keep_checkpoints": False},
                 search_space={"methods.wus.warmup": {"low": 0, "high": 2}})  # fmt: skip
    lines: list[str] = []
    outcome = run_study(spec, echo=lines.append)
    base = outcome.analysis.by_number(0)
    assert base.attrs["reuse_checkpoints"]["points"] == [2]  # candidates 2..4 (warm-up 0, window 1), one kept
    assert not (study_dir / "studies" / "bounded" / "baseline_checkpoints").exists()
    assert any(line.startswith("reuse: removed the baseline's snapshots") for line in lines)


def test_a_failed_baseline_means_training_from_scratch(study_dir):
    counting = CountingFit(fail_baseline=True)
    lines: list[str] = []
    outcome = run_study(_spec("nobase", n_trials=3, tracking_uri="none"), fit=counting, echo=lines.append)
    states = {c.number: c.state for c in outcome.analysis.candidates}
    assert states == {0: "FAIL", 1: "COMPLETE", 2: "COMPLETE", 3: "WAITING"}  # the last enqueued one: not run
    assert [call["trial"] for call in counting.calls] == [0, 1, 2]  # every WUS trial trained
    assert not any(call["resumed"] for call in counting.calls)
    for n in (1, 2):
        reason = outcome.analysis.by_number(n).attrs["reuse_skipped"]
        assert "baseline trial 0 failed" in reason and "caught fire" in reason
    assert any("trained from scratch" in line and "baseline trial 0 failed" in line for line in lines)


def test_a_waiting_worker_goes_on_when_the_running_baseline_fails(tmp_path):
    """Several workers: a forkable trial waits for the baseline another worker trains, and stops waiting
    (to train from scratch) the moment that baseline fails: no deadlock."""
    study = optuna.create_study(storage=f"sqlite:///{tmp_path}/w.db", directions=["maximize", "minimize"])
    study.enqueue_trial({}, user_attrs={"role": "baseline"})
    running = study.ask()
    assert running.user_attrs["role"] == "baseline"
    result: dict = {}

    def waiter():
        result["value"] = reuse.wait_for_baseline(study, timeout_s=60, poll_s=0.05)

    thread = threading.Thread(target=waiter)
    start = time.monotonic()
    thread.start()
    time.sleep(0.5)
    assert thread.is_alive()  # waiting while the baseline runs
    running.set_user_attr("fail_reason", "RuntimeError: lost")
    study.tell(running, state=optuna.trial.TrialState.FAIL)
    thread.join(10)
    assert not thread.is_alive() and time.monotonic() - start < 10
    baseline, why = result["value"]
    assert baseline is None and "baseline trial 0 failed (RuntimeError: lost)" in why
    assert reuse.wait_for_baseline(study, timeout_s=0)[0] is None  # nothing running: no wait at all


# ---- the calibrated space -----------------------------------------------------------------------------


def _probes(signal):
    n = len(signal)
    return [{"progress": (i + 1) / n, "val_acc": a, "train_acc": a} for i, a in enumerate(signal)]


def test_calibrated_thresholds_lie_between_quantiles_of_the_baselines_variation():
    space = SearchSpace.build()
    signal = [0.30, 0.55, 0.68, 0.74, 0.78, 0.80, 0.81, 0.815, 0.82, 0.82]
    out, notes = reuse.calibrate_space(space, config(), _probes(signal))
    tau, window, warmup = out["methods.wus.threshold"], out["methods.wus.window"], out["methods.wus.warmup"]
    seen = variations(signal, [p["progress"] for p in _probes(signal)], windows=range(1, int(window.high) + 1),
                      warmup=0, schedule_window=(0.0, 0.95))  # fmt: skip
    assert min(seen) < tau.low < tau.high <= max(seen) + 1e-4 and tau.log
    assert (window.low, window.high) == (1, 3) and (warmup.low, warmup.high) == (0, 2)  # 4 checks before 0.5
    assert len(notes) == 1 and notes[0].startswith("reuse: search space calibrated")
    # settings drawn from the calibrated ranges start skipping at different checks, not never
    firsts = {replay(signal, WUSConfig(threshold=t, window=w, warmup=0), total_checks=10,
                     progress=[p["progress"] for p in _probes(signal)]).first_skip
              for t in (tau.low * 1.01, (tau.low * tau.high) ** 0.5, tau.high) for w in (1, 2, 3)}  # fmt: skip
    assert len(firsts - {None}) >= 3


def test_an_explicit_user_range_is_kept_and_warned_about_when_it_cannot_fire():
    space = SearchSpace.build({"methods.wus.threshold": {"low": 0.0001, "high": 0.001}})
    signal = [0.3, 0.5, 0.6, 0.7, 0.75, 0.8]
    out, notes = reuse.calibrate_space(space, config(), _probes(signal), explicit=("methods.wus.threshold",))
    assert (out["methods.wus.threshold"].low, out["methods.wus.threshold"].high) == (0.0001, 0.001)
    assert len(notes) == 1 and "cannot fire on the baseline's signal" in notes[0] and "\n" not in notes[0]
    ok = SearchSpace.build({"methods.wus.threshold": {"low": 0.01, "high": 0.2}})
    assert reuse.calibrate_space(ok, config(), _probes(signal), explicit=("methods.wus.threshold",))[1] == []
