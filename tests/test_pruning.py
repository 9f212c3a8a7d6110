"""Early stopping. ``pareto`` (wus_tune._study.pruning): the rung rule on scripted points, the storage
side on scripted trial histories, then tiny digits studies: PRUNED trials, MLflow states matching
Optuna's, a continued study, and two worker processes on one study. ``frontier``
(wus_tune._study.frontier_pruning): the projection on numbers, scripted paired curves against a scripted
frontier, a digits study and two workers. About 4 minutes on 2 cores."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import yaml

from conftest import worker_env
from wus_tune._study import frontier_pruning as fp
from wus_tune._study.pruning import (
    CURVE_ATTR, DECISIONS_ATTR, PRUNED_ATTR, RUNGS_ATTR, FrontierSettings, ParetoPruner, PrunerSettings, decide, epsilon_net_order,
    nondominated_fronts, parse_settings, rung_epochs, rung_ranking, rung_value, tie_groups,
)  # fmt: skip
from wus_tune.errors import UsageError


def pt(acc: float, cost: float) -> tuple[float, float]:
    return (-acc, cost)  # the rule minimises both


# ---- the rule on plain numbers -------------------------------------------------------------------------


def test_rung_epochs():
    assert rung_epochs(40, eta=3, min_epochs=2) == (4, 13)
    assert rung_epochs(9, eta=3, min_epochs=1) == (1, 3)
    assert rung_epochs(27, eta=3, min_epochs=1) == (1, 3, 9)
    assert rung_epochs(3, eta=3, min_epochs=2) == ()  # too short to judge
    assert rung_epochs(10, eta=2, min_epochs=2) == (2, 5)


def test_dominated_trial_is_stopped_and_front_trial_kept():
    # Three trials dominate the candidate (more accurate for less cost); n = 6, eta 3: two continue.
    points = [pt(0.90, 10), pt(0.89, 9), pt(0.88, 8), pt(0.80, 11), pt(0.70, 12), pt(0.60, 13)]
    assert not decide(3, points, eta=3).keep
    assert decide(0, points, eta=3).keep  # the most accurate, on the front
    d = decide(5, points, eta=3)
    assert (d.keep, d.n, d.ahead, d.slots) == (False, 6, 5, 2)


def test_fronts_and_ranking():
    points = [pt(0.9, 10), pt(0.8, 5), pt(0.85, 12), pt(0.7, 6), pt(0.6, 20)]
    assert nondominated_fronts(points) == [0, 0, 1, 1, 2]
    ranked = rung_ranking(points)
    assert [i for g in ranked for i in g][:2] in ([0, 1], [1, 0]) and ranked[-1] == [4]


def test_epsilon_net_starts_at_the_most_accurate_then_goes_to_the_far_end():
    # One front, evenly spread: the order is an order of indices (not ranks), most accurate first, then
    # the opposite end, then the middle. (Syne Tune's nondominated_sort indexes the front with the ranks
    # its epsilon-net returns, i.e. with the inverse permutation: its seed is not put first.)
    front = [pt(0.70, 1), pt(0.80, 2), pt(0.90, 3), pt(0.75, 1.5), pt(0.85, 2.5)]
    order = epsilon_net_order(front, scale=(0.2, 2.0))
    assert order[0] == 2 and order[1] == 0 and order[2] == 1
    assert sorted(order) == list(range(5))


def test_ties_share_a_fate():
    # Five identical runs (WUS trials that have not skipped yet are the baseline step for step) plus
    # three worse ones. n = 8, eta 3: three slots, but all five tied trials continue; none is cut by number.
    same = [pt(0.85, 100)] * 5
    worse = [pt(0.80, 100), pt(0.75, 100), pt(0.70, 100)]
    points = same + worse
    assert tie_groups(points)[0] == [0, 1, 2, 3, 4]
    for i in range(5):
        assert decide(i, points, eta=3).keep
    for i in range(5, 8):
        assert not decide(i, points, eta=3).keep
    # Ties behind the cut go together too: four equal trials behind three better ones (n = 7, 3 slots).
    points = [pt(0.9, 1), pt(0.91, 2), pt(0.92, 3)] + [pt(0.5, 5)] * 4
    assert [decide(i, points, eta=3).keep for i in range(3, 7)] == [False] * 4


def test_time_costs_within_the_tolerance_are_a_tie():
    points = [pt(0.85, 100.0), pt(0.85, 103.0), pt(0.85, 98.0), pt(0.80, 100.0)]
    assert tie_groups(points, (0.0, 5.0)) == [[0, 1, 2], [3]]
    assert tie_groups(points) == [[0], [1], [2], [3]]
    assert all(decide(i, points, eta=3, tolerance=(0.0, 5.0)).keep for i in range(3))
    assert not decide(1, points, eta=3).keep  # without the tolerance, 3 s more time at equal accuracy is dominated


def test_fewer_than_eta_trials_at_a_rung_continue():
    points = [pt(0.9, 1), pt(0.1, 100)]
    assert decide(1, points, eta=3).keep
    assert not decide(1, points + [pt(0.95, 0.5)], eta=3).keep  # with a third one, the cut applies
    assert decide(0, [pt(0.1, 100)], eta=3).keep


def test_settings_are_validated():
    assert parse_settings("none", {}) is None
    assert parse_settings("pareto", {"eta": 4}) == PrunerSettings(eta=4)
    for name, options in (("asha", {}), ("pareto", {"eta": 1}), ("pareto", {"min_epochs": 0}), ("pareto", {"speed": 1}),
                          ("pareto", {"cost_tolerance": 2.0}), ("pareto", {"prune_enqueued": "yes"}), ("pareto", [1])):  # fmt: skip
        with pytest.raises(UsageError):
            parse_settings(name, options)


# ---- the storage side on scripted trial histories ------------------------------------------------------


def record(epoch: int, acc: float, flops: float = 100.0) -> SimpleNamespace:
    return SimpleNamespace(epoch=epoch, val_acc=acc, train_acc=acc, flops=flops, train_time_s=1.0)


def history(accs_at_rung: list[float], epochs: int = 9) -> optuna.Study:
    """A study holding finished trials that stored (acc, 300 FLOPs) at rung epoch 3 of 9."""
    study = optuna.create_study(directions=["maximize", "minimize"])
    for acc in accs_at_rung:
        study.add_trial(optuna.trial.create_trial(
            values=[acc, 900.0], user_attrs={"role": "search", RUNGS_ATTR: {"epochs": epochs, "values": {"3": [acc, 300.0]}}},
        ))  # fmt: skip
    return study


def run_epochs(pruner: ParetoPruner, trial: optuna.Trial, role: str, accs: list[float]) -> None:
    hook = pruner.for_trial(trial, role=role, epochs=9)
    for epoch, acc in enumerate(accs, start=1):
        hook(record(epoch, acc))


@pytest.mark.parametrize("role", ["baseline", "baseline-frontier"])
def test_baseline_and_frontier_are_never_stopped(role):
    study = history([0.9, 0.91, 0.92, 0.93])
    pruner = ParetoPruner(PrunerSettings(min_epochs=1), ("accuracy", "cost"))
    trial = study.ask()
    run_epochs(pruner, trial, role, [0.1] * 9)  # far behind every stored trial at rungs 1 and 3: still runs
    assert rung_value(study.trials[-1].user_attrs, 3, 9) == (0.1, 300.0)  # recorded all the same
    assert DECISIONS_ATTR not in study.trials[-1].user_attrs


def test_a_dominated_search_trial_is_pruned_with_its_values_kept():
    study = history([0.9, 0.91, 0.92, 0.93])
    pruner = ParetoPruner(PrunerSettings(), ("accuracy", "cost"))
    trial = study.ask()
    with pytest.raises(optuna.TrialPruned, match="pruned at epoch 3"):
        run_epochs(pruner, trial, "search", [0.3, 0.4, 0.5, 0.6])
    attrs = study.trials[-1].user_attrs
    assert attrs[PRUNED_ATTR]["epoch"] == 3
    assert attrs[CURVE_ATTR] == [[1, 0.3, 100.0], [2, 0.4, 200.0], [3, 0.5, 300.0]]
    (d,) = attrs[DECISIONS_ATTR]
    assert (d["keep"], d["n"], d["ahead"], d["slots"], d["compared"]) == (False, 5, 4, 2, [0, 1, 2, 3, 4])


def test_a_front_search_trial_continues():
    study = history([0.9, 0.91, 0.92, 0.93])
    trial = study.ask()
    run_epochs(ParetoPruner(PrunerSettings(), ("accuracy", "cost")), trial, "search", [0.95] * 9)
    assert study.trials[-1].user_attrs[DECISIONS_ATTR][0]["keep"] is True


def test_enqueued_defaults_are_pruned_only_when_the_spec_says_so():
    for prune_enqueued, pruned in ((False, False), (True, True)):
        study = history([0.9, 0.91, 0.92, 0.93])
        trial = study.ask()
        pruner = ParetoPruner(PrunerSettings(prune_enqueued=prune_enqueued), ("accuracy", "cost"))
        try:
            run_epochs(pruner, trial, "wus-default", [0.3] * 9)
            stopped = False
        except optuna.TrialPruned:
            stopped = True
        assert stopped == pruned


def test_other_epoch_budgets_are_not_compared():
    # Stored trials of a 6-epoch budget are further along their LR schedule at epoch 3: not a fair yardstick.
    study = history([0.9, 0.91, 0.92, 0.93], epochs=6)
    trial = study.ask()
    run_epochs(ParetoPruner(PrunerSettings(), ("accuracy", "cost")), trial, "search", [0.3] * 9)
    assert study.trials[-1].user_attrs[DECISIONS_ATTR][0]["n"] == 1


# ---- studies on digits ---------------------------------------------------------------------------------

TINY = {"model": {"name": "mlp", "width": 0.25}, "data": {"name": "digits"}, "epochs": 6, "device": "cpu"}
SPEC = {
    "name": "prune",
    "train": TINY,
    "objectives": "accuracy,cost",
    "baseline_fractions": [0.5],
    "enqueue_defaults": False,
    # the learning rate is searched too, so trials differ from the first epoch and some fall behind at once
    "search_space": {"optim.lr": {"type": "float", "low": 0.0005, "high": 0.5, "log": True}},
    "sampler_options": {"n_startup_trials": 20},
    "pruner": "pareto",
    "pruner_options": {"eta": 2, "min_epochs": 2},  # rungs at epochs 3 and 2 (6 / 2, 6 / 4 rounded)
}


def check_stores(tracking: str | None, storage: str, name: str) -> list[optuna.trial.FrozenTrial]:
    trials = optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
    states = [t.state.name for t in trials]
    assert "RUNNING" not in states and "FAIL" not in states
    assert "PRUNED" in states and "COMPLETE" in states
    for t in trials:
        if t.state.name == "PRUNED":
            assert t.values is None and t.user_attrs["role"] == "search"
            assert t.user_attrs[CURVE_ATTR] and t.user_attrs[PRUNED_ATTR]["epoch"] in (2, 3)  # the rungs of 6 epochs
            assert t.user_attrs[DECISIONS_ATTR][-1]["keep"] is False
    if tracking is None:
        return trials
    from mlflow import MlflowClient

    client = MlflowClient(tracking)
    exp = client.get_experiment_by_name(name)
    runs = [r for r in client.search_runs([exp.experiment_id], max_results=1000) if "optuna.trial_number" in r.data.tags]
    by_number = {int(r.data.tags["optuna.trial_number"]): r for r in runs}
    assert set(by_number) == {t.number for t in trials}
    expected = {"COMPLETE": "FINISHED", "PRUNED": "KILLED"}
    for t in trials:
        run = by_number[t.number]
        assert run.info.status == expected[t.state.name]
        assert run.data.tags["optuna.trial_state"] == t.state.name
        if t.state.name == "PRUNED":
            assert run.data.metrics["pruned_at_epoch"] == t.user_attrs[PRUNED_ATTR]["epoch"]
            assert run.data.tags["pruned_reason"] == t.user_attrs[PRUNED_ATTR]["reason"]
    return trials


def test_digits_study_prunes_and_continues(study_dir, capsys):
    from wus_tune.pareto import load_analysis
    from wus_tune.study import main

    (study_dir / "spec.yaml").write_text(yaml.safe_dump(SPEC))
    assert main(["--spec", "spec.yaml", "--n-trials", "8"]) == 0
    out = capsys.readouterr().out
    assert "PRUNED" in out and "pruned at epoch" in out and " pruned, " in out
    tracking, storage = "sqlite:///mlruns/mlflow.db", "sqlite:///studies/prune.db"
    first = check_stores(tracking, storage, "prune")
    _, analysis = load_analysis("prune", storage)
    base = next(t for t in first if t.user_attrs["role"] == "baseline")  # stored for pruner: frontier, whatever ran
    assert [row[0] for row in base.user_attrs["pruner_curve"]] == list(range(1, TINY["epochs"] + 1))
    pruned = {t.number for t in first if t.state.name == "PRUNED"}
    for n in pruned:  # each was stopped where its own stored decision says it fell behind, with its curve up to there
        attrs = first[n].user_attrs
        (last,) = [d for d in attrs[DECISIONS_ATTR] if d["epoch"] == attrs[PRUNED_ATTR]["epoch"]]
        assert last["ahead"] >= last["slots"] and len(attrs[CURVE_ATTR]) == attrs[PRUNED_ATTR]["epoch"]
    assert {c.number for c in analysis.candidates if c.state == "PRUNED"} == pruned
    (csv_path,) = list((study_dir / "mlruns").rglob("trials.csv"))  # the report, an artifact of the parent run
    rows = {int(r["trial"]): r for r in csv.DictReader(csv_path.open())}
    assert {n for n, r in rows.items() if r["state"] == "PRUNED"} == pruned
    assert all(rows[n]["pareto"] == "False" and rows[n]["pruned_at_epoch"] in ("2", "3") for n in pruned)
    # Continue: the same command adds trials to the same study; the states stay true in both stores.
    assert main(["--spec", "spec.yaml", "--n-trials", "2"]) == 0
    second = check_stores(tracking, storage, "prune")
    assert len(second) == len(first) + 2
    assert [t.state for t in second[: len(first)]] == [t.state for t in first]


def test_two_workers_prune_consistently(study_dir):
    """Two worker processes on one Journal file: each decision is reproduced from what the storage holds."""
    (study_dir / "spec.yaml").write_text(yaml.safe_dump(SPEC | {"name": "prune2"}))
    p = subprocess.run([sys.executable, "-m", "wus_tune.study", "--spec", "spec.yaml", "--devices", "cpu", "--workers", "2",
                        "--n-trials", "10", "--tracking-uri", "none"], cwd=study_dir, env=worker_env(),
                       capture_output=True, text=True, timeout=900)  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr
    storage = "journal:///" + str(study_dir / "studies" / "prune2.journal")
    from wus_tune._study.storage import open_storage

    trials = check_stores(None, open_storage(storage), "prune2")
    assert len({t.user_attrs["worker"] for t in trials}) == 2
    by_number = {t.number: t for t in trials}
    judged = 0
    for t in trials:
        for d in t.user_attrs.get(DECISIONS_ATTR, []):
            points = []
            for n in d["compared"]:
                acc, cost = rung_value(by_number[n].user_attrs, d["epoch"], TINY["epochs"])
                points.append((-acc, cost))
            again = decide(d["compared"].index(t.number), points, eta=2)
            assert (again.keep, again.n, again.ahead) == (d["keep"], d["n"], d["ahead"])
            judged += 1
    assert judged >= 6


@pytest.mark.parametrize("argv", [["--pruner", "asha"], ["--pruner", "pareto", "--set", "epochs=2"]])
def test_bad_pruner_input_is_one_line_and_writes_nothing(study_dir, capsys, argv):
    from wus_tune._cli import run_main
    from wus_tune.study import main

    spec = {**SPEC, "pruner_options": {"eta": 1}} if argv[-1] == "epochs=2" else SPEC
    (study_dir / "spec.yaml").write_text(yaml.safe_dump(spec))
    try:
        code = run_main(main, ["--spec", "spec.yaml", *argv])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "pruner" in err[0], err
    assert not (study_dir / "studies").exists() and not (study_dir / "mlruns").exists()


# ---- pruner: frontier (wus_tune._study.frontier_pruning) -----------------------------------------------

EPOCHS = 10
BASE_ACC = [0.50, 0.60, 0.68, 0.74, 0.79, 0.83, 0.86, 0.88, 0.89, 0.90]  # the baseline's validation curve, seed 0


def rec(epoch: int, acc: float, flops: float = 100.0, steps: int = 10, seconds: float = 1.0) -> SimpleNamespace:
    return SimpleNamespace(epoch=epoch, val_acc=acc, train_acc=acc, flops=flops, steps=steps, train_time_s=seconds)


def frontier_study(baseline_config: dict | None = None) -> optuna.Study:
    """A finished baseline (seed 0, 10 epochs of 10 steps at 100 FLOPs: cost 1000) with its curve, and two
    frontier runs: (accuracy 0.80, cost 500) and (0.86, 700)."""
    study = optuna.create_study(directions=["maximize", "minimize"])
    curve = [[e, a, 10, 100.0, 1.0] for e, a in enumerate(BASE_ACC, start=1)]
    config = baseline_config or {"seed": 0, "epochs": EPOCHS, "optim": {"lr": 0.05}}
    study.add_trial(optuna.trial.create_trial(values=[0.90, 1000.0], user_attrs={
        "role": "baseline", "config": config, fp.CURVE_ATTR: curve}))  # fmt: skip
    for acc, cost, epochs in ((0.80, 500.0, 5), (0.86, 700.0, 7)):
        study.add_trial(optuna.trial.create_trial(values=[acc, cost], user_attrs={
            "role": "baseline-frontier", "config": {"seed": 0, "epochs": epochs, "optim": {"lr": 0.05}}}))  # fmt: skip
    return study


def run_frontier(study: optuna.Study, records: list[SimpleNamespace], *, role: str = "search", config=None,
                 plan=None, margin: float = 0.01, objectives=("accuracy", "cost")) -> int | None:  # fmt: skip
    """Feed the records to a trial's hook; the epoch it was stopped at, or None when it ran to the end."""
    from wus_tune.config import TrainConfig

    config = config or TrainConfig.from_dict({"seed": 0, "epochs": EPOCHS, "optim": {"lr": 0.01}})
    hook = fp.FrontierPruner(FrontierSettings(margin=margin), objectives).for_trial(
        study.ask(), role=role, epochs=EPOCHS, config=config, plan=plan)  # fmt: skip
    study.hook = hook  # the last test reads the projection of a check that did not stop the trial
    for r in records:
        try:
            hook(r)
        except optuna.TrialPruned:
            return r.epoch
    return None


