"""Baseline reuse through a method's study declaration: a plug-in that is plain training until a known
fraction of training opts in with the hooks alone (that no study code names a method: tests/test_imports.py).

A tiny digits MLP (width 0.25, 4 epochs of 12 steps); about 20 s on 2 cores."""

from __future__ import annotations

import pytest
import torch

from wus_tune import methods as methods_module
from wus_tune._study import reuse
from wus_tune._study.spec import StudySpec
from wus_tune.config import TrainConfig
from wus_tune.methods import Method
from wus_tune.methods.study import BaselineRecording, Deviation, MethodStudy
from wus_tune.study import run_study
from wus_tune.trainer import fit

TINY = {"model": {"name": "mlp", "width": 0.25}, "data": {"name": "digits"}, "device": "cpu", "epochs": 4,
        "schedule": {"name": "step"}}  # fmt: skip
START = "methods.late_lr.start"


class LateLR(Method):
    """Multiplies the learning rate by ``factor`` from the fraction ``start`` of training on: until then a
    trial is the plain run step for step, so the baseline's epoch-end probes predict it."""

    name = "late_lr"
    study = f"{__name__}:LateLRStudy"

    def __init__(self, *, start: float = 0.5, factor: float = 0.1) -> None:
        super().__init__(start=start, factor=factor)
        self.start, self.factor = start, factor
        self.steps = self.scaled = 0  # steps done, of which at the lower LR

    def lr_factors(self, optimizer, run):
        late = self.steps / run.total_steps >= self.start  # the coming step's progress, as StepContext has it
        return [self.factor if late else 1.0] * len(optimizer.param_groups)

    def after_step(self, step):
        self.scaled += step.progress >= self.start
        self.steps += 1

    def end_epoch(self, model, run):
        return {"late_lr/scaled_steps": float(self.scaled)}

    def state_dict(self):
        return {"steps": self.steps, "scaled": self.scaled}

    def load_state_dict(self, state):
        self.steps, self.scaled = int(state["steps"]), int(state["scaled"])


class LateLRStudy(MethodStudy):
    """LateLR in a study: its trials are predicted from the baseline's epoch-end probes."""

    method = LateLR
    SEARCH_SPACE = {START: {"type": "float", "low": 0.3, "high": 1.5, "doc": "fraction of training before the LR drops"}}

    @classmethod
    def baseline_recording(cls, config):
        return BaselineRecording(every_steps=0, val_acc=False)

    @classmethod
    def deviation_checks(cls, space, base, progress):
        low, high = (space[START].low, space[START].high) if START in space else (0.5, 0.5)
        # a trial starting at s is plain through the last probe at or before s
        return [k for k in range(1, len(progress)) if progress[k - 1] <= high and progress[k] > low]

    @classmethod
    def replay_baseline(cls, config, probes):
        start = cls.from_config(config).start
        plain = [p for p in probes if p["progress"] <= start]
        return Deviation(check=len(plain) if len(plain) < len(probes) else None,
                         states=[{"steps": p["step"], "scaled": 0} for p in plain],
                         metrics=[{"late_lr/scaled_steps": 0.0}] * len(plain))  # fmt: skip


@pytest.fixture(autouse=True)
def _late_lr_registered(monkeypatch, one_torch_thread):
    monkeypatch.setitem(methods_module._REGISTRY, LateLR.name, LateLR)
    yield


class RecordingFit:
    """``fit``, keeping each trial's result and whether it was forked."""

    def __init__(self):
        self.results: dict[int, object] = {}
        self.resumed: dict[int, bool] = {}

    def __call__(self, config, **kw):
        result = fit(config, **kw)
        self.results[config.meta["trial"]] = result
        self.resumed[config.meta["trial"]] = kw.get("resume_from") is not None
        return result


