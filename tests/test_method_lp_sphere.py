"""Sparse training on the unit Lp sphere (wus_tune.methods.lp_sphere): maths, topology, Method hooks."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from wus_tune.errors import ConfigError
from wus_tune.methods import RunInfo, build_methods, registry
from wus_tune.methods.lp_sphere import (
    LpSphere,
    _from_dual,
    adapt_threshold,
    constrained_layers,
    hoyer_sparsity,
    lp_norm,
    lp_sphere_update,
    project_to_lp_sphere,
    prune_and_regrow,
)

PS = (1.3, 1.5, 2.0)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))


def cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4),
    )


def toy_data(n: int = 512):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 20, generator=g)
    y = (x @ torch.randn(20, 4, generator=g)).argmax(1)
    return x, y


def train(model, method, steps, *, x=None, y=None, lr=0.05, config=None, check=None):
    """A hand-written loop calling the hooks in the trainer's order."""
    if x is None:
        x, y = toy_data()
    ctx = RunInfo(config=config, device=torch.device("cpu"), steps_per_epoch=steps, total_steps=steps, batch_size=64)
    model = method.setup(model, ctx)
    opt = method.make_optimizer(model, ctx) or torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        idx = torch.randint(0, len(y), (64,), generator=g)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        method.update(opt, progress=step / steps, total_steps=steps, peak_lr=config.optim.lr if config else None)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if check is not None:
            check(step)
    return model, opt, ctx


# ---- pure functions ----------------------------------------------------------------------------


@pytest.mark.parametrize("p", PS)
def test_projection_gives_unit_lp_rows(p):
    torch.manual_seed(0)
    w = torch.randn(6, 4, 3, 3) * 3
    out = project_to_lp_sphere(w, p)
    assert out.shape == w.shape
    assert torch.allclose(lp_norm(out, p), torch.ones(6), atol=1e-5)
    # direction is kept: a positive multiple of the original row
    assert torch.allclose(out[0] / out[0].abs().max(), w[0] / w[0].abs().max(), atol=1e-6)
    assert torch.allclose(lp_norm(project_to_lp_sphere(torch.zeros(2, 5), p), p), torch.ones(2))


@pytest.mark.parametrize("p", PS)
def test_update_keeps_rows_on_the_unit_sphere_at_every_step(p):
    torch.manual_seed(0)
    w = project_to_lp_sphere(torch.randn(8, 30), p)
    for _ in range(50):
        w = lp_sphere_update(w, torch.randn(8, 30) * 10.0 ** torch.randint(-6, 3, ()).item(), p=p, eta=0.1)
        assert torch.allclose(lp_norm(w, p), torch.ones(8), atol=1e-4)


def test_p2_update_is_normalised_gradient_descent_on_the_l2_sphere():
    torch.manual_seed(0)
    w = project_to_lp_sphere(torch.randn(3, 10), 2.0)
    g = torch.randn(3, 10)
    expected = project_to_lp_sphere(0.9 * w - 0.1 * g / g.norm(dim=1, keepdim=True), 2.0)
    assert torch.allclose(lp_sphere_update(w, g, p=2.0, eta=0.1), expected, atol=1e-6)


def test_update_descends_the_loss():
    # minimise <c, w> on the unit L1.5 sphere: the gradient step must lower it
    torch.manual_seed(0)
    c = torch.randn(1, 40)
    w = project_to_lp_sphere(torch.randn(1, 40), 1.5)
    start = (c * w).sum().item()
    for _ in range(100):
        w = lp_sphere_update(w, c, p=1.5, eta=0.05)
    assert (c * w).sum().item() < start - 0.5


def test_hoyer_sparsity_on_known_vectors():
    assert hoyer_sparsity(torch.tensor([0.0, 0.0, -2.0, 0.0])).item() == pytest.approx(1.0)
    assert hoyer_sparsity(torch.full((9,), 0.3)).item() == pytest.approx(0.0, abs=1e-6)
    # [1, 1, 0, 0]: ||w||_1 / ||w||_2 = sqrt(2), so H = (2 - sqrt(2)) / (2 - 1)
    assert hoyer_sparsity(torch.tensor([1.0, 1.0, 0.0, 0.0])).item() == pytest.approx(2 - math.sqrt(2), rel=1e-6)
    rows = hoyer_sparsity(torch.tensor([[0.0, 5.0, 0.0], [1.0, -1.0, 1.0], [0.0, 0.0, 0.0]]))
    assert rows.tolist() == pytest.approx([1.0, 0.0, 0.0], abs=1e-6)
    conv = hoyer_sparsity(torch.randn(5, 3, 3, 3))
    assert conv.shape == (5,) and ((conv >= 0) & (conv <= 1)).all()


