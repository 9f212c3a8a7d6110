"""Configs, specs and command-line spellings of config version 1 (wus_tune 0.1, where WUS had a ``wus:``
section of its own) still load, read as today's with one deprecation line (wus_tune.migration).

The two fixtures are ``best.yaml`` files exported by that release (``python -m wus_tune.pareto --study
quickstart-digits --trial N --out ...``): a WUS+LR trial and a plain one."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from wus_tune import TrainConfig, WUSConfig, fit
from wus_tune._study.spec import StudySpec
from wus_tune.errors import UsageError
from wus_tune.methods import build_methods
from wus_tune.methods.wus.study import WUSStudy

FIXTURES = Path(__file__).parent / "fixtures"
TINY = {"model": {"name": "mlp", "width": 0.25}, "data": {"name": "digits"}, "epochs": 4, "device": "cpu"}
V1_KNOBS = {"signal": "val_acc", "check_every": 0, "window": 2, "threshold": 0.0028710466973367334, "warmup": 1,
            "skip_length": 3, "max_skip_fraction": 1.0, "bias_scope": "all", "train_bn_scale": False,
            "bias_lr_factor": 1.0081501499856318, "lr_decay": 0.9902060658132872,
            "schedule_window": [0.0, 0.8716478646806334], "cache_frozen_prefix": False, "cache_max_mb": 1024.0}  # fmt: skip


def _load(name: str) -> TrainConfig:
    with pytest.warns(FutureWarning, match="config version 1"):
        return TrainConfig.load(FIXTURES / name)


def _short(config: TrainConfig) -> TrainConfig:
    # fewer epochs, a schedule window that lets this WUS skip in them; everything else as loaded
    return config.replace({"epochs": 6, "meta": {}} | ({"methods.wus.threshold": 0.2} if config.methods else {}))


def test_a_version_1_export_with_wus_loads_to_the_same_training():
    old = _load("config-v1-wus.yaml")
    assert old.version == 2 and old.methods == {"wus": V1_KNOBS}
    (wus,) = build_methods(old)
    assert wus.config == WUSConfig(**V1_KNOBS) and wus.config.lr_coupling() == (V1_KNOBS["bias_lr_factor"], V1_KNOBS["lr_decay"])
    assert WUSStudy.label(old.methods["wus"]) == "wus+lr"  # what the study called it
    today = TrainConfig.from_dict({**old.to_dict(), "methods": {"wus": dict(V1_KNOBS)}})  # written as version 2
    assert today == old
    a, b = fit(_short(old)), fit(_short(today))
    assert a.val_acc == b.val_acc and a.step_kinds == b.step_kinds and a.cost_flops == b.cost_flops
    assert a.step_kinds["skip:all"]["steps"] > 0 and a.epochs[-1].extra["wus/skip_windows"] >= 1  # WUS ran, and skipped


def test_a_version_1_plain_export_loads_without_wus(tmp_path):
    old = _load("config-v1-plain.yaml")
    assert old.methods == {} and old.epochs == 15 and old.model.width == 2.0
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        again = TrainConfig.load(old.save(tmp_path / "best.yaml"))  # saved again: version 2, read without a warning
    assert again == old and again.to_dict()["version"] == 2 and "wus" not in again.to_dict()


def test_a_disabled_section_still_names_a_bad_key():
    with pytest.warns(FutureWarning), pytest.raises(UsageError, match="methods.wus.treshold: unknown argument"):
        TrainConfig.from_dict({"wus": {"enabled": False, "treshold": 0.1}})


def test_old_dotted_keys_turn_wus_on_and_off():
    base = TrainConfig.from_dict(TINY)
    with pytest.warns(FutureWarning) as caught:
        on = base.replace({"wus.enabled": True, "wus.threshold": 0.02})
    assert on.methods == {"wus": {"threshold": 0.02}}
    assert [str(w.message) for w in caught] == ["wus.enabled is deprecated; read as a methods.wus entry (--method wus)",
                                                "wus.threshold is deprecated; read as methods.wus.threshold"]
    with pytest.warns(FutureWarning):
        assert on.replace({"wus.enabled": True}).methods == {"wus": {"threshold": 0.02}}  # on stays on, knobs kept
        assert on.replace({"wus.enabled": False}).methods == {}
        assert on.replace({"wus.variant": "none"}).methods == {}
        assert base.replace({"wus.variant": "wus+lr"}).methods == {"wus": {"variant": "wus+lr"}}


def test_the_train_cli_reads_wus_flags_with_one_warning_line(tmp_path, capsys):
    from wus_tune._cli import run_main
    from wus_tune.train import main

    out = tmp_path / "run"
    argv = ["--model", "mlp", "--dataset", "digits", "--epochs", "1", "--device", "cpu", "--wus", "--wus.threshold", "0.02",
            "--out", str(out), "--quiet"]  # fmt: skip
    assert run_main(main, argv) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err and all(line.startswith("warning: ") and "deprecated" in line for line in err), err
    assert TrainConfig.load(out / "config.yaml").methods == {"wus": {"threshold": 0.02}}
    assert run_main(main, ["--dataset", "digits", "--epochs", "1", "--device", "cpu", "--method", "wus",
                           "--out", str(tmp_path / "new"), "--quiet"]) == 0  # fmt: skip
    assert capsys.readouterr().err == ""  # today's spelling: no warning
    assert TrainConfig.load(tmp_path / "new" / "config.yaml").methods == {"wus": {}}


def test_a_version_1_spec_resolves_to_todays():
    old = {"train": {**TINY, "wus": {"enabled": False, "threshold": 0.02, "signal": "train_acc"}},
           "enqueue_wus_default": False,
           "search_space": {"wus.threshold": {"low": 0.005, "high": 0.05},
                            "wus.lr_decay": {"low": 0.5, "high": 1.0, "when": {"wus.variant": ["wus+lr"]}}},
           "enqueue": [{"wus.variant": "none", "epochs": 2}, {"wus.variant": "wus+lr", "wus.window": 3}]}  # fmt: skip
    new = {"train": {**TINY, "methods": {"wus": {"threshold": 0.02, "signal": "train_acc"}}},
           "enqueue_defaults": False,
           "search_space": {"methods.wus.threshold": {"low": 0.005, "high": 0.05},
                            "methods.wus.lr_decay": {"low": 0.5, "high": 1.0, "when": {"methods.wus.variant": ["wus+lr"]}}},
           "enqueue": [{"method": "none", "epochs": 2}, {"methods.wus.variant": "wus+lr", "methods.wus.window": 3}]}  # fmt: skip
    with pytest.warns(FutureWarning) as caught:
        a = StudySpec.from_dict(old, "old.yaml").resolve()
    assert len(caught) >= 5 and all("\n" not in str(w.message) for w in caught)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        b = StudySpec.from_dict(new, "new.yaml").resolve()
    assert a.space == b.space and a.base == b.base and a.enqueue == b.enqueue and a.lead_trials == b.lead_trials == ()
    assert a.spec == {**b.spec}  # stored in today's spelling
    with pytest.warns(FutureWarning), pytest.raises(UsageError, match="'none' is the method choice 'none' now"):
        StudySpec.from_dict({"train": TINY, "search_space": {"wus.variant": {"choices": ["none", "wus"]}}}).resolve()


def test_the_study_cli_reads_set_wus_keys(capsys):
    from wus_tune.study import build_parser, spec_from_args

    args, dotted = build_parser().parse_known_args(["--dataset", "digits", "--set", "wus.threshold=0.02", "--wus.window", "3"])
    args.dotted = dotted
    with pytest.warns(FutureWarning):
        base = spec_from_args(args).resolve().base
    assert base.methods == {"wus": {"threshold": 0.02, "window": 3}}  # WUS's fixed knobs, in the trials that run it
