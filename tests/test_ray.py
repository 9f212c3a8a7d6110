"""A study's trials on a real Ray cluster on loopback: a head and a second node started by the test with
``ray start``, driven by a real ``python -m wus_tune.study --ray ...`` process; faults are real SIGKILLs of
a Ray worker process and of the whole cluster.

Skipped, with the reason, where Ray is not installed or a cluster cannot start. Each cluster is stopped by
killing the process groups of the ``ray start`` commands this file ran (never ``ray stop``, which would
stop every Ray instance on the machine). Trials are tiny (an MLP on ``digits``); about 3-4 minutes on a
loaded 2-core machine, most of it Ray worker processes importing torch and MLflow.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import free_port, worker_env
from test_distributed import children_by_trial, trials, wait_for, write_spec

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]')")
pytestmark = pytest.mark.ray

FAST = ["--heartbeat-interval", "1", "--grace-period", "3", "--reconnect-timeout", "4"]
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}  # a private loopback cluster: no token


class Cluster:
    """Ray nodes on 127.0.0.1, each started by ``ray start`` in its own process group. One CPU per node
by default: two nodes give two trial slots, one on each, and only two worker processes import torch."""

    def __init__(self, cpus_per_node: int = 1) -> None:
        self.cpus = cpus_per_node
        self.port = free_port()
        self.temp = tempfile.mkdtemp(prefix="wtr", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
        self.groups: list[int] = []

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _start(self, *args: str) -> None:
        cmd = [sys.executable, "-c", "from ray.scripts.scripts import main; main()", "start", "--node-ip-address", "127.0.0.1",
               "--num-cpus", str(self.cpus), "--object-store-memory", "80000000", "--disable-usage-stats", *args]  # fmt: skip
        p = subprocess.Popen(cmd, env=worker_env(**RAY_ENV), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)  # fmt: skip
        self.groups.append(p.pid)  # the daemons it starts stay in its process group
        out, _ = p.communicate(timeout=180)
        if p.returncode != 0:
            self.stop()
            pytest.skip(f"a Ray cluster cannot start here: {(out.strip().splitlines() or ['?'])[-1]}")

    def start_head(self) -> Cluster:
        self._start("--head", "--port", str(self.port), "--include-dashboard=false", "--temp-dir", self.temp)
        return self

    def add_node(self) -> Cluster:
        self._start("--address", self.address)
        return self

    def stop(self) -> None:
        for group in self.groups:
            try:
                os.killpg(group, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.groups = []
        time.sleep(1)
        shutil.rmtree(self.temp, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster():
    c = Cluster().start_head().add_node()
    try:
        yield c
    finally:
        c.stop()


def drive(cwd: Path, *args: str, log: str) -> subprocess.Popen:
    """``python -m wus_tune.study ARGS`` in ``cwd``, its output in ``cwd/log``."""
    out = open(cwd / log, "w")
    return subprocess.Popen([sys.executable, "-m", "wus_tune.study", *args], cwd=cwd, env=worker_env(**RAY_ENV),
                            stdout=out, stderr=subprocess.STDOUT)  # fmt: skip


def journal(tmp_path: Path, name: str = "dist") -> str:
    return "journal:///" + str(tmp_path / "studies" / f"{name}.journal")


def test_six_trials_on_a_two_node_cluster(tmp_path, cluster):
    """6 trials as Ray tasks on a head and a second node: exactly 6 COMPLETE, one FINISHED child run each,
    the parent run FINISHED with the report, no lost workers."""
    write_spec(tmp_path / "spec.yaml")
    p = drive(tmp_path, "--spec", "spec.yaml", "--ray", cluster.address, "--n-trials", "6", *FAST, log="out.log")
    assert p.wait(timeout=300) == 0, (tmp_path / "out.log").read_text()
    out = (tmp_path / "out.log").read_text()
    assert f"ray {cluster.address}: 1 CPU + 0 GPU per trial; 2 trial(s) at once, 6 to run" in out
    done = trials("dist", journal(tmp_path))
    assert [t.number for t in done] == list(range(6))
    assert [t.state.name for t in done] == ["COMPLETE"] * 6
    assert all(t.user_attrs.get("ray_task") for t in done)
    assert len({t.user_attrs["ray_node"] for t in done}) == 2  # one CPU per node: each node ran trials
    client, parents, by_trial = children_by_trial("sqlite:///" + str(tmp_path / "mlruns" / "mlflow.db"), "dist")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert "lost_workers" not in parents[0].data.tags
    assert sorted(by_trial) == list(range(6))
    for t in done:
        runs = by_trial[t.number]
        assert [r.info.status for r in runs] == ["FINISHED"]
        assert runs[0].info.run_id == t.user_attrs["mlflow_run_id"]
        assert runs[0].data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert {"val_acc", "time_s", "objective/accuracy"} <= set(runs[0].data.metrics)
        if t.user_attrs.get("reused"):  # equal to the baseline, not trained: no curve of its own
            assert runs[0].data.tags.get("wus_tune.reused") == "baseline"
        else:
            assert "train_loss" in runs[0].data.metrics
    artifacts = {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    assert {"best_config.yaml", "trials.csv", "search_space.json", "base_config.yaml"} <= artifacts


def test_two_runs_with_one_seed_ask_the_same_parameters(tmp_path, cluster):
    """Two runs of one spec with one --seed, two trials at once on two nodes: every trial number gets the
    same parameters in both (its sampler seed comes from the study seed and the trial number, not from the
    Ray worker process that asks). Random sampling throughout and no calibrated space, so what a trial draws
    cannot depend on which trials finished first."""
    asked = []
    for run in ("first", "second"):
        cwd = tmp_path / run
        cwd.mkdir()
        write_spec(cwd / "spec.yaml", baseline_fractions=[], sampler_options={"n_startup_trials": 100},
                   reuse={"calibrate": False})  # fmt: skip
        p = drive(cwd, "--spec", "spec.yaml", "--ray", cluster.address, "--n-trials", "6", "--seed", "7",
                  "--tracking-uri", "none", *FAST, log="out.log")  # fmt: skip
        assert p.wait(timeout=300) == 0, (cwd / "out.log").read_text()
        asked.append({t.number: t.params for t in trials("dist", journal(cwd))})
    assert sorted(asked[0]) == list(range(6))
    assert asked[0] == asked[1]
    sampled = {t.number for t in trials("dist", journal(tmp_path / "first")) if t.user_attrs.get("role") == "search"}
    assert len(sampled) >= 3  # the comparison covers sampled trials, not only the enqueued ones


def test_a_killed_ray_worker_is_rerun_once_never_counted_twice(tmp_path, cluster):
    """SIGKILL the Ray worker process running a trial: its trial FAIL with the reason, its run KILLED, one
    re-run; the study still ends with exactly 6 COMPLETE, none RUNNING, no duplicate numbers, and the parent
    run FINISHED with lost_workers = 1."""
    write_spec(tmp_path / "spec.yaml", train={"model": {"name": "mlp", "width": 0.25}, "data": {"name": "digits"},
                                              "epochs": 6, "device": "cpu"})  # fmt: skip
    p = drive(tmp_path, "--spec", "spec.yaml", "--ray", cluster.address, "--n-trials", "6", *FAST, log="out.log")

    def mid_trial():
        for t in trials("dist", journal(tmp_path)) if (tmp_path / "studies" / "dist.journal").exists() else []:
            if t.state.name == "RUNNING" and "mlflow_run_id" in t.user_attrs and "worker" in t.user_attrs:
                return t
        return None

    victim = wait_for(mid_trial, 240, "a Ray task inside a trial", [p])
    os.kill(int(victim.user_attrs["worker"].rsplit(":", 1)[1]), signal.SIGKILL)
    assert p.wait(timeout=300) == 0, (tmp_path / "out.log").read_text()
    out = (tmp_path / "out.log").read_text()
    assert "a Ray worker was lost" in out and "its trial is re-queued" in out

    done = trials("dist", journal(tmp_path))
    numbers = [t.number for t in done]
    assert len(numbers) == len(set(numbers)) == max(numbers) + 1
    assert sum(t.state.name == "COMPLETE" for t in done) == 6
    assert not [t for t in done if t.state.name in ("RUNNING", "WAITING")]
    killed = next(t for t in done if t.number == victim.number)
    assert killed.state.name == "FAIL" and killed.user_attrs["fail_reason"].startswith("Ray worker lost")
    retry = [t for t in done if t.user_attrs.get("retry_of") == victim.number]
    assert len(retry) == 1 and retry[0].state.name == "COMPLETE" and retry[0].params == killed.params
    _, parents, by_trial = children_by_trial("sqlite:///" + str(tmp_path / "mlruns" / "mlflow.db"), "dist")
    assert [r.info.status for r in by_trial[victim.number]] == ["KILLED"]
    for t in done:
        if t.state.name == "COMPLETE":
            assert [r.info.status for r in by_trial[t.number]] == ["FINISHED"]
    assert parents[0].info.status == "FINISHED" and parents[0].data.tags["lost_workers"] == "1"


def test_ctrl_c_stops_cleanly_and_requeues(tmp_path, cluster):
    """SIGINT to the driver mid-trial: exit 130; the running trial FAIL with the reason, its run KILLED,
    re-queued (WAITING); nothing left RUNNING."""
    write_spec(tmp_path / "spec.yaml", name="cut", train={"model": {"name": "mlp", "width": 0.25}, "data": {"name": "digits"},
                                                          "epochs": 30, "device": "cpu"})  # fmt: skip
    p = drive(tmp_path, "--spec", "spec.yaml", "--ray", cluster.address, "--n-trials", "4", *FAST, log="out.log")
    wait_for(lambda: (tmp_path / "studies" / "cut.journal").exists() and any(
        t.state.name == "RUNNING" and "mlflow_run_id" in t.user_attrs for t in trials("cut", journal(tmp_path, "cut"))),
        240, "a running trial", [p])  # fmt: skip
    p.send_signal(signal.SIGINT)
    assert p.wait(timeout=120) == 130, (tmp_path / "out.log").read_text()
    done = trials("cut", journal(tmp_path, "cut"))
    assert not [t for t in done if t.state.name == "RUNNING"]
    cut = [t for t in done if t.state.name == "FAIL"]
    assert cut and all(t.user_attrs["fail_reason"] == "Interrupted: interrupted by SIGINT (Ctrl-C); re-queued" for t in cut)
    waiting = {t.user_attrs.get("retry_of") for t in done if t.state.name == "WAITING"}
    assert {t.number for t in cut} <= waiting
    _, _, by_trial = children_by_trial("sqlite:///" + str(tmp_path / "mlruns" / "mlflow.db"), "cut")
    for t in cut:
        if "mlflow_run_id" in t.user_attrs:
            assert [r.info.status for r in by_trial[t.number]] == ["KILLED"]
        else:  # interrupted before its run began (a forkable trial waiting for the running baseline)
            assert t.number not in by_trial
    assert any("mlflow_run_id" in t.user_attrs for t in cut)  # the trial seen running had its run closed KILLED
    assert "Traceback" not in (tmp_path / "out.log").read_text()


def test_the_head_stopped_mid_study_then_started_again_resumes(tmp_path):
    """The whole cluster is SIGKILLed mid-study: the driver stops (exit 3, one line); a new cluster and the
    same command finish the study: exactly 6 COMPLETE in all, none RUNNING, no duplicates."""
    write_spec(tmp_path / "spec.yaml", train={"model": {"name": "mlp", "width": 0.25}, "data": {"name": "digits"},
                                              "epochs": 6, "device": "cpu"})  # fmt: skip
    first = Cluster().start_head()
    try:
        args = ["--spec", "spec.yaml", "--max-trials", "6", "--tracking-uri", "none", *FAST]
        p = drive(tmp_path, *args, "--ray", first.address, log="first.log")

        def running():
            if not (tmp_path / "studies" / "dist.journal").exists():
                return False
            done = trials("dist", journal(tmp_path))
            return any(t.state.name == "COMPLETE" for t in done) and any(t.state.name == "RUNNING" for t in done)

        wait_for(running, 240, "a completed and a running trial", [p])
    finally:
        first.stop()
    code = p.wait(timeout=120)
    out = (tmp_path / "first.log").read_text()
    assert code == 3, out
    assert "the Ray cluster's head" in out and "run the same command to continue" in out and "Traceback" not in out
    cut = trials("dist", journal(tmp_path))
    assert not [t for t in cut if t.state.name == "RUNNING"]  # failed and re-queued by the driver at once
    assert sum(t.state.name == "COMPLETE" for t in cut) < 6

    second = Cluster().start_head()
    try:
        p = drive(tmp_path, *args, "--ray", second.address, log="second.log")
        assert p.wait(timeout=300) == 0, (tmp_path / "second.log").read_text()
    finally:
        second.stop()
    done = trials("dist", journal(tmp_path))
    numbers = [t.number for t in done]
    assert len(numbers) == len(set(numbers))
    assert sum(t.state.name == "COMPLETE" for t in done) == 6
    assert not [t for t in done if t.state.name in ("RUNNING", "WAITING")]


def test_an_unreachable_cluster_is_one_line_and_exit_2_before_anything_is_written(tmp_path):
    write_spec(tmp_path / "spec.yaml")
    port = free_port()
    r = subprocess.run([sys.executable, "-m", "wus_tune.study", "--spec", "spec.yaml", "--ray", f"127.0.0.1:{port}"],
                       cwd=tmp_path, env=worker_env(**RAY_ENV), capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [
        f"error: --ray 127.0.0.1:{port}: no Ray cluster answers there (Connection refused); "
        "start one with `ray start --head`, or use --ray local"
    ]
    assert not (tmp_path / "studies").exists() and not (tmp_path / "mlruns").exists()


def test_several_seeds_per_trial_on_the_cluster(tmp_path, cluster):
    """``--seeds 2`` with the trials as Ray tasks: one baseline trial per seed, every other trial on both
    seeds, paired with them (the Ray worker resolves the spec the driver sent, seeds included)."""
    write_spec(tmp_path / "spec.yaml", tracking_uri="none")
    p = drive(tmp_path, "--spec", "spec.yaml", "--ray", cluster.address, "--n-trials", "5", "--seeds", "2", *FAST, log="out.log")
    assert p.wait(timeout=300) == 0, (tmp_path / "out.log").read_text()
    done = trials("dist", journal(tmp_path))
    assert [t.state.name for t in done] == ["COMPLETE"] * 5
    assert sorted(t.user_attrs["config"]["seed"] for t in done if t.user_attrs["role"] == "baseline") == [0, 1]
    from wus_tune._study.candidates import candidate_from_trial
    from wus_tune._study.seeds import with_paired

    for c in with_paired([candidate_from_trial(t) for t in done]):  # paired with both, however the tasks overlapped
        if c.role != "baseline":
            assert [e["seed"] for e in c.attrs["seeds"]] == [0, 1], c.number
            assert c.attrs["paired"]["seeds"] == 2
