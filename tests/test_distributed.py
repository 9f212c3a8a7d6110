"""Several workers on one study, and the faults they must survive, against real servers on loopback:
PostgreSQL (Optuna storage and the MLflow server's backend), MariaDB, a real ``mlflow server``. Workers are
real ``python -m wus_tune.study`` processes; faults are real signals and real cut connections.

Trials are tiny (an MLP on ``digits``, one torch thread per worker). About 2.5 minutes on 2 cores.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml

from conftest import TcpProxy, worker_env

pytestmark = pytest.mark.services

TINY = {"model": {"name": "mlp", "width": 0.25}, "data": {"name": "digits"}, "epochs": 3, "device": "cpu"}
FAST = ["--heartbeat-interval", "1", "--grace-period", "3", "--reconnect-timeout", "4"]


def write_spec(path: Path, **extra) -> Path:
    spec = {"name": "dist", "train": TINY, "baseline_fractions": [0.5], "sampler_options": {"n_startup_trials": 3}, **extra}
    path.write_text(yaml.safe_dump(spec))
    return path


def start(cwd: Path, *args: str, log: str) -> subprocess.Popen:
    out = open(cwd / log, "w")
    return subprocess.Popen([sys.executable, "-m", "wus_tune.study", *args], cwd=cwd, env=worker_env(),
                            stdout=out, stderr=subprocess.STDOUT)  # fmt: skip


_STORAGES: dict[str, object] = {}  # one storage (one connection pool) per URL: polling must not open a pool each time


def load(name: str, url: str) -> optuna.Study:
    from wus_tune._study.storage import open_storage

    if url not in _STORAGES:
        _STORAGES[url] = open_storage(url)
    return optuna.load_study(study_name=name, storage=_STORAGES[url])


def trials(name: str, url: str) -> list[optuna.trial.FrozenTrial]:
    try:
        return load(name, url).get_trials(deepcopy=False)
    except KeyError:  # not created yet
        return []


def wait_for(predicate, timeout: float, what: str, procs=()):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        for p in procs:
            assert p.poll() is None, f"a worker exited with {p.returncode} while waiting for {what}"
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def children_by_trial(tracking: str, name: str):
    from mlflow import MlflowClient

    client = MlflowClient(tracking)
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("wus_tune.role") == "study"]
    by_trial: dict[int, list] = {}
    for r in runs:
        if "optuna.trial_number" in r.data.tags:
            by_trial.setdefault(int(r.data.tags["optuna.trial_number"]), []).append(r)
    return client, parents, by_trial


def test_three_workers_one_killed(tmp_path, postgres_db, mlflow_server):
    """3 workers start at once on one study of N trials; one is SIGKILLed mid-trial. Its trial goes
    stale, is failed and re-queued by a survivor, its MLflow run closed KILLED; exactly N complete."""
    n = 8
    # every trial trains (none is replayed from the baseline in no time), so the budget outlasts the start-up
    write_spec(tmp_path / "spec.yaml", reuse={"replay": False, "fork": False})
    args = ["--spec", "spec.yaml", "--storage", postgres_db, "--tracking-uri", mlflow_server, "--max-trials", str(n), *FAST]
    procs = [start(tmp_path, *args, log=f"w{i}.log") for i in range(3)]
    by_pid = {p.pid: p for p in procs}

    def a_worker_mid_trial():  # the first worker seen inside a trial (the slowest to start may never get one)
        for t in trials("dist", postgres_db):
            pid = int(t.user_attrs.get("worker", ":0").rsplit(":", 1)[-1])
            if t.state.name == "RUNNING" and pid in by_pid and "mlflow_run_id" in t.user_attrs:
                return t, by_pid[pid]
        return None

    killed, victim = wait_for(a_worker_mid_trial, 120, "a worker to be inside a trial", procs)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    survivors = [p for p in procs if p is not victim]
    for p in survivors:
        assert p.wait(timeout=240) == 0, "".join((tmp_path / f"w{i}.log").read_text() for i in range(3))

    done = trials("dist", postgres_db)
    numbers = [t.number for t in done]
    assert len(numbers) == len(set(numbers)) == max(numbers) + 1
    complete = [t for t in done if t.state.name == "COMPLETE"]
    assert len(complete) == n
    stale = next(t for t in done if t.number == killed.number)
    assert stale.state.name == "FAIL" and stale.user_attrs["fail_reason"].startswith("worker lost: no heartbeat")
    retry = [t for t in done if t.user_attrs.get("retry_of") == killed.number]
    assert len(retry) == 1 and retry[0].state.name == "COMPLETE" and retry[0].params == stale.params
    assert {t.state.name for t in done} <= {"COMPLETE", "FAIL"}
    # Started at once, the workers enqueued the first trials exactly once, under one MLflow parent run.
    roles = [t.user_attrs["role"] for t in complete]
    assert roles.count("baseline") == 1 and roles.count("wus-default") == 1 and roles.count("baseline-frontier") == 1

    client, parents, by_trial = children_by_trial(mlflow_server, "dist")
    assert len(parents) == 1
    assert load("dist", postgres_db).user_attrs["mlflow_parent_run_id"] == parents[0].info.run_id
    for t in complete:
        runs = by_trial[t.number]
        assert [r.info.status for r in runs] == ["FINISHED"], t.number
        assert {"val_acc", "time_s", "cost_flops", "objective/accuracy"} <= set(runs[0].data.metrics)
        assert "train_loss" in runs[0].data.metrics  # reuse is off: every trial trained
        assert runs[0].data.tags["mlflow.parentRunId"] == parents[0].info.run_id
    assert [r.info.status for r in by_trial[killed.number]] == ["KILLED"]
    assert by_trial[killed.number][0].data.tags["fail_reason"].startswith("worker lost")
    all_runs = [r for runs in by_trial.values() for r in runs]
    assert not [r for r in all_runs if r.info.status == "RUNNING"]


def test_nan_trial_fails_with_reason_others_go_on_and_no_password_anywhere(tmp_path, postgres_db, mlflow_server):
    """2 workers; an enqueued trial diverges (NaN loss): FAIL with the reason in Optuna and MLflow, the
    rest complete. The storage URL carries a password (ignored by the trust-auth server): it appears in
    no output, no Optuna attribute, no MLflow tag, param or artifact."""
    import sqlalchemy

    secret = "Zq9-s3cret-pw"
    url = sqlalchemy.make_url(postgres_db).set(password=secret).render_as_string(hide_password=False)
    write_spec(tmp_path / "spec.yaml", enqueue=[{"methods.wus.variant": "wus", "optim.lr": 90.0, "optim.momentum": 0.99}])
    args = ["--spec", "spec.yaml", "--storage", url, "--tracking-uri", mlflow_server, "--max-trials", "5",
            "--devices", "cpu", "--workers", "2", *FAST]  # fmt: skip
    p = start(tmp_path, *args, log="out.log")
    assert p.wait(timeout=240) == 0, (tmp_path / "out.log").read_text()
    out = (tmp_path / "out.log").read_text()
    assert "started 2 workers" in out and "TrainingDiverged" in out

    done = trials("dist", postgres_db)
    failed = [t for t in done if t.state.name == "FAIL"]
    assert len(failed) == 1 and failed[0].user_attrs["role"] == "enqueued"
    assert "TrainingDiverged" in failed[0].user_attrs["fail_reason"]
    assert sum(t.state.name == "COMPLETE" for t in done) == 4
    client, parents, by_trial = children_by_trial(mlflow_server, "dist")
    run = by_trial[failed[0].number][0]
    assert run.info.status == "FAILED" and "TrainingDiverged" in run.data.tags["fail_reason"]

    # The password: nowhere.
    assert secret not in out
    study = load("dist", postgres_db)
    assert secret not in json.dumps(study.user_attrs, default=str)
    assert secret not in json.dumps([t.user_attrs for t in done], default=str)
    assert "***" in study.user_attrs["spec"]["storage"]
    for r in [parents[0], *(r for runs in by_trial.values() for r in runs)]:
        assert secret not in json.dumps([r.data.tags, r.data.params])
    for artifact in client.list_artifacts(parents[0].info.run_id):
        if not artifact.is_dir:
            text = Path(client.download_artifacts(parents[0].info.run_id, artifact.path, str(tmp_path))).read_bytes()
            assert secret.encode() not in text, artifact.path


def test_sigterm_ends_the_trial_cleanly_and_the_study_resumes(tmp_path):
    """SIGTERM (as Ctrl-C) mid-trial: the trial FAILs with the reason, its run KILLED, exit 130; it is
    re-queued, and the same command run again runs it. Local stores only (SQLite)."""
    write_spec(tmp_path / "spec.yaml", train={**TINY, "epochs": 6})
    args = ["--spec", "spec.yaml", "--n-trials", "3", *FAST]
    p = start(tmp_path, *args, log="first.log")
    url = "sqlite:///" + str(tmp_path / "studies" / "dist.db")
    wait_for(lambda: (tmp_path / "studies" / "dist.db").exists() and any(
        t.state.name == "RUNNING" and "mlflow_run_id" in t.user_attrs for t in trials("dist", url)), 120, "a running trial", [p])  # fmt: skip
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=120) == 130, (tmp_path / "first.log").read_text()
    cut = next(t for t in trials("dist", url) if t.state.name == "FAIL")
    assert cut.user_attrs["fail_reason"] == "Interrupted: interrupted by SIGTERM"
    client, parents, by_trial = children_by_trial("sqlite:///" + str(tmp_path / "mlruns" / "mlflow.db"), "dist")
    assert [r.info.status for r in by_trial[cut.number]] == ["KILLED"]
    assert any(t.state.name == "WAITING" and t.user_attrs.get("retry_of") == cut.number for t in trials("dist", url))

    p = start(tmp_path, *args, log="second.log")
    assert p.wait(timeout=180) == 0, (tmp_path / "second.log").read_text()
    done = trials("dist", url)
    retry = next(t for t in done if t.user_attrs.get("retry_of") == cut.number)
    assert retry.state.name == "COMPLETE" and retry.user_attrs["role"] == cut.user_attrs["role"]
    _, _, by_trial = children_by_trial("sqlite:///" + str(tmp_path / "mlruns" / "mlflow.db"), "dist")
    assert not [r for runs in by_trial.values() for r in runs if r.info.status == "RUNNING"]


def test_local_workers_share_a_journal_file(tmp_path):
    """``--devices cpu --workers 2`` with the default storage: a Journal file, exactly n trials."""
    write_spec(tmp_path / "spec.yaml", train={**TINY, "epochs": 1})
    p = start(tmp_path, "--spec", "spec.yaml", "--devices", "cpu", "--workers", "2", "--n-trials", "5",
              "--tracking-uri", "none", log="out.log")  # fmt: skip
    assert p.wait(timeout=180) == 0, (tmp_path / "out.log").read_text()
    out = (tmp_path / "out.log").read_text()
    assert "storage journal:///studies/dist.journal" in out and "[w0 cpu]" in out and "[w1 cpu]" in out
    done = trials("dist", "journal:///" + str(tmp_path / "studies" / "dist.journal"))  # journal:////abs/path
    assert [t.state.name for t in done] == ["COMPLETE"] * 5
    assert len({t.user_attrs["worker"] for t in done}) == 2
    assert (tmp_path / "studies" / "dist" / "trials.csv").exists()


def test_storage_lost_mid_study_retries_then_stops_keeping_what_was_recorded(tmp_path, postgres_db):
    """The connection to PostgreSQL is cut mid-study (a proxy in between is closed): the worker retries
    for --reconnect-timeout seconds, then exits 3 with one clear error; completed trials are kept."""
    import sqlalchemy

    u = sqlalchemy.make_url(postgres_db)
    proxy = TcpProxy(u.host or "127.0.0.1", u.port or 5432)
    via_proxy = u.set(port=proxy.port, password="pw-Secret-77").render_as_string(hide_password=False)
    write_spec(tmp_path / "spec.yaml")
    p = start(tmp_path, "--spec", "spec.yaml", "--storage", via_proxy, "--tracking-uri", "none", "--n-trials", "50", *FAST,
              log="out.log")  # fmt: skip
    wait_for(lambda: sum(t.state.name == "COMPLETE" for t in trials("dist", postgres_db)) >= 2, 120, "2 trials", [p])
    proxy.stop()
    t0 = time.monotonic()
    code = p.wait(timeout=120)
    out = (tmp_path / "out.log").read_text()
    assert code == 3, out
    assert time.monotonic() - t0 < 60
    assert "is not answering" in out and "unreachable for 4 s" in out and "run the same command again" in out
    assert "pw-Secret-77" not in out and "Traceback" not in out
    assert sum(t.state.name == "COMPLETE" for t in trials("dist", postgres_db)) >= 2


def test_tracking_server_lost_mid_study(tmp_path, postgres_db, mlflow_server):
    """The MLflow server stops answering mid-study: bounded retries, exit 3, Optuna keeps every trial,
    and the interrupted trial is re-queued, not lost."""
    port = int(mlflow_server.rsplit(":", 1)[1])
    proxy = TcpProxy("127.0.0.1", port)
    write_spec(tmp_path / "spec.yaml", name="lost-tracking")
    p = start(tmp_path, "--spec", "spec.yaml", "--storage", postgres_db, "--tracking-uri", f"http://127.0.0.1:{proxy.port}",
              "--n-trials", "50", *FAST, log="out.log")  # fmt: skip
    wait_for(lambda: sum(t.state.name == "COMPLETE" for t in trials("lost-tracking", postgres_db)) >= 2, 120, "2 trials", [p])
    proxy.stop()
    code = p.wait(timeout=120)
    out = (tmp_path / "out.log").read_text()
    assert code == 3, out
    assert "MLflow tracking http://127.0.0.1" in out and "unreachable for 4 s" in out
    done = trials("lost-tracking", postgres_db)
    assert sum(t.state.name == "COMPLETE" for t in done) >= 2
    assert not [t for t in done if t.state.name == "RUNNING"]
    _, _, by_trial = children_by_trial(mlflow_server, "lost-tracking")
    for t in done:
        if t.state.name == "COMPLETE":
            assert [r.info.status for r in by_trial[t.number]] == ["FINISHED"]


def test_study_on_mysql(tmp_path, mysql_db):
    """The same study on MariaDB/MySQL (``mysql+pymysql://``), two workers, heartbeats on."""
    write_spec(tmp_path / "spec.yaml", train={**TINY, "epochs": 2})
    procs = [start(tmp_path, "--spec", "spec.yaml", "--storage", mysql_db, "--tracking-uri", "none", "--max-trials", "4",
                   "--worker", *FAST, log=f"w{i}.log") for i in range(2)]  # fmt: skip
    for i, p in enumerate(procs):
        assert p.wait(timeout=180) == 0, (tmp_path / f"w{i}.log").read_text()
    done = trials("dist", mysql_db)
    assert [t.state.name for t in done] == ["COMPLETE"] * 4
    assert [t.user_attrs["role"] for t in done][:3] == ["baseline", "wus-default", "baseline-frontier"]


def test_a_local_worker_killed_mid_trial_leaves_the_study_finished(tmp_path):
    """``--devices cpu --workers 3`` on the Journal file, one worker SIGKILLed mid-trial: its trial FAIL and
    re-run, exactly 6 COMPLETE, the launcher exits 0, and the parent run tells the truth about the study:
    FINISHED with ``lost_workers = 1`` (it used to end FAILED although the study had finished)."""
    write_spec(tmp_path / "spec.yaml", train={**TINY, "epochs": 5})
    p = start(tmp_path, "--spec", "spec.yaml", "--devices", "cpu", "--workers", "3", "--n-trials", "6", *FAST, log="out.log")
    url = "journal:///" + str(tmp_path / "studies" / "dist.journal")

    def mid_trial():
        if not (tmp_path / "studies" / "dist.journal").exists():
            return None
        return next((t for t in trials("dist", url) if t.state.name == "RUNNING" and "mlflow_run_id" in t.user_attrs), None)

    victim = wait_for(mid_trial, 240, "a worker inside a trial", [p])
    pid = int(victim.user_attrs["worker"].rsplit(":", 1)[1])
    assert pid != p.pid
    import os

    os.kill(pid, signal.SIGKILL)
    assert p.wait(timeout=300) == 0, (tmp_path / "out.log").read_text()
    assert "was killed by SIGKILL" in (tmp_path / "out.log").read_text()

    done = trials("dist", url)
    assert sum(t.state.name == "COMPLETE" for t in done) == 6
    assert not [t for t in done if t.state.name in ("RUNNING", "WAITING")]
    killed = next(t for t in done if t.number == victim.number)
    assert killed.state.name == "FAIL" and killed.user_attrs["fail_reason"].startswith("worker lost")
    assert [t.state.name for t in done if t.user_attrs.get("retry_of") == victim.number] == ["COMPLETE"]
    _, parents, by_trial = children_by_trial("sqlite:///" + str(tmp_path / "mlruns" / "mlflow.db"), "dist")
    assert [r.info.status for r in by_trial[victim.number]] == ["KILLED"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert parents[0].data.tags["lost_workers"] == "1"


def test_launch_status_is_the_studys():
    from wus_tune._study.workers import launch_status

    assert launch_status([0, -9, 0], interrupted=False, budget_complete=True) == ("FINISHED", 1)
    assert launch_status([0, -9, 0], interrupted=False, budget_complete=False) == ("FAILED", 1)
    assert launch_status([0, 1], interrupted=False, budget_complete=False) == ("FINISHED", 0)
    assert launch_status([130, -15], interrupted=True, budget_complete=True) == ("KILLED", 1)
