"""End to end: a tiny study on digits, continued, with a failing trial; the Pareto CLI; the export trains;
bad input leaves the stores untouched. Stores live in tmp_path. About 30 s on 2 cores."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml

from wus_tune._cli import run_main
from wus_tune.config import TrainConfig
from wus_tune.pareto import main as pareto_main
from wus_tune.study import main as study_main

ROOT = Path(__file__).resolve().parent.parent

SPEC = {
    "name": "e2e",
    "train": {"model": {"name": "mlp", "width": 0.25}, "data": {"name": "digits"}, "epochs": 2, "device": "cpu"},
    "n_trials": 4,
    "baseline_fractions": [0.5],
    # lr 90 with heavy momentum: the loss becomes NaN, so this trial must fail and the study go on.
    "enqueue": [{"methods.wus.variant": "wus", "optim.lr": 90.0, "optim.momentum": 0.99}],
    "sampler_options": {"n_startup_trials": 2},
}


@pytest.fixture
def workdir(study_dir):
    (study_dir / "spec.yaml").write_text(yaml.safe_dump(SPEC))
    return study_dir


def cli(main, argv):
    try:
        return run_main(main, argv)
    except SystemExit as e:  # argparse errors
        return e.code


def mlflow_runs(tracking_uri, name):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
    parents = [r for r in runs if r.data.tags.get("wus_tune.role") == "study"]
    children = sorted((r for r in runs if "mlflow.parentRunId" in r.data.tags), key=lambda r: int(r.data.tags["optuna.trial_number"]))
    return client, exp, parents, children


def test_study_end_to_end(workdir, capsys):
    tracking = "sqlite:///mlruns/mlflow.db"
    assert cli(study_main, ["--spec", "spec.yaml"]) == 0
    out = capsys.readouterr().out
    assert "trial   3 FAIL" in out and "TrainingDiverged" in out
    assert "selected by fastest-within:1" in out

    study = optuna.load_study(study_name="e2e", storage="sqlite:///studies/e2e.db")
    states = [t.state.name for t in study.trials]
    assert states == ["COMPLETE", "COMPLETE", "COMPLETE", "FAIL"]
    assert [t.user_attrs["role"] for t in study.trials] == ["baseline", "wus-default", "baseline-frontier", "enqueued"]
    assert "TrainingDiverged" in study.trials[3].user_attrs["fail_reason"]

    client, exp, parents, children = mlflow_runs(tracking, "e2e")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    assert study.user_attrs["mlflow_parent_run_id"] == parent.info.run_id
    assert parent.data.tags["objectives"] == "accuracy,relative_time" and "methods.wus.threshold" in parent.data.tags["search_space"]
    assert [r.data.tags["mlflow.parentRunId"] for r in children] == [parent.info.run_id] * 4
    assert [r.info.status for r in children] == ["FINISHED", "FINISHED", "FINISHED", "FAILED"]
    failed = children[3]
    assert failed.data.tags["optuna.trial_state"] == "FAIL" and "TrainingDiverged" in failed.data.tags["fail_reason"]
    assert "error.txt" in [a.path for a in client.list_artifacts(failed.info.run_id)]
    ok = children[0]
    assert ok.data.params["model.name"] == "mlp" and ok.data.tags["optuna.trial_state"] == "COMPLETE"
    assert {"val_acc", "train_loss", "lr", "steps/full", "flops", "epoch_time_s", "time_s", "cost_flops", "relative_time",
            "timing/price/baseline:step", "timing/count/step:full"} <= set(ok.data.metrics)
    assert [m.step for m in client.get_metric_history(ok.info.run_id, "val_acc")] == [1, 2]
    assert {r.data.tags.get("pareto_optimal") for r in children[:3]} <= {"true", "false"}
    assert "true" in {r.data.tags.get("pareto_optimal") for r in children[:3]}
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"pareto_front.png", "pareto_front.html", "trials.csv", "hypervolume_history.csv",
            "hypervolume_history.png", "best_config.yaml"} <= artifacts  # fmt: skip
    csv = Path(client.download_artifacts(parent.info.run_id, "trials.csv", str(workdir))).read_text()
    assert csv.splitlines()[0].startswith("trial,state,role,variant,feasible,accuracy,relative_time,pareto")
    assert len(csv.splitlines()) == 5

    # A second invocation continues the same study under the same parent run.
    assert cli(study_main, ["--spec", "spec.yaml", "--n-trials", "2"]) == 0
    capsys.readouterr()
    study = optuna.load_study(study_name="e2e", storage="sqlite:///studies/e2e.db")
    assert [t.number for t in study.trials] == list(range(6))
    assert [t.user_attrs["role"] for t in study.trials[4:]] == ["search", "search"]
    _, _, parents, children = mlflow_runs(tracking, "e2e")
    assert len(parents) == 1 and len(children) == 6
    assert all(r.info.status in ("FINISHED", "FAILED") for r in children)

    # The Pareto CLI exports a config that the production CLI trains.
    assert cli(pareto_main, ["--study", "e2e", "--select", "fastest-within:50", "--out", "best.yaml"]) == 0
    table = capsys.readouterr().out
    assert "speed-up" in table and "selected by fastest-within:50" in table
    config = TrainConfig.load("best.yaml")
    assert config.meta["study"] == "e2e" and config.model.name == "mlp"
    done = subprocess.run(
        [sys.executable, "-m", "wus_tune.train", "--config", "best.yaml", "--out", "prod", "--quiet"],
        cwd=workdir, capture_output=True, text=True, timeout=300, env=_env(),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (workdir / "prod" / "model.pt").exists()

    # The production API: the parent run's exported config, trained, logged and registered with an alias.
    from wus_tune.production import load_config, train_production

    config = load_config(f"runs:/{parent.info.run_id}/best_config.yaml", tracking_uri=tracking)
    assert config.meta["study"] == "e2e"
    run = train_production(config, epochs=1, out_dir="production", tracking_uri=tracking,
                           register_as="e2e-model", alias="champion", progress=False)  # fmt: skip
    assert run.weights_path.exists() and run.model_version == "1"
    assert client.get_run(run.run_id).info.status == "FINISHED"
    assert str(client.get_model_version_by_alias("e2e-model", "champion").version) == "1"


def _env():
    import os

    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


BAD = [
    (["--objectives", "accuracy,speed"], "unknown objective 'speed'"),
    (["--sampler", "cmaes"], "unknown sampler 'cmaes'"),
    (["--model", "vgg99"], "model.name: unknown value 'vgg99'"),
    (["--spec", "unknown_key.yaml"], "unknown_key.yaml: n_trails: unknown key"),
    (["--spec", "inverted.yaml"], "search_space.methods.wus.threshold: inverted range"),
    (["--storage", "sqlite:////nonexistent-dir/x.db"], "does not exist"),
    (["--storage", "postgresql+psycopg2://me:s3cret@127.0.0.1:1/db"], "me:***@127.0.0.1:1/db: cannot open the Optuna storage"),
    (["--dataset", "cifar10", "--data-dir", "no/such/dir"], "'no/such/dir' does not exist; point --data-dir at the data, or use --dataset digits"),
    (["--n-trials", "many"], "invalid int value"),
]


@pytest.mark.parametrize("argv, message", BAD, ids=[m for _, m in BAD])
def test_bad_input_is_one_line_and_writes_nothing(workdir, capsys, argv, message):
    (workdir / "unknown_key.yaml").write_text(yaml.safe_dump({**SPEC, "n_trails": 3}))
    (workdir / "inverted.yaml").write_text(
        yaml.safe_dump({**SPEC, "search_space": {"methods.wus.threshold": {"low": 0.1, "high": 0.01}}})
    )
    base = ["--model", "mlp", "--dataset", "digits", "--epochs", "1", "--device", "cpu"]
    assert cli(study_main, base + argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("error: ") and err.count("\n") == 1, err
    assert "s3cret" not in err
    assert not (workdir / "mlruns").exists()
    assert not list(workdir.glob("studies/*.db"))


def test_bad_input_from_the_real_command_has_no_traceback(workdir):
    done = subprocess.run(
        [sys.executable, "-m", "wus_tune.study", "--sampler", "cmaes"],
        cwd=workdir, capture_output=True, text=True, timeout=120, env=_env(),
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["error: sampler: unknown sampler 'cmaes'; choose one of tpe, nsga2, gp"]