def test_smaller_p_gives_sparser_weights_after_training():
    """The paper's central claim, at toy scale: without any pruning, Hoyer sparsity rises as p falls."""
    hoyer = {}
    for p in (1.2, 2.0):
        method = LpSphere(p=p, prune_every=0, eta=0.05)
        model, _, ctx = train(mlp(), method, 150)
        hoyer[p] = method.end_epoch(model, ctx)["lp_sphere/hoyer"]
    assert hoyer[1.2] > hoyer[2.0] + 0.1


def test_prune_below_threshold_and_keep_each_rows_largest():
    w = torch.tensor([[0.9, 0.05, 0.3, -0.02], [0.25, 0.25, 0.25, 0.25]])
    mask = torch.ones_like(w, dtype=torch.bool)
    new = prune_and_regrow(w, mask, torch.zeros_like(w), h=0.5, regrow_fraction=0.0)
    # row 0: mean |w| = 0.3175, threshold 0.159: 0.05 and 0.02 go; row 1: nothing below 0.125
    assert new.tolist() == [[True, False, True, False], [True, True, True, True]]
    # a threshold above every weight still leaves each row its largest
    new = prune_and_regrow(w, mask, torch.zeros_like(w), h=10.0, regrow_fraction=0.0)
    assert new.sum(1).tolist() == [1, 1] and bool(new[0, 0])


def test_regrowth_by_gradient_magnitude_and_by_latent_magnitude():
    w = torch.tensor([[0.9, 0.01, 0.02, 0.03, 0.5]])
    mask = torch.tensor([[True, False, False, False, True]])
    grad = torch.tensor([[0.0, 5.0, 0.1, 0.2, 0.0]])
    new = prune_and_regrow(w, mask, grad, h=0.1, regrow_fraction=0.34)  # floor(0.34 * 3) = 1 regrown
    assert new.tolist() == [[True, True, False, False, True]]  # the largest gradient comes back
    # a pruned weight whose latent value grew above the threshold returns on its own
    w2 = torch.tensor([[0.9, 0.6, 0.02, 0.03, 0.5]])
    new = prune_and_regrow(w2, mask, torch.zeros_like(w2), h=0.5, regrow_fraction=0.0)
    assert new.tolist() == [[True, True, False, False, True]]


def test_threshold_adaptation_moves_toward_the_target():
    assert adapt_threshold(0.1, sparsity=0.0, target=0.5) == pytest.approx(0.1 * math.e)
    assert adapt_threshold(0.1, sparsity=0.9, target=0.5) < 0.1
    assert adapt_threshold(0.1, sparsity=0.5, target=0.5) == pytest.approx(0.1)
    assert adapt_threshold(1e-9, sparsity=1.0, target=0.0) >= 1e-4  # clamped


# ---- the Method ----------------------------------------------------------------------------------


@pytest.mark.parametrize("p", PS)
def test_rows_stay_on_the_unit_sphere_after_every_step(p):
    method = LpSphere(p=p, prune_every=0, eta=0.05)
    model = mlp()

    def check(step):
        for st in method.constrained:
            # without masks the parameter itself is on the sphere
            assert torch.allclose(lp_norm(st.param.detach(), p), torch.ones(st.param.shape[0]), atol=1e-4), step

    train(model, method, 30, check=check)
    assert [st.name for st in method.constrained] == ["0.weight", "2.weight"]


@pytest.mark.parametrize("p", PS)
def test_latent_rows_stay_on_the_sphere_with_pruning(p):
    method = LpSphere(p=p, prune_every=3, target_sparsity=0.5, eta=0.05)

    def check(step):
        for st in method.constrained:
            latent = _from_dual(st.v, st.p)
            assert torch.allclose(lp_norm(latent, p), torch.ones(latent.shape[0]), atol=1e-4), step
            # the forward's weight is mask * latent: within the unit ball, zero where masked
            assert (lp_norm(st.param.detach(), p) <= 1 + 1e-4).all()
            assert torch.equal(st.param.detach(), latent.reshape(st.param.shape) * st.mask)

    train(mlp(), method, 30, check=check)


