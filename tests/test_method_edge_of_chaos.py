"""Edge of chaos: order parameters, the effective ratio, the guideline and the measuring method."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from wus_tune.methods import RunInfo, StepContext, build_methods, registry
from wus_tune.methods.edge_of_chaos import (
    EdgeOfChaos,
    balancing_weight_decay,
    effective_ratio,
    epochs_to_edge,
    fit_growth_law,
    fit_growth_rate,
    guideline_configs,
    j2_slope,
    lr_for_ratio,
    model_order_parameters,
    narrowed_weight_decay_range,
    order_parameters,
    order_summary,
)


@pytest.mark.parametrize("s", [0.5, 1.0, 2.0])
def test_gaussian_init_gives_j_equal_to_its_scale(s):
    g = torch.Generator().manual_seed(0)
    n_in = 400
    w = torch.randn(300, n_in, generator=g) * s / math.sqrt(n_in)
    j, j0 = order_parameters(w)
    assert j == pytest.approx(s, rel=0.01)
    assert abs(j0) < 5 * s / math.sqrt(300)  # J0 = N * mean(W) has std s / sqrt(out) for a zero-mean W


def test_j0_of_a_shifted_matrix_and_conv_fan_in():
    n_in = 50
    w = torch.full((20, n_in), 0.04)  # constant: std 0, mean 0.04
    j, j0 = order_parameters(w)
    assert j == pytest.approx(0.0, abs=1e-9)
    assert j0 == pytest.approx(0.04 * n_in)
    # Conv2d: N = in_channels * kh * kw
    g = torch.Generator().manual_seed(1)
    conv_w = torch.randn(64, 8, 3, 3, generator=g) * 1.5 / math.sqrt(8 * 9)
    assert order_parameters(conv_w)[0] == pytest.approx(1.5, rel=0.03)
    with pytest.raises(ValueError, match="2 dims"):
        order_parameters(torch.ones(5))


def test_model_order_parameters_and_summary():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    layers = model_order_parameters(model)
    assert list(layers) == ["0", "3"]
    # PyTorch's default init is U(-1/sqrt(N), 1/sqrt(N)): J = 1/sqrt(3)
    for j, _ in layers.values():
        assert j == pytest.approx(1 / math.sqrt(3), rel=0.1)
    s = order_summary({"a": (0.5, 0.1), "b": (1.5, -0.3)})
    assert s["J_mean"] == pytest.approx(1.0)
    assert s["J_max"] == pytest.approx(1.5)
    assert s["J2_mean"] == pytest.approx((0.25 + 2.25) / 2)
    assert s["J0_mean"] == pytest.approx(-0.1)
    assert s["chaotic_fraction"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="no layers"):
        order_summary({})


def test_effective_ratio_round_trip_and_validation():
    g = effective_ratio(0.1, 0.9, 128)
    assert g == pytest.approx(0.1 / (0.1 * 128))
    for mu in (0.0, 0.5, 0.9, 0.99):
        for bs in (1, 32, 512):
            assert lr_for_ratio(effective_ratio(0.03, mu, bs), mu, bs) == pytest.approx(0.03)
    with pytest.raises(ValueError, match="momentum"):
        effective_ratio(0.1, 1.0, 32)
    with pytest.raises(ValueError, match="batch_size"):
        lr_for_ratio(1e-3, 0.9, 0)
    with pytest.raises(ValueError, match="lr"):
        effective_ratio(0.0, 0.9, 32)


def test_growth_fits():
    # J^2 = 0.3 + c g t exactly
    c, g = 40.0, 2e-3
    curve = [0.3 + c * g * t for t in range(8)]
    assert j2_slope(curve) == pytest.approx(c * g)
    assert fit_growth_rate(curve, g) == pytest.approx(c)
    ratios = [1e-3, 2e-3, 4e-3]
    curves = [[0.3 + c * r * t for t in range(6)] for r in ratios]
    assert fit_growth_rate(curves, ratios) == pytest.approx(c)
    c_fit, p = fit_growth_law([5 * r**0.5 for r in ratios], ratios)
    assert (c_fit, p) == (pytest.approx(5.0), pytest.approx(0.5))
    assert epochs_to_edge(g, growth_rate=c, j_init=0.5) == pytest.approx((1 - 0.25) / (c * g))


def test_balancing_decay_is_the_fixed_point_of_the_growth_model():
    c, n = 20.0, 1600
    for g in (1e-3, 5e-3):
        lam = balancing_weight_decay(g, growth_rate=c, n_train=n)
        assert lam > 0
        # dJ^2/dt = g (c - 2 n lam J^2) vanishes at J = 1
        assert g * (c - 2 * n * lam * 1.0) == pytest.approx(0.0, abs=1e-12)
    # the linear law makes it ratio-free; a sublinear law (p < 1) asks less decay at a larger ratio
    assert balancing_weight_decay(1e-3, growth_rate=c, n_train=n) == pytest.approx(
        balancing_weight_decay(1e-2, growth_rate=c, n_train=n)
    )
    assert balancing_weight_decay(1e-2, growth_rate=c, n_train=n, exponent=0.5) < balancing_weight_decay(
        1e-3, growth_rate=c, n_train=n, exponent=0.5
    )
    lo, hi = narrowed_weight_decay_range(1e-3, growth_rate=c, n_train=n)
    assert lo < balancing_weight_decay(1e-3, growth_rate=c, n_train=n) < hi
    with pytest.raises(ValueError, match="growth_rate"):
        balancing_weight_decay(1e-3, growth_rate=-1.0, n_train=n)


def test_guideline_configs_have_the_asked_ratio():
    base = {"epochs": 10, "model.name": "mlp"}
    ratios = [1e-3, 4e-3]
    cfgs = guideline_configs(
        base, ratios=ratios, momentum=[0.9, 0.8], batch_sizes=[32, 128], growth_rate=20.0, n_train=1600
    )
    assert len(cfgs) == 2 * 2 * 2
    got = sorted({round(effective_ratio(c["optim.lr"], c["optim.momentum"], c["optim.batch_size"]), 12) for c in cfgs})
    assert got == pytest.approx(ratios)
    for c in cfgs:
        assert c["epochs"] == 10 and c["model.name"] == "mlp"
        assert c["optim.weight_decay"] == pytest.approx(20.0 / (2 * 1600))
    # out-of-range learning rates are left out
    assert guideline_configs({}, ratios=[1.0], momentum=0.0, batch_sizes=[64], growth_rate=1.0, n_train=10**4) == []


def test_guideline_configs_are_valid_train_config_overrides():
    pytest.importorskip("yaml")
    from wus_tune.config import TrainConfig

    cfgs = guideline_configs({}, ratios=[2e-3], momentum=0.9, batch_sizes=[64], growth_rate=20.0, n_train=1600)
    cfg = TrainConfig().replace(cfgs[0])
    assert cfg.optim.batch_size == 64 and cfg.optim.weight_decay == pytest.approx(20.0 / 3200)


def _ctx(steps_per_epoch: int, batch: int) -> RunInfo:
    return RunInfo(config=None, device=torch.device("cpu"), steps_per_epoch=steps_per_epoch,
                   total_steps=10 * steps_per_epoch, batch_size=batch)


def _after_step(method, model, opt, run):
    x = torch.zeros(run.batch_size, 4)
    method.after_step(StepContext(run=run, model=model, optimizer=opt, inputs=x, targets=x[:, 0].long(), step=0,
                                  epoch=0, forward=model, loss_fn=nn.functional.cross_entropy))


def test_method_is_registered_and_measures_without_changing_weights():
    assert registry()["edge_of_chaos"] is EdgeOfChaos
    (method,) = build_methods({"edge_of_chaos": {"log_layers": True}})
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ctx = _ctx(steps_per_epoch=2, batch=8)
    model = method.setup(model, ctx)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(2):
        _after_step(method, model, opt, ctx)  # no optimizer.step: the weights must stay put
    metrics = method.end_epoch(model, ctx)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for key in ("J_mean", "J_max", "J0_mean", "chaotic_fraction", "ratio", "growth_rate"):
        assert math.isfinite(metrics[f"edge_of_chaos/{key}"]), key
    assert "edge_of_chaos/J/0" in metrics and "edge_of_chaos/J0/2" in metrics
    assert metrics["edge_of_chaos/ratio"] == pytest.approx(effective_ratio(0.1, 0.9, 8))
    assert metrics["edge_of_chaos/growth_rate"] == pytest.approx(0.0, abs=1e-9)  # nothing moved


def test_method_growth_rate_recovers_decay_only_shrinkage():
    # pure weight decay (zero gradients): J^2 shrinks by 2 n g lambda J^2 per epoch, growth c ~ 0
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64))
    method = EdgeOfChaos()
    steps, batch, lam = 5, 10, 1e-3
    ctx = _ctx(steps_per_epoch=steps, batch=batch)
    method.setup(model, ctx)
    j2_start = order_summary(model_order_parameters(model))["J2_mean"]
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.0, weight_decay=lam)
    for _ in range(steps):
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
        _after_step(method, model, opt, ctx)
    metrics = method.end_epoch(model, ctx)
    j2 = metrics["edge_of_chaos/J2_mean"]
    assert j2 < j2_start
    assert abs(metrics["edge_of_chaos/growth_rate"]) < 0.05 * (2 * steps * batch * lam * j2)  # first order
    with pytest.raises(Exception, match="j_target"):
        build_methods({"edge_of_chaos": {"j_target": -1}})
