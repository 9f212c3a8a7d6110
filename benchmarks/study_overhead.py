"""Per-trial overhead of the study machinery (Optuna + MLflow), i.e. wall time outside training.

    python benchmarks/study_overhead.py [--trials 20] [--epochs 2]

Runs the same study of tiny trials (MLP on digits) twice in a fresh directory: with MLflow tracking
into a SQLite store, and with tracking off (``--tracking-uri none``), both on a SQLite Optuna storage.
For each, the per-trial overhead is

    (last trial's completion - first trial's start) / N  -  mean training time,

where the training time is the wall time of ``wus_tune.fit`` minus the MLflow logging done inside it
(per-epoch ``log_batch``). So it counts sampling, storage writes, config building, run creation,
per-epoch and final logging. The set-up (opening the stores, loading data) and the final report
(plots, CSV, artifacts) are per study, reported separately.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def run(trials: int, epochs: int, tracking: bool, workdir: Path) -> dict[str, float]:
    import optuna

    from wus_tune._study.spec import StudySpec
    from wus_tune.study import run_study

    name = "overhead-mlflow" if tracking else "overhead-optuna"
    (workdir / "studies").mkdir(exist_ok=True)
    spec = StudySpec.from_dict({
        "name": name,
        "train": {"model": {"name": "mlp", "width": 0.25}, "data": {"name": "digits"}, "epochs": epochs, "device": "cpu"},
        "n_trials": trials,
        "baseline_fractions": [0.5],
        "storage": f"sqlite:///{workdir}/studies/{name}.db",
        "tracking_uri": f"sqlite:///{workdir}/mlruns/mlflow.db" if tracking else "none",
    })  # fmt: skip
    t0 = time.perf_counter()
    wall0 = time.time()
    outcome = run_study(spec, echo=None, report_dir=workdir / "report" / name)
    total = time.perf_counter() - t0
    study = optuna.load_study(study_name=name, storage=spec.storage)
    done = [t for t in study.trials if t.number in outcome.trials_run]
    first = min(t.datetime_start for t in done).timestamp()
    last = max(t.datetime_complete for t in done).timestamp()
    timing = [t.user_attrs.get("result") or t.user_attrs.get("timing") for t in done]
    fit = statistics.fmean(x["fit_s"] for x in timing)
    per_trial = (last - first) / len(done)
    return {
        "trials": len(done),
        "wall_per_trial_s": per_trial,
        "fit_s": fit,
        "overhead_s": per_trial - fit,
        "overhead_median_in_objective_s": statistics.median(x["overhead_s"] for x in timing),
        "mlflow_s": statistics.fmean(x["mlflow_s"] for x in timing),
        "setup_s": first - wall0,
        "report_s": wall0 + total - last,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--epochs", type=int, default=2)
    args = p.parse_args()
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import optuna
    import torch

    from wus_tune.data import load_dataset
    from wus_tune.config import DataConfig

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    from wus_tune.config import TrainConfig
    from wus_tune.trainer import fit

    load_dataset(DataConfig(name="digits"))  # decode and cache once, outside the measurement
    # One training first: the first fit() of a process pays torch's one-time initialisation.
    fit(TrainConfig.from_dict({"model": {"name": "mlp", "width": 0.25}, "data": {"name": "digits"}, "epochs": 1, "device": "cpu"}))
    rows = []
    with tempfile.TemporaryDirectory(prefix="wus_tune_overhead_") as tmp:
        for tracking in (True, False):
            rows.append(("Optuna + MLflow" if tracking else "Optuna only", run(args.trials, args.epochs, tracking, Path(tmp))))
    print(f"# study overhead: {args.trials} trials of MLP(width 0.25) on digits, {args.epochs} epochs, "
          f"SQLite stores; torch {torch.__version__}, optuna {optuna.__version__}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    print("| setting | wall/trial (s) | training/trial (s) | overhead/trial (s) | of which MLflow (s) | study set-up (s) | final report (s) |")
    print("|---|---|---|---|---|---|---|")
    for label, r in rows:
        print(f"| {label} | {r['wall_per_trial_s']:.3f} | {r['fit_s']:.3f} | {r['overhead_s']:.3f} | "
              f"{r['mlflow_s']:.3f} | {r['setup_s']:.2f} | {r['report_s']:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