def test_frontier_rule_on_numbers():
    assert fp.optimistic_deficit([0.02]) == (0.02, 0.02)
    mean, low = fp.optimistic_deficit([0.02, 0.03, 0.025])
    assert mean == pytest.approx(0.025) and low < 0.02  # several seeds: the interval's optimistic end
    assert fp.project_cost(500.0, [10.0, 4.0, 7.0], 50) == (700.0, 1000.0)
    front = [(500.0, 0.80), (700.0, 0.86), (1000.0, 0.90)]
    assert fp.frontier_accuracy(600.0, front) == pytest.approx(0.83)
    assert fp.frontier_accuracy(2000.0, front) == pytest.approx(0.90)  # flat beyond the dearest run
    assert fp.frontier_accuracy(400.0, front) is None  # cheaper than anything measured: no verdict from the frontier
    assert not fp.judge(0.83 - 0.01, 600.0, frontier=front, completed={}, margin=0.01).stop  # exactly the margin
    assert fp.judge(0.83 - 0.0101, 600.0, frontier=front, completed={}, margin=0.01).stop
    v = fp.judge(0.70, 400.0, frontier=front, completed={7: (0.75, 350.0), 8: (0.95, 450.0)}, margin=0.01)
    assert v.stop and v.dominated_by == 7 and v.frontier_accuracy is None
    assert not fp.judge(0.70, 300.0, frontier=front, completed={7: (0.75, 350.0)}, margin=0.01).stop
    assert fp.first_deviating_epoch(None, None, 10) is None
    assert fp.first_deviating_epoch(0, None, 10) == 1
    assert fp.first_deviating_epoch(4, 0.4, 10) == 5  # leaves plain training after the probe at epoch 4's end
    assert fp.first_deviating_epoch(7, 0.45, 10) == 5  # a probe inside epoch 5


