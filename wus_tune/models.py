"""Models: :func:`build_model`, the one way a network enters the trainer, and the built-in CIFAR-sized
networks of the Weight Update Skipping paper, scalable by a channel multiplier.

The built-ins are factories like a user's (``factory(input_shape, num_classes, **kwargs)``), registered
by import path in :mod:`wus_tune.registry`.

Every model takes normalised float images ``(B, C, H, W)`` and returns logits ``(B, num_classes)``. The
layouts follow the usual CIFAR variants (3x3 stems, no ImageNet-style stride-4 entry), so 32x32 inputs keep
enough resolution; pooling is skipped once the feature map is 1 pixel wide, so the same builders also
work on 8x8 ``digits`` images, which keeps the tests and CPU smoke runs small.

``width`` scales every hidden channel count (``max(1, round(c * width))``); ``width=0.25`` makes
VGG-11 trainable on a laptop CPU. Weights use PyTorch's default initialisation. The models hold no
precision or memory-format assumptions: the trainer may convert them to ``channels_last`` and run them
under bf16 autocast.
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
from torch import nn

from wus_tune.config import ModelConfig
from wus_tune.errors import ConfigError, one_line
from wus_tune.factories import call_factory, load_object
from wus_tune.registry import model_registry

__all__ = ["build_model", "check_output", "mlp", "alexnet", "vgg11", "vgg16", "resnet18"]

InputShape = tuple[int, int, int]

_VGG_LAYOUTS: dict[str, list[int | str]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


def _scaled(channels: int, width: float) -> int:
    return max(1, round(channels * width))


def _conv_bn_relu(c_in: int, c_out: int, batch_norm: bool, kernel: int = 3) -> list[nn.Module]:
    # A conv followed by BN needs no bias (BN's shift replaces it); without BN the bias is the only shift.
    conv = nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=not batch_norm)
    return [conv, nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)] if batch_norm else [conv, nn.ReLU(inplace=True)]


def _pool_if_possible(size: int) -> tuple[list[nn.Module], int]:
    """Halve the feature map only while it is at least 2 px, so small inputs run through deep layouts."""
    return ([nn.MaxPool2d(2)], size // 2) if size >= 2 else ([], size)


def _head(c_in: int, num_classes: int) -> list[nn.Module]:
    return [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, num_classes)]


def _features_and_head(features: list[nn.Module], head: list[nn.Module]) -> nn.Sequential:
    # Named children give readable state_dict keys ("features.0.weight", "head.2.bias").
    return nn.Sequential(OrderedDict(features=nn.Sequential(*features), head=nn.Sequential(*head)))


def _vgg(layout: Sequence[int | str], input_shape: InputShape, num_classes: int, width: float, batch_norm: bool) -> nn.Module:
        """VGG for CIFAR: 3x3 convs (+BN) and 2x2 max-pools, then global average pooling and one Linear."""
        c, size = _image_shape(input_shape, "vgg")
        layers: list[nn.Module] = []
        for item in layout:
            if item == "M":
                pool, size = _pool_if_possible(size)
                layers += pool
            else:
                c_out = _scaled(int(item), width)
                layers += _conv_bn_relu(c, c_out, batch_norm)
                c = c_out
        return _features_and_head(layers, _head(c, num_classes))


def vgg11(input_shape: InputShape, num_classes: int, *, width: float = 1.0, batch_norm: bool = True) -> nn.Module:
    """VGG-11 for CIFAR (8 convs), see :func:`_vgg`."""
    return _vgg(_VGG_LAYOUTS["vgg11"], input_shape, num_classes, width, batch_norm)


def vgg16(input_shape: InputShape, num_classes: int, *, width: float = 1.0, batch_norm: bool = True) -> nn.Module:
    """VGG-16 for CIFAR (13 convs), see :func:`_vgg`."""
    return _vgg(_VGG_LAYOUTS["vgg16"], input_shape, num_classes, width, batch_norm)


def alexnet(input_shape: InputShape, num_classes: int, *, width: float = 1.0) -> nn.Module:
    """CIFAR AlexNet, no BatchNorm (as in the paper), every conv and Linear with a bias.

    Layout (channels before ``width`` scaling)::

        conv5x5(64)  ReLU maxpool   conv5x5(192) ReLU maxpool
        conv3x3(384) ReLU  conv3x3(256) ReLU  conv3x3(256) ReLU maxpool
        global avgpool  Linear(256, 256) ReLU  Linear(256, num_classes)

    Stride-1 5x5 convs replace ImageNet AlexNet's stride-4 11x11 entry, which would leave a 32x32 image
    almost no resolution; inputs under 16 px use 3x3 kernels instead. The classifier is one small hidden
    layer without dropout: the ImageNet 4096-wide head would dominate the parameter count on 10 classes,
    and dropout would add noise to the validation accuracy that WUS watches for plateaus.
    """
    c, size = _image_shape(input_shape, "alexnet")
    big = 3 if size < 16 else 5
    plan = [(64, big, True), (192, big, True), (384, 3, False), (256, 3, False), (256, 3, True)]  # (c, k, pool)
    layers: list[nn.Module] = []
    for channels, kernel, pool_after in plan:
        c_out = _scaled(channels, width)
        layers += _conv_bn_relu(c, c_out, batch_norm=False, kernel=kernel)
        c = c_out
        if pool_after:
            pool, size = _pool_if_possible(size)
            layers += pool
    hidden = _scaled(256, width)
    head = [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, hidden), nn.ReLU(inplace=True)]
    head.append(nn.Linear(hidden, num_classes))
    return _features_and_head(layers, head)


class BasicBlock(nn.Module):
    """Two 3x3 convs with an identity shortcut, or a 1x1 projection when the shape changes.

    Submodules are registered in forward order (main path, then shortcut) so that
    :func:`wus_tune.layers.parameterised_layers` can rely on registration order.
    """

    def __init__(self, c_in: int, c_out: int, stride: int, batch_norm: bool) -> None:
        super().__init__()
        norm: Callable[[int], nn.Module] = nn.BatchNorm2d if batch_norm else (lambda _: nn.Identity())
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=not batch_norm)
        self.bn1 = norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=not batch_norm)
        self.bn2 = norm(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=not batch_norm), norm(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet: 3x3 stem without max-pool, four stages of BasicBlocks, global pool, Linear."""

    def __init__(
        self, blocks: Sequence[int], input_shape: InputShape, num_classes: int, width: float, batch_norm: bool
    ) -> None:
        super().__init__()
        c = _scaled(64, width)
        self.stem = nn.Sequential(*_conv_bn_relu(input_shape[0], c, batch_norm))
        stages: list[nn.Module] = []
        for i, (n, base) in enumerate(zip(blocks, (64, 128, 256, 512))):
            c_out = _scaled(base, width)
            for j in range(n):
                stages.append(BasicBlock(c, c_out, stride=2 if (i > 0 and j == 0) else 1, batch_norm=batch_norm))
                c = c_out
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(*_head(c, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))

    def forward_chain(self) -> list[nn.Module]:
        """The modules ``forward`` applies one after another (lets a frozen prefix be split off and cached)."""
        return [self.stem, self.stages, self.head]


