"""The WUS rule on scripted accuracy sequences, and what a skip step does to a real model."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from wus_tune import WUSConfig
from wus_tune.errors import ConfigError
from wus_tune.methods.wus.rule import (
    WUSController,
    accuracy_variation,
    layer_groups,
    param_groups,
    should_skip,
    skip_frozen_parameters,
)


def test_variation_is_the_range_of_the_last_window_plus_one():
    assert accuracy_variation([0.1, 0.5, 0.52, 0.51], window=2) == pytest.approx(0.02)
    assert accuracy_variation([0.1, 0.5, 0.52, 0.51], window=3) == pytest.approx(0.42)
    assert accuracy_variation([0.5, 0.6], window=2) is None
    with pytest.raises(ValueError):
        accuracy_variation([0.5], window=0)


def test_should_skip_on_plateau_only():
    rising = [0.1, 0.2, 0.3, 0.4]
    plateau = [0.1, 0.2, 0.600, 0.605, 0.602]
    assert not should_skip(rising, window=2, threshold=0.01)
    assert should_skip(plateau, window=2, threshold=0.01)
    assert not should_skip(plateau, window=3, threshold=0.01)  # the window reaches back to 0.2
    # a drop is variation too: a noisy plateau is not a plateau at this threshold
    assert not should_skip([0.6, 0.62, 0.58], window=2, threshold=0.01)


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.fc1 = nn.Linear(4 * 4 * 4, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def _controller(cfg: WUSConfig, **kw) -> tuple[_Tiny, torch.optim.Optimizer, WUSController]:
    torch.manual_seed(0)
    model = _Tiny()
    opt = torch.optim.SGD(param_groups(model, weight_decay=5e-4), lr=0.1, momentum=0.9)
    return model, opt, WUSController(model, opt, cfg, **kw)


def _run(controller: WUSController, accuracies, total=None):
    modes = []
    for i, acc in enumerate(accuracies):
        progress = None if total is None else (i + 1) / total
        modes.append(controller.observe(acc, progress))
    return modes


def test_transitions_warmup_window_length_and_fresh_history():
    cfg = WUSConfig(window=2, threshold=0.01, warmup=3, skip_length=2, schedule_window=[0.0, 1.0])
    _, _, ctl = _controller(cfg)
    # flat from the start, but no skipping during the 3 warm-up checks
    modes = _run(ctl, [0.5, 0.5, 0.5, 0.5, 0.7, 0.7, 0.702, 0.704, 0.704, 0.704])
    #            check: 1     2     3     4 skip 5(in) 6 end  7     8 skip 9     10 end
    assert modes == [False, False, False, True, True, False, False, True, True, False]
    assert ctl.state.skip_windows == 2
    assert ctl.state.skipped_intervals == 4
    # after the first window ended at check 6 (acc 0.7) the history restarted there: 0.7, 0.702, 0.704
    # needed W + 1 = 3 fresh values before the second window could start (at check 8)


def test_schedule_window_blocks_and_ends_skipping():
    cfg = WUSConfig(window=1, threshold=0.05, warmup=0, skip_length=5, schedule_window=[0.3, 0.6])
    _, _, ctl = _controller(cfg)
    modes = _run(ctl, [0.5] * 10, total=10)
    # progress 0.1, 0.2: outside; 0.3: skip starts; 0.6 leaves the window and ends it
    assert modes == [False, False, True, True, True, False, False, False, False, False]


def test_cap_on_the_skipped_fraction():
    cfg = WUSConfig(window=1, threshold=0.05, warmup=0, skip_length=100, max_skip_fraction=0.3)
    _, _, ctl = _controller(cfg, total_checks=10)
    modes = _run(ctl, [0.5] * 10)
    assert sum(modes) == 3
    assert ctl.state.skipped_intervals <= 3


def test_cap_needs_total_checks():
    with pytest.raises(ValueError, match="total_checks"):
        _controller(WUSConfig(max_skip_fraction=0.5))


def test_bias_lr_factor_needs_a_bias_group():
    model = _Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="param_groups"):
        WUSController(model, opt, WUSConfig(bias_lr_factor=2.0))


def test_bad_bias_scope_is_a_config_error():
    with pytest.raises(ConfigError, match="bias_scope"):
        _controller(WUSConfig(bias_scope="last:0"))


def test_lr_coupling_managed_on_the_optimizer():
    cfg = WUSConfig(window=1, threshold=0.05, warmup=0, skip_length=1, bias_lr_factor=3.0, lr_decay=0.5)
    _, opt, ctl = _controller(cfg)
    ctl.observe(0.5)
    ctl.observe(0.5)  # plateau: skip window 1 starts, base LR halves, biases x3
    assert ctl.skipping
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.05, 0.15])
    ctl.observe(0.5)  # window over
    assert not ctl.skipping
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.05, 0.05])
    assert ctl.lr_factor(0) == pytest.approx(0.5)


def test_layer_groups_attach_norm_layers_to_the_layer_before():
    groups = layer_groups(_Tiny())
    names = [[n for n, _ in g] for g in groups]
    assert names == [["conv.weight", "bn.weight", "bn.bias"], ["fc1.weight", "fc1.bias"], ["fc2.weight", "fc2.bias"]]


def test_frozen_set_by_bias_scope():
    model = _Tiny()
    names = {id(p): n for n, p in model.named_parameters()}

    def frozen(**kw):
        return {names[id(p)] for p in skip_frozen_parameters(model, WUSConfig(**kw))}

    weights = {"conv.weight", "bn.weight", "fc1.weight", "fc2.weight"}
    assert frozen() == weights
    assert frozen(bias_scope="last:1") == weights | {"bn.bias", "fc1.bias"}
    assert frozen(train_bn_scale=True) == weights - {"bn.weight"}


def _step(model, opt, x, y):
    opt.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    opt.step()
    return grads


@pytest.mark.parametrize("scope", ["all", "last:1"])
def test_skip_steps_freeze_weights_bit_identically_and_keep_momentum(scope):
    cfg = WUSConfig(window=1, threshold=0.05, warmup=0, skip_length=3, bias_scope=scope)
    model, opt, ctl = _controller(cfg)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    x, y = torch.randn(16, 1, 4, 4), torch.randint(0, 3, (16,))
    _step(model, opt, x, y)  # full step: momentum buffers exist now
    momentum = {n: opt.state[p]["momentum_buffer"].clone() for n, p in model.named_parameters()}
    ctl.observe(0.5)
    assert ctl.observe(0.5)  # skip window starts

    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    before = copy.deepcopy(model.state_dict())
    for _ in range(3):
        grads = _step(model, opt, x, y)
        for name in frozen:
            assert grads[name] is None, f"{name} got a gradient in a skip step"
    after = model.state_dict()
    for name in frozen:
        assert torch.equal(before[name], after[name]), f"{name} moved in a skip window"
        param = dict(model.named_parameters())[name]
        assert torch.equal(opt.state[param]["momentum_buffer"], momentum[name]), f"{name}'s momentum changed"
    assert not torch.equal(before["fc2.bias"], after["fc2.bias"]), "the head's bias must keep training"
    if scope == "all":
        assert not torch.equal(before["bn.bias"], after["bn.bias"])
    else:
        assert torch.equal(before["bn.bias"], after["bn.bias"])

    ctl.observe(0.5)
    ctl.observe(0.5)
    ctl.observe(0.5)
    assert not ctl.skipping  # full updates resume
    before = copy.deepcopy(model.state_dict())
    _step(model, opt, x, y)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable  # what trained before
    assert not torch.equal(before["conv.weight"], model.state_dict()["conv.weight"])


def test_backprop_stops_early_when_only_the_head_trains():
    from torch.utils.flop_counter import FlopCounterMode

    x, y = torch.randn(32, 1, 4, 4), torch.randint(0, 3, (32,))

    def step_flops(scope):
        cfg = WUSConfig(window=1, threshold=0.05, warmup=0, bias_scope=scope)
        model, opt, ctl = _controller(cfg)
        ctl.observe(0.5)
        ctl.observe(0.5)
        with FlopCounterMode(display=False) as counter:
            nn.functional.cross_entropy(model(x), y).backward()
        return counter.get_total_flops()

    model = _Tiny()
    with FlopCounterMode(display=False) as counter:
        nn.functional.cross_entropy(model(x), y).backward()
    full = counter.get_total_flops()
    assert step_flops("last:1") < step_flops("all") < full


def test_a_layer_the_user_froze_stays_frozen_after_a_skip_window():
    torch.manual_seed(0)
    model = _Tiny()
    model.conv.weight.requires_grad_(False)  # e.g. a pretrained backbone being fine-tuned
    model.bn.weight.requires_grad_(False)
    opt = torch.optim.SGD(param_groups(model, weight_decay=5e-4), lr=0.1, momentum=0.9)
    ctl = WUSController(model, opt, WUSConfig(window=1, threshold=0.05, warmup=0, skip_length=1))
    assert all(p.requires_grad for p in ctl.frozen_parameters)  # WUS toggles only what the user trains
    _run(ctl, [0.5, 0.5])
    assert ctl.skipping
    ctl.observe(0.5)
    assert not ctl.skipping  # the skip window is over
    assert not model.conv.weight.requires_grad and not model.bn.weight.requires_grad
    assert model.fc1.weight.requires_grad and model.fc2.weight.requires_grad
    before = model.conv.weight.detach().clone()
    _step(model, opt, torch.randn(16, 1, 4, 4), torch.randint(0, 3, (16,)))
    assert torch.equal(before, model.conv.weight)


def test_state_dict_round_trip_resumes_mid_window():
    cfg = WUSConfig(window=1, threshold=0.05, warmup=0, skip_length=3, lr_decay=0.5,
                    bias_lr_factor=2.0)
    _, _, ctl = _controller(cfg)
    _run(ctl, [0.5, 0.5, 0.5])  # inside a skip window, one interval done
    assert ctl.skipping
    state = copy.deepcopy(ctl.state_dict())
    model, opt, fresh = _controller(cfg)
    fresh.load_state_dict(state)
    assert fresh.state_dict() == state
    assert fresh.skipping and not model.conv.weight.requires_grad and model.fc2.bias.requires_grad
    assert fresh.lr_factor(1) == ctl.lr_factor(1) == pytest.approx(1.0)
    assert [fresh.observe(a) for a in (0.5, 0.5, 0.5)] == [ctl.observe(a) for a in (0.5, 0.5, 0.5)]
    assert fresh.state_dict() == ctl.state_dict()


class _Tied(nn.Module):
    """Nested blocks, a bias-free conv + BatchNorm, LayerNorm, and a head tied to the embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 5, bias=False)
        self.block = nn.Sequential(nn.Sequential(nn.Conv1d(1, 1, 1, bias=False), nn.BatchNorm1d(1)), nn.LayerNorm(5))
        self.head = nn.Linear(5, 6)
        self.twin = nn.Linear(6, 5, bias=False)
        self.twin.weight = self.embed.weight  # tied: one parameter, two modules