def test_sparsity_approaches_the_target():
    target = 0.6
    method = LpSphere(p=1.5, prune_every=5, target_sparsity=target, eta=0.05, evolve_until=1.0)
    history = []
    ctx_end = RunInfo(None, torch.device("cpu"), 1, 1, 1)
    model = mlp()

    def check(step):
        if step % 50 == 49:
            history.append(method.end_epoch(model, ctx_end)["lp_sphere/sparsity"])

    train(model, method, 300, check=check)
    assert history[0] > 0.3  # it sparsified early ...
    assert all(abs(s - target) < 0.08 for s in history[-3:]), history  # ... and settles at the target
    metrics = method.end_epoch(model, ctx_end)
    n_params = sum(p.numel() for p in model.parameters())
    n_masked = sum(int((~st.mask).sum()) for st in method.constrained)
    assert metrics["lp_sphere/params_active"] == n_params - n_masked
    assert metrics["lp_sphere/params_active"] == n_params - sum(int((st.param == 0).sum()) for st in method.constrained)
    assert 0 < metrics["lp_sphere/hoyer"] < 1


def test_sparse_model_still_learns():
    x, y = toy_data()
    method = LpSphere(p=1.5, prune_every=5, target_sparsity=0.5, eta=0.05)
    model, _, _ = train(mlp(), method, 300, x=x, y=y)
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    assert acc > 0.8  # 4 balanced-ish classes: chance is ~0.25
    assert method.sparsity() > 0.4


def test_pruned_weights_are_zero_in_the_forward_and_can_regrow():
    method = LpSphere(p=1.5, prune_every=2, target_sparsity=0.5, eta=0.05, regrow_fraction=0.3)
    masks = []

    def check(step):
        masks.append(torch.cat([st.mask.flatten() for st in method.constrained]).clone())

    model, _, _ = train(mlp(), method, 40, check=check)
    # zero in the forward: the layer computes with mask * latent
    st = method.constrained[0]
    x = torch.randn(3, 20)
    latent = _from_dual(st.v, st.p).reshape(st.param.shape)
    assert torch.allclose(model[0](x), F.linear(x, latent * st.mask, model[0].bias), atol=1e-6)
    assert (st.param[~st.mask] == 0).all() and (~st.mask).any()
    # semi-pruning: the latent value of a pruned weight keeps training (not zero)
    assert (latent[~st.mask] != 0).any()
    # and something pruned at one round is active again later
    regrown = torch.zeros_like(masks[0])
    for before, after in zip(masks, masks[1:]):
        regrown |= ~before & after
    assert regrown.any()


def test_biases_last_layer_and_batchnorm_are_untouched_and_left_to_the_optimizer():
    model = cnn()
    before = copy.deepcopy(model.state_dict())
    method = LpSphere(p=1.5)
    ctx = RunInfo(None, torch.device("cpu"), 1, 1, 1)
    method.setup(model, ctx)
    assert [st.name for st in method.constrained] == ["0.weight", "3.weight", "8.weight"]
    for key, value in model.state_dict().items():
        if key in ("0.weight", "3.weight", "8.weight"):
            assert not torch.equal(value, before[key])
        else:  # biases, BatchNorm, the last Linear
            assert torch.equal(value, before[key]), key
    # one step: constrained weights leave the optimizer (grad None), the rest get their gradients
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    F.cross_entropy(model(torch.randn(4, 3, 6, 6)), torch.tensor([0, 1, 2, 3])).backward()
    method.update(opt, progress=0.0, total_steps=1)
    constrained = {id(st.param) for st in method.constrained}
    for name, p in model.named_parameters():
        assert (p.grad is None) == (id(p) in constrained), name
    last_before = model[10].weight.detach().clone()
    opt.step()
    assert not torch.equal(model[10].weight, last_before)
    assert all(id(p) not in constrained for p in opt.state)  # no SGD momentum / weight decay on them


def test_per_group_p():
    model = cnn()
    method = LpSphere(p={"conv": 1.3})
    method.setup(model, RunInfo(None, torch.device("cpu"), 1, 1, 1))
    assert [(st.name, st.p) for st in method.constrained] == [("0.weight", 1.3), ("3.weight", 1.3)]
    method = LpSphere(p={"conv": 1.3, "linear": 2.0})
    method.setup(cnn(), RunInfo(None, torch.device("cpu"), 1, 1, 1))
    assert [st.p for st in method.constrained] == [1.3, 1.3, 2.0]
    assert [name for name, _ in constrained_layers(cnn())] == ["0", "3", "8"]


def test_a_missing_gradient_means_no_update():
    model = mlp()
    method = LpSphere(p=1.5)
    ctx = RunInfo(None, torch.device("cpu"), 1, 1, 1)
    method.setup(model, ctx)
    w0 = model[0].weight.detach().clone()
    model[0].weight.requires_grad_(False)  # e.g. frozen by weight update skipping
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    F.cross_entropy(model(torch.randn(4, 20)), torch.tensor([0, 1, 2, 3])).backward()
    method.update(opt, progress=0.0, total_steps=1)
    assert torch.equal(model[0].weight, w0)