def resnet18(input_shape: InputShape, num_classes: int, *, width: float = 1.0, batch_norm: bool = True) -> nn.Module:
    """CIFAR ResNet-18: BasicBlocks [2, 2, 2, 2] with 64/128/256/512 channels and strides 1, 2, 2, 2."""
    _image_shape(input_shape, "resnet18")
    return ResNet([2, 2, 2, 2], input_shape, num_classes, width, batch_norm)


def mlp(
    input_shape: tuple[int, ...], num_classes: int, *, width: float = 1.0, hidden: int = 256, depth: int = 2
) -> nn.Module:
    """``depth`` Linear layers with ReLU between; ``depth=1`` is multinomial logistic regression.

    Any input shape: images are flattened, so the same network takes (C, H, W) images and (D,) features."""
    hidden = _scaled(hidden, width)
    dims = [math.prod(input_shape)] + [hidden] * (depth - 1) + [num_classes]
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (d_in, d_out) in enumerate(zip(dims, dims[1:])):
        layers += [nn.Linear(d_in, d_out)] + ([nn.ReLU(inplace=True)] if i < len(dims) - 2 else [])
    return nn.Sequential(*layers)


def _image_shape(input_shape: tuple[int, ...], name: str) -> tuple[int, int]:
    if len(input_shape) != 3:
        raise ConfigError(f"model.name: {name} takes images (C, H, W), not inputs of shape {tuple(input_shape)}; "
                          "use model.name: mlp, or your own model.factory")  # fmt: skip
    return input_shape[0], min(input_shape[1:])