def test_growing_paired_deficit_is_stopped_at_the_first_check_below_the_frontier():
    # The same steps and FLOPs as the baseline (cost 1000, where the frontier is the baseline's 0.90); the
    # paired deficit grows 0, 0, 0.2, 0.5, 0.8, 1.2, ... points: the optimistic final accuracy 0.90 - deficit
    # falls more than the 1-point margin below the frontier first at epoch 6, not before.
    deficits = [0.0, 0.0, 0.002, 0.005, 0.008, 0.012, 0.016, 0.02, 0.03, 0.04]
    study = frontier_study()
    records = [rec(e, a - d) for e, (a, d) in enumerate(zip(BASE_ACC, deficits), start=1)]
    assert run_frontier(study, records) == 6
    attrs = study.trials[-1].user_attrs
    p = attrs[fp.PROJECTION_ATTR]
    assert p["epoch"] == 6 and p["deficit"] == pytest.approx(0.012) and p["accuracy"] == pytest.approx(0.888)
    assert p["cost_low"] == pytest.approx(1000.0) and p["frontier_accuracy"] == pytest.approx(0.90) and p["stop"]
    assert attrs[PRUNED_ATTR]["epoch"] == 6 and "below the baseline frontier" in attrs[PRUNED_ATTR]["reason"]
    assert len(attrs[fp.CURVE_ATTR]) == 6
    # a wider margin lets the same trial run longer: stopped at the first deficit beyond 2 points
    assert run_frontier(frontier_study(), records, margin=0.02) == 9


