"""Several seeds per trial, paired with the baseline's run on the same seed (``seeds: K``), and racing
(``seeds: {min, max}``): the spec and the flag, every trial's paired values, forks from the snapshot of the
trial's own seed (bit-identical to the from-scratch twin on that seed), the intervals on scripted values,
the racing rule, selection reading the interval, and a study with a SIGKILLed worker that counts no seed twice.

Tiny digits runs (an MLP of width 0.25, 5 epochs, one torch thread)."""

from __future__ import annotations

import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time

import optuna
import pytest
import yaml

from conftest import worker_env
from wus_tune._study.candidates import load_candidates
from wus_tune._study.front import Candidate, analyse, parse_rule
from wus_tune._study.seeds import Seeds, paired_summary, parse_seeds, race, race_threshold, seed_noise_pts, unpaired_acc_interval
from wus_tune._study.spec import StudySpec, initial_trials
from wus_tune.config import TrainConfig
from wus_tune.errors import UsageError
from wus_tune.study import run_study
from wus_tune.trainer import fit

TINY = {"model": {"name": "mlp", "width": 0.25}, "data": {"name": "digits"}, "device": "cpu", "epochs": 5,
        "schedule": {"name": "step"}}  # fmt: skip
# WUS settings that first skip after checks 2..4 of the baselines (test_fork_seeds.py), and one that never does
ENQUEUE = [
    {"methods.wus.variant": "wus", "methods.wus.threshold": 0.2, "methods.wus.window": 1, "methods.wus.warmup": 2,
     "methods.wus.schedule_window[1]": 0.95},
    {"methods.wus.variant": "wus", "methods.wus.threshold": 0.3, "methods.wus.window": 1, "methods.wus.warmup": 3,
     "methods.wus.skip_length": 1, "methods.wus.schedule_window[1]": 0.95},
    {"methods.wus.variant": "wus", "methods.wus.threshold": 0.0},
]  # fmt: skip


def spec(name: str, **extra) -> StudySpec:
    return StudySpec.from_dict({"name": name, "train": TINY, "baseline_fractions": [0.6], "tracking_uri": "none",
                                "sampler_options": {"n_startup_trials": 2}} | extra)  # fmt: skip


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


# ---- the spec and the flag ------------------------------------------------------------------------------


def test_seeds_parse_as_a_count_or_a_race():
    assert parse_seeds(3) == Seeds(3, 3) and not Seeds(3, 3).racing
    assert parse_seeds({"min": 1, "max": 3}) == Seeds(1, 3) and Seeds(1, 3).racing
    assert Seeds(2, 2).of(5) == [5, 6]
    for bad in (0, -1, True, 2.5, "x", {"min": 3, "max": 2}, {"min": 0, "max": 2}, {"max": 2, "mean": 1}, {"min": 1}):
        with pytest.raises(UsageError):
            parse_seeds(bad)


def test_with_seeds_every_seeds_baseline_runs_first_and_repeats_add_only_seeds_beyond():
    study = spec("order", seeds=3, baseline_repeats=4).resolve()
    trials = initial_trials(study)
    base = [(i, values.get("seed", 0)) for i, (role, values) in enumerate(trials) if role == "baseline"]
    assert base[:3] == [(0, 0), (1, 1), (2, 2)]  # before the method's default trial: it pairs with all three
    assert [s for _, s in base] == [0, 1, 2, 3]
    assert trials[3][0] == "wus-default"


