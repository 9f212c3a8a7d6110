"""WUS through the trainer with its fast paths: compiled (one graph per mode) and frozen-prefix caching."""

from __future__ import annotations

import warnings

import pytest

from wus_tune import TrainConfig, fit

# skips epochs 3-4 of 5: a window of two epochs (a cache pays off over windows longer than one pass)
_FORCED_SKIPPING = {"signal": "train_acc", "window": 1, "threshold": 1.0, "warmup": 1,
                    "skip_length": 2, "bias_scope": "last:1", "schedule_window": [0.0, 1.0]}


def _config(**overrides) -> TrainConfig:
    base = TrainConfig.from_dict({
        "model": {"name": "mlp", "hidden": 64, "depth": 3},
        "data": {"name": "digits", "val_fraction": 0.2},
        "optim": {"lr": 0.05, "batch_size": 64},
        "methods": {"wus": _FORCED_SKIPPING},
        "epochs": 5,
        "device": "cpu",
        "eval_every_epoch": False,
    })
    return base.replace(overrides)


def test_cached_prefix_windows_train_on_the_cache_and_cost_fewer_flops():
    plain, cached = fit(_config()), fit(_config(**{"methods.wus.cache_frozen_prefix": True}))
    skipped = [e.steps - e.steps_by_kind.get("full", 0) for e in cached.epochs]
    skip_epochs = [i for i, n in enumerate(skipped) if n]
    assert skip_epochs == [2, 3]
    assert [set(e.steps_by_kind) for e in plain.epochs] == [{"full"}] * 2 + [{"skip:last:1"}] * 2 + [{"full"}]
    assert skipped == [e.steps - e.steps_by_kind.get("full", 0) for e in plain.epochs]
    for i in skip_epochs:
        assert cached.epochs[i].extra["wus/cached_steps"] == skipped[i]  # the window's build step included
    assert cached.epochs[-1].extra["wus/cache_builds"] == 1  # one cache per window
    assert 0 < cached.epochs[-1].extra["wus/cache_peak_mb"] < 1
    assert cached.train_flops < plain.train_flops
    assert cached.step_kinds["skip:last:1:cache-build"]["steps"] == 1
    assert cached.step_kinds["skip:last:1:cached"]["steps"] == sum(skipped) - 1
    flops = {kind: k["flops_per_step"] for kind, k in cached.step_kinds.items()}
    assert flops["skip:last:1:cached"] < plain.step_kinds["skip:last:1"]["flops_per_step"]  # the top only
    assert cached.val_acc > 0.5


def test_cache_over_its_cap_falls_back_to_ordinary_skip_steps():
    capped = fit(_config(**{"methods.wus.cache_frozen_prefix": True, "methods.wus.cache_max_mb": 1e-4}))
    plain = fit(_config())
    assert capped.epochs[-1].extra["wus/cache_builds"] == 0
    assert capped.epochs[-1].extra["wus/cache_fallbacks"] >= 1
    assert capped.val_acc == plain.val_acc  # the same training, step for step


@pytest.mark.slow
def test_compiled_wus_on_cpu_reports_compile_time_apart_and_matches_eager():
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the old "compile with WUS" warning is gone
        compiled = fit(_config(compile=True))
    eager = fit(_config())
    assert compiled.compile_time_s > 0 and eager.compile_time_s == 0
    assert compiled.step_kinds.keys() == eager.step_kinds.keys() and compiled.changed_steps == eager.changed_steps > 0
    assert compiled.val_acc == pytest.approx(eager.val_acc, abs=0.02)
    assert compiled.train_flops == eager.train_flops


def test_cache_knob_is_searchable_from_a_spec():
    from wus_tune._study.space import apply_values, param_from_dict

    param = param_from_dict("methods.wus.cache_frozen_prefix", {"type": "categorical", "choices": [False, True]})
    assert param.contains(True) and param.contains(False)
    config = apply_values(_config(), {"method": "wus", "methods.wus.variant": "wus", "methods.wus.cache_frozen_prefix": True})
    assert config.methods["wus"]["cache_frozen_prefix"] is True
    assert "cache_frozen_prefix" not in _config().methods["wus"]  # off by default