def test_cheaper_less_accurate_trial_above_the_frontier_continues():
    # From epoch 3 on it spends half the FLOPs per step (cost 200 + 8 * 50 = 600) and ends 1.5 points below
    # the baseline: 0.885 at 600, above the frontier there (0.83), and no completed trial beats it.
    study = frontier_study()
    records = [rec(e, a - (0.015 if e >= 3 else 0.0), flops=100.0 if e < 3 else 50.0) for e, a in enumerate(BASE_ACC, 1)]
    assert run_frontier(study, records) is None
    attrs = study.trials[-1].user_attrs
    assert PRUNED_ATTR not in attrs and len(attrs[fp.CURVE_ATTR]) == EPOCHS
    p = attrs[fp.PROJECTION_ATTR]  # the last check (epoch 9) was judged and kept
    assert p["epoch"] == 9 and not p["stop"] and p["cost_low"] == pytest.approx(600.0)
    assert p["frontier_accuracy"] == pytest.approx(0.83)
    # the same trial with a 10-point deficit is below the frontier at its cost and is stopped at once
    worse = [rec(e, a - (0.10 if e >= 3 else 0.0), flops=100.0 if e < 3 else 50.0) for e, a in enumerate(BASE_ACC, 1)]
    assert run_frontier(frontier_study(), worse) == 3


