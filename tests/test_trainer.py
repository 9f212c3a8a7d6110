"""The trainer on the embedded digits data: measurements, determinism, WUS accounting, failures."""

from __future__ import annotations

import json
import math

import pytest

from wus_tune import TrainConfig, TrainingDiverged, fit
from wus_tune.config import ScheduleConfig
from wus_tune.schedules import lr_multiplier


def digits_config(**overrides) -> TrainConfig:
    base = TrainConfig.from_dict({
        "model": {"name": "mlp", "hidden": 64},
        "data": {"name": "digits", "val_fraction": 0.2},
        "optim": {"lr": 0.1, "batch_size": 64},
        "epochs": 4,
        "device": "cpu",
    })
    return base.replace(overrides)


def test_fit_reports_measurements_and_learns():
    result = fit(digits_config())
    assert len(result.epochs) == 4
    assert result.val_acc > 0.8  # an MLP reaches ~95% on digits; chance is 10%
    assert result.test_acc is None  # digits has no test split
    assert result.total_steps == 4 * result.epochs[0].steps
    assert result.changed_steps == 0 and result.flops_fraction == 1.0 and set(result.step_kinds) == {"full"}
    assert result.flops_per_step > 0 and result.train_flops == result.total_steps * result.flops_per_step
    assert result.cost_flops > result.train_flops  # plus the final evaluation
    assert result.time_s == pytest.approx(result.train_time_s + result.required_eval_time_s)
    # only the final evaluation is charged to a baseline; the per-epoch curve evaluations are not
    assert result.required_eval_time_s < result.eval_time_s
    assert all(e.val_acc is not None for e in result.epochs)


def test_fit_is_deterministic_for_a_seed(tmp_path):
    a, b = fit(digits_config(seed=3)), fit(digits_config(seed=3))
    c = fit(digits_config(seed=4))
    assert [e.train_loss for e in a.epochs] == [e.train_loss for e in b.epochs]
    assert a.val_acc == b.val_acc
    assert [e.train_loss for e in a.epochs] != [e.train_loss for e in c.epochs]
    path = a.save_json(tmp_path / "result.json")
    saved = json.loads(path.read_text())
    assert saved["config"]["seed"] == 3 and len(saved["epochs"]) == 4
    assert TrainConfig.from_dict(saved["config"]) == digits_config(seed=3)


def test_wus_skips_and_charges_its_evaluations():
    config = digits_config(**{
        "model.name": "vgg11", "model.width": 0.25, "epochs": 6,
        "methods.wus": {}, "methods.wus.threshold": 1.0,  # every window is a plateau: skip as soon as allowed
        "methods.wus.window": 1, "methods.wus.warmup": 1, "methods.wus.skip_length": 2, "methods.wus.bias_scope": "last:1",
        "methods.wus.schedule_window": [0.0, 1.0], "eval_every_epoch": False,
    })
    result = fit(config)
    skipping = [e.extra["wus/skipping"] for e in result.epochs]  # after each epoch's check (the last ends training)
    # checks at the ends of epochs 2 (first allowed) and 5 start windows of 2 epochs: 3-4 and 6
    assert skipping == [0, 1, 1, 0, 1, 0]
    steps = result.epochs[0].steps
    assert [e.steps_by_kind for e in result.epochs] == [{"full": steps}] * 2 + [{"skip:last:1": steps}] * 2 + \
        [{"full": steps}, {"skip:last:1": steps}]  # fmt: skip
    assert result.changed_steps == 3 * steps and result.changed_step_fraction == 0.5
    skip_flops = result.step_kinds["skip:last:1"]["flops_per_step"]
    assert skip_flops < result.flops_per_step
    assert result.flops_fraction == pytest.approx((3 * result.flops_per_step + 3 * skip_flops) / (6 * result.flops_per_step))
    # the validation signal needed an evaluation at every check: all of them are charged
    assert result.required_eval_time_s == pytest.approx(result.eval_time_s)
    assert result.epochs[-1].extra["wus/skip_windows"] == 2


