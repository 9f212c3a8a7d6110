"""A spec sized for a GPU, run on a CPU, says after the baseline's first epoch how long it may take and
how to shrink it (issue 24, item 6); a study that fits in the hour says nothing."""

from __future__ import annotations

import dataclasses

import pytest

from wus_tune._study.objective import SHRINK_HINT, length_line
from wus_tune.study import StudySpec, run_study
from wus_tune.trainer import fit

TINY = {"model": {"name": "mlp", "width": 0.25}, "data": {"name": "digits"}, "epochs": 2, "device": "cpu"}


def test_the_line_bounds_the_study_by_full_length_runs():
    assert length_line(first_epoch_s=10.0, epochs=30, n_trials=10) is None  # 50 minutes in all
    line = length_line(first_epoch_s=60.0, epochs=30, n_trials=20)
    assert line is not None and "one full-length run is about 30 min" in line and "20 trial(s) up to 10.0 h" in line
    assert SHRINK_HINT in line


@pytest.mark.parametrize("epoch_s, said", [(900.0, True), (None, False)])
def test_a_study_says_it_once_after_the_baselines_first_epoch(study_dir, epoch_s, said):
    def slow_on_paper(config, on_epoch=None, **kw):  # the real run, its epochs reported as slow as a VGG's
        def report(record):
            on_epoch(record if epoch_s is None else dataclasses.replace(record, train_time_s=epoch_s))

        return fit(config, on_epoch=report, **kw)

    spec = StudySpec.from_dict({"name": "long", "train": TINY, "baseline_fractions": [], "baseline_repeats": 2})
    lines: list[str] = []
    run_study(spec, n_trials=3, tracking_uri="none", fit=slow_on_paper, echo=lines.append)
    notes = [line for line in lines if line.startswith("note: on this CPU")]
    assert len(notes) == (1 if said else 0), lines
    if said:
        assert "the baseline's first epoch took 900 s" in notes[0] and "3 trial(s) up to 1.5 h" in notes[0]