def test_a_trial_identical_to_the_baseline_is_never_stopped():
    from wus_tune.config import TrainConfig

    study = frontier_study()
    # a completed trial that dominates the baseline: a judged copy of the baseline would be stopped by it
    study.add_trial(optuna.trial.create_trial(values=[0.95, 900.0], user_attrs={"role": "search"}))
    same = [rec(e, a) for e, a in enumerate(BASE_ACC, start=1)]
    assert run_frontier(study, same) is None  # never deviated: never judged
    assert fp.PROJECTION_ATTR not in study.trials[-1].user_attrs
    # the baseline's own config is never judged even when its accuracies differ (non-deterministic kernels)
    noisy = [rec(e, a - 0.05) for e, a in enumerate(BASE_ACC, start=1)]
    base = TrainConfig.from_dict({"seed": 0, "epochs": EPOCHS, "optim": {"lr": 0.05}})
    assert run_frontier(frontier_study(base.to_dict()), noisy, config=base) is None
    assert run_frontier(frontier_study(), noisy) == 1  # the same curve under another config: stopped at once


def test_protected_and_not_yet_deviated_trials_are_not_judged():
    bad = [rec(e, a - 0.2) for e, a in enumerate(BASE_ACC, start=1)]
    for role in ("baseline", "baseline-frontier", "wus-default"):
        assert run_frontier(frontier_study(), bad, role=role) is None
    hook = fp.FrontierPruner(FrontierSettings(prune_enqueued=True), ("accuracy", "cost"))
    assert not hook.protected("wus-default") and hook.protected("baseline")
    # the replay says the method leaves plain training after the probe at epoch 4: no check before epoch 5
    plan = SimpleNamespace(replay=SimpleNamespace(check=4), baseline=SimpleNamespace(
        probes=[{"progress": (k + 1) / EPOCHS} for k in range(EPOCHS)]))  # fmt: skip
    assert run_frontier(frontier_study(), bad, plan=plan) == 5
    never = SimpleNamespace(replay=SimpleNamespace(check=None), baseline=None)
    assert run_frontier(frontier_study(), bad, plan=never) is None
    # three objectives: the frontier's axes do not hold them; the trial is recorded, never judged
    assert not fp.FrontierPruner(FrontierSettings(), ("accuracy", "cost", "params")).active


