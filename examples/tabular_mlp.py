"""A tabular classifier: your own data function (scikit-learn's breast-cancer table) and your own MLP.

Copy this file and run::

    PYTHONPATH=. python -m wus_tune.study --model tabular_mlp:build --dataset tabular_mlp:load --epochs 20 --n-trials 20
    python -m wus_tune.pareto --study build-load --out best.yaml
    PYTHONPATH=. python -m wus_tune.train --config best.yaml

Float features ``(N, D)`` are standardised with the training split's per-feature statistics and never
cropped or flipped; the validation split is cut from the training rows (``data.val_fraction``).
"""

from __future__ import annotations

import torch
from torch import nn


def load(test_fraction: float = 0.2, seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """569 rows, 30 float features, 2 classes; a held-out test split, the rest for training."""
    from sklearn.datasets import load_breast_cancer

    x, y = load_breast_cancer(return_X_y=True)
    x, y = torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = round(len(y) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return {"train": (x[train], y[train]), "test": (x[test], y[test])}


def build(input_shape: tuple[int], num_classes: int, hidden: int = 64, dropout: float = 0.0) -> nn.Module:
    """Two hidden layers with LayerNorm; ``input_shape`` is ``(features,)``."""
    (features,) = input_shape
    return nn.Sequential(
        nn.Linear(features, hidden), nn.LayerNorm(hidden), nn.ReLU(), nn.Dropout(dropout),
        nn.Linear(hidden, hidden), nn.LayerNorm(hidden), nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )  # fmt: skip
