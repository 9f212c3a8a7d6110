"""torchvision's own ResNet-18, adapted to 32x32 images, as a wus_tune model factory.

Copy this file next to your data and run (any ImageFolder directory or .tar.gz of 32x32 images)::

    PYTHONPATH=. python -m wus_tune.study --model resnet18_cifar:build --dataset imagefolder \
        --data-dir my_images.tar.gz --epochs 15 --n-trials 20
    python -m wus_tune.pareto --study build-imagefolder --out best.yaml
    PYTHONPATH=. python -m wus_tune.train --config best.yaml

The spec form of the same model: ``model: {factory: "resnet18_cifar:build", kwargs: {}}``.
"""

from __future__ import annotations

from torch import nn
from torchvision.models import resnet18


def build(input_shape: tuple[int, int, int], num_classes: int, zero_init_residual: bool = False) -> nn.Module:
    """``torchvision.models.resnet18`` (random initialisation) for small images.

    ImageNet's 7x7 stride-2 stem and its max-pool shrink a 32x32 image to 8x8 before the first block;
    the usual CIFAR adaptation replaces them with one 3x3 stride-1 conv and no pool. The rest is
    torchvision's network unchanged, its classifier sized to ``num_classes``.
    """
    model = resnet18(weights=None, num_classes=num_classes, zero_init_residual=zero_init_residual)
    model.conv1 = nn.Conv2d(input_shape[0], 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model
