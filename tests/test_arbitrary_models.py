"""WUS and every registered method on models that are not ours: a small ViT-style classifier (LayerNorm,
attention's in_proj parameters, a class token), tied weights, layers without bias, conv without bias then
BatchNorm, and a backbone the user froze. Each method either trains the model for an epoch with every
invariant kept, or says in one line, before any trial, why it cannot apply (issue 10, deliver 4)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from wus_tune import TrainConfig, fit
from wus_tune.errors import UsageError
from wus_tune._study.catalog import declarations
from wus_tune.methods import registry


class TinyViT(nn.Module):
    """Patches of 4x4 -> tokens, a class token and learned positions, one pre-norm encoder layer, LayerNorm, head."""

    def __init__(self, input_shape, num_classes, dim=16):
        super().__init__()
        c, h, w = input_shape
        self.patch = nn.Conv2d(c, dim, kernel_size=4, stride=4, bias=False)
        tokens = (h // 4) * (w // 4)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        self.encoder = nn.TransformerEncoderLayer(dim, nhead=2, dim_feedforward=2 * dim, dropout=0.0,
                                                  batch_first=True, norm_first=True)  # fmt: skip
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(len(t), -1, -1), t], 1) + self.pos
        return self.head(self.norm(self.encoder(t))[:, 0])


class Tied(nn.Module):
    """One hidden layer applied twice (shared weight and bias), a bias-free projection."""

    def __init__(self, input_shape, num_classes, hidden=16):
        super().__init__()
        self.inp = nn.Linear(input_shape[0], hidden, bias=False)
        self.a = nn.Linear(hidden, hidden)
        self.b = nn.Linear(hidden, hidden)
        self.b.weight, self.b.bias = self.a.weight, self.a.bias  # tied
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x):
        return self.head(torch.relu(self.b(torch.relu(self.a(torch.relu(self.inp(x)))))))


class FrozenBackbone(nn.Module):
    """Conv without bias + BatchNorm in a nested backbone the user froze; a trainable head."""

    def __init__(self, input_shape, num_classes):
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Sequential(nn.Conv2d(input_shape[0], 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )  # fmt: skip
        self.backbone.requires_grad_(False)
        self.head = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, num_classes))

    def forward(self, x):
        return self.head(self.backbone(x))


class ConvBN(nn.Module):
    """Nested blocks of conv without bias then BatchNorm (its shift is the only bias), all trainable."""

    def __init__(self, input_shape, num_classes):
        super().__init__()
        block = lambda c_in, c_out: nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),  # noqa: E731
                                                  nn.BatchNorm2d(c_out), nn.ReLU())  # fmt: skip
        self.blocks = nn.ModuleList([block(input_shape[0], 8), block(8, 8)])
        self.head = nn.Linear(8, num_classes, bias=False)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x.mean((2, 3)))


def images(n=96):
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % 2
    x = (torch.rand(n, 1, 8, 8, generator=g) * 100 + 100 * y.view(-1, 1, 1, 1)).to(torch.uint8)
    return x, y


def features(n=96):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 12, generator=g)
    return x, (x[:, 0] > 0).long()


MODELS = {"vit": (TinyViT, images), "tied": (Tied, features), "frozen": (FrozenBackbone, images),
          "convbn": (ConvBN, images)}  # fmt: skip
# WUS that skips once two checks are seen (window 1), so skip windows really happen in a three-epoch run.
EAGER_WUS = {"warmup": 0, "threshold": 1.0, "window": 1, "skip_length": 1,
             "schedule_window": [0.0, 1.0]}  # fmt: skip


def method_names():
    return ["wus"] + sorted(n for n in registry() if n != "wus")


def config_for(method: str) -> TrainConfig:
    raw = {"epochs": 3, "device": "cpu", "optim": {"batch_size": 16, "lr": 0.02}, "data": {"val_fraction": 0.25}}
    if method == "wus":
        raw["methods"] = {"wus": EAGER_WUS}
    else:
        raw["methods"] = {method: {}}
    return TrainConfig.from_dict(raw)


def reason_not_applicable(method: str, build, config: TrainConfig, input_shape: tuple[int, ...]) -> str | None:
    """The method's own checks, as the study asks them: on the config that records the user's factory,
    then on the network it builds."""
    from wus_tune.plugins import record_sources

    config = record_sources(config, model=build)
    declared = declarations()[method]
    return declared.check_model(config.model, config) or declared.check_module(build(input_shape, 2), config)


@pytest.mark.parametrize("method", method_names())
@pytest.mark.parametrize("kind", list(MODELS))
def test_every_method_trains_arbitrary_models_or_says_why_not(kind, method, one_torch_thread):
    build, data = MODELS[kind]
    x, y = data()
    config = config_for(method)
    why = reason_not_applicable(method, build, config, tuple(x.shape[1:]))
    if why is not None:
        assert isinstance(why, str) and why and "\n" not in why
        return
    torch.manual_seed(0)
    initial = build(tuple(x.shape[1:]), 2)
    frozen = {n: p.detach().clone() for n, p in initial.named_parameters() if not p.requires_grad}
    result = fit(config, model=initial, data=(x, y))
    trained = result.model
    assert result.num_params == sum(p.numel() for p in initial.parameters())  # tied weights counted once
    assert all(torch.isfinite(p).all() for p in trained.parameters())
    named = dict(trained.named_parameters())
    for name, before in frozen.items():  # the user froze them: no method may train or unfreeze them
        assert not named[name].requires_grad, name
        assert torch.equal(named[name].detach(), before), name
    if kind == "tied":
        assert trained.b.weight is trained.a.weight and trained.b.bias is trained.a.bias
    if kind == "frozen" and method == "wus":
        assert result.changed_steps > 0
    trainable = [n for n, p in initial.named_parameters() if p.requires_grad]
    moved = [n for n in trainable if not torch.equal(named[n].detach(), dict(initial.named_parameters())[n].detach())]
    assert moved, "nothing trained"


def test_the_study_says_in_one_line_before_any_trial_that_a_method_cannot_apply(study_dir):
    from wus_tune.study import run_study

    def vit(input_shape, num_classes):
        return TinyViT(input_shape, num_classes)

    with pytest.raises(UsageError, match="gauss_newton") as info:
        run_study(train={"epochs": 1, "device": "cpu"}, model=vit, data=images(), methods=["gauss_newton"],
                  n_trials=2, tracking_uri="none", name="vit-gn", echo=None)  # fmt: skip
    assert "\n" not in str(info.value)
    assert not (study_dir / "studies").exists() and not (study_dir / "mlruns").exists()