def test_train_acc_signal_needs_no_evaluation():
    config = digits_config(**{"methods.wus": {}, "methods.wus.signal": "train_acc", "methods.wus.threshold": 1.0,
                              "methods.wus.warmup": 1, "methods.wus.window": 1, "eval_every_epoch": False})
    result = fit(config)
    assert result.step_kinds["skip:all"]["steps"] > 0
    assert sum(e.val_acc is not None for e in result.epochs) == 1  # the final evaluation only


def test_step_wise_checks():
    config = digits_config(**{"methods.wus": {}, "methods.wus.signal": "train_acc", "methods.wus.threshold": 1.0,
                              "methods.wus.check_every": 5, "methods.wus.warmup": 1, "methods.wus.window": 1, "methods.wus.skip_length": 1})
    result = fit(config)
    assert 0 < result.step_kinds["skip:all"]["steps"] == result.changed_steps < result.total_steps


def test_the_warm_up_covers_the_evaluation_pass(monkeypatch):
    """Autotuning and allocator growth of the first evaluation must not be charged to WUS (which evaluates at
    every check) more than to the baseline: an untimed evaluation-mode forward at the evaluation batch size
    runs before the first optimizer step."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    import wus_tune.models

    events: list[tuple[str, int]] = []
    build = wus_tune.models.build_model

    def build_and_watch(*args, **kwargs):
        model = build(*args, **kwargs)
        model.register_forward_pre_hook(lambda m, inputs: events.append(("train" if m.training else "eval",
                                                                          len(inputs[0]))))
        return model

    monkeypatch.setattr(wus_tune.models, "build_model", build_and_watch)
    handle = register_optimizer_step_pre_hook(lambda *_: events.append(("step", 0)))
    try:
        fit(digits_config(epochs=1, **{"methods.wus": {}}))
    finally:
        handle.remove()
    before_training = events[: events.index(("step", 0))]
    val_size = round(0.2 * 1797)
    assert ("eval", val_size) in before_training, before_training


def test_flops_follow_the_step_kinds():
    config = digits_config(**{"epochs": 3, "methods.wus": {}, "methods.wus.threshold": 1.0, "methods.wus.warmup": 1,
                              "methods.wus.window": 1, "methods.wus.skip_length": 1, "methods.wus.bias_scope": "last:1",
                              "methods.wus.schedule_window": [0.0, 1.0]})
    result = fit(config)
    kinds = result.step_kinds
    assert set(kinds) == {"full", "skip:last:1"}
    assert kinds["skip:last:1"]["steps"] == result.changed_steps > 0
    assert result.train_flops == sum(k["steps"] * k["flops_per_step"] for k in kinds.values())
    assert kinds["skip:last:1"]["flops_per_step"] < kinds["full"]["flops_per_step"]


def test_divergence_raises():
    config = digits_config(**{"optim.lr": 100.0, "optim.momentum": 0.99, "schedule.name": "constant"})
    with pytest.raises(TrainingDiverged, match="nan|inf"):
        fit(config)


@pytest.mark.parametrize("name", ["constant", "cosine", "step", "onecycle"])
def test_schedules(name):
    sched = ScheduleConfig(name=name, warmup=0.1 if name != "onecycle" else 0.0, final_lr_fraction=0.0)
    values = [lr_multiplier(sched, s, 100) for s in range(100)]
    assert all(0 <= v <= 1 for v in values)
    assert max(values) == pytest.approx(1.0, abs=0.05)
    if name == "step":
        assert values[60] == pytest.approx(0.1) and values[80] == pytest.approx(0.01)
    if name in ("cosine", "onecycle"):
        assert values[-1] < 0.01
    if name != "onecycle":
        assert values[0] == 0.0 and values[5] == pytest.approx(0.5)  # linear warm-up
    assert all(math.isfinite(v) for v in values)


def test_trainer_runs_without_optuna_or_mlflow(tmp_path):
    """The GPU machines have torch only: the trainer and the train CLI must not import the study's stack."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "for name in ('optuna', 'mlflow'):\n"
        "    sys.modules[name] = None  # importing it now raises ImportError\n"
        "from wus_tune.train import main\n"
        f"raise SystemExit(main(['--model', 'mlp', '--dataset', 'digits', '--epochs', '1', '--device', 'cpu',"
        f" '--method', 'wus', '--quiet', '--out', {str(tmp_path / 'run')!r}]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "run" / "model.pt").exists()