def test_time_objective_takes_the_cheaper_reading():
    # relative_time: an epoch's price read from FLOPs and from training seconds, in baseline-run units; the
    # optimistic cost is the cheaper reading, the pessimistic the dearer.
    study = frontier_study()
    records = [rec(e, a - 0.001, flops=100.0, seconds=0.5 if e == 2 else 1.0) for e, a in enumerate(BASE_ACC, 1)]
    assert run_frontier(study, records[:3], objectives=("accuracy", "relative_time")) is None
    p = study.hook.last  # seconds: 2.5 of the baseline's 10 so far, then 7 epochs at half its price at best
    assert p["epoch"] == 3 and p["cost_low"] == pytest.approx(1000.0 * (2.5 + 7 * 0.5) / 10)
    assert p["cost_high"] == pytest.approx(1000.0)  # FLOPs: the baseline's price every epoch


def test_frontier_settings_are_validated():
    assert parse_settings("frontier", {}) == FrontierSettings()
    assert parse_settings("frontier", {"margin": 0.02, "prune_enqueued": True}) == FrontierSettings(0.02, True)
    assert isinstance(parse_settings("pareto", {"eta": 3}), PrunerSettings)  # the older rule still loads
    for options in ({"margin": 1.5}, {"margin": -0.1}, {"margin": "1"}, {"eta": 3}, {"prune_enqueued": 1}):
        with pytest.raises(UsageError, match="pruner_options"):
            parse_settings("frontier", options)


