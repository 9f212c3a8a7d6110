"""Honest time: a run's relative time moves with its wall-time ratio to the baseline, whatever the work is.

Each case injects real CPU work (wus_tune.testing) into the trial only, never its baseline, and trains both
in this one process: slow training data (streamed; device-resident with costly augmentation), slow
validation data with val_acc checks, a method whose end_epoch works, a method whose step is slower than its
FLOPs say, the frozen-prefix cache, compilation on the CPU. The slowdowns are large (2-4x), so direction and
rough size must hold on a busy test machine: relative time within 25% of the wall-time ratio. Quiet-machine
figures: benchmarks/time_truth.py (docs/benchmarks.md). About 60 s on 2 cores without the compile case.
"""

from __future__ import annotations

import pytest
import torch

import wus_tune.testing  # noqa: F401  (registers slow_epoch_end and slow_step)
from wus_tune.config import TrainConfig
from wus_tune.trainer import fit

DIGITS = {"model": {"name": "mlp", "width": 1.0}, "device": "cpu", "epochs": 6, "schedule": {"name": "step"},
          "data": {"factory": "wus_tune.testing:slow_digits", "val_fraction": 0.0}}  # fmt: skip


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


def measured_work(result) -> float:
    """The run's work as measured while it ran, on the work clock (CPU seconds of the process and its data
    workers): every step of each kind at its measured seconds per step, the charged evaluations, the one-off
    work. What the prices must explain; unlike wall time it does not move when other jobs share the cores."""
    total = 0.0
    for kind, s in result.work_seconds.items():
        count = result.work_counts.get(kind, s["units"])
        total += s["seconds"] / s["units"] * count if s["units"] else s["seconds"]
    return total


def slowed_ratios(trial: TrainConfig, baseline: TrainConfig, slow: dict, seconds: float, rounds: int = 2) -> tuple[float, float]:
    """(measured-work ratio, relative-time ratio) of ``trial`` with ``slow["seconds"] = seconds`` over the same
    trial with 0: a method's own work slowed by a monkeypatch that reads ``slow``, the two alternated ``rounds``
    times and each priced against ``baseline``."""
    sums = {0.0: [0.0, 0.0], seconds: [0.0, 0.0]}
    for _ in range(rounds):
        for s in sums:
            slow["seconds"] = s
            result = fit(trial, relative_to=baseline)
            sums[s][0] += measured_work(result)
            sums[s][1] += result.relative_time
    return sums[seconds][0] / sums[0.0][0], sums[seconds][1] / sums[0.0][1]