def test_a_non_finite_gradient_leaves_the_weights_unchanged():
    model = mlp()
    method = LpSphere(p=1.5)
    ctx = RunInfo(None, torch.device("cpu"), 1, 1, 1)
    method.setup(model, ctx)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    w0, w2 = model[0].weight.detach().clone(), model[2].weight.detach().clone()
    F.cross_entropy(model(torch.randn(4, 20)), torch.tensor([0, 1, 2, 3])).backward()
    model[0].weight.grad[0, 0] = float("inf")
    method.update(opt, progress=0.0, total_steps=1)
    assert torch.equal(model[0].weight, w0)
    assert not torch.equal(model[2].weight, w2)  # the other layer, with a finite gradient, moved
    assert torch.isfinite(method.constrained[0].buf).all()  # the momentum was not poisoned


def test_the_accelerator_path_without_host_sync_matches_the_cpu_path(monkeypatch):
    """The ``torch.where`` guard used on GPUs gives the same weights as the CPU ``if`` guard."""
    import wus_tune.methods.lp_sphere as lp

    results = []
    for sync_free in (False, True):
        monkeypatch.setattr(lp, "_sync_free", lambda device, flag=sync_free: flag)
        method = LpSphere(p=1.3, prune_every=3, eta=0.05)
        model, _, _ = train(mlp(), method, 12)
        results.append([st.param.detach().clone() for st in method.constrained])
    for a, b in zip(*results):
        assert torch.allclose(a, b, atol=1e-6)
    # and the guard: a non-finite gradient leaves the weights and the momentum as they were
    model = mlp()
    method = LpSphere(p=1.5)
    ctx = RunInfo(None, torch.device("cpu"), 1, 1, 1)
    method.setup(model, ctx)
    w0 = model[0].weight.detach().clone()
    F.cross_entropy(model(torch.randn(4, 20)), torch.tensor([0, 1, 2, 3])).backward()
    model[0].weight.grad[0, 0] = float("nan")
    method.update(torch.optim.SGD(model.parameters(), lr=0.1))
    assert torch.equal(model[0].weight, w0) and torch.isfinite(method.constrained[0].buf).all()


def test_eta_follows_the_learning_rate_schedule():
    config = SimpleNamespace(optim=SimpleNamespace(lr=0.1))
    model = mlp()
    method = LpSphere(p=1.5, prune_every=0)
    method.setup(model, RunInfo(config, torch.device("cpu"), 1, 1, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    peak = config.optim.lr
    assert method._eta(opt, model[0].weight, peak) == pytest.approx(0.01)
    opt.param_groups[0]["lr"] = 0.025  # the schedule at 25 %
    assert method._eta(opt, model[0].weight, peak) == pytest.approx(0.0025)
    assert LpSphere(p=1.5, follow_schedule=False)._eta(opt, model[0].weight, peak) == pytest.approx(0.01)


@pytest.mark.parametrize("p", [1.0, 0.5, 2.5, -1, True, "1.5", float("nan"), {"conv": 2.5}, {"dense": 1.5}, {}])
def test_p_outside_the_range_raises_value_error(p):
    with pytest.raises(ValueError, match="p"):
        LpSphere(p=p)


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"eta": 0.0}, "eta"),
        ({"eta": 1.0}, "eta"),
        ({"momentum": 1.0}, "momentum"),
        ({"target_sparsity": 1.0}, "target_sparsity"),
        ({"prune_every": -1}, "prune_every"),
        ({"prune_every": 2.5}, "prune_every"),
        ({"h": 0.0}, "h"),
        ({"regrow_fraction": 1.5}, "regrow_fraction"),
        ({"evolve_until": 2.0}, "evolve_until"),
    ],
)
def test_other_bad_arguments_name_the_argument(kwargs, key):
    with pytest.raises(ValueError, match=key):
        LpSphere(**kwargs)


def test_registered_and_validated_through_the_registry():
    assert registry()["lp_sphere"] is LpSphere
    (method,) = build_methods({"lp_sphere": {"p": {"conv": 1.3, "linear": 1.8}, "target_sparsity": 0.7}})
    assert type(method)(**method.params).params == method.params
    with pytest.raises(ConfigError, match="lp_sphere"):
        build_methods({"lp_sphere": {"p": 3.0}})
