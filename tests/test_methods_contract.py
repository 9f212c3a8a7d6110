"""Every registered method (WUS included) trains through the real trainer, alone and beside the methods it
combines with, round-trips its config and declares its study side apart; the contract's errors; a
third-party method found through its entry point."""

from __future__ import annotations

import math
import re
import textwrap
from pathlib import Path

import pytest
import torch

from wus_tune import TrainConfig, fit
from wus_tune.config import ModelConfig
from wus_tune._study.catalog import combinable, declarations
from wus_tune.errors import ConfigError
from wus_tune.methods import Method, build_methods, registry

# the package's methods and installed plug-ins; not wus_tune.testing's probes of the pricing (registered
# when a test module imports it first, and built to do nothing but burn time)
BUILTIN = sorted(n for n, cls in registry().items() if cls.__module__ != "wus_tune.testing")


def _base(**extra) -> TrainConfig:
    return TrainConfig.from_dict({
        "model": {"name": "mlp", "hidden": 32, "depth": 3},
        "data": {"name": "digits", "subset": 300, "val_fraction": 0.2},
        "optim": {"lr": 0.05, "batch_size": 100},
        "epochs": 1,
        "device": "cpu",
    }).replace(extra)


def _config(name: str, **extra) -> TrainConfig:
    """The base config with ``name`` switched on, on the first mlp depth the method accepts."""
    declared = declarations()[name]
    base = _base(**extra)
    for depth in (3, 2):
        model = ModelConfig(name="mlp", hidden=32, depth=depth)
        if declared.check_model(model, base) is None:
            return base.replace({"model.depth": depth, f"methods.{name}": base.methods.get(name, {})})
    raise AssertionError(f"{name}: no mlp depth suits it")


def test_wus_and_the_four_literature_methods_are_registered():
    assert {"wus", "approx_ops", "edge_of_chaos", "lp_sphere", "gauss_newton"} <= set(registry())


@pytest.mark.parametrize("name", BUILTIN)
def test_method_trains_two_batches_and_reports_prefixed_metrics(name):
    config = _config(name)
    assert [type(m).name for m in build_methods(config)] == [name]
    result = fit(config)
    assert result.total_steps == 2
    assert math.isfinite(result.val_acc) and math.isfinite(result.epochs[-1].train_loss)
    assert result.epochs[-1].extra, f"{name} reports no metric"
    for key, value in result.epochs[-1].extra.items():
        assert key.startswith(f"{name}/"), key
        assert isinstance(value, float)
    assert result.train_flops > 0 and sum(k["steps"] for k in result.step_kinds.values()) == 2


@pytest.mark.parametrize("name", [n for n in BUILTIN if n != "wus" and combinable(n, "wus")])
def test_method_combines_with_wus(name):
    result = fit(_config(name, **{"epochs": 3, "methods.wus": {"threshold": 1.0, "warmup": 1, "window": 1,
                                                               "schedule_window": [0.0, 1.0]}}))  # fmt: skip
    skips = [k for k in result.step_kinds if "skip:all" in k.split("+")]
    assert skips and sum(result.step_kinds[k]["steps"] for k in skips) > 0


@pytest.mark.parametrize("name", BUILTIN)
def test_constructor_round_trips_params(name):
    (method,) = build_methods(_config(name))
    again = type(method)(**method.params)
    assert again.params == method.params


@pytest.mark.parametrize("name", BUILTIN)
def test_study_data_is_declared_apart_and_well_formed(name):
    cls = registry()[name]
    declared = declarations()[name]
    assert declared.method is cls and cls.study is not None and declared.__module__ != "wus_tune.methods"
    assert not {"search_space", "default_trials", "check_model", "replay_baseline"} & set(vars(cls))  # training only
    for key, param in declared.search_space().items():
        assert param["type"] in ("float", "int", "categorical"), key
        assert param.get("doc"), f"{key} has no doc"
    base = _config(name)
    for trial in declared.default_trials():
        base.replace(trial)  # a default trial is a valid config


def test_the_training_contract_is_a_dozen_hooks():
    hooks = [k for k, v in vars(Method).items() if callable(v) and not k.startswith("_")]
    assert hooks == ["setup", "make_optimizer", "attach", "check_plan", "on_check", "warm_up_modes", "lr_factors",
                     "epoch_samples", "step_kind", "owns_step", "train_step", "before_step", "after_step", "end_epoch", "state_dict",
                     "load_state_dict"]  # fmt: skip