def test_layer_walk_counts_shared_parameters_once_and_merges_norm_layers():
    from wus_tune.layers import parameterised_layers, weighted_layers

    model = _Tied()
    layers = parameterised_layers(model)
    names = [[n for n, _ in layer.params] for layer in layers]
    assert names == [["embed.weight"], ["block.0.0.weight", "block.0.1.weight", "block.0.1.bias",
                                        "block.1.weight", "block.1.bias"], ["head.weight", "head.bias"]]
    owned = [id(p) for layer in layers for _, p in layer.params]
    assert sorted(owned) == sorted({id(p) for p in model.parameters()})  # each parameter exactly once
    assert [name for name, _ in weighted_layers(model)] == ["embed", "block.0.0", "head"]  # not twin: tied
    # WUS: a bias-free conv's BatchNorm shift keeps training as its bias; the tied weight is frozen once
    frozen = skip_frozen_parameters(model, WUSConfig())
    assert [id(p) for p in frozen].count(id(model.embed.weight)) == 1
    assert id(model.block[0][1].bias) not in {id(p) for p in frozen}


def test_a_layernorm_model_keeps_its_norm_shift_training():
    model = nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    groups = layer_groups(model)
    assert [[n for n, _ in g] for g in groups] == [["0.weight", "0.bias"], ["1.weight", "1.bias", "2.weight", "2.bias"],
                                                    ["3.weight", "3.bias"]]
    kept = {n for n, p in model.named_parameters()} - {
        n for n, p in model.named_parameters() if id(p) in {id(q) for q in skip_frozen_parameters(model, WUSConfig())}}
    assert kept == {"0.bias", "1.bias", "2.bias", "3.bias"}
