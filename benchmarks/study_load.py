"""Load figure: many tiny trials by several workers against PostgreSQL and an MLflow server.

    python benchmarks/study_load.py [--trials 200] [--workers 4] [--epochs 1] [--tracking-uri URL]

Needs a PostgreSQL server (``WUS_TUNE_POSTGRES_URL``, default ``postgresql://postgres@127.0.0.1:5432/test``;
the script creates and drops its own databases). Unless ``--tracking-uri`` names one, it starts an
``mlflow server`` on a free loopback port backed by a fresh PostgreSQL database, as a deployment would.
Then it runs exactly what a user runs,

    python -m wus_tune.study --spec <tiny spec> --storage postgresql://... --tracking-uri http://... \
        --devices cpu --workers 4 --n-trials 200

(MLP on ``digits``, ``--epochs`` epochs, one torch thread per worker), and reads the figures back from
the Optuna storage:

* throughput: trials per minute, from the first trial's start to the last one's completion (process
  start-up and the final report are outside; printed separately);
* per trial, means: training (``fit`` wall time minus its MLflow logging), the machinery inside the
  trial (Optuna attribute writes, MLflow run creation, parameter, per-epoch and final logging, closing
  the run), of which MLflow, and the machinery between trials (ask under the study lock with the
  budget count, the stale-trial check, heartbeat start, tell): a worker's wall time not inside a trial.

Storage + tracking overhead per trial = inside-trial machinery + between-trial machinery. On a machine
with fewer cores than workers, training and the servers share the CPU, so every figure is inflated by
contention; the report prints the core count.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trials", type=int, default=200)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--tracking-uri", help="an MLflow server to use instead of starting one")
    args = p.parse_args()

    import optuna
    import sqlalchemy
    import yaml

    from conftest import POSTGRES_URL, free_port, stop_process_group, wait_http, with_database, worker_env
    from wus_tune._study.storage import database_url, open_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    admin = sqlalchemy.create_engine(database_url(POSTGRES_URL), isolation_level="AUTOCOMMIT")
    tag = uuid.uuid4().hex[:8]
    dbs = [f"wus_tune_load_{tag}", f"wus_tune_load_mlflow_{tag}"]
    with admin.connect() as c:
        for db in dbs:
            c.exec_driver_sql(f"CREATE DATABASE {db}")
    storage = with_database(POSTGRES_URL, dbs[0])
    server = None
    work = Path(tempfile.mkdtemp(prefix="wus_tune_load_"))
    try:
        tracking = args.tracking_uri
        if tracking is None:
            port = free_port()
            server = subprocess.Popen(
                [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", database_url(with_database(POSTGRES_URL, dbs[1])),
                 "--artifacts-destination", str(work / "artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                stdout=open(work / "server.log", "w"), stderr=subprocess.STDOUT, env=worker_env(), cwd=work,
                start_new_session=True,
            )  # fmt: skip
            tracking = f"http://127.0.0.1:{port}"
            wait_http(tracking + "/health", 180, server)
        spec = {"name": "load", "train": {"model": {"name": "mlp", "width": 0.25}, "data": {"name": "digits"},
                                          "epochs": args.epochs, "device": "cpu"},
                "baseline_fractions": [], "sampler_options": {"n_startup_trials": 10}}  # fmt: skip
        (work / "spec.yaml").write_text(yaml.safe_dump(spec))
        cmd = [sys.executable, "-m", "wus_tune.study", "--spec", "spec.yaml", "--storage", storage, "--tracking-uri", tracking,
               "--devices", "cpu", "--workers", str(args.workers), "--n-trials", str(args.trials)]  # fmt: skip
        t0 = time.perf_counter()
        done = subprocess.run(cmd, cwd=work, env={**worker_env(), "OMP_NUM_THREADS": ""}, capture_output=True, text=True)
        total = time.perf_counter() - t0
        if done.returncode != 0:
            print(done.stdout[-3000:], done.stderr[-3000:], sep="\n")
            return done.returncode

        trials = optuna.load_study(study_name="load", storage=open_storage(storage)).trials
        ok = [t for t in trials if t.state.name == "COMPLETE"]
        first = min(t.datetime_start for t in trials).timestamp()
        last = max(t.datetime_complete for t in trials).timestamp()
        span = last - first
        res = [t.user_attrs["result"] for t in ok]
        inside = [(t.datetime_complete - t.datetime_start).total_seconds() for t in ok]
        by_worker = defaultdict(list)
        for t in trials:
            by_worker[t.user_attrs.get("worker")].append(t)
        gaps = []
        for ts in by_worker.values():
            ts.sort(key=lambda t: t.datetime_start)
            gaps += [(b.datetime_start - a.datetime_complete).total_seconds() for a, b in zip(ts, ts[1:])]
        fit = statistics.fmean(r["fit_s"] for r in res)
        in_trial = statistics.fmean(i - r["fit_s"] for i, r in zip(inside, res))
        mlflow_s = statistics.fmean(r["mlflow_s"] for r in res)
        sample_s = statistics.fmean(r.get("sample_s", 0.0) for r in res)
        pure_tpe = _pure_sampling_time(trials)
        between = statistics.fmean(gaps) if gaps else 0.0
        print(f"load: {len(ok)} COMPLETE of {len(trials)} trials, {len(by_worker)} workers, {os.cpu_count()} CPU cores, "
              f"MLP on digits, {args.epochs} epoch(s)")
        print(f"  storage: PostgreSQL (Optuna RDB, heartbeats on); tracking: mlflow server backed by PostgreSQL")
        print(f"  throughput: {60 * len(trials) / span:.1f} trials/min ({span:.1f} s from first start to last completion; "
              f"{total:.1f} s for the whole command incl. start-up and report)")
        print(f"  per trial (mean): training {fit:.3f} s; machinery inside the trial {in_trial:.3f} s "
              f"(sampling the parameters {sample_s:.3f} s, MLflow {mlflow_s:.3f} s); between trials {between:.3f} s")
        print(f"  the sampler alone (TPE, multi-objective, in memory, at {len(trials)} trials, one process): "
              f"{pure_tpe:.3f} s per trial")
        print(f"  machinery per trial: {in_trial + between:.3f} s "
              f"({100 * (in_trial + between) / (fit + in_trial + between):.0f}% of a worker's time); without the "
              f"sampling: storage + tracking {in_trial + between - sample_s:.3f} s")
        print(f"  command: {' '.join(Path(c).name if i == 0 else c for i, c in enumerate(cmd)).replace(storage, 'postgresql://.../<db>')}")
        return 0
    finally:
        if server is not None:
            stop_process_group(server)
        with admin.connect() as c:
            for db in dbs:
                c.exec_driver_sql(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
        admin.dispose()


def _pure_sampling_time(trials, n: int = 5) -> float:
    """Seconds per ``space.sample`` with the study's sampler on an in-memory copy of the finished study:
    the CPU cost of TPE itself, no storage or network."""
    import optuna

    from wus_tune._study.space import SearchSpace
    from wus_tune._study.spec import make_sampler

    study = optuna.create_study(directions=["maximize", "minimize"], sampler=make_sampler("tpe", {"n_startup_trials": 10}, seed=1))
    study.add_trials([t for t in trials if t.state.name == "COMPLETE"])
    space = SearchSpace.build()
    t0 = time.perf_counter()
    for _ in range(n):
        trial = study.ask()
        space.sample(trial)
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
    return (time.perf_counter() - t0) / n


if __name__ == "__main__":
    sys.exit(main())