def both(baseline: TrainConfig, trial: TrainConfig, rounds: int = 2) -> tuple[float, float, float, object]:
    """(wall-time ratio trial / baseline, measured-work ratio, relative-time ratio, the trial's last result),
    from ``rounds`` pairs trained alternately, so a load that comes and goes hits both alike."""
    sums = [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    for _ in range(rounds):
        for i, config in enumerate((baseline, trial)):
            result = fit(config, relative_to=baseline)
            for j, value in enumerate((result.time_s, measured_work(result), result.relative_time)):
                sums[i][j] += value
    return (*(t / b for t, b in zip(sums[1], sums[0])), result)


def assert_follows(wall: float, work: float, relative: float, *, at_least: float) -> None:
    """The injected work slowed the trial (by its measured work and in the direction of its wall time), and its
    relative time follows the measured work within 25% (the wall-time figures on a quiet machine:
    benchmarks/time_truth.py)."""
    assert work >= at_least and wall > 1.0, f"the injected work did not slow the trial: work {work:.2f}, wall {wall:.2f}"
    assert relative == pytest.approx(work, rel=0.25), f"relative time ratio {relative:.2f} vs measured work {work:.2f} (wall {wall:.2f})"


def config(**changes) -> TrainConfig:
    return TrainConfig.from_dict(DIGITS).replace(changes)


def test_slow_streamed_training_data_is_charged():
    baseline = config(**{"data.memory_budget_mb": 0, "data.num_workers": 0})
    trial = baseline.replace({"data.kwargs": {"train_ms": 0.02}})
    wall, work, relative, result = both(baseline, trial)
    assert_follows(wall, work, relative, at_least=2.0)
    assert result.coverage > 0.9


def test_slow_streamed_training_data_in_worker_processes_is_charged():
    """The decoding happens in a DataLoader worker process: its CPU time is read from /proc, in 10 ms ticks, and
    the worker competes with the trainer for the cores, so on a shared test machine only the direction and
    the charge are checked here; benchmarks/time_truth.py measures the size on a quiet one."""
    baseline = config(**{"data.memory_budget_mb": 0, "data.num_workers": 1})
    trial = baseline.replace({"data.kwargs": {"train_ms": 0.02}})
    wall, work, relative, result = both(baseline, trial)
    assert result.work_seconds["workers"]["seconds"] > 0  # the decoding happened in the worker process
    assert work > 1.5 and wall > 1.2 and relative > 1.5


def test_costly_augmentation_on_the_device_is_charged():
    images = {"model": {"name": "mlp", "width": 0.05, "depth": 1}, "device": "cpu", "epochs": 4,
              "data": {"factory": "wus_tune.testing:random_images", "kwargs": {"n": 2000}, "val_fraction": 0.0,
                       "augment": False}}  # fmt: skip
    baseline = TrainConfig.from_dict(images)
    wall, work, relative, _ = both(baseline, baseline.replace({"data.augment": True}))
    assert_follows(wall, work, relative, at_least=1.3)


def test_slow_validation_data_under_val_acc_checks_is_charged():
    baseline = config(**{"data.memory_budget_mb": 0, "data.num_workers": 0, "data.kwargs": {"val_ms": 0.0}})
    checks = {"methods.wus": {"threshold": 0.0, "signal": "val_acc"}}  # checks every epoch, never skips
    trial = baseline.replace({"data.kwargs": {"val_ms": 0.05}} | checks)
    wall, work, relative, result = both(baseline, trial)
    assert_follows(wall, work, relative, at_least=2.0)
    assert result.work_counts["eval"] > 0


def test_a_method_whose_end_epoch_works_pays_for_it():
    baseline = config()
    trial = baseline.replace({"methods.slow_epoch_end": {"seconds": 0.02}})
    wall, work, relative, result = both(baseline, trial)
    assert_follows(wall, work, relative, at_least=2.0)
    assert result.work_seconds["one-off:hooks"]["seconds"] >= 6 * 0.02 * 0.9


def test_a_step_slower_than_its_flops_is_priced_as_it_ran():
    baseline = config()
    trial = baseline.replace({"methods.slow_step": {"seconds": 0.002}})  # about 2.5x the step (0.001 s gave 1.7-1.9x)
    wall, work, relative, result = both(baseline, trial)
    assert_follows(wall, work, relative, at_least=2.0)
    assert result.flops_fraction == 1.0  # the same FLOPs: only the measurement sees the extra work


def test_the_frozen_prefix_cache_is_priced_with_its_builds():
    wide = {"model.width": 2.0, "model.depth": 3, "epochs": 6}
    baseline = config(**wide)
    trial = baseline.replace({"methods.wus": {"threshold": 1.0, "window": 1, "warmup": 1, "skip_length": 2,
                                              "bias_scope": "last:1", "signal": "train_acc",
                                              "schedule_window": [0.0, 1.0], "cache_frozen_prefix": True}})  # fmt: skip
    wall, work, relative, result = both(baseline, trial)
    builds = [k for k in result.work_seconds if k.startswith("one-off:build:")]
    assert builds and result.changed_steps > 0  # skip windows ran on a cache, each built once
    assert relative == pytest.approx(work, rel=0.25), (relative, work, wall)


@pytest.mark.slow
def test_compiling_on_the_cpu_is_charged_to_the_run_that_compiles():
    baseline = config(epochs=2)
    trial = baseline.replace({"compile": True})
    wall, work, relative, result = both(baseline, trial)
    assert result.compile_time_s > 0 and result.work_seconds["one-off:compile"]["seconds"] > 0
    assert_follows(wall, work, relative, at_least=2.0)


def test_a_study_that_searches_the_frozen_prefix_cache_runs_to_completion(study_dir):
    """Copying the training state to price a skip step reached the cache's batch iterator, which could not be
    copied: every skipping trial of such a study failed. Now each is priced, its cache builds charged."""
    from wus_tune._study.spec import StudySpec
    from wus_tune.study import run_study

    spec = StudySpec.from_dict({
        "name": "cached", "train": {"model": {"name": "mlp", "width": 1.0, "depth": 3}, "data": {"name": "digits"},
                                    "device": "cpu", "epochs": 6},
        "baseline_fractions": [], "tracking_uri": "none", "n_trials": 5, "sampler_options": {"n_startup_trials": 5},
        "search_space": {"methods.wus.cache_frozen_prefix": {"choices": [True, False]},
                         "methods.wus.bias_scope": {"choices": ["last:1"]}, "methods.wus.threshold": {"low": 0.2, "high": 0.5},
                         "methods.wus.warmup": {"low": 1, "high": 1}, "methods.wus.window": {"low": 1, "high": 1}},
        "enqueue": [{"methods.wus.cache_frozen_prefix": True, "methods.wus.threshold": 0.4}],
    })  # fmt: skip
    outcome = run_study(spec, echo=None)
    states = [c.state for c in outcome.analysis.candidates]
    assert states == ["COMPLETE"] * 5, [(c.number, c.state, c.attrs.get("fail_reason")) for c in outcome.analysis.candidates]
    cached = [c for c in outcome.analysis.candidates if c.config["methods"].get("wus", {}).get("cache_frozen_prefix")
              and c.attrs["result"]["changed_steps"]]  # fmt: skip
    assert cached and all(c.attrs["result"]["relative_time"] > 0 for c in cached)
    assert any(any(kind.endswith("cache-build") for kind in c.attrs["result"]["work_counts"]) for c in cached)
