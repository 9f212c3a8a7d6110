"""One compiled graph per training mode: skip steps under torch.compile behave as eager ones."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from wus_tune.compile_step import ModeCompiled, dynamo_graph_count
from wus_tune import WUSConfig
from wus_tune.methods.wus.rule import WUSController, param_groups


def _tiny() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Flatten(), nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 3))


def _setup(backend: str | None):
    model = _tiny()
    opt = torch.optim.SGD(param_groups(model, weight_decay=5e-4), lr=0.1, momentum=0.9)
    cfg = WUSConfig(window=1, threshold=0.05, warmup=0, skip_length=100, bias_scope="last:1")
    ctl = WUSController(model, opt, cfg)
    loss_fn = nn.CrossEntropyLoss()
    forward = model if backend is None else ModeCompiled(model, backend=backend)

    def step_loss(x, y):
        return loss_fn(forward(x), y), forward

    step_loss.forward = forward
    return model, opt, ctl, step_loss


def _train(model, opt, step_loss, batches):
    grads = []
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        loss, _ = step_loss(x, y)
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
        opt.step()
    return grads


def _batches(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 1, 4, 4, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(n)]


def _check_skip_window_matches_eager(backend: str) -> None:
    eager_model, eager_opt, eager_ctl, eager_step = _setup(None)
    model, opt, ctl, step_loss = _setup(backend)
    for m, o, c, s in ((eager_model, eager_opt, eager_ctl, eager_step), (model, opt, ctl, step_loss)):
        _train(m, o, s, _batches(2, 0))  # full steps
        c.observe(0.5)
        assert c.observe(0.5)  # a skip window starts
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert "0.weight" in frozen and "6.bias" not in frozen
    before = copy.deepcopy(model.state_dict())
    grads = _train(model, opt, step_loss, _batches(3, 1))
    _train(eager_model, eager_opt, eager_step, _batches(3, 1))
    after = model.state_dict()
    for name in frozen:
        assert all(g[name] is None for g in grads), f"{name} got a gradient in a compiled skip step"
        assert torch.equal(before[name], after[name]), f"{name} moved in a compiled skip window"
    assert not torch.equal(before["6.bias"], after["6.bias"]), "the head's bias must keep training"
    for name, value in eager_model.state_dict().items():
        torch.testing.assert_close(after[name], value, rtol=1e-5, atol=1e-6, msg=f"{name} differs from eager")
    # full updates resume: every weight moves again, still as eager
    for c in (ctl, eager_ctl):
        c._set_skipping(False)
    _train(model, opt, step_loss, _batches(2, 2))
    _train(eager_model, eager_opt, eager_step, _batches(2, 2))
    assert not torch.equal(before["0.weight"], model.state_dict()["0.weight"])
    for name, value in eager_model.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value, rtol=1e-5, atol=1e-6)


def test_compiled_skip_steps_freeze_weights_train_biases_and_match_eager():
    _check_skip_window_matches_eager("aot_eager")


@pytest.mark.slow
def test_inductor_skip_steps_match_eager():
    _check_skip_window_matches_eager("inductor")


def test_switching_modes_reuses_one_graph_per_mode():
    model, opt, ctl, step_loss = _setup("aot_eager")
    batches = _batches(1, 0)
    _train(model, opt, step_loss, batches)
    ctl._set_skipping(True)
    _train(model, opt, step_loss, batches)
    ctl._set_skipping(False)
    assert step_loss.forward.compilations == 2
    graphs = dynamo_graph_count()
    with torch.compiler.set_stance("fail_on_recompile"):  # raises if a switch recompiles
        for skipping in (True, False) * 4:
            ctl._set_skipping(skipping)
            _train(model, opt, step_loss, batches)
    assert dynamo_graph_count() == graphs
    assert step_loss.forward.compilations == 2

