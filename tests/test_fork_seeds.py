"""Forks resume the baseline run they were decided on: with two baseline runs (seeds 0 and 1), every
forked and replayed trial equals its from-scratch twin, bit for bit on the CPU: in one process, resumed
halfway, and with two worker processes on a Journal file or PostgreSQL. A snapshot that is not the
baseline's own, or cannot be read, is refused in one line and the trial trains from scratch.

Tiny digits runs (an MLP of width 0.25, 5 epochs); about 90 s on 2 cores."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import optuna
import pytest
import torch
import yaml

from conftest import worker_env
from wus_tune._study import reuse
from wus_tune._study.spec import StudySpec
from wus_tune.config import TrainConfig
from wus_tune.run_state import RunState, snapshot_path
from wus_tune.study import run_study
from wus_tune.trainer import fit

TINY = {"model": {"name": "mlp", "width": 0.25}, "data": {"name": "digits"}, "device": "cpu", "epochs": 5,
        "schedule": {"name": "step"}}  # fmt: skip
# WUS settings that first skip after checks 2, 3 and 4 of the seed-0 and seed-1 baselines (and one that never does)
ENQUEUE = [
    {"methods.wus.variant": "wus", "methods.wus.threshold": 0.0},
    {"methods.wus.variant": "wus", "methods.wus.threshold": 0.2, "methods.wus.window": 1, "methods.wus.warmup": 2,
     "methods.wus.schedule_window[1]": 0.95},
    {"methods.wus.variant": "wus+lr", "methods.wus.threshold": 0.2, "methods.wus.window": 1, "methods.wus.warmup": 1,
     "methods.wus.lr_decay": 0.5, "methods.wus.schedule_window[1]": 0.95},
    {"methods.wus.variant": "wus", "methods.wus.threshold": 0.3, "methods.wus.window": 1, "methods.wus.warmup": 3,
     "methods.wus.skip_length": 1, "methods.wus.schedule_window[1]": 0.95},
]  # fmt: skip


def spec_dict(name: str, **extra) -> StudySpec:
    return StudySpec.from_dict({"name": name, "train": TINY, "baseline_fractions": [], "baseline_repeats": 2, "tracking_uri": "none",
            "enqueue": ENQUEUE, "sampler_options": {"n_startup_trials": 2}} | extra)  # fmt: skip


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


def assert_each_reused_trial_equals_its_twin(trials: list[optuna.trial.FrozenTrial]) -> tuple[int, int]:
    """Re-train every forked and replayed trial from its stored config, from scratch: the same accuracy,
    steps per kind and FLOPs. Returns (forked, replayed) counts."""
    forked = replayed = 0
    baselines = {t.number: t for t in trials if t.user_attrs.get("role") == "baseline"}
    for t in trials:
        attrs = t.user_attrs
        if t.state != optuna.trial.TrialState.COMPLETE or not (attrs.get("forked") or attrs.get("reused")):
            continue
        config = TrainConfig.from_dict(attrs["config"])
        twin = fit(config)
        stored = attrs["result"]
        if attrs.get("forked"):
            forked += 1
            source = baselines[attrs["forked"]["trial"]]
            assert source.user_attrs["config"]["seed"] == config.seed == attrs["forked"]["seed"], t.number
            assert twin.changed_steps > 0, t.number
            for name in ("val_acc", "changed_steps", "cost_flops", "flops_fraction", "total_steps"):
                assert stored[name] == getattr(twin, name), (t.number, name)
        else:
            replayed += 1
            source = baselines[stored["reused_from"]]
            assert source.user_attrs["config"]["seed"] == config.seed, t.number
            assert twin.changed_steps == 0, t.number
            for name in ("val_acc", "changed_steps", "flops_fraction", "total_steps"):
                assert stored[name] == getattr(twin, name), (t.number, name)
    return forked, replayed


def test_forks_and_replays_with_two_baselines_equal_their_twins_and_survive_a_resume(study_dir):
    lines: list[str] = []
    first = run_study(spec_dict("two-seeds", n_trials=4), echo=lines.append)  # both baselines, then 2 more
    done = {c.number for c in first.analysis.candidates if c.state == "COMPLETE"}
    assert done == {0, 1, 2, 3}
    # each baseline run keeps its own snapshots, which record whose they are
    dirs = sorted(p.name for p in (study_dir / "studies" / "two-seeds" / "baseline_checkpoints").iterdir())
    assert dirs == ["trial_00000", "trial_00002"]
    for n, seed in ((0, 0), (2, 1)):
        ck = first.analysis.by_number(n).attrs["reuse_checkpoints"]
        assert ck["dir"].endswith(f"trial_{n:05d}") and ck["points"]
        state = RunState.load(snapshot_path(ck["dir"], ck["points"][0]))
        assert state.origin == {"study": "two-seeds", "trial": n, "seed": seed}
    resumed = run_study(spec_dict("two-seeds", n_trials=3), echo=lines.append)  # the same study, resumed
    study = optuna.load_study(study_name="two-seeds", storage=resumed.storage.replace("***", ""))
    trials = study.get_trials(deepcopy=False)
    assert [t.user_attrs["config"]["seed"] for t in trials if t.user_attrs.get("role") == "baseline"] == [0, 1]
    forked, replayed = assert_each_reused_trial_equals_its_twin(trials)
    assert forked >= 3 and replayed >= 1  # trials 3.. ran after the seed-1 baseline wrote its snapshots


def _cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "wus_tune.study", *args], cwd=cwd, env=worker_env(),
                          capture_output=True, text=True, timeout=600)  # fmt: skip


def test_two_workers_on_a_journal_file_fork_from_the_baseline_of_their_seed(tmp_path):
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec_dict("journal-seeds").to_dict()))
    done = _cli(tmp_path, "--spec", "spec.yaml", "--devices", "cpu", "--workers", "2", "--max-trials", "8")
    assert done.returncode == 0, done.stdout + done.stderr
    from wus_tune._study.storage import open_storage

    study = optuna.load_study(study_name="journal-seeds", storage=open_storage(f"journal:///{tmp_path}/studies/journal-seeds.journal"))
    forked, replayed = assert_each_reused_trial_equals_its_twin(study.get_trials(deepcopy=False))
    assert forked >= 2 and replayed >= 1


@pytest.mark.services
def test_two_workers_on_postgresql_fork_from_the_baseline_of_their_seed(tmp_path, postgres_db):
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec_dict("pg-seeds").to_dict()))
    procs = [subprocess.Popen([sys.executable, "-m", "wus_tune.study", "--spec", "spec.yaml", "--storage", postgres_db,
                               "--max-trials", "8"], cwd=tmp_path, env=worker_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]  # fmt: skip
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    from wus_tune._study.storage import open_storage

    study = optuna.load_study(study_name="pg-seeds", storage=open_storage(postgres_db))
    forked, replayed = assert_each_reused_trial_equals_its_twin(study.get_trials(deepcopy=False))
    assert forked >= 2 and replayed >= 1


# ---- snapshots a fork must refuse ---------------------------------------------------------------------


def _study_with_forks(name: str, **extra):
    return run_study(spec_dict(name, baseline_repeats=1, n_trials=4, **extra), echo=(lines := []).append), lines


def test_a_snapshot_of_another_run_is_refused_in_one_line_and_the_trial_trains_from_scratch(study_dir):
    first, _ = _study_with_forks("tampered")
    ck = first.analysis.by_number(0).attrs["reuse_checkpoints"]
    for point in ck["points"]:  # someone put another seed's states in the baseline's folder
        path = snapshot_path(ck["dir"], point)
        state = RunState.load(path)
        state.origin = state.origin | {"seed": 7}
        state.save(path)
    again, lines = _study_with_forks("tampered")
    refused = [line for line in lines if line.startswith("trial ") and "trains from scratch" in line]
    assert refused and all("belongs to trial 0 (seed 7), not to baseline trial 0 (seed 0)" in line for line in refused)
    assert all("\n" not in line for line in refused)
    new = [c for c in again.analysis.candidates if c.number >= 4 and c.state == "COMPLETE"]
    assert new and not any(c.attrs.get("forked") for c in new)
    assert any("belongs to trial 0 (seed 7)" in c.attrs.get("reuse_skipped", "") for c in new)
    assert len([c for c in again.analysis.candidates if c.state == "COMPLETE"]) == 8


def test_an_unreadable_snapshot_is_set_aside_and_its_trials_train_from_scratch(study_dir):
    first, _ = _study_with_forks("truncated")
    ck = first.analysis.by_number(0).attrs["reuse_checkpoints"]
    for point in ck["points"]:  # a full disk or an interrupted copy
        path = snapshot_path(ck["dir"], point)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    again, lines = _study_with_forks("truncated")
    aside = [line for line in lines if "is unreadable" in line and "set aside as point_" in line]
    assert len(aside) >= 1 and all("\n" not in line for line in aside)
    assert list(Path(ck["dir"]).glob("*.unreadable"))
    states = [c.state for c in again.analysis.candidates if c.number >= 4]
    assert states == ["COMPLETE"] * 4  # no trial failed; each trained from scratch (or was replayed)
    assert not any(c.attrs.get("forked") for c in again.analysis.candidates if c.number >= 4)


def test_a_writer_killed_mid_snapshot_leaves_no_half_file(tmp_path):
    """A snapshot is written to a temporary file and renamed: a process killed while writing leaves the
    earlier snapshot (or none), never a truncated one under the real name."""
    target = tmp_path / "point_00001.pt"
    script = textwrap.dedent(f"""
        import os, signal, torch
        from wus_tune.run_state import RunState
        real_save = torch.save
        def dying_save(obj, f):
            real_save(obj, f)
            with open(f, "r+b") as fh:
                fh.truncate(100)  # half written ...
            os.kill(os.getpid(), signal.SIGKILL)  # ... when the writer dies
        torch.save = dying_save
        RunState(point=1, step=0, epoch=0, batch=0, model={{"w": torch.ones(1000)}}, optimizer={{}},
                 torch_rng=torch.get_rng_state(), cuda_rng=None, loader_rng=torch.zeros(1), counters={{}},
                 epoch_partial={{}}, records=[], probes=[], config={{}}).save({str(target)!r})
    """)
    proc = subprocess.run([sys.executable, "-c", script], env=worker_env(), capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not target.exists()
    left = set(os.listdir(tmp_path))
    assert all(name.endswith(".tmp") for name in left)  # only the dead writer's temporary file
    # and a complete write replaces the file in one step
    state = RunState(point=1, step=0, epoch=0, batch=0, model={"w": torch.ones(3)}, optimizer={},
                     torch_rng=torch.get_rng_state(), cuda_rng=None, loader_rng=torch.zeros(1), counters={},
                     epoch_partial={}, records=[], probes=[], config={})  # fmt: skip
    state.save(target)
    assert torch.equal(RunState.load(target).model["w"], torch.ones(3))
    assert set(os.listdir(tmp_path)) - left == {"point_00001.pt"}  # no temporary file of its own left behind


def test_find_baseline_picks_the_run_of_the_trials_seed(tmp_path):
    study = optuna.create_study(storage=f"sqlite:///{tmp_path}/s.db", directions=["maximize", "minimize"])
    base = TrainConfig.from_dict(TINY)
    for seed in (0, 1):
        config = base.replace({"seed": seed}).to_dict()
        study.enqueue_trial({}, user_attrs={"role": "baseline", "config": config, reuse.SIGNAL_ATTR: [{"val_acc": 0.5}]})
        t = study.ask()
        study.tell(t, [0.9 + seed / 100, 1.0])
    wus = base.replace({"methods.wus": {}})
    assert reuse.find_baseline(study, wus)[0].number == 0
    assert reuse.find_baseline(study, wus.replace({"seed": 1}))[0].number == 1
    none, why, running = reuse.find_baseline(study, wus.replace({"seed": 5}))
    assert none is None and not running and "seed 5" in why


# ---- a user's own data ------------------------------------------------------------------------------------


def _user_data(n: int = 600):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    return x, (x[:, 0] + 0.5 * x[:, 1] > 0).long()


def _per_step_spec(name: str, **train) -> StudySpec:
    enqueue = [{"methods.wus.variant": "wus", "methods.wus.threshold": 0.5, "methods.wus.window": 1, "methods.wus.warmup": 4}]
    per_step = {"methods": {"wus": {"signal": "train_acc", "check_every": 4}}}  # the baseline records this signal for the trials
    base = {"model": {"name": "mlp", "width": 0.25}, "epochs": 4, "device": "cpu", "optim": {"batch_size": 32}} | per_step
    return StudySpec.from_dict({"name": name, "train": base | train, "baseline_fractions": [], "tracking_uri": "none",
                                "enqueue": enqueue, "n_trials": 3})  # fmt: skip


def test_a_per_step_study_on_a_users_own_data_forks(study_dir):
    """The baseline picks its snapshot points once it knows its steps per epoch, which only the run
    knows for objects handed to run_study (before, reuse silently kept no snapshots there)."""
    x, y = _user_data()
    lines: list[str] = []
    outcome = run_study(_per_step_spec("own-data"), data=(x, y), echo=lines.append)
    base = outcome.analysis.by_number(0)
    assert base.attrs["reuse_checkpoints"]["points"], base.attrs["reuse_checkpoints"]
    enqueued = outcome.analysis.by_number(2)
    assert enqueued.attrs.get("forked"), enqueued.attrs.get("reuse_skipped")


def test_a_streamed_training_set_keeps_no_snapshots_and_says_so_in_one_line(study_dir):
    x, y = _user_data()
    dataset = {"train": torch.utils.data.TensorDataset(x, y)}  # over the memory budget below: streamed
    lines: list[str] = []
    outcome = run_study(_per_step_spec("streamed", data={"memory_budget_mb": 0, "num_workers": 0}), data=dataset,
                        echo=lines.append)  # fmt: skip
    said = [line for line in lines if line.startswith("reuse: baseline trial 0 kept no snapshots")]
    assert len(said) == 1 and "streamed" in said[0] and "\n" not in said[0]
    assert outcome.analysis.by_number(0).attrs["reuse_checkpoints"]["points"] == []
    enqueued = outcome.analysis.by_number(2)
    assert enqueued.state == "COMPLETE" and not enqueued.attrs.get("forked")