@pytest.mark.parametrize("args", [
    ["--seeds", "abc"],
    ["--seeds", "0"],
    ["--spec", "zero.yaml"],
    ["--spec", "backwards.yaml"],
])  # fmt: skip
def test_bad_seeds_are_one_line_exit_2_and_nothing_written(tmp_path, args):
    (tmp_path / "zero.yaml").write_text(yaml.safe_dump({"seeds": 0, "train": TINY}))
    (tmp_path / "backwards.yaml").write_text(yaml.safe_dump({"seeds": {"min": 3, "max": 2}, "train": TINY}))
    before = set(os.listdir(tmp_path))
    proc = subprocess.run([sys.executable, "-m", "wus_tune.study", "--dataset", "digits", "--model", "mlp", *args],
                          cwd=tmp_path, env=worker_env(), capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "seeds" in lines[0], proc.stderr
    assert set(os.listdir(tmp_path)) == before  # no study file, no mlruns


# ---- intervals and racing on scripted values -----------------------------------------------------------


def test_paired_delta_and_speedup_on_scripted_values():
    trial = {0: (0.90, 0.5), 1: (0.85, 0.5), 2: (0.95, 0.4)}
    base = {0: (0.91, 1.0), 1: (0.86, 1.0), 2: (0.95, 1.0), 7: (0.5, 1.0)}
    p = paired_summary(trial, base, baseline_trials={0: 0, 1: 1, 2: 2})
    assert p["seeds"] == 3 and p["seed_list"] == [0, 1, 2] and p["baseline_trials"] == {"0": 0, "1": 1, "2": 2}
    deltas = [-1.0, -1.0, 0.0]
    acc = p["acc_delta_pts"]
    assert acc["mean"] == pytest.approx(statistics.fmean(deltas)) and acc["n"] == 3
    half = 2.919986 * statistics.stdev(deltas) / math.sqrt(3)  # t_{0.95, 2}
    assert acc["low"] == pytest.approx(acc["mean"] - half, rel=1e-5) and acc["high"] == pytest.approx(acc["mean"] + half, rel=1e-5)
    speed = p["speedup"]
    assert speed["mean"] == pytest.approx(math.exp(statistics.fmean([math.log(2), math.log(2), math.log(2.5)])))
    assert speed["low"] < speed["mean"] < speed["high"]
    # the accuracies vary by 10 points across seeds, the paired differences by 1: pairing narrows the interval
    unpaired = unpaired_acc_interval([v[0] for v in trial.values()], [base[s][0] for s in trial])
    assert unpaired.mean == pytest.approx(acc["mean"])
    assert unpaired.half_width > 5 * (acc["high"] - acc["low"]) / 2
    one = paired_summary({0: (0.9, 0.5)}, base)
    assert one["seeds"] == 1 and one["acc_delta_pts"]["low"] is None  # one seed: a point, no interval
    assert paired_summary({5: (0.9, 0.5)}, base) is None  # nothing to pair with


def test_racing_stops_a_clearly_dominated_trial_after_min_seeds_and_adds_seeds_on_the_front_edge():
    noise = seed_noise_pts([0.90, 0.91, 0.92])  # the baseline's own spread over its seeds: ~1.7 points
    assert 1.0 < noise < 3.0
    # the frontier reaches the baseline's accuracy minus 2 points at this trial's time
    frontier = [(0.5, 0.88), (1.0, 0.91)]
    threshold = race_threshold(0.5, frontier, 0.91)
    assert threshold == pytest.approx(-3.0)
    assert race([-12.0], threshold, max_seeds=3, noise_pts=noise) == "dominated"  # one seed is enough
    assert race([4.0], threshold, max_seeds=3, noise_pts=noise) == "front"
    assert race([-3.5], threshold, max_seeds=3, noise_pts=noise) == "more"  # on the edge: another seed
    assert race([-3.5, -2.0], threshold, max_seeds=3, noise_pts=noise) == "more"
    assert race([-3.5, -2.0, -3.0], threshold, max_seeds=3, noise_pts=noise) == "undecided"  # at max: stop
    assert race([-1.0, -1.1, -0.9], threshold, max_seeds=5, noise_pts=noise) == "front"  # decided by the seeds' interval
    assert race([-9.0], None, max_seeds=3, noise_pts=noise) == "front"  # faster than every plain run


def _cand(n, acc, time, role="search", paired=None):
    attrs = {"paired": paired} if paired else {}
    return Candidate(n, "COMPLETE", (acc, time), role=role, uses_method=role == "search", attrs=attrs)


def test_fastest_within_reads_the_paired_lower_bound():
    lo = lambda mean, low, high: {"acc_delta_pts": {"mean": mean, "low": low, "high": high, "n": 3, "level": 0.9}}  # noqa: E731
    cands = [
        _cand(0, 0.90, 1.0, role="baseline"),
        _cand(1, 0.895, 0.4, paired=lo(-0.5, -2.5, 1.5)),  # within 1 point on the mean, not at the lower bound
        _cand(2, 0.893, 0.6, paired=lo(-0.7, -0.9, -0.5)),  # a narrow interval inside the promise
        _cand(3, 0.80, 0.2),  # one seed, no interval: its point value, as before (10 points off)
    ]
    analysis = analyse(cands, ["accuracy", "relative_time"])
    assert analysis.select(parse_rule("fastest-within:1.0")).number == 2
    assert analysis.select(parse_rule("fastest-within:3.0")).number == 1
    assert analysis.select(parse_rule("fastest-within:11")).number == 3


# ---- a study with three paired seeds ------------------------------------------------------------------


def test_seeds_3_pairs_every_trial_and_forks_on_seed_s_start_from_seed_s_snapshot(study_dir):
    lines: list[str] = []
    out = run_study(spec("paired", seeds=3, enqueue=ENQUEUE, n_trials=8), echo=lines.append)
    study = optuna.load_study(study_name="paired", storage=out.storage.replace("***", ""))
    trials = study.get_trials(deepcopy=False)
    assert [t.state.name for t in trials] == ["COMPLETE"] * 8
    baselines = {t.user_attrs["config"]["seed"]: t for t in trials if t.user_attrs["role"] == "baseline"}
    assert sorted(baselines) == [0, 1, 2] and [t.number for t in baselines.values()] == [0, 1, 2]
    dirs = sorted(p.name for p in (study_dir / "studies" / "paired" / "baseline_checkpoints").iterdir())
    assert dirs == ["trial_00000", "trial_00001", "trial_00002"]  # one snapshot folder per baseline seed
    forked_later_seeds = 0
    for t in trials:
        per_seed = t.user_attrs["seeds"]
        if t.user_attrs["role"] == "baseline":
            assert [e["seed"] for e in per_seed] == [t.user_attrs["config"]["seed"]] and "paired" not in t.user_attrs
            continue
        assert [e["seed"] for e in per_seed] == [0, 1, 2], t.number  # three paired values, no seed twice
        for k, value in enumerate(t.values):  # the sampler sees the means
            assert value == pytest.approx(statistics.fmean(e["values"][k] for e in per_seed))
        paired = t.user_attrs["paired"]
        deltas = [(e["values"][0] - baselines[e["seed"]].values[0]) * 100 for e in per_seed]
        assert paired["seeds"] == 3 and paired["acc_delta_pts"]["mean"] == pytest.approx(statistics.fmean(deltas))
        assert paired["baseline_trials"] == {"0": 0, "1": 1, "2": 2}
        ratios = [baselines[e["seed"]].values[1] / e["values"][1] for e in per_seed]
        assert paired["speedup"]["mean"] == pytest.approx(math.exp(statistics.fmean(math.log(r) for r in ratios)))
        config = TrainConfig.from_dict(t.user_attrs["config"])
        for e in per_seed:
            if not e.get("forked"):
                continue
            s = e["seed"]
            assert e["forked"]["seed"] == s and e["forked"]["trial"] == baselines[s].number, (t.number, s)
            twin = fit(config.replace({"seed": s}))  # from scratch, on that seed
            assert twin.changed_steps > 0
            assert e["values"][0] == twin.val_acc, (t.number, s)  # bit-identical on the CPU
            forked_later_seeds += s > 0
    assert forked_later_seeds >= 2
    # the table line carries the interval
    assert any("pts [" in line and "3 seeds" in line for line in lines if line.startswith("trial "))


def test_racing_study_gives_each_trial_between_min_and_max_seeds(study_dir):
    lines: list[str] = []
    out = run_study(spec("race", seeds={"min": 1, "max": 3}, enqueue=ENQUEUE[:1], n_trials=6), echo=lines.append)
    trials = load_candidates(optuna.load_study(study_name="race", storage=out.storage.replace("***", "")))
    assert all(c.state == "COMPLETE" for c in trials)
    frontier = [c for c in trials if c.role == "baseline-frontier"]
    assert frontier and all(len(c.attrs["seeds"]) == 3 for c in frontier)  # the yardstick is not raced
    searched = [c for c in trials if c.role not in ("baseline", "baseline-frontier")]
    assert searched
    for c in searched:
        seeds = [e["seed"] for e in c.attrs["seeds"]]
        assert seeds == list(range(len(seeds))) and 1 <= len(seeds) <= 3
        verdicts = [line for line in lines if line.startswith(f"trial {c.number}: racing after")]
        assert len(verdicts) == min(len(seeds), 2)  # asked after each seed short of the max
        assert verdicts[-1].endswith("more") == (len(seeds) == 3)
        if len(seeds) < 3:  # it stopped because the interval decided
            assert verdicts[-1].rsplit(": ", 1)[1] in ("front", "dominated")


def test_json_lists_per_seed_values_mean_and_interval(study_dir):
    out = run_study(spec("json", seeds=2, enqueue=ENQUEUE[:1], n_trials=5), echo=lambda _: None)
    storage = out.storage.replace("***", "")
    proc = subprocess.run([sys.executable, "-m", "wus_tune.pareto", "--study", "json", "--storage", storage, "--format", "json"],
                          cwd=study_dir, env=worker_env(), capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    entries = {e["number"]: e for e in data["trials"]}
    e = next(e for e in entries.values() if e["role"] == "wus-default")
    seeds = e["seeds"]
    assert [s["seed"] for s in seeds["per_seed"]] == [0, 1]
    acc = seeds["objectives"]["accuracy"]
    assert acc["mean"] == pytest.approx(statistics.fmean(s["values"]["accuracy"] for s in seeds["per_seed"]))
    assert acc["n"] == 2 and acc["low"] <= acc["mean"] <= acc["high"]
    assert e["paired"]["acc_delta_pts"]["n"] == 2


# ---- workers: a killed one counts no seed twice ---------------------------------------------------------


def test_seeds_3_study_resumed_after_a_sigkilled_worker_counts_no_seed_twice(tmp_path):
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec("killed", seeds=3, enqueue=ENQUEUE[:2]).to_dict()))
    fast = ["--heartbeat-interval", "1", "--grace-period", "3"]
    out = open(tmp_path / "out.log", "w")
    p = subprocess.Popen([sys.executable, "-m", "wus_tune.study", "--spec", "spec.yaml", "--devices", "cpu", "--workers", "2",
                          "--n-trials", "7", *fast], cwd=tmp_path, env=worker_env(), stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
    journal = tmp_path / "studies" / "killed.journal"
    from wus_tune._study.storage import open_storage

    def load():
        return optuna.load_study(study_name="killed", storage=open_storage(f"journal:///{journal}")).get_trials(deepcopy=False)

    victim, deadline = None, time.monotonic() + 300
    while victim is None and time.monotonic() < deadline and p.poll() is None:
        time.sleep(0.5)
        if journal.exists():
            with_seeds = [t for t in load() if t.state.name == "RUNNING" and t.user_attrs.get("role") not in (None, "baseline")
                          and "worker" in t.user_attrs]  # fmt: skip
            victim = with_seeds[0] if with_seeds else None
    assert victim is not None, (tmp_path / "out.log").read_text()
    time.sleep(1.0)  # into its seeds
    os.kill(int(victim.user_attrs["worker"].rsplit(":", 1)[1]), signal.SIGKILL)
    assert p.wait(timeout=400) == 0, (tmp_path / "out.log").read_text()
    resumed = subprocess.run([sys.executable, "-m", "wus_tune.study", "--spec", "spec.yaml", "--n-trials", "1", *fast],
                             cwd=tmp_path, env=worker_env(), capture_output=True, text=True, timeout=400)  # fmt: skip
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    trials = load()
    killed = next(t for t in trials if t.number == victim.number)
    assert killed.state.name == "FAIL" and killed.values is None  # whatever seeds it finished count nowhere
    retry = [t for t in trials if t.user_attrs.get("retry_of") == victim.number]
    assert [t.state.name for t in retry] == ["COMPLETE"] and [e["seed"] for e in retry[0].user_attrs["seeds"]] == [0, 1, 2]
    from wus_tune._study.candidates import load_candidates

    counted = {c.number for c in load_candidates(optuna.load_study(study_name="killed", storage=open_storage(f"journal:///{journal}")))
               if c.ok}  # fmt: skip
    assert victim.number not in counted
    base_seeds = [t.user_attrs["config"]["seed"] for t in trials if t.state.name == "COMPLETE" and t.user_attrs["role"] == "baseline"]
    assert sorted(base_seeds) == [0, 1, 2]  # one baseline run per seed
    done = [t for t in trials if t.state.name == "COMPLETE" and t.user_attrs["role"] != "baseline"]
    assert len(done) >= 4
    for t in done:
        assert [e["seed"] for e in t.user_attrs["seeds"]] == [0, 1, 2], t.number
        assert t.user_attrs["paired"]["seeds"] == 3


# ---- MLflow, best_config.yaml and the confirmation ------------------------------------------------------


def test_mlflow_child_run_has_per_seed_metrics_and_the_claim_reaches_best_config_and_the_confirmation(study_dir):
    from mlflow import MlflowClient

    from wus_tune.confirm import confirm

    tracking = f"sqlite:///{study_dir}/mlruns.db"
    out = run_study(spec("logged", seeds=2, enqueue=ENQUEUE[:1], n_trials=5, tracking_uri=tracking), echo=lambda _: None)
    client = MlflowClient(tracking)
    exp = client.get_experiment_by_name("logged")
    runs = {int(r.data.tags["optuna.trial_number"]): r for r in client.search_runs([exp.experiment_id])
            if "optuna.trial_number" in r.data.tags}  # fmt: skip
    lead = next(c for c in out.analysis.candidates if c.role == "wus-default")
    metrics = runs[lead.number].data.metrics
    per_seed = {e["seed"]: e["values"] for e in lead.attrs["seeds"]}
    assert metrics["val_acc_seed_0"] == per_seed[0][0] and metrics["val_acc_seed_1"] == per_seed[1][0]
    assert metrics["objective/relative_time_seed_1"] == pytest.approx(per_seed[1][1])
    assert metrics["objective/accuracy"] == pytest.approx((per_seed[0][0] + per_seed[1][0]) / 2)
    paired = lead.attrs["paired"]["acc_delta_pts"]
    assert (metrics["paired/acc_delta_pts_low"], metrics["paired/acc_delta_pts_high"]) == pytest.approx((paired["low"], paired["high"]))
    assert runs[lead.number].data.tags["wus_tune.seeds"] == "2"
    # the pick's claim, with its interval, in best_config.yaml's meta
    from wus_tune._study.candidates import export_config

    config = export_config(lead, None, study_name="logged", rule="fastest-within:1")
    assert config.meta["claim"]["seeds"] == 2 and config.meta["claim"]["acc_delta_pts"] == paired
    # the confirmation reads the claim and says whether the fresh measurement lies inside it
    conf = confirm(out.analysis, study_name="logged", rule=parse_rule("fastest-within:1"), repeats=2, max_rounds=2,
                   say=None, trial=lead.number)  # fmt: skip
    assert conf.claimed_interval["acc_delta_pts"] == paired
    assert set(conf.claim_held) == {"acc_delta_pts", "speedup"}
    fresh = conf.acc_delta_pts["mean"]
    assert conf.claim_held["acc_delta_pts"] == (paired["low"] <= fresh <= paired["high"])


def test_a_trial_finished_before_a_seeds_baseline_is_paired_with_it_in_the_analysis():
    from wus_tune._study.seeds import with_paired

    def base(n, seed, acc):
        return Candidate(n, "COMPLETE", (acc, 1.0), role="baseline", uses_method=False, config={"seed": seed})

    per_seed = [{"seed": 0, "values": [0.90, 0.5]}, {"seed": 1, "values": [0.80, 0.5]}]
    early = paired_summary({0: (0.90, 0.5)}, {0: (0.91, 1.0)})  # seed 1's baseline was still running
    trial = Candidate(5, "COMPLETE", (0.85, 0.5), attrs={"seeds": per_seed, "paired": early})
    out = {c.number: c for c in with_paired([base(0, 0, 0.91), base(1, 1, 0.82), trial])}
    assert out[5].attrs["paired"]["seeds"] == 2
    assert out[5].attrs["paired"]["acc_delta_pts"]["mean"] == pytest.approx(-1.5)
    assert trial.attrs["paired"]["seeds"] == 1  # the stored record is not rewritten


def test_the_pruner_watches_the_first_seed_and_a_pruned_trial_counts_no_seed(study_dir):
    from test_pruning import SPEC

    out = run_study(StudySpec.from_dict({**SPEC, "name": "prune-seeds", "seeds": 2, "tracking_uri": "none", "n_trials": 10}),
                    echo=lambda _: None)  # fmt: skip
    trials = optuna.load_study(study_name="prune-seeds", storage=out.storage.replace("***", "")).get_trials(deepcopy=False)
    states = [t.state.name for t in trials]
    assert "FAIL" not in states and "RUNNING" not in states and "PRUNED" in states, states
    for t in trials:
        if t.state.name == "PRUNED":
            assert "seeds" not in t.user_attrs and "paired" not in t.user_attrs
        elif t.user_attrs["role"] != "baseline":
            assert [e["seed"] for e in t.user_attrs["seeds"]] == [0, 1]


def test_the_report_says_which_front_points_are_indistinguishable_from_the_baseline_frontier():
    from wus_tune._study.report import format_table
    from wus_tune._study.seeds import frontier_lines, versus_frontier

    def interval(mean, low, high):
        return {"acc_delta_pts": {"mean": mean, "low": low, "high": high, "n": 3, "level": 0.9},
                "speedup": {"mean": 2.0, "low": 1.8, "high": 2.2, "n": 3, "level": 0.9}, "seeds": 3}  # fmt: skip

    cands = [
        Candidate(0, "COMPLETE", (0.90, 1.0), role="baseline", uses_method=False),
        Candidate(1, "COMPLETE", (0.86, 0.5), role="baseline-frontier", uses_method=False),
        # at time 0.4 the frontier does not reach; at 0.75 it is at 0.88 (-2 points vs the baseline)
        Candidate(2, "COMPLETE", (0.895, 0.75), attrs={"paired": interval(-0.5, -1.0, 0.0)}),  # above -2
        Candidate(3, "COMPLETE", (0.88, 0.6), attrs={"paired": interval(-2.0, -4.0, 0.5)}),  # straddles -3.2
    ]
    analysis = analyse(cands, ["accuracy", "relative_time"])
    assert set(analysis.front) >= {2, 3}
    assert versus_frontier(analysis.by_number(2), analysis) == "above"
    assert versus_frontier(analysis.by_number(3), analysis) == "undecided"
    lines = frontier_lines(analysis)
    assert lines == ["front (paired 90% intervals): trials 2 above the baseline frontier at their time",
                     "front (paired 90% intervals): trials 3 statistically indistinguishable from the baseline frontier "
                     "(training less does as well)"]  # fmt: skip
    table = format_table(analysis, [2, 3])
    assert "-0.50 [-1.00, +0.00]" in table and "2.00x [1.80, 2.20]" in table


def test_a_study_continued_with_other_seeds_is_refused_in_one_line(study_dir):
    run_study(spec("continued", n_trials=1, baseline_fractions=[]), echo=lambda _: None)
    db = study_dir / "studies" / "continued.db"
    before = len(optuna.load_study(study_name="continued", storage=f"sqlite:///{db}").trials)
    with pytest.raises(UsageError) as e:
        run_study(spec("continued", n_trials=1, baseline_fractions=[], seeds=3), echo=lambda _: None)
    assert "created with seeds 1, not 3" in str(e.value) and "\n" not in str(e.value)
    assert len(optuna.load_study(study_name="continued", storage=f"sqlite:///{db}").trials) == before  # nothing enqueued
