"""``run_study`` as steps: the original exception reaches the caller, ``model=``/``data=`` reach ``fit``,
and feasibility is decided by the analysis from the stored values."""

from __future__ import annotations

import math

import optuna
import pytest
import torch

import wus_tune._study.run as run_module
from wus_tune._study.spec import StudySpec
from wus_tune.pareto import Candidate, analyse, load_analysis, load_candidates
from wus_tune.study import run_study

TINY = {"model": {"name": "mlp", "width": 0.25}, "data": {"name": "digits"}, "epochs": 1, "device": "cpu"}


def tiny(name: str, **extra) -> StudySpec:
    return StudySpec.from_dict({"name": name, "train": TINY, "baseline_fractions": [], **extra})


# ---- the original exception reaches the user ---------------------------------------------------------


def test_an_exception_in_the_run_surfaces_as_itself_after_the_report(study_dir, monkeypatch, one_torch_thread):
    class Broken(RuntimeError):
        pass

    def run_trials(**kw):
        raise Broken("the trial loop broke")

    monkeypatch.setattr(run_module, "run_trials", run_trials)
    lines = []
    with pytest.raises(Broken, match="the trial loop broke"):
        run_study(tiny("broken"), n_trials=1, tracking_uri="none", echo=lines.append)
    assert (study_dir / "studies" / "broken" / "search_space.json").exists()  # the report was still written


def test_a_failing_report_does_not_mask_the_earlier_exception(study_dir, monkeypatch, one_torch_thread):
    def run_trials(**kw):
        raise ValueError("the original error")

    def write_report(**kw):
        raise OSError("disk full")

    monkeypatch.setattr(run_module, "run_trials", run_trials)
    monkeypatch.setattr(run_module, "write_study_report", write_report)
    lines = []
    with pytest.raises(ValueError, match="the original error"):
        run_study(tiny("masked"), n_trials=1, tracking_uri="none", echo=lines.append)
    assert any("report could not be written" in line and "OSError: disk full" in line for line in lines)


def test_a_failing_report_without_an_earlier_exception_is_raised(study_dir, monkeypatch, one_torch_thread):
    def write_report(**kw):
        raise OSError("disk full")

    monkeypatch.setattr(run_module, "write_study_report", write_report)
    with pytest.raises(OSError, match="disk full"):
        run_study(tiny("report-fails"), n_trials=1, tracking_uri="none", echo=None)
    study = optuna.load_study(study_name="report-fails", storage="sqlite:///studies/report-fails.db")
    assert study.trials[0].state.name == "COMPLETE"  # what ran is recorded


# ---- model= and data= ---------------------------------------------------------------------------------


def test_model_and_data_are_passed_to_every_fit(study_dir, one_torch_thread):
    from wus_tune.trainer import fit

    seen = []
    # Real objects: the study builds them once before any trial (a bad model or data is one line then).
    model = lambda shape, k: torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(math.prod(shape), k))  # noqa: E731
    x = torch.randint(0, 256, (60, 1, 8, 8), dtype=torch.uint8)
    data = (x, (x.float().mean((1, 2, 3)) > 127).long())

    def recording_fit(config, *, model=None, data=None, **kw):
        seen.append((model, data))
        return fit(config, model=model, data=data, **kw)

    outcome = run_study(tiny("inputs"), n_trials=2, tracking_uri="none", echo=None, fit=recording_fit,
                        model=model, data=data)  # fmt: skip
    assert [c.state for c in outcome.analysis.candidates] == ["COMPLETE", "COMPLETE"]
    trained = [c for c in outcome.analysis.candidates if not c.attrs.get("reused")]  # a reused trial runs no fit
    assert seen == [(model, data)] * len(trained) and seen
    seen.clear()
    run_study(tiny("inputs-model-only"), n_trials=1, tracking_uri="none", echo=None, fit=recording_fit, model=model)
    assert seen == [(model, None)]


def test_model_and_data_need_one_process(study_dir):
    from wus_tune.errors import UsageError

    with pytest.raises(UsageError, match="model= and data= run in this process only"):
        run_study(tiny("inputs-workers"), n_trials=1, tracking_uri="none", echo=None, model=object(),
                  devices="cpu", workers=2)  # fmt: skip


# ---- feasibility from the stored values ---------------------------------------------------------------


def test_feasibility_is_recomputed_against_the_baseline():
    # trial 1 finished before the baseline: its stored constraint said feasible (there was no baseline)
    cands = [
        Candidate(0, "COMPLETE", (0.50, 10.0), role="search", feasible=True),
        Candidate(1, "COMPLETE", (0.90, 100.0), role="baseline", uses_method=False),
        Candidate(2, "COMPLETE", (0.895, 50.0), role="search"),
        Candidate(3, "FAIL", None),
    ]
    stored = analyse(cands, ["accuracy", "time"])
    assert 0 in stored.front  # without the delta: what was stored
    a = analyse(cands, ["accuracy", "time"], constraint_delta=1.0)
    assert [c.feasible for c in a.candidates] == [False, True, True, True]
    assert a.front == [1, 2] and a.select("fastest-within:1").number == 2
    assert all(c.feasible for c in analyse(cands[:1], ["accuracy", "time"], constraint_delta=1.0).candidates)


def test_a_trial_finishing_before_the_baseline_gets_the_right_feasibility_in_the_report(study_dir):
    """As with ``--devices``: a first-wave trial completes before the baseline, with constraint 0."""
    from optuna.distributions import FloatDistribution

    storage = "sqlite:///early.db"
    study = optuna.create_study(study_name="early", storage=storage, directions=["maximize", "minimize"])
    study.set_user_attr("objectives", ["accuracy", "time"])
    study.set_user_attr("spec", {"constraint_delta": 1.0})
    dist = {"methods.wus.threshold": FloatDistribution(0.001, 0.05, log=True)}
    study.add_trial(optuna.trial.create_trial(values=[0.5, 10.0], params={"methods.wus.threshold": 0.01}, distributions=dist,
                                              user_attrs={"role": "search", "variant": "wus"},
                                              system_attrs={"constraints": [0.0]}))  # fmt: skip
    study.add_trial(optuna.trial.create_trial(values=[0.9, 100.0], user_attrs={"role": "baseline", "variant": "none"},
                                              system_attrs={"constraints": [-0.01]}))  # fmt: skip
    assert all(c.feasible for c in load_candidates(study))  # what Optuna holds
    _, analysis = load_analysis("early", storage)
    assert not analysis.by_number(0).feasible and analysis.front == [1]
