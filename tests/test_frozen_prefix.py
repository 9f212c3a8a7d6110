"""Frozen-prefix caching: training the top on cached features is the skip step with eval-mode
normalisation below the top and no augmentation, and the cache lives only inside its window, under its cap."""

from __future__ import annotations

import copy

import torch
from torch import nn

from wus_tune import WUSConfig
from wus_tune.methods.wus.frozen_prefix import (
    PrefixCacheSession,
    build_feature_cache,
    sequential_chain,
    split_frozen_prefix,
)
from wus_tune.methods.wus.rule import WUSController, param_groups, skip_frozen_parameters


def _tiny() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten()),
        nn.Sequential(nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 3)),
    )


def _freeze(model: nn.Module, scope: str) -> list[nn.Parameter]:
    frozen = skip_frozen_parameters(model, WUSConfig(bias_scope=scope))
    for p in frozen:
        p.requires_grad_(False)
    return frozen


def _data(n: int = 40):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 1, 4, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def _in_order(x, y, batch_size=16):
    for i in range(0, len(y), batch_size):
        yield x[i:i + batch_size], y[i:i + batch_size]


def test_split_at_the_first_trainable_module():
    model = _tiny()
    assert len(sequential_chain(model)) == 7
    assert split_frozen_prefix(model) is None  # everything trains: no frozen prefix
    _freeze(model, "last:1")  # only the last Linear's bias trains
    prefix, top = split_frozen_prefix(model)
    assert [type(m) for m in top] == [nn.Linear]
    assert len(prefix) == 6
    assert split_frozen_prefix(nn.Module()) is None  # not a chain: no cache


def test_cached_top_steps_equal_uncached_skip_steps_with_eval_norm_and_no_augmentation():
    x, y = _data()
    reference, cached = _tiny(), _tiny()
    reference[0][1].running_mean.normal_()  # non-trivial running statistics, so eval mode matters
    reference[0][1].running_var.uniform_(0.5, 2.0)
    cached.load_state_dict(reference.state_dict())
    for m in (reference, cached):
        _freeze(m, "last:2")
    opts = [torch.optim.SGD(param_groups(m, weight_decay=5e-4), lr=0.1, momentum=0.9) for m in (reference, cached)]
    session = PrefixCacheSession(cached, max_bytes=10**6, batch_size=8, seed=3)
    assert session.begin(_in_order(x, y), len(y))
    order = torch.Generator().manual_seed(3)  # the cache's own batch order, replayed for the reference
    steps = 0
    while steps < 8:
        perm = torch.randperm(len(y), generator=order)
        for i in range(len(y) // 8):
            index = perm[i * 8:(i + 1) * 8]
            # reference: the ordinary skip step, prefix in eval mode, the un-augmented images
            reference.train()
            reference[0].eval()
            opts[0].zero_grad(set_to_none=True)
            nn.functional.cross_entropy(reference(x[index]), y[index]).backward()
            opts[0].step()
            opts[1].zero_grad(set_to_none=True)
            loss, _, targets = session.step_loss(nn.functional.cross_entropy)
            assert torch.equal(targets, y[index])
            loss.backward()
            opts[1].step()
            steps += 1
    for (name, a), b in zip(reference.state_dict().items(), cached.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=f"{name} differs from the uncached skip step")
    assert not torch.equal(_tiny().state_dict()["1.2.bias"], cached.state_dict()["1.2.bias"])  # the top trained
    assert cached[0][1].training  # the prefix's modes were restored after building


def test_cache_respects_its_cap_and_lives_only_inside_the_window():
    x, y = _data()
    model = _tiny()
    opt = torch.optim.SGD(param_groups(model, weight_decay=0), lr=0.1)
    ctl = WUSController(model, opt, WUSConfig(window=1, threshold=0.05, warmup=0, skip_length=2,
                                              bias_scope="last:1"))
    need = len(y) * 8 * 4  # the prefix (through the frozen hidden Linear) gives 8 float32 features per image
    assert build_feature_cache(split_frozen_prefix(_frozen_copy(model))[0], _in_order(x, y), num_images=len(y),
                               max_bytes=need - 1) is None
    session = PrefixCacheSession(model, max_bytes=need, batch_size=8)
    states = []
    for accuracy in (0.5, 0.5, 0.5, 0.5, 0.5):  # full, skip window (2 checks), full, ...
        ctl.observe(accuracy)
        for _ in range(3):  # the loop of one check interval, as the trainer runs it
            if ctl.skipping:
                assert session.begin(_in_order(x, y), len(y))
                session.step_loss(nn.functional.cross_entropy)[0].backward()
            elif session.in_period:
                session.end()
        states.append((ctl.skipping, session.active))
    assert (True, True) in states and (False, False) in states
    assert all(active == skipping for skipping, active in states)  # dropped as soon as the window ends
    assert session.builds == 2 and session.fallbacks == 0
    assert session.peak_bytes == need
    small = PrefixCacheSession(_frozen_copy(model), max_bytes=need - 1, batch_size=8)
    assert not small.begin(_in_order(x, y), len(y))  # over the cap: ordinary skip steps
    assert small.cache is None and small.fallbacks == 1


def _frozen_copy(model: nn.Module) -> nn.Module:
    clone = copy.deepcopy(model)
    _freeze(clone, "last:1")
    return clone


def test_resnet_splits_through_its_forward_chain():
    from wus_tune.config import ModelConfig
    from wus_tune.models import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(name="resnet18", width=0.0625), (3, 8, 8), 10).eval()
    _freeze(model, "last:1")
    prefix, top = split_frozen_prefix(model)
    assert [type(m) for m in top] == [nn.Linear]
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(top(prefix(x)), model(x))
