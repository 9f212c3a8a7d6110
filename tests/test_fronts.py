"""Trustworthy fronts (issue 9): the relative time objective, the pooled baseline, the pareto CLI's
``--trial`` / ``--format json`` / ``--confirm``, held-out test accuracy that never steers selection, and the
tuned-plain yardstick of methods that retune the optimizer."""

from __future__ import annotations

import json
import time

import optuna
import pytest
import torch

from wus_tune import timing
from wus_tune.config import TrainConfig
from wus_tune.study import StudySpec, run_study

TINY = {"model": {"name": "mlp", "width": 0.25, "depth": 3}, "data": {"name": "digits", "val_fraction": 0.2},
        "epochs": 4, "device": "cpu", "optim": {"batch_size": 128}}  # fmt: skip


# ---- the arithmetic, on scripted step costs ------------------------------------------------------


class ScriptedClock:
    """A clock that only moves when a probe says its unit of work took so long."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def probe(self, costs: list[float] | float, units: float = 1.0) -> timing.Workload:
        script = iter(costs) if isinstance(costs, list) else None

        def run() -> float:
            self.now += next(script) if script is not None else costs
            return units

        return timing.Workload(run=run)


def test_modelled_seconds_are_counts_times_prices_plus_one_off_work():
    from wus_tune.pricing import modelled_seconds

    prices = {"step:full": 0.010, "step:skip:all": 0.004, "eval": 1e-5, "baseline:step": 0.010, "baseline:eval": 1e-5}
    trial = {"step:full": 60, "step:skip:all": 40, "eval": 2000}
    base = {"baseline:step": 100, "baseline:eval": 500}
    assert modelled_seconds(trial, prices) == pytest.approx(0.6 + 0.16 + 0.02)
    assert modelled_seconds(trial, prices, one_off_s=0.05) == pytest.approx(0.83)  # a cache build, a hook
    assert modelled_seconds(base, prices) == pytest.approx(1.005)
    with pytest.raises(ValueError, match="no measured price for work of kind 'step:skip:last:1'"):
        modelled_seconds({"step:skip:last:1": 3}, prices)
    assert modelled_seconds({"step:skip:last:1": 0}, prices) == 0.0  # work not done needs no price


def test_measured_prices_are_medians_of_interleaved_bursts_and_drop_a_spike():
    clock = ScriptedClock()
    # 1 warm-up + 1 sizing unit, then 5 rounds of bursts (min_burst_s 0 -> one unit per burst).
    full = [9.0, 0.010] + [0.010, 0.010, 0.500, 0.010, 0.010]  # a 0.5 s spike in round 3
    skip = [9.0, 0.004] + [0.004] * 5
    evals = [9.0, 0.002] + [0.002] * 5  # one unit = a batch of 200 samples
    probes = {"step:full": clock.probe(full), "step:skip:all": clock.probe(skip), "eval": clock.probe(evals, units=200)}
    m = timing.measure_interleaved(probes, timing.TimingOptions(rounds=5, min_burst_s=0.0), clock=clock)
    assert m["step:full"].seconds == pytest.approx(0.010) and m["step:full"].high == pytest.approx(0.5)
    assert m["step:skip:all"].seconds == pytest.approx(0.004)
    assert m["eval"].seconds == pytest.approx(0.002 / 200)  # per sample


def test_bursts_are_sized_to_min_burst_and_a_drifting_load_cancels_when_paired():
    clock = ScriptedClock()
    # prepare() runs before every burst: warm-up and sizing of each kind at load 1, then the machine
    # slows down round by round (each round's two bursts see the same load)
    load = iter([1, 1, 1, 1] + [1, 1, 2, 2, 3, 3, 4, 4, 5, 5])

    def make(cost: float) -> timing.Workload:
        factor = {"f": 1.0}

        def prepare() -> None:
            factor["f"] = next(load)

        def run() -> float:
            clock.now += cost * factor["f"]
            return 1.0

        return timing.Workload(run=run, prepare=prepare)

    probes = {"baseline:step": make(1 / 128), "step:skip:all": make(1 / 512)}  # binary fractions: exact sums
    m = timing.measure_interleaved(probes, timing.TimingOptions(rounds=5, min_burst_s=1 / 64), clock=clock,
                                   paired_with="baseline:step")  # fmt: skip
    assert m["baseline:step"].units_per_burst == 2 and m["step:skip:all"].units_per_burst == 8  # >= 1/64 s each
    # the ratio within each round is exactly 1/4, whatever the load: the paired price keeps it
    assert m["step:skip:all"].seconds / m["baseline:step"].seconds == pytest.approx(0.25)
    assert m["baseline:step"].seconds == pytest.approx(3 / 128)  # the median load, 3


# ---- the trainer's ledger and its prices ------------------------------------------------------------


def test_a_plain_run_is_exactly_its_share_of_the_baseline_and_wus_pays_its_evaluations(one_torch_thread):
    from wus_tune import fit

    base = TrainConfig.from_dict(TINY)
    r = fit(base, relative_to=base)
    assert r.relative_time == 1.0 and r.work_counts["step:full"] == r.total_steps
    assert r.reference_time_s > 0 and r.modelled_time_s == pytest.approx(r.reference_time_s)
    half = fit(base.replace({"epochs": 2}), relative_to=base)
    steps, evals = r.unit_costs["baseline:step"]["seconds"], r.unit_costs["baseline:eval"]["seconds"]
    assert 0.5 < half.relative_time < 0.6  # half the steps, the same final evaluation
    wus = fit(base.replace({"methods.wus": {}, "methods.wus.threshold": 0.5, "methods.wus.warmup": 0, "methods.wus.window": 1,
                            "methods.wus.bias_scope": "last:1", "methods.wus.schedule_window": [0.0, 1.0]}), relative_to=base)  # fmt: skip
    assert wus.changed_steps > 0 and wus.work_counts["step:skip:last:1"] == wus.changed_steps
    assert wus.work_counts["eval"] > r.work_counts["eval"]  # its val_acc checks are charged
    assert set(wus.unit_costs) >= {"step:skip:last:1", "baseline:step"}
    assert "step:full" not in wus.unit_costs and "eval" not in wus.unit_costs  # WUS's full steps are the baseline's
    assert steps > 0 and evals > 0


def test_injected_slowdown_changes_the_wall_time_not_the_relative_time(one_torch_thread):
    from wus_tune import fit

    base = TrainConfig.from_dict(TINY)
    quiet = fit(base, relative_to=base)
    slowed = fit(base, relative_to=base, on_step=lambda step: time.sleep(0.03))
    assert slowed.time_s >= 0.03 * slowed.total_steps  # a sleep lasts at least that long: charged as wall time
    assert slowed.relative_time == quiet.relative_time == 1.0


def test_a_study_whose_trials_are_slowed_still_ranks_them_by_what_they_ran(study_dir, one_torch_thread):
    """Plain trials at 50%, 75% and 100% of the epochs; the shorter ones are slowed by a sleep in every step
    (as a busy machine would), so by wall time they look slowest. relative_time ranks them by their work."""
    from wus_tune import fit

    baseline_wall: list[float] = []

    def fit_slowed(config, **kw):  # the baseline runs first; the shorter runs then sleep twice its wall time
        if config.epochs == TINY["epochs"]:
            result = fit(config, **kw)
            baseline_wall.append(result.time_s)
            return result
        steps = config.epochs * 11  # 1437 digits x 0.8 / 128 per batch, last partial batch dropped
        return fit(config, on_step=lambda step: time.sleep(2 * baseline_wall[0] / steps), **kw)

    spec = StudySpec.from_dict({"name": "slowed", "train": TINY, "baseline_fractions": [0.5, 0.75],
                                "enqueue_defaults": False})  # fmt: skip
    outcome = run_study(spec, n_trials=3, tracking_uri="none", fit=fit_slowed, echo=None)
    cands = {c.config["epochs"]: c for c in outcome.analysis.complete}
    wall = {e: c.attrs["result"]["time_s"] for e, c in cands.items()}
    rel = {e: c.values[1] for e, c in cands.items()}
    assert wall[2] > wall[4] and wall[3] > wall[4]  # the slowdown inverted the wall-time order
    assert rel[2] < rel[3] < rel[4] == 1.0  # the objective did not follow it
    assert rel[2] == pytest.approx(0.5, abs=0.05) and rel[3] == pytest.approx(0.75, abs=0.05)
    assert outcome.analysis.objectives == ("accuracy", "relative_time")


# ---- pooled baseline, metric names, --trial, --format json, --confirm ----------------------------------


@pytest.fixture
def digits_study(study_dir, one_torch_thread):
    spec = StudySpec.from_dict({"name": "fronts", "train": TINY, "baseline_fractions": [0.5], "baseline_repeats": 2,
                                "n_trials": 5, "tracking_uri": "sqlite:///mlruns/mlflow.db"})  # fmt: skip
    outcome = run_study(spec, echo=None)
    return outcome


def test_pooled_baseline_metric_names_trial_export_and_json(digits_study, capsys):
    from wus_tune.pareto import main

    outcome = digits_study
    baselines = [c for c in outcome.analysis.complete if c.role == "baseline"]
    assert [c.config["seed"] for c in baselines] == [0, 1]  # measured twice, the second later, another seed
    assert outcome.analysis.baseline.attrs["baseline_trials"] == [c.number for c in baselines]
    accs = sorted(c.values[0] for c in baselines)
    assert outcome.analysis.baseline.values[0] == pytest.approx(sum(accs) / 2)  # the median of two
    study = optuna.load_study(study_name="fronts", storage="sqlite:///studies/fronts.db")
    assert study.metric_names == ["accuracy", "relative_time"]

    assert main(["--study", "fronts", "--format", "json", "--all"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["objectives"] == ["accuracy", "relative_time"] and data["time_objective"] == "relative_time"
    entries = {e["number"]: e for e in data["front"]}
    assert sum(e["selected"] for e in entries.values()) == 1 and data["selected"] == outcome.selected.number
    assert entries[data["selected"]]["selected"] is True
    base_time = data["baseline"]["relative_time"]
    for e in entries.values():
        assert {"number", "role", "accuracy", "speedup", "selected", "test_accuracy", "time_s"} <= set(e)
        assert e["speedup"] == pytest.approx(base_time / e["relative_time"])
    assert data["baseline"]["trials"] == [c.number for c in baselines]

    frontier = next(c for c in outcome.analysis.complete if c.role == "baseline-frontier")
    assert main(["--study", "fronts", "--trial", str(frontier.number), "--out", "t.yaml"]) == 0
    exported = TrainConfig.load("t.yaml")
    assert exported.epochs == 2 and exported.meta["trial"] == frontier.number
    assert main(["--study", "fronts", "--trial", "0", "--out", "b.yaml"]) == 0  # the baseline too
    assert TrainConfig.load("b.yaml").methods == {}
    capsys.readouterr()
    assert main(["--study", "fronts", "--trial", "99"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --trial 99: study 'fronts' has no such trial") and len(err.splitlines()) == 1


def test_confirm_reruns_interleaved_and_logs_under_the_parent_run(digits_study, capsys):
    from mlflow.tracking import MlflowClient

    from wus_tune.intervals import decide, ratio_interval
    from wus_tune.pareto import main

    outcome = digits_study
    # a method trial (the rule may pick a frontier trial, which has no frontier runs of its own)
    wus = next(c for c in outcome.analysis.complete if c.uses_method)
    assert main(["--study", "fronts", "--confirm", "2", "--max-rounds", "2", "--trial", str(wus.number)]) == 0
    out = capsys.readouterr().out
    assert "confirmation of trial" in out and any(f"\n  {v}: speed-up" in out for v in ("holds", "fails", "undecided"))
    rounds = [line for line in out.splitlines() if line.startswith("confirm round")]
    assert len(rounds) == 6  # baseline, pick, frontier point, twice (the cap)
    assert [line.split()[3] for line in rounds[:3]] != [line.split()[3] for line in rounds[3:]]  # order rotated
    study = optuna.load_study(study_name="fronts", storage="sqlite:///studies/fronts.db")
    conf = study.user_attrs["confirmation"]
    assert conf["repeats"] == 2 and conf["pick"] == wus.number and len(conf["runs"]) == 6
    assert {r["seed"] for r in conf["runs"]} == {1000, 1001}
    # the verdict reads the paired interval of the study's own objective (relative time) against the threshold
    by = {(r["role"], r["round"]): r for r in conf["runs"]}
    ratios = [by[("baseline", k)]["relative_time"] / by[("pick", k)]["relative_time"] for k in range(2)]
    interval = ratio_interval(ratios)
    assert conf["speedup"]["low"] == pytest.approx(interval.low) and conf["speedup"]["high"] == pytest.approx(interval.high)
    words = {"above": "holds", "below": "fails", "undecided": "undecided"}
    assert conf["speed"] == words[decide(interval, 0.9 * conf["claimed_speedup"])]
    assert conf["verdict"] in ("holds", "fails", "undecided") and conf["confirmed"] == (conf["verdict"] == "holds")
    client = MlflowClient("sqlite:///mlruns/mlflow.db")
    parent = client.get_run(outcome.parent_run_id)
    assert parent.data.metrics["confirm/speedup_mean"] == pytest.approx(conf["speedup"]["mean"])
    assert parent.data.tags["confirmation"].startswith(conf["verdict"])
    assert "confirmation.json" in [f.path for f in client.list_artifacts(outcome.parent_run_id)]
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{outcome.parent_run_id}'", max_results=100)  # fmt: skip
    roles = sorted(r.data.tags.get("wus_tune.role", "") for r in children if r.data.tags.get("wus_tune.role", "").startswith("confirm-"))
    assert roles == ["confirm-baseline"] * 2 + ["confirm-frontier"] * 2 + ["confirm-pick"] * 2
    # shown again, from the study, by the plain front listing
    assert main(["--study", "fronts"]) == 0
    assert "last confirmation of trial" in capsys.readouterr().out
    for bad, why in (("0", "got '0'"), ("1", "one paired round gives no interval"), ("two", "expected auto or a number")):
        assert main(["--study", "fronts", "--confirm", bad]) == 2
        err = capsys.readouterr().err
        assert why in err and len(err.strip().splitlines()) == 1, err
    assert main(["--study", "fronts", "--confirm", "auto", "--max-rounds", "1"]) == 2
    assert "--max-rounds" in capsys.readouterr().err


def test_confirm_a_named_trial(digits_study, capsys):
    from wus_tune.pareto import main

    outcome = digits_study
    frontier = next(c for c in outcome.analysis.complete if c.role == "baseline-frontier")
    assert main(["--study", "fronts", "--trial", str(frontier.number), "--confirm", "2", "--max-rounds", "2"]) == 0
    out = capsys.readouterr().out
    assert f"confirmation of trial {frontier.number} (trial {frontier.number})" in out
    picks = [line for line in out.splitlines() if line.startswith("confirm round") and " pick " in line]
    assert len(picks) == 2 and all(f"trial {frontier.number:>3}" in line for line in picks)
    conf = optuna.load_study(study_name="fronts", storage="sqlite:///studies/fronts.db").user_attrs["confirmation"]
    assert conf["pick"] == frontier.number and conf["rule"] == f"trial {frontier.number}"
    # a frontier trial is its own yardstick: baseline and pick only, nothing trained twice per round
    assert conf["frontier"] is None and sorted(r["role"] for r in conf["runs"]) == ["baseline"] * 2 + ["pick"] * 2
    # a named trial has no rule's promise: the floor is its own claim minus the tolerance
    assert conf["accuracy_floor_pts"] == pytest.approx(conf["claimed_acc_delta_pts"] - 1.0)
    assert main(["--study", "fronts", "--trial", "99", "--confirm", "2"]) == 2
    assert capsys.readouterr().err.startswith("error: --trial 99: study 'fronts' has no such trial")


def test_feasibility_and_the_progress_line_use_the_pooled_baseline(study_dir, one_torch_thread):
    from wus_tune.pareto import Candidate, with_feasibility

    base = [Candidate(0, "COMPLETE", (0.90, 1.0), role="baseline", uses_method=False),
            Candidate(1, "COMPLETE", (0.96, 1.0), role="baseline", uses_method=False),
            Candidate(2, "COMPLETE", (0.98, 1.0), role="baseline", uses_method=False)]  # fmt: skip
    trial = Candidate(3, "COMPLETE", (0.955, 0.5))
    # against the first baseline (90%) it would be feasible at any delta; the median is 96%
    assert [c.feasible for c in with_feasibility([*base, trial], ("accuracy", "relative_time"), 0.4)] == [False, True, True, False]
    assert with_feasibility([*base, trial], ("accuracy", "relative_time"), 0.6)[-1].feasible

    lines: list[str] = []
    spec = StudySpec.from_dict({"name": "pooled-line", "train": TINY, "baseline_fractions": [0.5], "baseline_repeats": 2,
                                "enqueue_defaults": False, "n_trials": 4})  # fmt: skip
    outcome = run_study(spec, tracking_uri="none", echo=lines.append)
    roles = [c.role for c in sorted(outcome.analysis.complete, key=lambda c: c.number)]
    assert roles[:3] == ["baseline", "baseline-frontier", "baseline"]  # the second baseline ends before trial 3 runs
    pooled = outcome.analysis.baseline.values
    last = outcome.analysis.by_number(3)
    line = next(x for x in lines if x.startswith("trial   3 COMPLETE"))
    assert f"{pooled[1] / last.values[1]:.2f}x {100 * (last.values[0] - pooled[0]):+.2f} pts vs baseline" in line
