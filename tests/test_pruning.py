"""Pareto-aware early stopping (wus_tune._study.pruning): the rung rule on scripted points, the storage
side on scripted trial histories, then tiny digits studies: PRUNED trials, MLflow states matching
Optuna's, a continued study, and two worker processes on one study. About 1 minute on 2 cores."""

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
from wus_tune._study.pruning import (
    CURVE_ATTR, DECISIONS_ATTR, PRUNED_ATTR, RUNGS_ATTR, ParetoPruner, PrunerSettings, decide, epsilon_net_order,
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
    pruned = {t.number for t in first if t.state.name == "PRUNED"}
    assert not pruned & set(analysis.front)
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
