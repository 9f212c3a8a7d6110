"""wus_tune.models: every model builds, trains a step, and lists its parameterised layers in order."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from wus_tune.config import ModelConfig
from wus_tune.errors import ConfigError
from wus_tune.layers import parameterised_layers
from wus_tune.models import build_model
from wus_tune.plugins import BUILTIN_MODELS, model_registry

SHAPES = [(3, 32, 32), (1, 8, 8)]


def test_the_registry_holds_the_builtin_models() -> None:
    assert all(model_registry()[name] == path for name, path in BUILTIN_MODELS.items())


@pytest.mark.parametrize("shape", SHAPES, ids=["cifar", "digits"])
@pytest.mark.parametrize("width", [0.25, 1.0])
@pytest.mark.parametrize("name", BUILTIN_MODELS)
def test_forward_backward(name: str, width: float, shape: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name, width=width), shape, num_classes=7)
    x = torch.randn(2, *shape)
    logits = model(x)
    assert logits.shape == (2, 7)
    logits.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", BUILTIN_MODELS)
def test_channels_last_and_bf16_autocast(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name, width=0.25), (3, 32, 32), num_classes=10).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        reference = model(x)
        model_cl = model.to(memory_format=torch.channels_last)
        out = model_cl(x.contiguous(memory_format=torch.channels_last))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out_bf16 = model_cl(x.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(out, reference, atol=1e-4, rtol=1e-3)
    assert out_bf16.shape == (4, 10) and torch.isfinite(out_bf16).all()


@pytest.mark.parametrize("name", BUILTIN_MODELS)
def test_parameterised_layers_cover_each_parameter_once(name: str) -> None:
    model = build_model(ModelConfig(name=name, width=0.25), (3, 32, 32), num_classes=10)
    layers = parameterised_layers(model)
    owned = [p for layer in layers for _, p in layer.params]
    assert len(owned) == len({id(p) for p in owned})
    assert {id(p) for p in owned} == {id(p) for p in model.parameters()}
    assert isinstance(layers[-1].module, nn.Linear) and layers[-1].module.out_features == 10
    assert all(isinstance(layer.module, (nn.Conv2d, nn.Linear)) for layer in layers)  # norm layers join the one before


def test_layer_order_follows_forward() -> None:
    """Forward hooks record the order layers actually run in; it must match the list (a ResNet block's
    shortcut runs after its main path in :class:`BasicBlock.forward`)."""
    for name in BUILTIN_MODELS:
        model = build_model(ModelConfig(name=name, width=0.25), (3, 32, 32), num_classes=10)
        layers = [layer.module for layer in parameterised_layers(model)]
        ran: list[nn.Module] = []
        for layer in layers:
            layer.register_forward_hook(lambda m, *_: ran.append(m))
        model(torch.randn(2, 3, 32, 32))
        assert [id(m) for m in ran] == [id(m) for m in layers], name


def test_bias_and_batch_norm_settings() -> None:
    convs = lambda m: [x for x in m.modules() if isinstance(x, nn.Conv2d)]  # noqa: E731
    alexnet = build_model(ModelConfig(name="alexnet"), (3, 32, 32), 10)
    assert len(convs(alexnet)) == 5 and all(c.bias is not None for c in convs(alexnet))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in alexnet.modules())
    for name in ("vgg11", "resnet18"):
        with_bn = build_model(ModelConfig(name=name), (3, 32, 32), 10)
        assert all(c.bias is None for c in convs(with_bn))
        without = build_model(ModelConfig(name=name, batch_norm=False), (3, 32, 32), 10)
        assert all(c.bias is not None for c in convs(without))
        assert not any(isinstance(m, nn.BatchNorm2d) for m in without.modules())
    assert len(convs(build_model(ModelConfig(name="vgg16"), (3, 32, 32), 10))) == 13


def test_sizes_match_the_standard_cifar_models() -> None:
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(build_model(ModelConfig(name="resnet18"), (3, 32, 32), 10)) == 11_173_962
    # The usual CIFAR VGG-11 has 9,231,114, with conv biases in front of BN that BN cancels.
    assert count(build_model(ModelConfig(name="vgg11"), (3, 32, 32), 10)) == 9_231_114 - 2_752
    mlp = build_model(ModelConfig(name="mlp", hidden=100, depth=3, width=0.5), (1, 8, 8), 10)
    assert [(l.in_features, l.out_features) for l in (layer.module for layer in parameterised_layers(mlp))] == [(64, 50), (50, 50), (50, 10)]
    tiny = build_model(ModelConfig(name="vgg11", width=1 / 64), (3, 32, 32), 10)
    assert min(c.out_channels for c in tiny.modules() if isinstance(c, nn.Conv2d)) == 1


def test_unknown_model_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="resnet18"):
        build_model(ModelConfig(name="lenet"), (3, 32, 32), 10)