# Config fields a factory gets when its signature names them and the config sets them to something other
# than their default (the built-ins' own defaults are those, so they behave the same either way; a user's
# factory with its own `hidden=32` keeps it unless model.hidden is set).
MODEL_FIELDS = ("width", "hidden", "depth", "batch_norm")


def build_model(
    cfg: ModelConfig,
    input_shape: tuple[int, ...],
    num_classes: int,
    model: nn.Module | Callable[..., nn.Module] | None = None,
) -> nn.Module:
    """The network of ``cfg`` for inputs of ``input_shape`` (without the batch dimension).

    One path for every model: ``model`` (an ``nn.Module``, deep-copied so each run starts from the same
    weights, or a factory callable), else the factory at ``cfg.factory``, else the registered name
    ``cfg.name`` (built-ins and ``wus_tune.models`` entry points). A factory is called as
    ``factory(input_shape, num_classes, **cfg.kwargs)`` (plus the :data:`MODEL_FIELDS` it names that the
    config sets to other than their defaults) and must
    return an ``nn.Module``; anything else is a one-line ConfigError.
    """
    if isinstance(model, nn.Module):
        return copy.deepcopy(model)
    if model is not None and not callable(model):
        raise ConfigError(f"model: expected an nn.Module or a factory callable, got {type(model).__name__}")
    key = "model.factory" if (model is not None or cfg.factory) else "model.name"
    if model is None:
        path = cfg.factory or model_registry().get(cfg.name)
        if path is None:
            raise ConfigError(f"model.name: unknown model {cfg.name!r}; choose one of {', '.join(model_registry())}")
        model = load_object(path, key)
    defaults = ModelConfig()
    fields = {name: getattr(cfg, name) for name in MODEL_FIELDS if getattr(cfg, name) != getattr(defaults, name)}
    built = call_factory(model, key, (tuple(input_shape), num_classes), cfg.kwargs, fields)
    if not isinstance(built, nn.Module):
        name = getattr(model, "__qualname__", repr(model))
        raise ConfigError(f"{key}: {name}() returned {type(built).__name__}, not a torch.nn.Module")
    if next(built.parameters(), None) is None:
        raise ConfigError(f"{key}: the model has no parameters to train")
    return built


def check_output(model: nn.Module, sample: torch.Tensor, num_classes: int, key: str = "model") -> None:
    """One forward pass on a small sample (no gradient, eval mode): logits must be (B, num_classes)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(sample)
    except Exception as e:
        raise ConfigError(f"{key}: the model fails on a batch of shape {tuple(sample.shape)} ({sample.dtype}): "
                          f"{one_line(e, with_type=True)}") from None  # fmt: skip
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or out.shape != (len(sample), num_classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"{key}: the model returns {got} for a batch of {len(sample)}; expected logits "
                          f"({len(sample)}, {num_classes}), one per class")  # fmt: skip