FRONTIER_SPEC = SPEC | {"name": "frontier", "pruner": "frontier", "pruner_options": {"margin": 0.01}}


def test_digits_study_with_the_frontier_pruner(study_dir, capsys):
    from wus_tune.pareto import load_analysis
    from wus_tune.study import main

    (study_dir / "spec.yaml").write_text(yaml.safe_dump(FRONTIER_SPEC))
    assert main(["--spec", "spec.yaml", "--n-trials", "8"]) == 0
    out = capsys.readouterr().out
    assert "pruned at epoch" in out and " pruned, " in out
    storage = "sqlite:///studies/frontier.db"
    trials = optuna.load_study(study_name="frontier", storage=storage).get_trials(deepcopy=False)
    states = [t.state.name for t in trials]
    assert "RUNNING" not in states and "FAIL" not in states and "PRUNED" in states
    base = next(t for t in trials if t.user_attrs["role"] == "baseline")
    assert len(base.user_attrs[fp.CURVE_ATTR]) == TINY["epochs"]  # the yardstick's curve is stored
    for t in trials:
        if t.state.name != "PRUNED":
            continue
        p, pruned = t.user_attrs[fp.PROJECTION_ATTR], t.user_attrs[PRUNED_ATTR]
        assert t.user_attrs["role"] == "search" and p["stop"] and p["epoch"] == pruned["epoch"] < TINY["epochs"]
        # the stored projection is the stored curve paired with the baseline's at that epoch
        mine = t.user_attrs[fp.CURVE_ATTR][p["epoch"] - 1][1]
        theirs = base.user_attrs[fp.CURVE_ATTR][p["epoch"] - 1][1]
        assert p["deficit"] == pytest.approx(theirs - mine)
        assert p["accuracy"] == pytest.approx(base.values[0] - p["deficit"])
        below = p["frontier_accuracy"] is not None and p["accuracy"] < p["frontier_accuracy"] - 0.01
        assert below or p["dominated_by"] is not None
    _, analysis = load_analysis("frontier", storage)
    assert {c.number for c in analysis.candidates if c.state == "PRUNED"} == {t.number for t in trials if t.state.name == "PRUNED"}
    from mlflow import MlflowClient

    client = MlflowClient("sqlite:///mlruns/mlflow.db")
    exp = client.get_experiment_by_name("frontier")
    runs = {int(r.data.tags["optuna.trial_number"]): r for r in client.search_runs([exp.experiment_id], max_results=100)
            if "optuna.trial_number" in r.data.tags}  # fmt: skip
    for t in trials:
        if t.state.name == "PRUNED":
            run = runs[t.number]
            assert run.info.status == "KILLED" and run.data.tags["optuna.trial_state"] == "PRUNED"
            assert run.data.tags["pruned_reason"] == t.user_attrs[PRUNED_ATTR]["reason"]


