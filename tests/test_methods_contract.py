"""Every registered method trains through the real trainer, alone and beside WUS, and round-trips its config."""

from __future__ import annotations

import math

import pytest

from wus_tune import TrainConfig, fit
from wus_tune.methods import build_methods, registry

# A model each method can act on: approximate ops leave the first and last layer exact, so they need a
# third layer; Gauss-Newton is defined for two-layer networks.
MODEL_FOR = {"gauss_newton": {"model.depth": 2}}
DEFAULT_MODEL = {"model.depth": 3}


def _config(method: str, **extra) -> TrainConfig:
    return TrainConfig.from_dict({
        "model": {"name": "mlp", "hidden": 32},
        "data": {"name": "digits", "subset": 300, "val_fraction": 0.2},
        "optim": {"lr": 0.05, "batch_size": 100},
        "epochs": 1,
        "device": "cpu",
        "methods": {method: {}},
    }).replace({**DEFAULT_MODEL, **MODEL_FOR.get(method, {}), **extra})


def test_the_four_literature_methods_are_registered():
    assert {"approx_ops", "edge_of_chaos", "lp_sphere", "gauss_newton"} <= set(registry())


@pytest.mark.parametrize("name", sorted(set(registry()) - {"wus"}))
def test_method_trains_two_batches_and_reports_prefixed_metrics(name):
    result = fit(_config(name))
    assert result.total_steps == 2
    assert math.isfinite(result.val_acc) and math.isfinite(result.epochs[-1].train_loss)
    for key, value in result.epochs[-1].extra.items():
        assert key.startswith(f"{name}/"), key
        assert isinstance(value, float)


@pytest.mark.parametrize("name", sorted(set(registry()) - {"gauss_newton", "wus"}))
def test_method_combines_with_wus(name):
    result = fit(_config(name, **{"epochs": 3, "wus.enabled": True, "wus.threshold": 1.0, "wus.warmup": 1,
                                  "wus.window": 1, "wus.schedule_window": [0.0, 1.0]}))
    assert result.skipped_steps > 0


@pytest.mark.parametrize("name", sorted(set(registry()) - {"wus"}))
def test_constructor_round_trips_params(name):
    method = build_methods({name: {}})[0]
    again = type(method)(**method.params)
    assert again.params == method.params