def test_gauss_newton_owns_its_step_and_its_solve_is_counted():
    """The GN step runs no backward, and its FLOPs are those of the real step: the solve included."""
    result = fit(_config("gauss_newton"))
    val_size, batch = 60, 100
    forward = (result.cost_flops - result.train_flops) / val_size * batch  # one forward at the batch size
    assert result.flops_per_step > 2 * forward  # a forward plus the Gauss-Newton solve


class _Owner(Method):
    name = "test_owner"

    def train_step(self, step):
        return None


class _Builder(Method):
    name = "test_builder"

    def make_optimizer(self, model, run):
        return torch.optim.SGD(model.parameters(), lr=0.1)


def test_two_methods_owning_the_step_or_the_optimizer_is_a_config_error(monkeypatch):
    from wus_tune import methods as methods_module

    for cls in (_Owner, _Builder):
        monkeypatch.setitem(methods_module._REGISTRY, cls.name, cls)
    with pytest.raises(ConfigError, match="gauss_newton and test_builder both build the optimizer"):
        fit(_config("gauss_newton").replace({"methods.test_builder": {}}))
    with pytest.raises(ConfigError, match="gauss_newton and test_owner both own the training step"):
        fit(_config("gauss_newton").replace({"methods.test_owner": {}}))


PLUGIN = '''
from wus_tune.layers import weighted_layers
from wus_tune.methods import Method
from wus_tune.methods.study import MethodStudy


class FreezeFirst(Method):
    """Freeze the first layer after a fraction of training."""

    name = "freeze_first"
    study = "freeze_first_plugin:FreezeFirstStudy"

    def __init__(self, *, at=0.5):
        super().__init__(at=at)
        self.frozen = False

    def step_kind(self):
        return "first_frozen" if self.frozen else ""

    def after_step(self, step):
        if not self.frozen and (step.step + 1) / step.run.total_steps >= self.params["at"]:
            first = weighted_layers(step.model)[0][1]
            for p in first.parameters():
                p.requires_grad_(False)
            self.frozen = True

    def end_epoch(self, model, run):
        return {"freeze_first/frozen": float(self.frozen)}


class FreezeFirstStudy(MethodStudy):
    method = FreezeFirst
    combines_with = ("wus",)
    SEARCH_SPACE = {"methods.freeze_first.at": {"type": "float", "low": 0.3, "high": 0.7, "doc": "when to freeze"}}
    DEFAULT_TRIAL = {"at": 0.4}
'''


def write_plugin(root) -> None:
    """A throw-away installed package: its module and a dist-info with the entry point, on ``root``."""
    (root / "freeze_first_plugin.py").write_text(textwrap.dedent(PLUGIN))
    info = root / "freeze_first_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: freeze-first-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[wus_tune.methods]\nfreeze_first = freeze_first_plugin:FreezeFirst\n")


def test_a_method_from_an_installed_package_trains_through_its_entry_point(tmp_path, monkeypatch):
    from importlib.metadata import entry_points

    write_plugin(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "freeze_first" in {ep.name for ep in entry_points(group="wus_tune.methods")}
    config = _base(epochs=4).replace({"methods.freeze_first": {"at": 0.5}})
    result = fit(config)
    first = result.model[1]  # Flatten, then the first Linear
    assert not first.weight.requires_grad and not first.bias.requires_grad
    kinds = result.step_kinds
    assert kinds["full"]["steps"] == kinds["first_frozen"]["steps"] == result.total_steps // 2
    assert kinds["first_frozen"]["flops_per_step"] < kinds["full"]["flops_per_step"]  # no weight gradient there
    assert result.epochs[-1].extra == {"freeze_first/frozen": 1.0}
    assert declarations()["freeze_first"].search_space()["methods.freeze_first.at"]["high"] == 0.7
    assert declarations()["freeze_first"].default_trials() == [{"methods.freeze_first.at": 0.4}]
    assert combinable("wus", "freeze_first")


def test_the_example_of_adding_a_method_md_is_this_plugin():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "methods" / "adding_a_method.md").read_text()
    code = re.search(r"```python\n(.*?)```", doc, flags=re.S).group(1)

    def lines(text):
        return [line.split("  #")[0].rstrip() for line in text.strip().splitlines() if line.strip()]

    assert lines(code) == lines(textwrap.dedent(PLUGIN))