def test_two_workers_with_the_frontier_pruner(study_dir):
    """Two worker processes on one Journal file: trials stop only on projections their stored curves and
    their baseline's stored curve give."""
    (study_dir / "spec.yaml").write_text(yaml.safe_dump(FRONTIER_SPEC | {"name": "frontier2"}))
    p = subprocess.run([sys.executable, "-m", "wus_tune.study", "--spec", "spec.yaml", "--devices", "cpu", "--workers", "2",
                        "--n-trials", "8", "--tracking-uri", "none"], cwd=study_dir, env=worker_env(),
                       capture_output=True, text=True, timeout=900)  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr
    from wus_tune._study.storage import open_storage

    storage = open_storage("journal:///" + str(study_dir / "studies" / "frontier2.journal"))
    trials = optuna.load_study(study_name="frontier2", storage=storage).get_trials(deepcopy=False)
    assert {t.state.name for t in trials} <= {"COMPLETE", "PRUNED"} and len({t.user_attrs["worker"] for t in trials}) == 2
    base = next(t for t in trials if t.user_attrs["role"] == "baseline")
    judged = 0
    for t in trials:
        p_ = t.user_attrs.get(fp.PROJECTION_ATTR)
        if p_ is None:
            continue
        judged += 1
        e = p_["epoch"]
        deficit = base.user_attrs[fp.CURVE_ATTR][e - 1][1] - t.user_attrs[fp.CURVE_ATTR][e - 1][1]
        assert p_["deficit"] == pytest.approx(deficit) and p_["stop"] == (t.state.name == "PRUNED")
    assert judged >= 1
