"""Fine-tuning with a frozen backbone: load pretrained weights, freeze them, train a new head.

The backbone is frozen the plain PyTorch way (``requires_grad_(False)``); wus_tune keeps frozen
parameters frozen (no method, WUS included, unfreezes them) and counts no gradient work for them.
Pretrain once (or bring your own weights), then tune the fine-tuning::

    PYTHONPATH=. python -m wus_tune.train --model finetune_frozen:build --model.kwargs "{freeze: false}" \
        --dataset digits --epochs 10 --out pretrained
    PYTHONPATH=. python -m wus_tune.study --model finetune_frozen:build \
        --set model.kwargs="{backbone: pretrained/model.pt}" --dataset digits --epochs 5 --n-trials 10
    python -m wus_tune.pareto --study build-digits --out best.yaml
    PYTHONPATH=. python -m wus_tune.train --config best.yaml
"""

from __future__ import annotations

import torch
from torch import nn


class Classifier(nn.Module):
    def __init__(self, channels: int, width: int, num_classes: int) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )  # fmt: skip
        self.head = nn.Linear(2 * width, num_classes)
        self.frozen = False

    def train(self, mode: bool = True) -> "Classifier":
        super().train(mode)
        if self.frozen:  # BatchNorm of a frozen backbone keeps its pretrained running statistics
            self.backbone.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def build(
    input_shape: tuple[int, int, int], num_classes: int, backbone: str | None = None, channels: int = 16,
    freeze: bool = True,
) -> nn.Module:  # fmt: skip
    """A small conv classifier; ``backbone``: a checkpoint (wus_tune's ``model.pt`` or a plain state_dict)
    whose ``backbone.*`` weights are loaded; ``freeze``: the backbone trains not at all, BatchNorm included
    (kept in eval mode, so its running statistics stay those of the pretrained weights)."""
    model = Classifier(input_shape[0], channels, num_classes)
    if backbone is not None:
        state = torch.load(backbone, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
        weights = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
        model.backbone.load_state_dict(weights)
    if freeze:
        model.backbone.requires_grad_(False)
        model.frozen = True
        model.train()
    return model