def test_a_plugin_method_is_reused_and_forked_through_the_hooks(study_dir):
    counting = RecordingFit()
    spec = StudySpec.from_dict({
        "name": "late", "train": TINY, "methods": ["none", "late_lr"], "baseline_fractions": [], "tracking_uri": "none",
        "enqueue": [{"method": "late_lr", START: 1.2},  # after the end of training: the baseline itself
                    {"method": "late_lr", START: 1.0},  # the last step's progress is below 1: never deviates either
                    {"method": "late_lr", START: 0.8}],  # plain through probe 3 (0.75)
        "n_trials": 5, "sampler_options": {"n_startup_trials": 5},
    })  # fmt: skip
    outcome = run_study(spec, fit=counting, echo=(lines := []).append)
    by = {c.number: c for c in outcome.analysis.candidates}
    assert [by[n].role for n in range(5)] == ["baseline", "method-default", "enqueued", "enqueued", "enqueued"]
    assert by[0].attrs["reuse_checkpoints"]["points"] == [1, 2, 3]  # start 0.3..1.5 over probes 0.25 .. 1.0
    for n in (2, 3):  # not trained: the baseline's values
        assert by[n].attrs["reused"] == "baseline" and n not in counting.results
        assert by[n].values == by[0].values and by[n].state == "COMPLETE"
    assert by[1].attrs["forked"]["point"] == 2 and by[4].attrs["forked"]["point"] == 3
    assert counting.resumed == {0: False, 1: True, 4: True}
    assert any(line.startswith("reuse: 2 trials equal to the baseline") for line in lines)
    for n in (1, 4):  # forked == trained from scratch, bit for bit on the CPU
        forked = counting.results[n]
        scratch = fit(TrainConfig.from_dict(by[n].attrs["config"]))
        a, z = scratch.model.state_dict(), forked.model.state_dict()
        assert a.keys() == z.keys() and all(torch.equal(a[k], z[k]) for k in a)
        for name in ("val_acc", "val_loss", "test_acc", "train_flops", "cost_flops", "total_steps"):
            assert getattr(scratch, name) == getattr(forked, name), (n, name)
        for e1, e2 in zip(scratch.epochs, forked.epochs, strict=True):
            for name in ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "flops"):
                assert getattr(e1, name) == getattr(e2, name), (n, e1.epoch, name)
            assert e1.extra == e2.extra, (n, e1.epoch)  # the prefix's metrics come from replay_baseline
        assert forked.epochs[-1].extra["late_lr/scaled_steps"] > 0  # it did deviate


def _with(**overrides) -> dict:
    return TrainConfig.from_dict(TINY).replace(overrides).to_dict()


def test_a_trial_with_a_method_the_baseline_cannot_predict_trains_from_scratch():
    base = _with()
    assert reuse.fork_blocker(_with(**{"methods.late_lr": {"start": 0.7}}), base) is None
    # beside an unpredictable method (as today: that method's section differs from the baseline's)
    beside = reuse.fork_blocker(_with(**{"methods.late_lr": {}, "methods.approx_ops": {}}), base)
    assert beside == "methods.approx_ops differ from the baseline's (needs a baseline run of its own)"
    # two predictable methods: reuse predicts one at a time
    both = reuse.fork_blocker(_with(**{"methods.late_lr": {}, "methods.wus": {}}), base)
    assert both is not None and "late_lr and wus both deviate from the baseline" in both
    # a method without the hooks: nothing to predict
    assert reuse.predictable_methods(TrainConfig.from_dict(_with(**{"methods.approx_ops": {}}))) == []
    assert "no method of this trial can be predicted" in reuse.fork_blocker(_with(**{"methods.approx_ops": {}}), base)


def test_probes_at_another_cadence_than_the_method_asks_are_not_replayed():
    epoch_ends = [{"step": 12 * (i + 1), "progress": (i + 1) / 4, "val_acc": None, "train_acc": 0.5} for i in range(4)]
    assert reuse.unlike_recording(epoch_ends, BaselineRecording(every_steps=0, val_acc=False), 4) is None
    assert "every 5 steps" in reuse.unlike_recording(epoch_ends, BaselineRecording(every_steps=5, val_acc=False), 4)
    assert reuse.unlike_recording(epoch_ends, BaselineRecording(every_steps=0, val_acc=True), 4) == \
        "the baseline recorded no val_acc signal"  # fmt: skip
